"""The display filter language: what it matches, and that bad text is an error, never a crash."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migshark.analyzer.records import Record, Severity
from migshark.tui.filter import FilterError, RowView, parse_filter


def row(kind: str, *, section: str | None = "dirty-bitmap", node: str | None = None,
        bitmap: str | None = None, offset: int = 0, severity: Severity | None = None,
        codes: tuple[str, ...] = (), **fields: object) -> RowView:
    record = Record(offset=offset, length=10, kind=kind, section=section, fields=dict(fields),
                    node=node, bitmap=bitmap)
    return RowView(1, record, severity, codes)


BITS_INC0 = row("bitmap-bits", node="drive0", bitmap="inc0", offset=5000, first_sector=0,
                zeroes=False)
BITS_INC1 = row("bitmap-bits", node="drive0", bitmap="inc1", offset=6000, zeroes=True)
START_SYNC = row("bitmap-start", node="drive1", bitmap="sync", offset=200, granularity=65536)
RAM = row("ram-pages", section="ram", offset=100)
BAD = row("bitmap-complete", node="drive0", bitmap="inc1", offset=7000,
          severity=Severity.WARNING, codes=("coverage-gap",))
ROWS = [BITS_INC0, BITS_INC1, START_SYNC, RAM, BAD]


def matching(text: str) -> list[RowView]:
    predicate = parse_filter(text)
    assert predicate is not None
    return [r for r in ROWS if predicate(r)]


@pytest.mark.parametrize(("text", "expected"), [
    ('bitmap == "inc0" and kind == BITS', [BITS_INC0]),
    ("kind == bitmap-bits", [BITS_INC0, BITS_INC1]),
    ("severity >= warning", [BAD]),
    ("severity >= note", [BAD]),
    ("severity > warning", []),
    ("section == ram", [RAM]),
    ("section == RAM", [RAM]),
    ('node == "drive0"', [BITS_INC0, BITS_INC1, BAD]),
    ('bitmap == "drive1/sync"', [START_SYNC]),
    ("offset > 1000", [BITS_INC0, BITS_INC1, BAD]),
    ("offset >= 0x1388", [BITS_INC0, BITS_INC1, BAD]),
    ("kind == start or section == ram", [START_SYNC, RAM]),
    ("not section == dirty-bitmap", [RAM]),
    ('not (node == "drive0" or kind == ram-pages)', [START_SYNC]),
    ("zeroes", [BITS_INC1]),
    ("bitmap", [BITS_INC0, BITS_INC1, START_SYNC, BAD]),
    ("granularity == 65536", [START_SYNC]),
    ("code == coverage-gap", [BAD]),
    ("kind contains comp", [BAD]),
    ("offset < 300 and offset > 150 or bitmap == 'inc0'", [START_SYNC, BITS_INC0]),
])
def test_filter_matches(text: str, expected: list[RowView]) -> None:
    assert matching(text) == [r for r in ROWS if r in expected]


PACKAGED = row("command", section=None, command="PACKAGED", command_number=7, length=4,
               packaged_length=900)
ADVISE = row("command", section=None, command="POSTCOPY_ADVISE", command_number=3, length=0)
FLAGGED = row("bitmap-bits", node="drive0", bitmap="inc0", flags=0x42, zeroes=True,
              first_sector=64, sector_count=64)
LONE_EOS = row("bitmap-eos", flags=0x01)
FOOTER = row("footer", section="ram", section_id=2)
REGISTRY_ROWS = [PACKAGED, ADVISE, FLAGGED, LONE_EOS, FOOTER, START_SYNC]


@pytest.mark.parametrize(("text", "expected"), [
    ("bitmap.granularity == 65536", [START_SYNC]),
    ("qemu_mig.bitmap.granularity >= 512", [START_SYNC]),
    ("QEMU_MIG.bitmap.start_sector == 64", [FLAGGED]),
    ('qemu_mig.bitmap.name == "inc0"', [FLAGGED]),  # inherited from the record
    ('bitmap.node == "drive1"', [START_SYNC]),
    ("bitmap.flags.zeroes", [FLAGGED]),
    ("bitmap.flags.eos", [LONE_EOS]),
    ("bitmap.flags.eos == 0", [FLAGGED]),
    ("bitmap.flags == 0x42", [FLAGGED]),
    ("command == PACKAGED", [PACKAGED]),
    ("qemu_mig.command == 3", [ADVISE]),
    ("command contains advise", [ADVISE]),
    ("command.packaged_length > 100", [PACKAGED]),
    ("item == SECTION_FOOTER", [FOOTER]),
    ("item == COMMAND", [PACKAGED, ADVISE]),
    ("footer.id == 2", [FOOTER]),
    ("section.id == 2", []),  # a footer's id is footer.id, not a section header's
    ("packaged_length == 900", [PACKAGED]),  # the decoder's key as a short name
    ("first_sector == 64", [FLAGGED]),
])
def test_registry_filter_names(text: str, expected: list[RowView]) -> None:
    predicate = parse_filter(text)
    assert predicate is not None
    assert [r for r in REGISTRY_ROWS if predicate(r)] == [r for r in REGISTRY_ROWS
                                                          if r in expected]


def test_unknown_registry_names_are_errors() -> None:
    with pytest.raises(FilterError, match="unknown field"):
        parse_filter("qemu_mig.bitmap.nonsense == 1")
    with pytest.raises(FilterError, match="unknown field"):
        parse_filter("bitmap.granularityy")


def test_empty_filter_is_no_filter() -> None:
    assert parse_filter("") is None
    assert parse_filter("   ") is None


@pytest.mark.parametrize(("text", "position"), [
    ("kind ==", 7),
    ("kind == BITS and", 16),
    ("(kind == BITS", 13),
    ("colour == red", 0),
    ('bitmap == "inc0', 10),
    ("severity >= loud", 12),
    ("kind == BITS)", 12),
    ("== 3", 0),
    ("offset > 1 $", 11),
])
def test_invalid_filters_say_where(text: str, position: int) -> None:
    with pytest.raises(FilterError) as caught:
        parse_filter(text)
    assert caught.value.position == position
    assert str(caught.value)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('kindoffset=!<>()"\' andornot0x1BITSram-/.')) ,
               max_size=40))
def test_any_text_parses_or_is_a_filter_error(text: str) -> None:
    try:
        predicate = parse_filter(text)
    except FilterError:
        return
    if predicate is not None:
        for r in ROWS:
            assert predicate(r) in (True, False)


def test_deep_nesting_is_an_error_not_a_recursion_crash() -> None:
    with pytest.raises(FilterError, match="nested"):
        parse_filter("(" * 5000 + "kind == BITS" + ")" * 5000)
    with pytest.raises(FilterError, match="nested"):
        parse_filter("not " * 5000 + "kind == BITS")
    predicate = parse_filter("(" * 60 + "not " * 3 + "kind == start" + ")" * 60)
    assert predicate is not None and [r for r in ROWS if predicate(r)] == [
        r for r in ROWS if r.record.kind != "bitmap-start"]
