"""TCP connections carrying a migration stream, as frames or as a whole pcap.

`Conn` makes the frames of one connection, both directions, with real sequence
numbers, for tests that place every frame themselves (duplicates, reordering,
interleaved flows); the frames are the product's own (pcapwriter.build_frame).
`migration_frames` is such a connection carrying a stream in segments from 1 byte to
GSO size. `TcpPcapWriter` streams gigabytes of one connection into a pcap for the
benchmarks, where building a frame per packet in Python would dominate the run.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from typing import BinaryIO

from migshark.analyzer.pcapwriter import Packet, build_frame
from migshark.analyzer.scenario import TransportSpec
from testkit.pcapfiles import SNAPLEN, pcap_bytes

SYN, FIN, RST, PSH, ACK = 0x02, 0x01, 0x04, 0x08, 0x10


class Conn:
    """Frames of one TCP connection, both directions, with real sequence numbers."""

    def __init__(self, client: str, sport: int, server: str, dport: int) -> None:
        self.transport = TransportSpec(src=client, dst=server, sport=sport, dport=dport)
        # The server's ISN sits just below 2**32 so that its sequence numbers wrap.
        self.isn = {True: 0x1000_0000, False: 0xFFFF_F000}
        self.next = {True: 0x1000_0001, False: 0xFFFF_F001}
        self.frames = 0

    def frame(self, from_client: bool, flags: int, payload: bytes = b"",
              seq: int | None = None, options: bytes = b"") -> bytes:
        if seq is None:
            seq = self.next[from_client]
        ack = self.next[not from_client] if flags & ACK else 0
        self.frames += 1
        return build_frame(Packet(0.0, from_client, seq, ack, flags, payload, options),
                           self.transport, self.frames)

    def send(self, from_client: bool, payload: bytes, flags: int = ACK | PSH) -> bytes:
        out = self.frame(from_client, flags, payload)
        self.next[from_client] = (self.next[from_client] + len(payload)) & 0xFFFFFFFF
        return out

    def handshake(self) -> list[bytes]:
        out = [self.frame(True, SYN, seq=self.isn[True])]
        out.append(self.frame(False, SYN | ACK, seq=self.isn[False]))
        out.append(self.frame(True, ACK))
        return out


def segments(stream: bytes, rng: random.Random) -> Iterator[bytes]:
    """Cut `stream` into sizes from tiny to GSO-large, as both capture kinds have them."""
    pos = 0
    while pos < len(stream):
        size = rng.choice((1, 7, 536, 1448, 1448, 1448, 20000, 65483))
        yield stream[pos : pos + size]
        pos += size


def migration_frames(conn: Conn, stream: bytes, seed: int, messy: bool) -> list[bytes]:
    """The whole connection: handshake, the stream, ACKs, FIN both ways. `messy` adds
    duplicates, a segment out of order now and then, and return-path bytes."""
    rng = random.Random(seed)
    frames = conn.handshake()
    held: bytes | None = None
    for i, payload in enumerate(segments(stream, rng)):
        seq = conn.next[True]
        frame = conn.send(True, payload)
        if messy and i % 17 == 5:
            frames.append(conn.frame(True, ACK | PSH, payload, seq=seq))  # duplicate
        if messy and i % 23 == 7 and held is None:
            held = frame  # delivered after the next one: out of order
            continue
        frames.append(frame)
        if held is not None:
            frames.append(held)
            held = None
        if i % 2:
            frames.append(conn.frame(False, ACK))
        if messy and i % 29 == 11:
            frames.append(conn.frame(False, ACK | PSH, b"\x00\x00\x00\x01"))  # return path
            conn.next[False] += 4
    if held is not None:
        frames.append(held)
    frames.append(conn.frame(True, FIN | ACK))
    conn.next[True] += 1
    frames.append(conn.frame(False, FIN | ACK))
    conn.next[False] += 1
    frames.append(conn.frame(True, ACK))
    return frames


# --- the benchmarks' writer -----------------------------------------------------------
#
# Frames are Ethernet/IPv4/TCP with real sequence and acknowledgement numbers: a
# three-way handshake, the client's stream cut into `mss`-byte segments, an ACK from
# the server for every second segment (delayed ACK, as Linux does), and a FIN
# exchange. Headers are packed with one precompiled struct per frame and the payload
# is written straight from the caller's buffer; scapy would take ~50 us a packet.
#
# Timestamps advance as if the link ran at `bits_per_second`, so rates computed from
# the capture are plausible. TCP checksums are left zero (as on a sender with
# checksum offload); IPv4 header checksums are correct.

_REC = struct.Struct("<IIII")  # pcap record header (nanosecond timestamps)
# Ethernet (dst, src, type), IPv4 without options, TCP without options
_HEADERS = struct.Struct("!6s6sHBBHHHBBH4s4sHHIIBBHHH")
HEADERS_LEN = _HEADERS.size  # 54


def _fold(total: int) -> int:
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


class TcpPcapWriter:
    """client -> server stream writer; call send() any number of times, then close()."""

    def __init__(self, out: BinaryIO, *, mss: int = 1448, client: tuple[str, int] = (
        "192.0.2.1", 49152), server: tuple[str, int] = ("192.0.2.2", 4444),
                 bits_per_second: float = 10e9, start_time: float = 1_700_000_000.0,
                 ack_every: int = 2) -> None:
        self.out = out
        self.mss = mss
        self.ack_every = ack_every
        self._src = bytes(int(x) for x in client[0].split("."))
        self._dst = bytes(int(x) for x in server[0].split("."))
        self._sport, self._dport = client[1], server[1]
        self._mac_c = b"\x02\x00\x00\x00\x00\x01"
        self._mac_s = b"\x02\x00\x00\x00\x00\x02"
        self._ns_per_byte = 8e9 / bits_per_second
        self._time_ns = int(start_time * 1e9)
        self._c_seq = 0x10000000  # client ISN
        self._s_seq = 0xF0000000  # server ISN: the client's ACKs wrap past 2**32
        self._ip_id = 0
        self._unacked = 0
        self._pending = bytearray()
        # Constant part of the IPv4 header checksum (version/IHL, flags, TTL/proto, addresses).
        words = 0x4500 + 0x4000 + (64 << 8 | 6)
        for addr in (self._src, self._dst):
            words += (addr[0] << 8 | addr[1]) + (addr[2] << 8 | addr[3])
        self._csum_base = words
        self.frames = 0
        out.write(pcap_bytes([], nano=True, snaplen=SNAPLEN))
        self._frame(True, SYN, b"")
        self._c_seq += 1
        self._frame(False, SYN | ACK, b"")
        self._s_seq += 1
        self._frame(True, ACK, b"")

    def _frame(self, from_client: bool, flags: int,
               payload: bytes | bytearray | memoryview) -> None:
        n = len(payload)
        total = 40 + n
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        csum = 0xFFFF - _fold(self._csum_base + total + self._ip_id)
        if from_client:
            macs = (self._mac_s, self._mac_c)
            addrs = (self._src, self._dst)
            ports = (self._sport, self._dport)
            seq, ack = self._c_seq, self._s_seq
        else:
            macs = (self._mac_c, self._mac_s)
            addrs = (self._dst, self._src)
            ports = (self._dport, self._sport)
            seq, ack = self._s_seq, self._c_seq
        if flags & SYN and not flags & ACK:
            ack = 0
        self._time_ns += int((total + 14) * self._ns_per_byte) + 100
        t = self._time_ns
        caplen = 14 + total
        # IPv4 total length wraps above 64 KiB exactly like Linux loopback GSO frames do.
        self.out.write(_REC.pack(t // 1_000_000_000, t % 1_000_000_000, caplen, caplen)
                       + _HEADERS.pack(macs[0], macs[1], 0x0800, 0x45, 0, total & 0xFFFF,
                                       self._ip_id, 0x4000, 64, 6, csum, addrs[0], addrs[1],
                                       ports[0], ports[1], seq & 0xFFFFFFFF,
                                       ack & 0xFFFFFFFF, 0x50, flags, 65535, 0, 0))
        if n:
            self.out.write(payload)
        self.frames += 1

    def send(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        pending = self._pending
        mss = self.mss
        if pending:
            take = mss - len(pending)
            pending += view[:take]
            view = view[take:]
            if len(pending) < mss:
                return
            self._segment(pending)
            pending.clear()
        full = len(view) - len(view) % mss
        for start in range(0, full, mss):
            self._segment(view[start : start + mss])
        pending += view[full:]

    def _segment(self, payload: bytes | bytearray | memoryview) -> None:
        self._frame(True, ACK | PSH, payload)
        self._c_seq += len(payload)
        self._unacked += 1
        if self._unacked >= self.ack_every:
            self._frame(False, ACK, b"")
            self._unacked = 0

    def close(self) -> None:
        if self._pending:
            self._segment(bytes(self._pending))
            self._pending.clear()
        self._frame(True, FIN | ACK, b"")
        self._c_seq += 1
        self._frame(False, FIN | ACK, b"")
        self._s_seq += 1
        self._frame(True, ACK, b"")
