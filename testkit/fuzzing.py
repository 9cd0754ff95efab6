"""Seeds, mutations and invariants for fuzzing the analysis.

tests/test_fuzz_findings.py runs them with few examples for CI; bench/fuzz.py runs
the same properties for longer (and with atheris when it is installed), so both
check exactly the same thing.
"""

from __future__ import annotations

from functools import cache

from hypothesis import strategies as st

from migshark.analyzer.analysis import AnalysisOptions
from migshark.analyzer.records import Finding, Record
from migshark.dissectors import grammar as g
from testkit import synthetic
from testkit.crafted import CHUNK_BITS, FULL_CHUNK, F, finish_ok, run, started
from testkit.paths import CAPTURES

HUGE_VALUES = (0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFFFFFFFFFF, 1 << 40, 10 * 1024 + 1, 0)


def crafted_seed() -> bytes:
    s = started()
    s.record(F.BITS, first_sector=0, sector_count=FULL_CHUNK, buffer=CHUNK_BITS)
    s.record(F.BITS | F.ZEROES, first_sector=FULL_CHUNK, sector_count=FULL_CHUNK)
    s.record(F.COMPLETE, flags_width=2)
    s.record(F.START, bitmap_name="b1", granularity=512, bitmap_flags=3)
    s.record(F.BITS, bitmap_name="b1", first_sector=0, sector_count=100, buffer=bytes(32))
    s.record(F.COMPLETE)
    finish_ok(s)
    return s.data()


def real_bitmap_seed(raw: bytes) -> bytes | None:
    """Header + the dirty-bitmap setup section + its completion section, cut out of a
    real raw stream by their framing bytes (a few KiB instead of a whole migration)."""
    name = b"\x0cdirty-bitmap"
    at = raw.find(name)
    if at < 5:
        return None
    section_id = raw[at - 4 : at]
    setup_start = at - 5
    footer = b"\x7e" + section_id
    setup_end = raw.find(footer, at)
    end_start = raw.rfind(b"\x03" + section_id)
    if setup_end < 0 or end_start < setup_end:
        return None
    end_end = raw.find(footer, end_start)
    if end_end < 0:
        return None
    return (raw[:8] + raw[setup_start : setup_end + 5] + raw[end_start : end_end + 5]
            + g.build_eof())


@cache
def seeds() -> tuple[bytes, ...]:
    out = [crafted_seed(), synthetic.precopy_stream()]
    raw_path = CAPTURES / "real" / "exec.bin"
    if raw_path.exists():
        seed = real_bitmap_seed(raw_path.read_bytes())
        if seed is not None:
            out.append(seed)
    return tuple(out)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "huge", "byte"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip":
            if data:
                data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            if data:
                data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 32))]
        elif op == "truncate":
            del data[pos:]
        else:
            width = draw(st.sampled_from([2, 4, 8]))
            value = draw(st.sampled_from(HUGE_VALUES)) & ((1 << (8 * width)) - 1)
            data[pos : pos + width] = value.to_bytes(width, "big")
    return bytes(data)


def check_invariants(data: bytes, options: AnalysisOptions | None = None,
                     chunk: int | None = None) -> tuple[list[Record], list[Finding]]:
    records, found = run(data, options, chunk)
    size = len(data)
    for record in records:
        assert 0 <= record.offset <= record.end <= size, (record.kind, record.offset,
                                                          record.length, size)
    for finding in found:
        assert 0 <= finding.offset <= size, (finding.code, finding.offset, size)
        assert finding.offset + finding.length <= size, (finding.code, finding.offset,
                                                         finding.length, size)
    return records, found
