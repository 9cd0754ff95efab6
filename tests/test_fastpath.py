"""The capture fast lane (analyzer.fastpath) gives exactly the general path's results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import migshark.analyzer.analysis as analysis
from migshark.analyzer import speedups
from migshark.analyzer.analysis import analyze_path
from migshark.analyzer.capture import parse_frame
from testkit.pcapfiles import write_pcap, write_pcapng
from testkit.synthetic import precopy_stream
from testkit.tcpflows import ACK, PSH, RST, Conn, migration_frames


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
