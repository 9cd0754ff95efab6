"""Sans-IO TCP stream reassembly.

Feed :class:`~analyzer.capture.frames.TcpSegment` objects in capture order and
get back ordered, de-duplicated byte-stream events per direction. No I/O, no
clocks: timestamps come from the segments, so the same capture always yields
the same events.

Stream offsets are unbounded Python ints counted from ISN+1 (or from the first
sequence number seen when the capture starts mid-flow). Sequence numbers are
mapped to offsets relative to the next expected byte, which handles 32-bit
wraparound and streams longer than 4 GiB (large-RAM migrations) alike.

When bytes go missing we wait for them (retransmissions may still fill the
hole) and give up -- emitting :class:`StreamGap` -- when:

* the peer acknowledges data beyond the hole: the receiver got the bytes, so
  they will never be retransmitted and the capture simply missed them;
* the sender resets the connection;
* the out-of-order buffer of the flow exceeds ``max_buffer`` (or all flows
  together exceed ``max_total_buffer``);
* :meth:`TcpReassembler.finish` is called.

A FIN beyond a hole does not by itself give up: on a receiver-side capture the
retransmission of a lost segment often arrives after the FIN. The peer's ACK of
the FIN resolves it promptly on any capture that sees both directions.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

from migshark.analyzer.capture.frames import ACK, FIN, RST, SYN, TcpSegment
from migshark.analyzer.records import Fields

__all__ = [
    "Connection",
    "Direction",
    "DEFAULT_MAX_BUFFER",
    "FlowKey",
    "FlowStats",
    "StreamClosed",
    "StreamData",
    "StreamEvent",
    "StreamGap",
    "StreamOpened",
    "StreamReset",
    "TcpReassembler",
]

DEFAULT_MAX_BUFFER = 32 * 1024 * 1024
_MASK = 0xFFFFFFFF
_HALF = 0x80000000


class FlowKey(NamedTuple):
    """One direction of one TCP connection.

    ``generation`` tells apart successive connections on the same 4-tuple
    (port reuse): 0 for the first, 1 for the next, ... Both directions of a
    connection share it.
    """

    src: str
    sport: int
    dst: str
    dport: int
    generation: int = 0

    def reverse(self) -> FlowKey:
        return FlowKey(self.dst, self.dport, self.src, self.sport, self.generation)

    def __str__(self) -> str:
        src = f"[{self.src}]" if ":" in self.src else self.src
        dst = f"[{self.dst}]" if ":" in self.dst else self.dst
        gen = f" #{self.generation}" if self.generation else ""
        return f"{src}:{self.sport} -> {dst}:{self.dport}{gen}"


class StreamOpened(Fields):
    __slots__ = _fields = ("flow", "timestamp", "syn_seen")

    def __init__(self, flow: FlowKey, timestamp: float, syn_seen: bool) -> None:
        self.flow = flow
        self.timestamp = timestamp
        self.syn_seen = syn_seen


class StreamData(Fields):
    """In-order, non-overlapping stream bytes.

    ``data`` may be a memoryview into the capture mapping: copy it to keep it.
    ``timestamp`` is the capture time of the segment that carried the bytes.
    """

    __slots__ = _fields = ("flow", "offset", "data", "timestamp")

    def __init__(self, flow: FlowKey, offset: int, data: memoryview | bytes,
                 timestamp: float) -> None:
        self.flow = flow
        self.offset = offset
        self.data = data
        self.timestamp = timestamp


class StreamGap(Fields):
    """``length`` bytes at ``offset`` were never captured; the stream resumes after them."""

    __slots__ = _fields = ("flow", "offset", "length", "timestamp")

    def __init__(self, flow: FlowKey, offset: int, length: int, timestamp: float) -> None:
        self.flow = flow
        self.offset = offset
        self.length = length
        self.timestamp = timestamp


class StreamReset(Fields):
    """The sender of ``flow`` reset the connection; no more events for this flow."""

    __slots__ = _fields = ("flow", "timestamp")

    def __init__(self, flow: FlowKey, timestamp: float) -> None:
        self.flow = flow
        self.timestamp = timestamp


class StreamClosed(Fields):
    """The sender's FIN was reached in order; no more events for this flow."""

    __slots__ = _fields = ("flow", "timestamp")

    def __init__(self, flow: FlowKey, timestamp: float) -> None:
        self.flow = flow
        self.timestamp = timestamp


StreamEvent = StreamOpened | StreamData | StreamGap | StreamReset | StreamClosed


class Connection(Fields):
    """Both directions of one connection.

    ``client`` sent the first SYN without ACK if one was seen, otherwise it is
    the direction of the first segment seen.
    """

    __slots__ = _fields = ("client", "server", "generation", "first_timestamp")
    # Each connection is its own: equal only to itself, hashable by identity.
    __eq__ = object.__eq__
    __hash__ = object.__hash__  # type: ignore[assignment]  # Fields is unhashable: this one is

    def __init__(self, client: FlowKey, server: FlowKey, generation: int,
                 first_timestamp: float) -> None:
        self.client = client
        self.server = server
        self.generation = generation
        self.first_timestamp = first_timestamp


class FlowStats(Fields):
    __slots__ = _fields = ("flow", "syn_seen", "next_offset", "gap_bytes", "gaps",
                           "retransmitted_segments", "out_of_order_segments", "buffered_bytes",
                           "closed", "reset")

    def __init__(self, flow: FlowKey, syn_seen: bool, next_offset: int, gap_bytes: int,
                 gaps: int, retransmitted_segments: int, out_of_order_segments: int,
                 buffered_bytes: int, closed: bool, reset: bool) -> None:
        self.flow = flow
        self.syn_seen = syn_seen
        self.next_offset = next_offset
        self.gap_bytes = gap_bytes
        self.gaps = gaps
        self.retransmitted_segments = retransmitted_segments
        self.out_of_order_segments = out_of_order_segments
        self.buffered_bytes = buffered_bytes
        self.closed = closed
        self.reset = reset


class _Dir:
    """Reassembly state of one direction."""

    __slots__ = (
        "key",
        "conn",
        "peer",
        "opened",
        "syn_seen",
        "isn",
        "base",
        "next_off",
        "next_seq",
        "pending",
        "starts",
        "buf",
        "buffered",
        "fin_off",
        "done",
        "closed",
        "reset",
        "gap_bytes",
        "gaps",
        "retrans",
        "ooo",
    )

    def __init__(self, key: FlowKey, conn: Connection) -> None:
        self.key = key
        self.conn = conn
        self.peer: _Dir = self
        self.opened = False
        self.syn_seen = False
        self.isn = -1
        self.base = 0
        self.next_off = 0
        # -1 never equals a real sequence number, which keeps unopened and
        # finished directions off the fast path without an extra test.
        self.next_seq = -1
        # True while a hole may be waiting to be resolved (buffered data or a
        # FIN beyond next_off); also forces the peer off the fast path so its
        # ACKs get looked at.
        self.pending = False
        self.starts: list[int] = []
        self.buf: dict[int, tuple[bytes, float]] = {}
        self.buffered = 0
        self.fin_off: int | None = None
        self.done = False
        self.closed = False
        self.reset = False
        self.gap_bytes = 0
        self.gaps = 0
        self.retrans = 0
        self.ooo = 0

    def offset_of(self, seq: int) -> int:
        return self.next_off + ((seq - self.next_seq + _HALF) & _MASK) - _HALF

    @property
    def in_order_ready(self) -> bool:
        """Whether an in-order segment without SYN/FIN/RST takes feed's fast path:
        nothing is waiting in either direction (see docs/capture.md)."""
        return not self.pending and not self.peer.pending

    def advance(self, n: int) -> None:
        """Take `n` in-order bytes that bypassed feed (fastpath's lane): exactly what
        feed's fast path does to this direction."""
        self.next_off += n
        self.next_seq = (self.next_seq + n) & _MASK


# The reassembly state of one direction as the capture lane sees it (docs/capture.md).
Direction = _Dir


class TcpReassembler:
    """Reassemble every TCP connection of one capture.

    ``feed(segment)`` returns the events that segment made possible;
    ``finish()`` flushes what is still waiting when the capture ends.
    """

    def __init__(
        self,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        max_total_buffer: int | None = None,
    ) -> None:
        self.max_buffer = max_buffer
        self.max_total_buffer = max_total_buffer if max_total_buffer is not None else 8 * max_buffer
        self._dirs: dict[tuple[str, int, str, int], _Dir] = {}
        self._by_key: dict[FlowKey, _Dir] = {}
        self._connections: list[Connection] = []
        # A dict, not a set: deterministic victim choice when the total bound hits.
        self._buffering: dict[_Dir, None] = {}
        self._buffered_total = 0
        self._last_ts = 0.0

    # -- public ------------------------------------------------------------

    def feed(self, seg: TcpSegment) -> list[StreamEvent]:
        self._last_ts = seg.timestamp
        d = self._dirs.get((seg.src, seg.sport, seg.dst, seg.dport))
        # Fast path: the next expected bytes, no SYN/FIN/RST, nothing waiting
        # in either direction. One dict lookup, no copy.
        if (
            d is not None
            and seg.seq == d.next_seq
            and not seg.flags & 7
            and not d.pending
            and not d.peer.pending
        ):
            payload = seg.payload
            n = len(payload)
            if not n:
                return []
            off = d.next_off
            d.next_off = off + n
            d.next_seq = (seg.seq + n) & _MASK
            return [StreamData(d.key, off, payload, seg.timestamp)]
        return self._slow(d, seg)

    def direction(self, src: str, sport: int, dst: str, dport: int) -> _Dir | None:
        """The current direction state for these addresses and ports, if any."""
        return self._dirs.get((src, sport, dst, dport))

    @property
    def last_timestamp(self) -> float:
        """The capture time of the last frame seen (the clock finish() gives up by)."""
        return self._last_ts

    @last_timestamp.setter
    def last_timestamp(self, ts: float) -> None:
        self._last_ts = ts

    def finish(self) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for d in self._dirs.values():
            if d.opened and not d.done and d.pending:
                self._give_up(d, self._last_ts, out)
        return out

    @property
    def connections(self) -> list[Connection]:
        """Every connection seen so far, in order of first appearance."""
        return list(self._connections)

    def connection(self, flow: FlowKey) -> Connection | None:
        d = self._by_key.get(flow)
        return d.conn if d is not None else None

    def stats(self, flow: FlowKey) -> FlowStats | None:
        d = self._by_key.get(flow)
        if d is None:
            return None
        return FlowStats(
            d.key,
            d.syn_seen,
            d.next_off,
            d.gap_bytes,
            d.gaps,
            d.retrans,
            d.ooo,
            d.buffered,
            d.closed,
            d.reset,
        )

    @property
    def buffered_bytes(self) -> int:
        return self._buffered_total

    # -- slow path -----------------------------------------------------------

    def _slow(self, d: _Dir | None, seg: TcpSegment) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        flags = seg.flags
        ts = seg.timestamp
        if d is None:
            d = self._new_connection(seg, 0, ts, out)
        elif flags & SYN and self._starts_new_connection(d, seg):
            d = self._new_connection(seg, d.conn.generation + 1, ts, out)
        if not d.opened:
            d.opened = True
            if flags & SYN:
                d.syn_seen = True
                d.isn = seg.seq
                d.base = (seg.seq + 1) & _MASK
            else:
                d.base = seg.seq
            d.next_seq = d.base
            out.append(StreamOpened(d.key, ts, d.syn_seen))

        peer = d.peer
        if flags & ACK and peer.pending:
            ack_off = peer.offset_of(seg.ack)
            if ack_off > peer.next_off:
                self._give_up(peer, ts, out, upto=ack_off)

        if d.done:
            return out
        seq = (seg.seq + 1) & _MASK if flags & SYN else seg.seq
        off = d.offset_of(seq)

        if flags & RST:
            self._give_up(d, ts, out)
            if not d.done:
                # Linux resets with seq = snd_nxt: anything before it was sent
                # but not captured.
                if off > d.next_off:
                    self._gap(d, off, ts, out)
                d.reset = True
                out.append(StreamReset(d.key, ts))
                self._retire(d)
            return out

        payload = seg.payload
        n = len(payload)
        if flags & FIN and d.fin_off is None and off + n >= d.next_off:
            d.fin_off = off + n
            d.pending = True
        if n:
            self._data(d, off, payload, ts, out)
        if flags & FIN:
            self._drain(d, ts, out)
        return out

    def _starts_new_connection(self, d: _Dir, seg: TcpSegment) -> bool:
        if not d.opened:
            # A SYN from the silent side of a finished connection opens a new one.
            return d.peer.done
        if d.syn_seen and seg.seq == d.isn:
            return False  # retransmitted SYN
        if seg.flags & ACK and not (d.done or d.peer.done):
            return False  # stray SYN/ACK on a live connection
        return True

    def _new_connection(
        self, seg: TcpSegment, generation: int, ts: float, out: list[StreamEvent]
    ) -> _Dir:
        key4 = (seg.src, seg.sport, seg.dst, seg.dport)
        rev4 = (seg.dst, seg.dport, seg.src, seg.sport)
        old = self._dirs.get(key4)
        if old is not None:
            # The old connection cannot receive anything any more: flush it.
            for x in (old, old.peer):
                if x.opened and not x.done:
                    self._give_up(x, ts, out)
                    self._retire(x)
        key = FlowKey(seg.src, seg.sport, seg.dst, seg.dport, generation)
        # The SYN/ACK sender is the server even if the client's SYN was missed.
        if seg.flags & (SYN | ACK) == SYN | ACK:
            conn = Connection(key.reverse(), key, generation, ts)
        else:
            conn = Connection(key, key.reverse(), generation, ts)
        a = _Dir(key, conn)
        b = _Dir(key.reverse(), conn)
        a.peer = b
        b.peer = a
        self._dirs[key4] = a
        self._dirs[rev4] = b
        self._by_key[a.key] = a
        self._by_key[b.key] = b
        self._connections.append(conn)
        return a

    def _data(
        self,
        d: _Dir,
        off: int,
        payload: memoryview | bytes,
        ts: float,
        out: list[StreamEvent],
    ) -> None:
        end = off + len(payload)
        fin = d.fin_off
        if fin is not None and end > fin:
            # Bytes past the FIN cannot belong to the stream.
            if off >= fin:
                return
            payload = payload[: fin - off]
            end = fin
        nxt = d.next_off
        if end <= nxt:
            d.retrans += 1  # retransmission, duplicate or keep-alive probe
            return
        if off > nxt:
            self._buffer(d, off, payload, ts, out)
            return
        if off < nxt:
            d.retrans += 1
            payload = payload[nxt - off :]
        out.append(StreamData(d.key, nxt, payload, ts))
        d.next_off = end
        self._drain(d, ts, out)

    def _buffer(
        self,
        d: _Dir,
        off: int,
        payload: memoryview | bytes,
        ts: float,
        out: list[StreamEvent],
    ) -> None:
        d.ooo += 1
        n = len(payload)
        prev = d.buf.get(off)
        if prev is not None:
            if len(prev[0]) >= n:
                d.retrans += 1
                return
            self._unbuffer(d, len(prev[0]))
        else:
            bisect.insort(d.starts, off)
        # Copy: out-of-order data is rare, and a copy does not pin the capture.
        d.buf[off] = (bytes(payload), ts)
        d.buffered += n
        self._buffered_total += n
        self._buffering[d] = None
        d.pending = True
        while d.buffered > self.max_buffer and not d.done:
            self._give_up(d, ts, out, upto=d.starts[0])
        while self._buffered_total > self.max_total_buffer:
            victim = max(self._buffering, key=lambda x: x.buffered)
            self._give_up(victim, ts, out, upto=victim.starts[0])

    def _unbuffer(self, d: _Dir, n: int) -> None:
        d.buffered -= n
        self._buffered_total -= n
        if not d.buffered:
            self._buffering.pop(d, None)

    def _drain(self, d: _Dir, ts: float, out: list[StreamEvent]) -> None:
        """Deliver buffered data that became contiguous; close on an in-order FIN."""
        if d.done:
            return
        starts = d.starts
        if starts:
            buf = d.buf
            fin = d.fin_off
            while starts and starts[0] <= d.next_off:
                s = starts.pop(0)
                data, dts = buf.pop(s)
                self._unbuffer(d, len(data))
                end = s + len(data)
                if fin is not None and end > fin:
                    end = fin
                nxt = d.next_off
                if end <= nxt:
                    d.retrans += 1
                    continue
                chunk: memoryview | bytes = data
                if s < nxt or end < s + len(data):
                    chunk = memoryview(data)[nxt - s : end - s]
                out.append(StreamData(d.key, nxt, chunk, dts))
                d.next_off = end
        d.next_seq = (d.base + d.next_off) & _MASK
        if d.fin_off is not None and d.next_off >= d.fin_off:
            d.closed = True
            out.append(StreamClosed(d.key, ts))
            self._retire(d)
            return
        d.pending = bool(starts) or d.fin_off is not None

    def _gap(self, d: _Dir, upto: int, ts: float, out: list[StreamEvent]) -> None:
        length = upto - d.next_off
        d.gaps += 1
        d.gap_bytes += length
        out.append(StreamGap(d.key, d.next_off, length, ts))
        d.next_off = upto

    def _give_up(self, d: _Dir, ts: float, out: list[StreamEvent], upto: int | None = None) -> None:
        """Stop waiting for missing bytes before ``upto`` (before all known data if None).

        Gaps never extend past data or a FIN actually seen: an ACK only proves
        that bytes existed up to what was captured after the hole.
        """
        while not d.done:
            if d.starts:
                target = d.starts[0]
            elif d.fin_off is not None:
                target = d.fin_off
            else:
                break
            if upto is not None and target > upto:
                target = upto
            if target <= d.next_off:
                break
            self._gap(d, target, ts, out)
            self._drain(d, ts, out)

    def _retire(self, d: _Dir) -> None:
        d.done = True
        d.pending = False
        d.next_seq = -1
        if d.buffered:
            self._unbuffer(d, d.buffered)
        d.starts = []
        d.buf = {}
