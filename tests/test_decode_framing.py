"""The decoder package: chunking independence on the bundled streams, spans that
locate each field's bytes, structured finding fields, the dissector registry and the
receive buffer."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from migshark.analyzer.analysis import AnalysisOptions, analyze_path
from migshark.analyzer.decode import sections
from migshark.analyzer.decode.framing import FramingMachine
from migshark.analyzer.decode.receivebuffer import ReceiveBuffer
from migshark.analyzer.decode.sections.device import DeviceDissector
from migshark.analyzer.decode.sections.dirty_bitmap import DirtyBitmapDissector
from migshark.analyzer.decode.sections.ram import RamDissector
from migshark.analyzer.decode.state import State
from migshark.analyzer.decoder import StreamDecoder, decode_bytes
from migshark.analyzer.records import Finding, Record
from migshark.dissectors import grammar as g
from testkit import synthetic

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
BUNDLED_STREAMS = sorted(CAPTURES.glob("*/*.bin"))
# Byte-at-a-time feeding is slow in Python: long streams are fed so only this far.
BYTEWISE_LIMIT = 120_000


def _event_key(event: Record | Finding) -> tuple[object, ...]:
    """Everything an event says, spans and finding fields included."""
    if isinstance(event, Record):
        return ("R", event.offset, event.length, event.kind, event.section,
                event.section_id, repr(event.fields), event.depth, event.node, event.bitmap,
                event.spans)
    return ("F", event.code, event.severity, event.offset, event.length, event.section,
            event.node, event.bitmap, event.message, repr(event.fields))


def _decode_in_chunks(data: bytes, sizes: list[int]) -> list[tuple[object, ...]]:
    decoder = StreamDecoder()
    events = []
    pos = 0
    for size in sizes:
        events += decoder.feed(data[pos : pos + size])
        pos += size
    events += decoder.feed(data[pos:])
    return [_event_key(event) for event in events + decoder.finish()]


def test_the_bundled_streams_are_found():
    names = {path.name for path in BUNDLED_STREAMS}
    assert {"exec.bin", "clean.bin", "truncate-at.bin", "multibyte-flags.bin"} <= names


@pytest.mark.parametrize("path", BUNDLED_STREAMS, ids=lambda path: path.name)
def test_bundled_stream_decodes_alike_in_any_chunking(path):
    data = path.read_bytes()
    whole = _decode_in_chunks(data, [])
    assert len(whole) > 10
    rng = random.Random(path.name)
    random_sizes = []
    while sum(random_sizes) < len(data):
        random_sizes.append(rng.choice([1, 2, 3, 5, 8, 13, 64, 4095, 4097, 9000]))
    for sizes in ([7] * (len(data) // 7 + 1), [4096] * (len(data) // 4096 + 1),
                  random_sizes):
        assert _decode_in_chunks(data, sizes) == whole
    prefix = data[:BYTEWISE_LIMIT]
    assert _decode_in_chunks(prefix, [1] * len(prefix)) == _decode_in_chunks(prefix, [])


def _streams_with_spans() -> list[tuple[str, bytes]]:
    streams = [(path.name, path.read_bytes()) for path in BUNDLED_STREAMS]
    streams.append(("synthetic-precopy", synthetic.precopy_stream()))
    packaged = (g.build_file_header() + g.build_configuration("pc-q35-7.2")
                + g.build_command(g.Command.PING, (7).to_bytes(4, "big"))
                + g.build_command(g.Command.POSTCOPY_ADVISE, g.PostcopyAdvise.build(
                    {"remote_pagesize_summary": 0x201000, "target_page_size": 4096}))
                + g.build_packaged(g.build_section_start(
                    g.ItemType.SECTION_FULL, 5, "timer", 0, 2) + b"\x01\x02"
                    + g.build_footer(5) + g.build_eof())
                + g.build_eof())
    streams.append(("synthetic-packaged", packaged))
    return streams


# Records that have no wire fields of their own, or whose fields are not dissected
# (RAM records: a run stands for thousands of records).
_NO_SPANS = {"package-end", "device-state"}
# Span keys with no value of their own in `fields`: the item type byte, VMDESCRIPTION's
# JSON (fields keep its device count), a BITS buffer too large to keep.
_WIRE_ONLY = {"vmdescription": ("item_type", "json"),
              "bitmap-bits": ("item_type", "buffer")}
# Counted strings: the span covers the length byte and the bytes.
_COUNTED = {"idstr", "device_name", "bitmap_name"}


def _check_value(data: bytes, record: Record, key: str, start: int, size: int) -> None:
    raw = data[start : start + size]
    assert len(raw) == size, (record, key)
    fields = record.fields
    if key == "item_type":
        assert raw[0] in set(g.ItemType), record
    elif key == "magic":
        assert raw == g.QEVM_MAGIC
    elif key in _COUNTED:
        assert raw[0] == size - 1
        assert raw[1:].decode("utf-8", "surrogateescape") == fields[key]
    elif key == "length" and record.kind == "configuration":
        assert int.from_bytes(raw, "big") == len(fields["machine_type"].encode())
        assert fields["length"] == len(fields["machine_type"].encode())
    elif key == "subsections":
        names = []
        stream = io.BytesIO(raw)
        while stream.tell() < len(raw):
            names.append(g.ConfigurationSubsection.parse_stream(stream).header.idstr)
        assert names == fields["subsections"]
    elif key == "machine_type":
        assert raw.decode() == fields[key]
    elif key == "command":
        assert int.from_bytes(raw, "big") == fields["command_number"]
    elif key == "flags":
        # QEMU keeps the last byte only (the multi-byte case: wire_flags is all of them).
        assert raw[-1] & 0x7F == fields["flags"] & 0x7F
        assert int.from_bytes(raw, "big") == fields.get("wire_flags", fields["flags"])
    elif key == "buffer":
        if "buffer" in fields:
            assert raw == fields["buffer"]
        assert size == fields["buffer_size"]
    elif key == "json":
        assert fields["valid_json"]
        assert len(json.loads(raw)["devices"]) == fields["devices"]
    elif key == "data":
        assert raw.hex() == fields["data"]
    else:
        assert int.from_bytes(raw, "big") == fields[key], (record, key)


@pytest.mark.parametrize("name,data", _streams_with_spans(), ids=lambda item: str(item)[:30])
def test_spans_locate_every_field(name, data):
    records = [event for event in decode_bytes(data) if isinstance(event, Record)]
    kinds_with_spans = set()
    for record in records:
        if record.kind in _NO_SPANS or record.kind.startswith("ram-"):
            assert record.spans is None, record
            continue
        assert record.spans, record
        kinds_with_spans.add(record.kind)
        at = record.offset
        for key, start, size in record.spans:
            assert key in record.fields or key in _WIRE_ONLY.get(record.kind, ("item_type",)), (
                record, key)
            assert start >= at, ("spans overlap or are out of wire order", record)
            at = start + size
            _check_value(data, record, key, start, size)
        if record.kind != "command" or "data" in record.fields or not record.fields["length"]:
            # Every byte is a field's, except command payloads that are not dissected.
            assert at == record.end, record
    assert kinds_with_spans, name


def test_dirty_bitmap_records_span_their_fields():
    records = [event for event in decode_bytes(synthetic.precopy_stream())
               if isinstance(event, Record) and event.kind.startswith("bitmap-")]
    keys = {(record.kind, tuple(key for key, _, _ in record.spans or ())) for record in records}
    assert ("bitmap-start", ("flags", "device_name", "bitmap_name", "granularity",
                             "bitmap_flags")) in keys
    assert ("bitmap-bits", ("flags", "first_sector", "sector_count", "buffer_size",
                            "buffer")) in keys
    assert ("bitmap-eos", ("flags",)) in keys


def _findings(data: bytes) -> list[Finding]:
    return [event for event in decode_bytes(data) if isinstance(event, Finding)]


def test_findings_carry_their_data_in_fields():
    by_code = {finding.code: finding
               for finding in _findings((CAPTURES / "generated/footer-mismatch.bin").read_bytes())}
    assert by_code["footer-mismatch"].fields == {"footer_section_id": 2, "section_id": 3}
    multibyte = [finding for finding in
                 _findings((CAPTURES / "generated/multibyte-flags.bin").read_bytes())
                 if finding.code == "multibyte-flags"]
    assert [finding.fields["width"] for finding in multibyte] == [2, 4]
    assert multibyte[0].fields["wire_flags"] == 0x801C
    oversized = [finding for finding in
                 _findings((CAPTURES / "generated/oversized-buffer.bin").read_bytes())
                 if finding.code == "buffer-too-large"]
    assert oversized[0].fields == {"buffer_size": 10272, "limit": g.BITMAP_MAX_BUFFER_SIZE,
                                   "resynchronised": False}
    version = [finding for finding in
               _findings((CAPTURES / "generated/bad-section-version.bin").read_bytes())
               if finding.code == "bad-section-version"]
    assert version[0].fields == {"version_id": 2, "expected": 1}
    phases = [finding.fields["phase"] for finding in _findings(synthetic.precopy_stream())
              if finding.code == "phase"]
    assert phases[0] == "setup" and "completion" in phases


def test_the_json_of_findings_is_unchanged_by_fields():
    finding = _findings((CAPTURES / "generated/footer-mismatch.bin").read_bytes())[1]
    assert finding.fields
    assert set(finding.as_json()) == {"code", "severity", "message", "offset", "length",
                                      "section", "node", "bitmap"}


def test_a_capture_gap_says_whether_decoding_stayed_exact():
    data = synthetic.precopy_stream()
    ram_page = next(event.offset for event in decode_bytes(data, ram_detail=True)
                    if isinstance(event, Record) and event.kind == "ram-page")
    decoder = StreamDecoder()
    decoder.feed(data[:ram_page + 100])
    inside = [event for event in decoder.gap(200) if isinstance(event, Finding)]
    assert inside[0].fields == {"length": 200, "inside_skipped_data": True}
    decoder = StreamDecoder()
    decoder.feed(data[:40])
    lost = [event for event in decoder.gap(9) if isinstance(event, Finding)]
    assert lost[0].fields == {"length": 9, "inside_skipped_data": False}


def test_analysis_phases_come_from_finding_fields():
    result = analyze_path(CAPTURES / "generated/clean.bin", AnalysisOptions())
    assert result.migrations[0].phases[:2] == ["setup", "iteration"]


def test_sections_are_dissected_by_the_dissector_registered_for_their_idstr():
    by_idstr, fallback = sections.dissector_classes()
    assert by_idstr[g.RAM_SECTION_IDSTR] is RamDissector
    assert by_idstr[g.DIRTY_BITMAP_SECTION_IDSTR] is DirtyBitmapDissector
    assert fallback is DeviceDissector
    decoder = StreamDecoder()
    assert isinstance(decoder.dissector_for("timer"), DeviceDissector)
    assert isinstance(decoder.dissector_for("ram"), RamDissector)
    with pytest.raises(ValueError, match="two dissectors"):
        sections.register(g.RAM_SECTION_IDSTR)(RamDissector)
    with pytest.raises(ValueError, match="two fallback"):
        sections.register_fallback(DeviceDissector)


def test_every_state_but_payload_has_a_reader():
    machine = FramingMachine(vmdesc=None, target_page_size=4096, ram_detail=False)
    assert set(machine._readers) == set(State) - {State.PAYLOAD}
    for state in machine._readers:
        machine.set_state(state)
        assert machine.state is state


def test_receive_buffer_keeps_stream_offsets_across_compaction_and_skips():
    rb = ReceiveBuffer()
    rb.append(b"0123456789")
    rb.advance(4)
    assert (rb.available(), rb.offset, rb.end, rb.peek(3)) == (6, 4, 10, b"456")
    assert rb.compact() == 0  # bytes are still unread: no copy for a few bytes
    rb.advance(6)
    assert rb.compact() == 10
    assert (rb.base, rb.pos, rb.offset, rb.end) == (10, 0, 10, 10)
    rb.start_skip(5, 8)
    assert rb.record_start() == 8
    rest = rb.take_skip(memoryview(b"abcdefg"))
    assert bytes(rest) == b"fg" and rb.skip == 0 and rb.base == 15
    assert rb.record_start() == 15
    rb.append(rest)
    rb.lose(100)
    assert (rb.base, rb.available(), rb.end) == (117, 0, 117)


def _mutations(data: bytes, count: int) -> list[bytes]:
    rng = random.Random(1103)
    mutated = []
    for _ in range(count):
        buf = bytearray(data)
        for _ in range(rng.choice([1, 2, 8])):
            at = rng.randrange(len(buf))
            if rng.random() < 0.2:
                del buf[at : at + rng.randrange(1, 64)]
            else:
                buf[at] = rng.randrange(256)
        mutated.append(bytes(buf))
    return mutated


@pytest.mark.parametrize("data", _mutations((CAPTURES / "generated/clean.bin").read_bytes(), 40))
def test_mutated_streams_decode_alike_in_any_chunking_with_spans_inside(data):
    whole = _decode_in_chunks(data, [])
    assert _decode_in_chunks(data, [7] * (len(data) // 7 + 1)) == whole
    assert _decode_in_chunks(data, [1, 4095, 3, 9000, 2] * 8) == whole
    for event in decode_bytes(data):
        if isinstance(event, Record) and event.spans:
            for _key, start, size in event.spans:
                assert event.offset <= start and start + size <= event.end <= len(data)


def test_a_record_cut_by_the_end_of_data_claims_only_the_bytes_that_came():
    data = (CAPTURES / "generated/oversized-buffer.bin").read_bytes()
    bits = next(event for event in decode_bytes(data)
                if isinstance(event, Record) and event.fields.get("buffer_size", 0) > 10240)
    cut = bits.offset + bits.length - 100
    events = decode_bytes(data[:cut])
    record = next(event for event in events
                  if isinstance(event, Record) and event.offset == bits.offset)
    assert record.end == cut
    assert record.spans is not None and record.spans[-1][0] == "buffer"
    assert all(start + size <= cut for _key, start, size in record.spans)
    assert record.spans[-1][2] == bits.spans[-1][2] - 100


# --- CONFIGURATION read through g.ConfigurationSubsection -------------------------------

# What follows the CONFIGURATION: a device section, then the stream's end.
_TAIL = (g.build_section_start(g.ItemType.SECTION_FULL, 5, "timer", 0, 2) + b"\x01\x02"
         + g.build_footer(5) + g.build_eof() + g.build_vmdescription(b'{"devices": []}'))
_PAGE_BITS = g.build_configuration_subsection(g.CONFIG_TARGET_PAGE_BITS,
                                              {"target_page_bits": 12})


def _capabilities(names: list[str], count: int | None = None) -> bytes:
    """A capabilities subsection; `count` other than len(names) crafts a lying count."""
    body = g.build_configuration_subsection(g.CONFIG_CAPABILITIES,
                                            {"count": len(names), "capabilities": names})
    if count is None:
        return body
    at = 1 + 1 + len(g.CONFIG_CAPABILITIES) + 4
    return body[:at] + count.to_bytes(4, "big") + body[at + 4:]


def _configuration_stream(subsections: bytes) -> tuple[bytes, int]:
    """A stream whose CONFIGURATION carries `subsections`; and where they start."""
    head = g.build_file_header() + g.build_configuration("pc-q35-7.2")
    return head + subsections + _TAIL, len(head)


def _all_subsections() -> bytes:
    return (_PAGE_BITS + _capabilities(["x-ignore-shared", "postcopy-ram"])
            + g.build_configuration_subsection(g.CONFIG_UUID, {"uuid": bytes(range(16))}))


def test_configuration_reads_every_declared_subsection() -> None:
    subsections = _all_subsections()
    data, at = _configuration_stream(subsections)
    events = decode_bytes(data)
    config = next(e for e in events if isinstance(e, Record) and e.kind == "configuration")
    assert config.fields == {"length": 10, "machine_type": "pc-q35-7.2",
                             "subsections": [g.CONFIG_TARGET_PAGE_BITS,
                                             g.CONFIG_CAPABILITIES, g.CONFIG_UUID]}
    assert config.end == at + len(subsections)
    assert config.spans is not None and ("subsections", at, len(subsections)) in config.spans
    assert not [e for e in events if isinstance(e, Finding) and e.code != "phase"]
    pieces = [1] * len(data)
    assert _decode_in_chunks(data, pieces) == _decode_in_chunks(data, [])


@pytest.mark.parametrize("count", [g.MAX_CONFIG_CAPABILITIES + 1, 1000, 0xFFFF_FFFF])
def test_a_capability_count_over_the_limit_is_a_finding_at_its_offset(count: int) -> None:
    data, at = _configuration_stream(_PAGE_BITS + _capabilities(["x-ignore-shared"], count=count))
    count_at = at + len(_PAGE_BITS) + 1 + 1 + len(g.CONFIG_CAPABILITIES) + 4
    assert int.from_bytes(data[count_at : count_at + 4], "big") == count
    events = decode_bytes(data)
    over = [e for e in events if isinstance(e, Finding) and e.code == "truncated"]
    assert len(over) == 1
    assert over[0].offset == count_at and over[0].length == 4
    assert over[0].fields == {"element": "CONFIGURATION capabilities", "count": count,
                              "limit": g.MAX_CONFIG_CAPABILITIES}
    config = next(e for e in events if isinstance(e, Record) and e.kind == "configuration")
    # What was read before the bad subsection stays a record; the walk then resyncs to
    # the next real item instead of believing the count.
    assert config.fields["subsections"] == [g.CONFIG_TARGET_PAGE_BITS]
    assert config.end == at + len(_PAGE_BITS)
    assert [e.kind for e in events if isinstance(e, Record)][-2:] == ["eof", "vmdescription"]
    assert any(isinstance(e, Finding) and e.code == "resynchronised" for e in events)
    assert _decode_in_chunks(data, [1] * len(data)) == _decode_in_chunks(data, [])


def test_a_capability_count_at_the_limit_is_read() -> None:
    names = [f"cap-{i}" for i in range(g.MAX_CONFIG_CAPABILITIES)]
    data, at = _configuration_stream(_capabilities(names))
    events = decode_bytes(data)
    config = next(e for e in events if isinstance(e, Record) and e.kind == "configuration")
    assert config.fields["subsections"] == [g.CONFIG_CAPABILITIES]
    assert not [e for e in events if isinstance(e, Finding) and e.code != "phase"]


def test_an_undeclared_subsection_ends_the_configuration() -> None:
    odd = g.SubsectionHeader.build({"idstr": "configuration/other", "version_id": 1})
    data, at = _configuration_stream(b"\x05" + odd + b"\x00" * 4)
    events = decode_bytes(data)
    config = next(e for e in events if isinstance(e, Record) and e.kind == "configuration")
    assert config.end == at and config.fields["subsections"] == []
    unknown = [e for e in events if isinstance(e, Finding) and e.code == "unknown-item"]
    assert unknown and unknown[0].offset == at


@pytest.mark.parametrize("cut", [1, 5, 20, 30, 40])
def test_a_configuration_cut_inside_a_subsection_is_truncated_not_a_crash(cut: int) -> None:
    data, at = _configuration_stream(_all_subsections())
    events = decode_bytes(data[: at + cut])
    assert not [e for e in events if isinstance(e, Record) and e.kind == "configuration"]
    truncated = [e for e in events if isinstance(e, Finding) and e.code == "truncated"]
    assert truncated and truncated[0].offset == at - 15


@pytest.mark.parametrize("path", BUNDLED_STREAMS, ids=lambda path: path.name)
def test_the_decoder_emits_registered_names(path: Path) -> None:
    from migshark.analyzer.findings import Code
    from migshark.dissectors.registry import Kind

    events = decode_bytes(path.read_bytes())
    assert events
    for event in events:
        if isinstance(event, Record):
            assert type(event.kind) is Kind, event
        else:
            assert type(event.code) is Code, event
