"""The RAM section payload (migration/ram.c `ram_load_precopy`).

RAM records are 99% of a migration's bytes: a be64 `addr | flags` header and, for a
PAGE, a whole page of data. They are walked with a precompiled struct taken from the
grammar, their page data skipped and never copied out, and reported as one `ram-pages`
record per section payload (or one record each with `ram_detail`). RAM records carry
no spans.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from migshark.analyzer import findings, speedups
from migshark.analyzer.decode.resync import plausible_name_at
from migshark.analyzer.decode.sections.base import SectionDissector, register
from migshark.analyzer.findings import Code
from migshark.analyzer.records import Record
from migshark.dissectors import grammar as g
from migshark.dissectors.registry import Kind

if TYPE_CHECKING:
    from migshark.analyzer.decode.framing import FramingMachine, NeedMore, Section

_RAM_HEADER = struct.Struct(g.RamRecordHeader.fmtstr)
_IDSTR = g.RAM_SECTION_IDSTR

# RamFlag members as plain ints: IntFlag arithmetic builds an enum member per
# operation (microseconds), paid for every record of every idle iteration.
_ZERO, _MEM_SIZE = int(g.RamFlag.ZERO), int(g.RamFlag.MEM_SIZE)
_PAGE, _EOS, _CONTINUE = int(g.RamFlag.PAGE), int(g.RamFlag.EOS), int(g.RamFlag.CONTINUE)
_XBZRLE, _HOOK = int(g.RamFlag.XBZRLE), int(g.RamFlag.HOOK)
_MULTIFD_FLUSH, _FULL = int(g.RamFlag.MULTIFD_FLUSH), int(g.RamFlag.FULL)
_VALID_RAM_FLAGS = int(
    g.RamFlag.ZERO | g.RamFlag.MEM_SIZE | g.RamFlag.PAGE | g.RamFlag.EOS | g.RamFlag.CONTINUE
    | g.RamFlag.XBZRLE | g.RamFlag.HOOK | g.RamFlag.COMPRESS_PAGE | g.RamFlag.MULTIFD_FLUSH
)
_PAGE_OR_ZERO = _PAGE | _ZERO
_PAGE_CONTINUE = _PAGE | _CONTINUE
_ZERO_CONTINUE = _ZERO | _CONTINUE
_NOT_PAGE_RECORD = ~(_PAGE | _ZERO | _CONTINUE)


class RamRun:
    """Counters for the RAM records of one section payload, reported as one record."""

    __slots__ = ("start", "pages", "zero_pages", "other", "data_bytes")

    def __init__(self, start: int) -> None:
        self.start = start
        self.pages = 0
        self.zero_pages = 0
        self.other = 0
        self.data_bytes = 0


@register(_IDSTR)
class RamDissector(SectionDissector):
    description = "a RAM record"
    # The two record shapes a caller may walk itself (StreamDecoder.ram_walk_state).
    PAGE_CONTINUE = _PAGE_CONTINUE
    ZERO_CONTINUE = _ZERO_CONTINUE

    def __init__(self, machine: FramingMachine) -> None:
        super().__init__(machine)
        self.run: RamRun | None = None
        # The block of CONTINUE records; it outlives a section payload, as in ram.c.
        self.block: str | None = None

    def begin(self, section: Section, item_type: int) -> None:
        self.run = RamRun(self.rb.offset)

    def interrupted(self, at: int) -> None:
        self._flush_run(at)

    def _flush_run(self, end: int) -> None:
        run = self.run
        machine = self.machine
        if run is None or machine.ram_detail:
            self.run = None
            return
        if run.pages or run.zero_pages or run.other:
            current = machine.current
            # Not machine.record(): the run may be flushed after its section ended.
            machine.emit(Record(
                run.start, end - run.start, Kind.RAM_PAGES, _IDSTR,
                current.section_id if current else None,
                {"pages": run.pages, "zero_pages": run.zero_pages,
                 "other_records": run.other, "page_bytes": run.data_bytes},
                machine.depth))
        self.run = None

    def read(self) -> NeedMore | None:
        machine = self.machine
        rb = self.rb
        buf = rb.data
        mask = machine.page_mask
        page_size = machine.page_size
        unpack = _RAM_HEADER.unpack_from
        run = self.run
        detail = machine.ram_detail
        limit = len(buf)
        if machine.package_end is not None:
            limit = min(limit, machine.package_end - rb.base)
        pos = rb.pos
        while True:
            if limit - pos < 8:
                rb.pos = pos
                return machine.short(8, "a RAM record")
            header = unpack(buf, pos)[0]
            flags = header & mask
            body = pos + 8
            if flags & _PAGE_OR_ZERO and not flags & _NOT_PAGE_RECORD:
                if not flags & _CONTINUE:
                    if body >= limit:
                        rb.pos = pos
                        return machine.short(body - pos + 1, "a RAM record")
                    name_len = buf[body]
                    if body + 1 + name_len > limit:
                        rb.pos = pos
                        return machine.short(body - pos + 1 + name_len, "a RAM record")
                    self.block = bytes(buf[body + 1 : body + 1 + name_len]).decode(
                        "utf-8", "replace")
                    body += 1 + name_len
                elif self.block is None:
                    rb.pos = pos
                    self._error(pos, "RAM record with CONTINUE before any block name",
                                flags)
                    return None
                if flags & _PAGE:
                    end = body + page_size
                    if detail:
                        rb.pos = pos
                        if end > limit and machine.hits_package_end(end - pos):
                            return machine.short(end - pos, "a RAM page")
                        machine.record(Kind.RAM_PAGE, rb.absolute(pos), rb.absolute(end),
                                       addr=header & ~mask, block=self.block)
                    if run is not None:
                        run.pages += 1
                        run.data_bytes += page_size
                    if end > len(buf):
                        if (machine.package_end is not None
                                and rb.absolute(end) > machine.package_end):
                            rb.pos = pos
                            return machine.short(end - pos, "a RAM page")
                        # Skip the rest of the page as it arrives, without buffering it.
                        rb.start_skip(end - len(buf), rb.absolute(pos))
                        rb.pos = len(buf)
                        return None
                    pos = end
                else:
                    if body >= limit:
                        rb.pos = pos
                        return machine.short(body - pos + 1, "a RAM record")
                    if detail:
                        rb.pos = pos
                        machine.record(Kind.RAM_ZERO, rb.absolute(pos), rb.absolute(body + 1),
                                       addr=header & ~mask, block=self.block, fill=buf[body])
                    if run is not None:
                        run.zero_pages += 1
                    pos = body + 1
                continue
            rb.pos = pos
            return self._read_other(header, flags)

    def walk_direct(self, view: memoryview) -> memoryview:
        """Walk whole PAGE/ZERO records straight from the fed data, so that page data
        (nearly all of a migration) is never copied into the buffer. Stops at anything
        else, or at a record cut by the end of `view`, and returns the bytes left for
        the buffered path; a page cut by the end is skipped as it arrives."""
        rb = self.rb
        unpack = _RAM_HEADER.unpack_from
        mask = self.machine.page_mask
        page_size = self.machine.page_size
        limit = len(view)
        pos = pages = zeros = 0
        native = speedups.native
        while limit - pos >= 8:
            if native is not None:
                pos, walked_pages, walked_zeros, skip = native.ram_walk(
                    view, pos, mask, page_size, _PAGE_CONTINUE, _ZERO_CONTINUE)
                pages += walked_pages
                zeros += walked_zeros
                if skip:
                    rb.start_skip(skip, rb.base + limit + skip - 8 - page_size)
                    break
                if limit - pos < 8:
                    break
            header = unpack(view, pos)[0]
            flags = header & mask
            # The two shapes of nearly every record come first, tested by equality.
            if flags == _PAGE_CONTINUE:
                pages += 1
                pos += 8 + page_size
                if pos > limit:
                    rb.start_skip(pos - limit, rb.base + pos - 8 - page_size)
                    pos = limit
                    break
                continue
            if flags == _ZERO_CONTINUE:
                if pos + 9 > limit:
                    break
                zeros += 1
                pos += 9
                continue
            if not flags & _PAGE_OR_ZERO or flags & _NOT_PAGE_RECORD:
                break
            body = pos + 8
            if not flags & _CONTINUE:
                if body >= limit:
                    break
                name_end = body + 1 + view[body]
                if name_end > limit:
                    break
                self.block = bytes(view[body + 1 : name_end]).decode("utf-8", "replace")
                body = name_end
            elif self.block is None:
                break  # the buffered path reports it
            if flags & _PAGE:
                pages += 1
                end = body + page_size
                if end > limit:
                    rb.start_skip(end - limit, rb.base + pos)
                    pos = limit
                    break
                pos = end
            else:
                if body >= limit:
                    break
                zeros += 1
                pos = body + 1
        run = self.run
        assert run is not None
        run.pages += pages
        run.zero_pages += zeros
        run.data_bytes += pages * page_size
        rb.base += pos
        return view[pos:]

    def _error(self, pos: int, message: str, flags: int, **data: Any) -> None:
        start = self.rb.absolute(pos)
        self._flush_run(start)
        self.machine.emit(findings.make(Code.UNKNOWN_FLAGS, message, start, section=_IDSTR,
                                        fields={"ram_flags": flags, **data}))
        self.machine.enter_resync(start)

    def _read_other(self, header: int, flags: int) -> NeedMore | None:
        """RAM records off the hot path: EOS, MEM_SIZE, XBZRLE, compressed, flush."""
        machine = self.machine
        rb = self.rb
        buf = rb.data
        pos = rb.pos
        start = rb.absolute(pos)
        addr = header & ~machine.page_mask
        run = self.run
        if flags & ~_VALID_RAM_FLAGS or flags == 0 or flags & _FULL:
            self._error(pos, f"RAM record with invalid flags {flags:#x} at {start:#x}", flags)
            return None
        if flags & _MEM_SIZE:
            return self._read_mem_size(addr, flags)
        if flags & _EOS:
            self._flush_run(start)
            machine.record(Kind.RAM_EOS, start, start + 8)
            rb.pos += 8
            machine.end_payload()
            return None
        if flags & _MULTIFD_FLUSH:
            machine.record(Kind.RAM_MULTIFD_FLUSH, start, start + 8)
            rb.pos += 8
            return None
        if flags & _HOOK:
            machine.record(Kind.RAM_HOOK, start, start + 8)
            rb.pos += 8
            return None
        body = pos + 8
        if not flags & _CONTINUE:
            if machine.available() < 9:
                return machine.short(9, "a RAM record")
            name_len = buf[body]
            if machine.available() < 9 + name_len:
                return machine.short(9 + name_len, "a RAM record")
            self.block = g.RamBlockName.parse(bytes(buf[body : body + 1 + name_len]))
            body += 1 + name_len
        head_size = 3 if flags & _XBZRLE else 4
        if machine.available() < body - pos + head_size:
            return machine.short(body - pos + head_size, "a RAM record")
        if flags & _XBZRLE:
            head = g.RamXbzrleHeader.parse(bytes(buf[body : body + 3]))
            kind, data_len = Kind.RAM_XBZRLE, head.length
        else:
            head = g.RamCompressedHeader.parse(bytes(buf[body : body + 4]))
            kind, data_len = Kind.RAM_COMPRESSED, head.length
            if data_len > 2 * machine.page_size + 64:
                self._error(pos, f"compressed RAM page of {data_len} bytes", flags,
                            data_length=data_len, limit=2 * machine.page_size + 64)
                return None
        end = body + head_size + data_len
        if machine.available() < end - pos:
            return machine.short(end - pos, "a RAM record")
        if machine.ram_detail:
            machine.record(kind, start, rb.absolute(end), addr=addr, block=self.block,
                           data_length=data_len)
        if run is not None:
            run.other += 1
        rb.pos = end
        return None

    def _read_mem_size(self, total: int, flags: int) -> NeedMore | None:
        machine = self.machine
        rb = self.rb
        buf = rb.data
        record_pos = rb.pos
        pos = record_pos + 8
        blocks: list[dict[str, Any]] = []
        remaining = total
        avail_end = record_pos + machine.available()
        while remaining > 0:
            if pos >= avail_end:
                return machine.short(pos - record_pos + 1, "a RAM MEM_SIZE record")
            name_len = buf[pos]
            if name_len == 0:
                self._error(record_pos, "RAM MEM_SIZE block with an empty name", flags)
                return None
            if pos + 1 + name_len + 8 > avail_end:
                return machine.short(pos + 1 + name_len + 8 - record_pos,
                                     "a RAM MEM_SIZE record")
            entry = g.RamBlockSize.parse(bytes(buf[pos : pos + 1 + name_len + 8]))
            pos += 1 + name_len + 8
            block: dict[str, Any] = {"idstr": entry.idstr, "used_length": entry.used_length}
            # postcopy-ram (huge pages) adds a page size and x-ignore-shared an address;
            # neither is announced in the stream, but both are page aligned (no flag
            # bits), unlike the record header that follows the last block.
            extras: list[int] = []
            while len(extras) < 2:
                if pos + 8 > avail_end:
                    return machine.short(pos + 8 - record_pos, "a RAM MEM_SIZE record")
                if remaining - entry.used_length > 0 and buf[pos] != 0:
                    break
                value = _RAM_HEADER.unpack_from(buf, pos)[0]
                if value & machine.page_mask:
                    break
                extras.append(value)
                pos += 8
            if extras:
                block["extra"] = extras
            blocks.append(block)
            if entry.used_length > remaining:
                break
            remaining -= entry.used_length
        start = rb.absolute(record_pos)
        machine.record(Kind.RAM_MEM_SIZE, start, rb.absolute(pos), total_bytes=total,
                       blocks=blocks)
        rb.pos = pos
        if flags & _EOS:
            self._flush_run(rb.absolute(pos))
            machine.end_payload()
        return None

    def plausible_start(self, buf: bytearray, pos: int, limit: int) -> bool | None:
        if pos + 8 > limit:
            return None
        flags = _RAM_HEADER.unpack_from(buf, pos)[0] & self.machine.page_mask
        if flags & ~_VALID_RAM_FLAGS or not flags:
            return False
        if flags & _PAGE_OR_ZERO and not flags & _CONTINUE:
            return plausible_name_at(buf, pos + 8, limit)
        return not flags & _CONTINUE or self.block is not None
