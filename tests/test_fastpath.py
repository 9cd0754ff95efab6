"""The capture fast lane (analyzer.fastpath) gives exactly the general path's results."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import migshark.analyzer.analysis as analysis
from migshark.analyzer import speedups
from migshark.analyzer.analysis import analyze_path
from migshark.analyzer.capture import parse_frame
from testkit.synthetic import precopy_stream

SYN, FIN, RST, PSH, ACK = 0x02, 0x01, 0x04, 0x08, 0x10
_REC = struct.Struct("<IIII")
_ETH_IP_TCP = struct.Struct("!6s6sHBBHHHBBH4s4sHHIIBBHHH")


class Conn:
    """Frames of one TCP connection, both directions, with real sequence numbers."""

    def __init__(self, client: str, sport: int, server: str, dport: int) -> None:
        self.ends = {True: (bytes(map(int, client.split("."))), sport, 0x1000_0000),
                     False: (bytes(map(int, server.split("."))), dport, 0xFFFF_F000)}
        self.next = {True: 0x1000_0001, False: 0xFFFF_F001}

    def frame(self, from_client: bool, flags: int, payload: bytes = b"",
              seq: int | None = None, options: bytes = b"") -> bytes:
        src, sport, _ = self.ends[from_client]
        dst, dport, _ = self.ends[not from_client]
        if seq is None:
            seq = self.next[from_client]
        ack = self.next[not from_client] if flags & ACK else 0
        tcp_len = 20 + len(options)
        head = _ETH_IP_TCP.pack(b"\x02" * 6, b"\x04" * 6, 0x0800, 0x45, 0,
                                (20 + tcp_len + len(payload)) & 0xFFFF, 1, 0x4000, 64, 6, 0,
                                src, dst, sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                                (tcp_len // 4) << 4, flags, 65535, 0, 0)
        return head + options + payload

    def send(self, from_client: bool, payload: bytes, flags: int = ACK | PSH) -> bytes:
        out = self.frame(from_client, flags, payload)
        self.next[from_client] = (self.next[from_client] + len(payload)) & 0xFFFFFFFF
        return out

    def handshake(self) -> list[bytes]:
        out = [self.frame(True, SYN, seq=self.ends[True][2])]
        out.append(self.frame(False, SYN | ACK, seq=self.ends[False][2]))
        out.append(self.frame(True, ACK))
        return out


def write_pcap(path: Path, frames: list[bytes], cut: int = 0) -> Path:
    parts = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)]
    for i, frame in enumerate(frames):
        parts.append(_REC.pack(1_700_000_000 + i // 1000, (i % 1000) * 1000, len(frame),
                               len(frame)))
        parts.append(frame)
    data = b"".join(parts)
    path.write_bytes(data[: len(data) - cut])
    return path


def segments(stream: bytes, rng: random.Random) -> Iterator[bytes]:
    """Cut `stream` into sizes from tiny to GSO-large, as both capture kinds have them."""
    pos = 0
    while pos < len(stream):
        size = rng.choice((1, 7, 536, 1448, 1448, 1448, 20000, 65483))
        yield stream[pos : pos + size]
        pos += size


def migration_frames(conn: Conn, stream: bytes, seed: int, messy: bool) -> list[bytes]:
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


def both_ways(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    def general(reader: Any, demux: Any) -> None:
        for frame in reader:
            segment = parse_frame(frame.linktype, frame.data, frame.timestamp)
            if segment is not None:
                demux.segment(segment)

    fast = analyze_path(path).as_json()
    with monkeypatch.context() as patch:
        patch.setattr(speedups, "native", None)
        python_lane = analyze_path(path).as_json()
    assert fast == python_lane  # the C lane (when built) and the Python lane agree
    with monkeypatch.context() as patch:
        patch.setattr(analysis, "pump_capture", general)
        slow = analyze_path(path).as_json()
    return fast, slow


def bitmaps_of(result: dict[str, Any]) -> list[tuple[str, str | None]]:
    return [(b["name"], b["sha256"]) for b in result["bitmaps"]]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_clean_capture_matches_general_path_and_raw_decode(tmp_path, monkeypatch, seed):
    stream = precopy_stream(extra_pages=200)
    conn = Conn("10.0.0.1", 40000, "10.0.0.2", 4444)
    path = write_pcap(tmp_path / "clean.pcap", migration_frames(conn, stream, seed, False))
    fast, slow = both_ways(path, monkeypatch)
    assert fast == slow
    assert fast["migrations"][0]["stream_bytes"] == len(stream)
    raw = tmp_path / "stream.bin"
    raw.write_bytes(stream)
    expected = analyze_path(raw).as_json()
    assert bitmaps_of(fast) == bitmaps_of(expected)
    assert all(sha for _, sha in bitmaps_of(fast))
    assert fast["migrations"][0]["records"] == expected["migrations"][0]["records"]


@pytest.mark.parametrize("seed", [4, 5])
def test_retransmissions_reordering_and_return_path(tmp_path, monkeypatch, seed):
    conn = Conn("10.0.0.1", 40000, "10.0.0.2", 4444)
    frames = migration_frames(conn, precopy_stream(extra_pages=120), seed, True)
    fast, slow = both_ways(write_pcap(tmp_path / "messy.pcap", frames), monkeypatch)
    assert fast == slow
    assert all(sha for _, sha in bitmaps_of(fast))


def test_hole_reset_truncation_and_interleaved_flows(tmp_path, monkeypatch):
    stream = precopy_stream(extra_pages=60)
    a = migration_frames(Conn("10.0.0.1", 40000, "10.0.0.2", 4444), stream, 6, False)
    b_conn = Conn("10.0.0.3", 40001, "10.0.0.2", 4445)
    b = migration_frames(b_conn, stream, 7, False)
    # b loses a data segment in the middle (never retransmitted) and ends with a RST
    data_frames = [i for i, f in enumerate(b) if len(f) > 54]
    del b[data_frames[len(data_frames) // 2]]
    b = b[:-3] + [b_conn.frame(False, RST | ACK)]
    other = Conn("10.0.0.9", 5000, "10.0.0.8", 80)
    noise = other.handshake() + [other.send(True, b"GET / HTTP/1.0\r\n\r\n" * 50)
                                 for _ in range(30)]
    frames = []
    for i in range(max(len(a), len(b), len(noise))):
        for source in (a, b, noise):
            if i < len(source):
                frames.append(source[i])
    frames.append(a[5])  # an old duplicate after the end
    path = write_pcap(tmp_path / "mixed.pcap", frames, cut=10)
    fast, slow = both_ways(path, monkeypatch)
    assert fast == slow
    codes = {f["code"] for f in fast["findings"]}
    assert "capture-gap" in codes and "capture-truncated" in codes
    assert len(fast["migrations"]) == 2


def test_tcp_options_take_the_general_path(tmp_path, monkeypatch):
    conn = Conn("10.0.0.1", 40000, "10.0.0.2", 4444)
    frames = conn.handshake()
    stream = precopy_stream()
    for pos in range(0, len(stream), 1000):
        chunk = stream[pos : pos + 1000]
        # 12 bytes of timestamp options, as Linux sends them on a real network
        frames.append(conn.frame(True, ACK | PSH, chunk, options=b"\x01\x01\x08\x0a" + bytes(8)))
        conn.next[True] += len(chunk)
    fast, slow = both_ways(write_pcap(tmp_path / "opts.pcap", frames), monkeypatch)
    assert fast == slow
    assert fast["migrations"][0]["stream_bytes"] == len(stream)


def _block(kind: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    length = 12 + len(body)
    return struct.pack("<II", kind, length) + body + struct.pack("<I", length)


def write_pcapng(path: Path, frames: list[tuple[int, bytes]], cut: int = 0) -> Path:
    """frames: (interface, frame) pairs. Interface 0 is Ethernet in microseconds,
    interface 1 Ethernet in nanoseconds; a custom block every 40 packets."""
    shb = _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    nanos = struct.pack("<HHB3x", 9, 1, 9) + struct.pack("<HH", 0, 0)  # if_tsresol 10^-9
    parts = [shb, _block(1, struct.pack("<HHI", 1, 0, 262144)),
             _block(1, struct.pack("<HHI", 1, 0, 262144) + nanos)]
    for i, (interface, frame) in enumerate(frames):
        ticks = (1_700_000_000 * 10**6 + i * 1000) * (1000 if interface else 1)
        parts.append(_block(6, struct.pack("<IIIII", interface, ticks >> 32,
                                           ticks & 0xFFFFFFFF, len(frame), len(frame))
                            + frame))
        if i % 40 == 39:
            parts.append(_block(0x00000BAD, b"custom block the lane must step over"))
    data = b"".join(parts)
    path.write_bytes(data[: len(data) - cut])
    return path


@pytest.mark.parametrize("seed", [8, 9])
def test_pcapng_two_interfaces_match_general_path_and_pcap(tmp_path, monkeypatch, seed):
    """pcapng takes the C lane too (EPBs of the interface the migration is seen on);
    the other interface, custom blocks and a cut end go the general way."""
    stream = precopy_stream(extra_pages=100)
    frames = migration_frames(Conn("10.0.0.1", 40000, "10.0.0.2", 4444), stream, seed,
                              seed == 9)
    other = Conn("10.0.0.9", 5000, "10.0.0.8", 80)
    noise = other.handshake() + [other.send(True, b"x" * 700) for _ in range(60)]
    mixed = [(0, frame) for frame in frames]
    for i, frame in enumerate(noise):
        mixed.insert(3 + i * 7, (1, frame))
    fast, slow = both_ways(write_pcapng(tmp_path / "two.pcapng", mixed), monkeypatch)
    assert fast == slow
    pcap = analyze_path(write_pcap(tmp_path / "one.pcap", frames)).as_json()
    assert bitmaps_of(fast) == bitmaps_of(pcap) and all(sha for _, sha in bitmaps_of(fast))
    assert fast["migrations"][0]["stream_bytes"] == len(stream)
    cut_fast, cut_slow = both_ways(write_pcapng(tmp_path / "cut.pcapng", mixed, cut=300),
                                   monkeypatch)
    assert cut_fast == cut_slow
    assert "capture-truncated" in {f["code"] for f in cut_fast["findings"]}
