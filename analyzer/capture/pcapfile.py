"""Zero-copy pcap / pcapng reader.

Frames are handed out as memoryviews into an mmap of the capture, so reading a
multi-GiB capture costs page faults, not copies. Consumers that keep frame data
beyond the current iteration step must copy it (``bytes(frame.data)``), otherwise
the mapping stays alive until the last view is gone.

Error model: anything structurally wrong raises :class:`CaptureFormatError`
(a ``ValueError``). A file that simply ends in the middle of a record (capture
interrupted, disk full, copied while tcpdump was still writing) is *not* an
error: iteration stops cleanly and :attr:`CaptureReader.truncated_at` records the
offset of the incomplete record so the analyzer can report it.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable, Iterator
from typing import Literal, NamedTuple

from migshark.analyzer.records import Fields

__all__ = [
    "CaptureFormatError",
    "CaptureReader",
    "PcapWalker",
    "PcapngWalker",
    "Frame",
    "Interface",
    "iter_frames",
    "sniff_format",
]


class CaptureFormatError(ValueError):
    """The capture file is not a valid pcap/pcapng file (one-line message)."""


class Frame(NamedTuple):
    timestamp: float
    linktype: int
    data: memoryview
    interface_id: int
    original_length: int


class Interface(Fields):
    """A pcapng Interface Description Block (or the implicit one of classic pcap)."""

    __slots__ = _fields = ("linktype", "snaplen", "name", "ts_divisor", "ts_offset")

    def __init__(self, linktype: int, snaplen: int, name: str | None = None,
                 ts_divisor: int = 1_000_000, ts_offset: int = 0) -> None:
        self.linktype = linktype
        self.snaplen = snaplen
        self.name = name
        # Raw timestamps are divided by this (an int keeps 2**-n and 10**-n exact).
        self.ts_divisor = ts_divisor
        self.ts_offset = ts_offset


CaptureFormat = Literal["pcap", "pcapng", "raw"]

_PCAPNG_SHB = 0x0A0D0D0A
_PCAPNG_BOM = 0x1A2B3C4D
_BT_IDB = 1
_BT_OPB = 2
_BT_SPB = 3
_BT_EPB = 6

_OPT_END = 0
_OPT_IF_NAME = 2
_OPT_IF_TSRESOL = 9
_OPT_IF_TSOFFSET = 14

# magic (as read little-endian) -> (byte order of the file, timestamp divisor, record header size)
_PCAP_MAGICS: dict[int, tuple[str, int, int]] = {
    0xA1B2C3D4: ("<", 1_000_000, 16),
    0xD4C3B2A1: (">", 1_000_000, 16),
    0xA1B23C4D: ("<", 1_000_000_000, 16),
    0x4D3CB2A1: (">", 1_000_000_000, 16),
    # Kuznetzov's patched libpcap: 8 extra bytes (ifindex, protocol, pkt_type) per record.
    0xA1B2CD34: ("<", 1_000_000, 24),
    0x34CDB2A1: (">", 1_000_000, 24),
}

_U32_LE = struct.Struct("<I")
# How often consumed pages of the mapping are released (see CaptureReader.release_behind).
RELEASE_STEP = 32 << 20
_tuple_new = tuple.__new__
# Not every platform's mmap has it; without it RSS just is not trimmed.
_MADV_DONTNEED: int | None = getattr(mmap, "MADV_DONTNEED", None)


def sniff_format(path: str | os.PathLike[str]) -> CaptureFormat:
    """Classify a file by its first bytes; anything unrecognised is ``"raw"``."""
    with open(path, "rb") as f:
        head = f.read(4)
    return _sniff_bytes(head)


def _sniff_bytes(head: bytes | memoryview) -> CaptureFormat:
    if len(head) < 4:
        return "raw"
    (magic,) = _U32_LE.unpack_from(head, 0)
    if magic == _PCAPNG_SHB:
        return "pcapng"
    if magic in _PCAP_MAGICS:
        return "pcap"
    return "raw"


class CaptureReader:
    """Iterate the frames of a pcap or pcapng file.

    ``truncated_at`` is ``None`` after a complete pass, or the file offset of the
    incomplete last record; ``truncated_reason`` says what was missing. The
    optional ``on_truncated(offset, reason)`` callback fires at the same moment.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        on_truncated: Callable[[int, str], None] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.on_truncated = on_truncated
        self.truncated_at: int | None = None
        self.truncated_reason: str | None = None
        self.interfaces: list[Interface] = []
        self.sections = 0
        self._mm: mmap.mmap | None = None
        self._released = 0  # the mapping's pages before this were handed back
        self._view: memoryview | None = None
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise CaptureFormatError(f"{self.path}: empty file")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._view = memoryview(self._mm)
        fmt = _sniff_bytes(self._view[:4])
        if fmt == "raw":
            self.close()
            raise CaptureFormatError(f"{self.path}: not a pcap or pcapng file (unknown magic)")
        self.format: CaptureFormat = fmt
        if fmt == "pcap":
            self._parse_pcap_header()

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Release the mapping.

        If frame data handed out earlier is still referenced the OS mapping
        outlives this call (unmapping under a live view would crash); it goes
        away with the last view.
        """
        view, self._view = self._view, None
        mm, self._mm = self._mm, None
        if view is not None:
            view.release()
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Frame]:
        return self._frames(close_when_done=False)

    def _frames(self, close_when_done: bool) -> Iterator[Frame]:
        # Returns the parsing generator itself: each extra generator layer
        # (``yield from``) costs ~0.2 us per frame, a tenth of the budget.
        if self._view is None:
            raise ValueError("CaptureReader is closed")
        self.truncated_at = None
        self.truncated_reason = None
        self._released = 0
        if self.format == "pcap":
            return self._iter_pcap(close_when_done)
        return self._iter_pcapng(close_when_done)

    @property
    def view(self) -> memoryview:
        """The whole file (raises ValueError once closed)."""
        if self._view is None:
            raise ValueError("CaptureReader is closed")
        return self._view

    @property
    def released(self) -> int:
        """The mapping's pages before this offset were handed back (see release_behind)."""
        return self._released

    def note_released(self, offset: int) -> None:
        """Someone else (the C prefault thread) handed back the pages before `offset`."""
        self._released = max(self._released, offset)

    def malformed(self, exc: Exception) -> CaptureFormatError:
        """The CaptureFormatError for a parser's unexpected exception."""
        return self._malformed(exc)

    def _malformed(self, exc: Exception) -> CaptureFormatError:
        # Safety net for the "only CaptureFormatError" contract; the parsers
        # bound-check everything, so reaching this is itself a bug to report.
        return CaptureFormatError(f"{self.path}: malformed capture ({exc})")

    # -- helpers -----------------------------------------------------------

    def release_behind(self, off: int) -> int:
        """Drop the mapping's pages before `off` from our address space.

        Touched pages of a file mapping count in the process's RSS until unmapped,
        so without this a pass over a 4 GiB capture would end with 4 GiB resident.
        The pages stay in the page cache, and a view still held on them (e.g. a
        buffered segment) simply faults them back in. Returns the next offset at
        which to call again.
        """
        end = off - off % mmap.PAGESIZE
        if self._mm is not None and end > self._released and _MADV_DONTNEED is not None:
            self._mm.madvise(_MADV_DONTNEED, self._released, end - self._released)
            self._released = end
        return off + RELEASE_STEP

    def report_truncated(self, offset: int, reason: str) -> None:
        """The file ends inside the record at `offset` (see truncated_at)."""
        self._truncated(offset, reason)

    def _truncated(self, offset: int, reason: str) -> None:
        self.truncated_at = offset
        self.truncated_reason = reason
        if self.on_truncated is not None:
            self.on_truncated(offset, reason)

    def _error(self, offset: int, what: str) -> CaptureFormatError:
        return CaptureFormatError(f"{self.path}: {what} at offset {offset}")

    # -- classic pcap ------------------------------------------------------

    def _parse_pcap_header(self) -> None:
        assert self._view is not None
        view = self._view
        if len(view) < 24:
            raise CaptureFormatError(
                f"{self.path}: truncated pcap file header ({len(view)} of 24 bytes)"
            )
        (magic,) = _U32_LE.unpack_from(view, 0)
        order, divisor, rec_len = _PCAP_MAGICS[magic]
        major, _minor, _zone, _sigfigs, snaplen, network = struct.unpack_from(
            order + "HHiIII", view, 4
        )
        if major != 2:
            raise CaptureFormatError(f"{self.path}: unsupported pcap version {major}")
        self._pcap_order = order
        self._pcap_rec_len = rec_len
        # Upper bits of the link-type field carry FCS information, not the type.
        self.interfaces = [Interface(network & 0xFFFF, snaplen, None, divisor)]
        self.sections = 1

    def _iter_pcap(self, close_when_done: bool) -> Iterator[Frame]:
        try:
            walker = PcapWalker(self)
            yield from walker.frames(walker.first, len(walker.view), release=True)
        except CaptureFormatError:
            raise
        except (struct.error, IndexError, OverflowError, ValueError) as exc:
            raise self._malformed(exc) from exc
        finally:
            if close_when_done:
                self.close()

    # -- pcapng ------------------------------------------------------------

    def _iter_pcapng(self, close_when_done: bool) -> Iterator[Frame]:
        try:
            walker = PcapngWalker(self)
            yield from walker.frames(0, len(walker.view), release=True)
        except CaptureFormatError:
            raise
        except (struct.error, IndexError, OverflowError, ValueError) as exc:
            raise self._malformed(exc) from exc
        finally:
            if close_when_done:
                self.close()

    def _shb_byte_order(self, view: memoryview, off: int) -> str:
        if off + 12 > len(view):
            raise self._error(off, "truncated section header block")
        (bom,) = _U32_LE.unpack_from(view, off + 8)
        if bom == _PCAPNG_BOM:
            return "<"
        if bom == 0x4D3C2B1A:
            return ">"
        raise self._error(off, f"bad byte-order magic 0x{bom:08x}")

    def _parse_idb(self, view: memoryview, off: int, blen: int, order: str) -> Interface:
        linktype, _reserved, snaplen = struct.unpack_from(order + "HHI", view, off + 8)
        iface = Interface(linktype, snaplen)
        opt = off + 16
        opt_end = off + blen - 4
        opt_hdr = struct.Struct(order + "HH").unpack_from
        # Options are parsed leniently: a malformed option tail loses only
        # metadata, never packets.
        while opt + 4 <= opt_end:
            code, length = opt_hdr(view, opt)
            if code == _OPT_END:
                break
            value = opt + 4
            if value + length > opt_end:
                break
            if code == _OPT_IF_TSRESOL and length >= 1:
                res = view[value]
                exp = res & 0x7F
                iface.ts_divisor = (1 << exp) if res & 0x80 else 10**exp
            elif code == _OPT_IF_TSOFFSET and length >= 8:
                iface.ts_offset = struct.unpack_from(order + "q", view, value)[0]
            elif code == _OPT_IF_NAME:
                iface.name = (
                    bytes(view[value : value + length]).rstrip(b"\0").decode("utf-8", "replace")
                )
            opt = value + ((length + 3) & ~3)
        return iface


class PcapWalker:
    """Reads the records of a classic pcap file: the one walker of the reader's
    iteration, fastpath's Python lane and the records the C lane hands back.

    ``frames(off, stop)`` is the per-frame loop (a generator, so each frame costs
    one resume); ``step(off)`` reads one record. Both leave in ``next_off`` the
    offset of the record after the last one read, or -1 once the file was found
    to end inside a record (reported to the reader).
    """

    def __init__(self, reader: CaptureReader) -> None:
        self.reader = reader
        self.view = reader.view
        self.order = reader._pcap_order
        self.little = self.order == "<"
        self.header = struct.Struct(self.order + "IIII").unpack_from
        self.header_len = reader._pcap_rec_len
        iface = reader.interfaces[0]
        self.linktype = iface.linktype
        self.ts_divisor = iface.ts_divisor
        self.first = 24  # after the file header
        self.next_off = self.first

    def frames(self, off: int, stop: int, release: bool = False) -> Iterator[Frame]:
        """The frames of the records that start in [off, stop). With `release`, the
        mapping is handed back behind the walk (see CaptureReader.release_behind)."""
        view = self.view
        size = len(view)
        rec = self.header
        rec_len = self.header_len
        linktype = self.linktype
        divisor = self.ts_divisor
        new = _tuple_new
        release_at = off + RELEASE_STEP if release else size
        stop = min(stop, size)
        self.next_off = off
        while off < stop:
            if off >= release_at:
                release_at = self.reader.release_behind(off)
            start = off + rec_len
            if start > size:
                self.next_off = -1
                self.reader.report_truncated(off, "incomplete record header")
                return
            sec, frac, caplen, origlen = rec(view, off)
            end = start + caplen
            # caplen is deliberately not checked against snaplen or 65535: Linux
            # loopback GSO frames are up to 65549 bytes. The file size is the bound.
            if end > size:
                self.next_off = -1
                self.reader.report_truncated(
                    off, f"record needs {caplen} bytes, {size - start} left")
                return
            self.next_off = off = end
            yield new(Frame, (sec + frac / divisor, linktype, view[start:end], 0, origlen))

    def step(self, off: int) -> tuple[int, Frame | None]:
        """The record at `off`: (offset of the next one or -1, its frame or None)."""
        for frame in self.frames(off, off + 1):
            return self.next_off, frame
        return -1, None

    def time_at(self, off: int) -> float:
        """The timestamp of the (complete) record at `off`."""
        sec, frac = self.header(self.view, off)[:2]
        return sec + frac / self.ts_divisor


class PcapngWalker:
    """Reads a pcapng file one block at a time, from any block offset on.

    Holds what earlier blocks set (the section's byte order, its interfaces, the
    last timestamp for SPBs), so that a caller that walks some blocks itself (the
    C lane in analyzer.fastpath) can hand the others here in file order.
    """

    def __init__(self, reader: CaptureReader) -> None:
        self.reader = reader
        self.view = reader.view
        self.first = 0
        self.next_off = 0
        self.order = "<"
        self._structs("<")
        self.interfaces: list[Interface] = []
        reader.interfaces = self.interfaces
        reader.sections = 0
        self.last_ts = 0.0

    def _structs(self, order: str) -> None:
        self.hdr = struct.Struct(order + "II").unpack_from
        self.epb = struct.Struct(order + "IIIII").unpack_from
        self.u32 = struct.Struct(order + "I").unpack_from
        self.opb = struct.Struct(order + "HHIIII").unpack_from

    @property
    def little(self) -> bool:
        """The current section is little-endian."""
        return self.order == "<"

    def frames(self, off: int, stop: int, release: bool = False) -> Iterator[Frame]:
        """The frames of the blocks that start in [off, stop); `next_off` and
        `release` as for PcapWalker.frames."""
        size = min(stop, len(self.view))
        step = self.step
        self.next_off = off
        release_at = off + RELEASE_STEP if release else size
        while off < size:
            if off >= release_at:
                release_at = self.reader.release_behind(off)
            off, frame = step(off)
            self.next_off = off
            if frame is not None:
                yield frame
            elif off < 0:
                return

    def step(self, off: int) -> tuple[int, Frame | None]:
        """The block at `off`: (offset of the next block, its frame or None). The
        offset is -1 when the file ends truncated there (reported to the reader);
        a malformed block raises CaptureFormatError."""
        reader = self.reader
        view = self.view
        size = len(view)
        if off + 12 > size:
            reader._truncated(off, "incomplete block header")
            return -1, None
        btype, blen = self.hdr(view, off)
        if btype == _PCAPNG_SHB:
            self.order = reader._shb_byte_order(view, off)
            self._structs(self.order)
            btype, blen = self.hdr(view, off)
            if blen < 28:
                raise reader._error(off, f"section header block too short ({blen})")
        if blen < 12 or blen & 3:
            raise reader._error(off, f"invalid block length {blen}")
        end = off + blen
        if end > size:
            reader._truncated(off, f"block needs {blen} bytes, {size - off} left")
            return -1, None
        if self.u32(view, end - 4)[0] != blen:
            raise reader._error(off, "block trailer length does not match header")

        ifaces = self.interfaces
        if btype == _BT_EPB or btype == _BT_OPB:
            # The obsolete Packet Block is an EPB whose interface id is 16 bits,
            # followed by a 16-bit drop count.
            if blen < 32:
                what = "enhanced packet" if btype == _BT_EPB else "packet"
                raise reader._error(off, f"{what} block too short ({blen})")
            if btype == _BT_EPB:
                ifid, ts_hi, ts_lo, caplen, origlen = self.epb(view, off + 8)
            else:
                ifid, _drops, ts_hi, ts_lo, caplen, origlen = self.opb(view, off + 8)
            if caplen > blen - 32:
                raise reader._error(off, f"packet length {caplen} exceeds its block")
            if ifid >= len(ifaces):
                raise reader._error(off, f"packet references unknown interface {ifid}")
            iface = ifaces[ifid]
            self.last_ts = ((ts_hi << 32) | ts_lo) / iface.ts_divisor + iface.ts_offset
            start = off + 28
            return end, _tuple_new(
                Frame, (self.last_ts, iface.linktype, view[start : start + caplen], ifid, origlen))
        if btype == _PCAPNG_SHB:
            major = struct.unpack_from(self.order + "H", view, off + 12)[0]
            if major != 1:
                raise reader._error(off, f"unsupported pcapng version {major}")
            # Interface ids are scoped to their section.
            self.interfaces = []
            reader.interfaces = self.interfaces
            reader.sections += 1
        elif btype == _BT_IDB:
            if blen < 20:
                raise reader._error(off, f"interface description block too short ({blen})")
            ifaces.append(reader._parse_idb(view, off, blen, self.order))
        elif btype == _BT_SPB:
            if blen < 16:
                raise reader._error(off, f"simple packet block too short ({blen})")
            if not ifaces:
                raise reader._error(off, "simple packet block before any interface")
            iface = ifaces[0]
            origlen = self.u32(view, off + 8)[0]
            room = blen - 16
            caplen = min(origlen, room)
            # The block is padded to 4 bytes; when it was cut at snaplen the
            # padding must not be taken as packet bytes.
            if iface.snaplen and iface.snaplen < caplen and room - iface.snaplen < 4:
                caplen = iface.snaplen
            start = off + 12
            # SPBs carry no timestamp: reuse the previous one so that time
            # stays monotonic for rate computations.
            return end, _tuple_new(
                Frame, (self.last_ts, iface.linktype, view[start : start + caplen], 0, origlen))
        # Other block types (name resolution, statistics, secrets, custom) are
        # irrelevant to stream reassembly.
        return end, None


def iter_frames(
    path: str | os.PathLike[str],
    on_truncated: Callable[[int, str], None] | None = None,
) -> Iterator[Frame]:
    """Yield every frame of a pcap/pcapng file (see :class:`CaptureReader`)."""
    return CaptureReader(path, on_truncated)._frames(close_when_done=True)
