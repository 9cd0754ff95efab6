"""The field registry: complete for what the decoder emits, consistent, derived from the grammar."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from construct import Int8ub, Int16ub, Int32ub, Int64ub
from hypothesis import given, settings
from hypothesis import strategies as st

from migshark.analyzer.analysis import AnalysisOptions, MigrationStream, analyze_path
from migshark.analyzer.records import Event, Record
from migshark.analyzer.returnpath import ReturnPathDecoder
from migshark.dissectors import grammar as g
from migshark.dissectors import registry as reg
from migshark.dissectors import returnpath as rp
from migshark.dissectors.registry import FieldType, Kind, describe

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
BUNDLED = sorted(p for p in [*CAPTURES.glob("real/*"), *CAPTURES.glob("generated/*")]
                 if p.suffix in (".bin", ".pcap", ".pcapng"))

# Issue 14: the Wireshark plugin's field names, fixed because users type them.
ISSUE_14_ABBREVS = (
    "qemu_mig.item", "qemu_mig.section.idstr", "qemu_mig.section.id",
    "qemu_mig.section.version", "qemu_mig.machine_type", "qemu_mig.command",
    "qemu_mig.bitmap.flags", "qemu_mig.bitmap.node", "qemu_mig.bitmap.name",
    "qemu_mig.bitmap.granularity", "qemu_mig.bitmap.start_flags",
    "qemu_mig.bitmap.start_sector", "qemu_mig.bitmap.nr_sectors", "qemu_mig.bitmap.buffer_size",
)


def _records(path: Path, ram_detail: bool) -> Iterator[Record]:
    seen: list[Record] = []

    def sink(_stream: MigrationStream, event: Event) -> None:
        if isinstance(event, Record):
            seen.append(event)

    analyze_path(path, AnalysisOptions(ram_detail=ram_detail), sink=sink)
    yield from seen


def _return_path_records() -> list[Record]:
    decoder = ReturnPathDecoder()
    data = b"".join([
        rp.build_message(rp.ReturnPathMessage.PONG, rp.Be32Value.build(7)),
        rp.build_message(rp.ReturnPathMessage.REQ_PAGES_ID,
                         rp.ReqPagesId.build({"start": 0, "length": 4096, "block": "pc.ram"})),
        rp.build_message(rp.ReturnPathMessage.REQ_PAGES,
                         rp.ReqPages.build({"start": 4096, "length": 4096})),
        rp.build_recv_bitmap("pc.ram", b"\xff" * 8),
        rp.build_message(rp.ReturnPathMessage.SHUT, b"\x00"),  # wrong length: data kept
        rp.build_message(rp.ReturnPathMessage.SHUT, rp.Be32Value.build(0)),
    ])
    return [e for e in decoder.feed(data) + decoder.finish() if isinstance(e, Record)]


@pytest.fixture(scope="module")
def emitted() -> list[Record]:
    records: list[Record] = []
    for path in BUNDLED:
        records += _records(path, ram_detail=False)
        if "generated" in path.parts:  # per-page RAM records; the real captures are large
            records += _records(path, ram_detail=True)
    return records + _return_path_records()


def test_bundled_captures_are_found() -> None:
    assert len(BUNDLED) >= 20


def test_every_kind_and_field_key_the_decoders_emit_is_registered(emitted: list[Record]
                                                                   ) -> None:
    kinds = set()
    for record in emitted:
        info = reg.kind_info(record.kind)
        assert info is not None, f"kind {record.kind!r} is not registered"
        kinds.add(info.kind)
        for key in record.fields:
            assert info.field_for(key) is not None, f"{record.kind}: field {key!r} unregistered"
    # The captures exercise the bulk of the registry, so the check above means something.
    assert {Kind.FILE_HEADER, Kind.SECTION_START, Kind.SECTION_PART, Kind.FOOTER, Kind.COMMAND,
            Kind.CONFIGURATION, Kind.RAM_PAGES, Kind.RAM_PAGE, Kind.RAM_MEM_SIZE,
            Kind.BITMAP_START, Kind.BITMAP_BITS, Kind.BITMAP_COMPLETE, Kind.BITMAP_EOS,
            Kind.DEVICE_STATE, Kind.EOF, Kind.RP_MESSAGE, Kind.RP_RECV_BITMAP} <= kinds


def test_kind_is_a_plain_string_to_comparisons_and_json() -> None:
    import json
    assert Kind.BITMAP_BITS == "bitmap-bits"
    assert json.dumps({"kind": Kind.SECTION_START}) == '{"kind": "section-start"}'
    assert Kind.BITMAP_BITS.short == "bits" and Kind.BITMAP_BITS.is_bitmap
    assert not Kind.RAM_PAGES.is_bitmap and Kind.RAM_PAGES.is_ram
    assert {reg.bitmap_kind(k) for k in g.RecordKind} == reg.BITMAP_KINDS
    assert set(reg.KINDS) == set(Kind)


def test_filter_names_are_unique_and_issue_14_names_are_present() -> None:
    names = [f.filter_name for info in reg.KINDS.values() for f in info.fields]
    # One FieldInfo per filter name, however many kinds share it.
    by_name: dict[str, reg.FieldInfo] = {}
    for info in reg.KINDS.values():
        for field_info in info.fields:
            assert by_name.setdefault(field_info.filter_name, field_info) is field_info
    assert set(names) == set(reg.FIELDS)
    abbrevs = {f.abbrev for f in reg.FIELDS.values()}
    assert len(abbrevs) == len(reg.FIELDS)
    assert set(ISSUE_14_ABBREVS) <= abbrevs
    for kind_info in reg.KINDS.values():
        keys = [f.key for f in kind_info.fields if not f.bitmask]
        assert len(keys) == len(set(keys)), f"{kind_info.kind}: a key registered twice"


def test_types_come_from_the_grammar_declarations() -> None:
    assert reg.wire_type(Int8ub) == FieldType.UINT8
    assert reg.wire_type(Int16ub) == FieldType.UINT16
    assert reg.wire_type(Int32ub) == FieldType.UINT32
    assert reg.wire_type(Int64ub) == FieldType.UINT64
    assert reg.wire_type(g.counted_name) == FieldType.STRING
    assert reg.wire_type(reg.declared(g.BitmapRecord, "buffer")) == FieldType.BYTES
    assert reg.wire_type(reg.declared(g.BitmapRecord, "start", "granularity")) == FieldType.UINT32
    with pytest.raises(KeyError):
        reg.declared(g.BitmapRecord, "start", "no_such_field")
    with pytest.raises(TypeError):
        reg.wire_type(g.BitmapFlags)
    f = reg.FIELDS
    assert f["bitmap.granularity"].type == FieldType.UINT32
    assert f["bitmap.start_sector"].type == FieldType.UINT64
    assert f["bitmap.nr_sectors"].type == FieldType.UINT32
    assert f["bitmap.buffer_size"].type == FieldType.UINT64
    assert f["bitmap.start_flags"].type == FieldType.UINT8
    assert f["bitmap.flags"].type == FieldType.UINT8
    assert f["bitmap.node"].type == FieldType.STRING
    assert f["command"].type == FieldType.UINT16
    assert f["section.id"].type == FieldType.UINT32
    assert f["item"].type == FieldType.UINT8
    assert f["rp.start"].type == FieldType.UINT64


def test_value_strings_and_bits_come_from_the_enums() -> None:
    f = reg.FIELDS
    assert f["item"].values == {t.value: t.name for t in g.ItemType}
    assert f["command"].value_name(g.Command.PACKAGED) == "PACKAGED"
    assert f["command"].value_name(99) == "UNKNOWN(99)"
    bits = {n: i.bitmask for n, i in f.items() if i.parent == "bitmap.flags"}
    assert bits == {f"bitmap.flags.{flag.name.lower()}": flag.value for flag in g.BitmapFlag
                    if flag.name}
    start_bits = {i.bitmask for i in f.values() if i.parent == "bitmap.start_flags"}
    assert start_bits == {1, 2, 4}
    assert f["bitmap.flags"].display(0x54) == "BITMAP_NAME|START|BITS (0x54)"


def _record(kind: str, offset: int, length: int, fields: dict[str, Any],
            spans: tuple[tuple[str, int, int], ...] | None = None, **extra: Any) -> Record:
    return Record(offset=offset, length=length, kind=kind, fields=fields, spans=spans, **extra)


def test_describe_follows_spans_and_adds_bits_and_generated_fields() -> None:
    data = g.bitmap_record(g.BitmapFlag.BITS, device_name="drive0", bitmap_name="inc0",
                           first_sector=0, sector_count=128, buffer=b"\x01" * 32)
    flags = int(g.BitmapFlag.BITS | g.BitmapFlag.DEVICE_NAME | g.BitmapFlag.BITMAP_NAME)
    spans = (("flags", 100, 1), ("device_name", 101, 7), ("bitmap_name", 108, 5),
             ("first_sector", 113, 8), ("sector_count", 121, 4), ("buffer_size", 125, 8),
             ("buffer", 133, 32))
    record = _record("bitmap-bits", 100, len(data), {
        "flags": flags, "flags_width": 1, "flag_names": ["BITMAP_NAME", "DEVICE_NAME", "BITS"],
        "device_name": "drive0", "bitmap_name": "inc0", "first_sector": 0,
        "sector_count": 128, "zeroes": False, "buffer_size": 32, "buffer": b"\x01" * 32},
        spans, node="drive0", bitmap="inc0")
    views = describe(record)
    wire = [v for v in views if not v.generated]
    assert [v.info.filter_name for v in wire if not v.info.bitmask] == [
        "bitmap.flags", "bitmap.node", "bitmap.name", "bitmap.start_sector",
        "bitmap.nr_sectors", "bitmap.buffer_size", "bitmap.buffer"]
    assert [(v.offset, v.length) for v in wire if not v.info.bitmask] == [s[1:] for s in spans]
    bits = {v.info.filter_name: v.text for v in wire if v.info.bitmask}
    assert bits["bitmap.flags.bits"] == "set" and bits["bitmap.flags.start"] == "not set"
    assert len(bits) == len(g.BitmapFlag)
    assert all(v.exact for v in wire)
    generated = {v.info.filter_name: v for v in views if v.generated}
    assert set(generated) == {"bitmap.flags_width", "bitmap.flag_names", "bitmap.zeroes"}
    assert all((v.offset, v.length) == (100, len(data)) for v in generated.values())
    assert next(v for v in wire if v.info.key == "buffer").text == "32 bytes"


def test_describe_without_spans_has_no_byte_ranges() -> None:
    record = _record("bitmap-start", 40, 20, {
        "flags": 0x1C, "flags_width": 1, "flag_names": ["BITMAP_NAME", "DEVICE_NAME", "START"],
        "device_name": "d", "bitmap_name": "b", "granularity": 65536, "bitmap_flags": 1})
    views = describe(record)
    assert [v.info.key for v in views if not v.generated] == [
        "flags", "device_name", "bitmap_name", "granularity", "bitmap_flags"]
    assert all((v.offset, v.length, v.exact) == (40, 20, False) for v in views)
    assert next(v for v in views if v.info.key == "bitmap_flags").text == "ENABLED (0x1)"


def test_describe_marks_inherited_names_as_generated_and_a_lone_eos_has_none() -> None:
    inherited = _record("bitmap-bits", 0, 13, {"flags": 0x42, "first_sector": 0,
                                                "sector_count": 8, "zeroes": True},
                        (("flags", 0, 1), ("first_sector", 1, 8), ("sector_count", 9, 4)),
                        node="drive0", bitmap="inc0")
    views = {v.info.filter_name: v for v in describe(inherited)}
    assert views["bitmap.node"].generated and views["bitmap.node"].value == "drive0"
    assert views["bitmap.name"].generated and views["bitmap.name"].value == "inc0"
    lone = _record("bitmap-eos", 13, 1, {"flags": 1}, (("flags", 13, 1),))
    names = {v.info.filter_name for v in describe(lone)}
    assert "bitmap.node" not in names and "bitmap.name" not in names


def test_describe_resolves_indexed_span_keys_and_keeps_unknown_keys() -> None:
    record = _record("ram-mem-size", 8, 30, {
        "total_bytes": 1 << 20, "blocks": [{"idstr": "pc.ram", "used_length": 1 << 20}],
        "mystery": 5}, (("total_bytes", 8, 8), ("blocks[0].idstr", 16, 7),
                        ("blocks[0].used_length", 23, 8)))
    views = describe(record)
    named = {v.label: v for v in views}
    assert named["blocks[0].idstr"].value == "pc.ram"
    assert named["blocks[0].idstr"].info.filter_name == "ram.blocks.idstr"
    assert named["blocks[0].used_length"].value == 1 << 20
    assert named["mystery"].generated and not named["mystery"].registered
    assert named["blocks[0].idstr"].registered
    assert "blocks" not in named  # shown through its indexed spans


def test_field_value_looks_only_in_kinds_that_carry_the_field() -> None:
    bits = _record("bitmap-bits", 0, 13, {"flags": 0x42}, node="n", bitmap="b")
    assert reg.field_value(bits, reg.FIELDS["bitmap.name"]) == "b"
    assert reg.field_value(bits, reg.FIELDS["bitmap.flags.zeroes"]) is True
    assert reg.field_value(bits, reg.FIELDS["bitmap.flags.start"]) is False
    footer = _record("footer", 0, 5, {"section_id": 3})
    assert reg.field_value(footer, reg.FIELDS["footer.id"]) == 3
    assert reg.field_value(footer, reg.FIELDS["section.id"]) is None
    assert reg.field_value(footer, reg.FIELDS["item"]) == g.ItemType.SECTION_FOOTER
    assert reg.lookup("qemu_mig.bitmap.granularity") is reg.FIELDS["bitmap.granularity"]
    assert reg.lookup("bitmap.nope") is None


def test_configuration_subsections_round_trip_through_the_grammar() -> None:
    built = (g.build_configuration_subsection(g.CONFIG_TARGET_PAGE_BITS,
                                              {"target_page_bits": 12})
             + g.build_configuration_subsection(
                 g.CONFIG_CAPABILITIES, {"count": 2, "capabilities": ["x-ignore-shared", "a"]})
             + g.build_configuration_subsection(g.CONFIG_UUID, {"uuid": bytes(range(16))}))
    first = g.ConfigurationSubsection.parse(built)
    assert first.header.idstr == g.CONFIG_TARGET_PAGE_BITS
    assert first.body.target_page_bits == 12
    # The decoder reads the same layout: its records name the three subsections.
    from migshark.analyzer.decoder import decode_bytes
    stream = (g.build_file_header() + g.build_configuration("pc-q35-9.0") + built
              + g.build_eof())
    events = [e for e in decode_bytes(stream) if isinstance(e, Record)]
    config = next(e for e in events if e.kind == Kind.CONFIGURATION)
    assert config.fields["subsections"] == [g.CONFIG_TARGET_PAGE_BITS, g.CONFIG_CAPABILITIES,
                                            g.CONFIG_UUID]
    assert config.length == 5 + len("pc-q35-9.0") + len(built)


def test_multifd_channel_header_is_qemus_64_bytes() -> None:
    from migshark.dissectors import multifd
    header = multifd.build_multifd_init(5, bytes(range(16)))
    assert len(header) == multifd.MULTIFD_INIT_SIZE == 64
    assert header[:4] == (0x11223344).to_bytes(4, "big")
    assert multifd.is_multifd_channel(header) and not multifd.is_multifd_channel(b"QEVM")
    parsed = multifd.MultifdInit.parse(header)
    assert (parsed.version, parsed.uuid, parsed.channel_id) == (1, bytes(range(16)), 5)
    assert header[25:] == bytes(39)


def test_return_path_grammar_builds_what_the_reader_reads() -> None:
    records = _return_path_records()
    assert [r.fields.get("message") for r in records if r.kind == Kind.RP_MESSAGE] == [
        "PONG", "REQ_PAGES_ID", "REQ_PAGES", "RECV_BITMAP", "SHUT", "SHUT"]
    req = next(r for r in records if r.fields.get("message") == "REQ_PAGES")
    assert (req.fields["start"], req.fields["page_bytes"], req.fields["block"]) == (
        4096, 4096, "pc.ram")
    bitmap = next(r for r in records if r.kind == Kind.RP_RECV_BITMAP)
    assert bitmap.fields["received_pages"] == 64 and bitmap.length == 8 + 8 + 8
    assert rp.FIXED_LENGTHS[rp.ReturnPathMessage.REQ_PAGES] == 12


def test_describe_a_section_header_with_its_type_byte() -> None:
    data = g.build_section_start(g.ItemType.SECTION_START, 3, "dirty-bitmap", 0, 1)
    spans = (("item_type", 50, 1), ("section_id", 51, 4), ("idstr", 55, 13),
             ("instance_id", 68, 4), ("version_id", 72, 4))
    record = _record("section-start", 50, len(data), {
        "section_id": 3, "idstr": "dirty-bitmap", "instance_id": 0, "version_id": 1}, spans)
    views = describe(record)
    assert [v.info.abbrev for v in views] == [
        "qemu_mig.item", "qemu_mig.section.id", "qemu_mig.section.idstr",
        "qemu_mig.section.instance", "qemu_mig.section.version"]
    assert views[0].text == "SECTION_START (0x1)"
    assert sum(v.length for v in views) == len(data) == record.length
    # The same record from a SECTION_PART: its idstr is inherited, not on the wire.
    part = _record("section-part", 0, 5, {"section_id": 3, "idstr": "dirty-bitmap"},
                   (("item_type", 0, 1), ("section_id", 1, 4)))
    generated = [v.info.filter_name for v in describe(part) if v.generated]
    assert generated == ["section.idstr"]


_VALUES = st.one_of(st.none(), st.integers(-5, 1 << 70), st.text(max_size=8), st.binary(max_size=8),
                    st.booleans(), st.lists(st.integers(0, 9), max_size=3),
                    st.lists(st.dictionaries(st.sampled_from(["idstr", "used_length"]),
                                             st.integers(0, 9)), max_size=2))
_KEYS = st.sampled_from(sorted(reg.RECORD_KEYS) + ["blocks[0].idstr", "blocks[9].extra[1]",
                                                    "x.y", "[", "]", ""])


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from([k.value for k in Kind] + ["nonsense"]),
       fields=st.dictionaries(_KEYS, _VALUES, max_size=6),
       spans=st.none() | st.lists(st.tuples(_KEYS, st.integers(0, 100), st.integers(0, 100)),
                                  max_size=6),
       node=st.none() | st.text(max_size=4))
def test_describe_never_fails_on_odd_records(kind: str, fields: dict[str, Any],
                                             spans: list[tuple[str, int, int]] | None,
                                             node: str | None) -> None:
    record = _record(kind, 10, 20, fields, None if spans is None else tuple(spans),
                     node=node, bitmap=node)
    for view in describe(record):
        assert isinstance(view.text, str) and isinstance(view.label, str)
    for info in reg.FIELDS.values():
        reg.field_value(record, info)


def test_describe_a_command_whose_span_key_differs_from_its_value_key() -> None:
    data = g.build_packaged(b"")
    record = _record("command", 0, len(data), {
        "command": "PACKAGED", "command_number": 7, "length": 4, "packaged_length": 0},
        (("item_type", 0, 1), ("command", 1, 2), ("length", 3, 2),
         ("packaged_length", 5, 4)))
    views = describe(record)
    assert [(v.info.filter_name, v.value, v.generated) for v in views] == [
        ("item", g.ItemType.COMMAND, False), ("command", 7, False),
        ("command.length", 4, False), ("command.packaged_length", 0, False),
        ("command.name", "PACKAGED", True)]
    assert views[1].text == "PACKAGED (7)"
    assert sum(v.length for v in views if not v.generated) == len(data)


_KIND_SCAN_SKIPPED = ("dissectors/registry.py",)  # where the kinds are declared
# Kind values that are also ordinary words elsewhere ("command" is a field name,
# "footer" a delimiting method, "configuration" a section label): only the hyphenated
# kinds are unmistakable as literals, and record() calls are checked for all kinds.
_HYPHENATED_KINDS = {kind.value for kind in Kind if "-" in kind.value}


def _kind_literals(source: str) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    kinds = {kind.value for kind in Kind}
    hits = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and node.value in _HYPHENATED_KINDS):
            hits.append((node.lineno, node.value))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "record" and node.args
              and isinstance(node.args[0], ast.Constant) and node.args[0].value in kinds
              and node.args[0].value not in _HYPHENATED_KINDS):
            hits.append((node.lineno, node.args[0].value))
    return hits


def test_no_record_kind_string_literal_in_product_code() -> None:
    root = Path(__file__).resolve().parent.parent
    found = []
    for folder in ("analyzer", "dissectors", "tui"):
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel.startswith(_KIND_SCAN_SKIPPED):
                continue
            found += [f"{rel}:{line}: {value!r}" for line, value in
                      _kind_literals(path.read_text())]
    assert found == []


def test_the_kind_scan_sees_literals() -> None:
    hits = _kind_literals('machine.record("footer", 0, 5)\nkind = "bitmap-bits"\n'
                          'x = {"footer": 1}\nmachine.record(Kind.EOF, 0, 1)\n')
    assert sorted(hits) == [(1, "footer"), (2, "bitmap-bits")]


def _decoded(data: bytes) -> list[Record]:
    from migshark.analyzer.decoder import decode_bytes

    return [event for event in decode_bytes(data) if isinstance(event, Record)]


def test_every_item_type_view_names_its_type_byte() -> None:
    data = (CAPTURES / "generated" / "clean.bin").read_bytes()
    shown = 0
    for record in _decoded(data):
        for view in describe(record):
            if view.info is reg.ITEM:
                item = g.ItemType(data[view.offset])
                assert view.text == f"{item.name} ({int(item):#x})", record
                shown += 1
    assert shown > 10


def test_vmdescription_json_span_is_the_registry_json_field() -> None:
    json_bytes = b'{"devices": [{"name": "timer"}]}'
    data = g.build_file_header() + g.build_eof() + g.build_vmdescription(json_bytes)
    record = next(r for r in _decoded(data) if r.kind == Kind.VMDESCRIPTION)
    assert record.fields == {"length": len(json_bytes), "valid_json": True, "devices": 1}
    views = {view.info.filter_name: view for view in describe(record)}
    json_view = views["vmdescription.json"]
    assert not json_view.generated and json_view.exact
    assert data[json_view.offset : json_view.offset + json_view.length] == json_bytes
    assert json_view.text == f"{len(json_bytes)} bytes"
    assert views["vmdescription.devices"].generated and views["vmdescription.devices"].text == "1"


def test_configuration_length_has_its_value() -> None:
    data = g.build_file_header() + g.build_configuration("pc-i440fx-7.2") + g.build_eof()
    record = next(r for r in _decoded(data) if r.kind == Kind.CONFIGURATION)
    views = {view.info.filter_name: view for view in describe(record)}
    length = views["configuration.length"]
    assert length.value == 13 and length.text == "13" and not length.generated
    assert int.from_bytes(data[length.offset : length.offset + 4], "big") == 13
