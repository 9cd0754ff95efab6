"""Scapy layers for the QEMU migration stream and its dirty-bitmap records.

For scapy users: dissect, show and build migration items and dirty-bitmap records with
the usual scapy tools. The format is the one in dissectors/grammar.py (the single
source of truth; the tests check that both agree byte for byte). migshark itself does
not dissect packets with these classes: its live capture feeds raw frames to its own
reassembly and decoder, and uses this layer for display and building.

A TCP segment is only a slice of the stream, so dissection per packet is best effort:
it starts at a recognisable item (the QEVM header, a section header, a command, a
footer) and stops being meaningful where a RAM or device payload begins (shown as Raw).
After a dirty-bitmap SECTION_START the records are dissected up to EOS. For whole
streams, use `migshark analyze`/`dump`, which reassemble TCP and track sections.

Example (as root)::

    from scapy.all import sniff
    from migshark.dissectors.scapy_layer import DirtyBitmapRecord, QemuMigration, bind_port

    bind_port(4444)  # TCP payloads sent to port 4444 dissect as QemuMigration
    packets = sniff(iface="lo", filter="tcp port 4444", count=50)
    for pkt in packets:
        if pkt.haslayer(DirtyBitmapRecord):
            pkt[DirtyBitmapRecord].show()

    # building: a START record, through the same field layout as the grammar
    rec = DirtyBitmapRecord(flags="START+DEVICE_NAME+BITMAP_NAME",
                            device_name=b"drive0", bitmap_name=b"bitmap0",
                            granularity=65536, bitmap_flags="enabled")
    raw = bytes(rec)

Mind the snaplen when sniffing loopback: GSO frames reach 65549 bytes, more than
scapy's default MTU of 65535.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from scapy.config import conf
from scapy.fields import (
    ByteEnumField,
    ConditionalField,
    FieldLenField,
    FlagsField,
    IntField,
    LongField,
    ShortEnumField,
    ShortField,
    StrFixedLenField,
    StrLenField,
)
from scapy.packet import Packet, bind_layers

from migshark.dissectors import grammar as g
from migshark.dissectors import registry as reg

ITEM_TYPES = dict(reg.ITEM.values or {})
COMMANDS = dict(reg.COMMAND.values or {})


def _flag_names(field: reg.FieldInfo, width: int, spell: Callable[[str], str]) -> list[str]:
    """A FlagsField's names, bit 0 upwards, from the registry's bit fields; a bit the
    registry does not name is `reservedN`."""
    names = {bit.bit_length() - 1: spell(name) for bit, name in (field.bit_names or {}).items()}
    return [names.get(index, f"reserved{index}") for index in range(width)]


BITMAP_FLAG_NAMES = _flag_names(reg.BITMAP_FLAGS, 8, str)
BITMAP_START_FLAG_NAMES = _flag_names(reg.BITMAP_START_FLAGS, 8, str.lower)


class QemuMigration(Packet):
    """Dispatcher: `QemuMigration(data)` becomes the item class that `data` starts with."""

    name = "QEMU migration"
    fields_desc: ClassVar[list[Any]] = []

    @classmethod
    def dispatch_hook(cls, _pkt: bytes | None = None, *args: Any, **kargs: Any) -> type:
        if not _pkt:
            return cls
        if _pkt[:4] == g.QEVM_MAGIC:
            return QemuFileHeader
        return _ITEM_CLASSES.get(_pkt[0], conf.raw_layer)


class _Item(Packet):
    """An item that the next item follows directly."""

    def guess_payload_class(self, payload: bytes) -> type:
        return QemuMigration


class QemuFileHeader(_Item):
    name = "QEMU file header"
    fields_desc = [
        StrFixedLenField("magic", g.QEVM_MAGIC, 4),
        IntField("version", g.QEVM_VERSION),
    ]

    def mysummary(self) -> str:
        return self.sprintf("QEMU %magic% version %version%")


class QemuEOF(_Item):
    name = "QEMU EOF"
    fields_desc = [ByteEnumField("type", g.ItemType.EOF, ITEM_TYPES)]


class QemuSectionStart(Packet):
    """SECTION_START or SECTION_FULL: id, idstr, instance and version, then the payload."""

    name = "QEMU section start"
    fields_desc = [
        ByteEnumField("type", g.ItemType.SECTION_START, ITEM_TYPES),
        IntField(reg.SECTION_ID.key, 0),
        FieldLenField("idstr_len", None, length_of=reg.SECTION_IDSTR.key, fmt="B"),
        StrLenField(reg.SECTION_IDSTR.key, b"", length_from=lambda p: p.idstr_len),
        IntField(reg.SECTION_INSTANCE.key, 0),
        IntField(reg.SECTION_VERSION.key, 0),
    ]

    def guess_payload_class(self, payload: bytes) -> type:
        if self.idstr == g.DIRTY_BITMAP_SECTION_IDSTR.encode():
            return DirtyBitmapRecord
        return conf.raw_layer  # RAM and device payloads need state to delimit

    def mysummary(self) -> str:
        return self.sprintf("QEMU %type% id=%section_id% %idstr% v%version_id%")


class QemuSectionPart(Packet):
    """SECTION_PART or SECTION_END: only the id; which section it is needs stream state."""

    name = "QEMU section part"
    fields_desc = [
        ByteEnumField("type", g.ItemType.SECTION_PART, ITEM_TYPES),
        IntField("section_id", 0),
    ]

    def guess_payload_class(self, payload: bytes) -> type:
        return conf.raw_layer

    def mysummary(self) -> str:
        return self.sprintf("QEMU %type% id=%section_id%")


class QemuSectionFooter(_Item):
    name = "QEMU section footer"
    fields_desc = [
        ByteEnumField("type", g.ItemType.SECTION_FOOTER, ITEM_TYPES),
        IntField("section_id", 0),
    ]

    def mysummary(self) -> str:
        return self.sprintf("QEMU footer id=%section_id%")


class QemuConfiguration(_Item):
    name = "QEMU configuration"
    fields_desc = [
        ByteEnumField("type", g.ItemType.CONFIGURATION, ITEM_TYPES),
        FieldLenField("length", None, length_of="machine_type", fmt="I"),
        StrLenField(reg.MACHINE_TYPE.key, b"", length_from=lambda p: p.length),
    ]

    def mysummary(self) -> str:
        return self.sprintf("QEMU configuration %machine_type%")


class QemuVmDescription(_Item):
    name = "QEMU VM description"
    fields_desc = [
        ByteEnumField("type", g.ItemType.VMDESCRIPTION, ITEM_TYPES),
        FieldLenField("length", None, length_of="json", fmt="I"),
        StrLenField("json", b"", length_from=lambda p: p.length),
    ]


class QemuCommand(_Item):
    """QEMU_VM_COMMAND. PACKAGED's data is the length of the nested items that follow."""

    name = "QEMU command"
    fields_desc = [
        ByteEnumField("type", g.ItemType.COMMAND, ITEM_TYPES),
        ShortEnumField("command", g.Command.PING, COMMANDS),  # the registry's command_number
        FieldLenField("length", None, length_of="data", fmt="H"),
        StrLenField("data", b"", length_from=lambda p: p.length),
    ]

    def mysummary(self) -> str:
        return self.sprintf("QEMU command %command% (%length% bytes)")


def effective_flags(pkt: Packet) -> int:
    """What a QEMU reader acts on: it keeps the flags in a uint8_t, so with the 2- and
    4-byte forms only the last byte survives (see grammar.BitmapFlags)."""
    first = int(pkt.flags)
    if not first & g.BitmapFlag.EXTRA_FLAGS:
        return first
    second = int(pkt.flags2)
    if not second & g.BitmapFlag.EXTRA_FLAGS:
        return second
    return int(pkt.flags_tail) & 0xFF


def record_kind(pkt: Packet) -> str:
    """"start", "complete", "bits", "eos" or "empty": the grammar's rule (START wins over
    COMPLETE over BITS, as in dirty_bitmap_load())."""
    return g.record_kind(effective_flags(pkt)).label


def _has(flag: int) -> Any:
    return lambda pkt: bool(effective_flags(pkt) & flag)


def _kind_is(kind: g.RecordKind) -> Callable[[Packet], bool]:
    return lambda pkt: g.record_kind(effective_flags(pkt)) == kind


_bits = _kind_is(g.RecordKind.BITS)
_start = _kind_is(g.RecordKind.START)


def _bits_buffer(pkt: Packet) -> bool:
    return _bits(pkt) and not effective_flags(pkt) & g.BitmapFlag.ZEROES


class DirtyBitmapRecord(Packet):
    """One record of the dirty-bitmap section (migration/block-dirty-bitmap.c)."""

    name = "QEMU dirty bitmap record"
    fields_desc = [
        FlagsField("flags", 0, 8, BITMAP_FLAG_NAMES),
        ConditionalField(FlagsField("flags2", 0, 8, BITMAP_FLAG_NAMES),
                         lambda p: bool(int(p.flags) & g.BitmapFlag.EXTRA_FLAGS)),
        ConditionalField(ShortField("flags_tail", 0),
                         lambda p: bool(int(p.flags) & g.BitmapFlag.EXTRA_FLAGS
                                        and int(p.flags2) & g.BitmapFlag.EXTRA_FLAGS)),
        ConditionalField(FieldLenField("device_name_len", None, length_of="device_name",
                                       fmt="B"), _has(g.BitmapFlag.DEVICE_NAME)),
        ConditionalField(StrLenField(reg.BITMAP_NODE.key, b"",
                                     length_from=lambda p: p.device_name_len),
                         _has(g.BitmapFlag.DEVICE_NAME)),
        ConditionalField(FieldLenField("bitmap_name_len", None, length_of="bitmap_name",
                                       fmt="B"), _has(g.BitmapFlag.BITMAP_NAME)),
        ConditionalField(StrLenField(reg.BITMAP_NAME.key, b"",
                                     length_from=lambda p: p.bitmap_name_len),
                         _has(g.BitmapFlag.BITMAP_NAME)),
        ConditionalField(IntField(reg.BITMAP_GRANULARITY.key, 65536), _start),
        ConditionalField(FlagsField(reg.BITMAP_START_FLAGS.key, 0, 8, BITMAP_START_FLAG_NAMES),
                         _start),
        ConditionalField(LongField(reg.BITMAP_START_SECTOR.key, 0), _bits),
        ConditionalField(IntField(reg.BITMAP_NR_SECTORS.key, 0), _bits),
        ConditionalField(FieldLenField(reg.BITMAP_BUFFER_SIZE.key, None,
                                       length_of=reg.BITMAP_BUFFER.key, fmt="Q"),
                         _bits_buffer),
        ConditionalField(StrLenField(reg.BITMAP_BUFFER.key, b"",
                                     length_from=lambda p: p.buffer_size),
                         _bits_buffer),
    ]

    def guess_payload_class(self, payload: bytes) -> type:
        if effective_flags(self) & g.BitmapFlag.EOS:
            return QemuMigration  # the section footer comes next
        return DirtyBitmapRecord

    def mysummary(self) -> str:
        kind = record_kind(self).upper()
        names = "/".join(n.decode(errors="replace") for n in (self.device_name,
                                                               self.bitmap_name) if n)
        text = f"DirtyBitmap {kind}" + (f" {names}" if names else "")
        if kind == "START":
            text += f" granularity={self.granularity} flags={self.bitmap_flags}"
        elif kind == "BITS":
            text += f" sectors {self.first_sector}+{self.sector_count}"
            text += f" buffer={self.buffer_size}" if _bits_buffer(self) else " zeroes"
        return text


_ITEM_CLASSES: dict[int, type] = {
    g.ItemType.EOF: QemuEOF,
    g.ItemType.SECTION_START: QemuSectionStart,
    g.ItemType.SECTION_FULL: QemuSectionStart,
    g.ItemType.SECTION_PART: QemuSectionPart,
    g.ItemType.SECTION_END: QemuSectionPart,
    g.ItemType.SECTION_FOOTER: QemuSectionFooter,
    g.ItemType.CONFIGURATION: QemuConfiguration,
    g.ItemType.VMDESCRIPTION: QemuVmDescription,
    g.ItemType.COMMAND: QemuCommand,
}


def bind_port(port: int) -> None:
    """Dissect TCP payloads sent to `port` (the destination's) as the migration stream.

    The other direction is the return path, a different format: not bound.
    """
    from scapy.layers.inet import TCP

    bind_layers(TCP, QemuMigration, dport=port)


__all__ = [
    "DirtyBitmapRecord",
    "QemuCommand",
    "QemuConfiguration",
    "QemuEOF",
    "QemuFileHeader",
    "QemuMigration",
    "QemuSectionFooter",
    "QemuSectionPart",
    "QemuSectionStart",
    "QemuVmDescription",
    "bind_port",
    "effective_flags",
    "record_kind",
]
