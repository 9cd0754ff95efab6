"""The TUI's data: rows of records, findings, bitmap snapshots, and where events come from.

Everything here except the sources is touched only by the UI thread. Sources run
in a worker thread and hand over batches; they are the only code that reads the
analyzer's live objects (MigrationStream, BitmapTracker) while decoding runs.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from array import array
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from migshark.analyzer.analysis import AnalysisOptions, InputError, MigrationStream, analyze_path
from migshark.analyzer.bitmaps import SECTOR, BitmapTracker, PagedWords
from migshark.analyzer.findings import Code
from migshark.analyzer.records import Event, Finding, Record, Severity
from migshark.analyzer.report import analysis_json
from migshark.dissectors.registry import BITMAP_KINDS
from migshark.tui.filter import Predicate, RowView

MAP_CELLS = 4096
BATCH_EVENTS = 2000
BATCH_SECONDS = 0.1
# The first screenful matters most: the first batch leaves as soon as it would fill one.
FIRST_BATCH_EVENTS = 50


# --- bitmap snapshots --------------------------------------------------------

DIRTY, CLEAN, MISSING = "dirty", "clean", "missing"


@dataclass(frozen=True, slots=True)
class BitmapSnapshot:
    """One bitmap's state at a moment: its summary row and a coarse map of the disk."""

    stream: str
    summary: dict[str, Any]
    cells: str  # one char per cell: "d" dirty, "c" clean, "m" not yet received
    sectors_per_cell: float

    @property
    def label(self) -> str:
        return f"{self.summary['node']}/{self.summary['name']}"


def snapshot_tracker(stream_name: str, tracker: BitmapTracker) -> list[BitmapSnapshot]:
    """Summaries and disk maps of every bitmap; call only between tracker updates."""
    out = []
    for state in list(tracker.bitmaps.values()):
        summary = state.result()
        summary["coverage_sectors"] = sum(hi - lo for lo, hi in state.coverage)
        summary["end_sector"] = state.end_sector
        cells, per_cell = _disk_cells(state.coverage, state.words, state.granularity,
                                      state.end_sector)
        out.append(BitmapSnapshot(stream_name, summary, cells, per_cell))
    return out


def _disk_cells(coverage: list[list[int]], words: PagedWords, granularity: int | None,
                end_sector: int) -> tuple[str, float]:
    if end_sector <= 0 or not granularity:
        return "", 0.0
    granule_sectors = max(1, granularity // SECTOR)
    granules = -(-end_sector // granule_sectors)
    count = min(MAP_CELLS, granules)
    per_cell = end_sector / count
    chars = []
    spans = sorted(coverage)
    span_index = 0
    for cell in range(count):
        lo = int(cell * per_cell)
        hi = max(lo + 1, int((cell + 1) * per_cell))
        while span_index < len(spans) and spans[span_index][1] <= lo:
            span_index += 1
        received = (span_index < len(spans) and spans[span_index][0] <= lo
                    and spans[span_index][1] >= hi)
        first_granule = lo // granule_sectors
        last_granule = (hi - 1) // granule_sectors
        dirty = False
        byte_lo, byte_hi = first_granule // 8, last_granule // 8 + 1
        if byte_lo < len(words):
            chunk = words[byte_lo:byte_hi]
            if chunk.count(0) != len(chunk):
                if byte_hi - byte_lo <= 2:
                    value = int.from_bytes(chunk, "little") >> (first_granule - byte_lo * 8)
                    dirty = bool(value & ((1 << (last_granule - first_granule + 1)) - 1))
                else:
                    dirty = True
        if dirty:
            chars.append("d")
        elif received:
            chars.append("c")
        else:
            chars.append("m")
    return "".join(chars), per_cell


# --- sources ----------------------------------------------------------------

@dataclass
class Batch:
    """Events decoded since the previous batch, with the state they left behind."""

    events: list[tuple[str, Event]]
    bitmaps: list[BitmapSnapshot] | None = None
    progress: float | None = None


Deliver = Callable[[Batch], None]


class EventSource(Protocol):
    """Anything that produces migration events for the app (a file, a live capture).

    `run` is called in a worker thread; it calls `deliver` with batches (which may
    block while the UI catches up) and returns when the source is exhausted or
    `stop` is set, with the analysis JSON (report.analysis_json(), docs/json.md) if it has one.
    A live capture implements this with a Batcher as its CaptureDemux sink.
    """

    name: str

    def run(self, deliver: Deliver, stop: threading.Event) -> dict[str, Any] | None: ...


class Stopped(Exception):
    """Raised inside the analyzer's sink to abandon decoding when the app quits."""


class Batcher:
    """An analyzer sink that groups events into batches with bitmap snapshots.

    Runs in the decoding thread: the snapshot is taken between the tracker's own
    updates, so it never sees a half-applied record.
    """

    def __init__(self, deliver: Deliver, stop: threading.Event,
                 progress: Callable[[], float | None] | None = None) -> None:
        self.deliver = deliver
        self.stop = stop
        self.progress = progress
        self.pending: list[tuple[str, Event]] = []
        self.streams: dict[int, MigrationStream] = {}
        self.last_flush = time.monotonic()
        self.bitmaps_dirty = False
        self.first = True

    def __call__(self, stream: MigrationStream, event: Event) -> None:
        if self.stop.is_set():
            raise Stopped
        self.streams.setdefault(id(stream), stream)
        self.pending.append((stream.name, event))
        if not isinstance(event, Record) or event.kind in BITMAP_KINDS:
            self.bitmaps_dirty = True
        if (len(self.pending) >= (FIRST_BATCH_EVENTS if self.first else BATCH_EVENTS)
                or time.monotonic() - self.last_flush >= BATCH_SECONDS):
            self.flush()

    def snapshots(self) -> list[BitmapSnapshot]:
        out: list[BitmapSnapshot] = []
        for stream in self.streams.values():
            out += snapshot_tracker(stream.name, stream.tracker)
        return out

    def flush_if_due(self) -> None:
        """For live sources: hand over what is pending once it is BATCH_SECONDS old,
        so that the last events before a quiet period do not wait for the next one."""
        if self.pending and time.monotonic() - self.last_flush >= BATCH_SECONDS:
            self.flush()

    def flush(self, final: bool = False) -> None:
        bitmaps = self.snapshots() if (self.bitmaps_dirty or final) else None
        self.bitmaps_dirty = False
        progress = 1.0 if final else (self.progress() if self.progress else None)
        batch = Batch(self.pending, bitmaps, progress)
        self.pending = []
        self.first = False
        self.deliver(batch)
        self.last_flush = time.monotonic()


class FileSource:
    """A capture or raw stream on disk, decoded with analyze_path.

    By default the decoding runs in a child process: the analyzer is pure Python
    and would otherwise compete with the UI for the GIL, which on a big capture
    makes every key press wait. Batches come back pickled through a pipe, whose
    buffer is the back-pressure.
    """

    def __init__(self, path: str | os.PathLike[str], options: AnalysisOptions | None = None,
                 *, in_process: bool = False) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.options = options or AnalysisOptions(keep_buffers=True)
        self.size = max(1, self.path.stat().st_size) if self.path.exists() else 1
        self.in_process = in_process

    def run(self, deliver: Deliver, stop: threading.Event) -> dict[str, Any] | None:
        if self.in_process:
            return self.decode(deliver, stop)
        return self._run_child(deliver, stop)

    def decode(self, deliver: Deliver, stop: threading.Event) -> dict[str, Any]:
        """Decode here, in the calling thread; returns the analysis JSON."""
        batcher: Batcher

        def progress() -> float:
            seen = sum(s.bytes_seen for s in batcher.streams.values())
            return min(0.99, seen / self.size)

        batcher = Batcher(deliver, stop, progress)
        result = analyze_path(self.path, self.options, batcher)
        # The tracker's snapshot after finish() is final (sha256, incomplete bitmaps).
        for stream in result.migrations:
            batcher.streams.setdefault(id(stream), stream)
        for finding in result.input_findings:
            batcher.pending.append(("", finding))
        batcher.flush(final=True)
        return analysis_json(result)

    def _run_child(self, deliver: Deliver, stop: threading.Event) -> dict[str, Any] | None:
        context = multiprocessing.get_context("fork")
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=_decode_in_child, args=(self, sender), daemon=True,
                                name=f"migshark-decode-{self.name}")
        child.start()
        sender.close()
        try:
            while True:
                if stop.is_set():
                    raise Stopped
                if not receiver.poll(0.1):
                    if not child.is_alive() and not receiver.poll(0):
                        raise RuntimeError(f"the decoder process ended with code {child.exitcode}")
                    continue
                try:
                    kind, payload = receiver.recv()
                except EOFError:
                    raise RuntimeError("the decoder process ended without a result") from None
                if kind == "batch":
                    deliver(payload)
                elif kind == "done":
                    return payload
                elif kind == "input-error":
                    raise InputError(payload)
                else:
                    raise RuntimeError(payload)
        finally:
            if child.is_alive():
                child.terminate()
            child.join(2)
            receiver.close()


def _decode_in_child(source: FileSource, sender: Any) -> None:
    try:
        result = source.decode(lambda batch: sender.send(("batch", batch)), threading.Event())
        sender.send(("done", result))
    except InputError as error:
        sender.send(("input-error", str(error)))
    except (BrokenPipeError, KeyboardInterrupt):
        pass  # the app went away
    except Exception as error:  # noqa: BLE001 - reported to the UI, which shows it
        sender.send(("error", f"decoding stopped: {type(error).__name__}: {error}"))
    finally:
        sender.close()


# --- the UI thread's store -------------------------------------------------------

@dataclass
class Store:
    """Rows and findings as the UI knows them; grows with every batch applied."""

    records: list[Record] = field(default_factory=list)
    record_stream: list[str] = field(default_factory=list)
    findings: list[tuple[str, Finding]] = field(default_factory=list)
    severity: dict[int, Severity] = field(default_factory=dict)
    codes: dict[int, tuple[str, ...]] = field(default_factory=dict)
    bitmaps: list[BitmapSnapshot] = field(default_factory=list)
    bitmaps_version: int = 0
    problems: int = 0  # findings other than phase notes
    first_time: float | None = None
    _by_stream: dict[str, tuple[array[int], array[int]]] = field(default_factory=dict)
    _orphans: list[tuple[str, Finding]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def add(self, stream: str, event: Event) -> int | None:
        """Add one event; returns the row index when it is a record."""
        if isinstance(event, Finding):
            self.findings.append((stream, event))
            if event.code == Code.PHASE:
                return None
            self.problems += 1
            row = self.row_at(stream, event.offset)
            if row is None:
                self._orphans.append((stream, event))
            else:
                self._attach(row, event)
            return None
        row = len(self.records)
        self.records.append(event)
        self.record_stream.append(stream)
        if self.first_time is None and event.timestamp is not None:
            self.first_time = event.timestamp
        offsets, rows = self._by_stream.setdefault(stream, (array("q"), array("q")))
        offsets.append(event.offset)
        rows.append(row)
        if self._orphans:
            still = []
            for orphan_stream, finding in self._orphans:
                if orphan_stream == stream and event.offset <= finding.offset < max(
                        event.end, event.offset + 1):
                    self._attach(row, finding)
                else:
                    still.append((orphan_stream, finding))
            self._orphans = still
        return row

    def _attach(self, row: int, finding: Finding) -> None:
        current = self.severity.get(row)
        if current is None or finding.severity > current:
            self.severity[row] = finding.severity
        codes = self.codes.get(row, ())
        if finding.code not in codes:
            self.codes[row] = codes + (finding.code,)

    def row_at(self, stream: str, offset: int) -> int | None:
        """The row of the record of `stream` whose bytes contain `offset` (or the last
        record starting before it)."""
        entry = self._by_stream.get(stream)
        if entry is None:
            if not stream and self._by_stream:
                entry = next(iter(self._by_stream.values()))
            else:
                return None
        offsets, rows = entry
        index = bisect_right(offsets, offset) - 1
        if index < 0:
            return None
        # Prefer the innermost/latest record starting at or before the offset that
        # actually contains it (package-end and zero-length records sit in between).
        for candidate in range(index, max(-1, index - 8), -1):
            record = self.records[rows[candidate]]
            if record.offset <= offset < max(record.end, record.offset + 1):
                return rows[candidate]
        return rows[index]

    def row_for_finding(self, stream: str, finding: Finding) -> int | None:
        return self.row_at(stream, finding.offset)

    def view(self, row: int) -> RowView:
        return RowView(row + 1, self.records[row], self.severity.get(row),
                       self.codes.get(row, ()))

    def matching(self, predicate: Predicate, start: int = 0, end: int | None = None
                 ) -> array[int]:
        """Rows in [start, end) that the predicate accepts; safe to call from a thread
        while the UI appends (rows below `end` no longer change, except a finding
        landing on one)."""
        out = array("q")
        for row in range(start, len(self.records) if end is None else end):
            if predicate(self.view(row)):
                out.append(row)
        return out
