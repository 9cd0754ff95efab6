"""One crafted stream per finding code: exact code, severity and byte offset.

Each stream is built through the grammar builders; `StreamBuilder.add` returns the
offset where each piece lands, so the expected offsets are not counted by hand.
"""

from __future__ import annotations

import pytest

from migshark.analyzer import findings
from migshark.analyzer.analysis import AnalysisOptions, MigrationStream
from migshark.analyzer.bitmaps import DestinationContext, Dialect
from migshark.analyzer.mapping import parse_mapping
from migshark.analyzer.records import Finding, Severity
from migshark.dissectors import grammar as g
from testkit.crafted import (
    BITMAP_ID,
    CHUNK_BITS,
    DEVICE_ID,
    FULL_CHUNK,
    GRAN,
    F,
    StreamBuilder,
    codes,
    findings_of,
    finish_ok,
    run,
    started,
)

E, W, N = Severity.ERROR, Severity.WARNING, Severity.NOTE


def only(found: list[Finding], code: str) -> Finding:
    matching = [f for f in found if f.code == code]
    assert len(matching) == 1, f"expected one {code}, got {[(f.code, f.offset) for f in found]}"
    return matching[0]


def assert_finding(found: list[Finding], code: str, severity: Severity, offset: int) -> Finding:
    finding = only(found, code)
    assert (finding.severity, finding.offset) == (severity, offset), finding
    assert findings.CATALOGUE[code].severity == severity
    return finding


def bits(s: StreamBuilder, first: int = 0, count: int = FULL_CHUNK, **extra: object) -> int:
    extra.setdefault("buffer", CHUNK_BITS)
    return s.record(F.BITS, first_sector=first, sector_count=count, **extra)


def test_a_clean_stream_has_no_problems() -> None:
    s = started()
    bits(s)
    s.record(F.COMPLETE)
    finish_ok(s)
    found = findings_of(s.data())
    assert [f for f in found if f.severity > N] == []
    assert [f.message for f in found if f.code == "phase"] == [
        "migration phase: setup", "migration phase: completion"]


# --- stream framing -------------------------------------------------------------


def test_bad_magic() -> None:
    data = b"QEVX" + g.build_file_header()[4:] + g.build_eof()
    assert_finding(findings_of(data), "bad-magic", E, 0)


def test_bad_version() -> None:
    s = StreamBuilder(header=False)
    s.add(g.build_file_header(version=2))
    s.eof()
    assert_finding(findings_of(s.data()), "bad-version", E, 4)


def test_unknown_item_then_resynchronised() -> None:
    s = started()
    finish_ok_offset = s.eos()
    s.footer()
    bad = s.add(b"\x42\x99\x99")
    s.section(g.ItemType.SECTION_END)
    finish_ok(s)
    found = findings_of(s.data())
    assert finish_ok_offset < bad
    assert_finding(found, "unknown-item", E, bad)
    note = assert_finding(found, "resynchronised", N, bad)
    assert note.length == 3


def test_truncated_inside_a_bits_record() -> None:
    s = started()
    record = bits(s)
    data = s.data()[:-10]
    found = findings_of(data)
    finding = assert_finding(found, "truncated", E, record)
    assert finding.length == len(data) - record


def test_footer_mismatch() -> None:
    s = started()
    s.eos()
    footer = s.footer(section_id=BITMAP_ID + 1)
    s.eof()
    assert_finding(findings_of(s.data()), "footer-mismatch", E, footer)


def test_bad_section_version() -> None:
    s = StreamBuilder()
    section = s.section(version=2)
    finish_ok(s)
    assert_finding(findings_of(s.data()), "bad-section-version", E, section)


# --- missing EOS: at the footer, the next item, the end of data ---------------------


def test_missing_eos_at_footer() -> None:
    s = started()
    bits(s)
    s.record(F.COMPLETE)
    footer = s.footer()
    s.eof()
    found = findings_of(s.data())
    assert_finding(found, "missing-eos", E, footer)
    assert "footer" in only(found, "missing-eos").message
    assert "footer-mismatch" not in codes(found)


def test_missing_eos_at_next_item() -> None:
    s = started()
    s.record(F.COMPLETE)
    device = s.add(g.build_section_start(g.ItemType.SECTION_FULL, DEVICE_ID, "timer", 0, 1))
    s.add(bytes(8))
    s.footer(DEVICE_ID)
    s.eof()
    found = findings_of(s.data())
    assert_finding(found, "missing-eos", E, device)
    assert "next item" in only(found, "missing-eos").message


def test_missing_eos_at_end_of_data() -> None:
    s = started()
    s.record(F.COMPLETE)
    data = s.data()
    found = findings_of(data)
    assert_finding(found, "missing-eos", E, len(data))
    assert "end of data" in only(found, "missing-eos").message


# --- names, nodes and bitmaps -----------------------------------------------------


def test_no_device_name() -> None:
    s = StreamBuilder()
    s.section()
    record = s.record(F.START, bitmap_name="b0", granularity=GRAN, bitmap_flags=0)
    finish_ok(s)
    assert_finding(findings_of(s.data()), "no-device-name", E, record)


def test_no_bitmap_name() -> None:
    s = StreamBuilder()
    s.section()
    record = s.record(F.START, device_name="drive0", granularity=GRAN, bitmap_flags=0)
    finish_ok(s)
    assert_finding(findings_of(s.data()), "no-bitmap-name", E, record)


def test_a_bare_eos_needs_no_names_but_eos_with_zeroes_does() -> None:
    # QEMU: nothing = flags == (flags & EOS); only such a record skips the name checks.
    s = StreamBuilder()
    s.section()
    s.eos()
    s.footer()
    s.section(g.ItemType.SECTION_PART)
    s.record(0)  # no flags at all: also "nothing"
    s.eos()
    s.footer()
    s.section(g.ItemType.SECTION_END)
    odd = s.record(F.EOS | F.ZEROES)
    s.footer()
    s.eof()
    found = findings_of(s.data())
    assert_finding(found, "no-device-name", E, odd)
    assert "no-bitmap-name" not in codes(found)


def test_unknown_bitmap_for_bits_without_start() -> None:
    s = StreamBuilder()
    s.section(g.ItemType.SECTION_START)
    record = s.record(F.BITS, device_name="drive0", bitmap_name="ghost", first_sector=0,
                      sector_count=FULL_CHUNK, buffer=CHUNK_BITS)
    bits(s, FULL_CHUNK)  # the same unknown bitmap again: reported once, like QEMU
    finish_ok(s)
    assert_finding(findings_of(s.data()), "unknown-bitmap", E, record)


def test_unknown_bitmap_for_complete_when_the_destination_lacks_it() -> None:
    s = StreamBuilder()
    s.section()
    record = s.record(F.COMPLETE, device_name="drive0", bitmap_name="ghost")
    finish_ok(s)
    destination = DestinationContext(nodes={"drive0"})
    found = findings_of(s.data(), AnalysisOptions(destination=destination))
    assert_finding(found, "unknown-bitmap", E, record)
    assert "complete-without-start" not in codes(found)


def test_unknown_bitmap_names_the_node_as_qemu_does() -> None:
    s = StreamBuilder()
    s.section()
    record = s.record(F.COMPLETE, device_name="drive0", bitmap_name="ghost")
    finish_ok(s)
    destination = DestinationContext(nodes={"disk0"}, devices={"drive0": "disk0"})
    found = findings_of(s.data(), AnalysisOptions(destination=destination))
    finding = assert_finding(found, "unknown-bitmap", E, record)
    assert "Error: unknown dirty bitmap 'ghost' for block device 'disk0'" in finding.message


def test_complete_without_start() -> None:
    s = StreamBuilder()
    s.section()
    record = s.record(F.COMPLETE, device_name="drive0", bitmap_name="ghost")
    finish_ok(s)
    assert_finding(findings_of(s.data()), "complete-without-start", E, record)


def test_unknown_node_against_the_destination() -> None:
    s = StreamBuilder()
    s.section()
    record = s.record(F.START, device_name="nosuch", bitmap_name="b0", granularity=GRAN,
                      bitmap_flags=1)
    finish_ok(s)
    destination = DestinationContext(nodes={"disk0"}, devices={"drive0": "disk0"})
    found = findings_of(s.data(), AnalysisOptions(destination=destination))
    finding = assert_finding(found, "unknown-node", E, record)
    assert "Cannot find device='nosuch' nor node-name='nosuch'" in finding.message


def test_an_unknown_node_is_not_also_an_unknown_bitmap() -> None:
    s = StreamBuilder()
    s.section()
    record = s.record(F.BITS, device_name="nosuch", bitmap_name="b0", first_sector=0,
                      sector_count=FULL_CHUNK, buffer=CHUNK_BITS)
    s.record(F.COMPLETE)
    finish_ok(s)
    destination = DestinationContext(nodes={"disk0"})
    found = findings_of(s.data(), AnalysisOptions(destination=destination))
    assert [(f.code, f.offset) for f in found if f.severity > N] == [("unknown-node", record)]


def test_a_device_name_resolves_to_its_root_node() -> None:
    s = started(node="drive0")
    finish_ok(s)
    destination = DestinationContext(nodes={"disk0"}, devices={"drive0": "disk0"})
    found = findings_of(s.data(), AnalysisOptions(destination=destination))
    assert "unknown-node" not in codes(found)


MAPPING = [{"node-name": "disk-a", "alias": "alias-node-0",
            "bitmaps": [{"name": "bitmap-a1", "alias": "bx"}]}]


def test_unknown_node_alias_with_a_mapping() -> None:
    s = StreamBuilder()
    s.section()
    record = s.record(F.START, device_name="disk-a", bitmap_name="bx", granularity=GRAN,
                      bitmap_flags=1)
    finish_ok(s)
    found = findings_of(s.data(), AnalysisOptions(mapping=parse_mapping(MAPPING)))
    finding = assert_finding(found, "unknown-node", E, record)
    assert "Unknown node alias 'disk-a'" in finding.message


def test_unknown_bitmap_alias_with_a_mapping() -> None:
    s = StreamBuilder()
    s.section()
    s.record(F.START, device_name="alias-node-0", bitmap_name="bx", granularity=GRAN,
             bitmap_flags=1)
    record = s.record(F.START, bitmap_name="bitmap-a1", granularity=GRAN, bitmap_flags=1)
    finish_ok(s)
    found = findings_of(s.data(), AnalysisOptions(mapping=parse_mapping(MAPPING)))
    finding = assert_finding(found, "unknown-bitmap", E, record)
    assert "Unknown bitmap alias 'bitmap-a1' on node 'disk-a'" in finding.message


def test_a_mapped_bitmap_is_checked_under_its_real_name() -> None:
    s = started(node="alias-node-0", name="bx")
    finish_ok(s)
    destination = DestinationContext(nodes={"disk-a"}, bitmaps={("disk-a", "bitmap-a1"): GRAN})
    options = AnalysisOptions(mapping=parse_mapping(MAPPING), destination=destination)
    records, found = run(s.data(), options)
    start = next(r for r in records if r.kind == "bitmap-start")
    assert_finding(found, "bitmap-exists", E, start.offset)
    assert "unknown-node" not in codes(found)


def test_bitmap_exists_on_the_destination() -> None:
    s = StreamBuilder()
    s.section()
    record = s.record(F.START, device_name="drive0", bitmap_name="b0", granularity=GRAN,
                      bitmap_flags=1)
    finish_ok(s)
    destination = DestinationContext(nodes={"drive0"}, bitmaps={("drive0", "b0"): GRAN})
    found = findings_of(s.data(), AnalysisOptions(destination=destination))
    assert_finding(found, "bitmap-exists", E, record)


def test_bitmap_exists_for_a_second_start_in_the_stream() -> None:
    s = StreamBuilder()
    s.section()
    s.record(F.START, device_name="drive0", bitmap_name="b0", granularity=GRAN, bitmap_flags=1)
    again = s.record(F.START, bitmap_name="b0", granularity=GRAN, bitmap_flags=1)
    finish_ok(s)
    assert_finding(findings_of(s.data()), "bitmap-exists", E, again)


# --- START contents ---------------------------------------------------------------


@pytest.mark.parametrize("granularity", [1000, 256, 0, 3 << 20])
def test_invalid_granularity(granularity: int) -> None:
    s = StreamBuilder()
    s.section()
    record = s.record(F.START, device_name="drive0", bitmap_name="b0",
                      granularity=granularity, bitmap_flags=1)
    finish_ok(s)
    assert_finding(findings_of(s.data()), "invalid-granularity", E, record)


@pytest.mark.parametrize("granularity", [512, 1 << 31])
def test_extreme_valid_granularities(granularity: int) -> None:
    s = StreamBuilder()
    s.section()
    s.record(F.START, device_name="drive0", bitmap_name="b0", granularity=granularity,
             bitmap_flags=1)
    finish_ok(s)
    assert "invalid-granularity" not in codes(findings_of(s.data()))


def test_reserved_start_flags() -> None:
    s = StreamBuilder()
    s.section()
    record = s.record(F.START, device_name="drive0", bitmap_name="b0", granularity=GRAN,
                      bitmap_flags=0x09)
    finish_ok(s)
    finding = assert_finding(findings_of(s.data()), "reserved-start-flags", E, record)
    assert "Unknown flags in migrated dirty bitmap header: 9" in finding.message


def test_autoload_flag() -> None:
    s = StreamBuilder()
    s.section()
    record = s.record(F.START, device_name="drive0", bitmap_name="b0", granularity=GRAN,
                      bitmap_flags=0x05)
    finish_ok(s)
    found = findings_of(s.data())
    assert_finding(found, "autoload-flag", N, record)
    assert "reserved-start-flags" not in codes(found)


# --- BITS contents ------------------------------------------------------------------


def test_buffer_too_large() -> None:
    s = started()
    record = bits(s, buffer=bytes(g.BITMAP_MAX_BUFFER_SIZE + 1))
    s.record(F.COMPLETE)
    finish_ok(s)
    found = findings_of(s.data())
    assert_finding(found, "buffer-too-large", E, record)
    # QEMU fails before it compares the size with the granularity.
    assert "granularity-mismatch" not in codes(found)
    # The buffer is skipped, not desynchronising: the stream still ends cleanly.
    assert {"truncated", "missing-eos", "resynchronised"}.isdisjoint(codes(found))


@pytest.mark.parametrize(("count", "size", "mismatch"), [
    (FULL_CHUNK, 1024, False),  # exactly needed
    (FULL_CHUNK, 1016, True),  # needed > size
    (FULL_CHUNK, 1056, True),  # size > align_up(needed, 32)
    (128 * 3, 32, False),  # 3 granules: one word, padded to 32 bytes like the sender
    (128 * 3, 8, False),
    (128 * 3, 40, True),
    (0, 0, False),  # an empty range needs nothing
    (0, 8, True),  # ... and accepts nothing
])
def test_granularity_mismatch_is_the_loaders_buffer_size_check(count: int, size: int,
                                                              mismatch: bool) -> None:
    s = started()
    record = bits(s, count=count, buffer=bytes(size))
    s.record(F.COMPLETE)
    finish_ok(s)
    found = findings_of(s.data())
    if mismatch:
        assert_finding(found, "granularity-mismatch", E, record)
    else:
        assert "granularity-mismatch" not in codes(found)


def test_bits_after_complete() -> None:
    s = started()
    bits(s)
    s.record(F.COMPLETE)
    late = bits(s)
    finish_ok(s)
    found = findings_of(s.data())
    assert_finding(found, "bits-after-complete", E, late)
    assert_finding(found, "overlapping-chunks", W, late)


def test_incomplete_bitmap() -> None:
    s = StreamBuilder()
    s.section()
    start = s.record(F.START, device_name="drive0", bitmap_name="b0", granularity=GRAN,
                     bitmap_flags=1)
    finish_ok(s)
    assert_finding(findings_of(s.data()), "incomplete-bitmap", E, start)


def test_coverage_gap() -> None:
    s = started()
    bits(s, 0)
    bits(s, 2 * FULL_CHUNK, 100)  # the short last chunk; chunk 1 never arrives
    complete = s.record(F.COMPLETE)
    finish_ok(s)
    finding = assert_finding(findings_of(s.data()), "coverage-gap", W, complete)
    assert f"{FULL_CHUNK}..{2 * FULL_CHUNK}" in finding.message


def test_overlapping_chunks() -> None:
    s = started()
    bits(s, 0)
    again = bits(s, FULL_CHUNK // 2)
    s.record(F.COMPLETE)
    finish_ok(s)
    assert_finding(findings_of(s.data()), "overlapping-chunks", W, again)


def test_chunk_beyond_the_short_last_chunk() -> None:
    s = started()
    bits(s, 0, 1024)  # short: the disk ends at sector 1024
    beyond = bits(s, FULL_CHUNK, 1024)
    s.record(F.COMPLETE)
    finish_ok(s)
    assert_finding(findings_of(s.data()), "chunk-beyond-disk", W, beyond)


def test_chunk_beyond_the_destinations_disk() -> None:
    s = started()
    beyond = bits(s, 0)  # a full chunk of 512 MiB on a 1 MiB disk
    s.record(F.COMPLETE)
    finish_ok(s)
    destination = DestinationContext(nodes={"drive0"}, sizes={"drive0": 1 << 20})
    found = findings_of(s.data(), AnalysisOptions(destination=destination))
    assert_finding(found, "chunk-beyond-disk", W, beyond)


def test_bitmap_range_invalid() -> None:
    s = started()
    record = bits(s, 128)  # one granule in: not on a 64-granule boundary
    s.record(F.COMPLETE)
    finish_ok(s)
    assert_finding(findings_of(s.data()), "bitmap-range-invalid", E, record)


# --- flags --------------------------------------------------------------------------


def test_multibyte_flags() -> None:
    s = started()
    record = s.record(F.COMPLETE, flags_width=2)
    finish_ok(s)
    found = findings_of(s.data())
    finding = assert_finding(found, "multibyte-flags", W, record)
    assert "0x20" in finding.message  # what a real destination acts on: COMPLETE
    assert "incomplete-bitmap" not in codes(found)


def test_unknown_flags_in_the_last_flags_byte() -> None:
    s = started()
    record = s.add(bytes([0x80, 0x80, 0x00, 0x80 | F.COMPLETE]))  # 4-byte flags, 0x80 last
    finish_ok(s)
    found = findings_of(s.data())
    assert_finding(found, "unknown-flags", W, record)
    assert_finding(found, "multibyte-flags", W, record)


# --- phases -------------------------------------------------------------------------


def test_phase_notes() -> None:
    s = StreamBuilder()
    setup = s.section()
    s.eos()
    s.footer()
    iteration = s.section(g.ItemType.SECTION_PART)
    s.eos()
    s.footer()
    listen_inner = g.build_command(g.Command.POSTCOPY_LISTEN)
    run_inner = g.build_command(g.Command.POSTCOPY_RUN)
    packaged = s.add(g.build_packaged(listen_inner + run_inner))
    head = len(g.build_command(g.Command.PACKAGED, bytes(4)))
    completion = s.section(g.ItemType.SECTION_END)
    finish_ok(s)
    found = findings_of(s.data())
    phases = {f.message.removeprefix("migration phase: "): f for f in found
              if f.code == "phase"}
    assert {name: f.offset for name, f in phases.items()} == {
        "setup": setup, "iteration": iteration, "postcopy-listen": packaged + head,
        "postcopy-run": packaged + head + len(listen_inner), "completion": completion}
    assert all(f.severity == N for f in phases.values())


# --- dialect 2017 -------------------------------------------------------------------


def test_2017_reuses_an_existing_bitmap_of_the_same_granularity() -> None:
    s = started()
    bits(s)
    s.record(F.COMPLETE)
    finish_ok(s)
    destination = DestinationContext(nodes={"drive0"}, bitmaps={("drive0", "b0"): GRAN})
    qemu = findings_of(s.data(), AnalysisOptions(destination=destination))
    draft = findings_of(s.data(), AnalysisOptions(destination=destination,
                                                  dialect=Dialect.DRAFT_2017))
    assert "bitmap-exists" in codes(qemu)
    assert [f for f in draft if f.severity > N] == []


def test_2017_refuses_an_existing_bitmap_of_another_granularity() -> None:
    s = StreamBuilder()
    s.section()
    record = s.record(F.START, device_name="drive0", bitmap_name="b0", granularity=GRAN,
                      bitmap_flags=1)
    finish_ok(s)
    destination = DestinationContext(nodes={"drive0"}, bitmaps={("drive0", "b0"): 4096})
    found = findings_of(s.data(), AnalysisOptions(destination=destination,
                                                  dialect=Dialect.DRAFT_2017))
    assert_finding(found, "granularity-mismatch", E, record)
    assert "bitmap-exists" not in codes(found)


def test_2017_start_byte_is_an_enabled_flag() -> None:
    s = StreamBuilder()
    s.section()
    odd = s.record(F.START, device_name="drive0", bitmap_name="b0", granularity=GRAN,
                   bitmap_flags=0x0C)
    finish_ok(s)
    draft = findings_of(s.data(), AnalysisOptions(dialect=Dialect.DRAFT_2017))
    assert_finding(draft, "unknown-flags", W, odd)
    stream = MigrationStream("t", AnalysisOptions(dialect=Dialect.DRAFT_2017))
    stream.feed(s.data())
    stream.finish()
    (bitmap,) = stream.result()["bitmaps"]
    assert (bitmap["enabled"], bitmap["persistent"]) == (True, False)
    assert {"reserved-start-flags", "autoload-flag"}.isdisjoint(codes(draft))
    qemu = findings_of(s.data())
    assert_finding(qemu, "reserved-start-flags", E, odd)


# --- findings never stop the analysis ---------------------------------------------


def test_every_problem_is_reported_not_just_the_first() -> None:
    s = StreamBuilder()
    s.section()
    no_node = s.record(F.START, bitmap_name="b0", granularity=GRAN, bitmap_flags=0)
    bad_gran = s.record(F.START, device_name="drive0", bitmap_name="b1", granularity=1000,
                        bitmap_flags=0)
    reserved = s.record(F.START, bitmap_name="b2", granularity=GRAN, bitmap_flags=0x80)
    s.eos()
    s.footer()
    s.section(g.ItemType.SECTION_END)
    s.record(F.BITS, bitmap_name="b2", first_sector=0, sector_count=FULL_CHUNK,
             buffer=CHUNK_BITS)
    too_big = bits(s, FULL_CHUNK, buffer=bytes(20000))
    s.record(F.COMPLETE)
    missing_eos = s.footer()
    s.eof()
    found = findings_of(s.data())
    got = {(f.code, f.offset) for f in found}
    assert {("no-device-name", no_node), ("invalid-granularity", bad_gran),
            ("reserved-start-flags", reserved), ("buffer-too-large", too_big),
            ("missing-eos", missing_eos)} <= got


def test_findings_do_not_depend_on_how_the_data_is_chunked() -> None:
    s = started()
    bits(s, 0)
    bits(s, FULL_CHUNK // 2, buffer=bytes(1000))
    s.record(F.COMPLETE, flags_width=4)
    s.footer()
    s.eof()
    whole = [(f.code, f.offset) for f in run(s.data())[1]]
    bytewise = [(f.code, f.offset) for f in run(s.data(), chunk=1)[1]]
    assert whole == bytewise
    assert len(whole) >= 4


def test_every_code_of_the_issue_exists_and_has_a_test_here() -> None:
    """The issue's list: each code must exist in the catalogue with its severity."""
    expected = {
        E: ["missing-eos", "unknown-bitmap", "granularity-mismatch", "invalid-granularity",
            "bitmap-exists", "unknown-node", "no-device-name", "no-bitmap-name",
            "reserved-start-flags", "buffer-too-large", "bad-section-version",
            "footer-mismatch", "bad-magic", "bad-version", "unknown-item", "truncated",
            "complete-without-start", "bits-after-complete", "incomplete-bitmap"],
        W: ["coverage-gap", "overlapping-chunks", "chunk-beyond-disk", "unknown-flags",
            "multibyte-flags"],
        N: ["autoload-flag", "phase", "resynchronised"],
    }
    for severity, names in expected.items():
        for code in names:
            assert findings.CATALOGUE[code].severity == severity, code
            assert _asserted_in_this_file(code), f"no test asserts {code}"


def _asserted_in_this_file(code: str) -> bool:
    from pathlib import Path

    text = Path(__file__).read_text()
    severity = findings.CATALOGUE[code].severity.name[0]
    return f'"{code}", {severity},' in text or (code == "phase" and "phases" in text)
