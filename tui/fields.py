"""Where each field of a record lies on the wire, and the record's bytes for the hex pane.

Field ranges follow the grammar's layout (dissectors/grammar.py). Bytes come from
the raw stream file when the input is one (bounded cache), from the kept BITS
buffer, or are rebuilt through the grammar's builders for the framing and
dirty-bitmap records whose fields fully determine them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migshark.analyzer.records import Record
from migshark.dissectors import grammar as g

MAX_HEX_BYTES = 64 * 1024
CACHE_ENTRIES = 64


@dataclass(frozen=True, slots=True)
class FieldRange:
    name: str
    value: Any
    offset: int  # absolute stream offset
    length: int


def field_ranges(record: Record) -> list[FieldRange]:
    """Every field of `record` with the bytes it occupies, in wire order.

    Fields whose position the grammar does not pin down (RAM runs, device state)
    get the whole record's range.
    """
    f = record.fields
    base = record.offset
    out: list[FieldRange] = []
    pos = base

    def take(name: str, value: Any, length: int) -> None:
        nonlocal pos
        out.append(FieldRange(name, value, pos, length))
        pos += length

    kind = record.kind
    if kind == "file-header":
        take("magic", f.get("magic"), 4)
        take("version", f.get("version"), 4)
    elif kind in ("section-start", "section-full"):
        take("type", kind, 1)
        take("section_id", record.section_id, 4)
        idstr = f.get("idstr") or record.section or ""
        take("idstr", idstr, 1 + len(idstr.encode("utf-8", "surrogateescape")))
        take("instance_id", f.get("instance_id"), 4)
        take("version_id", f.get("version_id"), 4)
    elif kind in ("section-part", "section-end", "footer"):
        take("type", kind, 1)
        take("section_id", f.get("section_id", record.section_id), 4)
    elif kind == "eof":
        take("type", "EOF", 1)
    elif kind in ("configuration", "vmdescription"):
        take("type", kind, 1)
        take("length", f.get("length", max(0, record.length - 5)), 4)
        key = "machine_type" if kind == "configuration" else "devices"
        take(key, f.get(key), max(0, record.end - pos))
    elif kind == "command":
        take("type", "COMMAND", 1)
        take("command", f.get("command"), 2)
        take("length", f.get("length"), 2)
        if record.length > 5:
            take("data", f.get("packaged_length", f.get("data")), record.length - 5)
    elif kind.startswith("bitmap-"):
        width = f.get("flags_width", 1)
        take("flags", "|".join(f.get("flag_names", [])) or f.get("flags"), width)
        for key in ("device_name", "bitmap_name"):
            if key in f:
                take(key, f[key], 1 + len(str(f[key]).encode("utf-8", "surrogateescape")))
        if "granularity" in f:
            take("granularity", f["granularity"], 4)
            take("bitmap_flags", f.get("bitmap_flags"), 1)
        if "first_sector" in f:
            take("first_sector", f.get("first_sector"), 8)
            take("sector_count", f.get("sector_count"), 4)
        if "buffer_size" in f:
            take("buffer_size", f["buffer_size"], 8)
            take("buffer", f"{f['buffer_size']} bytes", f["buffer_size"])
    elif kind in ("ram-eos", "ram-multifd-flush", "ram-hook"):
        take("header", "addr | flags", 8)
    elif kind == "ram-mem-size":
        take("total_bytes", f.get("total_bytes"), 8)
        for index, block in enumerate(f.get("blocks") or []):
            name = str(block.get("idstr", ""))
            take(f"blocks[{index}].idstr", name,
                 1 + len(name.encode("utf-8", "surrogateescape")))
            take(f"blocks[{index}].used_length", block.get("used_length"), 8)
            for extra_index, extra in enumerate(block.get("extra") or []):
                take(f"blocks[{index}].extra[{extra_index}]", extra, 8)
    # Anything not placed above is shown over the whole record.
    placed = {item.name for item in out}
    for key, value in f.items():
        if key in placed or key in ("flag_names", "buffer", "flags_width", "blocks"):
            continue
        if isinstance(value, bytes):
            value = f"{len(value)} bytes"
        out.append(FieldRange(key, value, base, record.length))
    return out


def rebuild_bytes(record: Record) -> bytes | None:
    """The record's bytes, rebuilt through the grammar when its fields determine them."""
    f = record.fields
    kind = record.kind
    try:
        if kind == "file-header":
            return g.build_file_header(f.get("version", g.QEVM_VERSION))
        if kind == "eof":
            return g.build_eof()
        if kind == "footer":
            return g.build_footer(f.get("section_id", record.section_id or 0))
        if kind in ("section-part", "section-end") and record.section_id is not None:
            item = g.ItemType.SECTION_PART if kind == "section-part" else g.ItemType.SECTION_END
            return g.build_section_part(item, record.section_id)
        if kind in ("section-start", "section-full") and "instance_id" in f:
            item = (g.ItemType.SECTION_START if kind == "section-start"
                    else g.ItemType.SECTION_FULL)
            return g.build_section_start(item, record.section_id or 0, f["idstr"],
                                         f["instance_id"], f["version_id"])
        if kind == "configuration" and "machine_type" in f and record.length == 5 + len(
                str(f["machine_type"]).encode()):
            return g.build_configuration(f["machine_type"])
        if kind.startswith("bitmap-"):
            if f.get("flags_width", 1) == 2 and "wire_flags" in f and f["wire_flags"] >> 8 != 0x80:
                return None
            data = g.bitmap_record(
                f["flags"] & ~(g.BitmapFlag.DEVICE_NAME | g.BitmapFlag.BITMAP_NAME),
                device_name=f.get("device_name"), bitmap_name=f.get("bitmap_name"),
                granularity=f.get("granularity"), bitmap_flags=f.get("bitmap_flags"),
                first_sector=f.get("first_sector"), sector_count=f.get("sector_count"),
                buffer=f.get("buffer"), flags_width=f.get("flags_width", 1),
                buffer_size=f.get("buffer_size"))
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
