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

Two implementations: _pump_native, whose frame loop is C (analyzer/_speedups.c)
and which reads classic pcap and pcapng, and _pump_ethernet_pcap, the same lane in
Python for classic Ethernet pcap when the extension was not built. Without it,
pcapng goes the general path.
"""

from __future__ import annotations

import array
import struct
import threading
from typing import TYPE_CHECKING

from migshark.analyzer import speedups
from migshark.analyzer.capture import CaptureFormatError, CaptureReader, parse_frame
from migshark.analyzer.capture.frames import LINKTYPE_ETHERNET
from migshark.analyzer.capture.pcapfile import _RELEASE_STEP, Frame, PcapngWalker

if TYPE_CHECKING:
    from migshark.analyzer.analysis import CaptureDemux, MigrationStream
    from migshark.analyzer.capture.tcp import _Dir

_MASK = 0xFFFFFFFF
_PREFAULT_AHEAD = 48 << 20  # how far the prefault thread may run ahead of the walk
_PUBLISH_STEP = 4 << 20  # how often the walk tells it where it is
_RELEASE_LAG = 2 * _RELEASE_STEP  # the walk releases itself past this
_GATHER = 1 << 16  # bytes gathered from small segments before one feed
_DIRECT = 1 << 14  # segments at least this big are fed without copying
# Ethernet type + IPv4 version/IHL (b"\x08\x00\x45"), total length, fragment field,
# protocol, addresses and ports as one lane key, seq, data offset, flags.
_HEADERS = struct.Struct("!12x3sxHxxHxB2x12sI4xBB")
_HEADERS_LEN = 14 + 20 + 14  # through the TCP flags byte
_IPV4_NO_OPTIONS = b"\x08\x00\x45"


def pump_capture(reader: CaptureReader, demux: CaptureDemux) -> None:
    """Feed every frame of `reader` to `demux` (raises CaptureFormatError like iteration)."""
    ethernet_pcap = (reader.format == "pcap"
                     and reader.interfaces[0].linktype == LINKTYPE_ETHERNET)
    if speedups.native is not None and (ethernet_pcap or reader.format == "pcapng"):
        prefaulter = _Prefaulter(reader)
        with prefaulter:
            try:
                _pump_native(reader, demux, prefaulter)
            except CaptureFormatError:
                raise
            except (struct.error, IndexError, OverflowError, ValueError) as exc:
                # The "only CaptureFormatError" contract of the readers' own loops.
                raise reader._malformed(exc) from exc
    elif ethernet_pcap:
        _pump_ethernet_pcap(reader, demux)
    else:
        for frame in reader:
            segment = parse_frame(frame.linktype, frame.data, frame.timestamp)
            if segment is not None:
                demux.segment(segment)


def _pump_ethernet_pcap(reader: CaptureReader, demux: CaptureDemux) -> None:
    view = reader._view
    assert view is not None
    size = len(view)
    rec = struct.Struct(reader._pcap_order + "IIII").unpack_from
    rec_len = reader._pcap_rec_len
    divisor = reader.interfaces[0].ts_divisor
    headers = _HEADERS.unpack_from
    reassembler = demux.reassembler
    # addresses + ports as on the wire -> (direction state, its stream or None: ACKs only)
    lanes: dict[bytes, tuple[_Dir, MigrationStream | None]] = {}
    gathered = bytearray()
    gathered_for: MigrationStream | None = None
    gathered_sec = gathered_frac = 0
    ts = 0.0
    off = last = 24
    release_at = _RELEASE_STEP
    while off < size:
        if off >= release_at:
            release_at = reader._release_behind(off)
        start = off + rec_len
        if start > size:
            reader._truncated(off, "incomplete record header")
            break
        sec, frac, caplen, _origlen = rec(view, off)
        end = start + caplen
        if end > size:
            reader._truncated(off, f"record needs {caplen} bytes, {size - start} left")
            break
        last = off
        off = end
        if caplen >= _HEADERS_LEN:
            head, total, frag, proto, key, seq, offres, flags = headers(view, start)
            lane = lanes.get(key)
            if (lane is not None and head == _IPV4_NO_OPTIONS and proto == 6
                    and not frag & 0x1FFF and not flags & 7):
                d, stream = lane
                if seq == d.next_seq and not d.pending and not d.peer.pending:
                    avail = caplen - 14
                    frame_end = end if total == 0 or total > avail or avail > 0xFFFF \
                        else start + 14 + total
                    data_start = start + 34 + (offres >> 4) * 4
                    if offres >> 4 >= 5 and data_start <= frame_end:
                        n = frame_end - data_start
                        if not n:
                            continue
                        if stream is not None:
                            d.next_off += n
                            d.next_seq = (seq + n) & _MASK
                            if n < _DIRECT and gathered_for is stream:
                                # The common case: gather; the clock is read at the feed.
                                gathered += view[data_start:frame_end]
                                gathered_sec, gathered_frac = sec, frac
                                if len(gathered) >= _GATHER:
                                    stream.feed(gathered, gathered_sec + gathered_frac / divisor)
                                    gathered = bytearray()
                                continue
                            if gathered:
                                gathered_for.feed(  # type: ignore[union-attr]
                                    gathered, gathered_sec + gathered_frac / divisor)
                                gathered = bytearray()
                            if n >= _DIRECT:
                                stream.feed(view[data_start:frame_end], sec + frac / divisor)
                            else:
                                gathered += view[data_start:frame_end]
                                gathered_sec, gathered_frac = sec, frac
                            gathered_for = stream
                            continue
        # The general path, in capture order: first deliver what was gathered.
        ts = sec + frac / divisor
        if gathered:
            gathered_for.feed(  # type: ignore[union-attr]
                gathered, gathered_sec + gathered_frac / divisor)
            gathered = bytearray()
        _general_frame(demux, lanes, view[start:end], LINKTYPE_ETHERNET, ts)
    if gathered:
        gathered_for.feed(  # type: ignore[union-attr]
            gathered, gathered_sec + gathered_frac / divisor)
    if off > 24:
        # The last frames may have been ACKs the lane dropped without a clock.
        sec, frac = rec(view, last)[:2]
        reassembler._last_ts = max(reassembler._last_ts, sec + frac / divisor)


def _general_frame(demux: CaptureDemux, lanes: dict[bytes, tuple[_Dir, MigrationStream | None]],
                   data: memoryview, linktype: int, ts: float) -> None:
    """One frame the lane did not take, through parse_frame and the reassembler."""
    demux.reassembler._last_ts = ts
    segment = parse_frame(linktype, data, ts)
    if segment is None:
        return
    demux.segment(segment)
    if linktype == LINKTYPE_ETHERNET:
        _refresh_lanes(lanes, demux, segment.src, segment.sport, segment.dst, segment.dport,
                       data)


class _Prefaulter:
    """A thread that takes the capture mapping's page faults ahead of the walk and
    unmaps what lies behind it (C, without the GIL).

    Faulting a file mapping in and out costs about as much as walking it; on a
    second core it overlaps. The walk publishes its offset in control[0]; the thread
    stays at most _PREFAULT_AHEAD bytes ahead and releases in _RELEASE_STEP steps
    behind, so what is mapped at once (and RSS) stays bounded as without it.
    """

    def __init__(self, reader: CaptureReader) -> None:
        self.view = reader._view
        # consumer offset, stop, how far ahead, release step, released so far
        self.control = array.array("q", [0, 0, _PREFAULT_AHEAD, _RELEASE_STEP, 0])
        self.thread: threading.Thread | None = None

    def __enter__(self) -> threading.Thread | None:
        native = speedups.native
        if native is not None and self.view is not None and len(self.view) > _PREFAULT_AHEAD:
            self.thread = threading.Thread(target=native.prefault,
                                           args=(self.view, self.control), daemon=True)
            self.thread.start()
        return self.thread

    def __exit__(self, *exc: object) -> None:
        self.control[1] = 1
        if self.thread is not None:
            self.thread.join()


class _PcapRecords:
    """Classic pcap records for _pump_native: the C walk's parameters and the
    general path for the records it hands back."""

    def __init__(self, reader: CaptureReader) -> None:
        self.reader = reader
        self.little = reader._pcap_order == "<"
        self.rec = struct.Struct(reader._pcap_order + "II").unpack_from
        self.divisor = reader.interfaces[0].ts_divisor

    def lane_interface(self) -> int | None:
        return -1  # classic pcap (scan_lane's convention)

    def clock(self, sec: int, frac: int) -> float:
        return sec + frac / self.divisor

    def time_at(self, off: int) -> float:
        return self.clock(*self.rec(self.reader._view, off))

    def step(self, off: int) -> tuple[int, Frame | None]:
        record = self.reader._pcap_record(off)
        if record is None:
            return -1, None
        ts, start, end = record
        view = self.reader._view
        assert view is not None
        return end, Frame(ts, LINKTYPE_ETHERNET, view[start:end], 0, end - start)

    def follow(self, frame: Frame) -> None:
        pass  # one interface


class _PcapngRecords:
    """pcapng blocks for _pump_native: C walks the EPBs of the Ethernet interface the
    migration was last seen on; every other block goes through PcapngWalker."""

    def __init__(self, reader: CaptureReader) -> None:
        self.walker = PcapngWalker(reader)
        self.interface: int | None = None  # where the lanes' frames were last seen
        self.section = reader.sections

    @property
    def little(self) -> bool:
        return self.walker.order == "<"

    def lane_interface(self) -> int | None:
        return self.interface if self.section == self.walker.reader.sections else None

    def clock(self, high: int, low: int) -> float:
        iface = self.walker.interfaces[self.interface or 0]
        return ((high << 32) | low) / iface.ts_divisor + iface.ts_offset

    def time_at(self, off: int) -> float:
        view = self.walker.view
        return self.clock(*struct.unpack_from(self.walker.order + "II", view, off + 12))

    def step(self, off: int) -> tuple[int, Frame | None]:
        return self.walker.step(off)

    def follow(self, frame: Frame) -> None:
        """`frame` belongs to a lane: C walks its interface's EPBs from now on."""
        self.interface = frame.interface_id
        self.section = self.walker.reader.sections


def _pump_native(reader: CaptureReader, demux: CaptureDemux, prefaulter: _Prefaulter) -> None:
    """The lane with its frame loop in C (analyzer/_speedups.c scan_lane), for classic
    pcap and pcapng alike.

    The lane rules are those of _pump_ethernet_pcap; what differs is who gathers. C
    walks records until one needs Python, gathers the small payloads of one data
    lane into a fresh bytes object, hands back big payloads as offsets to feed
    without copying, and while the decoder sits between RAM records walks those
    itself. A record it hands back goes through the general path, in file order;
    in-order data of another migration flow there (multifd) makes that flow the
    data lane.
    """
    native = speedups.native
    assert native is not None
    view = reader._view
    assert view is not None
    size = len(view)
    records: _PcapRecords | _PcapngRecords = (
        _PcapRecords(reader) if reader.format == "pcap" else _PcapngRecords(reader))
    lanes: dict[bytes, tuple[_Dir, MigrationStream | None]] = {}
    data_key: bytes | None = None  # the lane C gathers for
    off = 24 if reader.format == "pcap" else 0
    last = -1  # the last record C consumed
    release_at = _RELEASE_STEP
    control = prefaulter.control
    releases = prefaulter.thread is None  # else the thread releases behind us
    while off < size:
        control[0] = off
        if off >= release_at:
            if releases:
                release_at = reader._release_behind(off)
            else:
                # The stop publishes our offset. Should the thread fall behind (no
                # free core), we release, so that RSS stays bounded regardless.
                release_at = off + _PUBLISH_STEP
                if off - control[4] > _RELEASE_LAG:
                    reader._released = control[4]
                    reader._release_behind(off)
                    control[4] = reader._released
        interface = records.lane_interface()
        status = 1
        if interface is not None:
            data_lane = lanes.get(data_key) if data_key is not None else None
            if data_lane is None or data_lane[1] is None or data_lane[0].pending \
                    or data_lane[0].peer.pending:
                data_lane = None
            ack_keys = []
            ack_seqs = []
            for key, (d, _stream) in lanes.items():
                if key != data_key and not d.pending and not d.peer.pending:
                    ack_keys.append(key)
                    ack_seqs.append(d.next_seq)
            ram = data_lane[1].ram_walk_state() if data_lane is not None else None  # type: ignore[union-attr]
            (status, off, walked_last, seq, gathered, gsec, gfrac, dstart, dend, dsec, dfrac,
             ram_out) = native.scan_lane(
                view, off, min(size, release_at), records.little, interface,
                b"".join(ack_keys), tuple(ack_seqs),
                data_key if data_lane is not None else None,
                data_lane[0].next_seq if data_lane is not None else 0, _GATHER, _DIRECT, ram)
            if walked_last >= 0:
                last = walked_last
            if data_lane is not None and seq != data_lane[0].next_seq:
                d, stream = data_lane
                assert stream is not None
                d.next_off += (seq - d.next_seq) & _MASK
                d.next_seq = seq
                if ram_out is not None:
                    taken, pages, zeros, skip, skip_start, head = ram_out
                    stream.ram_walked(taken, pages, zeros, skip, skip_start,
                                      records.clock(gsec, gfrac))
                    if status == 4:  # the walk met another record: the decoder takes it
                        stream.feed(head + view[dstart:dend] if head else view[dstart:dend],
                                    records.clock(dsec, dfrac))
                    elif head:  # a record header cut by the end of the walk
                        stream.feed(head, records.clock(gsec, gfrac))
                else:
                    if gathered:
                        stream.feed(gathered, records.clock(gsec, gfrac))
                    if status == 3:
                        stream.feed(view[dstart:dend], records.clock(dsec, dfrac))
        if status != 1:
            continue
        # The record at off needs Python: truncated, a block C does not read, or not
        # a frame C's lane takes (handshake, retransmission, another flow...).
        off, frame = records.step(off)
        if off < 0:
            break
        if frame is None:
            continue
        last = -1
        _general_frame(demux, lanes, frame.data, frame.linktype, frame.timestamp)
        key = bytes(frame.data[26:38]) if frame.linktype == LINKTYPE_ETHERNET \
            and len(frame.data) >= _HEADERS_LEN else b""
        lane = lanes.get(key)
        if lane is not None:
            records.follow(frame)
            if lane[1] is not None:
                data_key = key
    if last >= 0:
        # The last frames may have been ACKs the lane dropped without a clock.
        demux.reassembler._last_ts = max(demux.reassembler._last_ts, records.time_at(last))


def _refresh_lanes(lanes: dict[bytes, tuple[_Dir, MigrationStream | None]],
                   demux: CaptureDemux, src: str, sport: int, dst: str, dport: int,
                   frame: memoryview) -> None:
    """After the general path handled an Ethernet frame, (re)open the lanes of its
    connection."""
    if len(frame) < _HEADERS_LEN or frame[12:15] != _IPV4_NO_OPTIONS:
        return
    raw = bytes(frame[26:38])
    reverse = raw[4:8] + raw[:4] + raw[10:12] + raw[8:10]
    dirs = demux.reassembler._dirs
    for key, key4 in ((raw, (src, sport, dst, dport)), (reverse, (dst, dport, src, sport))):
        d = dirs.get(key4)
        if d is None or d.done:
            lanes.pop(key, None)
            continue
        stream = demux._by_flow.get(d.key)
        if stream is not None and stream.closed:
            lanes.pop(key, None)
            continue
        # Without a stream, only in-order pure ACKs take the lane (data goes the
        # general way: the flow may still become a migration).
        lanes[key] = (d, stream)
