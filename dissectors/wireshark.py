"""The Wireshark plugin: Lua generated from the field registry and the grammar.

Every ProtoField, value string, flag bit and constant of the plugin is written here
from `dissectors.registry` and `dissectors.grammar`, so that Wireshark and migshark
cannot disagree on what a field is called or what a number means. The framing logic
(reading records, TCP desegmentation, per-frame state) is the hand-written template
`wireshark_plugin.lua`, which refers to the generated tables only by name.

dissectors/ imports nothing of the analyzer's: the severities of the expert infos come
from the caller (the CLI passes analyzer.findings' catalogue) as `ExpertSource`s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path

from migshark.dissectors import grammar as g
from migshark.dissectors import registry as r

TEMPLATE_NAME = "wireshark_plugin.lua"
GENERATED_MARK = "--@@GENERATED@@"
PROTOCOL_NAME = "qemu_mig"
PROTOCOL_DESCRIPTION = "QEMU migration stream"

# Wireshark's expert severities for the catalogue's (analyzer.records.Severity labels).
_SEVERITY_CONSTANTS = {"error": "PI_ERROR", "warning": "PI_WARN", "note": "PI_NOTE"}
# The template names the finding codes it raises, `expert(item, "code", ...)`: that is
# the one list of them (the codes themselves are the analyzer's, passed in).
_EXPERT_CALL = re.compile(r'expert\([^,]+, "([a-z0-9-]+)"')


@dataclass(frozen=True, slots=True)
class ExpertSource:
    """What the plugin needs of one catalogue entry: its severity name and meaning."""

    severity: str
    meaning: str
    malformed: bool = False  # Wireshark's PI_MALFORMED group rather than PI_PROTOCOL


def default_plugin_path() -> Path:
    """Wireshark 4.0's personal Lua plugin folder (Help > About > Folders)."""
    return Path.home() / ".local" / "lib" / "wireshark" / "plugins" / "qemu_mig.lua"


def _lua_string(text: str) -> str:
    """A Lua 5.2 string literal: bytes outside printable ASCII as decimal escapes
    (Lua 5.2 has no \\u escape)."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def _base(info: r.FieldInfo) -> str:
    if info.type in (r.FieldType.STRING, r.FieldType.BYTES, r.FieldType.BOOL):
        return "base.NONE"
    return "base.HEX" if info.base == r.Base.HEX else "base.DEC"


def _value_table(values: Mapping[int, str]) -> str:
    return "{" + ", ".join(f"[{number}] = {_lua_string(name)}"
                           for number, name in sorted(values.items())) + "}"


def _protofield(info: r.FieldInfo, parent: r.FieldInfo | None) -> str | None:
    """The Lua ProtoField constructor call for one registered field (None for a
    derived list, which has no FT_ type and is shown as its elements' fields)."""
    abbrev = _lua_string(info.abbrev)
    label = _lua_string(info.label)
    description = _lua_string(info.description) if info.description else "nil"
    if info.type == r.FieldType.LIST:
        return None
    if info.bitmask:
        width = 8 if parent is None or parent.type == r.FieldType.UINT8 else 32
        return (f"ProtoField.bool({abbrev}, {label}, {width}, nil, {info.bitmask:#x}, "
                f"{description})")
    if info.type == r.FieldType.BOOL:
        return f"ProtoField.bool({abbrev}, {label}, base.NONE, nil, nil, {description})"
    if info.type in (r.FieldType.STRING, r.FieldType.BYTES):
        return f"ProtoField.{info.type.value}({abbrev}, {label}, base.NONE, {description})"
    values = _value_table(info.values) if info.values else "nil"
    return f"ProtoField.{info.type.value}({abbrev}, {label}, {_base(info)}, {values}, nil, " \
           f"{description})"


def _enum_constants(prefix: str, enum: type[Enum]) -> list[str]:
    # __members__, not iteration: iterating an IntFlag skips multi-bit members
    # (BitmapStartFlag.RESERVED_MASK).
    return [f"C.{prefix}{name} = {int(member.value)}"
            for name, member in enum.__members__.items()]


def _constants() -> list[str]:
    lines = ["local C = {}"]
    lines += _enum_constants("ITEM_", g.ItemType)
    lines += _enum_constants("CMD_", g.Command)
    lines += _enum_constants("RAM_", g.RamFlag)
    lines += _enum_constants("BF_", g.BitmapFlag)
    lines += _enum_constants("BSF_", g.BitmapStartFlag)
    numbers = {
        "QEVM_MAGIC": int.from_bytes(g.QEVM_MAGIC, "big"),
        "QEVM_VERSION": g.QEVM_VERSION,
        "MAX_PACKAGED_SIZE": g.MAX_PACKAGED_SIZE,
        "DEFAULT_TARGET_PAGE_SIZE": g.DEFAULT_TARGET_PAGE_SIZE,
        "KNOWN_BITMAP_FLAGS": g.KNOWN_BITMAP_FLAGS,
        "DIRTY_BITMAP_SECTION_VERSION": g.DIRTY_BITMAP_SECTION_VERSION,
        "SECTOR_SIZE": g.SECTOR_SIZE,
        "BITMAP_MAX_BUFFER_SIZE": g.BITMAP_MAX_BUFFER_SIZE,
        "MIN_GRANULARITY": g.MIN_GRANULARITY,
        "MAX_GRANULARITY": g.MAX_GRANULARITY,
        "MAX_CONFIG_CAPABILITIES": g.MAX_CONFIG_CAPABILITIES,
        "VALID_RAM_FLAGS": int(
            g.RamFlag.ZERO | g.RamFlag.MEM_SIZE | g.RamFlag.PAGE | g.RamFlag.EOS
            | g.RamFlag.CONTINUE | g.RamFlag.XBZRLE | g.RamFlag.HOOK
            | g.RamFlag.COMPRESS_PAGE | g.RamFlag.MULTIFD_FLUSH),
    }
    lines += [f"C.{name} = {value}" for name, value in numbers.items()]
    strings = {
        "RAM_SECTION_IDSTR": g.RAM_SECTION_IDSTR,
        "DIRTY_BITMAP_SECTION_IDSTR": g.DIRTY_BITMAP_SECTION_IDSTR,
        "CONFIG_TARGET_PAGE_BITS": g.CONFIG_TARGET_PAGE_BITS,
        "CONFIG_CAPABILITIES": g.CONFIG_CAPABILITIES,
        "CONFIG_UUID": g.CONFIG_UUID,
    }
    lines += [f"C.{name} = {_lua_string(value)}" for name, value in strings.items()]
    return lines


def _fields() -> list[str]:
    lines = ["local F = {}"]
    for name, info in r.FIELDS.items():
        parent = r.FIELDS.get(info.parent) if info.parent else None
        call = _protofield(info, parent)
        if call is not None:
            lines.append(f"F[{_lua_string(name)}] = {call}")
    # The plugin's own structure: one subtree per record, named by its kind, and the
    # record's stream offset (what `migshark dump` prints first).
    kinds = {kind.value: info.label for kind, info in r.KINDS.items()}
    lines.append('F["record"] = ProtoField.string("qemu_mig.record", "Record", base.NONE, '
                 '"the record kind, as migshark names it")')
    lines.append('F["offset"] = ProtoField.uint64("qemu_mig.offset", "Stream offset", '
                 'base.DEC, nil, nil, "from the Q of QEVM")')
    lines.append("local KIND_LABELS = {" + ", ".join(
        f"[{_lua_string(kind)}] = {_lua_string(label)}" for kind, label in kinds.items()) + "}")
    lines.append("local VALUES = {")
    lines.append(f"  item = {_value_table(r.ITEM.values or {})},")
    lines.append(f"  command = {_value_table(r.COMMAND.values or {})},")
    lines.append(f"  bitmap_flags = {_value_table(r.BITMAP_FLAGS.bit_names or {})},")
    lines.append(f"  start_flags = {_value_table(r.BITMAP_START_FLAGS.bit_names or {})},")
    lines.append("}")
    return lines


def expert_codes(template: str | None = None) -> list[str]:
    """The finding codes the template raises, in order of first use."""
    found = _EXPERT_CALL.findall(template if template is not None else _template())
    return list(dict.fromkeys(found))


def _experts(catalogue: Mapping[str, ExpertSource], codes: list[str]) -> list[str]:
    lines = ["local EXPERT = {}"]
    for code in codes:
        entry = catalogue[code]  # a KeyError here: the catalogue lost a code we show
        severity = _SEVERITY_CONSTANTS[entry.severity]
        group = "PI_MALFORMED" if entry.malformed else "PI_PROTOCOL"
        abbrev = _lua_string(f"{PROTOCOL_NAME}.expert.{code}")
        lines.append(f"EXPERT[{_lua_string(code)}] = ProtoExpert.new({abbrev}, "
                     f"{_lua_string(entry.meaning)}, {group}, {severity})")
    return lines


def _template() -> str:
    return resources.files(__package__).joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")


def generate_plugin(catalogue: Mapping[str, ExpertSource]) -> str:
    """The plugin's Lua source; `catalogue` maps finding codes to their severity and
    meaning (analyzer.findings.CATALOGUE, as the CLI passes it)."""
    template = _template()
    if template.count(GENERATED_MARK) != 1:
        raise ValueError(f"{TEMPLATE_NAME} must hold {GENERATED_MARK} exactly once")
    generated = [
        "-- Generated by migshark (dissectors/wireshark.py) from the field registry.",
        "-- Do not edit: run `migshark wireshark-plugin -o FILE.lua` instead.",
        f"local PROTOCOL_NAME = {_lua_string(PROTOCOL_NAME)}",
        f"local PROTOCOL_DESCRIPTION = {_lua_string(PROTOCOL_DESCRIPTION)}",
        *_constants(), *_fields(), *_experts(catalogue, expert_codes(template)),
    ]
    return template.replace(GENERATED_MARK, "\n".join(generated))


__all__ = ["ExpertSource", "default_plugin_path", "expert_codes", "generate_plugin"]
