#!/usr/bin/env python3
"""Rewrite a classic pcap as pcapng (one section, one interface, EPBs), as dumpcap
and Wireshark write captures. Streams record by record: memory stays flat.

    bench/to_pcapng.py IN.pcap OUT.pcapng
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path


def block(kind: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    return struct.pack("<II", kind, 12 + len(body)) + body + struct.pack("<I", 12 + len(body))


def convert(src: Path, dst: Path) -> int:
    count = 0
    with open(src, "rb") as f, open(dst, "wb") as out:
        header = f.read(24)
        magic = struct.unpack_from("<I", header)[0]
        order = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
        nanos = magic in (0xA1B23C4D, 0x4D3CB2A1)
        linktype = struct.unpack_from(order + "I", header, 20)[0] & 0xFFFF
        out.write(block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)))
        options = struct.pack("<HHB3x", 9, 1, 9) + struct.pack("<HH", 0, 0) if nanos else b""
        out.write(block(1, struct.pack("<HHI", linktype, 0, 262144) + options))
        rec = struct.Struct(order + "IIII")
        while head := f.read(16):
            if len(head) < 16:
                break
            sec, frac, caplen, origlen = rec.unpack(head)
            data = f.read(caplen)
            ticks = sec * (10**9 if nanos else 10**6) + frac
            out.write(block(6, struct.pack("<IIIII", 0, ticks >> 32, ticks & 0xFFFFFFFF,
                                           len(data), origlen) + data))
            count += 1
    return count


if __name__ == "__main__":
    print(convert(Path(sys.argv[1]), Path(sys.argv[2])), "packets")
