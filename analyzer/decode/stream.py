"""StreamDecoder: the framing machine with its sans-IO entry points.

`feed(data)` accepts the stream in any chunking and returns the records and findings
completed so far; `finish()` closes the stream; `gap()` says bytes were lost. It never
reads files or sockets. Feeding a stream whole or one byte at a time gives the same
events (see framing's reader contract).
"""

from __future__ import annotations

from typing import Any

from migshark.analyzer import findings
from migshark.analyzer.decode.framing import FramingMachine, State
from migshark.analyzer.decode.sections.ram import RamDissector
from migshark.analyzer.findings import Code
from migshark.analyzer.records import Event
from migshark.dissectors import grammar as g

_ENDED_CLEANLY = (State.DONE, State.AFTER_VMDESC)


class StreamDecoder(FramingMachine):
    """Decode one migration stream direction (source to destination)."""

    def __init__(
        self,
        *,
        vmdesc: dict[str, Any] | None = None,
        target_page_size: int = g.DEFAULT_TARGET_PAGE_SIZE,
        ram_detail: bool = False,
    ) -> None:
        super().__init__(vmdesc=vmdesc, target_page_size=target_page_size,
                         ram_detail=ram_detail)
        ram = self._dissectors[g.RAM_SECTION_IDSTR]
        assert isinstance(ram, RamDissector)
        self._ram = ram

    @property
    def offset(self) -> int:
        """Stream offset just past the last byte fed (or lost in a gap)."""
        return self.rb.end

    def feed(self, data: bytes | bytearray | memoryview, timestamp: float | None = None
             ) -> list[Event]:
        if timestamp is not None:
            self._timestamp = timestamp
        if self.finished:
            return []
        rb = self.rb
        view = memoryview(data)
        if rb.skip:
            view = rb.take_skip(view)
            if rb.skip:
                return self._drain()
            self._release_deferred()
        if view:
            ram = self._ram
            if (self.dissector is ram and self.state is State.PAYLOAD
                    and rb.pos == len(rb.data) and not self.ram_detail
                    and self.package_end is None and ram.run is not None):
                rb.discard_consumed()
                view = ram.walk_direct(view)
                if not view:
                    return self._drain()
                self._need = 1
            rb.data += view
        if len(rb.data) - rb.pos >= self._need:
            self._run()
        return self._drain()

    def ram_walk_state(self) -> tuple[int, int, int, int, int] | None:
        """Let a caller walk plain RAM records itself (analyzer.fastpath's C lane).

        When the decoder sits between RAM records with nothing buffered, returns
        (page mask, page size, page|continue flags, zero|continue flags, page bytes
        still to skip): records of exactly those two shapes may be walked outside and
        reported with ram_walked(); anything else must be fed. Otherwise None.
        """
        rb = self.rb
        ram = self._ram
        if (self.dissector is not ram or self.state is not State.PAYLOAD
                or rb.pos != len(rb.data) or self.ram_detail
                or self.package_end is not None or ram.run is None
                or ram.block is None or self._deferred or self.finished):
            return None
        rb.discard_consumed()
        return self.page_mask, self.page_size, ram.PAGE_CONTINUE, ram.ZERO_CONTINUE, rb.skip

    def ram_walked(self, taken: int, pages: int, zero_pages: int, skip: int, skip_start: int,
                   timestamp: float) -> None:
        """Account for `taken` stream bytes walked after ram_walk_state(): `pages` page
        and `zero_pages` zero records, ending `skip` bytes into a page whose record
        began `skip_start` bytes after the old position (-1: before it)."""
        run = self._ram.run
        assert run is not None
        rb = self.rb
        if skip and skip_start >= 0:
            rb.skip_start = rb.base + skip_start
        rb.base += taken
        rb.skip = skip
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
        rb = self.rb
        gap_start = self.offset
        if self.state is State.HEADER and not gap_start:
            # Nothing before the hole: the capture began after the stream did.
            self.start_mid_stream(length)
            return self._drain()
        if rb.skip >= length:
            # The hole lies inside page data or a buffer we were skipping anyway:
            # decoding continues exactly, only the skipped bytes are unknown.
            rb.skip -= length
            rb.base += length
            if not rb.skip:
                self._release_deferred()
            self.emit(findings.make(
                Code.CAPTURE_GAP,
                f"{length} bytes missing from the capture at {gap_start:#x}; they fell "
                f"inside skipped data, decoding continues exactly",
                gap_start, length=length, section=self.section_name(),
                fields={"length": length, "inside_skipped_data": True}))
            return self._drain()
        self.emit(findings.make(
            Code.CAPTURE_GAP,
            f"{length} bytes missing from the capture at {gap_start:#x}; "
            "resynchronising on the next recognisable item",
            gap_start, length=length, section=self.section_name(),
            fields={"length": length, "inside_skipped_data": False}))
        for dissector in self._all_dissectors:
            dissector.interrupted(gap_start)
        # The hole may have held a section's START: learn its id from its payload.
        self.learning = True
        self._release_deferred()
        rb.lose(length)
        self.package_end = None
        self.depth = 0
        self.enter_resync(rb.base)
        return self._drain()

    def finish(self) -> list[Event]:
        if self.finished:
            return self._drain()
        self._run()
        self._release_deferred()
        rb = self.rb
        remaining = len(rb.data) - rb.pos
        # What was fed: the bytes a pending skip still expected never came.
        end = rb.end
        state = self.state
        if state in _ENDED_CLEANLY or (state is State.AFTER_EOF and remaining == 0):
            pass
        elif state is State.RESYNC:
            self.resync.ended(end)
        elif state is State.ITEM and remaining == 0 and rb.skip == 0:
            if self.depth:
                self.emit(findings.make(
                    Code.TRUNCATED, "the data ended inside a PACKAGED command", end,
                    fields={"element": "PACKAGED"}))
            else:
                self.emit(findings.make(
                    Code.TRUNCATED, "the stream ended between items, before EOF", end,
                    section=self.section_name(), fields={"element": None}))
        else:
            start = rb.record_start()
            what = self._state_description()
            self.emit(findings.make(
                Code.TRUNCATED,
                f"the data ended inside {what} that starts at {start:#x} "
                f"({end - start} of its bytes present)",
                start, length=end - start, section=self.section_name(),
                fields={"element": what, "present": end - start}))
            if state is State.PAYLOAD:
                self.dissector.ended_inside(end)
        for dissector in self._all_dissectors:
            dissector.interrupted(end)
        self.finished = True
        return self._drain()

    def _state_description(self) -> str:
        state = self.state
        if state is State.PAYLOAD:
            return self.dissector.description
        if state in (State.HEADER, State.ITEM, State.FOOTER):
            return state.value
        return "an element"


def decode_bytes(data: bytes, **options: Any) -> list[Event]:
    """Decode a whole stream held in memory (tests, small files)."""
    decoder = StreamDecoder(**options)
    return decoder.feed(data) + decoder.finish()
