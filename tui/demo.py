"""A small, deterministic migration stream built through the grammar.

Used by the TUI's tests (and as the demo when no real capture is bundled): two
disks with three bitmaps, a few RAM pages, and one deliberately odd record so the
findings view has something to show.
"""

from __future__ import annotations

from pathlib import Path

from migshark.dissectors import grammar as g

GRANULARITY = 65536
DISK_SECTORS = 4 * 1024 * 1024  # 2 GiB disks: four BITS chunks each
SECTORS_PER_CHUNK = g.BITMAP_GRANULES_PER_CHUNK * GRANULARITY // g.SECTOR_SIZE


def _bits_buffer(granules: int, dirty: set[int]) -> bytes:
    """Bitmap serialisation: LSB-first 64-bit little-endian words, padded to 32 bytes."""
    words = -(-granules // 64)
    value = 0
    for bit in dirty:
        value |= 1 << bit
    raw = value.to_bytes(words * 8, "little")
    pad = -len(raw) % g.BITMAP_BUFFER_ALIGN
    return raw + bytes(pad)


def _bitmap_chunks(node: str, name: str, run: int, every: int, first_named: bool
                   ) -> list[bytes]:
    """BITS records for a whole disk, dirty in runs of `run` granules, one run in `every`."""
    out = []
    for first in range(0, DISK_SECTORS, SECTORS_PER_CHUNK):
        count = min(SECTORS_PER_CHUNK, DISK_SECTORS - first)
        granules = count * g.SECTOR_SIZE // GRANULARITY
        dirty = {bit for bit in range(granules) if (bit // run) % every == 0}
        named = first == 0 and first_named
        device_name, bitmap_name = (node, name) if named else (None, None)
        if dirty:
            out.append(g.bitmap_record(g.BitmapFlag.BITS, first_sector=first, sector_count=count,
                                       buffer=_bits_buffer(granules, dirty),
                                       device_name=device_name, bitmap_name=bitmap_name))
        else:
            out.append(g.bitmap_record(g.BitmapFlag.BITS | g.BitmapFlag.ZEROES,
                                       first_sector=first, sector_count=count,
                                       device_name=device_name, bitmap_name=bitmap_name))
    return out


def build_demo_stream(ram_pages: int = 6, clean: bool = False) -> bytes:
    """The demo stream; `clean` leaves out the two records that make findings."""
    ram_id, bitmap_id = 2, 3
    parts: list[bytes] = [
        g.build_file_header(),
        g.build_configuration("pc-i440fx-7.2"),
        g.build_command(g.Command.POSTCOPY_ADVISE),
        g.build_section_start(g.ItemType.SECTION_START, ram_id, g.RAM_SECTION_IDSTR, 0,
                              g.RAM_SECTION_VERSION),
        g.build_ram_mem_size([("pc.ram", 64 << 20)]),
        g.build_ram_eos(),
        g.build_footer(ram_id),
        g.build_section_start(g.ItemType.SECTION_START, bitmap_id,
                              g.DIRTY_BITMAP_SECTION_IDSTR, 0, g.DIRTY_BITMAP_SECTION_VERSION),
    ]
    bitmaps = [("drive0", "inc0", 0x03), ("drive0", "inc1", 0x01), ("drive1", "sync", 0x00)]
    for node, name, flags in bitmaps:
        parts.append(g.bitmap_record(g.BitmapFlag.START, device_name=node, bitmap_name=name,
                                     granularity=GRANULARITY, bitmap_flags=flags))
    parts += [g.bitmap_record(g.BitmapFlag.EOS), g.build_footer(bitmap_id)]
    # One precopy iteration: a few RAM pages, then the bitmap section's empty PART.
    parts.append(g.build_section_part(g.ItemType.SECTION_PART, ram_id))
    for page in range(ram_pages):
        block = "pc.ram" if page == 0 else None
        data = bytes([page & 0xFF]) * g.DEFAULT_TARGET_PAGE_SIZE
        parts.append(g.build_ram_page(page * g.DEFAULT_TARGET_PAGE_SIZE, block, data))
    parts += [g.build_ram_eos(), g.build_footer(ram_id)]
    parts += [g.build_section_part(g.ItemType.SECTION_PART, bitmap_id),
              g.bitmap_record(g.BitmapFlag.EOS), g.build_footer(bitmap_id)]
    # Completion: all BITS and COMPLETE records travel in the END section.
    parts.append(g.build_section_part(g.ItemType.SECTION_END, bitmap_id))
    parts += _bitmap_chunks("drive0", "inc0", 64, 3, first_named=True)
    parts.append(g.bitmap_record(g.BitmapFlag.COMPLETE))
    parts.append(g.bitmap_record(g.BitmapFlag.BITS | g.BitmapFlag.ZEROES, bitmap_name="inc1",
                                 first_sector=0, sector_count=SECTORS_PER_CHUNK))
    # inc1 skips its second chunk: COMPLETE with a hole is a coverage-gap finding.
    resume = SECTORS_PER_CHUNK if clean else 2 * SECTORS_PER_CHUNK
    parts.append(g.bitmap_record(g.BitmapFlag.BITS | g.BitmapFlag.ZEROES,
                                 first_sector=resume,
                                 sector_count=DISK_SECTORS - resume))
    parts.append(g.bitmap_record(g.BitmapFlag.COMPLETE))
    parts += _bitmap_chunks("drive1", "sync", 512, 5, first_named=True)
    # Written in two bytes: a real destination keeps only the last one.
    parts.append(g.bitmap_record(g.BitmapFlag.COMPLETE, flags_width=1 if clean else 2))
    parts += [g.bitmap_record(g.BitmapFlag.EOS), g.build_footer(bitmap_id)]
    parts += [g.build_section_part(g.ItemType.SECTION_END, ram_id), g.build_ram_eos(),
              g.build_footer(ram_id), g.build_eof()]
    return b"".join(parts)


def write_demo_stream(path: str | Path, ram_pages: int = 6, clean: bool = False) -> Path:
    path = Path(path)
    path.write_bytes(build_demo_stream(ram_pages, clean))
    return path
