"""Capture files built byte by byte: classic pcap and pcapng, either byte order.

One set of builders for every test and script that writes a capture by hand, where
the product's writer (migshark.analyzer.pcapwriter, one Ethernet conversation in
microseconds) does not give the control needed: other link types and resolutions,
several interfaces, odd block types, lengths that lie, a cut end.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

LINKTYPE_ETHERNET = 1
SNAPLEN = 262144
PCAP_MAGIC, PCAP_MAGIC_NANOS = 0xA1B2C3D4, 0xA1B23C4D
SHB, IDB, PB, SPB, EPB = 0x0A0D0D0A, 1, 2, 3, 6
BYTE_ORDER_MAGIC = 0x1A2B3C4D
OPT_END, OPT_IF_NAME, OPT_IF_TSRESOL, OPT_IF_TSOFFSET = 0, 2, 9, 14
# Where the tests' captures start: any fixed time gives reproducible files.
EPOCH = 1_700_000_000


def pcap_bytes(
    records: Iterable[tuple[int, int, bytes]],
    *,
    order: str = "<",
    nano: bool = False,
    linktype: int = LINKTYPE_ETHERNET,
    snaplen: int = 65535,
    orig_lens: list[int] | None = None,
) -> bytes:
    """A classic pcap: records are (seconds, fraction, frame); the fraction is in
    microseconds, or nanoseconds with `nano`."""
    magic = PCAP_MAGIC_NANOS if nano else PCAP_MAGIC
    out = [struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)]
    for i, (sec, frac, data) in enumerate(records):
        orig = orig_lens[i] if orig_lens else len(data)
        out.append(struct.pack(order + "IIII", sec, frac, len(data), orig) + data)
    return b"".join(out)


def micros(timestamp: float) -> tuple[int, int]:
    """A float time as the (seconds, microseconds) of a pcap record."""
    total = round(timestamp * 1_000_000)
    return total // 1_000_000, total % 1_000_000


def pad(data: bytes) -> bytes:
    """pcapng pads every body and option value to 32 bits."""
    return data + b"\0" * (-len(data) % 4)


def block(btype: int, body: bytes, order: str = "<") -> bytes:
    body = pad(body)
    n = 12 + len(body)
    return struct.pack(order + "II", btype, n) + body + struct.pack(order + "I", n)


def shb(order: str = "<", major: int = 1) -> bytes:
    return block(SHB, struct.pack(order + "IHHq", BYTE_ORDER_MAGIC, major, 0, -1), order)


def option(code: int, value: bytes, order: str = "<") -> bytes:
    return struct.pack(order + "HH", code, len(value)) + pad(value)


def idb(
    linktype: int,
    order: str = "<",
    snaplen: int = 0,
    tsresol: int | None = None,
    tsoffset: int | None = None,
    name: str | None = None,
) -> bytes:
    opts = b""
    if name is not None:
        opts += option(OPT_IF_NAME, name.encode(), order)
    if tsresol is not None:
        opts += option(OPT_IF_TSRESOL, bytes([tsresol]), order)
    if tsoffset is not None:
        opts += option(OPT_IF_TSOFFSET, struct.pack(order + "q", tsoffset), order)
    if opts:
        opts += struct.pack(order + "HH", OPT_END, 0)
    return block(IDB, struct.pack(order + "HHI", linktype, 0, snaplen) + opts, order)


def epb(ifid: int, ts: int, data: bytes, order: str = "<", orig: int | None = None) -> bytes:
    """An enhanced packet block; `ts` is in the interface's resolution."""
    body = struct.pack(
        order + "IIIII",
        ifid,
        ts >> 32,
        ts & 0xFFFFFFFF,
        len(data),
        len(data) if orig is None else orig,
    )
    return block(EPB, body + pad(data), order)


def spb(data: bytes, order: str = "<", orig: int | None = None) -> bytes:
    return block(SPB, struct.pack(order + "I", len(data) if orig is None else orig) + data, order)


def opb(ifid: int, ts: int, data: bytes, order: str = "<") -> bytes:
    """The obsolete packet block, which old Wireshark versions still write."""
    body = struct.pack(order + "HHIIII", ifid, 0, ts >> 32, ts & 0xFFFFFFFF, len(data), len(data))
    return block(PB, body + pad(data), order)


def write_cut(path: Path, data: bytes, cut: int = 0) -> Path:
    """Write `data` without its last `cut` bytes, as a capture that was cut short."""
    path.write_bytes(data[: len(data) - cut])
    return path


def write_pcap(path: Path, frames: list[bytes], cut: int = 0) -> Path:
    """Ethernet frames one millisecond apart, in a microsecond pcap."""
    records = [(EPOCH + i // 1000, (i % 1000) * 1000, frame) for i, frame in enumerate(frames)]
    return write_cut(path, pcap_bytes(records, snaplen=SNAPLEN), cut)


def write_pcapng(path: Path, frames: list[tuple[int, bytes]], cut: int = 0) -> Path:
    """frames: (interface, frame) pairs. Interface 0 is Ethernet in microseconds,
    interface 1 Ethernet in nanoseconds; a custom block every 40 packets."""
    parts = [shb(), idb(LINKTYPE_ETHERNET, snaplen=SNAPLEN),
             idb(LINKTYPE_ETHERNET, snaplen=SNAPLEN, tsresol=9)]
    for i, (interface, frame) in enumerate(frames):
        ticks = (EPOCH * 10**6 + i * 1000) * (1000 if interface else 1)
        parts.append(epb(interface, ticks, frame))
        if i % 40 == 39:
            parts.append(block(0x00000BAD, b"custom block the lane must step over"))
    return write_cut(path, b"".join(parts), cut)
