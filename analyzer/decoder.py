"""Sans-IO incremental decoder for the QEMU migration stream.

`StreamDecoder.feed(data)` accepts the stream in any chunking and returns the
records and findings completed so far; `finish()` closes the stream. It never
reads files or sockets. Feeding a stream whole or one byte at a time gives the
same events: every state handler either consumes a whole element or says how
many bytes it needs before it is worth running again.

Framing items and dirty-bitmap records are parsed through the construct grammar in
`dissectors.grammar`. RAM records, 99% of the bytes, are walked with a precompiled
struct taken from the same grammar and their page data is skipped, never copied out.
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from construct import ConstructError

from migshark.analyzer import findings, speedups
from migshark.analyzer.records import Event, EventQueue, Finding, Record
from migshark.analyzer.vmstate import VmstateIncomplete, VmstateInvalid, walk_device
from migshark.dissectors import grammar as g

_RAM_HEADER = struct.Struct(g.RamRecordHeader.fmtstr)
_BITMAP_START_LEN = g.BitmapStart.sizeof()
_BITMAP_BITS_HEAD_LEN = g.BitmapBitsHead.sizeof()
_BF_ZEROES, _BF_EOS = int(g.BitmapFlag.ZEROES), int(g.BitmapFlag.EOS)
_BF_EXTRA = int(g.BitmapFlag.EXTRA_FLAGS)
_BITMAP_KIND_NAMES = {kind.value: "bitmap-" + kind.label for kind in g.RecordKind}
# Heads the grammar parsed to a single byte (EOS, COMPLETE without names...) depend
# on that byte alone; real streams repeat them by the thousand (idle iterations).
_ONE_BYTE_HEADS: dict[int, Any] = {}
# Fixed layouts are read with struct formats taken from the grammar's declarations.
_SECTION_SHORT = struct.Struct(">" + g.fixed_format(g.SectionHeaderShort))
_FOOTER = struct.Struct(">" + g.fixed_format(g.SectionFooter))


class _GrammarParser:
    """A grammar declaration's parser, compiled by construct once it has been used
    often enough to pay for compiling (a few ms each, at every start otherwise)."""

    COMPILE_AFTER = 64

    def __init__(self, declaration: Any) -> None:
        self.declaration = declaration
        self.parse: Callable[[bytes], Any] = self._counting_parse
        self.uses = 0

    def _counting_parse(self, data: bytes) -> Any:
        self.uses += 1
        if self.uses >= self.COMPILE_AFTER:
            self.parse = g.compiled(self.declaration).parse
        return self.declaration.parse(data)


_section_full = _GrammarParser(g.SectionHeaderFull)
_bitmap_head = _GrammarParser(g.BitmapRecordHead)  # a head of a new shape or with names
_BE32 = struct.Struct(">I")
_BE16 = struct.Struct(">H")

# Bounds on lengths read from the wire, so that a hostile length never makes us
# buffer or allocate more than this before we give up on an element.
MAX_CONFIGURATION = 4096
MAX_VMDESCRIPTION = 64 << 20
MAX_DEVICE_SECTION = 64 << 20
# A BITS buffer QEMU refuses is still skipped (to keep decoding) up to this size;
# beyond it the length is treated as garbage and we resynchronise.
MAX_SKIPPED_BITMAP_BUFFER = 64 << 20

_VALID_RAM_FLAGS = (
    g.RamFlag.ZERO | g.RamFlag.MEM_SIZE | g.RamFlag.PAGE | g.RamFlag.EOS | g.RamFlag.CONTINUE
    | g.RamFlag.XBZRLE | g.RamFlag.HOOK | g.RamFlag.COMPRESS_PAGE | g.RamFlag.MULTIFD_FLUSH
)

# Plain ints for the RAM hot loop: IntFlag arithmetic costs microseconds per record.
# RamFlag members as plain ints: IntFlag arithmetic builds an enum member per
# operation (microseconds), paid for every record of every idle iteration.
_RF = SimpleNamespace(**{name: int(flag) for name, flag in g.RamFlag.__members__.items()})
_PAGE = int(g.RamFlag.PAGE)
_CONTINUE = int(g.RamFlag.CONTINUE)
_PAGE_OR_ZERO = int(g.RamFlag.PAGE | g.RamFlag.ZERO)
_PAGE_CONTINUE = int(g.RamFlag.PAGE | g.RamFlag.CONTINUE)
_ZERO_CONTINUE = int(g.RamFlag.ZERO | g.RamFlag.CONTINUE)
_NOT_PAGE_RECORD = ~int(g.RamFlag.PAGE | g.RamFlag.ZERO | g.RamFlag.CONTINUE)

NeedMore = int  # a handler's "come back when this many bytes are buffered from _pos"


class _Section:
    __slots__ = ("section_id", "idstr", "instance_id", "version_id")

    def __init__(self, section_id: int, idstr: str, instance_id: int, version_id: int) -> None:
        self.section_id = section_id
        self.idstr = idstr
        self.instance_id = instance_id
        self.version_id = version_id


class _RamRun:
    """Counters for the RAM records of one section payload, reported as one record."""

    __slots__ = ("start", "pages", "zero_pages", "other", "data_bytes")

    def __init__(self, start: int) -> None:
        self.start = start
        self.pages = 0
        self.zero_pages = 0
        self.other = 0
        self.data_bytes = 0


def _printable(name: bytes) -> bool:
    return bool(name) and all(0x20 < b < 0x7F for b in name)


def _plausible_name_at(buf: bytearray, pos: int, limit: int) -> bool | None:
    """Whether a counted idstr at pos looks like one QEMU writes (None: not enough
    bytes yet). Used where the decoder has to guess where the next item starts."""
    if pos >= limit:
        return None
    name_end = pos + 1 + buf[pos]
    if name_end > limit:
        return None
    return _printable(bytes(buf[pos + 1 : name_end]))


class StreamDecoder(EventQueue):
    """Decode one migration stream direction (source to destination)."""

    def __init__(
        self,
        *,
        vmdesc: dict[str, Any] | None = None,
        target_page_size: int = g.DEFAULT_TARGET_PAGE_SIZE,
        ram_detail: bool = False,
    ) -> None:
        self.ram_detail = ram_detail
        self.page_size = target_page_size
        self._page_mask = target_page_size - 1
        self._vmdesc_devices = _index_vmdesc(vmdesc) if vmdesc else None
        self._buf = bytearray()
        self._pos = 0
        self._base = 0  # stream offset of _buf[0]
        self._need = 1
        self._skip = 0  # bytes still to skip without buffering (page data, big buffers)
        self._skip_start = 0  # stream offset of the element whose bytes are being skipped
        # Events of a record whose skipped buffer is still arriving: emitted once it
        # has, so that no record claims bytes the decoder has not been fed.
        self._deferred: list[Event] = []
        super().__init__()
        self._state: Callable[[], NeedMore | None] = self._state_header
        self._sections: dict[int, _Section] = {}
        self._current: _Section | None = None
        self._current_type = 0
        self._item_start = 0
        self._package_end: int | None = None
        self._depth = 0
        self._ram_run: _RamRun | None = None
        self._ram_block: str | None = None
        self._bm_node: str | None = None
        self._bm_name: str | None = None
        self._bm_saw_eos = False
        self._device_scan_from = 0
        self._retained_devices: list[tuple[_Section, bytes, int]] = []
        self._phases: set[str] = set()
        self._resync_from: int | None = None
        self.finished = False
        self.ended = False  # EOF item seen
        self.machine_type: str | None = None
        self.vmdesc: dict[str, Any] | None = vmdesc

    # --- public API ---------------------------------------------------------

    @property
    def offset(self) -> int:
        """Stream offset just past the last byte fed (or lost in a gap)."""
        return self._base + len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview, timestamp: float | None = None) -> list[
        Event
    ]:
        if timestamp is not None:
            self._timestamp = timestamp
        if self.finished:
            return []
        view = memoryview(data)
        if self._skip:
            taken = min(self._skip, len(view))
            self._skip -= taken
            self._base += taken
            view = view[taken:]
            if self._skip:
                return self._drain()
            self._release_deferred()
        if view:
            if (self._state == self._state_ram and self._pos == len(self._buf)
                    and not self.ram_detail and self._package_end is None
                    and self._ram_run is not None):
                if self._buf:  # consumed bytes left behind when a page skip began
                    self._base += self._pos
                    self._buf.clear()
                    self._pos = 0
                view = self._ram_direct(view)
                if not view:
                    return self._drain()
                self._need = 1
            self._buf += view
        if len(self._buf) - self._pos >= self._need:
            self._run()
        return self._drain()

    def ram_walk_state(self) -> tuple[int, int, int, int, int] | None:
        """Let a caller walk plain RAM records itself (analyzer.fastpath's C lane).

        When the decoder sits between RAM records with nothing buffered, returns
        (page mask, page size, page|continue flags, zero|continue flags, page bytes
        still to skip): records of exactly those two shapes may be walked outside and
        reported with ram_walked(); anything else must be fed. Otherwise None.
        """
        if (self._state != self._state_ram or self._pos != len(self._buf) or self.ram_detail
                or self._package_end is not None or self._ram_run is None
                or self._ram_block is None or self._deferred or self.finished):
            return None
        if self._buf:
            self._base += self._pos
            self._buf.clear()
            self._pos = 0
        return self._page_mask, self.page_size, _PAGE_CONTINUE, _ZERO_CONTINUE, self._skip

    def ram_walked(self, taken: int, pages: int, zero_pages: int, skip: int, skip_start: int,
                   timestamp: float) -> None:
        """Account for `taken` stream bytes walked after ram_walk_state(): `pages` page
        and `zero_pages` zero records, ending `skip` bytes into a page whose record
        began `skip_start` bytes after the old position (-1: before it)."""
        run = self._ram_run
        assert run is not None
        if skip and skip_start >= 0:
            self._skip_start = self._base + skip_start
        self._base += taken
        self._skip = skip
        self._timestamp = timestamp
        self._need = 1
        run.pages += pages
        run.zero_pages += zero_pages
        run.data_bytes += pages * self.page_size

    def gap(self, length: int, timestamp: float | None = None) -> list[Event]:
        """`length` bytes of the stream were lost (capture gap) at the current end."""
        if timestamp is not None:
            self._timestamp = timestamp
        if self.finished or length <= 0:
            return self._drain()
        gap_start = self.offset
        if self._skip >= length:
            # The hole lies inside page data or a buffer we were skipping anyway:
            # decoding continues exactly, only the skipped bytes are unknown.
            self._skip -= length
            self._base += length
            if not self._skip:
                self._release_deferred()
            self._emit(findings.make(
                "capture-gap",
                f"{length} bytes missing from the capture at {gap_start:#x}; they fell "
                f"inside skipped data, decoding continues exactly",
                gap_start, length=length, section=self._section_name()))
            return self._drain()
        self._emit(findings.make(
            "capture-gap",
            f"{length} bytes missing from the capture at {gap_start:#x}; "
            "resynchronising on the next recognisable item",
            gap_start, length=length, section=self._section_name()))
        self._flush_ram_run(gap_start)
        self._release_deferred()
        self._base = gap_start + length
        self._buf.clear()
        self._pos = 0
        self._skip = 0
        self._package_end = None
        self._depth = 0
        self._enter_resync(self._base)
        return self._drain()

    def finish(self) -> list[Event]:
        if self.finished:
            return self._drain()
        self._run()
        self._release_deferred()
        remaining = len(self._buf) - self._pos
        # What was fed: the bytes a pending skip still expected never came.
        end = self._base + len(self._buf)
        if self._state in (self._state_done, self._state_after_vmdesc) or (
            self._state == self._state_after_eof and remaining == 0
        ):
            pass
        elif self._state == self._state_resync:
            skipped = end - (self._resync_from if self._resync_from is not None else end)
            if skipped:
                self._emit(findings.make(
                    "resynchronised",
                    f"skipped {skipped} bytes to the end of data without finding an item",
                    end - skipped, length=skipped))
            self._emit(findings.make(
                "truncated", "the stream ended while resynchronising, before EOF", end))
        elif self._state == self._state_item and remaining == 0 and self._skip == 0:
            if self._depth:
                self._emit(findings.make(
                    "truncated", "the data ended inside a PACKAGED command", end))
            else:
                self._emit(findings.make(
                    "truncated", "the stream ended between items, before EOF", end,
                    section=self._section_name()))
        else:
            start = self._record_start()
            what = self._state_description()
            self._emit(findings.make(
                "truncated",
                f"the data ended inside {what} that starts at {start:#x} "
                f"({end - start} of its bytes present)",
                start, length=end - start, section=self._section_name()))
            if self._state == self._state_bitmap and not self._bm_saw_eos:
                self._emit(findings.make(
                    "missing-eos",
                    "the dirty-bitmap section payload ended (end of data) without an EOS "
                    "record", end, section=g.DIRTY_BITMAP_SECTION_IDSTR))
        self._flush_ram_run(end)
        self.finished = True
        return self._drain()

    # --- machinery ----------------------------------------------------------

    def _release_deferred(self) -> None:
        """Emit the events held back while a skipped buffer arrived; if the data ended
        or broke off first, they claim only the bytes that did arrive."""
        if not self._deferred:
            return
        end = self._base + len(self._buf)
        for event in self._deferred:
            event.length = max(0, min(event.length, end - event.offset))
        self._events.extend(self._deferred)
        self._deferred = []

    def _record(self, kind: str, start: int, end: int, **fields: Any) -> Record:
        sec = self._current
        record = Record(
            offset=start, length=end - start, kind=kind,
            section=sec.idstr if sec else None,
            section_id=sec.section_id if sec else None,
            fields=fields, depth=self._depth, timestamp=self._timestamp,
        )
        self._events.append(record)
        return record

    def _run(self) -> None:
        while True:
            if self._skip:
                return
            need = self._state()
            if need is not None:
                self._need = max(1, need)
                break
        if self._pos > 65536 or self._pos == len(self._buf):
            del self._buf[: self._pos]
            self._base += self._pos
            # A buffer index: it must move with the bytes or the footer scan skips them.
            self._device_scan_from = max(0, self._device_scan_from - self._pos)
            self._pos = 0

    def _abs(self, pos: int) -> int:
        return self._base + pos

    def _available(self) -> int:
        """Bytes from _pos usable by the current item (bounded by a PACKAGED blob)."""
        avail = len(self._buf) - self._pos
        if self._package_end is not None:
            avail = min(avail, self._package_end - self._abs(self._pos))
        return avail

    def _hits_package_end(self, needed: int) -> bool:
        return (self._package_end is not None
                and self._abs(self._pos) + needed > self._package_end)

    def _section_name(self) -> str | None:
        return self._current.idstr if self._current else None

    def _record_start(self) -> int:
        return self._skip_start if self._skip else self._abs(self._pos)

    def _state_description(self) -> str:
        return {
            self._state_header: "the stream header",
            self._state_item: "an item",
            self._state_ram: "a RAM record",
            self._state_bitmap: "a dirty-bitmap record",
            self._state_device: "a device state section",
            self._state_footer: "a section footer",
        }.get(self._state, "an element")

    def _phase(self, name: str, offset: int) -> None:
        if name in self._phases:
            return
        self._phases.add(name)
        self._emit(findings.make("phase", f"migration phase: {name}", offset))

    def _package_overrun(self, what: str) -> None:
        """An element claims bytes past the end of its PACKAGED blob."""
        start = self._abs(self._pos)
        assert self._package_end is not None
        self._emit(findings.make(
            "truncated", f"{what} at {start:#x} runs past the end of its PACKAGED command "
            f"at {self._package_end:#x}", start, length=self._package_end - start,
            section=self._section_name()))
        self._pos += self._package_end - start
        self._leave_package()
        self._state = self._state_item

    def _leave_package(self) -> None:
        self._package_end = None
        self._depth = 0

    # --- header and items ---------------------------------------------------

    def _state_header(self) -> NeedMore | None:
        if len(self._buf) - self._pos < g.FileHeader.sizeof():
            return g.FileHeader.sizeof()
        raw = bytes(self._buf[self._pos : self._pos + 8])
        magic, version = raw[:4], _BE32.unpack_from(raw, 4)[0]
        if magic != g.QEVM_MAGIC:
            self._emit(findings.make(
                "bad-magic", f"stream starts with {magic!r}, not b'QEVM'", 0, length=4))
            self._enter_resync(0)
            return None
        header = g.FileHeader.parse(raw)
        self._record("file-header", 0, 8, magic="QEVM", version=header.version)
        if version != g.QEVM_VERSION:
            self._emit(findings.make(
                "bad-version", f"stream version {version}, QEMU reads only 3", 4, length=4))
        self._pos += 8
        self._state = self._state_item
        return None

    def _state_item(self) -> NeedMore | None:
        if self._package_end is not None and self._abs(self._pos) >= self._package_end:
            self._record("package-end", self._package_end, self._package_end)
            self._leave_package()
            return None
        if self._available() < 1:
            return 1
        self._item_start = self._abs(self._pos)
        item_type = self._buf[self._pos]
        handler = self._item_handlers.get(item_type)
        if handler is None:
            self._emit(findings.make(
                "unknown-item", f"unknown item type byte {item_type:#04x}", self._item_start,
                length=1, section=self._section_name()))
            self._enter_resync(self._item_start)
            return None
        return handler(self)

    def _item_eof(self) -> NeedMore | None:
        self._record("eof", self._item_start, self._item_start + 1)
        self._pos += 1
        self.ended = True
        if self._depth:
            # EOF inside a package ends the nested load; QEMU's loader returns there.
            return None
        self._state = self._state_after_eof
        return None

    def _state_after_eof(self) -> NeedMore | None:
        if self._available() < 1:
            return 1
        if self._buf[self._pos] == g.ItemType.VMDESCRIPTION:
            self._item_start = self._abs(self._pos)
            return self._item_vmdescription()
        self._trailing()
        return None

    def _trailing(self) -> None:
        start = self._abs(self._pos)
        self._emit(findings.make(
            "trailing-data", f"data after the end of the stream at {start:#x}", start))
        self._state = self._state_done

    def _state_done(self) -> NeedMore | None:
        # Swallow whatever follows; it was reported once.
        self._pos = len(self._buf)
        return 1

    def _item_vmdescription(self) -> NeedMore | None:
        avail = self._available()
        if avail < 5:
            return 5
        length = _BE32.unpack_from(self._buf, self._pos + 1)[0]
        if length > MAX_VMDESCRIPTION:
            self._emit(findings.make(
                "truncated", f"VMDESCRIPTION claims {length} bytes, more than the "
                f"{MAX_VMDESCRIPTION} this decoder accepts", self._item_start))
            self._state = self._state_done
            return None
        if avail < 5 + length:
            return 5 + length
        body = g.LengthPrefixed32.parse(bytes(self._buf[self._pos + 1 : self._pos + 5 + length]))
        try:
            desc = json.loads(body.data)
        except ValueError:
            desc = None
        self._pos += 5 + length
        self._record("vmdescription", self._item_start, self._item_start + 5 + length,
                     length=length, valid_json=desc is not None,
                     devices=len(desc.get("devices", [])) if isinstance(desc, dict) else 0)
        if isinstance(desc, dict):
            self.vmdesc = desc
            self._check_retained_devices(desc)
        self._state = self._state_after_vmdesc
        return None

    def _state_after_vmdesc(self) -> NeedMore | None:
        if self._available() < 1:
            return 1
        self._trailing()
        return None

    def _item_configuration(self) -> NeedMore | None:
        if self._available() < 5:
            return self._short(5, "CONFIGURATION")
        length = _BE32.unpack_from(self._buf, self._pos + 1)[0]
        if length > MAX_CONFIGURATION:
            self._emit(findings.make(
                "truncated", f"CONFIGURATION claims a {length}-byte machine type",
                self._item_start, section="configuration"))
            self._enter_resync(self._item_start + 1)
            return None
        if self._available() < 5 + length:
            return self._short(5 + length, "CONFIGURATION")
        body = g.LengthPrefixed32.parse(bytes(self._buf[self._pos + 1 : self._pos + 5 + length]))
        name = body.data.decode("utf-8", "replace")
        self.machine_type = name
        pos = self._pos + 5 + length
        subsections: list[str] = []
        # Newer QEMU appends vmstate subsections (target page bits, capabilities, uuid).
        while True:
            parsed = self._configuration_subsection(pos)
            if parsed is None:
                return self._short(pos - self._pos + 512, "CONFIGURATION subsection")
            if parsed is False:
                break
            name_sub, pos = parsed
            subsections.append(name_sub)
        self._record("configuration", self._item_start, self._abs(pos), machine_type=name,
                     subsections=subsections)
        self._pos = pos
        return None

    def _configuration_subsection(self, pos: int) -> tuple[str, int] | None | bool:
        """(name, end) for a subsection at pos, False if none starts there, None if short."""
        end = len(self._buf)
        if pos >= end:
            return None
        if self._buf[pos] != g.ItemType.SUBSECTION:
            return False
        if pos + 2 > end:
            return None
        name_len = self._buf[pos + 1]
        head_end = pos + 2 + name_len + 4
        if head_end > end:
            return None
        head = g.SubsectionHeader.parse(bytes(self._buf[pos + 1 : head_end]))
        body = head_end
        if head.idstr == "configuration/target-page-bits":
            body += 4
        elif head.idstr == "configuration/uuid":
            body += 16
        elif head.idstr == "configuration/capabilities":
            if body + 4 > end:
                return None
            count = _BE32.unpack_from(self._buf, body)[0]
            body += 4
            for _ in range(min(count, 64)):
                if body >= end:
                    return None
                body += 1 + self._buf[body]
        else:
            return False
        if body > end:
            return None
        return head.idstr, body

    def _short(self, needed: int, what: str) -> NeedMore | None:
        if self._hits_package_end(needed):
            self._package_overrun(what)
            return None
        return needed

    def _item_section_full_header(self) -> NeedMore | None:
        if self._available() < 6:
            return self._short(6, "a section header")
        name_len = self._buf[self._pos + 5]
        size = 1 + 4 + 1 + name_len + 8
        if self._available() < size:
            return self._short(size, "a section header")
        head = _section_full.parse(bytes(self._buf[self._pos + 1 : self._pos + size]))
        item_type = self._buf[self._pos]
        section = _Section(head.section_id, head.idstr, head.instance_id, head.version_id)
        self._sections[head.section_id] = section
        self._current = section
        self._current_type = item_type
        kind = "section-start" if item_type == g.ItemType.SECTION_START else "section-full"
        self._record(kind, self._item_start, self._item_start + size,
                     section_id=head.section_id, idstr=head.idstr,
                     instance_id=head.instance_id, version_id=head.version_id)
        self._pos += size
        if item_type == g.ItemType.SECTION_START:
            self._phase("setup", self._item_start)
        elif not self._depth:
            self._phase("completion", self._item_start)
        self._begin_payload(section, item_type)
        return None

    def _item_section_part(self) -> NeedMore | None:
        if self._available() < 5:
            return self._short(5, "a section header")
        (section_id,) = _SECTION_SHORT.unpack_from(self._buf, self._pos + 1)
        item_type = self._buf[self._pos]
        section = self._sections.get(section_id)
        kind = "section-part" if item_type == g.ItemType.SECTION_PART else "section-end"
        if section is None:
            self._current = None
            self._record(kind, self._item_start, self._item_start + 5,
                         section_id=section_id)
            self._emit(findings.make(
                "unknown-section", f"{kind} for section id {section_id}, never started",
                self._item_start, length=5))
            self._pos += 5
            self._enter_resync(self._abs(self._pos))
            return None
        self._current = section
        self._current_type = item_type
        self._record(kind, self._item_start, self._item_start + 5, section_id=section_id,
                     idstr=section.idstr)
        self._pos += 5
        self._phase("iteration" if item_type == g.ItemType.SECTION_PART else "completion",
                    self._item_start)
        self._begin_payload(section, item_type)
        return None

    def _begin_payload(self, section: _Section, item_type: int) -> None:
        if section.idstr == g.RAM_SECTION_IDSTR:
            self._ram_run = _RamRun(self._abs(self._pos))
            self._state = self._state_ram
        elif section.idstr == g.DIRTY_BITMAP_SECTION_IDSTR:
            if section.version_id != g.DIRTY_BITMAP_SECTION_VERSION and item_type in (
                g.ItemType.SECTION_START, g.ItemType.SECTION_FULL
            ):
                self._emit(findings.make(
                    "bad-section-version",
                    f"dirty-bitmap section version {section.version_id}; QEMU loads only "
                    f"version {g.DIRTY_BITMAP_SECTION_VERSION}",
                    self._item_start, section=section.idstr))
            self._bm_saw_eos = False
            self._state = self._state_bitmap
        else:
            self._device_scan_from = self._pos
            self._state = self._state_device

    def _item_footer(self) -> NeedMore | None:
        # A footer where an item is expected: a section ended twice, or garbage.
        if self._available() < 5:
            return self._short(5, "a section footer")
        section_id = _BE32.unpack_from(self._buf, self._pos + 1)[0]
        self._record("footer", self._item_start, self._item_start + 5, section_id=section_id)
        self._emit(findings.make(
            "footer-mismatch", f"section footer for id {section_id} outside any section",
            self._item_start, length=5))
        self._pos += 5
        return None

    def _item_command(self) -> NeedMore | None:
        if self._available() < 5:
            return self._short(5, "a command")
        head = g.CommandHeader.parse(bytes(self._buf[self._pos + 1 : self._pos + 5]))
        command, length = head.command, head.length
        size = 5 + length
        if self._available() < size:
            return self._short(size, "a command")
        body = g.CommandBody.parse(bytes(self._buf[self._pos + 1 : self._pos + size]))
        try:
            name = g.Command(command).name
        except ValueError:
            name = f"UNKNOWN({command})"
        fields: dict[str, Any] = {"command": name, "command_number": command, "length": length}
        self._pos += size
        end = self._item_start + size
        if command == g.Command.PACKAGED:
            if length != 4:
                self._record("command", self._item_start, end, **fields)
                self._emit(findings.make(
                    "bad-command", f"PACKAGED with a {length}-byte argument, not 4",
                    self._item_start, length=size))
                return None
            inner = g.PackagedLength.parse(body.data)
            fields["packaged_length"] = inner
            self._record("command", self._item_start, end, **fields)
            if inner > g.MAX_PACKAGED_SIZE or self._depth:
                self._emit(findings.make(
                    "bad-packaged",
                    f"PACKAGED of {inner} bytes (QEMU accepts at most {g.MAX_PACKAGED_SIZE}, "
                    "not nested)", self._item_start, length=size))
                self._enter_resync(end)
                return None
            self._package_end = end + inner
            self._depth = 1
            return None
        if command == g.Command.PING and length == 4:
            fields["value"] = g.PingValue.parse(body.data)
        elif command == g.Command.POSTCOPY_ADVISE and length == 16:
            fields["remote_pagesize_summary"] = int.from_bytes(body.data[:8], "big")
            fields["target_page_size"] = int.from_bytes(body.data[8:], "big")
        elif command == g.Command.POSTCOPY_LISTEN:
            self._phase("postcopy-listen", self._item_start)
        elif command == g.Command.POSTCOPY_RUN:
            self._phase("postcopy-run", self._item_start)
        if length and command not in (g.Command.PING, g.Command.POSTCOPY_ADVISE,
                                      g.Command.POSTCOPY_RAM_DISCARD, g.Command.RECV_BITMAP):
            if command in g.Command.__members__.values():
                fields["data"] = body.data.hex()
        self._record("command", self._item_start, end, **fields)
        return None

    _item_handlers: dict[int, Callable[[StreamDecoder], NeedMore | None]] = {}

    # --- section payloads -----------------------------------------------------

    def _end_payload(self) -> None:
        self._state = self._state_footer

    def _state_footer(self) -> NeedMore | None:
        avail = self._available()
        section = self._current
        assert section is not None
        if avail < 1:
            if self._package_end is not None and self._abs(self._pos) >= self._package_end:
                self._footer_missing(section)
                return None
            return 1
        if self._buf[self._pos] != g.ItemType.SECTION_FOOTER:
            self._footer_missing(section)
            return None
        if avail < 5:
            return self._short(5, "a section footer")
        start = self._abs(self._pos)
        (footer_id,) = _FOOTER.unpack_from(self._buf, self._pos + 1)
        self._record("footer", start, start + 5, section_id=footer_id)
        if footer_id != section.section_id:
            self._emit(findings.make(
                "footer-mismatch",
                f"footer names section {footer_id}, but section "
                f"{section.section_id} ({section.idstr}) just ended", start, length=5,
                section=section.idstr))
        self._pos += 5
        self._current = None
        self._state = self._state_item
        return None

    def _footer_missing(self, section: _Section) -> None:
        start = self._abs(self._pos)
        self._emit(findings.make(
            "footer-mismatch", f"no footer after section {section.section_id} "
            f"({section.idstr}); found {self._peek_description()}", start,
            section=section.idstr))
        self._state = self._state_item

    def _peek_description(self) -> str:
        if self._pos < len(self._buf):
            return f"byte {self._buf[self._pos]:#04x}"
        return "the end of data"

    # RAM ---------------------------------------------------------------------

    def _flush_ram_run(self, end: int) -> None:
        run = self._ram_run
        if run is None or self.ram_detail:
            self._ram_run = None
            return
        if run.pages or run.zero_pages or run.other:
            record = Record(
                offset=run.start, length=end - run.start, kind="ram-pages",
                section=g.RAM_SECTION_IDSTR,
                section_id=self._current.section_id if self._current else None,
                fields={"pages": run.pages, "zero_pages": run.zero_pages,
                        "other_records": run.other, "page_bytes": run.data_bytes},
                depth=self._depth, timestamp=self._timestamp)
            self._events.append(record)
        self._ram_run = None

    def _state_ram(self) -> NeedMore | None:
        buf = self._buf
        mask = self._page_mask
        page_size = self.page_size
        unpack = _RAM_HEADER.unpack_from
        run = self._ram_run
        detail = self.ram_detail
        limit = len(buf)
        if self._package_end is not None:
            limit = min(limit, self._package_end - self._base)
        pos = self._pos
        while True:
            if limit - pos < 8:
                self._pos = pos
                return self._short(8, "a RAM record")
            header = unpack(buf, pos)[0]
            flags = header & mask
            body = pos + 8
            if flags & _PAGE_OR_ZERO and not flags & _NOT_PAGE_RECORD:
                block_name = None
                if not flags & _CONTINUE:
                    if body >= limit:
                        self._pos = pos
                        return self._short(body - pos + 1, "a RAM record")
                    name_len = buf[body]
                    if body + 1 + name_len > limit:
                        self._pos = pos
                        return self._short(body - pos + 1 + name_len, "a RAM record")
                    block_name = bytes(buf[body + 1 : body + 1 + name_len])
                    body += 1 + name_len
                    self._ram_block = block_name.decode("utf-8", "replace")
                elif self._ram_block is None:
                    self._pos = pos
                    self._ram_error(pos, "RAM record with CONTINUE before any block name")
                    return None
                if flags & _PAGE:
                    end = body + page_size
                    if detail:
                        self._pos = pos
                        if end > limit and self._hits_package_end(end - pos):
                            return self._short(end - pos, "a RAM page")
                        self._record("ram-page", self._abs(pos), self._abs(end),
                                     addr=header & ~mask, block=self._ram_block)
                    if run is not None:
                        run.pages += 1
                        run.data_bytes += page_size
                    if end > len(buf):
                        if self._package_end is not None and self._abs(end) > self._package_end:
                            self._pos = pos
                            return self._short(end - pos, "a RAM page")
                        # Skip the rest of the page as it arrives, without buffering it.
                        self._skip = end - len(buf)
                        self._skip_start = self._abs(pos)
                        self._pos = len(buf)
                        return None
                    pos = end
                else:
                    if body >= limit:
                        self._pos = pos
                        return self._short(body - pos + 1, "a RAM record")
                    if detail:
                        self._pos = pos
                        self._record("ram-zero", self._abs(pos), self._abs(body + 1),
                                     addr=header & ~mask, block=self._ram_block,
                                     fill=buf[body])
                    if run is not None:
                        run.zero_pages += 1
                    pos = body + 1
                continue
            self._pos = pos
            return self._ram_other(header, flags)

    def _ram_direct(self, view: memoryview) -> memoryview:
        """Walk whole PAGE/ZERO records straight from the fed data, so that page data
        (nearly all of a migration) is never copied into the buffer. Stops at anything
        else, or at a record cut by the end of `view`, and returns the bytes left for
        the buffered path; a page cut by the end is skipped as it arrives."""
        unpack = _RAM_HEADER.unpack_from
        mask = self._page_mask
        page_size = self.page_size
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
                    self._skip = skip
                    self._skip_start = self._base + limit + skip - 8 - page_size
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
                    self._skip = pos - limit
                    self._skip_start = self._base + pos - 8 - page_size
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
                self._ram_block = bytes(view[body + 1 : name_end]).decode("utf-8", "replace")
                body = name_end
            elif self._ram_block is None:
                break  # the buffered path reports it
            if flags & _PAGE:
                pages += 1
                end = body + page_size
                if end > limit:
                    self._skip = end - limit
                    self._skip_start = self._base + pos
                    pos = limit
                    break
                pos = end
            else:
                if body >= limit:
                    break
                zeros += 1
                pos = body + 1
        run = self._ram_run
        assert run is not None
        run.pages += pages
        run.zero_pages += zeros
        run.data_bytes += pages * page_size
        self._base += pos
        return view[pos:]

    def _ram_error(self, pos: int, message: str) -> None:
        start = self._abs(pos)
        self._flush_ram_run(start)
        self._emit(findings.make("unknown-flags", message, start, section=g.RAM_SECTION_IDSTR))
        self._enter_resync(start)

    def _ram_other(self, header: int, flags: int) -> NeedMore | None:
        """RAM records off the hot path: EOS, MEM_SIZE, XBZRLE, compressed, flush."""
        pos = self._pos
        start = self._abs(pos)
        addr = header & ~self._page_mask
        run = self._ram_run
        if flags & ~_VALID_RAM_FLAGS or flags == 0 or flags & _RF.FULL:
            self._ram_error(pos, f"RAM record with invalid flags {flags:#x} at {start:#x}")
            return None
        if flags & _RF.MEM_SIZE:
            return self._ram_mem_size(addr, flags)
        if flags & _RF.EOS:
            self._flush_ram_run(start)
            self._record("ram-eos", start, start + 8)
            self._pos += 8
            self._end_payload()
            return None
        if flags & _RF.MULTIFD_FLUSH:
            self._record("ram-multifd-flush", start, start + 8)
            self._pos += 8
            return None
        if flags & _RF.HOOK:
            self._record("ram-hook", start, start + 8)
            self._pos += 8
            return None
        body = pos + 8
        if not flags & _RF.CONTINUE:
            if self._available() < 9:
                return self._short(9, "a RAM record")
            name_len = self._buf[body]
            if self._available() < 9 + name_len:
                return self._short(9 + name_len, "a RAM record")
            self._ram_block = g.RamBlockName.parse(bytes(self._buf[body : body + 1 + name_len]))
            body += 1 + name_len
        head_size = 3 if flags & _RF.XBZRLE else 4
        if self._available() < body - pos + head_size:
            return self._short(body - pos + head_size, "a RAM record")
        if flags & _RF.XBZRLE:
            head = g.RamXbzrleHeader.parse(bytes(self._buf[body : body + 3]))
            kind, data_len = "ram-xbzrle", head.length
        else:
            head = g.RamCompressedHeader.parse(bytes(self._buf[body : body + 4]))
            kind, data_len = "ram-compressed", head.length
            if data_len > 2 * self.page_size + 64:
                self._ram_error(pos, f"compressed RAM page of {data_len} bytes")
                return None
        end = body + head_size + data_len
        if self._available() < end - pos:
            return self._short(end - pos, "a RAM record")
        if self.ram_detail:
            self._record(kind, start, self._abs(end), addr=addr, block=self._ram_block,
                         data_length=data_len)
        if run is not None:
            run.other += 1
        self._pos = end
        return None

    def _ram_mem_size(self, total: int, flags: int) -> NeedMore | None:
        pos = self._pos + 8
        blocks: list[dict[str, Any]] = []
        remaining = total
        buf = self._buf
        avail_end = self._pos + self._available()
        while remaining > 0:
            if pos >= avail_end:
                return self._short(pos - self._pos + 1, "a RAM MEM_SIZE record")
            name_len = buf[pos]
            if name_len == 0:
                self._ram_error(self._pos, "RAM MEM_SIZE block with an empty name")
                return None
            if pos + 1 + name_len + 8 > avail_end:
                return self._short(pos + 1 + name_len + 8 - self._pos, "a RAM MEM_SIZE record")
            entry = g.RamBlockSize.parse(bytes(buf[pos : pos + 1 + name_len + 8]))
            pos += 1 + name_len + 8
            block: dict[str, Any] = {"idstr": entry.idstr, "used_length": entry.used_length}
            # postcopy-ram (huge pages) adds a page size and x-ignore-shared an address;
            # neither is announced in the stream, but both are page aligned (no flag
            # bits), unlike the record header that follows the last block.
            extras = []
            while len(extras) < 2:
                if pos + 8 > avail_end:
                    return self._short(pos + 8 - self._pos, "a RAM MEM_SIZE record")
                if remaining - entry.used_length > 0 and buf[pos] != 0:
                    break
                value = _RAM_HEADER.unpack_from(buf, pos)[0]
                if value & self._page_mask:
                    break
                extras.append(value)
                pos += 8
            if extras:
                block["extra"] = extras
            blocks.append(block)
            if entry.used_length > remaining:
                break
            remaining -= entry.used_length
        start = self._abs(self._pos)
        self._record("ram-mem-size", start, self._abs(pos), total_bytes=total, blocks=blocks)
        self._pos = pos
        if flags & _RF.EOS:
            self._flush_ram_run(self._abs(pos))
            self._end_payload()
        return None

    # dirty bitmaps ------------------------------------------------------------

    def _state_bitmap(self) -> NeedMore | None:
        avail = self._available()
        if avail < 1:
            return self._short(1, "a dirty-bitmap record")
        eos_check = self._missing_eos_here()
        if eos_check is not None:
            return eos_check or None
        first = self._buf[self._pos]
        head = _ONE_BYTE_HEADS.get(first)
        fixed = _FIXED_HEADS.get(first) if head is None else None
        if head is not None:
            head_len = 1
        elif fixed is not None and avail >= fixed.length:
            head = fixed.read(self._buf, self._pos)
            head_len = fixed.length
        else:
            head_probe = min(avail, g.BITMAP_RECORD_HEAD_MAX)
            try:
                head = _bitmap_head.parse(bytes(self._buf[self._pos : self._pos + head_probe]))
            except (ConstructError, struct.error):  # compiled parsers raise struct.error
                if avail >= g.BITMAP_RECORD_HEAD_MAX:
                    raise  # cannot happen: the head is never longer than its bound
                return self._short(avail + 1, "a dirty-bitmap record")
            head_len = _bitmap_head_length(head)
            if head_len == 1:
                _ONE_BYTE_HEADS[first] = head
            elif not first & _NAMES_OR_EXTRA_FLAGS:
                layout = _FixedHead(head)
                if layout.length == head_len:
                    _FIXED_HEADS[first] = layout
        total = head_len
        buffer_size = head["buffer_size"]
        if buffer_size is not None:
            if buffer_size > MAX_SKIPPED_BITMAP_BUFFER:
                start = self._abs(self._pos)
                self._emit(findings.make(
                    "buffer-too-large",
                    f"BITS buffer size {buffer_size} (QEMU refuses more than "
                    f"{g.BITMAP_MAX_BUFFER_SIZE}); the length is not believable, "
                    "resynchronising", start, section=g.DIRTY_BITMAP_SECTION_IDSTR,
                    node=self._bm_node, bitmap=self._bm_name))
                self._enter_resync(start + head_len)
                return None
            total += buffer_size
        if buffer_size is not None and buffer_size > g.BITMAP_MAX_BUFFER_SIZE:
            # QEMU gives up here; we report and skip the buffer without buffering it.
            return self._bitmap_record_done(head, head_len, None, skip=buffer_size)
        if avail < total:
            return self._short(total, "a dirty-bitmap record")
        buffer = None
        if buffer_size is not None:
            buffer = bytes(self._buf[self._pos + head_len : self._pos + total])
        return self._bitmap_record_done(head, head_len, buffer, skip=0)

    def _missing_eos_here(self) -> NeedMore | None:
        """A footer or the next item where a record should start means EOS was lost.

        Returns None when a record starts here, 0 after reporting the missing EOS, or
        how many bytes must be buffered to tell: the answer must not depend on how
        the data was chunked (0x02/0x03 are both an item type and valid flags).
        """
        pos = self._pos
        buf = self._buf
        first = buf[pos]
        section = self._current
        if section is None or first not in _ITEM_AFTER_PAYLOAD:
            return None  # nearly every record: its flags byte is no item type
        limit = pos + self._available()

        def short(size: int) -> bool:
            # Inside a PACKAGED blob an item cannot run past its end: then a record.
            return pos + size > limit and not self._hits_package_end(size)

        looks_like_next = False
        if first in (g.ItemType.SECTION_FOOTER, g.ItemType.SECTION_PART,
                     g.ItemType.SECTION_END):
            if short(5):
                return 5
            if pos + 5 <= limit:
                section_id = _BE32.unpack_from(buf, pos + 1)[0]
                if first == g.ItemType.SECTION_FOOTER:
                    looks_like_next = section_id == section.section_id
                else:
                    looks_like_next = section_id in self._sections
        elif first == g.ItemType.SECTION_FULL:
            if short(6):
                return 6
            if pos + 6 <= limit:
                name_len = buf[pos + 5]
                if short(6 + name_len):
                    return 6 + name_len
                looks_like_next = pos + 6 + name_len <= limit and _printable(
                    bytes(buf[pos + 6 : pos + 6 + name_len]))
        elif first == g.ItemType.EOF and self._package_end is None:
            if short(2):
                return 2
            looks_like_next = buf[pos + 1] == g.ItemType.VMDESCRIPTION
        if not looks_like_next:
            return None
        start = self._abs(pos)
        self._emit(findings.make(
            "missing-eos", "the dirty-bitmap section payload ended (at "
            f"{'its footer' if first == g.ItemType.SECTION_FOOTER else 'the next item'}) "
            "without an EOS record", start, section=section.idstr))
        if first == g.ItemType.SECTION_FOOTER:
            self._state = self._state_footer
        else:
            self._state = self._state_item
        return 0

    def _bitmap_record_done(self, head: Any, head_len: int, buffer: bytes | None, skip: int
                            ) -> NeedMore | None:
        start = self._abs(self._pos)
        first_event = len(self._events)
        section = g.DIRTY_BITMAP_SECTION_IDSTR
        flag_field = head["flags"]
        flags = flag_field["value"]
        width = flag_field["width"]
        device_name = head["device_name"]
        bitmap_name = head["bitmap_name"]
        bitmap_start = head["start"]
        bits = head["bits"]
        buffer_size = head["buffer_size"]
        if device_name is not None:
            self._bm_node = device_name
        if bitmap_name is not None:
            self._bm_name = bitmap_name
        kind = _BITMAP_KIND_NAMES[head["kind"]]
        fields: dict[str, Any] = {
            "flags": flags,
            "flags_width": width,
            "flag_names": _flag_names(flags),
        }
        if width > 1:
            fields["wire_flags"] = flag_field["wire_value"]
        if device_name is not None:
            fields["device_name"] = device_name
        if bitmap_name is not None:
            fields["bitmap_name"] = bitmap_name
        if bitmap_start is not None:
            fields["granularity"] = bitmap_start["granularity"]
            fields["bitmap_flags"] = bitmap_start["bitmap_flags"]
        if bits is not None:
            fields["first_sector"] = bits["first_sector"]
            fields["sector_count"] = bits["sector_count"]
            fields["zeroes"] = bool(flags & _BF_ZEROES)
        if buffer_size is not None:
            fields["buffer_size"] = buffer_size
        length = head_len + (buffer_size or 0)
        record = self._record(kind, start, start + length, **fields)
        nothing = flags == flags & _BF_EOS
        if not nothing:
            record.node = self._bm_node
            record.bitmap = self._bm_name
        if buffer is not None:
            record.fields["buffer"] = buffer
        if width > 1:
            self._emit(findings.make(
                "multibyte-flags",
                f"flags written in {width} bytes (wire value "
                f"{flag_field['wire_value']:#x}); a QEMU destination keeps only the last byte "
                f"and acts on {flags:#04x} ({'|'.join(_flag_names(flags)) or 'none'})",
                start, length=width, section=section))
        if flags & _BF_EXTRA:
            self._emit(findings.make(
                "unknown-flags", f"the last flags byte {flags:#04x} has bit 0x80 set, which "
                "means nothing there", start, section=section))
        if buffer_size is not None and buffer_size > g.BITMAP_MAX_BUFFER_SIZE:
            self._emit(findings.make(
                "buffer-too-large",
                f"BITS buffer of {buffer_size} bytes; QEMU refuses more than "
                f"{g.BITMAP_MAX_BUFFER_SIZE} ('Bitmap migration stream buffer allocation "
                "request is too large')", start, length=length, section=section,
                node=self._bm_node, bitmap=self._bm_name))
        self._pos += head_len
        if skip:
            take = min(skip, len(self._buf) - self._pos)
            self._pos += take
            if skip - take:
                self._skip = skip - take
                self._skip_start = start
                self._deferred = self._events[first_event:]
                del self._events[first_event:]
        elif buffer is not None:
            self._pos += len(buffer)
        if flags & _BF_EOS:
            self._bm_saw_eos = True
            self._end_payload()
        return None

    # device state -------------------------------------------------------------

    def _state_device(self) -> NeedMore | None:
        section = self._current
        assert section is not None
        buf = self._buf
        start_pos = self._pos
        limit = start_pos + self._available()
        if self._vmdesc_devices is not None:
            desc = self._vmdesc_devices.get((section.idstr, section.instance_id))
            if desc is not None:
                try:
                    end = walk_device(desc, buf, start_pos, limit)
                except VmstateIncomplete as short:
                    return self._short(short.needed - start_pos, "a device state section")
                except VmstateInvalid as bad:
                    self._emit(findings.make(
                        "vmdesc-mismatch", f"{section.idstr}: {bad}", self._abs(start_pos),
                        section=section.idstr))
                else:
                    self._record("device-state", self._abs(start_pos), self._abs(end),
                                 method="vmdesc", idstr=section.idstr,
                                 instance_id=section.instance_id, size=end - start_pos)
                    self._pos = end
                    self._end_payload()
                    return None
        marker = bytes([g.ItemType.SECTION_FOOTER]) + _BE32.pack(section.section_id)
        scan = max(self._device_scan_from, start_pos)
        while True:
            found = buf.find(marker, scan, limit)
            if found < 0:
                self._device_scan_from = max(start_pos, limit - 4)
                if limit - start_pos > MAX_DEVICE_SECTION:
                    self._emit(findings.make(
                        "footer-mismatch", f"no footer within {MAX_DEVICE_SECTION} bytes of "
                        f"device section {section.idstr}", self._abs(start_pos),
                        section=section.idstr))
                    self._enter_resync(self._abs(start_pos))
                    return None
                return self._short(limit - start_pos + 1, "a device state section")
            verdict = self._plausible_next_item(found + 5, limit)
            if verdict is None:
                self._device_scan_from = found
                return self._short(found + 5 - start_pos + 16, "a device state section")
            if verdict:
                break
            scan = found + 1
        size = found - start_pos
        self._record("device-state", self._abs(start_pos), self._abs(found),
                     method="footer", idstr=section.idstr, instance_id=section.instance_id,
                     size=size)
        if sum(len(p) for _, p, _ in self._retained_devices) + size <= MAX_DEVICE_SECTION:
            self._retained_devices.append(
                (section, bytes(buf[start_pos:found]), self._abs(start_pos)))
        self._pos = found
        self._end_payload()
        return None

    def _plausible_next_item(self, pos: int, limit: int) -> bool | None:
        """Whether an item can start at pos (None: not enough bytes to say)."""
        buf = self._buf
        if self._package_end is not None and self._abs(pos) == self._package_end:
            return True
        if pos >= limit:
            return None
        item = buf[pos]
        if item == g.ItemType.EOF:
            if self._package_end is not None:
                return True
            if pos + 1 >= limit:
                return None
            return buf[pos + 1] in (g.ItemType.VMDESCRIPTION,)
        if item in (g.ItemType.SECTION_PART, g.ItemType.SECTION_END):
            if pos + 5 > limit:
                return None
            return _BE32.unpack_from(buf, pos + 1)[0] in self._sections
        if item in (g.ItemType.SECTION_FULL, g.ItemType.SECTION_START):
            return _plausible_name_at(buf, pos + 5, limit)
        if item == g.ItemType.COMMAND:
            if pos + 3 > limit:
                return None
            return 0 < _BE16.unpack_from(buf, pos + 1)[0] <= 32
        return False

    def _check_retained_devices(self, desc: dict[str, Any]) -> None:
        """Walk the device sections delimited by footers with the late VMDESCRIPTION."""
        devices = _index_vmdesc(desc)
        for section, payload, offset in self._retained_devices:
            device = devices.get((section.idstr, section.instance_id))
            if device is None:
                continue
            try:
                end = walk_device(device, payload, 0, len(payload))
            except (VmstateIncomplete, VmstateInvalid) as bad:
                self._emit(findings.make(
                    "vmdesc-mismatch", f"{section.idstr}: VMDESCRIPTION does not describe the "
                    f"{len(payload)} bytes found between its header and footer ({bad})",
                    offset, section=section.idstr))
                continue
            if end != len(payload):
                self._emit(findings.make(
                    "vmdesc-mismatch", f"{section.idstr}: VMDESCRIPTION describes {end} "
                    f"bytes, the footer came after {len(payload)}", offset,
                    section=section.idstr))
        self._retained_devices.clear()

    # resynchronisation ----------------------------------------------------------

    def _enter_resync(self, from_offset: int) -> None:
        self._flush_ram_run(from_offset)
        self._resync_from = from_offset
        self._state = self._state_resync
        self._current = None

    def _state_resync(self) -> NeedMore | None:
        """Scan for a PART/END header of a known section whose first record is
        plausible, a FULL section header, or the final EOF + VMDESCRIPTION."""
        buf = self._buf
        pos = max(self._pos, (self._resync_from or 0) - self._base)
        end = len(buf)
        while pos < end:
            byte = buf[pos]
            verdict: bool | None = False
            if byte in (g.ItemType.SECTION_PART, g.ItemType.SECTION_END,
                        g.ItemType.SECTION_FULL, g.ItemType.SECTION_START, g.ItemType.EOF):
                verdict = self._resync_candidate(pos, end)
            if verdict is None:
                self._pos = pos
                return end - pos + 1 if end - pos < 600 else 1
            if verdict:
                skipped = self._abs(pos) - (self._resync_from or 0)
                self._emit(findings.make(
                    "resynchronised",
                    f"skipped {skipped} bytes from {self._resync_from:#x} to the next "
                    f"recognisable item at {self._abs(pos):#x}", self._resync_from or 0,
                    length=skipped))
                self._resync_from = None
                self._pos = pos
                self._state = self._state_item
                return None
            pos += 1
        self._pos = end
        return 1

    def _resync_candidate(self, pos: int, end: int) -> bool | None:
        buf = self._buf
        byte = buf[pos]
        if byte == g.ItemType.EOF:
            if pos + 6 > end:
                return None
            if buf[pos + 1] != g.ItemType.VMDESCRIPTION:
                return False
            return buf[pos + 6 : pos + 7] == b"{" if pos + 7 <= end else None
        if byte in (g.ItemType.SECTION_FULL, g.ItemType.SECTION_START):
            if pos + 6 > end:
                return None
            name_len = buf[pos + 5]
            if pos + 6 + name_len + 8 > end:
                return None
            if not _printable(bytes(buf[pos + 6 : pos + 6 + name_len])):
                return False
            instance, version = struct.unpack_from(">II", buf, pos + 6 + name_len)
            return instance < 4096 and version < 4096
        if pos + 5 > end:
            return None
        section = self._sections.get(_BE32.unpack_from(buf, pos + 1)[0])
        if section is None:
            return False
        body = pos + 5
        if section.idstr == g.RAM_SECTION_IDSTR:
            if body + 8 > end:
                return None
            header = _RAM_HEADER.unpack_from(buf, body)[0]
            flags = header & self._page_mask
            if flags & ~_VALID_RAM_FLAGS or not flags:
                return False
            if flags & _PAGE_OR_ZERO and not flags & _CONTINUE:
                return _plausible_name_at(buf, body + 8, end)
            return not flags & _CONTINUE or self._ram_block is not None
        if section.idstr == g.DIRTY_BITMAP_SECTION_IDSTR:
            if body >= end:
                return None
            flags = buf[body]
            return flags & g.BitmapFlag.EXTRA_FLAGS == 0 and flags != 0
        return False


# What may follow a dirty-bitmap payload whose EOS was lost.
_ITEM_AFTER_PAYLOAD = frozenset(int(t) for t in (
    g.ItemType.SECTION_FOOTER, g.ItemType.SECTION_PART, g.ItemType.SECTION_END,
    g.ItemType.SECTION_FULL, g.ItemType.EOF))
_NAMES_OR_EXTRA_FLAGS = int(g.BitmapFlag.DEVICE_NAME | g.BitmapFlag.BITMAP_NAME
                            | g.BitmapFlag.EXTRA_FLAGS)


class _FixedHead:
    """A dirty-bitmap record head whose flags byte fixes its layout (no names, one
    flags byte), as the grammar parsed it once; later heads that start with the same
    byte are read with one unpack of the grammar's own field formats. Most BITS
    records of a real stream are of this kind, a thousand per GiB of disk."""

    def __init__(self, head: Any) -> None:
        self.flags = head["flags"]
        self.kind = head["kind"]
        self.parts: list[tuple[str, list[str] | None]] = []
        fmt = ">x"
        for key, declaration in (("start", g.BitmapStart), ("bits", g.BitmapBitsHead)):
            if head[key] is not None:
                fmt += g.fixed_format(declaration)
                self.parts.append((key, [field.name for field in declaration.subcons]))
        if head["buffer_size"] is not None:
            fmt += g.BitmapBufferSize.fmtstr[1:]
            self.parts.append(("buffer_size", None))
        layout = struct.Struct(fmt)
        self.length = layout.size
        self.unpack = layout.unpack_from

    def read(self, buf: bytearray, pos: int) -> dict[str, Any]:
        values = self.unpack(buf, pos)
        head: dict[str, Any] = {"flags": self.flags, "device_name": None, "bitmap_name": None,
                                "kind": self.kind, "start": None, "bits": None,
                                "buffer_size": None}
        at = 0
        for key, names in self.parts:
            if names is None:
                head[key] = values[at]
                at += 1
            else:
                head[key] = dict(zip(names, values[at : at + len(names)], strict=True))
                at += len(names)
        return head


_FIXED_HEADS: dict[int, _FixedHead] = {}


def _bitmap_head_length(head: Any) -> int:
    # Item access: construct's Container attribute access costs a function call each.
    length: int = head["flags"]["width"]
    for name in (head["device_name"], head["bitmap_name"]):
        if name is not None:
            length += 1 + len(name.encode("utf-8", "surrogateescape"))
    if head["start"] is not None:
        length += _BITMAP_START_LEN
    if head["bits"] is not None:
        length += _BITMAP_BITS_HEAD_LEN
    if head["buffer_size"] is not None:
        length += 8
    return length


@functools.lru_cache(maxsize=512)
def _flag_names(flags: int) -> list[str]:
    return [flag.name for flag in g.BitmapFlag if flags & flag and flag.name]


def _index_vmdesc(vmdesc: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    devices = vmdesc.get("devices", []) if isinstance(vmdesc, dict) else []
    index: dict[tuple[str, int], dict[str, Any]] = {}
    for device in devices:
        if isinstance(device, dict) and "name" in device:
            index[(str(device["name"]), int(device.get("instance_id", 0)))] = device
    return index


StreamDecoder._item_handlers = {
    g.ItemType.EOF: StreamDecoder._item_eof,
    g.ItemType.SECTION_START: StreamDecoder._item_section_full_header,
    g.ItemType.SECTION_FULL: StreamDecoder._item_section_full_header,
    g.ItemType.SECTION_PART: StreamDecoder._item_section_part,
    g.ItemType.SECTION_END: StreamDecoder._item_section_part,
    g.ItemType.CONFIGURATION: StreamDecoder._item_configuration,
    g.ItemType.COMMAND: StreamDecoder._item_command,
    g.ItemType.SECTION_FOOTER: StreamDecoder._item_footer,
    g.ItemType.VMDESCRIPTION: StreamDecoder._item_vmdescription,
}


def decode_bytes(data: bytes, **options: Any) -> list[Event]:
    """Decode a whole stream held in memory (tests, small files)."""
    decoder = StreamDecoder(**options)
    return decoder.feed(data) + decoder.finish()


__all__ = ["StreamDecoder", "decode_bytes", "Finding", "Record"]
