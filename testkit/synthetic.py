"""Small hand-built migration streams (built through the grammar) for the decoder,
capture, live and proxy tests."""

from __future__ import annotations

import json

from migshark.dissectors import grammar as g

F = g.BitmapFlag
RAM_ID, BITMAP_ID, DEVICE_ID = 2, 3, 4
DEVICE_PAYLOAD = bytes(range(24))
VMDESC = {
    "page_size": 4096,
    "devices": [{"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
                 "fields": [{"name": "a", "type": "int64", "size": 8},
                            {"name": "b", "type": "int64", "size": 8, "array_len": 2}]}],
}


def bitmap_chunk_bits(pattern: int) -> bytes:
    """A 1 KiB buffer (8192 granules) with `pattern` in every 64-bit word."""
    return pattern.to_bytes(8, "little") * 128


def precopy_stream(*, with_vmdesc: bool = True, eof: bool = True, extra_pages: int = 0) -> bytes:
    """A small precopy migration; extra_pages (< 254) more pc.ram records per iteration,
    every third a zero page, make it mostly RAM records like a real one."""
    out = [g.build_file_header(), g.build_configuration("pc-i440fx-7.2"),
           g.build_command(g.Command.POSTCOPY_ADVISE)]
    out += [g.build_section_start(g.ItemType.SECTION_START, RAM_ID, "ram", 0, 4),
            g.build_ram_mem_size([("pc.ram", 1 << 20), ("vga.vram", 1 << 16)]),
            g.build_ram_eos(), g.build_footer(RAM_ID)]
    out += [g.build_section_start(g.ItemType.SECTION_START, BITMAP_ID, "dirty-bitmap", 0, 1),
            g.bitmap_record(F.START, device_name="drive0", bitmap_name="inc0",
                            granularity=65536, bitmap_flags=1),
            g.bitmap_record(F.START, bitmap_name="inc1", granularity=512, bitmap_flags=3),
            g.bitmap_record(F.EOS), g.build_footer(BITMAP_ID)]
    for iteration in range(2):
        out.append(g.build_section_part(g.ItemType.SECTION_PART, RAM_ID))
        out.append(g.build_ram_page(0, "pc.ram", bytes([iteration + 1]) * 4096))
        out.append(g.build_ram_page(4096, None, b"", zero_fill=0))
        for page in range(extra_pages):
            addr = (2 + page) * 4096
            out.append(g.build_ram_page(addr, None, b"", zero_fill=0) if page % 3 == 0
                       else g.build_ram_page(addr, None, bytes([page % 251]) * 4096))
        out.append(g.build_ram_page(0, "vga.vram", b"\x07" * 4096))
        out += [g.build_ram_eos(), g.build_footer(RAM_ID)]
        out += [g.build_section_part(g.ItemType.SECTION_PART, BITMAP_ID),
                g.bitmap_record(F.EOS), g.build_footer(BITMAP_ID)]
    out += [g.build_section_part(g.ItemType.SECTION_END, RAM_ID), g.build_ram_eos(),
            g.build_footer(RAM_ID)]
    # inc0: 64 KiB granules over a 1 GiB disk = 16384 granules = 2 chunks of 8192.
    # inc1: 512-byte granules over the same disk = 2M granules = 256 chunks; send 3
    # chunks with data and ZEROES for the rest.
    out.append(g.build_section_part(g.ItemType.SECTION_END, BITMAP_ID))
    sectors_per_chunk_inc0 = 8192 * 128
    out.append(g.bitmap_record(F.BITS, device_name="drive0", bitmap_name="inc0", first_sector=0,
                               sector_count=sectors_per_chunk_inc0,
                               buffer=bitmap_chunk_bits(0x8000_0000_0000_0001)))
    out.append(g.bitmap_record(F.BITS | F.ZEROES, first_sector=sectors_per_chunk_inc0,
                               sector_count=sectors_per_chunk_inc0))
    total_sectors = 2 * sectors_per_chunk_inc0
    for chunk in range(total_sectors // 8192):
        first = chunk * 8192
        if chunk in (0, 5, 255):
            out.append(g.bitmap_record(F.BITS, bitmap_name="inc1" if chunk == 0 else None,
                                       first_sector=first, sector_count=8192,
                                       buffer=bitmap_chunk_bits(0xF0 << chunk % 50)))
        else:
            out.append(g.bitmap_record(F.BITS | F.ZEROES, first_sector=first, sector_count=8192))
    out.append(g.bitmap_record(F.COMPLETE, bitmap_name="inc0"))
    out.append(g.bitmap_record(F.COMPLETE, bitmap_name="inc1"))
    out += [g.bitmap_record(F.EOS), g.build_footer(BITMAP_ID)]
    out += [g.build_section_start(g.ItemType.SECTION_FULL, DEVICE_ID, "timer", 0, 2),
            DEVICE_PAYLOAD, g.build_footer(DEVICE_ID)]
    if eof:
        out.append(g.build_eof())
        if with_vmdesc:
            out.append(g.build_vmdescription(json.dumps(VMDESC).encode()))
    return b"".join(out)


def expected_inc1_words() -> bytes:
    """The serialised inc1 bitmap (2M granules = 32768 words)."""
    words = bytearray(2 * 1024 * 1024 // 8)
    for chunk in (0, 5, 255):
        words[chunk * 1024 : (chunk + 1) * 1024] = bitmap_chunk_bits(0xF0 << chunk % 50)
    return bytes(words)
