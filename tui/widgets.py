"""The TUI's custom widgets: the virtualised record list, the hex pane, the disk map."""

from __future__ import annotations

import re
from array import array
from collections.abc import Sequence

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Static

from migshark.analyzer.records import Record, Severity
from migshark.analyzer.report import record_info
from migshark.dissectors.registry import Kind
from migshark.tui.model import BitmapSnapshot, Store

# Wireshark-like colouring: a background per family of record kinds, overridden
# by the worst finding attached to the record.
KIND_STYLES: dict[str, Style] = {
    Kind.BITMAP_START: Style(color="#e0f0ff", bgcolor="#1d3d5e"),
    Kind.BITMAP_BITS: Style(color="#d8ffd8", bgcolor="#1f4a22"),
    Kind.BITMAP_COMPLETE: Style(color="#f0e0ff", bgcolor="#3f2a5e"),
    Kind.BITMAP_EOS: Style(color="#a0b0a0"),
    Kind.COMMAND: Style(color="#ffe9a8"),
    Kind.CONFIGURATION: Style(color="#ffe9a8"),
    Kind.FILE_HEADER: Style(color="#ffe9a8"),
    Kind.EOF: Style(color="#ffe9a8", bold=True),
    Kind.VMDESCRIPTION: Style(color="#ffe9a8"),
    Kind.FOOTER: Style(color="#707070"),
}
FAMILY_STYLES = {
    "ram": Style(color="#8a8a8a"),
    "section": Style(color="#9fc5e8"),
    "device": Style(color="#b4a7d6"),
}
SEVERITY_STYLES = {
    Severity.ERROR: Style(color="#ffffff", bgcolor="#8b1a1a", bold=True),
    Severity.WARNING: Style(color="#1a1a1a", bgcolor="#e6c34a"),
    Severity.NOTE: Style(color="#9fd0ff", italic=True),
}
CURSOR_STYLE = Style(color="#000000", bgcolor="#7fb2ff", bold=True)

COLUMNS = (("No.", 6), ("Offset", 10), ("Time", 9), ("Section", 12), ("Kind", 15),
           ("Bitmap", 14))


_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)}


def safe_text(text: str) -> str:
    """What a terminal may be sent: names from the stream can hold undecodable bytes
    (kept as surrogates) and control characters (an ESC would drive the terminal)."""
    if text.isprintable() and text.isascii():
        return text
    raw = text.encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "backslashreplace").translate(_CONTROL)


def record_style(record: Record, severity: Severity | None) -> Style:
    if severity in SEVERITY_STYLES and severity is not Severity.NOTE:
        return SEVERITY_STYLES[severity]
    style = KIND_STYLES.get(record.kind)
    if style is None:
        style = FAMILY_STYLES.get(record.kind.split("-", 1)[0], Style())
    if severity is Severity.NOTE:
        style = style + Style(italic=True)
    return style


def header_text() -> str:
    return " ".join(f"{name:<{width}}" for name, width in COLUMNS) + " Info"


def format_row(number: int, record: Record, first_time: float | None) -> str:
    if record.timestamp is not None and first_time is not None:
        when = f"{record.timestamp - first_time:9.6f}"[:9]
    else:
        when = "-"
    bitmap = f"{record.node}/{record.bitmap}" if record.bitmap else "-"
    kind = ("  " if record.depth else "") + record.kind
    cells = (str(number), f"{record.offset:#x}", when, record.section or "-", kind, bitmap)
    parts = []
    for (_, width), cell in zip(COLUMNS, cells, strict=True):
        parts.append(cell[:width].ljust(width) if len(cell) <= width else cell[: width - 1] + "…")
    return safe_text(" ".join(parts) + " " + record_info(record))


class RecordList(ScrollView, can_focus=True):
    """The packet list: renders only the visible lines of however many rows there are."""

    BINDINGS = [
        Binding("up,k", "cursor(-1)", "Up", show=False),
        Binding("down,j", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "PgUp", show=False),
        Binding("pagedown", "page(1)", "PgDn", show=False),
        Binding("home,g", "first", "First", show=False),
        Binding("end,G", "last", "Last", show=False),
    ]
    DEFAULT_CSS = """
    RecordList { height: 1fr; overflow-x: hidden; }
    """

    cursor: reactive[int] = reactive(-1, always_update=True, repaint=False)

    class Selected(Message):
        def __init__(self, row: int | None) -> None:
            super().__init__()
            self.row = row

    def __init__(self, store: Store, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.store = store
        self.rows: array[int] | None = None  # None: every row, unfiltered
        self.follow = False

    # --- the view's rows ------------------------------------------------------

    @property
    def row_count(self) -> int:
        return len(self.store) if self.rows is None else len(self.rows)

    def store_row(self, position: int) -> int:
        return position if self.rows is None else self.rows[position]

    def position_of(self, row: int) -> int | None:
        if self.rows is None:
            return row if 0 <= row < len(self.store) else None
        from bisect import bisect_left

        index = bisect_left(self.rows, row)
        if index < len(self.rows) and self.rows[index] == row:
            return index
        return None

    def selected_row(self) -> int | None:
        if 0 <= self.cursor < self.row_count:
            return self.store_row(self.cursor)
        return None

    def set_rows(self, rows: array[int] | None) -> None:
        """Show only `rows` (store indices, ascending), keeping the selection if it stays."""
        keep = self.selected_row()
        self.rows = rows
        self._resize()
        position = self.position_of(keep) if keep is not None else None
        if position is None:
            position = 0 if self.row_count else -1
        self.cursor = position
        self.scroll_to_cursor()
        self.refresh()

    def rows_added(self, new_rows: Sequence[int]) -> None:
        if self.rows is not None:
            self.rows.extend(new_rows)
        self._resize()
        if self.cursor < 0 and self.row_count:
            self.cursor = 0
        elif self.follow and self.row_count:
            self.cursor = self.row_count - 1
            self.scroll_to_cursor()
        self.refresh()

    def _resize(self) -> None:
        self.virtual_size = Size(self.size.width, self.row_count)

    # --- rendering --------------------------------------------------------------

    def render_line(self, y: int) -> Strip:
        position = self.scroll_offset.y + y
        width = self.size.width
        if position >= self.row_count:
            return Strip.blank(width)
        row = self.store_row(position)
        record = self.store.records[row]
        text = format_row(row + 1, record, self.store.first_time)
        style = CURSOR_STYLE if position == self.cursor else record_style(
            record, self.store.severity.get(row))
        text = text[:width].ljust(width)
        return Strip([Segment(text, style)], width)

    # --- cursor and keys ------------------------------------------------------------

    def watch_cursor(self, old: int, new: int) -> None:
        self.refresh()
        self.post_message(self.Selected(self.selected_row()))

    def move_to(self, position: int) -> None:
        if not self.row_count:
            return
        self.cursor = max(0, min(self.row_count - 1, position))
        self.scroll_to_cursor()

    def select_row(self, row: int) -> bool:
        position = self.position_of(row)
        if position is None:
            return False
        self.move_to(position)
        return True

    def scroll_to_cursor(self) -> None:
        if self.cursor < 0:
            return
        height = max(1, self.size.height)
        top = self.scroll_offset.y
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + height:
            target = self.cursor - height + 1
            if target > self.max_scroll_y:
                # The new virtual size is not laid out yet; scroll once it is.
                self.call_after_refresh(self.scroll_to, y=target, animate=False)
            else:
                self.scroll_to(y=target, animate=False, immediate=True)

    def action_cursor(self, delta: int) -> None:
        self.follow = False
        self.move_to(self.cursor + delta)

    def action_page(self, direction: int) -> None:
        self.follow = False
        self.move_to(self.cursor + direction * max(1, self.size.height - 1))

    def action_first(self) -> None:
        self.follow = False
        self.move_to(0)

    def action_last(self) -> None:
        self.move_to(self.row_count - 1)

    def on_click(self, event: events.Click) -> None:
        self.follow = False
        self.move_to(self.scroll_offset.y + event.y)

    def on_resize(self, event: events.Resize) -> None:
        self._resize()


class HexView(ScrollView):
    """Offset, hex and ASCII of a record's bytes, highlighting one range.

    A Line API widget like the record list: a 64 KiB RAM run is 4096 lines, and
    only the visible ones are built.
    """

    DEFAULT_CSS = """
    HexView { height: 1fr; overflow-x: hidden; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.data = b""
        self.base = 0
        self.note = ""
        self.highlight: tuple[int, int] | None = None  # absolute [start, end)

    def show(self, data: bytes, base: int, note: str,
             highlight: tuple[int, int] | None = None) -> None:
        self.data, self.base, self.note, self.highlight = data, base, note, highlight
        self._resize()
        self.scroll_to(y=0, animate=False, immediate=True)
        self.refresh()

    def set_highlight(self, highlight: tuple[int, int] | None) -> None:
        self.highlight = highlight
        if highlight is not None:
            line = 1 + (highlight[0] - self.base) // self._per_line()
            top = self.scroll_offset.y
            if not top <= line < top + max(1, self.size.height):
                self.scroll_to(y=max(0, line - 1), animate=False)
        self.refresh()

    def _per_line(self) -> int:
        return 16 if self.size.width >= 76 or self.size.width == 0 else 8

    def _resize(self) -> None:
        lines = 1 + -(-len(self.data) // self._per_line())
        self.virtual_size = Size(self.size.width, lines)

    def on_resize(self, event: events.Resize) -> None:
        self._resize()

    def render_line(self, y: int) -> Strip:
        line = self.scroll_offset.y + y
        width = self.size.width
        if line == 0:
            title = f"{len(self.data)} bytes at {self.base:#x} ({self.note})"
            return Strip([Segment(title[:width].ljust(width), Style(dim=True))], width)
        per_line = self._per_line()
        start = (line - 1) * per_line
        if start >= len(self.data):
            return Strip.blank(width)
        chunk = self.data[start : start + per_line]
        lo, hi = self.highlight or (-1, -1)
        plain, mark = Style(), Style(bgcolor="#7fb2ff", color="#000000", bold=True)
        segments = [Segment(f"{self.base + start:08x}  ", Style(dim=True))]
        for index, byte in enumerate(chunk):
            inside = lo <= self.base + start + index < hi
            segments.append(Segment(f"{byte:02x}", mark if inside else plain))
            segments.append(Segment(" "))
        segments.append(Segment("   " * (per_line - len(chunk)) + " "))
        for index, byte in enumerate(chunk):
            inside = lo <= self.base + start + index < hi
            segments.append(Segment(chr(byte) if 32 <= byte < 127 else ".",
                                    mark if inside else plain))
        return Strip(segments).crop_extend(0, width, None)


MAP_GLYPHS = {"d": ("█", Style(color="#e05050")), "c": ("▪", Style(color="#50a050")),
              "m": ("·", Style(color="#606060"))}


class DiskMap(Widget):
    """The disk of one bitmap, one cell per character: dirty, clean, not yet received."""

    DEFAULT_CSS = """
    DiskMap { height: 1fr; min-height: 3; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.snapshot: BitmapSnapshot | None = None

    def show(self, snapshot: BitmapSnapshot | None) -> None:
        self.snapshot = snapshot
        self.refresh()

    def render(self) -> Text:
        snap = self.snapshot
        text = Text(no_wrap=True, overflow="crop")
        if snap is None:
            text.append("No bitmap selected.")
            return text
        summary = snap.summary
        if not snap.cells:
            text.append(f"{safe_text(snap.label)}: no BITS received yet, the disk size is unknown.")
            return text
        width = max(1, self.size.width)
        rows = max(1, self.size.height - 1)
        cells = _resample(snap.cells, width * rows, width)
        per = snap.sectors_per_cell * len(snap.cells) / max(1, len(cells))
        disk = summary["end_sector"] * 512
        text.append(f"{safe_text(snap.label)} {_size(disk)}, {_size(int(per * 512))}/cell ",
                    style="bold")
        for key, label in (("d", "dirty"), ("c", "clean"), ("m", "missing")):
            glyph, style = MAP_GLYPHS[key]
            text.append(glyph, style=style)
            text.append(f" {label} ")
        for line_start in range(0, len(cells), width):
            text.append("\n")
            # One span per run of equal cells keeps a full map at a few hundred spans.
            for run in re.finditer(r"d+|c+|m+", cells[line_start : line_start + width]):
                glyph, style = MAP_GLYPHS[run.group()[0]]
                text.append(glyph * len(run.group()), style=style)
        return text


def _size(value: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def _resample(cells: str, budget: int, width: int) -> str:
    """Fit the map to the widget: merge cells when there are too many (dirty wins,
    then missing), repeat them when a small disk would fill only part of a line."""
    if not cells:
        return ""
    if len(cells) > budget:
        return _downsample(cells, budget)
    repeat = max(1, width // len(cells)) if len(cells) < width else 1
    return "".join(cell * repeat for cell in cells)


def _downsample(cells: str, budget: int) -> str:
    if len(cells) <= budget:
        return cells
    out = []
    for index in range(budget):
        lo = index * len(cells) // budget
        hi = max(lo + 1, (index + 1) * len(cells) // budget)
        part = cells[lo:hi]
        out.append("d" if "d" in part else "m" if "m" in part else "c")
    return "".join(out)


class StatusLine(Static):
    DEFAULT_CSS = """
    StatusLine { height: 1; background: $boost; }
    """
