"""The bytes of a record for the hex pane.

What each field is and where it lies is the field registry's business
(dissectors.registry.describe, over the decoder's Record.spans): nothing about the
layout is restated here. Bytes come from the raw stream file when the input is one
(bounded cache), from the kept BITS buffer, or are rebuilt through the grammar's
builders for the framing and dirty-bitmap records whose fields fully determine them.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from migshark.analyzer.records import Record
from migshark.dissectors import grammar as g
from migshark.dissectors.registry import BITMAP_KINDS, Kind

MAX_HEX_BYTES = 64 * 1024
CACHE_ENTRIES = 64


def rebuild_bytes(record: Record) -> bytes | None:
    """The record's bytes, rebuilt through the grammar when its fields determine them."""
    f = record.fields
    kind = record.kind
    try:
        if kind == Kind.FILE_HEADER:
            return g.build_file_header(f.get("version", g.QEVM_VERSION))
        if kind == Kind.EOF:
            return g.build_eof()
        if kind == Kind.FOOTER:
            return g.build_footer(f.get("section_id", record.section_id or 0))
        if kind in (Kind.SECTION_PART, Kind.SECTION_END) and record.section_id is not None:
            item = g.ItemType.SECTION_PART if kind == Kind.SECTION_PART else g.ItemType.SECTION_END
            return g.build_section_part(item, record.section_id)
        if kind in (Kind.SECTION_START, Kind.SECTION_FULL) and "instance_id" in f:
            item = (g.ItemType.SECTION_START if kind == Kind.SECTION_START
                    else g.ItemType.SECTION_FULL)
            return g.build_section_start(item, record.section_id or 0, f["idstr"],
                                         f["instance_id"], f["version_id"])
        if kind == Kind.CONFIGURATION and "machine_type" in f and not f.get("subsections"):
            data = g.build_configuration(f["machine_type"])
            return data if len(data) == record.length else None
        if kind in BITMAP_KINDS:
            width = f.get("flags_width", 1)
            data = g.bitmap_record(
                f["flags"] & ~(g.BitmapFlag.DEVICE_NAME | g.BitmapFlag.BITMAP_NAME),
                device_name=f.get("device_name"), bitmap_name=f.get("bitmap_name"),
                granularity=f.get("granularity"), bitmap_flags=f.get("bitmap_flags"),
                first_sector=f.get("first_sector"), sector_count=f.get("sector_count"),
                buffer=f.get("buffer"), flags_width=width,
                buffer_size=f.get("buffer_size"))
            # The builder writes the one multi-byte form a QEMU reader decodes the same
            # way; a stream that used another cannot be rebuilt from the fields.
            if width > 1 and int.from_bytes(data[:width], "big") != f.get("wire_flags"):
                return None
            return data if len(data) == record.length else None
    except Exception:  # noqa: BLE001 - odd fields simply mean "cannot rebuild"
        return None
    return None


class ByteSource:
    """Bytes of records for the hex pane, with a small cache of file reads."""

    def __init__(self, raw_path: str | Path | None = None) -> None:
        self.raw_path = Path(raw_path) if raw_path is not None else None
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def record_bytes(self, record: Record) -> tuple[bytes, str]:
        """(bytes from the record's offset, where they came from); bytes may be short."""
        length = min(record.length, MAX_HEX_BYTES)
        if self.raw_path is not None and record.depth >= 0:
            data = self._read(record.offset, length)
            if data:
                return data, "stream file"
        rebuilt = rebuild_bytes(record)
        if rebuilt is not None:
            return rebuilt[:length], "rebuilt from fields"
        return b"", "bytes not kept for this record"

    def _read(self, offset: int, length: int) -> bytes:
        key = (offset, length)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        assert self.raw_path is not None
        try:
            with self.raw_path.open("rb") as handle:
                handle.seek(offset)
                data = handle.read(length)
        except OSError:
            return b""
        self._cache[key] = data
        if len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return data
