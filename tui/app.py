"""migshark's terminal UI: Wireshark's three panes plus the state of every bitmap.

Decoding runs in a worker thread (an EventSource); it hands batches of events to
the UI through a bounded queue and a message, so the UI thread never blocks and
a slow UI slows the decoder instead of growing memory without bound.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
from array import array
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import events, on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Input, ProgressBar, Static, Tree
from textual.widgets.tree import TreeNode

from migshark.analyzer.analysis import AnalysisOptions, InputError
from migshark.analyzer.capture import sniff_format
from migshark.analyzer.findings import Code
from migshark.analyzer.records import Event, Finding, Record, Severity
from migshark.analyzer.report import format_event_line
from migshark.dissectors.registry import describe, kind_info
from migshark.tui.fields import ByteSource
from migshark.tui.filter import FilterError, Predicate, parse_filter
from migshark.tui.model import Batch, BitmapSnapshot, EventSource, FileSource, Stopped, Store
from migshark.tui.widgets import DiskMap, HexView, RecordList, StatusLine, header_text, safe_text

QUEUE_BATCHES = 8
FILTER_IN_THREAD_ROWS = 200_000
FILTER_HINT = " Enter applies the filter (empty shows all); Esc returns to the list"
# Keys that act on widgets of the main screen; hidden while another screen is on top.
MAIN_SCREEN_ACTIONS = {"focus_filter", "focus_list", "follow"}
_DONE = object()


class BatchReady(Message):
    """Posted by the decoding thread after it queued a batch."""


# --- secondary screens ------------------------------------------------------------

HELP_TEXT = """\
[b]migshark TUI[/b] - keys
  [b]↑ ↓ PgUp PgDn Home End[/b]  move in the record list (mouse: click)
  [b]Tab[/b]       next pane (list, filter, detail tree)
  [b]/[/b]         edit the display filter; Enter applies, Esc leaves it
  [b]b[/b]         bitmaps: table and disk map (Enter there filters to the bitmap)
  [b]e[/b]         findings (expert info); Enter jumps to the record
  [b]f[/b]         follow new records     [b]space[/b]  pause/resume updates
  [b]x[/b]         export the analysis as JSON   [b]t[/b]  export filtered records as text
  [b]?[/b]         this help      [b]Esc[/b] back      [b]q[/b] quit

[b]Display filter[/b]
  field op value, joined with [b]and[/b], [b]or[/b], [b]not[/b] and parentheses
  ops: == != < <= > >= contains      values: "text", 'text', 123, 0x7b, word
  fields: kind section bitmap node offset length severity code no time
          granularity first_sector sector_count zeroes buffer_size idstr ...
          and the registry's: bitmap.granularity bitmap.flags.zeroes command ...
          (also as qemu_mig.bitmap.name, as in Wireshark)
  bitmap == "inc0" and kind == BITS      severity >= warning
  section == ram   node == "drive0"   offset > 1000   not kind == ram-pages
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "close", "Close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static { width: auto; max-width: 100%; height: auto; max-height: 100%;
                          border: round $accent; background: $panel; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        yield Static(HELP_TEXT, id="help")

    def action_close(self) -> None:
        self.dismiss(None)


class FindingsScreen(Screen[None]):
    """Expert info: findings grouped by severity, worst first."""

    BINDINGS = [Binding("escape,e", "close", "Back"), Binding("q", "app.quit", "Quit")]
    DEFAULT_CSS = """
    FindingsScreen #findings-title { height: 1; background: $boost; }
    FindingsScreen Tree { height: 1fr; }
    FindingsScreen #no-findings { padding: 1 2; }
    """

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store

    def compose(self) -> ComposeResult:
        yield Static("", id="findings-title")
        yield Static("No findings.", id="no-findings")
        tree = PlainTree("findings", id="findings-tree")
        tree.show_root = False
        yield tree
        yield Footer()

    def on_mount(self) -> None:
        self.shown_count = -1
        self.populate()
        tree = self.query_one(Tree)
        tree.focus()
        # Start on the first finding, not on its group's heading.
        _move_tree_cursor(tree, 1)
        # Findings keep landing while a capture decodes (or a live capture runs).
        self.set_interval(0.5, self.populate)

    def populate(self) -> None:
        if len(self.store.findings) == self.shown_count:
            return
        self.shown_count = len(self.store.findings)
        shown = [(s, f) for s, f in self.store.findings if f.code != Code.PHASE]
        phases = [(s, f) for s, f in self.store.findings if f.code == Code.PHASE]
        self.query_one("#findings-title", Static).update(Text(
            f" Findings: {len(shown)}   Enter: go to the record   Esc: back"))
        self.query_one("#no-findings").display = not shown
        tree: Tree[tuple[str, Finding] | None] = self.query_one(Tree)
        tree.display = bool(shown or phases)
        line = tree.cursor_line
        tree.clear()
        groups = [(severity.label, [(s, f) for s, f in shown if f.severity == severity])
                  for severity in sorted(Severity, reverse=True)]
        # Phases are not problems, but they are where one starts reading a stream.
        groups.append(("phases", phases))
        for label, group in groups:
            if not group:
                continue
            branch = tree.root.add(f"{label} ({len(group)})", expand=True)
            for stream, finding in sorted(group, key=lambda item: item[1].offset):
                where = f"{finding.offset:#010x}"
                text = Text(safe_text(f"{where}  {finding.code}: {finding.message}"))
                branch.add_leaf(text, data=(stream, finding))
        if line > 0:
            _move_tree_cursor(tree, line)

    @on(Tree.NodeSelected, "#findings-tree")
    def jump(self, event: Tree.NodeSelected[tuple[str, Finding] | None]) -> None:
        if event.node.data is None:
            return
        stream, finding = event.node.data
        app = self.app
        assert isinstance(app, MigsharkApp)
        self.dismiss(None)
        app.jump_to_finding(stream, finding)

    def action_close(self) -> None:
        self.dismiss(None)


class PlainTree(Tree[Any]):
    """A Tree whose str labels are plain text: names and messages come from the
    stream, and a bitmap called "[/red]" must not be read as markup."""

    def process_label(self, label: str | Text) -> Text:
        text = Text(safe_text(label)) if isinstance(label, str) else label
        return text.split()[0]


def _move_tree_cursor(tree: Tree[Any], line: int) -> None:
    if tree.last_line >= 0:
        tree.move_cursor_to_line(min(line, tree.last_line))


BITMAP_COLUMNS = ("Node", "Name", "Granularity", "Flags", "Disk size", "Coverage",
                  "Dirty bytes", "Status", "SHA-256")


def _human(value: int | None) -> str:
    if value is None:
        return "?"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def bitmap_row(snap: BitmapSnapshot) -> tuple[str, ...]:
    # .get: a summary key the analyzer drops or renames costs a "?", not the UI.
    s = snap.summary
    name = str(s.get("name"))
    node = str(s.get("node"))
    real = (s.get("real_node", node), s.get("real_name", name))
    if real != (node, name):
        name += f" (= {real[0]}/{real[1]})"
    flags = ("E" if s.get("enabled") else "-") + ("P" if s.get("persistent") else "-")
    end = s.get("end_sector") or 0
    coverage = f"{100 * s.get('coverage_sectors', 0) / end:.0f}%" if end else "-"
    sha = s.get("sha256")
    status = str(s.get("status", "?")) if sha else str(s.get("reason") or s.get("status", "?"))
    return (node, name, str(s.get("granularity") or "?"), flags, _human(s.get("disk_size")),
            coverage, _human(s.get("dirty_bytes")), status, sha or "-")


class BitmapsScreen(Screen[None]):
    """Every bitmap seen, and a disk map of the one under the cursor; live while loading."""

    BINDINGS = [
        Binding("escape,b", "close", "Back"),
        # Priority: the table's own Enter (also sent by a mouse click) would select the
        # row; a click should only show that bitmap's map, Enter filters to it.
        Binding("enter", "filter_bitmap", "Filter records", priority=True),
        Binding("q", "app.quit", "Quit"),
    ]
    DEFAULT_CSS = """
    BitmapsScreen #bitmaps-title { height: 1; background: $boost; }
    BitmapsScreen DataTable { height: auto; max-height: 50%; }
    BitmapsScreen DiskMap { height: 1fr; border-top: solid $accent; }
    """

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store
        self.version = -1
        self.snapshots: list[BitmapSnapshot] = []

    def compose(self) -> ComposeResult:
        yield Static(" Bitmaps   Enter: show only its records   Esc: back", id="bitmaps-title")
        table: DataTable[str] = DataTable(id="bitmaps-table", cursor_type="row",
                                          zebra_stripes=True)
        table.add_columns(*BITMAP_COLUMNS)
        yield table
        yield DiskMap(id="disk-map")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_from_store()
        self.set_interval(0.25, self.refresh_from_store)
        self.query_one(DataTable).focus()

    def refresh_from_store(self) -> None:
        if self.store.bitmaps_version == self.version:
            return
        self.version = self.store.bitmaps_version
        table = self.query_one(DataTable)
        cursor = table.cursor_row
        self.snapshots = list(self.store.bitmaps)
        table.clear()
        for index, snap in enumerate(self.snapshots):
            table.add_row(*(Text(safe_text(cell)) for cell in bitmap_row(snap)),
                          key=str(index))
        if self.snapshots:
            table.move_cursor(row=min(max(cursor, 0), len(self.snapshots) - 1))
        self.show_map()

    def selected(self) -> BitmapSnapshot | None:
        row = self.query_one(DataTable).cursor_row
        if 0 <= row < len(self.snapshots):
            return self.snapshots[row]
        return None

    def show_map(self) -> None:
        self.query_one(DiskMap).show(self.selected())

    @on(DataTable.RowHighlighted)
    def highlighted(self) -> None:
        self.show_map()

    def action_filter_bitmap(self) -> None:
        snap = self.selected()
        if snap is None:
            return
        app = self.app
        assert isinstance(app, MigsharkApp)
        s = snap.summary
        self.dismiss(None)
        app.set_filter(f'node == "{s["node"]}" and bitmap == "{s["name"]}"')

    def action_close(self) -> None:
        self.dismiss(None)


# --- the main screen ---------------------------------------------------------------


class MigsharkApp(App[None]):
    TITLE = "migshark"
    # Every action has a key; the palette's footer hint would push them off 80 columns.
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #top { height: 1; }
    #status { width: 1fr; }
    #progress { width: 26; height: 1; }
    #progress Bar { width: 18; }
    #filter { height: 1; border: none; padding: 0 1; background: $boost; }
    #filter.-invalid { background: $error 40%; color: $text; }
    #filter.-valid { background: $success 25%; }
    #filter-error { height: 1; color: $error; display: none; }
    #filter-error.-shown { display: block; }
    #filter-error.-hint { color: $text-muted; }
    #columns { height: 1; background: $primary 30%; text-style: bold; }
    RecordList { height: 2fr; min-height: 4; }
    #detail { height: 1fr; min-height: 3; border-top: solid $primary 50%; }
    #hex-pane { height: 1fr; min-height: 3; border-top: solid $primary 50%; }
    """
    BINDINGS = [
        # Footer order: what fits at 80 columns comes first, help before exports.
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
        Binding("slash", "focus_filter", "Filter"),
        Binding("b", "bitmaps", "Bitmaps"),
        Binding("e", "findings", "Findings"),
        Binding("f", "follow", "Follow"),
        Binding("space", "pause", "Pause"),
        Binding("x", "export_json", "JSON"),
        Binding("t", "export_text", "Text"),
        Binding("escape", "focus_list", "List", show=False),
    ]

    def __init__(self, source: EventSource | None = None, *, raw_path: str | Path | None = None,
                 export_dir: str | Path | None = None, title: str | None = None) -> None:
        super().__init__()
        self.source = source
        self.store = Store()
        self.bytes = ByteSource(raw_path)
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.source_name = title or (source.name if source is not None else "live")
        self.predicate: Predicate | None = None
        self.filter_text = ""
        self.paused = False
        self.held: list[Batch] = []
        self.loading = source is not None
        self.loaded = threading.Event()
        self.analysis: dict[str, Any] | None = None
        self.error: str | None = None
        self.progress = 0.0
        self._queue: queue.Queue[Any] = queue.Queue(QUEUE_BATCHES)
        self._stop = threading.Event()
        self._main_screen: Screen[Any] | None = None
        self.filtering = False
        self._filter_generation = 0

    @property
    def main(self) -> Screen[Any]:
        """The record list's screen, whichever screen is on top."""
        return self._main_screen or self.screen

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in MAIN_SCREEN_ACTIONS and self.screen is not self.main:
            return False
        return True

    @classmethod
    def for_path(cls, path: str | Path, port: int | None = None,
                 export_dir: str | Path | None = None) -> MigsharkApp:
        path = Path(path)
        raw = None
        try:
            if sniff_format(path) == "raw":
                raw = path
        except OSError:
            pass
        source = FileSource(path, AnalysisOptions(port=port, keep_buffers=True))
        return cls(source, raw_path=raw, export_dir=export_dir)

    # --- layout -------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal(id="top"):
            yield StatusLine("", id="status")
            yield ProgressBar(total=1.0, show_eta=False, id="progress")
        yield Input(placeholder="display filter (/), e.g. bitmap == \"inc0\" and kind == BITS",
                    id="filter")
        yield Static("", id="filter-error")
        yield Static(header_text(), id="columns")
        yield RecordList(self.store, id="records")
        tree = PlainTree("No record selected", id="detail")
        yield tree
        yield HexView(id="hex-pane")
        yield Footer()

    def on_mount(self) -> None:
        self._main_screen = self.screen
        self.main.query_one(RecordList).focus()
        if self.source is None:
            self.main.query_one("#progress").display = False
        else:
            self.decode()
        self.update_status()

    @work(thread=True, exit_on_error=False, name="decode")
    def decode(self) -> None:
        assert self.source is not None
        try:
            self.analysis = self.source.run(self._deliver, self._stop)
        except Stopped:
            return
        except InputError as error:
            self.error = str(error)
        except Exception as error:  # noqa: BLE001 - the UI must say why, not crash
            self.error = f"decoding stopped: {type(error).__name__}: {error}"
        self._put(_DONE)

    def _deliver(self, batch: Batch) -> None:
        self._put(batch)

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
            except queue.Full:
                continue
            self.post_message(BatchReady())
            return
        raise Stopped

    # --- feeding -------------------------------------------------------------

    def push_events(self, stream: str, events: list[Event],
                    bitmaps: list[BitmapSnapshot] | None = None) -> None:
        """Thread-safe entry for live sources that do not use a worker EventSource."""
        self._put(Batch([(stream, event) for event in events], bitmaps))

    def on_batch_ready(self, message: BatchReady) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _DONE:
                self.finish_loading()
            elif self.paused:
                self.held.append(item)
            else:
                self.apply_batch(item)

    def apply_batch(self, batch: Batch) -> None:
        new_rows = []
        for stream, event in batch.events:
            row = self.store.add(stream, event)
            if row is not None:
                new_rows.append(row)
        if self.predicate is not None:
            predicate = self.predicate
            new_rows = [row for row in new_rows if predicate(self.store.view(row))]
        listing = self.main.query_one(RecordList)
        had_selection = listing.selected_row() is not None
        listing.rows_added([] if self.filtering else new_rows)
        if batch.bitmaps is not None:
            self.store.bitmaps = batch.bitmaps
            self.store.bitmaps_version += 1
        if batch.progress is not None:
            self.progress = batch.progress
            self.main.query_one(ProgressBar).update(progress=batch.progress)
        if not had_selection and listing.selected_row() is not None:
            self.show_record(listing.selected_row())
        self.update_status()

    def finish_loading(self) -> None:
        for batch in self.held:
            self.apply_batch(batch)
        self.held.clear()
        self.paused = False
        self.loading = False
        self.main.query_one("#progress").display = False
        if self.error:
            self.notify(self.error, title="cannot decode", severity="error", timeout=10,
                        markup=False)
        self.update_status()
        self.loaded.set()

    async def wait_loaded(self, timeout: float = 60.0) -> None:
        """For tests and scripts: wait until the source is exhausted and applied."""
        import asyncio

        deadline = asyncio.get_running_loop().time() + timeout
        while not self.loaded.is_set():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("the capture did not finish loading")
            await asyncio.sleep(0.02)

    # --- status --------------------------------------------------------------

    def update_status(self) -> None:
        listing = self.main.query_one(RecordList)
        shown = listing.row_count
        total = len(self.store)
        findings = self.store.problems
        parts = [f" {self.source_name}"]
        parts.append(f"{shown:,}/{total:,} records" if self.predicate else f"{total:,} records")
        parts.append(f"{findings} finding" + ("" if findings == 1 else "s"))
        if self.error:
            parts.append(f"ERROR: {self.error}")
        elif self.loading:
            parts.append("loading")
        if self.filtering:
            parts.append("filtering")
        if self.paused:
            parts.append("PAUSED")
        if listing.follow:
            parts.append("follow")
        self.main.query_one(StatusLine).update(Text(safe_text(" | ".join(parts))))

    # --- selection: detail tree and hex --------------------------------------

    @on(RecordList.Selected)
    def record_selected(self, message: RecordList.Selected) -> None:
        try:
            self.show_record(message.row)
        except NoMatches:
            pass  # a late selection while the app shuts down

    def show_record(self, row: int | None) -> None:
        tree: Tree[tuple[int, int] | None] = self.main.query_one("#detail", Tree)
        hex_view = self.main.query_one(HexView)
        tree.clear()
        if row is None:
            tree.root.set_label("No record selected")
            hex_view.show(b"", 0, "no record")
            return
        record = self.store.records[row]
        stream = self.store.record_stream[row]
        whole = (record.offset, record.length)
        tree.root.set_label(f"Record {row + 1}: {record.kind} at {record.offset:#x}, "
                            f"{record.length} bytes [{record.offset:#x}..{record.end:#x})")
        tree.root.data = whole
        frame = tree.root.add("Stream", data=whole, expand=False)
        frame.add_leaf(f"stream: {stream}", data=whole)
        frame.add_leaf(f"offset: {record.offset:#x}", data=whole)
        frame.add_leaf(f"length: {record.length}", data=whole)
        frame.add_leaf(f"section: {record.section} (id {record.section_id})", data=whole)
        if record.timestamp is not None and self.store.first_time is not None:
            frame.add_leaf(f"time: {record.timestamp - self.store.first_time:.6f} s", data=whole)
        if record.bitmap:
            frame.add_leaf(f"bitmap: {record.node}/{record.bitmap}", data=whole)
        self._add_fields(tree, record, whole)
        attached = [f for s, f in self.store.findings
                    if s == stream and f.code != Code.PHASE
                    and record.offset <= f.offset < max(record.end, record.offset + 1)]
        if attached:
            expert = tree.root.add(f"Findings ({len(attached)})", data=whole, expand=True)
            for finding in attached:
                expert.add_leaf(f"[{finding.severity.label}] {finding.code}: {finding.message}",
                                data=(finding.offset, max(1, finding.length)))
        tree.root.expand()
        data, origin = self.bytes.record_bytes(record)
        hex_view.show(data, record.offset, origin, (record.offset, record.end))

    @staticmethod
    def _add_fields(tree: Tree[tuple[int, int] | None], record: Record,
                    whole: tuple[int, int]) -> None:
        """The record's fields as the registry describes them; bit fields under their
        flags, generated fields in brackets as Wireshark shows them."""
        info = kind_info(record.kind)
        title = info.label if info else record.kind
        if record.spans is None:
            # Until the decoder reports spans, every field shows the whole record's bytes.
            title += " (no byte ranges)"
        fields = tree.root.add(title, data=whole, expand=True)
        parents: dict[str, TreeNode[tuple[int, int] | None]] = {}
        for view in describe(record):
            text = f"{view.label if view.name else view.info.label}: {view.text}"
            if view.generated:
                text = f"[{text}]"
            elif view.exact:
                text += f"  [{view.offset:#x}+{view.length}]"
            span = (view.offset, view.length)
            parent = parents.get(view.info.parent or "") if view.info.bitmask else None
            if parent is not None:
                parent.add_leaf(text, data=span)
            elif view.info.bit_names is not None and record.spans is not None:
                parents[view.info.filter_name] = fields.add(text, data=span, expand=False)
            else:
                fields.add_leaf(text, data=span)

    @on(Tree.NodeHighlighted, "#detail")
    def field_highlighted(self, event: Tree.NodeHighlighted[tuple[int, int] | None]) -> None:
        if event.node.data is None:
            return
        start, length = event.node.data
        self.main.query_one(HexView).set_highlight((start, start + max(length, 0)))

    # --- filter ----------------------------------------------------------------

    @on(Input.Changed, "#filter")
    def filter_changed(self, event: Input.Changed) -> None:
        box = event.input
        if not box.is_attached:
            return  # a late message while the app shuts down
        message = box.screen.query_one("#filter-error", Static)
        try:
            parse_filter(event.value)
        except FilterError as error:
            box.set_class(True, "-invalid")
            box.set_class(False, "-valid")
            message.update(Text(f" invalid filter at {error.position + 1}: {error}"))
            message.set_class(True, "-shown")
            message.set_class(False, "-hint")
            return
        box.set_class(False, "-invalid")
        box.set_class(bool(event.value.strip()), "-valid")
        self._filter_hint(box.has_focus)

    def _filter_hint(self, show: bool) -> None:
        message = self.main.query_one("#filter-error", Static)
        message.update(FILTER_HINT)
        message.set_class(show, "-shown", "-hint")

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        if getattr(event.widget, "id", None) == "filter" and not event.widget.has_class(
                "-invalid"):
            self._filter_hint(True)

    def on_descendant_blur(self, event: events.DescendantBlur) -> None:
        if getattr(event.widget, "id", None) == "filter" and not event.widget.has_class(
                "-invalid"):
            self._filter_hint(False)

    @on(Input.Submitted, "#filter")
    def filter_submitted(self, event: Input.Submitted) -> None:
        if self.apply_filter(event.value):
            self.main.query_one(RecordList).focus()

    def set_filter(self, text: str) -> None:
        self.main.query_one("#filter", Input).value = text
        self.apply_filter(text)

    def apply_filter(self, text: str) -> bool:
        try:
            predicate = parse_filter(text)
        except FilterError as error:
            self.notify(f"invalid filter: {error}", severity="error", markup=False)
            return False
        self.predicate = predicate
        self.filter_text = text.strip()
        self._filter_generation += 1
        listing = self.main.query_one(RecordList)
        if predicate is not None and len(self.store) > FILTER_IN_THREAD_ROWS:
            # Seconds of work for a million rows: done off the event loop, so keys
            # still work; the list shows the result when it is complete.
            self.filtering = True
            listing.set_rows(array("q"))
            self.filter_rows(predicate, self._filter_generation, len(self.store))
        else:
            self.filtering = False
            listing.set_rows(None if predicate is None else self.store.matching(predicate))
            self.show_record(listing.selected_row())
        self.update_status()
        return True

    @work(thread=True, exit_on_error=False, group="filter")
    def filter_rows(self, predicate: Predicate, generation: int, end: int) -> None:
        rows = self.store.matching(predicate, 0, end)
        if self._stop.is_set():
            return
        try:
            self.call_from_thread(self._filter_done, generation, rows, end)
        except RuntimeError:
            pass  # the app is shutting down

    def _filter_done(self, generation: int, rows: array[int], end: int) -> None:
        if generation != self._filter_generation or self.predicate is None:
            return  # a newer filter replaced this one
        # Rows that arrived while the thread worked were held back; add them in order.
        rows.extend(self.store.matching(self.predicate, end))
        self.filtering = False
        listing = self.main.query_one(RecordList)
        listing.set_rows(rows)
        self.show_record(listing.selected_row())
        self.update_status()

    def filtered_rows(self) -> range | array[int]:
        listing = self.main.query_one(RecordList)
        return range(len(self.store)) if listing.rows is None else listing.rows

    # --- actions ------------------------------------------------------------------

    def action_focus_filter(self) -> None:
        self.main.query_one("#filter", Input).focus()

    def action_focus_list(self) -> None:
        self.main.query_one(RecordList).focus()

    def action_bitmaps(self) -> None:
        self.push_screen(BitmapsScreen(self.store))

    def action_findings(self) -> None:
        self.push_screen(FindingsScreen(self.store))

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_follow(self) -> None:
        listing = self.main.query_one(RecordList)
        listing.follow = not listing.follow
        if listing.follow:
            listing.action_last()
        self.update_status()

    def action_pause(self) -> None:
        self.paused = not self.paused
        if not self.paused:
            held, self.held = self.held, []
            for batch in held:
                self.apply_batch(batch)
        self.update_status()

    def jump_to_finding(self, stream: str, finding: Finding) -> None:
        row = self.store.row_for_finding(stream, finding)
        if row is None:
            self.notify(f"no record at {finding.offset:#x}", severity="warning", markup=False)
            return
        listing = self.main.query_one(RecordList)
        if not listing.select_row(row):
            # The record is hidden by the filter; showing it matters more.
            self.set_filter("")
            listing.select_row(row)
        listing.focus()

    def _export_path(self, suffix: str) -> Path:
        name = self.source_name or "migshark"
        candidates = []
        if self.export_dir is not None:
            candidates.append(self.export_dir)
        if isinstance(self.source, FileSource):
            candidates.append(self.source.path.parent)
        candidates.append(Path.cwd())
        for directory in candidates:
            if directory.is_dir() and _writable(directory):
                return directory / f"{name}{suffix}"
        return Path.cwd() / f"{name}{suffix}"

    def action_export_json(self) -> None:
        if self.analysis is None:
            self.notify("the analysis is not finished yet", severity="warning", markup=False)
            return
        path = self._export_path(".migshark.json")
        try:
            path.write_text(json.dumps(self.analysis, indent=2) + "\n")
        except OSError as error:
            self.notify(f"cannot write {path}: {error.strerror}", severity="error", markup=False)
            return
        self.notify(f"analysis written to {path}", title="export", markup=False)

    def action_export_text(self) -> None:
        path = self._export_path(".records.txt")
        rows = self.filtered_rows()
        try:
            with path.open("w") as out:
                if self.filter_text:
                    out.write(f"# filter: {self.filter_text}\n")
                for row in rows:
                    out.write(format_event_line(row + 1, self.store.records[row]) + "\n")
        except OSError as error:
            self.notify(f"cannot write {path}: {error.strerror}", severity="error", markup=False)
            return
        self.notify(f"{len(rows)} records written to {path}", title="export", markup=False)

    async def action_quit(self) -> None:
        self._stop.set()
        self.exit()

    def on_unmount(self) -> None:
        self._stop.set()


def _writable(directory: Path) -> bool:
    import os

    return os.access(directory, os.W_OK)


def default_capture() -> Path | None:
    """The bundled demo: the real precopy capture, else any capture in captures/."""
    captures = Path(__file__).resolve().parent.parent / "captures"
    preferred = captures / "real" / "precopy.pcap"
    if preferred.exists():
        return preferred
    for pattern in ("**/*.pcap", "**/*.pcapng", "**/*.bin"):
        found = sorted(captures.glob(pattern))
        if found:
            return found[0]
    return None


def run(path: str | None, port: int | None = None) -> int:
    """Entry point of `migshark tui`."""
    if path is None:
        found = default_capture()
        if found is None:
            import tempfile

            from migshark.tui.demo import write_demo_stream

            found = write_demo_stream(Path(tempfile.mkdtemp(prefix="migshark-")) / "demo.bin")
        path = str(found)
    target = Path(path)
    if not target.exists():
        raise InputError(f"{path}: no such file")
    if target.is_dir():
        raise InputError(f"{path}: is a directory")
    MigsharkApp.for_path(target, port).run()
    return 0


def run_live_source(source: Any, command: str) -> int:
    """Entry point of `migshark live --tui` and `proxy --tui`: open the source (its
    socket), then hand the terminal to the app; exit 2 with one line if it cannot."""
    error = source.open()
    if error is not None:
        print(f"migshark {command}: {error}", file=sys.stderr)
        return 2
    MigsharkApp(source, title=source.name).run()
    return 0

