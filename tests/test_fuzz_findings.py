"""Robustness: mutated streams never crash the analysis or make it lie about bytes.

Hypothesis mutates real and generated streams (bit flips, insertions, deletions,
truncations, huge length fields) and checks that no exception escapes, that no
record claims bytes past the data fed, that every record and finding offset lies
within the stream, and that hostile lengths do not turn into big allocations.
The example count is kept small for CI; bench/fuzz.py runs the same properties
(testkit/fuzzing.py) for longer.
"""

from __future__ import annotations

import struct
import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migshark.analyzer.analysis import AnalysisOptions
from migshark.analyzer.bitmaps import BitmapState, DestinationContext, Dialect
from migshark.dissectors import grammar as g
from testkit.crafted import FULL_CHUNK, GRAN, F, StreamBuilder, finish_ok, started
from testkit.fuzzing import check_invariants, mutated, real_bitmap_seed
from testkit.paths import CAPTURES

DESTINATION = DestinationContext(nodes={"drive0"}, bitmaps={("drive0", "b1"): 512},
                                 sizes={"drive0": 1 << 30})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_streams_keep_the_invariants(data: bytes) -> None:
    check_invariants(data)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.integers(1, 4096))
def test_mutated_streams_fed_in_pieces_give_the_same_findings(data: bytes, chunk: int) -> None:
    whole = check_invariants(data)[1]
    pieces = check_invariants(data, chunk=chunk)[1]
    assert [(f.code, f.offset) for f in whole] == [(f.code, f.offset) for f in pieces]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.sampled_from(list(Dialect)))
def test_mutated_streams_with_a_destination(data: bytes, dialect: Dialect) -> None:
    check_invariants(data, AnalysisOptions(destination=DESTINATION, dialect=dialect))


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_after_a_valid_header(tail: bytes) -> None:
    check_invariants(g.build_file_header() + tail)


# --- hostile lengths ---------------------------------------------------------------


def _bits_head(buffer_size: int) -> bytes:
    """A BITS record head whose buffer never follows (the builder insists it does)."""
    return bytes([F.BITS]) + struct.pack(">QIQ", 0, FULL_CHUNK, buffer_size)


def _hostile_streams() -> dict[str, bytes]:
    streams: dict[str, bytes] = {}
    # A BITS buffer size near 2^64: never allocated, never waited for.
    s = started()
    s.add(_bits_head((1 << 64) - 1))
    s.add(bytes(64))
    streams["bits-2^64"] = s.data()
    # A 60 MiB buffer (QEMU refuses it; we skip it as it arrives without keeping it).
    s = started()
    s.add(_bits_head(60 << 20))
    s.add(bytes(4096))
    streams["bits-60MiB"] = s.data()
    # VMDESCRIPTION, CONFIGURATION and PACKAGED lengths of 4 GiB.
    streams["vmdesc-4GiB"] = (g.build_file_header() + g.build_eof() + b"\x06"
                              + struct.pack(">I", 0xFFFFFFFF) + b"{" * 100)
    streams["configuration-4GiB"] = (g.build_file_header() + b"\x07"
                                     + struct.pack(">I", 0xFFFFFFFF) + b"pc" * 100)
    streams["packaged-4GiB"] = (g.build_file_header()
                                + g.build_command(g.Command.PACKAGED,
                                                  struct.pack(">I", 0xFFFFFFFF)) + bytes(100))
    # BITS for 300 bitmaps at the far end of a 2^64-sector disk, 8 bytes of bits each.
    s = StreamBuilder()
    s.section()
    for index in range(300):
        s.record(F.START, device_name="d", bitmap_name=f"b{index}", granularity=512,
                 bitmap_flags=1)
        s.record(F.BITS, first_sector=(1 << 63) - 4096 * (index + 1), sector_count=64,
                 buffer=b"\xff" * 8)
        s.record(F.BITS | F.ZEROES, first_sector=0, sector_count=0xFFFFFFFF)
        s.record(F.COMPLETE)
    finish_ok(s)
    streams["far-bits"] = s.data()
    # One ZEROES record claiming 2^32 sectors, then COMPLETE: "covered", 512 MiB of words
    # if anyone materialised them.
    s = started(granularity=512)
    s.record(F.BITS | F.ZEROES, first_sector=0, sector_count=0xFFFFFFFF)
    s.record(F.COMPLETE)
    finish_ok(s)
    streams["zeroes-2^32-sectors"] = s.data()
    return streams


def test_hostile_lengths_do_not_allocate() -> None:
    for name, data in _hostile_streams().items():
        tracemalloc.start()
        try:
            records, found = check_invariants(data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # The bound: the stream itself a few times over plus a fixed allowance.
        assert peak < 8 * len(data) + (8 << 20), (name, peak, len(data))
        assert found, name


def test_a_huge_bitmap_is_reported_not_hashed() -> None:
    data = _hostile_streams()["zeroes-2^32-sectors"]
    from migshark.analyzer.analysis import MigrationStream

    stream = MigrationStream("t", AnalysisOptions())
    stream.feed(data)
    stream.finish()
    (bitmap,) = stream.result()["bitmaps"]
    assert bitmap["sha256"] is None
    assert "larger than" in bitmap["reason"]


def test_many_scattered_chunks_stay_fast() -> None:
    """Coverage merging is not quadratic: 100000 disjoint chunks, then one that joins
    them all, in well under a second (a linear merge per chunk takes minutes)."""
    import time

    state = BitmapState(node="d", name="b", first_offset=0)
    began = time.perf_counter()
    for index in range(100000):
        assert not state.add_coverage(index * 3 * 8192, index * 3 * 8192 + 8192)
    assert state.add_coverage(0, 300000 * 8192)
    assert state.coverage == [[0, 300000 * 8192]]
    assert time.perf_counter() - began < 5


def test_real_seed_is_used_when_a_real_capture_exists() -> None:
    raw_path = CAPTURES / "real" / "exec.bin"
    if not raw_path.exists():
        return
    seed = real_bitmap_seed(raw_path.read_bytes())
    assert seed is not None
    records, found = check_invariants(seed)
    assert any(r.kind == "bitmap-bits" for r in records)
    assert [f.code for f in found if f.severity > 1] == []
    assert GRAN  # the crafted seed's granularity is the support module's default
