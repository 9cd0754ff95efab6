#!/usr/bin/env python3
"""Rewrite a classic pcap as pcapng (one section, one interface, EPBs), as dumpcap
and Wireshark write captures. Streams record by record: memory stays flat.

    bench/to_pcapng.py IN.pcap OUT.pcapng
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testkit.pcapfiles import (  # noqa: E402 - needs the repo root on sys.path
    PCAP_MAGIC,
    PCAP_MAGIC_NANOS,
    SNAPLEN,
    epb,
    idb,
    shb,
)


def convert(src: Path, dst: Path) -> int:
    count = 0
    with open(src, "rb") as f, open(dst, "wb") as out:
        header = f.read(24)
        magic = struct.unpack_from("<I", header)[0]
        order = "<" if magic in (PCAP_MAGIC, PCAP_MAGIC_NANOS) else ">"
        nanos = magic in (PCAP_MAGIC_NANOS, 0x4D3CB2A1)
        linktype = struct.unpack_from(order + "I", header, 20)[0] & 0xFFFF
        out.write(shb())
        out.write(idb(linktype, snaplen=SNAPLEN, tsresol=9 if nanos else None))
        rec = struct.Struct(order + "IIII")
        while head := f.read(16):
            if len(head) < 16:
                break
            sec, frac, caplen, origlen = rec.unpack(head)
            data = f.read(caplen)
            ticks = sec * (10**9 if nanos else 10**6) + frac
            out.write(epb(0, ticks, data, orig=origlen))
            count += 1
    return count


if __name__ == "__main__":
    print(convert(Path(sys.argv[1]), Path(sys.argv[2])), "packets")
