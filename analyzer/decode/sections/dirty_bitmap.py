"""The dirty-bitmap section payload (migration/block-dirty-bitmap.c, version 1).

Reads like QEMU's loader, top to bottom:

- `read` is `dirty_bitmap_load`: one record per call, until a record whose flags
  contain EOS ends the payload;
- `_load_header` is `dirty_bitmap_load_header`: the flags (1, 2 or 4 bytes), then the
  DEVICE_NAME and BITMAP_NAME counted strings when flagged; a record without one keeps
  the name of the record before;
- then the body the flags select, START over COMPLETE over BITS:
  `_load_start` (be32 granularity, u8 bitmap flags), `_load_complete` (nothing),
  `_load_bits` (be64 first sector, be32 sector count, and unless ZEROES a be64 buffer
  size and the buffer).

The bytes are parsed with the grammar's `BitmapRecordHead` (flags, names and the fixed
part of the body, everything before the buffer); heads whose first byte fixes their
layout are read with one struct unpack of the grammar's own formats. This module checks
the record's framing only; what a destination would make of the bitmap is
analyzer.bitmaps' business.
"""

from __future__ import annotations

import functools
import struct
from typing import TYPE_CHECKING, Any

from construct import ConstructError

from migshark.analyzer import findings
from migshark.analyzer.decode.parsers import GrammarParser
from migshark.analyzer.decode.resync import printable
from migshark.analyzer.decode.sections.base import SectionDissector, register
from migshark.analyzer.findings import Code
from migshark.dissectors import grammar as g
from migshark.dissectors.registry import bitmap_kind

if TYPE_CHECKING:
    from migshark.analyzer.decode.framing import FramingMachine, NeedMore, Section

Spans = tuple[tuple[str, int, int], ...]

_IDSTR = g.DIRTY_BITMAP_SECTION_IDSTR
# A BITS buffer QEMU refuses is still skipped (to keep decoding) up to this size;
# beyond it the length is treated as garbage and we resynchronise.
MAX_SKIPPED_BITMAP_BUFFER = 64 << 20

_BITMAP_START_LEN = g.BitmapStart.sizeof()
_BITMAP_BITS_HEAD_LEN = g.BitmapBitsHead.sizeof()
_BF_ZEROES, _BF_EOS = int(g.BitmapFlag.ZEROES), int(g.BitmapFlag.EOS)
_BF_EXTRA = int(g.BitmapFlag.EXTRA_FLAGS)
_KIND_START, _KIND_COMPLETE = int(g.RecordKind.START), int(g.RecordKind.COMPLETE)
_KIND_BITS = int(g.RecordKind.BITS)
_KIND_NAMES = {kind.value: bitmap_kind(kind) for kind in g.RecordKind}
# PART, END and the footer all carry just a section id after the type byte.
_SECTION_ID = struct.Struct(">" + g.fixed_format(g.SectionHeaderShort))
_FOOTER, _PART = int(g.ItemType.SECTION_FOOTER), int(g.ItemType.SECTION_PART)
_END, _FULL, _EOF = int(g.ItemType.SECTION_END), int(g.ItemType.SECTION_FULL), \
    int(g.ItemType.EOF)
# What may follow a dirty-bitmap payload whose EOS was lost.
_ITEM_AFTER_PAYLOAD = frozenset((_FOOTER, _PART, _END, _FULL, _EOF))
_NAMES_OR_EXTRA_FLAGS = int(g.BitmapFlag.DEVICE_NAME | g.BitmapFlag.BITMAP_NAME
                            | g.BitmapFlag.EXTRA_FLAGS)


_bitmap_head = GrammarParser(g.BitmapRecordHead)  # a head of a new shape or with names


def _head_layout(head: Any) -> tuple[int, Spans]:
    """The head's length and its fields' spans relative to its first byte, in wire
    order (the buffer, which follows the head, is not included)."""
    # Item access: construct's Container attribute access costs a function call each.
    at: int = head["flags"]["width"]
    spans: list[tuple[str, int, int]] = [("flags", 0, at)]
    for key in ("device_name", "bitmap_name"):
        name = head[key]
        if name is not None:
            size = 1 + len(name.encode("utf-8", "surrogateescape"))
            spans.append((key, at, size))
            at += size
    if head["start"] is not None:
        spans += (("granularity", at, 4), ("bitmap_flags", at + 4, 1))
        at += _BITMAP_START_LEN
    if head["bits"] is not None:
        spans += (("first_sector", at, 8), ("sector_count", at + 8, 4))
        at += _BITMAP_BITS_HEAD_LEN
    if head["buffer_size"] is not None:
        spans.append(("buffer_size", at, 8))
        at += 8
    return at, tuple(spans)


class _OneByteHead:
    """A head the grammar parsed to its flags byte alone (EOS, COMPLETE without
    names...): it depends on that byte only. Real streams repeat them by the
    thousand (idle iterations)."""

    length = 1

    def __init__(self, head: Any, spans: Spans) -> None:
        self.head = head
        self.spans = spans

    def read(self, buf: bytearray, pos: int) -> Any:
        return self.head


class _FixedHead:
    """A dirty-bitmap record head whose flags byte fixes its layout (no names, one
    flags byte), as the grammar parsed it once; later heads that start with the same
    byte are read with one unpack of the grammar's own field formats. Most BITS
    records of a real stream are of this kind, a thousand per GiB of disk."""

    def __init__(self, head: Any, spans: Spans) -> None:
        self.spans = spans
        self.flags = head["flags"]
        self.kind = head["kind"]
        self.parts: list[tuple[str, list[str] | None]] = []
        fmt = ">x"
        for key, declaration in (("start", g.BitmapStart), ("bits", g.BitmapBitsHead)):
            if head[key] is not None:
                fmt += g.fixed_format(declaration)
                self.parts.append((key, [field.name for field in declaration.subcons]))
        if head["buffer_size"] is not None:
            fmt += g.BitmapBufferSize.fmtstr[1:]
            self.parts.append(("buffer_size", None))
        layout = struct.Struct(fmt)
        self.length = layout.size
        self.unpack = layout.unpack_from

    def read(self, buf: bytearray, pos: int) -> dict[str, Any]:
        values = self.unpack(buf, pos)
        head: dict[str, Any] = {"flags": self.flags, "device_name": None, "bitmap_name": None,
                                "kind": self.kind, "start": None, "bits": None,
                                "buffer_size": None}
        at = 0
        for key, names in self.parts:
            if names is None:
                head[key] = values[at]
                at += 1
            else:
                head[key] = dict(zip(names, values[at : at + len(names)], strict=True))
                at += len(names)
        return head


_ONE_BYTE_HEADS: dict[int, _OneByteHead] = {}
_FIXED_HEADS: dict[int, _FixedHead] = {}


@functools.lru_cache(maxsize=512)
def _flag_names(flags: int) -> list[str]:
    return [flag.name for flag in g.BitmapFlag if flags & flag and flag.name]


@register(_IDSTR)
class DirtyBitmapDissector(SectionDissector):
    description = "a dirty-bitmap record"

    def __init__(self, machine: FramingMachine) -> None:
        super().__init__(machine)
        # DEVICE_NAME and BITMAP_NAME of the last record that carried them: a record
        # without them means these (dirty_bitmap_load_header's DBMLoadState).
        self.node: str | None = None
        self.bitmap: str | None = None
        self.saw_eos = False

    def begin(self, section: Section, item_type: int) -> None:
        if section.version_id != g.DIRTY_BITMAP_SECTION_VERSION and item_type in (
            g.ItemType.SECTION_START, g.ItemType.SECTION_FULL
        ):
            self.machine.emit(findings.make(
                Code.BAD_SECTION_VERSION,
                f"dirty-bitmap section version {section.version_id}; QEMU loads only "
                f"version {g.DIRTY_BITMAP_SECTION_VERSION}",
                self.machine.item_start, section=section.idstr,
                fields={"version_id": section.version_id,
                        "expected": g.DIRTY_BITMAP_SECTION_VERSION}))
        self.saw_eos = False

    def ended_inside(self, end: int) -> None:
        if not self.saw_eos:
            self.machine.emit(findings.make(
                Code.MISSING_EOS,
                "the dirty-bitmap section payload ended (end of data) without an EOS "
                "record", end, section=_IDSTR, fields={"ended_at": "end of data"}))

    def plausible_start(self, buf: bytearray, pos: int, limit: int) -> bool | None:
        if pos >= limit:
            return None
        flags = buf[pos]
        return flags & _BF_EXTRA == 0 and flags != 0

    # --- dirty_bitmap_load ---------------------------------------------------------

    def read(self) -> NeedMore | None:
        """One record; the payload ends after the record whose flags contain EOS."""
        machine = self.machine
        avail = machine.available()
        if avail < 1:
            return machine.short(1, "a dirty-bitmap record")
        eos_check = self._missing_eos_here()
        if eos_check is not None:
            return eos_check or None
        loaded = self._load_header(avail)
        if not isinstance(loaded, tuple):
            return loaded
        head, head_len, spans = loaded
        kind = head["kind"]
        if kind == _KIND_START:
            return self._load_start(head, head_len, spans)
        if kind == _KIND_COMPLETE:
            return self._load_complete(head, head_len, spans)
        if kind == _KIND_BITS:
            return self._load_bits(head, head_len, spans, avail)
        return self._record(head, head_len, spans, None, 0)  # EOS alone, or nothing

    def _load_header(self, avail: int) -> tuple[Any, int, Spans] | NeedMore | None:
        """Flags and names (with the fixed part of the body the flags select): the
        head, its length and relative spans, or the NeedMore to wait for."""
        rb = self.rb
        buf = rb.data
        pos = rb.pos
        first = buf[pos]
        known: _OneByteHead | _FixedHead | None = _ONE_BYTE_HEADS.get(first)
        if known is None:
            known = _FIXED_HEADS.get(first)
        if known is not None and avail >= known.length:
            return known.read(buf, pos), known.length, known.spans
        probe = min(avail, g.BITMAP_RECORD_HEAD_MAX)
        try:
            head = _bitmap_head.parse(bytes(buf[pos : pos + probe]))
        except (ConstructError, struct.error):  # compiled parsers raise struct.error
            if avail >= g.BITMAP_RECORD_HEAD_MAX:
                raise  # cannot happen: the head is never longer than its bound
            return self.machine.short(avail + 1, "a dirty-bitmap record")
        head_len, spans = _head_layout(head)
        if head_len == 1:
            _ONE_BYTE_HEADS[first] = _OneByteHead(head, spans)
        elif not first & _NAMES_OR_EXTRA_FLAGS:
            layout = _FixedHead(head, spans)
            if layout.length == head_len:
                _FIXED_HEADS[first] = layout
        return head, head_len, spans

    def _load_start(self, head: Any, head_len: int, spans: Spans) -> NeedMore | None:
        # Granularity and bitmap flags are judged by analyzer.bitmaps (the tracker
        # knows the destination); here the record only has to be framed.
        return self._record(head, head_len, spans, None, 0)

    def _load_complete(self, head: Any, head_len: int, spans: Spans) -> NeedMore | None:
        return self._record(head, head_len, spans, None, 0)

    def _load_bits(self, head: Any, head_len: int, spans: Spans, avail: int
                   ) -> NeedMore | None:
        buffer_size = head["buffer_size"]
        if buffer_size is None:  # ZEROES: the range is clear, no buffer follows
            return self._record(head, head_len, spans, None, 0)
        if buffer_size > MAX_SKIPPED_BITMAP_BUFFER:
            start = self.rb.offset
            self.machine.emit(findings.make(
                Code.BUFFER_TOO_LARGE,
                f"BITS buffer size {buffer_size} (QEMU refuses more than "
                f"{g.BITMAP_MAX_BUFFER_SIZE}); the length is not believable, "
                "resynchronising", start, section=_IDSTR, node=self.node,
                bitmap=self.bitmap,
                fields={"buffer_size": buffer_size, "limit": g.BITMAP_MAX_BUFFER_SIZE,
                        "resynchronised": True}))
            self.machine.enter_resync(start + head_len)
            return None
        if buffer_size > g.BITMAP_MAX_BUFFER_SIZE:
            # QEMU gives up here; we report and skip the buffer without buffering it.
            return self._record(head, head_len, spans, None, buffer_size)
        total = head_len + buffer_size
        if avail < total:
            return self.machine.short(total, "a dirty-bitmap record")
        pos = self.rb.pos
        return self._record(head, head_len, spans,
                            bytes(self.rb.data[pos + head_len : pos + total]), 0)

    # --- the record and its findings -----------------------------------------------

    def _record(self, head: Any, head_len: int, spans: Spans, buffer: bytes | None,
                skip: int) -> NeedMore | None:
        machine = self.machine
        rb = self.rb
        start = rb.base + rb.pos
        first_event = machine.event_count() if skip else 0
        flag_field = head["flags"]
        flags = flag_field["value"]
        width = flag_field["width"]
        device_name = head["device_name"]
        bitmap_name = head["bitmap_name"]
        bitmap_start = head["start"]
        bits = head["bits"]
        buffer_size = head["buffer_size"]
        if device_name is not None:
            self.node = device_name
        if bitmap_name is not None:
            self.bitmap = bitmap_name
        fields: dict[str, Any] = {
            "flags": flags,
            "flags_width": width,
            "flag_names": _flag_names(flags),
        }
        if width > 1:
            fields["wire_flags"] = flag_field["wire_value"]
        if device_name is not None:
            fields["device_name"] = device_name
        if bitmap_name is not None:
            fields["bitmap_name"] = bitmap_name
        if bitmap_start is not None:
            fields["granularity"] = bitmap_start["granularity"]
            fields["bitmap_flags"] = bitmap_start["bitmap_flags"]
        if bits is not None:
            fields["first_sector"] = bits["first_sector"]
            fields["sector_count"] = bits["sector_count"]
            fields["zeroes"] = bool(flags & _BF_ZEROES)
        if buffer_size is not None:
            fields["buffer_size"] = buffer_size
            spans += (("buffer", head_len, buffer_size),)
        length = head_len + (buffer_size or 0)
        record = machine.record(_KIND_NAMES[head["kind"]], start, start + length,
                                tuple([(key, start + at, size) for key, at, size in spans]),
                                **fields)
        if flags != flags & _BF_EOS:
            record.node = self.node
            record.bitmap = self.bitmap
        if buffer is not None:
            record.fields["buffer"] = buffer
        if width > 1:
            machine.emit(findings.make(
                Code.MULTIBYTE_FLAGS,
                f"flags written in {width} bytes (wire value "
                f"{flag_field['wire_value']:#x}); a QEMU destination keeps only the last byte "
                f"and acts on {flags:#04x} ({'|'.join(_flag_names(flags)) or 'none'})",
                start, length=width, section=_IDSTR,
                fields={"width": width, "wire_flags": flag_field["wire_value"],
                        "flags": flags}))
        if flags & _BF_EXTRA:
            machine.emit(findings.make(
                Code.UNKNOWN_FLAGS, f"the last flags byte {flags:#04x} has bit 0x80 set, which "
                "means nothing there", start, section=_IDSTR, fields={"flags": flags}))
        if buffer_size is not None and buffer_size > g.BITMAP_MAX_BUFFER_SIZE:
            machine.emit(findings.make(
                Code.BUFFER_TOO_LARGE,
                f"BITS buffer of {buffer_size} bytes; QEMU refuses more than "
                f"{g.BITMAP_MAX_BUFFER_SIZE} ('Bitmap migration stream buffer allocation "
                "request is too large')", start, length=length, section=_IDSTR,
                node=self.node, bitmap=self.bitmap,
                fields={"buffer_size": buffer_size, "limit": g.BITMAP_MAX_BUFFER_SIZE,
                        "resynchronised": False}))
        rb.pos += head_len
        if skip:
            take = min(skip, len(rb.data) - rb.pos)
            rb.pos += take
            if skip - take:
                rb.start_skip(skip - take, start)
                machine.defer_events_since(first_event)
        elif buffer is not None:
            rb.pos += len(buffer)
        if flags & _BF_EOS:
            self.saw_eos = True
            machine.end_payload()
        return None

    def _missing_eos_here(self) -> NeedMore | None:
        """A footer or the next item where a record should start means EOS was lost.

        Returns None when a record starts here, 0 after reporting the missing EOS, or
        how many bytes must be buffered to tell: the answer must not depend on how
        the data was chunked (0x02/0x03 are both an item type and valid flags).
        """
        rb = self.rb
        pos = rb.pos
        buf = rb.data
        first = buf[pos]
        machine = self.machine
        section = machine.current
        if section is None or first not in _ITEM_AFTER_PAYLOAD:
            return None  # nearly every record: its flags byte is no item type
        limit = pos + machine.available()

        def short(size: int) -> bool:
            # Inside a PACKAGED blob an item cannot run past its end: then a record.
            return pos + size > limit and not machine.hits_package_end(size)

        looks_like_next = False
        if first in (_FOOTER, _PART, _END):
            if short(5):
                return 5
            if pos + 5 <= limit:
                (section_id,) = _SECTION_ID.unpack_from(buf, pos + 1)
                if first == _FOOTER:
                    looks_like_next = section_id == section.section_id
                else:
                    looks_like_next = section_id in machine.sections
        elif first == _FULL:
            if short(6):
                return 6
            if pos + 6 <= limit:
                name_len = buf[pos + 5]
                if short(6 + name_len):
                    return 6 + name_len
                looks_like_next = pos + 6 + name_len <= limit and printable(
                    bytes(buf[pos + 6 : pos + 6 + name_len]))
        elif first == _EOF and machine.package_end is None:
            if short(2):
                return 2
            looks_like_next = buf[pos + 1] == g.ItemType.VMDESCRIPTION
        if not looks_like_next:
            return None
        at_footer = first == _FOOTER
        machine.emit(findings.make(
            Code.MISSING_EOS, "the dirty-bitmap section payload ended (at "
            f"{'its footer' if at_footer else 'the next item'}) "
            "without an EOS record", rb.absolute(pos), section=section.idstr,
            fields={"ended_at": "footer" if at_footer else "next item"}))
        if at_footer:
            machine.end_payload()
        else:
            machine.resume_items()
        return 0
