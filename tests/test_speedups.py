"""The C hot loops (analyzer/_speedups.c) against the Python loops they replace.

tests/test_fastpath.py compares whole captures three ways (C lane, Python lane,
general path); here: every bundled capture, the decoder under any chunking, and the
C functions' own guards against bad arguments and cut input.
"""

from __future__ import annotations

import array
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migshark.analyzer import speedups
from migshark.analyzer.analysis import InputError, analyze_path
from migshark.analyzer.decoder import StreamDecoder
from testkit.events import decode_pieces, pieces_at, without_c
from testkit.require import require
from testkit.synthetic import precopy_stream

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = sorted(p for p in (ROOT / "captures").glob("*/*") if p.suffix in (".pcap", ".pcapng",
                                                                              ".bin"))
RAM_STREAM = precopy_stream(extra_pages=180)


_NOT_BUILT = "migshark.analyzer._speedups was not built (no C compiler or Python headers)"


@pytest.fixture
def native() -> Any:
    require(speedups.native is not None, _NOT_BUILT)
    return speedups.native


def test_the_extension_is_built_and_used(native):
    assert native.__name__ == "migshark.analyzer._speedups"
    assert speedups.native is native


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_bundled_captures_give_equal_results(native, monkeypatch, path):
    with_c = analyze_path(path).as_json()
    monkeypatch.setattr(speedups, "native", None)
    assert analyze_path(path).as_json() == with_c


def _decode(stream: bytes, cuts: list[int]) -> list[tuple[Any, ...]]:
    events = decode_pieces(StreamDecoder(), pieces_at(stream, cuts))
    return [(e.offset, e.length, type(e).__name__, getattr(e, "kind", None),
             getattr(e, "code", None), getattr(e, "fields", None)) for e in events]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, len(RAM_STREAM)), max_size=40))
def test_decoder_under_any_chunking(cuts):
    require(speedups.native is not None, _NOT_BUILT)
    with_c = _decode(RAM_STREAM, cuts)
    assert without_c(lambda: _decode(RAM_STREAM, cuts)) == with_c
    kinds = [event[3] for event in with_c]
    assert "ram-pages" in kinds


def test_ram_walk_stops_at_other_shapes_and_cut_records(native):
    page_continue, zero_continue = 0x08 | 0x20, 0x02 | 0x20
    page = struct.pack(">Q", 0x1000 | page_continue) + b"\x11" * 4096
    zero = struct.pack(">Q", 0x2000 | zero_continue) + b"\x00"
    named = struct.pack(">Q", 0x3000 | 0x08) + b"\x03abc" + b"\x22" * 4096
    data = page + zero + zero + named
    assert native.ram_walk(data, 0, 0xFFF, 4096, page_continue, zero_continue) == (
        len(page) + 2 * len(zero), 1, 2, 0)
    # a page cut by the end: counted, the rest is to be skipped
    assert native.ram_walk(page[:100], 0, 0xFFF, 4096, page_continue, zero_continue) == (
        100, 1, 0, 4104 - 100)
    # a zero record without its fill byte, and a cut header: left for the caller
    assert native.ram_walk(zero[:8], 0, 0xFFF, 4096, page_continue, zero_continue) == (
        0, 0, 0, 0)
    assert native.ram_walk(page[:5], 0, 0xFFF, 4096, page_continue, zero_continue) == (
        0, 0, 0, 0)
    with pytest.raises(ValueError):
        native.ram_walk(data, -1, 0xFFF, 4096, page_continue, zero_continue)
    with pytest.raises(ValueError):
        native.ram_walk(data, 0, 0xFFF, 0, page_continue, zero_continue)


def _pcap_record(payload_len: int, caplen: int | None = None, seq: int = 1000) -> bytes:
    frame = (b"\x02" * 12 + b"\x08\x00\x45\x00" + struct.pack("!H", 40 + payload_len)
             + b"\x00\x01\x40\x00\x40\x06\x00\x00" + bytes([10, 0, 0, 1, 10, 0, 0, 2])
             + struct.pack("!HHII", 1, 2, seq, 0) + b"\x50\x10\xff\xff\x00\x00\x00\x00"
             + b"\xaa" * payload_len)
    return struct.pack("<IIII", 1, 2, len(frame) if caplen is None else caplen,
                       len(frame)) + frame


def _epb(record: bytes, interface: int = 0, blen_delta: int = 0) -> bytes:
    """The frame of a _pcap_record as a pcapng EPB (little-endian section)."""
    frame = record[16:]
    padded = frame + b"\0" * (-len(frame) % 4)
    blen = 32 + len(padded) + blen_delta
    return (struct.pack("<IIIIIII", 6, blen, interface, 0, 12345, len(frame), len(frame))
            + padded + struct.pack("<I", blen))


KEY = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack("!HH", 1, 2)


def _scan(native: Any, data: bytes, pcapng_iface: int = -1, seq: int = 1000,
          ack_keys: bytes = b"", ack_seqs: tuple[int, ...] = (), key: Any = KEY,
          skip_lanes: int = 0, seqs_out: array.array[int] | None = None) -> Any:
    seqs = array.array("I", ack_seqs) if seqs_out is None else seqs_out
    return native.scan_lane(data, 0, len(data), True, pcapng_iface, ack_keys, seqs,
                            skip_lanes, key, seq, 1 << 16, 1 << 14, None)


def test_scan_lane_hands_back_what_it_cannot_take(native):
    data = _pcap_record(100) + _pcap_record(0, seq=1100)  # data, then an in-order pure ACK
    status, off, last, seq, gathered, *_ = _scan(native, data)
    assert (status, off, last, seq) == (0, len(data), 116 + 54, 1100)
    assert gathered == b"\xaa" * 100
    # the next expected sequence number differs: the general path must see it
    assert _scan(native, data, seq=999)[:3] == (1, 0, -1)
    # a record that claims more bytes than the file has
    cut = _pcap_record(100, caplen=10_000)
    assert _scan(native, cut)[:2] == (1, 0)
    with pytest.raises(ValueError):  # a lane table that is not 12-byte keys
        _scan(native, data, ack_keys=b"x" * 13, ack_seqs=(1,))
    with pytest.raises(ValueError):  # keys and sequence numbers do not pair up
        _scan(native, data, ack_keys=KEY, key=None)
    with pytest.raises(ValueError):
        _scan(native, data, key=b"short")
    with pytest.raises(ValueError):  # more skip lanes than lanes
        _scan(native, data, ack_keys=KEY, ack_seqs=(1,), key=None, skip_lanes=2)


def test_scan_lane_declares_its_limits(native):
    """fastpath sizes its lane table from the module; one lane more is refused."""
    assert native.LANE_KEY_SIZE == len(KEY) == 12
    assert native.HEADERS_LEN == 48
    keys = [struct.pack("!IIHH", 1, i, 1, 2) for i in range(native.MAX_LANES + 1)]
    data = _pcap_record(0, seq=7)
    assert _scan(native, data, ack_keys=b"".join(keys[:-1]),
                 ack_seqs=(0,) * native.MAX_LANES, key=None)[0] == 1
    with pytest.raises(ValueError):
        _scan(native, data, ack_keys=b"".join(keys), ack_seqs=(0,) * len(keys), key=None)


def test_scan_lane_skip_lanes_drop_data_and_advance_their_sequence(native):
    data = _pcap_record(100) + _pcap_record(50, seq=1100) + _pcap_record(10, seq=2000)
    seqs = array.array("I", [1000])
    status, off, last, *rest = _scan(native, data, ack_keys=KEY, key=None, skip_lanes=1,
                                     seqs_out=seqs)
    # two in-order segments skipped, the third is out of order: handed back
    assert (status, off, rest[-2]) == (1, len(_pcap_record(100)) + len(_pcap_record(50)), 2)
    assert seqs[0] == 1150 and rest[-1] == [0]  # lane 0 moved
    # the same lane as an ACK-only lane: its data is for the general path at once
    seqs = array.array("I", [1000])
    assert _scan(native, data, ack_keys=KEY, key=None, seqs_out=seqs)[:2] == (1, 0)
    assert seqs[0] == 1000


def test_scan_lane_reads_pcapng_epbs_of_its_interface_only(native):
    first, ack = _pcap_record(101), _pcap_record(0, seq=1101)
    data = _epb(first) + _epb(ack)
    status, off, last, seq, gathered, gsec, gfrac, *_ = _scan(native, data, pcapng_iface=0)
    assert (status, off, last, seq) == (0, len(data), len(_epb(first)), 1101)
    assert gathered == b"\xaa" * 101 and (gsec, gfrac) == (0, 12345)
    # another interface's EPB, a block of another type, a bad trailer, a packet
    # longer than its block: all left to the general path
    for block in (_epb(first, interface=1), b"\x05" + _epb(first)[1:],
                  _epb(first)[:-4] + b"\0\0\0\0", _epb(first, blen_delta=-4)):
        assert _scan(native, block + data, pcapng_iface=0)[:3] == (1, 0, -1)
    assert _scan(native, data[:40], pcapng_iface=0)[:2] == (1, 0)  # cut short


class _NeverKeeps(dict):
    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def test_fixed_bitmap_heads_read_like_the_grammar(monkeypatch):
    """BITS heads read with the learned fixed layouts equal the grammar's parse."""
    import migshark.analyzer.decode.sections.dirty_bitmap as decoder

    stream = precopy_stream()
    cuts = list(range(0, len(stream), 997))
    decoder._FIXED_HEADS.clear()
    learned = _decode(stream, cuts)
    assert decoder._FIXED_HEADS  # the stream's nameless BITS heads were learned
    reused = _decode(stream, cuts)
    monkeypatch.setattr(decoder, "_FIXED_HEADS", _NeverKeeps())
    assert _decode(stream, cuts) == learned == reused
    assert sum(1 for event in learned if event[3] == "bitmap-bits") >= 4


_MUTATION_BASES: dict[str, bytes] = {}


def _mutation_base(suffix: str = ".pcap") -> bytes:
    """A small RAM-heavy capture with ACKs both ways, as pcap or pcapng bytes."""
    if suffix not in _MUTATION_BASES:
        import tempfile

        from testkit.pcapfiles import write_pcap, write_pcapng
        from testkit.tcpflows import Conn, migration_frames

        frames = migration_frames(Conn("10.0.0.1", 40000, "10.0.0.2", 4444),
                                  precopy_stream(extra_pages=40), 11, True)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"base{suffix}"
            if suffix == ".pcap":
                write_pcap(path, frames)
            else:
                write_pcapng(path, [(0, frame) for frame in frames])
            _MUTATION_BASES[suffix] = path.read_bytes()
    return _MUTATION_BASES[suffix]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(24, 400_000), st.integers(0, 255)), min_size=1,
                max_size=6),
       st.integers(0, 2000), st.sampled_from([".pcap", ".pcapng"]))
def test_mutated_captures_equal_with_and_without_c(tmp_path_factory, flips, cut, suffix):
    """Hostile captures (flipped bytes anywhere, a cut end) give the same results,
    findings and errors included, either way."""
    require(speedups.native is not None, _NOT_BUILT)
    data = bytearray(_mutation_base(suffix))
    for at, value in flips:
        data[at % len(data)] = value
    path = tmp_path_factory.mktemp("mut") / f"m{suffix}"
    path.write_bytes(bytes(data[: len(data) - cut]))
    with_c = _outcome(path)
    assert without_c(lambda: _outcome(path)) == with_c


def _outcome(path: Path) -> Any:
    try:
        return analyze_path(path).as_json()
    except InputError as error:  # e.g. the flips destroyed the stream's magic
        return f"input error: {error}"


def test_pure_python_switch_turns_the_extension_off(native):
    import os
    import subprocess
    import sys

    probe = "from migshark.analyzer import speedups; print(speedups.native is None)"
    env = dict(os.environ, MIGSHARK_PURE_PYTHON="1")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, text=True,
                         capture_output=True, check=True).stdout
    assert out.strip() == "True"
    env.pop("MIGSHARK_PURE_PYTHON")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, text=True,
                         capture_output=True, check=True).stdout
    assert out.strip() == "False"
