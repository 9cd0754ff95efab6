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
truncated records, pcapng, other link types) flushes what was gathered and goes
through the general path, frame by frame, so events stay in capture order and the
results are those of the general path (tests compare the two).
"""

from __future__ import annotations

import array
import struct
import threading
from typing import TYPE_CHECKING

from analyzer import speedups
from analyzer.capture import CaptureReader, parse_frame
from analyzer.capture.frames import LINKTYPE_ETHERNET
from analyzer.capture.pcapfile import _RELEASE_STEP

if TYPE_CHECKING:
    from analyzer.analysis import CaptureDemux, MigrationStream
    from analyzer.capture.tcp import _Dir

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
    interfaces = reader.interfaces
    if reader.format != "pcap" or interfaces[0].linktype != LINKTYPE_ETHERNET:
        for frame in reader:
            segment = parse_frame(frame.linktype, frame.data, frame.timestamp)
            if segment is not None:
                demux.segment(segment)
        return
    if speedups.native is not None:
        prefaulter = _Prefaulter(reader)
        with prefaulter:
            _pump_ethernet_pcap_native(reader, demux, prefaulter)
    else:
        _pump_ethernet_pcap(reader, demux)


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
        _general_frame(demux, lanes, view, start, end, ts)
    if gathered:
        gathered_for.feed(  # type: ignore[union-attr]
            gathered, gathered_sec + gathered_frac / divisor)
    if off > 24:
        # The last frames may have been ACKs the lane dropped without a clock.
        sec, frac = rec(view, last)[:2]
        reassembler._last_ts = max(reassembler._last_ts, sec + frac / divisor)


def _general_frame(demux: CaptureDemux, lanes: dict[bytes, tuple[_Dir, MigrationStream | None]],
                   view: memoryview, start: int, end: int, ts: float) -> None:
    """One frame the lane did not take, through parse_frame and the reassembler."""
    demux.reassembler._last_ts = ts
    segment = parse_frame(LINKTYPE_ETHERNET, view[start:end], ts)
    if segment is None:
        return
    demux.segment(segment)
    _refresh_lanes(lanes, demux, segment.src, segment.sport, segment.dst, segment.dport,
                   view, start, end - start)


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

    def publish(self, offset: int) -> None:
        self.control[0] = offset

    def __exit__(self, *exc: object) -> None:
        self.control[1] = 1
        if self.thread is not None:
            self.thread.join()


def _pump_ethernet_pcap_native(reader: CaptureReader, demux: CaptureDemux,
                               prefaulter: _Prefaulter) -> None:
    """_pump_ethernet_pcap with its frame loop in C (analyzer/_speedups.c scan_lane).

    The lane rules are the same; what differs is who gathers. C walks frames until
    one needs Python, gathers the small payloads of one data lane into a fresh bytes
    object, and hands back big payloads as offsets to feed without copying. A data
    frame of another migration flow (multifd) goes through the general path and
    makes that flow the data lane.
    """
    native = speedups.native
    assert native is not None
    view = reader._view
    assert view is not None
    size = len(view)
    rec = struct.Struct(reader._pcap_order + "IIII").unpack_from
    little = reader._pcap_order == "<"
    divisor = reader.interfaces[0].ts_divisor
    lanes: dict[bytes, tuple[_Dir, MigrationStream | None]] = {}
    data_key: bytes | None = None  # the lane C gathers for
    off = last = 24
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
        (status, off, walked_last, seq, gathered, gsec, gfrac, dstart, dend, dsec, dfrac, ram_out
         ) = native.scan_lane(
            view, off, min(size, release_at), little, b"".join(ack_keys), tuple(ack_seqs),
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
                stream.ram_walked(taken, pages, zeros, skip, skip_start, gsec + gfrac / divisor)
                if status == 4:  # the walk met another record: the decoder takes it from here
                    stream.feed(head + view[dstart:dend] if head else view[dstart:dend],
                                dsec + dfrac / divisor)
                elif head:  # a record header cut by the end of the walk
                    stream.feed(head, gsec + gfrac / divisor)
            else:
                if gathered:
                    stream.feed(gathered, gsec + gfrac / divisor)
                if status == 3:
                    stream.feed(view[dstart:dend], dsec + dfrac / divisor)
        if status != 1:
            continue
        # The record at off needs Python: truncated, or not a frame C's lane takes
        # (handshake, retransmission, another flow...): the general path, in order.
        record = reader._pcap_record(off)
        if record is None:
            break
        ts, start, end = record
        last = off
        off = end
        _general_frame(demux, lanes, view, start, end, ts)
        # In-order data of another migration flow (multifd): C gathers for it next.
        key = bytes(view[start + 26 : start + 38]) if end - start >= _HEADERS_LEN else b""
        lane = lanes.get(key)
        if lane is not None and lane[1] is not None:
            data_key = key
    if off > 24:
        # The last frames may have been ACKs the lane dropped without a clock.
        sec, frac = rec(view, last)[:2]
        demux.reassembler._last_ts = max(demux.reassembler._last_ts, sec + frac / divisor)


def _refresh_lanes(lanes: dict[bytes, tuple[_Dir, MigrationStream | None]],
                   demux: CaptureDemux, src: str, sport: int, dst: str, dport: int,
                   view: memoryview, start: int, caplen: int) -> None:
    """After the general path handled a frame, (re)open the lanes of its connection."""
    if caplen < _HEADERS_LEN or view[start + 12 : start + 15] != _IPV4_NO_OPTIONS:
        return
    raw = bytes(view[start + 26 : start + 38])
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
