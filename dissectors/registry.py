"""The field registry: every record kind and every field of the wire, declared once.

Wireshark's `hf_register_info` is the model. A `FieldInfo` says what one field is
called in display filters (`bitmap.granularity`; `qemu_mig.bitmap.granularity` in
Wireshark), its label, type, display base, value strings and bitmask. Types and
widths are not restated here: they are read off the construct declarations in
`dissectors.grammar` (an `Int32ub` is a uint32), and value strings and bit names come
from the grammar's IntEnum/IntFlag classes. A `KindInfo` gives, for each record kind
the decoder emits, its label and its fields in wire order, plus the fields the
decoder derives or inherits (shown as generated, as Wireshark marks them).

`describe(record)` turns a record into field views (field, value, byte range) for the
TUI's detail tree and hex highlight, `dump -V` and the Wireshark plugin. It is
duck-typed on the record (.kind, .fields, .spans, .offset, .length, .node, .bitmap)
because dissectors/ imports nothing of the analyzer's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, Protocol

from construct import (
    Adapter,
    Bytes,
    Const,
    Construct,
    FormatField,
    GreedyBytes,
    IfThenElse,
    Renamed,
    Struct,
    Subconstruct,
)

from migshark.dissectors import grammar as g
from migshark.dissectors import returnpath as rp

ABBREV_PREFIX = "qemu_mig."


class FieldType(StrEnum):
    """Wireshark's FT_* names, lower case: also the names of the Lua ProtoField
    constructors (ProtoField.uint32, .bool, .string, .bytes) a plugin generator calls."""

    UINT8 = "uint8"
    UINT16 = "uint16"
    UINT32 = "uint32"
    UINT64 = "uint64"
    BOOL = "bool"
    STRING = "string"
    BYTES = "bytes"
    LIST = "list"  # a derived list (flag names, RAM blocks, subsections): no FT_ equivalent

    @property
    def is_integer(self) -> bool:
        return self in (FieldType.UINT8, FieldType.UINT16, FieldType.UINT32, FieldType.UINT64)


class Base(StrEnum):
    """Wireshark's display base (BASE_DEC, BASE_HEX, BASE_NONE)."""

    DEC = "dec"
    HEX = "hex"
    NONE = "none"


_FORMAT_TYPES = {"B": FieldType.UINT8, "H": FieldType.UINT16, "L": FieldType.UINT32,
                 "I": FieldType.UINT32, "Q": FieldType.UINT64}


def wire_type(declaration: Construct) -> FieldType:
    """The FieldType of a construct declaration: Int32ub is uint32, a counted name a string.

    Wrappers (a name, If, Const) are looked through; anything without a fixed meaning
    is a TypeError, so that the registry cannot silently invent a type.
    """
    node: Any = declaration
    while True:
        if isinstance(node, g.CountedName):
            return FieldType.STRING
        if isinstance(node, FormatField):
            fmt = node.fmtstr
            if fmt[0] == ">" and fmt[1:] in _FORMAT_TYPES:
                return _FORMAT_TYPES[fmt[1:]]
            raise TypeError(f"no field type for the format {fmt!r}")
        if isinstance(node, Bytes) or node is GreedyBytes:
            return FieldType.BYTES
        if isinstance(node, IfThenElse):
            node = node.thensubcon
        elif isinstance(node, (Renamed, Const, Adapter, Subconstruct)):
            node = node.subcon
        else:
            raise TypeError(f"no field type for {type(node).__name__}")


def declared(struct: Struct, *path: str) -> Construct:
    """The declaration of a (nested) field of a grammar Struct, looked up by name."""
    node: Any = struct
    for name in path:
        while isinstance(node, (IfThenElse, Renamed)) and not isinstance(node, Struct):
            node = node.thensubcon if isinstance(node, IfThenElse) else node.subcon
        match = [sub for sub in node.subcons if sub.name == name]
        if not match:
            raise KeyError(f"the grammar declares no field {'.'.join(path)!r}")
        node = match[0]
    return node


def _values(enum: Iterable[Enum]) -> dict[int, str]:
    return {int(member.value): member.name for member in enum}


@dataclass(frozen=True, slots=True)
class FieldInfo:
    """One registered field (one `hf_` entry).

    `key` is the key the decoder uses in Record.fields (and in Record.spans). A field
    with a `bitmask` is a bit of the field `parent` (its key is the parent's key).
    `inherited` names the Record attribute that carries the value when the record
    itself does not (a dirty-bitmap record without names applies to the bitmap an
    earlier record named). `span_key` is the key of the field's span when it differs
    from `key` (the command's span is "command", its number is "command_number": the
    decoder keeps the name under "command").
    """

    key: str
    filter_name: str
    label: str
    type: FieldType
    base: Base = Base.DEC
    values: Mapping[int, str] | None = None
    bit_names: Mapping[int, str] | None = None
    bitmask: int = 0
    parent: str | None = None
    description: str = ""
    inherited: str | None = None
    span_key: str | None = None  # the key of its span when not `key` (see Record.spans)

    @property
    def abbrev(self) -> str:
        """The Wireshark field abbreviation."""
        return ABBREV_PREFIX + self.filter_name

    def value_name(self, value: Any) -> str | None:
        """The value string for `value`, if the field has value strings."""
        if self.values is None or not isinstance(value, int):
            return None
        return self.values.get(value, f"UNKNOWN({value})")

    def display(self, value: Any) -> str:
        """How the detail tree shows a value of this field."""
        if value is None:
            return "-"
        if isinstance(value, (bytes, bytearray)):
            return f"{len(value)} bytes"
        if self.bitmask and isinstance(value, int):
            return "set" if value & self.bitmask else "not set"
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, list):
                return ", ".join(str(item.get("idstr", item)) if isinstance(item, dict)
                                 else str(item) for item in value) or "none"
            return str(value)
        shown = f"{value:#x}" if self.base == Base.HEX else str(value)
        if self.bit_names is not None:
            names = [name for bit, name in self.bit_names.items() if value & bit]
            return f"{'|'.join(names) or 'none'} ({shown})"
        if self.values is not None:
            return f"{self.value_name(value)} ({shown})"
        return shown


def _field(key: str, filter_name: str, label: str, kind: FieldType | Construct,
           **options: Any) -> FieldInfo:
    field_type = kind if isinstance(kind, FieldType) else wire_type(kind)
    return FieldInfo(key, filter_name, label, field_type, **options)


def _bits(parent: FieldInfo, flags: Iterable[Enum], *, skip: Iterable[str] = ()
          ) -> list[FieldInfo]:
    """One boolean field per named bit of a flags field (Wireshark's bit fields)."""
    out = []
    for flag in flags:
        name = flag.name or ""
        if name in skip:
            continue
        out.append(FieldInfo(parent.key, f"{parent.filter_name}.{name.lower()}",
                             name.replace("_", " ").capitalize(), FieldType.BOOL,
                             bitmask=int(flag.value), parent=parent.filter_name))
    return out


_BITMAP_FLAG_NAMES = _values(g.BitmapFlag)
_START_FLAG_NAMES = {int(f.value): f.name or "" for f in g.BitmapStartFlag
                     if f is not g.BitmapStartFlag.RESERVED_MASK}

# --- stream framing -------------------------------------------------------------------

ITEM = _field("item_type", "item", "Item type", g.ItemTypeByte,
              base=Base.HEX, values=_values(g.ItemType),
              description="the type byte that starts every item (QEMU_VM_*)")
FILE_MAGIC = _field("magic", "file.magic", "Magic", FieldType.STRING,
                    base=Base.NONE, description='"QEVM"')
FILE_VERSION = _field("version", "file.version", "Version",
                      declared(g.FileHeader, "version"),
                      description="stream version; QEMU reads only 3")
SECTION_ID = _field("section_id", "section.id", "Section id",
                    declared(g.SectionHeaderFull, "section_id"))
SECTION_IDSTR = _field("idstr", "section.idstr", "Section idstr",
                       declared(g.SectionHeaderFull, "idstr"), base=Base.NONE,
                       description="the name its owner registered: ram, dirty-bitmap, ...")
SECTION_INSTANCE = _field("instance_id", "section.instance", "Instance id",
                          declared(g.SectionHeaderFull, "instance_id"))
SECTION_VERSION = _field("version_id", "section.version", "Section version",
                         declared(g.SectionHeaderFull, "version_id"))
FOOTER_ID = _field("section_id", "footer.id", "Footer section id",
                   declared(g.SectionFooter, "section_id"),
                   description="must equal the id of the section just read")
CONFIG_LENGTH = _field("length", "configuration.length", "Machine type length",
                       declared(g.LengthPrefixed32, "length"))
# The grammar declares the bytes; they are a machine type name, shown as text.
MACHINE_TYPE = _field("machine_type", "machine_type", "Machine type", FieldType.STRING,
                      base=Base.NONE)
CONFIG_SUBSECTIONS = _field("subsections", "configuration.subsections", "Subsections",
                            FieldType.LIST, base=Base.NONE,
                            description="vmstate subsections after the machine type")
VMDESC_LENGTH = _field("length", "vmdescription.length", "JSON length",
                       declared(g.LengthPrefixed32, "length"))
VMDESC_JSON = _field("json", "vmdescription.json", "JSON", declared(g.LengthPrefixed32, "data"),
                     base=Base.NONE)
VMDESC_VALID = _field("valid_json", "vmdescription.valid_json", "Valid JSON", FieldType.BOOL)
VMDESC_DEVICES = _field("devices", "vmdescription.devices", "Devices described",
                        FieldType.UINT32)
COMMAND = _field("command_number", "command", "Command", declared(g.CommandHeader, "command"),
                 values=_values(g.Command), description="MIG_CMD_*", span_key="command")
COMMAND_NAME = _field("command", "command.name", "Command name", FieldType.STRING,
                      base=Base.NONE)
COMMAND_LENGTH = _field("length", "command.length", "Command data length",
                        declared(g.CommandHeader, "length"))
COMMAND_DATA = _field("data", "command.data", "Command data", declared(g.CommandBody, "data"),
                      base=Base.NONE)
PACKAGED_LENGTH = _field("packaged_length", "command.packaged_length", "Packaged length",
                         g.PackagedLength, description="bytes of nested stream that follow")
PING_VALUE = _field("value", "command.ping", "Ping value", g.PingValue)
ADVISE_PAGESIZES = _field("remote_pagesize_summary", "command.advise.pagesize_summary",
                          "Page size summary",
                          declared(g.PostcopyAdvise, "remote_pagesize_summary"), base=Base.HEX)
ADVISE_TARGET_PAGE = _field("target_page_size", "command.advise.target_page_size",
                            "Target page size", declared(g.PostcopyAdvise, "target_page_size"))

# --- RAM --------------------------------------------------------------------------------

RAM_HEADER = _field("header", "ram.header", "Address | flags", g.RamRecordHeader,
                    base=Base.HEX)
RAM_ADDR = _field("addr", "ram.addr", "Address", g.RamRecordHeader, base=Base.HEX)
RAM_BLOCK = _field("block", "ram.block", "RAM block", g.RamBlockName, base=Base.NONE)
RAM_FILL = _field("fill", "ram.fill", "Fill byte", g.RamZeroFill, base=Base.HEX)
RAM_PAGE = _field("page", "ram.page", "Page data", FieldType.BYTES, base=Base.NONE)
RAM_DATA_LENGTH = _field("data_length", "ram.data_length", "Data length", FieldType.UINT32)
RAM_TOTAL = _field("total_bytes", "ram.total_bytes", "Total RAM bytes", g.RamRecordHeader)
RAM_BLOCKS = _field("blocks", "ram.blocks", "RAM blocks", FieldType.LIST, base=Base.NONE)
RAM_BLOCK_IDSTR = _field("idstr", "ram.blocks.idstr", "Block idstr",
                         declared(g.RamBlockSize, "idstr"), base=Base.NONE)
RAM_BLOCK_LENGTH = _field("used_length", "ram.blocks.used_length", "Block used length",
                          declared(g.RamBlockSize, "used_length"))
RAM_BLOCK_EXTRA = _field("extra", "ram.blocks.extra", "Block page size or address",
                         g.RamBlockExtra, base=Base.HEX)
RAM_PAGES = _field("pages", "ram.pages", "Pages", FieldType.UINT64)
RAM_ZERO_PAGES = _field("zero_pages", "ram.zero_pages", "Zero pages", FieldType.UINT64)
RAM_OTHER = _field("other_records", "ram.other_records", "Other RAM records", FieldType.UINT64)
RAM_PAGE_BYTES = _field("page_bytes", "ram.page_bytes", "Page bytes", FieldType.UINT64)

# --- dirty bitmaps ------------------------------------------------------------------------

BITMAP_FLAGS = _field("flags", "bitmap.flags", "Flags",
                      declared(g.BitmapFlags, "first"), base=Base.HEX,
                      bit_names=_BITMAP_FLAG_NAMES,
                      description="DIRTY_BITMAP_MIG_FLAG_*; QEMU acts on the last byte")
BITMAP_FLAG_BITS = _bits(BITMAP_FLAGS, g.BitmapFlag)
BITMAP_FLAGS_WIDTH = _field("flags_width", "bitmap.flags_width", "Flags width",
                            FieldType.UINT8, description="1, 2 or 4 bytes on the wire")
BITMAP_WIRE_FLAGS = _field("wire_flags", "bitmap.wire_flags", "Flags as written",
                           FieldType.UINT32, base=Base.HEX,
                           description="all flags bytes as one number (the 2017 draft)")
BITMAP_FLAG_NAMES = _field("flag_names", "bitmap.flag_names", "Flag names", FieldType.LIST,
                           base=Base.NONE)
BITMAP_NODE = _field("device_name", "bitmap.node", "Node",
                     declared(g.BitmapRecord, "device_name"), base=Base.NONE,
                     inherited="node",
                     description="node name, BlockBackend name or its alias")
BITMAP_NAME = _field("bitmap_name", "bitmap.name", "Bitmap",
                     declared(g.BitmapRecord, "bitmap_name"), base=Base.NONE,
                     inherited="bitmap", description="bitmap name or its alias")
BITMAP_GRANULARITY = _field("granularity", "bitmap.granularity", "Granularity",
                            declared(g.BitmapRecord, "start", "granularity"),
                            description="bytes per bit; a power of two, 512 .. 2^31")
BITMAP_START_FLAGS = _field("bitmap_flags", "bitmap.start_flags", "Bitmap flags",
                            declared(g.BitmapRecord, "start", "bitmap_flags"), base=Base.HEX,
                            bit_names=_START_FLAG_NAMES,
                            description="DIRTY_BITMAP_MIG_START_FLAG_*; 0xf8 reserved")
BITMAP_START_FLAG_BITS = _bits(BITMAP_START_FLAGS, g.BitmapStartFlag, skip=("RESERVED_MASK",))
BITMAP_START_SECTOR = _field("first_sector", "bitmap.start_sector", "Start sector",
                             declared(g.BitmapRecord, "bits", "first_sector"))
BITMAP_NR_SECTORS = _field("sector_count", "bitmap.nr_sectors", "Sectors",
                           declared(g.BitmapRecord, "bits", "sector_count"))
BITMAP_ZEROES = _field("zeroes", "bitmap.zeroes", "All zeroes", FieldType.BOOL)
BITMAP_BUFFER_SIZE = _field("buffer_size", "bitmap.buffer_size", "Buffer size",
                            declared(g.BitmapRecord, "buffer_size"),
                            description="QEMU refuses more than 10240")
BITMAP_BUFFER = _field("buffer", "bitmap.buffer", "Buffer", declared(g.BitmapRecord, "buffer"),
                       base=Base.NONE)

# --- device state ------------------------------------------------------------------------

DEVICE_METHOD = _field("method", "device.method", "Delimited by", FieldType.STRING,
                       base=Base.NONE, description="vmdesc (walked) or footer (found)")
DEVICE_SIZE = _field("size", "device.size", "State size", FieldType.UINT32)
DEVICE_PAYLOAD = _field("payload", "device.payload", "Device state", FieldType.BYTES,
                        base=Base.NONE)

# --- return path ----------------------------------------------------------------------------

RP_MESSAGE = _field("message_number", "rp.message", "Message", declared(rp.MessageHeader, "type"),
                    values=_values(rp.ReturnPathMessage), span_key="message")
RP_MESSAGE_NAME = _field("message", "rp.message_name", "Message name", FieldType.STRING,
                         base=Base.NONE)
RP_LENGTH = _field("length", "rp.length", "Message length", declared(rp.MessageHeader, "length"))
RP_DATA = _field("data", "rp.data", "Message data", FieldType.STRING, base=Base.NONE,
                 description="hex of a message that could not be read")
RP_VALUE = _field("value", "rp.value", "Value", rp.Be32Value)
RP_START = _field("start", "rp.start", "Start", declared(rp.ReqPages, "start"), base=Base.HEX)
RP_PAGE_BYTES = _field("page_bytes", "rp.page_bytes", "Length", declared(rp.ReqPages, "length"))
RP_BLOCK = _field("block", "rp.block", "RAM block", rp.BlockName, base=Base.NONE)
RP_BITMAP_SIZE = _field("size", "rp.bitmap.size", "Bitmap size",
                        declared(rp.RecvBitmapHead, "size"))
RP_RECEIVED = _field("received_pages", "rp.bitmap.received_pages", "Received pages",
                     FieldType.UINT64)
RP_ENDING = _field("ending", "rp.bitmap.ending", "End marker", FieldType.STRING, base=Base.NONE,
                   description=f"QEMU expects {rp.RECV_BITMAP_ENDING:#018x}")


class Kind(StrEnum):
    """Every record kind the decoders emit. A StrEnum: equal to the plain strings, so
    JSON and existing comparisons see no difference."""

    FILE_HEADER = "file-header"
    PACKAGE_END = "package-end"
    EOF = "eof"
    VMDESCRIPTION = "vmdescription"
    CONFIGURATION = "configuration"
    SECTION_START = "section-start"
    SECTION_FULL = "section-full"
    SECTION_PART = "section-part"
    SECTION_END = "section-end"
    FOOTER = "footer"
    COMMAND = "command"
    RAM_PAGES = "ram-pages"
    RAM_PAGE = "ram-page"
    RAM_ZERO = "ram-zero"
    RAM_EOS = "ram-eos"
    RAM_MULTIFD_FLUSH = "ram-multifd-flush"
    RAM_HOOK = "ram-hook"
    RAM_XBZRLE = "ram-xbzrle"
    RAM_COMPRESSED = "ram-compressed"
    RAM_MEM_SIZE = "ram-mem-size"
    BITMAP_EMPTY = "bitmap-empty"
    BITMAP_START = "bitmap-start"
    BITMAP_COMPLETE = "bitmap-complete"
    BITMAP_BITS = "bitmap-bits"
    BITMAP_EOS = "bitmap-eos"
    DEVICE_STATE = "device-state"
    RP_MESSAGE = "rp-message"
    RP_RECV_BITMAP = "rp-recv-bitmap"

    @property
    def info(self) -> KindInfo:
        return KINDS[self]

    @property
    def is_bitmap(self) -> bool:
        return self in BITMAP_KINDS

    @property
    def is_ram(self) -> bool:
        return self.value.startswith("ram-")

    @property
    def short(self) -> str:
        """The kind without its family prefix (`kind == BITS` in the display filter)."""
        return self.value.rsplit("-", 1)[-1]


def bitmap_kind(record_kind: g.RecordKind) -> Kind:
    """The record Kind of a dirty-bitmap record whose body QEMU's loader reads as `record_kind`."""
    return Kind("bitmap-" + record_kind.label)


BITMAP_KINDS = frozenset(bitmap_kind(kind) for kind in g.RecordKind)


@dataclass(frozen=True, slots=True)
class KindInfo:
    """A record kind: its label, the item type byte it starts with, its wire fields in
    wire order, and the fields the decoder derives or inherits (not bytes of their own)."""

    kind: Kind
    label: str
    item: g.ItemType | None = None
    wire: tuple[FieldInfo, ...] = ()
    generated: tuple[FieldInfo, ...] = ()
    by_key: dict[str, FieldInfo] = field(default_factory=dict, compare=False)
    by_span: dict[str, FieldInfo] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for info in self.wire + self.generated:
            if not info.bitmask:
                self.by_key.setdefault(info.key, info)
        for info in self.wire:
            if not info.bitmask:
                self.by_span.setdefault(info.span_key or info.key, info)

    @property
    def fields(self) -> tuple[FieldInfo, ...]:
        return self.wire + self.generated

    @property
    def summary(self) -> tuple[FieldInfo, ...]:
        """The fields a one-line record summary (dump, the TUI's record list) shows."""
        return tuple(self.by_key[key] for key in SUMMARY_KEYS if key in self.by_key)

    def field_for(self, key: str) -> FieldInfo | None:
        """The field whose value the decoder keeps under `key` in Record.fields."""
        return self.by_key.get(key)

    def field_for_span(self, key: str) -> FieldInfo | None:
        """The field a span key of Record.spans names (a wire field first)."""
        return self.by_span.get(key) or self.by_key.get(key)


# The fields one-line summaries show, in this order, for any kind that has them: enough
# to follow a stream by eye (dump -V and the detail tree show the rest).
SUMMARY_KEYS = tuple(info.key for info in (
    SECTION_IDSTR, SECTION_ID, MACHINE_TYPE, COMMAND_NAME, PACKAGED_LENGTH,
    BITMAP_GRANULARITY, BITMAP_START_FLAGS, BITMAP_START_SECTOR, BITMAP_NR_SECTORS,
    BITMAP_ZEROES, BITMAP_BUFFER_SIZE, RAM_PAGES, RAM_ZERO_PAGES, RAM_TOTAL, DEVICE_METHOD,
    DEVICE_SIZE, VMDESC_DEVICES, RAM_ADDR, RAM_BLOCK))

_SECTION_FULL_WIRE = (ITEM, SECTION_ID, SECTION_IDSTR, SECTION_INSTANCE, SECTION_VERSION)
_BITMAP_WIRE = (BITMAP_FLAGS, *BITMAP_FLAG_BITS, BITMAP_NODE, BITMAP_NAME, BITMAP_GRANULARITY,
                BITMAP_START_FLAGS, *BITMAP_START_FLAG_BITS, BITMAP_START_SECTOR,
                BITMAP_NR_SECTORS, BITMAP_BUFFER_SIZE, BITMAP_BUFFER)
_BITMAP_GENERATED = (BITMAP_FLAGS_WIDTH, BITMAP_WIRE_FLAGS, BITMAP_FLAG_NAMES, BITMAP_ZEROES)
_RAM_RECORD_WIRE = (RAM_HEADER, RAM_ADDR, RAM_BLOCK)
_BITMAP_LABELS = {
    g.RecordKind.EMPTY: "Dirty bitmap record without a body",
    g.RecordKind.START: "Dirty bitmap START",
    g.RecordKind.COMPLETE: "Dirty bitmap COMPLETE",
    g.RecordKind.BITS: "Dirty bitmap BITS",
    g.RecordKind.EOS: "Dirty bitmap EOS",
}

KINDS: dict[Kind, KindInfo] = {info.kind: info for info in (
    KindInfo(Kind.FILE_HEADER, "File header", None, (FILE_MAGIC, FILE_VERSION)),
    KindInfo(Kind.PACKAGE_END, "End of a PACKAGED command's stream"),
    KindInfo(Kind.EOF, "End of the stream", g.ItemType.EOF, (ITEM,)),
    KindInfo(Kind.VMDESCRIPTION, "VM description", g.ItemType.VMDESCRIPTION,
             (ITEM, VMDESC_LENGTH, VMDESC_JSON), (VMDESC_VALID, VMDESC_DEVICES)),
    KindInfo(Kind.CONFIGURATION, "Configuration", g.ItemType.CONFIGURATION,
             (ITEM, CONFIG_LENGTH, MACHINE_TYPE, CONFIG_SUBSECTIONS)),
    KindInfo(Kind.SECTION_START, "Section start", g.ItemType.SECTION_START, _SECTION_FULL_WIRE),
    KindInfo(Kind.SECTION_FULL, "Section full", g.ItemType.SECTION_FULL, _SECTION_FULL_WIRE),
    KindInfo(Kind.SECTION_PART, "Section part", g.ItemType.SECTION_PART,
             (ITEM, SECTION_ID), (SECTION_IDSTR,)),
    KindInfo(Kind.SECTION_END, "Section end", g.ItemType.SECTION_END,
             (ITEM, SECTION_ID), (SECTION_IDSTR,)),
    KindInfo(Kind.FOOTER, "Section footer", g.ItemType.SECTION_FOOTER, (ITEM, FOOTER_ID)),
    KindInfo(Kind.COMMAND, "Command", g.ItemType.COMMAND,
             (ITEM, COMMAND, COMMAND_LENGTH, PACKAGED_LENGTH, PING_VALUE, ADVISE_PAGESIZES,
              ADVISE_TARGET_PAGE, COMMAND_DATA), (COMMAND_NAME,)),
    KindInfo(Kind.RAM_PAGES, "RAM pages", None, (),
             (RAM_PAGES, RAM_ZERO_PAGES, RAM_OTHER, RAM_PAGE_BYTES)),
    KindInfo(Kind.RAM_PAGE, "RAM page", None, (*_RAM_RECORD_WIRE, RAM_PAGE)),
    KindInfo(Kind.RAM_ZERO, "RAM zero page", None, (*_RAM_RECORD_WIRE, RAM_FILL)),
    KindInfo(Kind.RAM_EOS, "RAM end of section", None, (RAM_HEADER,)),
    KindInfo(Kind.RAM_MULTIFD_FLUSH, "RAM multifd flush", None, (RAM_HEADER,)),
    KindInfo(Kind.RAM_HOOK, "RAM hook (RDMA)", None, (RAM_HEADER,)),
    KindInfo(Kind.RAM_XBZRLE, "RAM XBZRLE page", None, (*_RAM_RECORD_WIRE, RAM_DATA_LENGTH)),
    KindInfo(Kind.RAM_COMPRESSED, "RAM compressed page", None,
             (*_RAM_RECORD_WIRE, RAM_DATA_LENGTH)),
    KindInfo(Kind.RAM_MEM_SIZE, "RAM block sizes", None,
             (RAM_TOTAL, RAM_BLOCKS, RAM_BLOCK_IDSTR, RAM_BLOCK_LENGTH, RAM_BLOCK_EXTRA)),
    *(KindInfo(bitmap_kind(kind), _BITMAP_LABELS[kind], None, _BITMAP_WIRE, _BITMAP_GENERATED)
      for kind in g.RecordKind),
    KindInfo(Kind.DEVICE_STATE, "Device state", None, (DEVICE_PAYLOAD,),
             (SECTION_IDSTR, SECTION_INSTANCE, DEVICE_METHOD, DEVICE_SIZE)),
    KindInfo(Kind.RP_MESSAGE, "Return-path message", None,
             (RP_MESSAGE, RP_LENGTH, RP_VALUE, RP_START, RP_PAGE_BYTES, RP_BLOCK, RP_DATA),
             (RP_MESSAGE_NAME,)),
    KindInfo(Kind.RP_RECV_BITMAP, "Received-pages bitmap", None,
             (RP_BITMAP_SIZE, RP_ENDING), (RP_BLOCK, RP_RECEIVED)),
)}

# Every registered field, once per filter name (bit fields included), and which kinds
# carry it: a filter on `bitmap.granularity` looks only there.
FIELDS: dict[str, FieldInfo] = {}
_kinds_of: dict[str, set[Kind]] = {}
for _info in KINDS.values():
    for _field_info in _info.fields:
        FIELDS.setdefault(_field_info.filter_name, _field_info)
        _kinds_of.setdefault(_field_info.filter_name, set()).add(_info.kind)
KINDS_OF: dict[str, frozenset[Kind]] = {name: frozenset(kinds)
                                        for name, kinds in _kinds_of.items()}
del _info, _field_info, _kinds_of

# Every key the decoders put in Record.fields, for the display filter's short names.
RECORD_KEYS = frozenset(info.key for info in FIELDS.values())


def lookup(name: str) -> FieldInfo | None:
    """A field by filter name, with or without Wireshark's `qemu_mig.` prefix."""
    if name.startswith(ABBREV_PREFIX):
        name = name[len(ABBREV_PREFIX):]
    return FIELDS.get(name)


def kind_info(kind: str) -> KindInfo | None:
    try:
        return KINDS[Kind(kind)]
    except ValueError:
        return None


def field_value(record: RecordLike, info: FieldInfo) -> Any:
    """The value of a registered field in `record`, or None if the record has none.

    Looks only in the kinds that carry the field; takes an inherited value (a bitmap
    record's node and bitmap) from the record when its fields do not name it; a bit
    field is True or False.
    """
    if record.kind not in KINDS_OF[info.filter_name]:
        return None
    if info is ITEM:
        item = KINDS[Kind(record.kind)].item
        return None if item is None else int(item)
    value = record.fields.get(info.key)
    if value is None and info.inherited is not None:
        value = getattr(record, info.inherited, None)
    if value is None or not info.bitmask:
        return value
    return bool(value & info.bitmask) if isinstance(value, int) else None


# --- describe: field views for a record ------------------------------------------------


class RecordLike(Protocol):
    """What describe() reads of a record (analyzer.records.Record has it all)."""

    offset: int
    length: int
    kind: str
    fields: dict[str, Any]
    spans: tuple[tuple[str, int, int], ...] | None
    node: str | None
    bitmap: str | None


@dataclass(frozen=True, slots=True)
class FieldView:
    """One field of one record: what it is, its value and the bytes it occupies.

    `generated` is Wireshark's generated field: derived or inherited, no bytes of its
    own (its range is the whole record). `exact` says the range is the field's own.
    """

    info: FieldInfo
    value: Any
    offset: int
    length: int
    generated: bool = False
    exact: bool = True
    name: str = ""  # the span key when it indexes into a list ("blocks[0].idstr")

    @property
    def label(self) -> str:
        return self.name or self.info.key

    @property
    def text(self) -> str:
        if self.value is None and self.info.type is FieldType.BYTES and not self.generated:
            # Bytes the decoder locates but does not keep (VMDESCRIPTION's JSON, a large
            # BITS buffer): the hex pane shows them; the tree says how many there are.
            return f"{self.length} bytes"
        return self.info.display(self.value)

    @property
    def registered(self) -> bool:
        return self.info.description != UNREGISTERED


_INDEXED = re.compile(r"\[(\d+)\]")


def _path_value(fields: Mapping[str, Any], key: str) -> Any:
    """The value at a span key like `blocks[1].used_length` (None when absent)."""
    node: Any = fields
    for part in key.split("."):
        name = part.split("[", 1)[0]
        node = node.get(name) if isinstance(node, Mapping) else None
        for index in _INDEXED.findall(part):
            node = node[int(index)] if isinstance(node, list) and int(index) < len(node) else None
        if node is None:
            return None
    return node


UNREGISTERED = "not in the registry"


def _unregistered(key: str) -> FieldInfo:
    """A stand-in for a key the registry lacks, so that the record still shows it."""
    return FieldInfo(key, key, key, FieldType.STRING, Base.NONE, description=UNREGISTERED)


def _view_value(record: RecordLike, info: FieldInfo, span_key: str) -> Any:
    if info is ITEM:
        return field_value(record, info)
    if "[" in span_key:
        return _path_value(record.fields, span_key)
    return record.fields.get(info.key)


def describe(record: RecordLike) -> list[FieldView]:
    """Every field of `record`, in wire order, then its generated fields.

    With spans (the decoder's byte ranges), each wire field gets its own bytes and a
    flags field is followed by its bit fields. Without spans there are no byte
    ranges: the fields the record holds are listed over the whole record.
    Keys the registry does not know are listed too (over the whole record).
    """
    info = kind_info(record.kind)
    whole = (record.offset, record.length)
    out: list[FieldView] = []
    shown: set[str] = set()
    kind_fields = info.wire if info else ()
    if record.spans is not None:
        for key, offset, length in record.spans:
            field_info = _span_info(info, key) or _unregistered(key)
            out.append(FieldView(field_info, _view_value(record, field_info, key), offset,
                                 length, name=key if "[" in key else ""))
            out.extend(FieldView(bit, record.fields.get(bit.key), offset, length)
                       for bit in kind_fields if bit.bitmask and bit.parent ==
                       field_info.filter_name and bit.key in record.fields)
            shown.add(field_info.key)
            if "[" in key:  # the list a `blocks[0].idstr` span is part of
                shown.add(key.split("[", 1)[0])
    else:
        for field_info in kind_fields:
            if field_info.bitmask or field_info.key not in record.fields:
                continue
            out.append(FieldView(field_info, record.fields[field_info.key], *whole,
                                 exact=False))
            shown.add(field_info.key)
    for field_info in (info.fields if info else ()):
        if field_info.bitmask or field_info.key in shown:
            continue
        value = record.fields.get(field_info.key)
        if value is None and field_info.inherited is not None and not _lone_eos(record):
            value = getattr(record, field_info.inherited, None)
        if value is None:
            continue
        out.append(FieldView(field_info, value, *whole, generated=True, exact=False))
        shown.add(field_info.key)
    for key, value in record.fields.items():
        if key not in shown:
            out.append(FieldView(_unregistered(key), value, *whole, generated=True,
                                 exact=False))
    return out


def _span_info(info: KindInfo | None, key: str) -> FieldInfo | None:
    """The field a span key names; a key inside a list (`blocks[0].idstr`) names the
    list's element field (ram.blocks.idstr)."""
    if info is None:
        return None
    if "[" not in key:
        return info.field_for_span(key)
    plain = _INDEXED.sub("", key)
    for field_info in info.wire:
        if field_info.filter_name.endswith("." + plain) or field_info.key == plain.rsplit(".")[-1]:
            return field_info
    return None


def _lone_eos(record: RecordLike) -> bool:
    """A dirty-bitmap record whose flags are exactly EOS applies to no bitmap."""
    flags = record.fields.get("flags")
    return isinstance(flags, int) and flags == flags & g.BitmapFlag.EOS


__all__ = [
    "ABBREV_PREFIX", "BITMAP_KINDS", "FIELDS", "KINDS", "KINDS_OF", "RECORD_KEYS", "SUMMARY_KEYS",
    "Base",
    "FieldInfo", "FieldType", "FieldView", "Kind", "KindInfo", "bitmap_kind", "declared",
    "describe", "field_value", "kind_info", "lookup", "wire_type",
]
