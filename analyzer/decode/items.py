"""The item readers: one per item type byte (savevm.c's `qemu_loadvm_state_main`).

Each is called by the framing machine in State.ITEM with the item type byte at the
read position (its stream offset in `machine.item_start`) and keeps the reader
contract: consume the whole item and return None, or consume nothing and return how
many bytes must be available. Section headers hand the payload to the section's
dissector (machine.begin_payload).
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from construct import ConstructError

from migshark.analyzer import findings
from migshark.analyzer.decode.parsers import GrammarParser
from migshark.analyzer.decode.resync import guess_section
from migshark.analyzer.decode.state import NeedMore, Section, State
from migshark.analyzer.findings import Code
from migshark.dissectors import grammar as g
from migshark.dissectors.registry import Kind

if TYPE_CHECKING:  # annotations only: framing imports this module
    from migshark.analyzer.decode.framing import FramingMachine

ItemReader = Callable[["FramingMachine"], NeedMore | None]

# Bounds on lengths read from the wire, so that a hostile length never makes us
# buffer or allocate more than this before we give up on an element.
MAX_CONFIGURATION = 4096
MAX_VMDESCRIPTION = 64 << 20

_LENGTH_PREFIX = struct.Struct(">" + g.field_format(g.LengthPrefixed32, "length"))
_FOOTER = struct.Struct(">" + g.fixed_format(g.SectionFooter))
_SUBSECTION_MARKER = int(g.ItemType.SUBSECTION)
_CAPABILITY_COUNT = struct.Struct(
    ">" + g.field_format(g.ConfigurationSubsectionBody[g.CONFIG_CAPABILITIES], "count"))
# The longest subsection the grammar admits below the capability limit: the marker, a
# header with a 255-byte idstr, a count and that many 255-byte counted names.
_MAX_SUBSECTION = (1 + 1 + 255 + 4 + _CAPABILITY_COUNT.size
                   + g.MAX_CONFIG_CAPABILITIES * (1 + 255))
_ADVISE = struct.Struct(">" + g.fixed_format(g.PostcopyAdvise))
_SECTION_SHORT = struct.Struct(">" + g.fixed_format(g.SectionHeaderShort))
_SECTION_START, _SECTION_PART = int(g.ItemType.SECTION_START), int(g.ItemType.SECTION_PART)
_section_full = GrammarParser(g.SectionHeaderFull)


def read_eof(machine: FramingMachine) -> NeedMore | None:
    machine.record(Kind.EOF, machine.item_start, machine.item_start + 1,
                   (("item_type", machine.item_start, 1),))
    machine.rb.pos += 1
    machine.ended = True
    if machine.depth:
        # EOF inside a package ends the nested load; QEMU's loader returns there.
        return None
    machine.set_state(State.AFTER_EOF)
    return None


def read_vmdescription(machine: FramingMachine) -> NeedMore | None:
    avail = machine.available()
    if avail < 5:
        return 5
    rb = machine.rb
    start = machine.item_start
    (length,) = _LENGTH_PREFIX.unpack_from(rb.data, rb.pos + 1)
    if length > MAX_VMDESCRIPTION:
        machine.emit(findings.make(
            Code.TRUNCATED, f"VMDESCRIPTION claims {length} bytes, more than the "
            f"{MAX_VMDESCRIPTION} this decoder accepts", start,
            fields={"element": "VMDESCRIPTION", "length": length,
                    "limit": MAX_VMDESCRIPTION}))
        machine.set_state(State.DONE)
        return None
    if avail < 5 + length:
        return 5 + length
    body = g.LengthPrefixed32.parse(rb.peek(4 + length, 1))
    try:
        desc = json.loads(body.data)
    except ValueError:
        desc = None
    rb.pos += 5 + length
    machine.record(Kind.VMDESCRIPTION, start, start + 5 + length,
                   (("item_type", start, 1), ("length", start + 1, 4),
                    ("json", start + 5, length)),
                   length=length, valid_json=desc is not None,
                   devices=len(desc.get("devices", [])) if isinstance(desc, dict) else 0)
    if isinstance(desc, dict):
        machine.vmdescription_arrived(desc)
    machine.set_state(State.AFTER_VMDESC)
    return None


def read_configuration(machine: FramingMachine) -> NeedMore | None:
    if machine.available() < 5:
        return machine.short(5, "CONFIGURATION")
    rb = machine.rb
    start = machine.item_start
    (length,) = _LENGTH_PREFIX.unpack_from(rb.data, rb.pos + 1)
    if length > MAX_CONFIGURATION:
        machine.emit(findings.make(
            Code.TRUNCATED, f"CONFIGURATION claims a {length}-byte machine type",
            start, section="configuration",
            fields={"element": "CONFIGURATION", "length": length,
                    "limit": MAX_CONFIGURATION}))
        machine.enter_resync(start + 1)
        return None
    if machine.available() < 5 + length:
        return machine.short(5 + length, "CONFIGURATION")
    body = g.LengthPrefixed32.parse(rb.peek(4 + length, 1))
    name = body.data.decode("utf-8", "replace")
    machine.machine_type = name
    subsections_at = pos = rb.pos + 5 + length
    subsections: list[str] = []
    # Newer QEMU appends vmstate subsections (target page bits, capabilities, uuid).
    while True:
        parsed = _configuration_subsection(machine, pos)
        if isinstance(parsed, _TooManyCapabilities):
            _record_configuration(machine, length, name, subsections, subsections_at, pos)
            machine.emit(findings.make(
                Code.TRUNCATED, f"CONFIGURATION capabilities subsection claims "
                f"{parsed.count} capabilities, more than the {g.MAX_CONFIG_CAPABILITIES} "
                "this decoder accepts", rb.absolute(parsed.count_at), length=4,
                section="configuration",
                fields={"element": "CONFIGURATION capabilities", "count": parsed.count,
                        "limit": g.MAX_CONFIG_CAPABILITIES}))
            rb.pos = pos
            machine.enter_resync(rb.absolute(pos) + 1)
            return None
        if isinstance(parsed, int):
            return machine.short(pos - rb.pos + parsed, "CONFIGURATION subsection")
        if parsed is None:
            break
        name_sub, pos = parsed
        subsections.append(name_sub)
    _record_configuration(machine, length, name, subsections, subsections_at, pos)
    rb.pos = pos
    return None


def _record_configuration(machine: FramingMachine, length: int, machine_type: str,
                          subsections: list[str], subsections_at: int, end: int) -> None:
    rb = machine.rb
    start = machine.item_start
    spans: tuple[tuple[str, int, int], ...] = (
        ("item_type", start, 1), ("length", start + 1, 4), ("machine_type", start + 5, length))
    if subsections:
        spans += (("subsections", rb.absolute(subsections_at), end - subsections_at),)
    machine.record(Kind.CONFIGURATION, start, rb.absolute(end), spans,
                   length=length, machine_type=machine_type, subsections=subsections)


@dataclass(frozen=True, slots=True)
class _TooManyCapabilities:
    count: int
    count_at: int  # buffer index of the count


def _configuration_subsection(machine: FramingMachine, pos: int
                              ) -> tuple[str, int] | int | _TooManyCapabilities | None:
    """The subsection at buffer index pos, read with g.ConfigurationSubsection:
    (idstr, end index); None if no subsection QEMU's vmstate_configuration declares
    starts there; an int, the bytes from pos needed to tell; or the capability count
    when it is over g.MAX_CONFIG_CAPABILITIES (checked before the names are walked)."""
    buf = machine.rb.data
    limit = machine.rb.pos + machine.available()
    if pos >= limit:
        return 1
    if buf[pos] != _SUBSECTION_MARKER:
        return None
    data = bytes(buf[pos : min(limit, pos + _MAX_SUBSECTION)])
    window = io.BytesIO(data)
    window.seek(1)
    try:
        head = g.SubsectionHeader.parse_stream(window)
    except ConstructError:
        return len(data) + 1
    if head.idstr not in g.ConfigurationSubsectionBody:
        return None
    if head.idstr == g.CONFIG_CAPABILITIES:
        count_at = window.tell()
        if len(data) < count_at + _CAPABILITY_COUNT.size:
            return count_at + _CAPABILITY_COUNT.size
        (count,) = _CAPABILITY_COUNT.unpack_from(data, count_at)
        if count > g.MAX_CONFIG_CAPABILITIES:
            return _TooManyCapabilities(count, pos + count_at)
    window.seek(0)
    try:
        g.ConfigurationSubsection.parse_stream(window)
    except ConstructError:
        return len(data) + 1
    return head.idstr, pos + window.tell()


def read_section_header_full(machine: FramingMachine) -> NeedMore | None:
    if machine.available() < 6:
        return machine.short(6, "a section header")
    rb = machine.rb
    name_len = rb.data[rb.pos + 5]
    size = 1 + 4 + 1 + name_len + 8
    if machine.available() < size:
        return machine.short(size, "a section header")
    head = _section_full.parse(rb.peek(size - 1, 1))
    item_type = rb.data[rb.pos]
    section = Section(head.section_id, head.idstr, head.instance_id, head.version_id)
    machine.sections[head.section_id] = section
    machine.current = section
    start = machine.item_start
    kind = Kind.SECTION_START if item_type == _SECTION_START else Kind.SECTION_FULL
    at = start + 6 + name_len
    machine.record(kind, start, start + size,
                   (("item_type", start, 1), ("section_id", start + 1, 4),
                    ("idstr", start + 5, 1 + name_len), ("instance_id", at, 4),
                    ("version_id", at + 4, 4)),
                   section_id=head.section_id, idstr=head.idstr,
                   instance_id=head.instance_id, version_id=head.version_id)
    rb.pos += size
    if item_type == _SECTION_START:
        machine.phase("setup", start)
    elif not machine.depth:
        machine.phase("completion", start)
    machine.begin_payload(section, item_type)
    return None


def read_section_header_short(machine: FramingMachine) -> NeedMore | None:
    if machine.available() < 5:
        return machine.short(5, "a section header")
    rb = machine.rb
    (section_id,) = _SECTION_SHORT.unpack_from(rb.data, rb.pos + 1)
    item_type = rb.data[rb.pos]
    section = machine.sections.get(section_id)
    if section is None and machine.learning:
        guessed = guess_section(machine, rb.pos, rb.pos + machine.available())
        if guessed is None:
            return machine.short(machine.available() + 1, "a section header")
        if guessed:
            assert isinstance(guessed, Section)
            machine.learn_section(guessed, machine.item_start)
            section = guessed
    kind = Kind.SECTION_PART if item_type == _SECTION_PART else Kind.SECTION_END
    start = machine.item_start
    spans = (("item_type", start, 1), ("section_id", start + 1, 4))
    if section is None:
        machine.current = None
        machine.record(kind, start, start + 5, spans, section_id=section_id)
        machine.emit(findings.make(
            Code.UNKNOWN_SECTION, f"{kind} for section id {section_id}, never started",
            start, length=5, fields={"section_id": section_id}))
        rb.pos += 5
        machine.enter_resync(rb.offset)
        return None
    machine.current = section
    machine.record(kind, start, start + 5, spans, section_id=section_id, idstr=section.idstr)
    rb.pos += 5
    machine.phase("iteration" if item_type == _SECTION_PART else "completion", start)
    machine.begin_payload(section, item_type)
    return None


def read_stray_footer(machine: FramingMachine) -> NeedMore | None:
    # A footer where an item is expected: a section ended twice, or garbage.
    if machine.available() < 5:
        return machine.short(5, "a section footer")
    rb = machine.rb
    start = machine.item_start
    (section_id,) = _FOOTER.unpack_from(rb.data, rb.pos + 1)
    machine.record(Kind.FOOTER, start, start + 5,
                   (("item_type", start, 1), ("section_id", start + 1, 4)),
                   section_id=section_id)
    machine.emit(findings.make(
        Code.FOOTER_MISMATCH, f"section footer for id {section_id} outside any section",
        start, length=5, fields={"footer_section_id": section_id}))
    rb.pos += 5
    return None


def read_command(machine: FramingMachine) -> NeedMore | None:
    if machine.available() < 5:
        return machine.short(5, "a command")
    rb = machine.rb
    head = g.CommandHeader.parse(rb.peek(4, 1))
    command, length = head.command, head.length
    size = 5 + length
    if machine.available() < size:
        return machine.short(size, "a command")
    body = g.CommandBody.parse(rb.peek(size - 1, 1))
    try:
        name = g.Command(command).name
    except ValueError:
        name = f"UNKNOWN({command})"
    fields: dict[str, Any] = {"command": name, "command_number": command, "length": length}
    start = machine.item_start
    spans: tuple[tuple[str, int, int], ...] = (
        ("item_type", start, 1), ("command", start + 1, 2), ("length", start + 3, 2))
    rb.pos += size
    end = start + size
    if command == g.Command.PACKAGED:
        if length != 4:
            machine.record(Kind.COMMAND, start, end, spans, **fields)
            machine.emit(findings.make(
                Code.BAD_COMMAND, f"PACKAGED with a {length}-byte argument, not 4",
                start, length=size,
                fields={"command": name, "length": length, "expected": 4}))
            return None
        inner = g.PackagedLength.parse(body.data)
        fields["packaged_length"] = inner
        machine.record(Kind.COMMAND, start, end, (*spans, ("packaged_length", start + 5, 4)),
                       **fields)
        if inner > g.MAX_PACKAGED_SIZE or machine.depth:
            machine.emit(findings.make(
                Code.BAD_PACKAGED,
                f"PACKAGED of {inner} bytes (QEMU accepts at most {g.MAX_PACKAGED_SIZE}, "
                "not nested)", start, length=size,
                fields={"packaged_length": inner, "limit": g.MAX_PACKAGED_SIZE,
                        "nested": bool(machine.depth)}))
            machine.enter_resync(end)
            return None
        machine.package_end = end + inner
        machine.depth = 1
        return None
    if command == g.Command.PING and length == 4:
        fields["value"] = g.PingValue.parse(body.data)
        spans += (("value", start + 5, 4),)
    elif command == g.Command.POSTCOPY_ADVISE and length == _ADVISE.size:
        summary, target_page_size = _ADVISE.unpack(body.data)
        fields["remote_pagesize_summary"] = summary
        fields["target_page_size"] = target_page_size
        half = _ADVISE.size // 2  # two be64 fields
        spans += (("remote_pagesize_summary", start + 5, half),
                  ("target_page_size", start + 5 + half, half))
    elif command == g.Command.POSTCOPY_LISTEN:
        machine.phase("postcopy-listen", start)
    elif command == g.Command.POSTCOPY_RUN:
        machine.phase("postcopy-run", start)
    if length and command not in (g.Command.PING, g.Command.POSTCOPY_ADVISE,
                                  g.Command.POSTCOPY_RAM_DISCARD, g.Command.RECV_BITMAP):
        if command in g.Command.__members__.values():
            fields["data"] = body.data.hex()
            spans += (("data", start + 5, length),)
    machine.record(Kind.COMMAND, start, end, spans, **fields)
    return None


ITEM_READERS: dict[int, ItemReader] = {
    g.ItemType.EOF: read_eof,
    g.ItemType.SECTION_START: read_section_header_full,
    g.ItemType.SECTION_FULL: read_section_header_full,
    g.ItemType.SECTION_PART: read_section_header_short,
    g.ItemType.SECTION_END: read_section_header_short,
    g.ItemType.CONFIGURATION: read_configuration,
    g.ItemType.COMMAND: read_command,
    g.ItemType.SECTION_FOOTER: read_stray_footer,
    g.ItemType.VMDESCRIPTION: read_vmdescription,
}


