"""The capture-to-decoder loop, with a fast lane for the frames that make up 99% of it.

A migration capture is hundreds of thousands of frames that are all alike: the
next in-order segment of the migration flow, or a pure ACK from the other side.
The general path turns each into a Frame, a TcpSegment, a reassembly event and a
feed call (~8 µs a frame). The lane recognises those two kinds straight from the
pcap bytes (one struct call for the record header, one for Ethernet/IPv4/TCP) and:

- an in-order data segment of a flow whose MigrationStream exists advances the
  reassembler's state exactly as its own fast path would, and its payload goes to
  the stream: frames of 16 KiB or more directly (zero-copy), small ones gathered
  into one 64 KiB feed. A gathered feed carries the timestamp of its last frame,
  like a loopback GSO frame carries one timestamp for 64 KiB;
- an in-order pure ACK of the reverse direction is dropped, as the reassembler
  would drop it.

Anything else (handshake, FIN, RST, retransmission, hole, other flows, IP options,
truncated records, other link types) flushes what was gathered and goes through
the general path, frame by frame, so events stay in capture order and the results
are those of the general path (tests compare the two).

Two implementations of the lane over the same records (PcapWalker or
PcapngWalker, the readers' own walkers): _Pump.python_lane in Python, and
scan_lane in C (analyzer/_speedups.c) when the extension was built. C is an
accelerator only: its limits (MAX_LANES ack lanes) are respected here, and
whenever its calls hand records back after only a few records (unrelated traffic,
holes, many connections) the Python lane takes the next records, for a window that
doubles while C keeps missing. So the C lane never fails a capture the Python lane
reads and costs at most a little more than it. docs/capture.md describes the
interface between this module and the reader, the demux and the reassembler.
"""

from __future__ import annotations

import array
import struct
import threading
from collections.abc import Iterable
from itertools import islice
from typing import TYPE_CHECKING

from migshark.analyzer import speedups
from migshark.analyzer.capture import CaptureFormatError, CaptureReader, parse_frame
from migshark.analyzer.capture.frames import LINKTYPE_ETHERNET
from migshark.analyzer.capture.pcapfile import RELEASE_STEP, Frame, PcapngWalker, PcapWalker

if TYPE_CHECKING:
    from migshark.analyzer.analysis import CaptureDemux, MigrationStream
    from migshark.analyzer.capture.frames import TcpSegment
    from migshark.analyzer.capture.tcp import Direction

_MASK = 0xFFFFFFFF
_PREFAULT_AHEAD = 48 << 20  # how far the prefault thread may run ahead of the walk
_PUBLISH_STEP = 4 << 20  # how often the walk tells it where it is
_RELEASE_LAG = 2 * RELEASE_STEP  # the walk releases itself past this
_GATHER = 1 << 16  # bytes gathered from small segments before one feed
_DIRECT = 1 << 14  # segments at least this big are fed without copying
# A C call that needs Python for a record after fewer records than this, and fewer
# bytes than _WORTHWHILE_BYTES (a few 64 KiB loopback frames pay for a call), did not
# pay for itself (a call costs about as much as that many records in the Python
# lane): the Python lane takes the next records, a window of at least _BACKOFF_MIN
# records that doubles on every such miss up to _BACKOFF_MAX.
_WORTHWHILE = 32
_WORTHWHILE_BYTES = 256 << 10
_BACKOFF_MIN = 64
_BACKOFF_MAX = 1 << 14
_PYTHON_WALKS = 1 << 10  # from this window on, the prefault thread is stopped
# Ethernet type + IPv4 version/IHL (b"\x08\x00\x45"), total length, fragment field,
# protocol, addresses and ports as one lane key, seq, data offset, flags.
_HEADERS = struct.Struct("!12x3sxHxxHxB2x12sI4xBB")
_HEADERS_LEN = 14 + 20 + 14  # through the TCP flags byte
_IPV4_NO_OPTIONS = b"\x08\x00\x45"

# A lane: the direction's reassembly state, its stream (None: not a migration, or not
# yet), and whether its in-order data may be dropped unread (the demux discards it).
Lane = tuple["Direction", "MigrationStream | None", bool]


def pump_capture(reader: CaptureReader, demux: CaptureDemux) -> None:
    """Feed every frame of `reader` to `demux` (raises CaptureFormatError like iteration)."""
    pump = _Pump(reader, demux)
    try:
        if speedups.native is not None:
            prefaulter = _Prefaulter(reader)
            with prefaulter:
                pump.run_native(prefaulter)
        else:
            pump.python_lane(pump.walker.frames(pump.walker.first, len(reader.view),
                                                release=True))
    except CaptureFormatError:
        raise
    except (struct.error, IndexError, OverflowError, ValueError) as exc:
        # The "only CaptureFormatError" contract of the readers' own loops.
        raise reader.malformed(exc) from exc


class LaneTable:
    """The connections whose in-order frames the lanes take, by wire key (addresses
    then ports as in the frame). A lane without a stream takes in-order pure ACKs
    only, unless the demux discards the flow's data (not a migration): then its
    in-order data too, which only advances the reassembler's sequence.

    Also keeps C's lane table: the lanes but the data lane whose in-order segments
    take feed's fast path now (nothing pending either way), the skip lanes first,
    as keys and a uint32 array of next sequence numbers that scan_lane reads and
    advances. At most `limit` (MAX_LANES) of them: the directions of migration
    connections first, then skip lanes. The table is rebuilt only when a lane came,
    went or changed or a lane's state moved where the table cannot see it (the
    Python lane, a frame the table cannot key); a general-path frame of a lane
    updates its entries in place, and C's skip-lane advances are copied back to
    the directions it names.
    """

    def __init__(self, demux: CaptureDemux, limit: int) -> None:
        self.demux = demux
        self.limit = limit
        self.lanes: dict[bytes, Lane] = {}
        self.stale = True  # the C table must be rebuilt before the next call
        self._built_without: bytes | None = None
        self.keys = b""
        self.seqs = array.array("I")
        self.skip_count = 0
        self.directions: list[Direction] = []  # of the table's entries, in order
        self._index: dict[bytes, int] = {}

    def refresh(self, segment: TcpSegment, frame: memoryview) -> bytes | None:
        """After the general path handled an Ethernet frame, (re)open or close the
        lanes of its connection; the frame's lane key if it has a lane now."""
        if len(frame) < _HEADERS_LEN or frame[12:15] != _IPV4_NO_OPTIONS:
            self.stale = True  # its connection's state moved under a key we cannot tell
            return None
        raw = bytes(frame[26:38])
        reverse = raw[4:8] + raw[:4] + raw[10:12] + raw[8:10]
        demux = self.demux
        reassembler = demux.reassembler
        lanes = self.lanes
        src, sport, dst, dport = segment.src, segment.sport, segment.dst, segment.dport
        for key, d in ((raw, reassembler.direction(src, sport, dst, dport)),
                       (reverse, reassembler.direction(dst, dport, src, sport))):
            stream = demux.stream_of(d.key) if d is not None else None
            if d is None or d.done or (stream is not None and stream.closed):
                if lanes.pop(key, None) is not None:
                    self.stale = True
                continue
            # Without a stream, data goes the general way (the flow may still become a
            # migration) until the demux has judged it not one.
            skip = stream is None and demux.discards(d.key)
            old = lanes.get(key)
            if old is None or old[0] is not d or old[1] is not stream or old[2] != skip:
                lanes[key] = (d, stream, skip)
                self.stale = True
            elif not self.stale:
                self._update(key, d)
        return raw if raw in lanes else None

    def _update(self, key: bytes, d: Direction) -> None:
        """The table entry of `key` after the general path moved `d`."""
        ready = not d.pending and not d.peer.pending and d.next_seq >= 0
        index = self._index.get(key)
        if index is None:
            # Not in the table: the data lane, one the limit left out, or one that was
            # not ready and now is (only then is a rebuild worth it).
            if ready and key != self._built_without and len(self._index) < self.limit:
                self.stale = True
            return
        if not ready:
            self.stale = True
        else:
            self.seqs[index] = d.next_seq

    def table(self, data_key: bytes | None) -> tuple[bytes, array.array[int], int]:
        """C's table for a call whose data lane is `data_key`: (concatenated keys,
        their next sequence numbers, how many of the first are skip lanes)."""
        if self.stale or self._built_without != data_key:
            self._build(data_key)
        return self.keys, self.seqs, self.skip_count

    def advanced(self, touched: list[int]) -> None:
        """C advanced these skip lanes' entries: move their directions along."""
        seqs = self.seqs
        directions = self.directions
        for index in touched:
            d = directions[index]
            d.advance((seqs[index] - d.next_seq) & _MASK)

    def _build(self, data_key: bytes | None) -> None:
        lanes = self.lanes
        ready = []
        for key, (d, _stream, _skip) in lanes.items():
            if key != data_key and not d.pending and not d.peer.pending and d.next_seq >= 0:
                ready.append(key)
        if len(ready) > self.limit:
            def rank(key: bytes) -> int:
                reverse = lanes.get(key[4:8] + key[:4] + key[10:12] + key[8:10])
                if lanes[key][1] is not None or (reverse is not None and reverse[1] is not None):
                    return 0
                return 1 if lanes[key][2] else 2

            ready = sorted(ready, key=rank)[:self.limit]
        skips = [key for key in ready if lanes[key][2]]
        chosen = skips + [key for key in ready if not lanes[key][2]]
        self.keys = b"".join(chosen)
        self.directions = [lanes[key][0] for key in chosen]
        self.seqs = array.array("I", [d.next_seq for d in self.directions])
        self.skip_count = len(skips)
        self._index = {key: i for i, key in enumerate(chosen)}
        self._built_without = data_key
        self.stale = False


class _Pump:
    """One pass over a capture: the lanes, the walker and the general path."""

    def __init__(self, reader: CaptureReader, demux: CaptureDemux) -> None:
        self.reader = reader
        self.demux = demux
        native = speedups.native
        self.lanes = LaneTable(demux, native.MAX_LANES if native is not None else 0)
        self.walker: PcapWalker | PcapngWalker
        if reader.format == "pcap":
            self.walker = PcapWalker(reader)
        else:
            self.walker = PcapngWalker(reader)
        self.data_key: bytes | None = None  # the lane C gathers for
        # The interface whose EPBs C walks (pcapng): where lane frames were last seen.
        self.interface: int | None = None
        self.section = reader.sections

    # -- shared by both lanes ---------------------------------------------

    def general(self, frame: Frame) -> None:
        """One frame the lanes did not take, through parse_frame and the reassembler."""
        demux = self.demux
        demux.reassembler.last_timestamp = frame.timestamp
        segment = parse_frame(frame.linktype, frame.data, frame.timestamp)
        if segment is None:
            return
        demux.segment(segment)
        if frame.linktype == LINKTYPE_ETHERNET:
            key = self.lanes.refresh(segment, frame.data)
            if key is not None:
                self.follow(frame)
                if self.lanes.lanes[key][1] is not None:
                    self.data_key = key

    def follow(self, frame: Frame) -> None:
        """`frame` belongs to a lane: C walks its interface's EPBs from now on."""
        self.interface = frame.interface_id
        self.section = self.reader.sections

    def lane_interface(self) -> int | None:
        """scan_lane's pcapng_iface: -1 for classic pcap, None while C cannot walk."""
        if isinstance(self.walker, PcapWalker):
            return -1 if self.walker.linktype == LINKTYPE_ETHERNET else None
        return self.interface if self.section == self.reader.sections else None

    def clock(self, high: int, low: int) -> float:
        """The time of a record C consumed from the two halves it returns."""
        walker = self.walker
        if isinstance(walker, PcapWalker):
            return high + low / walker.ts_divisor
        iface = walker.interfaces[self.interface or 0]
        return ((high << 32) | low) / iface.ts_divisor + iface.ts_offset

    def time_at(self, off: int) -> float:
        walker = self.walker
        if isinstance(walker, PcapWalker):
            return walker.time_at(off)
        return self.clock(*struct.unpack_from(walker.order + "II", walker.view, off + 12))

    # -- the Python lane --------------------------------------------------

    def python_lane(self, frames: Iterable[Frame]) -> int:
        """Take `frames` through the lane in Python; how many there were."""
        lanes = self.lanes.lanes
        headers = _HEADERS.unpack_from
        general = self.general
        gathered = bytearray()
        gathered_for: MigrationStream | None = None
        gathered_ts = 0.0
        count = 0
        taken: Frame | None = None  # the last frame the lane took, if no general one since
        for count, frame in enumerate(frames, 1):  # noqa: B007 - count is the result
            timestamp, linktype, data = frame[:3]
            size = len(data)
            if size >= _HEADERS_LEN and linktype == LINKTYPE_ETHERNET:
                head, total, frag, proto, key, seq, offres, flags = headers(data, 0)
                lane = lanes.get(key)
                if (lane is not None and head == _IPV4_NO_OPTIONS and proto == 6
                        and not frag & 0x1FFF and not flags & 7):
                    d, stream, skip = lane
                    if seq == d.next_seq and not d.pending and not d.peer.pending:
                        avail = size - 14
                        frame_end = size if total == 0 or total > avail or avail > 0xFFFF \
                            else 14 + total
                        data_start = 34 + (offres >> 4) * 4
                        if offres >> 4 >= 5 and data_start <= frame_end:
                            taken = frame
                            n = frame_end - data_start
                            if not n:
                                continue
                            if stream is not None:
                                d.next_off += n
                                d.next_seq = (seq + n) & _MASK
                                if n < _DIRECT and gathered_for is stream:
                                    # The common case: gather.
                                    gathered += data[data_start:frame_end]
                                    gathered_ts = timestamp
                                    if len(gathered) >= _GATHER:
                                        stream.feed(memoryview(gathered), gathered_ts)
                                        gathered = bytearray()
                                    continue
                                if gathered:
                                    gathered_for.feed(memoryview(gathered), gathered_ts)  # type: ignore[union-attr]
                                    gathered = bytearray()
                                if n >= _DIRECT:
                                    stream.feed(data[data_start:frame_end], timestamp)
                                else:
                                    gathered += data[data_start:frame_end]
                                    gathered_ts = timestamp
                                gathered_for = stream
                                continue
                            if skip:  # data the demux would drop: only the sequence moves
                                d.next_off += n
                                d.next_seq = (seq + n) & _MASK
                                continue
            # The general path, in capture order: first deliver what was gathered.
            if gathered:
                gathered_for.feed(memoryview(gathered), gathered_ts)  # type: ignore[union-attr]
                gathered = bytearray()
            taken = None
            general(frame)
        if gathered:
            gathered_for.feed(memoryview(gathered), gathered_ts)  # type: ignore[union-attr]
        if taken is not None:
            # The last frames may have been ACKs the lane dropped without a clock.
            reassembler = self.demux.reassembler
            reassembler.last_timestamp = max(reassembler.last_timestamp, taken.timestamp)
            self.follow(taken)
        return count

    # -- the C lane -------------------------------------------------------

    def run_native(self, prefaulter: _Prefaulter) -> None:
        """The lane with its frame loop in C (analyzer/_speedups.c scan_lane), for
        classic pcap and pcapng alike, the Python lane taking over where C misses.

        The lane rules are those of python_lane; what differs is who gathers. C
        walks records until one needs Python, gathers the small payloads of one data
        lane into a fresh bytes object, hands back big payloads as offsets to feed
        without copying, and while the decoder sits between RAM records walks those
        itself. A record it hands back goes through the general path, in file order;
        in-order data of another migration flow there (multifd) makes that flow the
        data lane.
        """
        native = speedups.native
        assert native is not None
        reader = self.reader
        walker = self.walker
        view = reader.view
        size = len(view)
        lanes = self.lanes
        off = walker.first
        last = -1  # the last record C consumed, if no general one since
        release_at = RELEASE_STEP
        control = prefaulter.control
        python_budget = 0  # records the Python lane takes before C is tried again
        backoff = 0
        while off < size:
            control[0] = off
            if off >= release_at:
                if prefaulter.thread is None:  # else the thread releases behind us
                    release_at = reader.release_behind(off)
                else:
                    # The stop publishes our offset. Should the thread fall behind (no
                    # free core), we release, so that RSS stays bounded regardless.
                    release_at = off + _PUBLISH_STEP
                    if off - control[4] > _RELEASE_LAG:
                        reader.note_released(control[4])
                        reader.release_behind(off)
                        control[4] = reader.released
            stop = min(size, release_at)
            if python_budget > 0:
                python_budget -= self.python_lane(islice(walker.frames(off, stop),
                                                         python_budget))
                lanes.stale = True  # the Python lane moved lanes the table holds
                off = walker.next_off
                if off < 0:
                    break
                last = -1
                continue
            interface = self.lane_interface()
            status = 1
            records = 0
            walked_from = off
            lane_bytes = 0  # of the data lane's stream, in what this call walked
            if interface is not None:
                data_key = self.data_key
                data_lane = lanes.lanes.get(data_key) if data_key is not None else None
                if data_lane is None or data_lane[1] is None or data_lane[0].pending \
                        or data_lane[0].peer.pending:
                    data_lane = None
                lane_keys, lane_seqs, skip_lanes = lanes.table(data_key)
                ram = data_lane[1].ram_walk_state() if data_lane is not None else None  # type: ignore[union-attr]
                (status, off, walked_last, seq, gathered, gsec, gfrac, dstart, dend, dsec, dfrac,
                 ram_out, records, touched) = native.scan_lane(
                    view, off, stop, walker.little, interface, lane_keys, lane_seqs, skip_lanes,
                    data_key if data_lane is not None else None,
                    data_lane[0].next_seq if data_lane is not None else 0, _GATHER, _DIRECT, ram)
                if walked_last >= 0:
                    last = walked_last
                if touched:
                    lanes.advanced(touched)
                if data_lane is not None and seq != data_lane[0].next_seq:
                    d, stream, _skip = data_lane
                    assert stream is not None
                    lane_bytes = (seq - d.next_seq) & _MASK
                    d.advance(lane_bytes)
                    if ram_out is not None:
                        taken, pages, zeros, skip, skip_start, head = ram_out
                        stream.ram_walked(taken, pages, zeros, skip, skip_start,
                                          self.clock(gsec, gfrac))
                        if status == 4:  # the walk met another record: the decoder takes it
                            stream.feed(head + view[dstart:dend] if head else view[dstart:dend],
                                        self.clock(dsec, dfrac))
                        elif head:  # a record header cut by the end of the walk
                            stream.feed(head, self.clock(gsec, gfrac))
                    else:
                        if gathered:
                            stream.feed(gathered, self.clock(gsec, gfrac))
                        if status == 3:
                            stream.feed(view[dstart:dend], self.clock(dsec, dfrac))
            walked = off - walked_from
            worthwhile = records >= _WORTHWHILE or walked >= _WORTHWHILE_BYTES
            if worthwhile:
                backoff = 0
                # The thread pays where C reads most pages (the migration's payloads);
                # through other flows' frames C reads only headers, and it costs.
                if 2 * lane_bytes >= walked:
                    prefaulter.start(off)
                elif walked >= _PUBLISH_STEP and 4 * lane_bytes < walked:
                    prefaulter.stop()
                    release_at = min(release_at, off + RELEASE_STEP)
            if status != 1:
                continue
            if not worthwhile:
                backoff = min(max(_BACKOFF_MIN, 2 * backoff), _BACKOFF_MAX)
                python_budget = backoff
                if backoff >= _PYTHON_WALKS:
                    prefaulter.stop()
                    release_at = min(release_at, off + RELEASE_STEP)
            # The record at off needs Python: truncated, a block C does not read, or not
            # a frame C's lane takes (handshake, retransmission, another flow...).
            if last >= 0:
                self._clock_up_to(last)
                last = -1
            if python_budget > 0:
                continue  # the Python lane takes it
            off, frame = walker.step(off)
            if off < 0:
                break
            if frame is not None:
                self.general(frame)
        if last >= 0:
            self._clock_up_to(last)

    def _clock_up_to(self, last: int) -> None:
        """The records up to `last` C consumed may have been ACKs it dropped without a
        clock: the reassembler's clock is at least that of the last one."""
        reassembler = self.demux.reassembler
        reassembler.last_timestamp = max(reassembler.last_timestamp, self.time_at(last))


class _Prefaulter:
    """A thread that takes the capture mapping's page faults ahead of the walk and
    unmaps what lies behind it (C, without the GIL).

    Faulting a file mapping in and out costs about as much as walking it in C; on a
    second core it overlaps. The walk publishes its offset in control[0]; the thread
    stays at most _PREFAULT_AHEAD bytes ahead and releases in RELEASE_STEP steps
    behind, so what is mapped at once (and RSS) stays bounded as without it. While
    the Python lane walks, the walk is far slower than the faults and the thread
    only competes with it (for the core, and with its unmapping's TLB flushes):
    it is stopped then, and started again when C walks.
    """

    def __init__(self, reader: CaptureReader) -> None:
        self.reader = reader
        self.view: memoryview | None = reader.view
        # consumer offset, stop, how far ahead, release step, released so far
        self.control = array.array("q", [0, 0, _PREFAULT_AHEAD, RELEASE_STEP, 0])
        self.thread: threading.Thread | None = None

    def start(self, off: int) -> None:
        """Run the thread from `off` on, if it is not running and the rest is worth it."""
        native = speedups.native
        if (self.thread is not None or native is None or self.view is None
                or len(self.view) - off <= _PREFAULT_AHEAD):
            return
        control = self.control
        control[0] = off
        control[1] = 0
        control[4] = self.reader.released
        self.thread = threading.Thread(target=native.prefault, args=(self.view, control),
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop the thread; what it released is the reader's to know."""
        if self.thread is None:
            return
        self.control[1] = 1
        self.thread.join()
        self.thread = None
        self.reader.note_released(self.control[4])

    def __enter__(self) -> _Prefaulter:
        return self  # started once C walks the migration (run_native)

    def __exit__(self, *exc: object) -> None:
        self.stop()
