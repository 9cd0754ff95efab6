"""Write a migration stream as a TCP conversation in a pcap or pcapng file, and
write captured frames as pcapng (`PcapngWriter`, for `migshark live -w`).

The conversation is what a loopback capture of a real migration holds: a
three-way handshake, the stream in MSS-sized segments from the source, ACKs from
the destination every few segments, then FIN/ACK both ways. Timestamps advance
at the scenario's bandwidth. Frames are Ethernet + IPv4 + TCP with correct
checksums, so tshark and Wireshark read them without complaint.

TCP-level faults change what the capture shows, never what the destination got:
reorder (adjacent segments swapped), duplicate (segments captured twice),
overlap-retransmit (a retransmission straddling two segments), gap (one segment
missing from the capture while the destination acknowledges it) and rst (the
destination resets the connection after the last byte instead of closing it).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from migshark.analyzer.findings import Code
from migshark.analyzer.scenario import Fault, ScenarioError, TransportSpec

LINKTYPE_ETHERNET = 1
SNAPLEN = 262144
SRC_MAC = bytes.fromhex("020000000001")
DST_MAC = bytes.fromhex("020000000002")
ISN_SOURCE = 0x1000_0000
ISN_DESTINATION = 0x7000_0000
WINDOW = 65535

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

# How often the reorder / duplicate faults act: every Nth data segment.
FAULT_PERIOD = 5


@dataclass
class Packet:
    timestamp: float
    from_source: bool
    seq: int
    ack: int
    flags: int
    payload: bytes = b""
    options: bytes = b""


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ip(address: str) -> bytes:
    parts = address.split(".")
    if len(parts) != 4:
        raise ScenarioError(f"transport: {address!r} is not an IPv4 address")
    try:
        return bytes(int(p) for p in parts)
    except ValueError:
        raise ScenarioError(f"transport: {address!r} is not an IPv4 address") from None


def build_frame(packet: Packet, transport: TransportSpec, ip_id: int) -> bytes:
    if packet.from_source:
        src, dst, sport, dport = transport.src, transport.dst, transport.sport, transport.dport
        src_mac, dst_mac = SRC_MAC, DST_MAC
    else:
        src, dst, sport, dport = transport.dst, transport.src, transport.dport, transport.sport
        src_mac, dst_mac = DST_MAC, SRC_MAC
    src_ip, dst_ip = _ip(src), _ip(dst)
    header_len = 20 + len(packet.options)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, packet.seq & 0xFFFFFFFF,
                      packet.ack & 0xFFFFFFFF, (header_len // 4) << 4, packet.flags,
                      WINDOW, 0, 0) + packet.options
    segment = tcp + packet.payload
    pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, 6, len(segment))
    tcp_sum = _checksum(pseudo + segment)
    segment = segment[:16] + struct.pack("!H", tcp_sum) + segment[18:]
    ip_header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), ip_id & 0xFFFF,
                            0x4000, 64, 6, 0, src_ip, dst_ip)
    ip_header = ip_header[:10] + struct.pack("!H", _checksum(ip_header)) + ip_header[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip_header + segment


def conversation(stream: bytes, transport: TransportSpec, faults: Iterable[Fault] = (),
                 page_data: list[tuple[int, int]] | None = None
                 ) -> tuple[list[Packet], list[dict[str, Any]]]:
    """The packets of the capture and the findings the TCP faults must produce
    (code, stream offset)."""
    names = {f.name for f in faults if f.tcp_level}
    clock = _Clock(transport)
    src_seq, dst_seq = ISN_SOURCE, ISN_DESTINATION
    mss_option = struct.pack("!BBH", 2, 4, transport.mss)
    packets = [
        Packet(clock.tick(0), True, src_seq, 0, SYN, options=mss_option),
        Packet(clock.tick(0), False, dst_seq, src_seq + 1, SYN | ACK, options=mss_option),
        Packet(clock.tick(0), True, src_seq + 1, dst_seq + 1, ACK),
    ]
    base = src_seq + 1
    dst_next = dst_seq + 1
    segments = [(offset, stream[offset : offset + transport.mss])
                for offset in range(0, len(stream), transport.mss)]
    expected: list[dict[str, Any]] = []
    dropped = _pick_gap(segments, page_data or []) if "gap" in names else None
    if dropped is not None:
        offset, data = segments[dropped]
        expected.append({"code": Code.CAPTURE_GAP, "offset": offset, "length": len(data)})
    order = list(range(len(segments)))
    if "reorder" in names:
        for i in range(1, len(order) - 1, FAULT_PERIOD):
            order[i], order[i + 1] = order[i + 1], order[i]
    received = 0  # stream bytes the destination holds in order, for its ACKs
    pending: dict[int, int] = {}
    since_ack = 0
    for position, index in enumerate(order):
        offset, data = segments[index]
        when = clock.tick(len(data))
        flags = ACK | (PSH if index == len(segments) - 1 else 0)
        packet = Packet(when, True, base + offset, dst_next, flags, data)
        if index != dropped:
            packets.append(packet)
        if "duplicate" in names and position % FAULT_PERIOD == 2:
            packets.append(Packet(when, True, base + offset, dst_next, flags, data))
        if "overlap-retransmit" in names and position % FAULT_PERIOD == 3 and index > 0:
            # A retransmission of the second half of the previous segment and the
            # first half of this one, as a sender that re-packetises does.
            prev_offset, prev_data = segments[index - 1]
            lo = prev_offset + len(prev_data) // 2
            hi = offset + len(data) // 2
            packets.append(Packet(when, True, base + lo, dst_next, ACK, stream[lo:hi]))
        pending[offset] = offset + len(data)
        while received in pending:
            received = pending.pop(received)
        since_ack += 1
        if since_ack >= transport.ack_every or position == len(order) - 1:
            since_ack = 0
            packets.append(Packet(clock.tick(0), False, dst_next, base + received, ACK))
    end = base + len(stream)
    if "rst" in names:
        packets.append(Packet(clock.tick(0), False, dst_next, end, RST | ACK))
        expected.append({"code": Code.PEER_RESET, "offset": len(stream)})
    else:
        packets += [
            Packet(clock.tick(0), True, end, dst_next, FIN | ACK),
            Packet(clock.tick(0), False, dst_next, end + 1, FIN | ACK),
            Packet(clock.tick(0), True, end + 1, dst_next + 1, ACK),
        ]
    return packets, expected


def _pick_gap(segments: list[tuple[int, bytes]], page_data: list[tuple[int, int]]
              ) -> int | None:
    """A segment whose bytes all lie inside one RAM page's data, so that the decoder
    skips the hole exactly and the expected bitmaps stay exact."""
    for index, (offset, data) in enumerate(segments[1:-1], start=1):
        end = offset + len(data)
        for lo, hi in page_data:
            if lo <= offset and end <= hi:
                return index
    raise ScenarioError("the gap fault needs a data segment inside one RAM page's data: "
                        "give a RAM block a data_fraction above 0, or an mss below 4096")


class _Clock:
    def __init__(self, transport: TransportSpec) -> None:
        self.now = transport.start_time
        self.bandwidth = transport.bandwidth

    def tick(self, nbytes: int) -> float:
        # A fixed 10 us between packets keeps timestamps strictly increasing.
        self.now += 10e-6 + nbytes / self.bandwidth
        return self.now


# --- file formats -------------------------------------------------------------------


def write_capture(path: str | Path, stream: bytes, transport: TransportSpec,
                  faults: Iterable[Fault] = (), page_data: list[tuple[int, int]] | None = None,
                  fmt: str | None = None) -> list[dict[str, Any]]:
    """Write `stream` as a pcap or pcapng (by `fmt` or the file name's suffix);
    returns the findings the TCP faults must produce."""
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".")
    if fmt not in ("pcap", "pcapng"):
        raise ScenarioError(f"{path}: capture format must be pcap or pcapng")
    packets, expected = conversation(stream, transport, faults, page_data)
    with open(path, "wb") as out:
        out.write(_pcap_header() if fmt == "pcap" else _pcapng_header())
        for number, packet in enumerate(packets):
            frame = build_frame(packet, transport, number)
            out.write(_pcap_record(packet.timestamp, frame) if fmt == "pcap"
                      else _pcapng_packet(packet.timestamp, frame))
    return expected


def _pcap_header() -> bytes:
    # Microsecond pcap, little-endian, as tcpdump writes by default.
    return struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET)


def _pcap_record(timestamp: float, frame: bytes) -> bytes:
    micros = round(timestamp * 1_000_000)
    return struct.pack("<IIII", micros // 1_000_000, micros % 1_000_000, len(frame),
                       len(frame)) + frame


def _block(block_type: int, body: bytes) -> bytes:
    body += bytes(-len(body) % 4)
    length = 12 + len(body)
    return struct.pack("<II", block_type, length) + body + struct.pack("<I", length)


def _pcapng_header() -> bytes:
    shb = _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    # if_tsresol defaults to microseconds; no options needed.
    idb = _block(0x00000001, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, SNAPLEN))
    return shb + idb


class PcapngWriter:
    """Frames as they are captured: one section, one interface named after the
    capture's, nanosecond timestamps (if_tsresol 9), enhanced packet blocks."""

    def __init__(self, handle: BinaryIO, linktype: int, iface: str,
                 snaplen: int = SNAPLEN) -> None:
        self.handle = handle
        handle.write(_block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)))
        options = (_option(2, iface.encode()) + _option(9, b"\x09")
                   + struct.pack("<HH", 0, 0))
        handle.write(_block(0x00000001, struct.pack("<HHI", linktype, 0, snaplen) + options))

    def write(self, timestamp: float, frame: bytes) -> None:
        ns = int(timestamp * 1_000_000_000)
        body = struct.pack("<IIIII", 0, ns >> 32, ns & 0xFFFFFFFF, len(frame),
                           len(frame)) + frame
        self.handle.write(_block(0x00000006, body))

    def close(self) -> None:
        self.handle.close()


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + bytes(-len(value) % 4)


def _pcapng_packet(timestamp: float, frame: bytes) -> bytes:
    micros = round(timestamp * 1_000_000)
    body = struct.pack("<IIIII", 0, micros >> 32, micros & 0xFFFFFFFF, len(frame),
                       len(frame)) + frame
    return _block(0x00000006, body)
