"""The framing machine: the stream header, the items, and who reads each section payload.

h11's `_state.py`/`_readers.py` are the model. The machine is in one `State`; each
state has one reader (the `_readers` table) that either consumes a whole element from
the receive buffer and returns None, or returns how many bytes must be available
before it is worth running again (`NeedMore`), having consumed nothing. That contract
is what makes any chunking of the input give the same events.

In `State.ITEM` the item type byte selects the item reader (`ITEM_READERS`). A
section header selects, by the section's idstr, the dissector that reads its payload
(`sections.register`); the machine is then in `State.PAYLOAD` with that dissector's
reader until it calls `end_payload()`, then reads the footer. A PACKAGED command makes
the items that follow, up to its length, a nested stream (depth 1).

The methods and attributes without a leading underscore are the interface the section
dissectors and the resynchroniser use.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from migshark.analyzer import findings
from migshark.analyzer.decode.items import ITEM_READERS, read_vmdescription
from migshark.analyzer.decode.receivebuffer import ReceiveBuffer
from migshark.analyzer.decode.resync import Resynchroniser
from migshark.analyzer.decode.sections import SectionDissector, dissector_classes
from migshark.analyzer.decode.state import NeedMore, Section, State
from migshark.analyzer.findings import Code
from migshark.analyzer.records import Event, EventQueue, Finding, Record
from migshark.analyzer.vmstate import index_vmdesc
from migshark.dissectors import grammar as g
from migshark.dissectors.registry import Kind

Reader = Callable[[], NeedMore | None]

_FOOTER = struct.Struct(">" + g.fixed_format(g.SectionFooter))
_FILE_HEADER_LEN = g.FileHeader.sizeof()
_SECTION_FOOTER = int(g.ItemType.SECTION_FOOTER)


class FramingMachine(EventQueue):
    """Items and framing over a ReceiveBuffer; payloads go to section dissectors."""

    def __init__(self, *, vmdesc: dict[str, Any] | None, target_page_size: int,
                 ram_detail: bool) -> None:
        super().__init__()
        self.ram_detail = ram_detail
        self.page_size = target_page_size
        self.page_mask = target_page_size - 1
        self.rb = ReceiveBuffer()
        self._need = 1
        # Events of a record whose skipped buffer is still arriving: emitted once it
        # has, so that no record claims bytes the decoder has not been fed.
        self._deferred: list[Event] = []
        self.sections: dict[int, Section] = {}
        self.current: Section | None = None
        self.item_start = 0
        self.package_end: int | None = None
        self.depth = 0
        self._phases: set[str] = set()
        self.finished = False
        self.ended = False  # EOF item seen
        self.machine_type: str | None = None
        self.vmdesc: dict[str, Any] | None = vmdesc
        self.vmdesc_devices = index_vmdesc(vmdesc) if vmdesc else None
        by_idstr, fallback = dissector_classes()
        self._dissectors: dict[str, SectionDissector] = {
            idstr: cls(self) for idstr, cls in by_idstr.items()}
        self._fallback = fallback(self)
        self._all_dissectors = [*self._dissectors.values(), self._fallback]
        self.dissector: SectionDissector = self._fallback  # of the payload being read
        self.resync = Resynchroniser(self)
        # Set when the stream's start is not in the data: PART/END headers of ids no
        # START named are then judged by their payload (resync.guess_section).
        self.learning = False
        self._missed_start_reported = False
        self._readers: dict[State, Reader] = {
            State.HEADER: self._read_header,
            State.ITEM: self._read_item,
            State.FOOTER: self._read_footer,
            State.AFTER_EOF: self._read_after_eof,
            State.AFTER_VMDESC: self._read_after_vmdesc,
            State.RESYNC: self.resync.read,
            State.DONE: self._read_done,
        }
        self.state = State.HEADER
        self._reader: Reader = self._read_header

    # --- the machine ------------------------------------------------------------

    def set_state(self, state: State) -> None:
        self.state = state
        self._reader = self._readers[state]

    def _run(self) -> None:
        rb = self.rb
        while True:
            if rb.skip:
                return
            need = self._reader()
            if need is not None:
                self._need = max(1, need)
                break
        rb.compact()

    def _release_deferred(self) -> None:
        """Emit the events held back while a skipped buffer arrived; if the data ended
        or broke off first, they claim only the bytes that did arrive."""
        if not self._deferred:
            return
        end = self.rb.end
        for event in self._deferred:
            event.length = max(0, min(event.length, end - event.offset))
            if isinstance(event, Record) and event.spans:
                event.spans = tuple([(key, start, max(0, min(size, end - start)))
                                     for key, start, size in event.spans])
        self._events.extend(self._deferred)
        self._deferred = []

    # --- the interface of section dissectors ---------------------------------------

    emit = EventQueue._emit

    def record(self, kind: Kind, start: int, end: int,
               spans: tuple[tuple[str, int, int], ...] | None = None, **fields: Any) -> Record:
        sec = self.current
        record = Record(start, end - start, kind, sec.idstr if sec else None,
                        sec.section_id if sec else None, fields, self.depth, None, None,
                        self._timestamp, spans)
        self._events.append(record)
        return record

    def defer_events_since(self, first: int) -> None:
        """Hold back the events emitted since len(events) was `first` until the bytes
        being skipped have arrived."""
        self._deferred = self._events[first:]
        del self._events[first:]

    def event_count(self) -> int:
        return len(self._events)

    def available(self) -> int:
        """Bytes from the read position usable by the current element (bounded by
        the end of a PACKAGED blob)."""
        rb = self.rb
        avail = len(rb.data) - rb.pos
        if self.package_end is not None:
            avail = min(avail, self.package_end - rb.base - rb.pos)
        return avail

    def hits_package_end(self, needed: int) -> bool:
        return self.package_end is not None and self.rb.offset + needed > self.package_end

    def short(self, needed: int, what: str) -> NeedMore | None:
        """`needed` bytes from the read position are wanted for `what`: the reader's
        NeedMore, unless the element cannot fit in its PACKAGED blob (reported)."""
        if self.hits_package_end(needed):
            self._package_overrun(what)
            return None
        return needed

    def section_name(self) -> str | None:
        return self.current.idstr if self.current else None

    # The two transitions of every section (thousands per second in idle iterations)
    # assign the reader directly: the table lookup hashes an Enum in Python code.

    def end_payload(self) -> None:
        self.state = State.FOOTER
        self._reader = self._read_footer

    def resume_items(self) -> None:
        """The next item starts at the read position."""
        self.state = State.ITEM
        self._reader = self._read_item

    def dissector_for(self, idstr: str) -> SectionDissector:
        return self._dissectors.get(idstr, self._fallback)

    def vmdescription_arrived(self, desc: dict[str, Any]) -> None:
        self.vmdesc = desc
        for dissector in self._all_dissectors:
            dissector.vmdescription(desc)

    def enter_resync(self, from_offset: int) -> None:
        for dissector in self._all_dissectors:
            dissector.interrupted(from_offset)
        self.resync.start(from_offset)
        self.set_state(State.RESYNC)
        self.current = None

    def start_mid_stream(self, at: int = 0) -> None:
        """The data begins somewhere inside a stream (a capture that started after the
        connection did), `at` bytes after the first byte seen of it: no header to
        read; find the first recognisable item."""
        self.learning = True
        self._report_missed_start(0, "the capture began after the migration did")
        if at:
            self.rb.lose(at)  # seen, and judged not to be migration records
        self.enter_resync(0)

    def learn_section(self, section: Section, offset: int) -> None:
        """A section the capture never saw the START of, recognised by its payload."""
        self.sections[section.section_id] = section
        self._report_missed_start(offset, "the stream does not start with QEVM")

    def _report_missed_start(self, offset: int, why: str) -> None:
        if self._missed_start_reported:
            return
        self._missed_start_reported = True
        self.emit(findings.make(
            Code.MISSED_START,
            f"{why}: the stream header, the configuration, every section START (so the "
            "dirty-bitmap START records with their granularities and flags) and the "
            "setup-phase records are not in the data; sections are recognised by their "
            "records", offset, fields={"reason": why}))

    def phase(self, name: str, offset: int) -> None:
        if name in self._phases:
            return
        self._phases.add(name)
        self.emit(findings.make(Code.PHASE, f"migration phase: {name}", offset,
                                fields={"phase": name}))

    def _package_overrun(self, what: str) -> None:
        """An element claims bytes past the end of its PACKAGED blob."""
        start = self.rb.offset
        assert self.package_end is not None
        self.emit(findings.make(
            Code.TRUNCATED, f"{what} at {start:#x} runs past the end of its PACKAGED command "
            f"at {self.package_end:#x}", start, length=self.package_end - start,
            section=self.section_name(),
            fields={"element": what, "package_end": self.package_end}))
        self.rb.pos += self.package_end - start
        self._leave_package()
        self.set_state(State.ITEM)

    def _leave_package(self) -> None:
        self.package_end = None
        self.depth = 0

    # --- header and items -----------------------------------------------------------

    def _read_header(self) -> NeedMore | None:
        rb = self.rb
        if rb.available() < _FILE_HEADER_LEN:
            return _FILE_HEADER_LEN
        raw = rb.peek(_FILE_HEADER_LEN)
        magic = raw[: len(g.QEVM_MAGIC)]
        if magic != g.QEVM_MAGIC:
            self.emit(findings.make(
                Code.BAD_MAGIC, f"stream starts with {magic!r}, not b'QEVM'", 0, length=4,
                fields={"magic": magic.hex()}))
            # Maybe the data begins mid-stream (a cut file): learn sections by payload.
            self.learning = True
            self.enter_resync(0)
            return None
        version = g.FileHeader.parse(raw).version
        self.record(Kind.FILE_HEADER, 0, 8, (("magic", 0, 4), ("version", 4, 4)),
                    magic="QEVM", version=version)
        if version != g.QEVM_VERSION:
            self.emit(findings.make(
                Code.BAD_VERSION, f"stream version {version}, QEMU reads only 3", 4, length=4,
                fields={"version": version, "expected": g.QEVM_VERSION}))
        rb.pos += 8
        self.set_state(State.ITEM)
        return None

    def _read_item(self) -> NeedMore | None:
        rb = self.rb
        if self.package_end is not None and rb.base + rb.pos >= self.package_end:
            self.record(Kind.PACKAGE_END, self.package_end, self.package_end)
            self._leave_package()
            return None
        if self.available() < 1:
            return 1
        self.item_start = rb.base + rb.pos
        item_type = rb.data[rb.pos]
        reader = ITEM_READERS.get(item_type)
        if reader is None:
            self.emit(findings.make(
                Code.UNKNOWN_ITEM, f"unknown item type byte {item_type:#04x}", self.item_start,
                length=1, section=self.section_name(), fields={"item_type": item_type}))
            self.enter_resync(self.item_start)
            return None
        return reader(self)

    def _read_after_eof(self) -> NeedMore | None:
        if self.available() < 1:
            return 1
        rb = self.rb
        if rb.data[rb.pos] == g.ItemType.VMDESCRIPTION:
            self.item_start = rb.offset
            return read_vmdescription(self)
        self._trailing()
        return None

    def _trailing(self) -> None:
        start = self.rb.offset
        self.emit(findings.make(
            Code.TRAILING_DATA, f"data after the end of the stream at {start:#x}", start))
        self.set_state(State.DONE)

    def _read_done(self) -> NeedMore | None:
        # Swallow whatever follows; it was reported once.
        self.rb.pos = len(self.rb.data)
        return 1

    def _read_after_vmdesc(self) -> NeedMore | None:
        if self.available() < 1:
            return 1
        self._trailing()
        return None

    def begin_payload(self, section: Section, item_type: int) -> None:
        dissector = self._dissectors.get(section.idstr, self._fallback)
        dissector.begin(section, item_type)
        self.dissector = dissector
        self.state = State.PAYLOAD
        self._reader = dissector.read

    # --- section footer ---------------------------------------------------------------

    def _read_footer(self) -> NeedMore | None:
        avail = self.available()
        section = self.current
        assert section is not None
        rb = self.rb
        if avail < 1:
            if self.package_end is not None and rb.offset >= self.package_end:
                self._footer_missing(section)
                return None
            return 1
        if rb.data[rb.pos] != _SECTION_FOOTER:
            self._footer_missing(section)
            return None
        if avail < 5:
            return self.short(5, "a section footer")
        start = rb.base + rb.pos
        (footer_id,) = _FOOTER.unpack_from(rb.data, rb.pos + 1)
        self.record(Kind.FOOTER, start, start + 5,
                    (("item_type", start, 1), ("section_id", start + 1, 4)),
                    section_id=footer_id)
        if footer_id != section.section_id:
            self.emit(findings.make(
                Code.FOOTER_MISMATCH,
                f"footer names section {footer_id}, but section "
                f"{section.section_id} ({section.idstr}) just ended", start, length=5,
                section=section.idstr,
                fields={"footer_section_id": footer_id, "section_id": section.section_id}))
        rb.pos += 5
        self.current = None
        self.state = State.ITEM
        self._reader = self._read_item
        return None

    def _footer_missing(self, section: Section) -> None:
        rb = self.rb
        start = rb.offset
        found = (f"byte {rb.data[rb.pos]:#04x}" if rb.pos < len(rb.data)
                 else "the end of data")
        self.emit(findings.make(
            Code.FOOTER_MISMATCH, f"no footer after section {section.section_id} "
            f"({section.idstr}); found {found}", start, section=section.idstr,
            fields={"section_id": section.section_id,
                    "found": rb.data[rb.pos] if rb.pos < len(rb.data) else None}))
        self.set_state(State.ITEM)


__all__ = ["FramingMachine", "NeedMore", "Section", "State", "Finding", "Record"]
