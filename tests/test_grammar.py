"""Every record kind of the grammar builds and parses back to the same values."""

from __future__ import annotations

import pytest

from migshark.dissectors import grammar as g

F = g.BitmapFlag


@pytest.mark.parametrize(
    ("struct", "value"),
    [
        (g.SectionHeaderFull, {"section_id": 7, "idstr": "dirty-bitmap", "instance_id": 0,
                               "version_id": 1}),
        (g.SectionHeaderShort, {"section_id": 0xFFFFFFFF}),
        (g.SectionFooter, {"section_id": 3}),
        (g.LengthPrefixed32, {"length": 13, "data": b"pc-i440fx-7.2"}),
        (g.CommandBody, {"command": 2, "length": 4, "data": b"\0\0\0\1"}),
        (g.SubsectionHeader, {"idstr": "configuration/capabilities", "version_id": 1}),
        (g.RamBlockSize, {"idstr": "pc.ram", "used_length": 1 << 30}),
        (g.RamXbzrleHeader, {"encoding": 1, "length": 300}),
        (g.RamCompressedHeader, {"length": 77}),
        (g.BitmapStart, {"granularity": 65536, "bitmap_flags": 3}),
        (g.BitmapBitsHead, {"first_sector": 1 << 40, "sector_count": 1 << 20}),
    ],
)
def test_struct_round_trip(struct, value):
    built = struct.build(value)
    parsed = struct.parse(built)
    for key, expected in value.items():
        assert parsed[key] == expected
    assert struct.build(parsed) == built


def test_file_header():
    built = g.build_file_header()
    assert built == b"QEVM\x00\x00\x00\x03"
    assert g.FileHeader.parse(built).version == 3


def test_ram_records_are_qemu_layout():
    page = g.build_ram_page(0x2000, "pc.ram", b"\xab" * 4096)
    assert page[:8] == (0x2000 | g.RamFlag.PAGE).to_bytes(8, "big")
    assert page[8:15] == b"\x06pc.ram"
    assert len(page) == 8 + 7 + 4096
    zero = g.build_ram_page(0x3000, None, b"", zero_fill=0)
    assert zero == (0x3000 | g.RamFlag.ZERO | g.RamFlag.CONTINUE).to_bytes(8, "big") + b"\0"
    mem = g.build_ram_mem_size([("pc.ram", 4096)])
    assert mem[:8] == (4096 | g.RamFlag.MEM_SIZE).to_bytes(8, "big")
    assert g.build_ram_eos() == (0x10).to_bytes(8, "big")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"flags": F.START, "device_name": "drive0", "bitmap_name": "b", "granularity": 512,
         "bitmap_flags": 0x03},
        {"flags": F.BITS, "first_sector": 8192, "sector_count": 8192, "buffer": b"\x01" * 32},
        {"flags": F.BITS | F.ZEROES, "bitmap_name": "b", "first_sector": 0,
         "sector_count": 100},
        {"flags": F.COMPLETE, "device_name": "n"},
        {"flags": F.EOS},
        {"flags": F.COMPLETE | F.EOS, "bitmap_name": "x"},
    ],
)
@pytest.mark.parametrize("width", [1, 2, 4])
def test_bitmap_record_round_trip(kwargs, width):
    built = g.bitmap_record(flags_width=width, **kwargs)
    parsed = g.BitmapRecord.parse(built)
    flags = kwargs["flags"]
    assert parsed.flags.width == width
    assert parsed.flags.value & ~(F.DEVICE_NAME | F.BITMAP_NAME) == flags
    assert parsed.device_name == kwargs.get("device_name")
    assert parsed.bitmap_name == kwargs.get("bitmap_name")
    if flags & F.START:
        assert (parsed.start.granularity, parsed.start.bitmap_flags) == (
            kwargs["granularity"], kwargs["bitmap_flags"])
    if parsed.kind == g.RecordKind.BITS:
        assert parsed.bits.first_sector == kwargs["first_sector"]
        assert parsed.bits.sector_count == kwargs["sector_count"]
        assert parsed.buffer == kwargs.get("buffer")
    assert g.BitmapRecord.build(parsed) == built
    head = g.BitmapRecordHead.parse(built)
    assert head.kind == parsed.kind


def test_qemu_keeps_only_the_last_flags_byte():
    # Draft-style 2-byte flags 0x8040 would mean "extra byte, then BITS" to the 2017
    # draft; QEMU's uint8_t reader sees 0x40 for the 2-byte form.
    parsed = g.BitmapFlags.parse(b"\x80\x40")
    assert (parsed.width, parsed.value, parsed.wire_value) == (2, 0x40, 0x8040)
    parsed = g.BitmapFlags.parse(b"\x81\x82\x00\x20")
    assert (parsed.width, parsed.value, parsed.wire_value) == (4, 0x20, 0x81820020)


def test_record_kind_precedence_follows_qemu_loader():
    assert g.BitmapRecord.parse(g.bitmap_record(F.START | F.COMPLETE, granularity=512,
                                                bitmap_flags=0)).kind == g.RecordKind.START
    assert g.BitmapRecord.parse(g.bitmap_record(F.COMPLETE | F.BITS)).kind == g.RecordKind.COMPLETE


@pytest.mark.parametrize(
    ("struct", "sample"),
    [(g.BitmapRecordHead, g.bitmap_record(F.BITS, bitmap_name="b", first_sector=8,
                                          sector_count=9, buffer=b"x" * 32, flags_width=w))
     for w in (1, 2, 4)]
    + [(g.BitmapRecord, g.bitmap_record(F.BITS, first_sector=8, sector_count=9,
                                        buffer=b"x" * 32)),
       (g.BitmapRecordHead, g.bitmap_record(F.EOS)),
       (g.SectionFooter, b"\0\0\0\7"),
       (g.SectionHeaderShort, b"\0\0\1\7"),
       (g.SectionHeaderFull, g.build_section_start(g.ItemType.SECTION_START, 3, "ram", 0, 4)[1:])],
)
def test_compiled_parsers_agree(struct, sample):
    assert g.compiled(struct).parse(sample) == struct.parse(sample)
