"""Frame decoding: every link type, VLANs, IPv4 quirks, IPv6 extension headers, TCP."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether, Loopback
from scapy.packet import Packet

from migshark.analyzer.capture import (
    ACK,
    FIN,
    PSH,
    SUPPORTED_LINKTYPES,
    SYN,
    format_flags,
    parse_frame,
)
from migshark.analyzer.capture.frames import NS, TcpSegment

PAYLOAD = b"QEVM\x00\x00\x00\x03migration-bytes"


def tcp4(payload: bytes = PAYLOAD, **tcp_kw: object) -> Packet:
    kw: dict[str, object] = {
        "sport": 40000,
        "dport": 4444,
        "seq": 123456,
        "ack": 654321,
        "flags": "PA",
        "window": 512,
    }
    kw.update(tcp_kw)
    return IP(src="192.168.1.10", dst="192.168.1.20") / TCP(**kw) / payload


def tcp6(payload: bytes = PAYLOAD) -> Packet:
    return (
        IPv6(src="2001:db8::1", dst="2001:db8::2")
        / TCP(sport=40000, dport=4444, seq=7, ack=9, flags="A")
        / payload
    )


def parse(linktype: int, pkt: Packet | bytes, ts: float = 1.5) -> TcpSegment | None:
    raw = bytes(pkt)
    return parse_frame(linktype, memoryview(raw), ts)


def check_v4(seg: TcpSegment | None, payload: bytes = PAYLOAD) -> None:
    assert seg is not None
    assert (seg.src, seg.sport, seg.dst, seg.dport) == ("192.168.1.10", 40000, "192.168.1.20", 4444)
    assert (seg.seq, seg.ack, seg.window) == (123456, 654321, 512)
    assert seg.flags == PSH | ACK
    assert bytes(seg.payload) == payload
    assert seg.timestamp == 1.5


ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def test_ethernet_ipv4() -> None:
    check_v4(parse(1, ETH / tcp4()))


def test_ethernet_single_vlan() -> None:
    check_v4(parse(1, ETH / Dot1Q(vlan=42) / tcp4()))


def test_ethernet_qinq() -> None:
    check_v4(parse(1, ETH / Dot1AD(vlan=7) / Dot1Q(vlan=42) / tcp4()))
    # Old-style QinQ with two 0x8100 tags.
    check_v4(parse(1, ETH / Dot1Q(vlan=7) / Dot1Q(vlan=42) / tcp4()))


def test_linux_sll() -> None:
    check_v4(parse(113, CookedLinux(pkttype=0, lladdrtype=772, lladdrlen=6) / tcp4()))


def test_linux_sll2() -> None:
    frame = CookedLinuxV2(proto=0x0800, ifindex=1, pkttype=0) / tcp4()
    assert bytes(frame)[:2] == b"\x08\x00"
    check_v4(parse(276, frame))


@pytest.mark.parametrize("linktype", [101, 228])
def test_raw_ipv4(linktype: int) -> None:
    check_v4(parse(linktype, tcp4()))


@pytest.mark.parametrize("linktype", [101, 229])
def test_raw_ipv6(linktype: int) -> None:
    seg = parse(linktype, tcp6())
    assert seg is not None
    assert (seg.src, seg.dst, seg.seq, seg.ack) == ("2001:db8::1", "2001:db8::2", 7, 9)
    assert bytes(seg.payload) == PAYLOAD


def test_wrong_raw_type_is_none() -> None:
    assert parse(228, tcp6()) is None
    assert parse(229, tcp4()) is None


def test_bsd_null_loopback_both_byte_orders() -> None:
    check_v4(parse(0, Loopback(type=2) / tcp4()))  # scapy writes host (little) order
    check_v4(parse(0, struct.pack(">I", 2) + bytes(tcp4())))
    check_v4(parse(108, struct.pack(">I", 2) + bytes(tcp4())))  # OpenBSD LOOP: network order
    for af6 in (10, 24, 28, 30):
        seg = parse(0, struct.pack("<I", af6) + bytes(tcp6()))
        assert seg is not None and seg.src == "2001:db8::1"
    assert parse(0, struct.pack("<I", 7) + bytes(tcp4())) is None


def test_ethernet_ipv6() -> None:
    seg = parse(1, ETH / tcp6())
    assert seg is not None and bytes(seg.payload) == PAYLOAD and seg.dst == "2001:db8::2"


def test_ipv6_extension_headers() -> None:
    pkt = (
        IPv6(src="fe80::1", dst="fe80::2")
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrRouting(addresses=["2001:db8::99"])
        / IPv6ExtHdrDestOpt()
        / TCP(sport=1, dport=2, seq=3, flags="A")
        / PAYLOAD
    )
    seg = parse(1, ETH / pkt)
    assert seg is not None
    assert (seg.src, seg.sport, seg.dport, seg.seq) == ("fe80::1", 1, 2, 3)
    assert bytes(seg.payload) == PAYLOAD


def test_ipv6_fragments_skipped() -> None:
    first = IPv6() / IPv6ExtHdrFragment(offset=0, m=1, id=5) / TCP() / PAYLOAD
    later = IPv6() / IPv6ExtHdrFragment(offset=10, m=0, id=5) / (b"x" * 40)
    assert parse(229, first) is None
    assert parse(229, later) is None


def test_ipv6_jumbo_payload_length_zero_uses_frame_length() -> None:
    raw = bytearray(bytes(tcp6(b"J" * 200)))
    raw[4:6] = b"\x00\x00"
    seg = parse(229, raw)
    assert seg is not None and bytes(seg.payload) == b"J" * 200


def test_ipv4_fragments() -> None:
    first = tcp4(flags="A")
    first[IP].flags = "MF"
    seg = parse(228, first)
    assert seg is not None and bytes(seg.payload) == PAYLOAD  # first fragment is decoded
    later = IP(src="1.2.3.4", dst="5.6.7.8", proto=6, frag=100) / (b"\0" * 40)
    assert parse(228, later) is None


def test_ipv4_options_respected() -> None:
    pkt = (
        IP(src="192.168.1.10", dst="192.168.1.20", options=b"\x01" * 8)
        / TCP(sport=40000, dport=4444, seq=123456, ack=654321, flags="PA", window=512)
        / PAYLOAD
    )
    assert bytes(pkt)[0] == 0x47
    check_v4(parse(1, ETH / pkt))


def test_tcp_options_respected() -> None:
    seg = parse(
        1, ETH / tcp4(options=[("MSS", 1460), ("NOP", None), ("WScale", 7), ("Timestamp", (1, 2))])
    )
    check_v4(seg)


def test_ethernet_padding_excluded() -> None:
    frame = bytes(ETH / tcp4(b"hi")) + b"\0" * 20  # padded short frame
    seg = parse(1, frame)
    assert seg is not None and bytes(seg.payload) == b"hi"


def _gso_frame(payload_len: int, total_length: int) -> bytes:
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total_length, 0, 0x4000, 64, 6, 0, b"\x7f\0\0\1", b"\x7f\0\0\2"
    )
    tcp = struct.pack("!HHIIBBHHH", 5000, 6000, 1, 2, 0x50, 0x18, 100, 0, 0)
    return b"\0" * 12 + b"\x08\x00" + ip + tcp + b"G" * payload_len


@pytest.mark.parametrize("total_length", [0, 65535, 4464])
def test_gso_loopback_frame_uses_frame_length(total_length: int) -> None:
    # 70000 bytes of IP: total_length can be 0 (BIG TCP), saturated or wrapped.
    frame = _gso_frame(70000 - 40, total_length)
    seg = parse(1, frame)
    assert seg is not None and len(seg.payload) == 70000 - 40


def test_65549_byte_frame_with_exact_total_length() -> None:
    seg = parse(1, _gso_frame(65535 - 40, 65535))
    assert seg is not None and len(seg.payload) == 65495


def test_snaplen_truncated_frame_keeps_captured_part() -> None:
    full = bytes(ETH / tcp4(b"z" * 100))
    seg = parse(1, full[:-30])
    assert seg is not None and bytes(seg.payload) == b"z" * 70


def test_flags_including_ns() -> None:
    seg = parse(228, IP() / TCP(flags="SA") / b"")
    assert seg is not None and seg.flags == SYN | ACK and format_flags(seg.flags) == "S."
    raw = bytearray(bytes(IP() / TCP(flags="F")))
    raw[20 + 12] |= 1  # NS bit lives next to the data offset
    seg = parse(228, raw)
    assert seg is not None and seg.flags == FIN | NS


def test_payload_is_zero_copy_view() -> None:
    raw = bytearray(bytes(ETH / tcp4()))
    view = memoryview(raw)
    seg = parse_frame(1, view, 0.0)
    assert seg is not None and isinstance(seg.payload, memoryview)
    raw[-1] = ord("!")
    assert bytes(seg.payload)[-1:] == b"!"


def test_accepts_bytes() -> None:
    check_v4(parse_frame(1, bytes(ETH / tcp4()), 1.5))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "linktype, frame",
    [
        (1, bytes(ETH / ARP())),
        (1, bytes(ETH / IP() / UDP() / b"x")),
        (1, bytes(ETH / tcp4())[:40]),  # TCP header cut off
        (1, bytes(ETH / IP() / TCP(dataofs=15))),  # data offset beyond the packet
        (1, bytes(ETH / IP() / TCP(dataofs=3))),  # data offset below 5
        (1, bytes(ETH)[:10]),
        (147, bytes(tcp4())),  # a link type we do not decode
        (276, b"\x08\x00"),
        (113, b"\x00" * 15),
        (0, b"\x02\x00"),
        (101, b""),
        (101, b"\x50" + bytes(30)),
    ],
)
def test_not_a_usable_tcp_segment(linktype: int, frame: bytes) -> None:
    assert parse_frame(linktype, memoryview(frame), 0.0) is None


def test_bad_ihl_is_none() -> None:
    raw = bytearray(bytes(tcp4()))
    raw[0] = 0x44  # IHL 4 < 5
    assert parse(228, raw) is None
    raw[0] = 0x4F  # IHL 15 * 4 = 60 > available header bytes for a tiny packet
    assert parse(228, bytes(raw)[:50]) is None


def test_addresses_share_string_objects() -> None:
    a = parse(1, ETH / tcp4())
    b = parse(1, ETH / tcp4(b"other"))
    assert a is not None and b is not None
    assert a.src is b.src  # cached: cheap hashing/comparison downstream


@settings(max_examples=400, deadline=None)
@given(linktype=st.sampled_from(sorted(SUPPORTED_LINKTYPES)), data=st.binary(max_size=120))
def test_fuzz_parse_frame_never_raises(linktype: int, data: bytes) -> None:
    seg = parse_frame(linktype, memoryview(data), 0.0)
    assert seg is None or len(seg.payload) <= len(data)


@settings(max_examples=400, deadline=None)
@given(
    base=st.sampled_from(
        [
            bytes(ETH / tcp4()),
            bytes(ETH / Dot1Q() / tcp6()),
            bytes(ETH / IPv6() / IPv6ExtHdrHopByHop() / TCP() / b"abc"),
        ]
    ),
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 200),
)
def test_fuzz_mutated_frames(base: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    buf = bytearray(base)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    parse_frame(1, memoryview(bytes(buf[:cut])), 0.0)
