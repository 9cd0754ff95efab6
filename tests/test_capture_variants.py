"""End to end: a generated migration wrapped in the link layers and capture shapes
real hosts produce (VLAN, Linux cooked v2, IPv6, pcapng with two interfaces, two
migrations in one capture) gives exactly the bitmaps the encoder says it carries."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from migshark.analyzer.analysis import AnalysisOptions, analyze_path
from migshark.analyzer.pcapwriter import Packet, build_frame, conversation
from migshark.analyzer.scenario import TransportSpec
from testkit.paths import CAPTURES
from testkit.pcapfiles import SNAPLEN, epb, idb, micros, pcap_bytes, shb

GENERATED = CAPTURES / "generated"
LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL2 = 1, 276
ETH_IPV4, ETH_IPV6, ETH_VLAN = 0x0800, 0x86DD, 0x8100


def _stream_and_truth() -> tuple[bytes, dict]:
    stream = (GENERATED / "clean.bin").read_bytes()
    truth = json.loads((GENERATED / "clean.bin.expected.json").read_text())
    return stream, truth


def _ipv4_packet(packet: Packet, transport: TransportSpec, number: int) -> bytes:
    return build_frame(packet, transport, number)[14:]  # strip the Ethernet header


def _ipv6_packet(packet: Packet, transport: TransportSpec, number: int) -> bytes:
    ipv4 = _ipv4_packet(packet, transport, number)
    tcp = ipv4[(ipv4[0] & 0x0F) * 4 :]
    src, dst = (b"\xfd" + bytes(14) + b"\x01", b"\xfd" + bytes(14) + b"\x02")
    if not packet.from_source:
        src, dst = dst, src
    return struct.pack("!IHBB", 6 << 28, len(tcp), 6, 64) + src + dst + tcp


def _ethernet(ethertype: int, payload: bytes, vlan: int | None = None) -> bytes:
    macs = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01"
    if vlan is None:
        return macs + struct.pack("!H", ethertype) + payload
    return macs + struct.pack("!HHH", ETH_VLAN, vlan, ethertype) + payload


def _sll2(ethertype: int, payload: bytes, outgoing: bool) -> bytes:
    # protocol, reserved, ifindex, ARPHRD_LOOPBACK, packet type, address length, address
    return struct.pack("!HHIHBB8s", ethertype, 0, 1, 772, 4 if outgoing else 0, 6,
                       bytes(8)) + payload


def _write_pcap(path: Path, linktype: int, frames: list[tuple[float, bytes]]) -> None:
    path.write_bytes(pcap_bytes([(*micros(timestamp), frame) for timestamp, frame in frames],
                                linktype=linktype, snaplen=SNAPLEN))


def _write_pcapng(path: Path, interfaces: list[tuple[int, int]],
                  frames: list[tuple[float, int, bytes]]) -> None:
    """`interfaces`: (linktype, tsresol exponent); frames: (time, interface, frame)."""
    parts = [shb()] + [idb(linktype, snaplen=SNAPLEN, tsresol=exponent)
                       for linktype, exponent in interfaces]
    parts += [epb(interface, round(timestamp * 10 ** interfaces[interface][1]), frame)
              for timestamp, interface, frame in frames]
    path.write_bytes(b"".join(parts))


def _assert_bitmaps(path: Path, truth: dict, migrations: int = 1) -> None:
    report = analyze_path(path, AnalysisOptions()).as_json()
    assert len(report["migrations"]) == migrations
    expected = sorted((b["node"], b["name"], b["sha256"], b["dirty_bytes"])
                      for b in truth["bitmaps"])
    assert expected, "the generated capture carries bitmaps"
    for migration in report["migrations"]:
        got = sorted((b["node"], b["name"], b["sha256"], b["dirty_bytes"])
                     for b in migration["bitmaps"])
        assert got == expected, migration["stream"]
        problems = [f for f in migration["findings"] if f["severity"] != "note"]
        assert problems == [], problems


@pytest.mark.parametrize("variant", ["vlan", "qinq", "sll2", "ipv6", "sll2-ipv6"])
def test_link_layer_variants(tmp_path, variant):
    stream, truth = _stream_and_truth()
    transport = TransportSpec()
    packets, _ = conversation(stream, transport)
    frames: list[tuple[float, bytes]] = []
    ipv6 = variant.endswith("ipv6")
    linktype = LINKTYPE_LINUX_SLL2 if variant.startswith("sll2") else LINKTYPE_ETHERNET
    for number, packet in enumerate(packets):
        ip = (_ipv6_packet if ipv6 else _ipv4_packet)(packet, transport, number)
        ethertype = ETH_IPV6 if ipv6 else ETH_IPV4
        if variant == "vlan":
            frame = _ethernet(ethertype, ip, vlan=100)
        elif variant == "qinq":
            frame = _ethernet(ETH_VLAN, struct.pack("!H", 200) + struct.pack("!H", ethertype)
                              + ip, vlan=100)
        elif variant.startswith("sll2"):
            frame = _sll2(ethertype, ip, packet.from_source)
        else:
            frame = _ethernet(ethertype, ip)
        frames.append((packet.timestamp, frame))
    path = tmp_path / f"{variant}.pcap"
    _write_pcap(path, linktype, frames)
    _assert_bitmaps(path, truth)


def test_pcapng_with_two_interfaces(tmp_path):
    """Like `tcpdump -i any` into pcapng: each direction on its own interface, with
    different link types and timestamp resolutions."""
    stream, truth = _stream_and_truth()
    transport = TransportSpec()
    packets, _ = conversation(stream, transport)
    frames = []
    for number, packet in enumerate(packets):
        ip = _ipv4_packet(packet, transport, number)
        if packet.from_source:
            frames.append((packet.timestamp, 0, _ethernet(ETH_IPV4, ip)))
        else:
            frames.append((packet.timestamp, 1, _sll2(ETH_IPV4, ip, outgoing=False)))
    path = tmp_path / "two-interfaces.pcapng"
    _write_pcapng(path, [(LINKTYPE_ETHERNET, 6), (LINKTYPE_LINUX_SLL2, 9)], frames)
    _assert_bitmaps(path, truth)


def test_two_migrations_in_one_capture(tmp_path):
    stream, truth = _stream_and_truth()
    first = TransportSpec(sport=40001, dport=4444)
    second = replace(first, sport=40002, dport=4445, start_time=first.start_time + 0.0005)
    frames = []
    for transport in (first, second):
        packets, _ = conversation(stream, transport)
        frames += [(p.timestamp, build_frame(p, transport, n)) for n, p in enumerate(packets)]
    frames.sort(key=lambda item: item[0])  # interleaved, as on a host running both
    path = tmp_path / "two.pcap"
    _write_pcap(path, LINKTYPE_ETHERNET, frames)
    _assert_bitmaps(path, truth, migrations=2)
    report = analyze_path(path, AnalysisOptions()).as_json()
    names = {m["stream"] for m in report["migrations"]}
    assert names == {"127.0.0.1:40001 -> 127.0.0.1:4444", "127.0.0.1:40002 -> 127.0.0.1:4445"}
    # --port picks one of them
    only = analyze_path(path, AnalysisOptions(port=4445)).as_json()
    assert [m["stream"] for m in only["migrations"]] == ["127.0.0.1:40002 -> 127.0.0.1:4445"]
