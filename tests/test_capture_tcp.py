"""TCP reassembly: ordering, retransmissions, gaps, FIN/RST, wraparound, port reuse."""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from migshark.analyzer.capture import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    FlowKey,
    StreamClosed,
    StreamData,
    StreamEvent,
    StreamGap,
    StreamOpened,
    StreamReset,
    TcpReassembler,
    TcpSegment,
    iter_frames,
    parse_frame,
)

A = ("10.0.0.1", 50000)
B = ("10.0.0.2", 4444)
AB = FlowKey(A[0], A[1], B[0], B[1])
BA = AB.reverse()
MASK = 0xFFFFFFFF


def seg(
    seq: int,
    payload: bytes = b"",
    flags: int = ACK,
    *,
    src: tuple[str, int] = A,
    dst: tuple[str, int] = B,
    ack: int = 0,
    ts: float = 0.0,
) -> TcpSegment:
    return TcpSegment(
        ts, src[0], src[1], dst[0], dst[1], seq & MASK, ack & MASK, flags, memoryview(payload), 1000
    )


def run(segments: Iterable[TcpSegment], r: TcpReassembler | None = None) -> list[StreamEvent]:
    r = r or TcpReassembler()
    events: list[StreamEvent] = []
    for s in segments:
        events.extend(r.feed(s))
    events.extend(r.finish())
    return events


def stream(events: list[StreamEvent], flow: FlowKey = AB) -> bytes:
    """Concatenate a flow's data, checking offsets are contiguous (gaps as '?')."""
    out = bytearray()
    for e in events:
        if isinstance(e, StreamData | StreamGap) and e.flow == flow:
            assert e.offset == len(out), f"non-contiguous event {e}"
            out += bytes(e.data) if isinstance(e, StreamData) else b"?" * e.length
    return bytes(out)


def kinds(events: list[StreamEvent], flow: FlowKey = AB) -> list[str]:
    return [type(e).__name__ for e in events if e.flow == flow]


ISN = 1000


def handshake(isn_a: int = ISN, isn_b: int = 5000) -> list[TcpSegment]:
    return [
        seg(isn_a, flags=SYN),
        seg(isn_b, flags=SYN | ACK, src=B, dst=A, ack=isn_a + 1),
        seg(isn_a + 1, ack=isn_b + 1),
    ]


def test_handshake_data_and_fin() -> None:
    segs = handshake() + [
        seg(ISN + 1, b"hello ", PSH | ACK),
        seg(ISN + 7, b"world", PSH | ACK),
        seg(5001, b"ok", PSH | ACK, src=B, dst=A, ack=ISN + 12),
        seg(ISN + 12, flags=FIN | ACK),
        seg(5003, flags=FIN | ACK, src=B, dst=A, ack=ISN + 13),
        seg(ISN + 13, ack=5004),
    ]
    events = run(segs)
    assert events[0] == StreamOpened(AB, 0.0, True)
    assert stream(events) == b"hello world"
    assert stream(events, BA) == b"ok"
    assert [e.offset for e in events if isinstance(e, StreamData) and e.flow == AB] == [0, 6]
    assert kinds(events) == ["StreamOpened", "StreamData", "StreamData", "StreamClosed"]
    assert kinds(events, BA) == ["StreamOpened", "StreamData", "StreamClosed"]


def test_in_order_data_is_not_copied() -> None:
    r = TcpReassembler()
    r.feed(seg(ISN, flags=SYN))
    s = seg(ISN + 1, b"abc")
    (ev,) = r.feed(s)
    assert isinstance(ev, StreamData) and ev.data is s.payload
    assert r.buffered_bytes == 0


def test_exact_retransmission_and_duplicates() -> None:
    segs = [
        seg(ISN, flags=SYN),
        seg(ISN + 1, b"aaaa"),
        seg(ISN + 1, b"aaaa"),
        seg(ISN + 5, b"bbbb"),
        seg(ISN + 5, b"bbbb"),
        seg(ISN + 1, b"aaaa"),
    ]
    r = TcpReassembler()
    events = run(segs, r)
    assert stream(events) == b"aaaabbbb"
    assert len([e for e in events if isinstance(e, StreamData)]) == 2
    stats = r.stats(AB)
    assert stats is not None and stats.retransmitted_segments == 3


def test_partial_overlap_delivers_only_new_bytes() -> None:
    events = run([seg(ISN, flags=SYN), seg(ISN + 1, b"0123456789"), seg(ISN + 6, b"56789ABCDE")])
    data = [e for e in events if isinstance(e, StreamData)]
    assert [(e.offset, bytes(e.data)) for e in data] == [(0, b"0123456789"), (10, b"ABCDE")]


def test_out_of_order_is_buffered_and_released_in_order() -> None:
    r = TcpReassembler()
    out = run([seg(ISN, flags=SYN), seg(ISN + 1 + 8, b"CCCC")], r)
    assert stream(out) == b"?" * 8 + b"CCCC"  # finish() gave up on the missing 8 bytes...
    # ...but when the hole is filled in time, everything is delivered in order.
    r = TcpReassembler()
    assert r.feed(seg(ISN, flags=SYN))
    assert r.feed(seg(ISN + 9, b"CCCC")) == []
    assert r.feed(seg(ISN + 5, b"BBBB")) == []
    assert r.buffered_bytes == 8
    events = r.feed(seg(ISN + 1, b"AAAA"))
    assert [(e.offset, bytes(e.data)) for e in events if isinstance(e, StreamData)] == [
        (0, b"AAAA"),
        (4, b"BBBB"),
        (8, b"CCCC"),
    ]
    assert r.buffered_bytes == 0
    assert r.finish() == []


def test_overlapping_buffered_segments_with_different_segmentation() -> None:
    segs = [
        seg(ISN, flags=SYN),
        seg(ISN + 101, b"b" * 200),
        seg(ISN + 201, b"c" * 200),
        seg(ISN + 101, b"b" * 100),
        seg(ISN + 201, b"c" * 200),
        seg(ISN + 1, b"a" * 100),
    ]
    events = run(segs)
    assert stream(events) == b"a" * 100 + b"b" * 200 + b"c" * 100


def test_gap_reported_at_finish_with_exact_offset_and_length() -> None:
    segs = [seg(ISN, flags=SYN), seg(ISN + 1, b"x" * 100), seg(ISN + 251, b"z" * 50)]
    events = run(segs)
    gaps = [e for e in events if isinstance(e, StreamGap)]
    assert [(g.flow, g.offset, g.length) for g in gaps] == [(AB, 100, 150)]
    assert stream(events) == b"x" * 100 + b"?" * 150 + b"z" * 50


def test_gap_given_up_as_soon_as_peer_acks_beyond_it() -> None:
    r = TcpReassembler()
    for s in handshake():
        r.feed(s)
    r.feed(seg(ISN + 1, b"x" * 100))
    r.feed(seg(ISN + 201, b"z" * 100))  # bytes 100..200 never captured
    events = r.feed(seg(5001, src=B, dst=A, ack=ISN + 301, ts=3.0))
    assert [(type(e).__name__, getattr(e, "offset", None)) for e in events] == [
        ("StreamGap", 100),
        ("StreamData", 200),
    ]
    assert events[0] == StreamGap(AB, 100, 100, 3.0)
    # An ACK that does not cover the hole changes nothing.
    r2 = TcpReassembler()
    for s in handshake():
        r2.feed(s)
    r2.feed(seg(ISN + 201, b"z" * 100))
    assert r2.feed(seg(5001, src=B, dst=A, ack=ISN + 1)) == []


def test_fin_beyond_hole_waits_for_retransmission() -> None:
    r = TcpReassembler()
    r.feed(seg(ISN, flags=SYN))
    r.feed(seg(ISN + 1, b"a" * 10))
    assert r.feed(seg(ISN + 21, b"c" * 10, FIN | ACK)) == []
    events = r.feed(seg(ISN + 11, b"b" * 10))  # late retransmission fills the hole
    assert [type(e).__name__ for e in events] == ["StreamData", "StreamData", "StreamClosed"]
    assert [(e.offset, bytes(e.data)) for e in events if isinstance(e, StreamData)] == [
        (10, b"b" * 10),
        (20, b"c" * 10),
    ]


def test_fin_beyond_hole_gives_gap_when_fin_is_acked_or_at_finish() -> None:
    segs = [seg(ISN, flags=SYN), seg(ISN + 1, b"a" * 10), seg(ISN + 21, b"c" * 10, FIN | ACK)]
    events = run(segs)
    assert kinds(events) == [
        "StreamOpened",
        "StreamData",
        "StreamGap",
        "StreamData",
        "StreamClosed",
    ]
    assert stream(events) == b"a" * 10 + b"?" * 10 + b"c" * 10
    r = TcpReassembler()
    for s in handshake() + [seg(ISN + 1, b"a" * 10), seg(ISN + 21, flags=FIN | ACK)]:
        r.feed(s)
    events = r.feed(seg(5001, src=B, dst=A, ack=ISN + 22))  # ACK of the FIN
    assert events == [StreamGap(AB, 10, 10, 0.0), StreamClosed(AB, 0.0)]


def test_rst_beyond_hole_flushes_then_resets() -> None:
    r = TcpReassembler()
    r.feed(seg(ISN, flags=SYN))
    r.feed(seg(ISN + 1, b"a" * 10))
    r.feed(seg(ISN + 21, b"c" * 10))
    events = r.feed(seg(ISN + 41, flags=RST | ACK, ts=9.0))
    assert events == [
        StreamGap(AB, 10, 10, 9.0),
        StreamData(AB, 20, events[1].data, 0.0),  # type: ignore[union-attr]
        StreamGap(AB, 30, 10, 9.0),  # RST seq = snd_nxt: bytes 30..40 were sent
        StreamReset(AB, 9.0),
    ]
    assert bytes(events[1].data) == b"c" * 10  # type: ignore[union-attr]
    # Nothing more for a reset flow, and finish() has nothing left.
    assert r.feed(seg(ISN + 41, b"late")) == []
    assert r.finish() == []
    stats = r.stats(AB)
    assert stats is not None and stats.reset and stats.gap_bytes == 20 and stats.gaps == 2


def test_rst_is_reported_for_its_sender_only() -> None:
    events = run(handshake() + [seg(5001, flags=RST | ACK, src=B, dst=A, ack=ISN + 1)])
    assert kinds(events, BA) == ["StreamOpened", "StreamReset"]
    assert kinds(events, AB) == ["StreamOpened"]


def test_fin_out_of_order_closes_after_last_data() -> None:
    r = TcpReassembler()
    r.feed(seg(ISN, flags=SYN))
    assert r.feed(seg(ISN + 5, flags=FIN | ACK)) == []
    events = r.feed(seg(ISN + 1, b"data"))
    assert [type(e).__name__ for e in events] == ["StreamData", "StreamClosed"]
    assert r.feed(seg(ISN + 5, flags=FIN | ACK)) == []  # FIN retransmission after close


def test_data_beyond_fin_is_ignored() -> None:
    events = run([seg(ISN, flags=SYN), seg(ISN + 1, b"abc", FIN | ACK), seg(ISN + 4, b"junk")])
    assert stream(events) == b"abc"
    assert kinds(events)[-1] == "StreamClosed"


def test_keepalives_and_pure_acks_produce_nothing() -> None:
    r = TcpReassembler()
    r.feed(seg(ISN, flags=SYN))
    r.feed(seg(ISN + 1, b"abcd"))
    assert r.feed(seg(ISN + 4, b"\x00")) == []  # keep-alive: 1 byte at snd_nxt - 1
    assert r.feed(seg(ISN + 4)) == []  # zero-length keep-alive
    assert r.feed(seg(ISN + 5)) == []  # pure ACK
    assert r.feed(seg(ISN + 5, b"e")) == [StreamData(AB, 4, memoryview(b"e"), 0.0)]


@pytest.mark.parametrize("isn", [MASK - 150, MASK, MASK - 1])
def test_sequence_wraparound(isn: int) -> None:
    data = bytes(random.Random(isn).randbytes(300))
    segs = [seg(isn, flags=SYN)] + [seg(isn + 1 + i, data[i : i + 100]) for i in (0, 200, 100)]
    events = run(segs)
    assert stream(events) == data
    assert not any(isinstance(e, StreamGap) for e in events)


def test_stream_longer_than_4_gib() -> None:
    chunk = memoryview(bytes(65536))
    r = TcpReassembler()
    r.feed(seg(ISN, flags=SYN))
    seq = ISN + 1
    last: StreamEvent | None = None
    for _ in range((1 << 32) // 65536 + 3):
        (last,) = r.feed(TcpSegment(0.0, A[0], A[1], B[0], B[1], seq & MASK, 0, ACK, chunk, 0))
        seq += 65536
    assert isinstance(last, StreamData) and last.offset == (1 << 32) + 2 * 65536
    # Out-of-order handling still works past 4 GiB.
    assert r.feed(seg(seq + 65536, b"later")) == []
    events = r.feed(TcpSegment(0.0, A[0], A[1], B[0], B[1], seq & MASK, 0, ACK, chunk, 0))
    assert [e.offset for e in events] == [(1 << 32) + 3 * 65536, (1 << 32) + 4 * 65536]


def test_two_connections_interleaved() -> None:
    C = ("10.0.0.1", 50001)
    ca = FlowKey(C[0], C[1], B[0], B[1])
    segs = [
        seg(ISN, flags=SYN),
        seg(77, flags=SYN, src=C),
        seg(ISN + 1, b"one-"),
        seg(78, b"two-", src=C),
        seg(82, b"TWO", src=C),
        seg(ISN + 5, b"ONE"),
    ]
    r = TcpReassembler()
    events = run(segs, r)
    assert stream(events, AB) == b"one-ONE"
    assert stream(events, ca) == b"two-TWO"
    assert len(r.connections) == 2


def test_capture_starting_mid_flow() -> None:
    events = run([seg(123456, b"middle", PSH | ACK), seg(123462, b"-end")])
    assert events[0] == StreamOpened(AB, 0.0, False)
    assert stream(events) == b"middle-end"


def test_syn_with_data() -> None:
    events = run([seg(ISN, b"fastopen", SYN), seg(ISN + 9, b"!")])
    assert stream(events) == b"fastopen!"


def test_syn_retransmission_is_ignored() -> None:
    r = TcpReassembler()
    events = run([seg(ISN, flags=SYN), seg(ISN, flags=SYN), seg(ISN + 1, b"x")], r)
    assert kinds(events) == ["StreamOpened", "StreamData"]
    assert len(r.connections) == 1


def test_port_reuse_starts_a_new_generation() -> None:
    first = handshake(ISN, 5000) + [
        seg(ISN + 1, b"first", PSH | ACK),
        seg(ISN + 6, flags=FIN | ACK),
        seg(5001, flags=FIN | ACK, src=B, dst=A, ack=ISN + 7),
        seg(ISN + 7, ack=5002),
    ]
    second = handshake(900_000, 70_000) + [seg(900_001, b"second", PSH | ACK)]
    r = TcpReassembler()
    events = run(first + second, r)
    ab1 = FlowKey(*A, *B, generation=1)
    assert stream(events, AB) == b"first"
    assert stream(events, ab1) == b"second"
    assert kinds(events, ab1) == ["StreamOpened", "StreamData"]
    assert kinds(events, ab1.reverse()) == ["StreamOpened"]
    conns = r.connections
    assert [(c.client, c.generation) for c in conns] == [(AB, 0), (ab1, 1)]
    assert r.connection(ab1.reverse()) is conns[1]


def test_new_syn_after_reset_flushes_old_connection() -> None:
    r = TcpReassembler()
    segs = [
        seg(ISN, flags=SYN),
        seg(ISN + 1, b"a"),
        seg(ISN + 11, b"k"),
        seg(2_000_000, flags=SYN),
        seg(2_000_001, b"new"),
    ]
    events = run(segs, r)
    assert stream(events, AB) == b"a" + b"?" * 9 + b"k"
    assert stream(events, FlowKey(*A, *B, 1)) == b"new"


def test_out_of_order_buffer_is_bounded() -> None:
    r = TcpReassembler(max_buffer=1000)
    r.feed(seg(ISN, flags=SYN))
    r.feed(seg(ISN + 1, b"a" * 10))
    events: list[StreamEvent] = []
    for i in range(3):  # 1200 bytes after a 10-byte hole
        events += r.feed(seg(ISN + 21 + 400 * i, b"b" * 400))
    assert events[0] == StreamGap(AB, 10, 10, 0.0)
    assert [(e.offset, len(e.data)) for e in events if isinstance(e, StreamData)] == [
        (20, 400),
        (420, 400),
        (820, 400),
    ]
    assert r.buffered_bytes == 0


def test_total_buffer_bound_across_flows() -> None:
    r = TcpReassembler(max_buffer=10_000, max_total_buffer=1500)
    C = ("10.0.0.1", 50001)
    r.feed(seg(ISN, flags=SYN))
    r.feed(seg(ISN, flags=SYN, src=C))
    assert r.feed(seg(ISN + 101, b"x" * 1000)) == []
    # The largest buffer gives way, even though another flow tipped the total.
    events = r.feed(seg(ISN + 101, b"y" * 600, src=C))
    assert events[0] == StreamGap(AB, 0, 100, 0.0)
    assert [(type(e).__name__, e.flow) for e in events] == [("StreamGap", AB), ("StreamData", AB)]
    assert r.buffered_bytes <= 1500


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(1, 3000),
    n_cuts=st.integers(0, 40),
    isn=st.integers(0, MASK),
    seed=st.integers(0, 2**32),
    drop=st.booleans(),
)
def test_property_any_segmentation_and_order(
    size: int, n_cuts: int, isn: int, seed: int, drop: bool
) -> None:
    """Reordered, duplicated, overlapping segments always rebuild the exact stream;
    with losses every byte is either correct or inside a StreamGap."""
    # Structure comes from a seeded RNG: hypothesis' own list/bytes distributions
    # rarely produce the overlapping retransmissions this is meant to exercise.
    rnd = random.Random(seed)
    data = rnd.randbytes(size)
    cuts = [rnd.randint(1, size) for _ in range(n_cuts)]
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    pieces = [(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
    # Retransmissions that straddle original segment boundaries.
    for _ in range(len(pieces) // 2):
        a = rnd.randrange(len(data))
        pieces.append((a, min(len(data), a + rnd.randint(1, 500))))
    first, rest = pieces[0], pieces[1:]
    rnd.shuffle(rest)
    lost: set[tuple[int, int]] = set()
    if drop and rest:
        lost = {p for p in rest if rnd.random() < 0.2}
    segs = [seg(isn, flags=SYN)] + [
        seg(isn + 1 + a, data[a:b]) for a, b in [first, *rest] if (a, b) not in lost
    ]
    events = run(segs)
    rebuilt = stream(events)
    got = {i for a, b in [first, *rest] if (a, b) not in lost for i in range(a, b)}
    expected_len = max(got) + 1
    assert len(rebuilt) == expected_len
    for i, byte in enumerate(rebuilt):
        if i in got:
            assert byte == data[i]
        else:
            assert byte == ord("?")
    if not lost:
        assert rebuilt == data
        assert not any(isinstance(e, StreamGap) for e in events)


def test_end_to_end_from_scapy_pcap(tmp_path: Path) -> None:
    client, server = "192.168.7.1", "192.168.7.2"
    payload = bytes(random.Random(3).randbytes(5000))

    def pkt(src: str, dst: str, sport: int, dport: int, **kw: object) -> Ether:
        data = kw.pop("load", b"")
        return Ether() / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, **kw) / data

    c2s = [
        pkt(client, server, 40000, 4444, seq=ISN, flags="S"),
        pkt(server, client, 4444, 40000, seq=9, ack=ISN + 1, flags="SA"),
    ]
    chunks = [(i, payload[i : i + 1000]) for i in range(0, 5000, 1000)]
    order = [0, 2, 1, 1, 4, 3]  # reordering and a duplicate
    c2s += [
        pkt(client, server, 40000, 4444, seq=ISN + 1 + chunks[i][0], flags="PA", load=chunks[i][1])
        for i in order
    ]
    c2s.append(pkt(client, server, 40000, 4444, seq=ISN + 5001, flags="FA"))
    path = tmp_path / "e2e.pcap"
    wrpcap(str(path), c2s)
    r = TcpReassembler()
    events: list[StreamEvent] = []
    for frame in iter_frames(path):
        segment = parse_frame(frame.linktype, frame.data, frame.timestamp)
        assert segment is not None
        events += r.feed(segment)
    events += r.finish()
    flow = FlowKey(client, 40000, server, 4444)
    assert stream(events, flow) == payload
    assert kinds(events, flow)[-1] == "StreamClosed"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([(A, B), (B, A), (("10.0.0.3", 7), B)]),
            st.integers(-3000, 3000),  # seq around a base, crossing 2**32
            st.integers(0, 600),
            st.sampled_from([0, SYN, FIN, RST, SYN | ACK, FIN | ACK, RST | ACK, PSH | ACK]),
            st.integers(-3000, 3000),
        ),
        max_size=60,
    )
)
def test_property_arbitrary_segments_keep_invariants(
    segments: list[tuple[tuple[tuple[str, int], tuple[str, int]], int, int, int, int]],
) -> None:
    """Whatever arrives: no exception, per flow an Opened first, contiguous offsets,
    nothing after Closed/Reset, buffers within bounds."""
    r = TcpReassembler(max_buffer=2000, max_total_buffer=3000)
    base = MASK - 1000
    events: list[StreamEvent] = []
    for (src, dst), seq, length, flags, ack in segments:
        events += r.feed(
            seg(
                base + seq,
                bytes(length),
                flags | ACK if ack > 0 else flags,
                src=src,
                dst=dst,
                ack=base + ack,
            )
        )
        assert r.buffered_bytes <= 3000
    events += r.finish()
    assert r.buffered_bytes == 0
    state: dict[FlowKey, int | None] = {}  # next offset; None once ended
    for e in events:
        if isinstance(e, StreamOpened):
            assert e.flow not in state
            state[e.flow] = 0
            continue
        assert e.flow in state and state[e.flow] is not None, e
        if isinstance(e, StreamData | StreamGap):
            assert e.offset == state[e.flow]
            size = len(e.data) if isinstance(e, StreamData) else e.length
            assert size > 0
            state[e.flow] = e.offset + size
        else:
            state[e.flow] = None


def test_flowkey_str_and_reverse() -> None:
    assert str(AB) == "10.0.0.1:50000 -> 10.0.0.2:4444"
    v6 = FlowKey("2001:db8::1", 1, "::1", 2, generation=3)
    assert str(v6) == "[2001:db8::1]:1 -> [::1]:2 #3"
    assert v6.reverse() == FlowKey("::1", 2, "2001:db8::1", 1, 3)
    assert v6.reverse().reverse() == v6
    assert len({AB, BA, AB.reverse()}) == 2
