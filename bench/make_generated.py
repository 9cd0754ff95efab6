#!/usr/bin/env python3
"""Generate a large migration capture (pcap) with known dirty bitmaps, fast.

The stream is what a QEMU 7.2 precopy migration with the dirty-bitmaps capability
looks like (see docs of the decoder): header, configuration, POSTCOPY_ADVISE, RAM
and dirty-bitmap setup sections, RAM iterations of ~16 MiB (pages random or zero,
half and half), a completion with every bitmap's BITS and COMPLETE records, EOF
and a VMDESCRIPTION. Framing and bitmap records come from the grammar's builders;
the bulk page records are packed with struct (same bytes, 100x faster), and page
data is sliced from one random pool so nothing grows with the size asked for.

Writes NAME.pcap and NAME.truth.json (sha256 / dirty bytes computed here the way
x-debug-block-dirty-bitmap-sha256 computes them).

    python bench/make_generated.py --ram-gib 4 --mss 65483 --name gen-4g
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from migshark.dissectors import grammar as g  # noqa: E402
from testkit.tcpflows import TcpPcapWriter  # noqa: E402

PAGE = 4096
RAM_BLOCK = "pc.ram"
RAM_ID, BITMAP_ID = 2, 3
ITERATION_BYTES = 16 << 20
DISK_SIZE = 4 << 30
NODE = "drive0"
# name, granularity, dirty byte ranges
BITMAPS = (
    ("gen-fine", 512, [(i * 113 << 20, 7 * 512 + i * 4096) for i in range(30)]),
    ("gen-coarse", 65536, [((2 << 30) + i * (37 << 20), 300 << 10) for i in range(20)]),
)
_HEADER = struct.Struct(">Q")


def bitmap_words(granularity: int, extents: list[tuple[int, int]]) -> int:
    """The bitmap as an int: bit i = granule i dirty (LSB-first, like hbitmap)."""
    bits = 0
    for offset, length in extents:
        first, last = offset // granularity, (offset + length - 1) // granularity
        bits |= ((1 << (last - first + 1)) - 1) << first
    return bits


def bitmap_truth(granularity: int, bits: int) -> dict[str, object]:
    granules = -(-DISK_SIZE // granularity)
    size = -(-granules // 64) * 8
    data = bits.to_bytes(size, "little")
    return {"granularity": granularity, "disk_size": DISK_SIZE,
            "dirty_bytes": bits.bit_count() * granularity,
            "sha256": hashlib.sha256(data).hexdigest()}


def bitmap_completion(records: list[bytes]) -> None:
    for index, (name, granularity, extents) in enumerate(BITMAPS):
        bits = bitmap_words(granularity, extents)
        total_sectors = DISK_SIZE // 512
        per_chunk = g.BITMAP_GRANULES_PER_CHUNK * granularity // 512
        first = True
        for sector in range(0, total_sectors, per_chunk):
            count = min(per_chunk, total_sectors - sector)
            granule0 = sector * 512 // granularity
            ngranules = -(-count * 512 // granularity)
            chunk = (bits >> granule0) & ((1 << ngranules) - 1)
            # Only the bitmap's first record names it, as QEMU sends them.
            device, bitmap = (NODE, name) if first else (None, None)
            first = False
            if not chunk:
                records.append(g.bitmap_record(g.BitmapFlag.BITS | g.BitmapFlag.ZEROES,
                                               device_name=device, bitmap_name=bitmap,
                                               first_sector=sector, sector_count=count))
                continue
            size = -(-ngranules // 64) * 8
            size = -(-size // g.BITMAP_BUFFER_ALIGN) * g.BITMAP_BUFFER_ALIGN
            records.append(g.bitmap_record(g.BitmapFlag.BITS, first_sector=sector,
                                           sector_count=count,
                                           buffer=chunk.to_bytes(size, "little"),
                                           device_name=device, bitmap_name=bitmap))
        records.append(g.bitmap_record(g.BitmapFlag.COMPLETE, device_name=NODE,
                                       bitmap_name=name))
        del index


def generate(path: Path, ram_bytes: int, mss: int, seed: int = 11,
             client: tuple[str, int] = ("192.0.2.1", 50000),
             server: tuple[str, int] = ("192.0.2.2", 4444)) -> dict[str, object]:
    rng = random.Random(seed)
    pool = memoryview(rng.randbytes(1 << 20))
    page_flags = g.RamFlag.PAGE | g.RamFlag.CONTINUE
    zero_flags = g.RamFlag.ZERO | g.RamFlag.CONTINUE
    data_pages = zero_pages = 0
    with open(path, "wb", buffering=1 << 22) as out:
        w = TcpPcapWriter(out, mss=mss, client=client, server=server)
        send = w.send
        send(g.build_file_header())
        send(g.build_configuration("pc-i440fx-7.2"))
        send(g.build_command(g.Command.POSTCOPY_ADVISE))
        send(g.build_section_start(g.ItemType.SECTION_START, RAM_ID, "ram", 0, 4))
        send(g.build_ram_mem_size([(RAM_BLOCK, ram_bytes)]))
        send(g.build_ram_eos() + g.build_footer(RAM_ID))
        setup = [g.build_section_start(g.ItemType.SECTION_START, BITMAP_ID, "dirty-bitmap", 0,
                                       1)]
        for name, granularity, _ in BITMAPS:
            setup.append(g.bitmap_record(g.BitmapFlag.START, device_name=NODE,
                                         bitmap_name=name, granularity=granularity,
                                         bitmap_flags=g.BitmapStartFlag.ENABLED))
        setup.append(g.bitmap_record(g.BitmapFlag.EOS))
        setup.append(g.build_footer(BITMAP_ID))
        send(b"".join(setup))
        addr = 0
        while addr < ram_bytes:
            send(g.build_section_part(g.ItemType.SECTION_PART, RAM_ID))
            end = min(ram_bytes, addr + ITERATION_BYTES)
            first = addr == 0
            while addr < end:
                if first:
                    # The first record names the block; the rest continue it.
                    send(g.build_ram_page(addr, RAM_BLOCK, bytes(pool[:PAGE])))
                    data_pages += 1
                    first = False
                elif rng.getrandbits(1):
                    send(_HEADER.pack(addr | page_flags))
                    start = (addr >> 3) & 0xFF000
                    send(pool[start : start + PAGE])
                    data_pages += 1
                else:
                    send(_HEADER.pack(addr | zero_flags) + b"\0")
                    zero_pages += 1
                addr += PAGE
            send(g.build_ram_eos() + g.build_footer(RAM_ID))
            send(g.build_section_part(g.ItemType.SECTION_PART, BITMAP_ID)
                 + g.bitmap_record(g.BitmapFlag.EOS) + g.build_footer(BITMAP_ID))
        completion = [g.build_section_part(g.ItemType.SECTION_END, RAM_ID), g.build_ram_eos(),
                      g.build_footer(RAM_ID),
                      g.build_section_part(g.ItemType.SECTION_END, BITMAP_ID)]
        bitmap_completion(completion)
        completion += [g.bitmap_record(g.BitmapFlag.EOS), g.build_footer(BITMAP_ID),
                       g.build_eof(),
                       g.build_vmdescription(json.dumps({"page_size": PAGE,
                                                         "devices": []}).encode())]
        send(b"".join(completion))
        w.close()
    truth_bitmaps = []
    for name, granularity, extents in BITMAPS:
        truth = bitmap_truth(granularity, bitmap_words(granularity, extents))
        truth_bitmaps.append({"node": NODE, "name": name, **truth})
    return {"generator": "bench/make_generated.py", "ram_bytes": ram_bytes, "mss": mss,
            "data_pages": data_pages, "zero_pages": zero_pages, "frames": w.frames,
            "port": server[1], "bitmaps": truth_bitmaps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "data")
    parser.add_argument("--ram-gib", type=float, default=1.0)
    parser.add_argument("--mss", type=int, default=1448,
                        help="segment size: 1448 as on Ethernet, 65483 like loopback GSO")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    ram = int(args.ram_gib * (1 << 30)) // PAGE * PAGE
    name = args.name or f"gen-{args.ram_gib:g}g"
    args.out.mkdir(parents=True, exist_ok=True)
    truth = generate(args.out / f"{name}.pcap", ram, args.mss)
    (args.out / f"{name}.truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    print(json.dumps({k: truth[k] for k in ("data_pages", "zero_pages", "frames")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
