"""Pilot tests of the TUI: every view and binding, on a stream built through the grammar."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, ProgressBar, Static, Tree

from migshark.analyzer.analysis import AnalysisOptions, AnalysisResult, analyze_path
from migshark.analyzer.bitmaps import BitmapTracker
from migshark.analyzer.cli import build_parser
from migshark.analyzer.records import Finding, Record, Severity
from migshark.analyzer.report import analysis_json, format_event_line
from migshark.dissectors.registry import describe, field_value
from migshark.tui.app import BitmapsScreen, FindingsScreen, HelpScreen, MigsharkApp, default_capture
from migshark.tui.demo import build_demo_stream, write_demo_stream
from migshark.tui.fields import rebuild_bytes
from migshark.tui.model import Batch, Batcher, Deliver, Store, snapshot_tracker
from migshark.tui.widgets import DiskMap, HexView, RecordList

Scenario = Callable[[MigsharkApp, Pilot[None]], Awaitable[None]]


def drive(app: MigsharkApp, scenario: Scenario, size: tuple[int, int] = (100, 30)) -> None:
    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            if app.source is not None:
                await app.wait_loaded()
            await pilot.pause()
            await scenario(app, pilot)

    asyncio.run(main())


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    return write_demo_stream(tmp_path / "demo.bin")


def expected_records(path: Path) -> tuple[list[Record], list[Finding], AnalysisResult]:
    records: list[Record] = []
    found: list[Finding] = []

    def sink(stream: Any, event: Any) -> None:
        (records if isinstance(event, Record) else found).append(event)

    result = analyze_path(path, AnalysisOptions(keep_buffers=True), sink)
    return records, found, result


def records_list(app: MigsharkApp) -> RecordList:
    return app.main.query_one(RecordList)


def shown_kinds(app: MigsharkApp) -> list[str]:
    listing = records_list(app)
    return [app.store.records[listing.store_row(i)].kind for i in range(listing.row_count)]


async def type_text(pilot: Pilot[None], text: str) -> None:
    await pilot.press(*[{" ": "space"}.get(ch, ch) for ch in text])


def test_loads_every_record_and_selects_the_first(demo: Path) -> None:
    records, _, _ = expected_records(demo)

    async def scenario(app: MigsharkApp, pilot: Pilot[None]) -> None:
        assert [r.kind for r in app.store.records] == [r.kind for r in records]
        assert [r.offset for r in app.store.records] == [r.offset for r in records]
        listing = records_list(app)
        assert listing.row_count == len(records) and listing.selected_row() == 0
        status = str(app.main.query_one("#status", Static).render())
        assert f"{len(records)} records" in status and "2 findings" in status
        assert not app.main.query_one(ProgressBar).display
        tree = app.main.query_one("#detail", Tree)
        assert "Record 1: file-header" in str(tree.root.label)
        hex_view = app.main.query_one(HexView)
        assert hex_view.data == b"QEVM\x00\x00\x00\x03"
        assert hex_view.highlight == (0, 8)

    drive(MigsharkApp.for_path(demo), scenario)


def test_cursor_keys_and_mouse_move_the_selection(demo: Path) -> None:
    async def scenario(app: MigsharkApp, pilot: Pilot[None]) -> None:
        listing = records_list(app)
        await pilot.press("down", "down")
        assert listing.selected_row() == 2
        assert "Record 3: command" in str(app.main.query_one("#detail", Tree).root.label)
        await pilot.press("end")
        assert listing.selected_row() == len(app.store) - 1
        assert app.store.records[listing.selected_row()].kind == "eof"
        await pilot.press("home", "pagedown")
        assert listing.selected_row() == listing.size.height - 1
        await pilot.press("up")
        assert listing.selected_row() == listing.size.height - 2
        await pilot.click(RecordList, offset=(5, 4))
        assert listing.selected_row() == listing.scroll_offset.y + 4
        await pilot.press("g", "j", "j", "k")
        assert listing.selected_row() == 1
        await pilot.press("G")
        assert listing.selected_row() == len(app.store) - 1
        await pilot.press("slash")
        assert app.main.query_one("#filter", Input).has_focus
        await pilot.press("escape")
        assert listing.has_focus

    drive(MigsharkApp.for_path(demo), scenario)


def test_detail_tree_gives_byte_ranges_and_hex_highlights_the_field(demo: Path) -> None:
    async def scenario(app: MigsharkApp, pilot: Pilot[None]) -> None:
        row = next(i for i, r in enumerate(app.store.records)
                   if r.kind == "bitmap-bits" and "buffer_size" in r.fields)
        record = app.store.records[row]
        assert records_list(app).select_row(row)
        await pilot.pause()
        hex_view = app.main.query_one(HexView)
        demo_bytes = demo.read_bytes()
        assert hex_view.data == demo_bytes[record.offset:record.end]
        tree = app.main.query_one("#detail", Tree)
        labels = {str(node.label).split(":")[0]: node for node in tree.root.children[1].children}
        # The registry's labels, each field once.
        assert {"Flags", "Node", "Bitmap", "Start sector", "Sectors", "Buffer size",
                "Buffer"} <= set(labels)
        buffer = labels["Buffer"]
        start, length = buffer.data
        if record.spans is None:
            # No byte ranges from the decoder: the tree says so, fields cover the record.
            assert "(no byte ranges)" in str(tree.root.children[1].label)
            assert (start, length) == (record.offset, record.length)
        else:
            assert start + length == record.end and length == record.fields["buffer_size"]
        tree.focus()
        tree.move_cursor(buffer)
        await pilot.pause()
        assert hex_view.highlight == (start, start + length)
        # A large RAM run: the hex pane is virtual too, 16 bytes a line.
        ram = next(i for i, r in enumerate(app.store.records) if r.kind == "ram-pages")
        assert records_list(app).select_row(ram)
        await pilot.pause()
        size = app.store.records[ram].length
        assert hex_view.data == demo_bytes[app.store.records[ram].offset:][:size]
        assert hex_view.virtual_size.height == 1 + -(-size // 16)

    drive(MigsharkApp.for_path(demo), scenario)


def test_described_fields_tile_records_and_rebuild_matches_the_wire(demo: Path) -> None:
    records, _, _ = expected_records(demo)
    data = demo.read_bytes()
    checked = 0
    for record in records:
        if record.kind.startswith(("bitmap-", "section-", "footer", "file-header", "eof",
                                   "ram-mem-size", "ram-eos")):
            views = describe(record)
            assert all(field_value(record, v.info) == v.value for v in views
                       if not v.generated and not v.info.bitmask and not v.name), record.kind
            if record.spans is not None:
                # With the decoder's spans the wire fields tile the record exactly.
                placed = [v for v in views if v.exact and not v.info.bitmask]
                position = record.offset
                for view in placed:
                    assert view.offset == position, (record.kind, view)
                    position += view.length
                assert position == record.end, record.kind
            else:
                assert all((v.offset, v.length) == (record.offset, record.length)
                           for v in views), record.kind
            if not record.kind.startswith("ram-"):
                assert rebuild_bytes(record) == data[record.offset:record.end], record.kind
            checked += 1
    assert checked > 25


def test_filter_as_you_type_and_apply(demo: Path) -> None:
    async def scenario(app: MigsharkApp, pilot: Pilot[None]) -> None:
        box = app.main.query_one("#filter", Input)
        error = app.main.query_one("#filter-error", Static)
        await pilot.press("slash")
        assert box.has_focus
        box.value = 'bitmap == "inc0" and kind'
        await type_text(pilot, " ==")
        assert box.has_class("-invalid") and error.has_class("-shown")
        assert "value expected" in str(error.render())
        await pilot.press("enter")  # an invalid filter is refused, the list unchanged
        assert records_list(app).row_count == len(app.store)
        await type_text(pilot, " BITS")
        assert box.has_class("-valid") and error.has_class("-hint")
        assert "Enter applies" in str(error.render())
        await pilot.press("enter")
        assert shown_kinds(app) == ["bitmap-bits"] * 4
        assert all(app.store.records[records_list(app).store_row(i)].bitmap == "inc0"
                   for i in range(4))
        assert records_list(app).has_focus and not error.has_class("-shown")
        status = str(app.main.query_one("#status", Static).render())
        assert f"4/{len(app.store)} records" in status
        app.set_filter("severity >= warning")
        assert shown_kinds(app) == ["bitmap-complete", "bitmap-complete"]
        app.set_filter("section == ram and kind == ram-pages")
        assert shown_kinds(app) == ["ram-pages"]
        app.set_filter("")
        assert records_list(app).row_count == len(app.store)

    drive(MigsharkApp.for_path(demo), scenario)


def test_bitmaps_view_table_map_and_filter_to_one(demo: Path) -> None:
    _, _, result = expected_records(demo)
    truth = {(b["node"], b["name"]): b for b in result.migrations[0].tracker.results()}

    async def scenario(app: MigsharkApp, pilot: Pilot[None]) -> None:
        await pilot.press("b")
        screen = app.screen
        assert isinstance(screen, BitmapsScreen)
        table = screen.query_one(DataTable)
        assert table.row_count == 3
        rows = [[str(cell) for cell in table.get_row_at(i)] for i in range(3)]
        for row in rows:
            expected = truth[(row[0], row[1])]
            assert row[-1] == (expected["sha256"] or "-")
            assert row[3] == ("E" if expected["enabled"] else "-") + (
                "P" if expected["persistent"] else "-")
        disk_map = screen.query_one(DiskMap)
        assert disk_map.snapshot is not None and disk_map.snapshot.label == "drive0/inc0"
        cells = disk_map.snapshot.cells
        assert set(cells) == {"d", "c"}  # runs of dirty granules, all received
        await pilot.click(DataTable, offset=(2, 3))  # a click shows that bitmap's map
        assert isinstance(app.screen, BitmapsScreen)
        assert disk_map.snapshot is not None and disk_map.snapshot.label == "drive1/sync"
        await pilot.press("up")
        inc1 = disk_map.snapshot
        assert inc1 is not None and inc1.label == "drive0/inc1"
        # inc1 never got its second chunk: that quarter of the disk is "not received".
        assert inc1.cells.count("m") == len(inc1.cells) // 4
        rendered = str(disk_map.render())
        assert "missing" in rendered and "·" in rendered
        await pilot.press("enter")
        assert not isinstance(app.screen, BitmapsScreen)
        assert app.filter_text == 'node == "drive0" and bitmap == "inc1"'
        assert shown_kinds(app) == ["bitmap-start", "bitmap-bits", "bitmap-bits",
                                    "bitmap-complete"]
        await pilot.press("b")
        await pilot.press("escape")
        assert not isinstance(app.screen, BitmapsScreen)

    drive(MigsharkApp.for_path(demo), scenario)


def test_findings_view_groups_and_jumps_to_the_record(demo: Path) -> None:
    async def scenario(app: MigsharkApp, pilot: Pilot[None]) -> None:
        app.set_filter("kind == ram-pages")
        await pilot.press("e")
        screen = app.screen
        assert isinstance(screen, FindingsScreen)
        tree = screen.query_one(Tree)
        groups = [str(node.label) for node in tree.root.children]
        assert groups == ["warning (2)", "phases (3)"]
        first = tree.root.children[0].children[0].data
        assert first is not None and first[1].code == "coverage-gap"
        await pilot.press("enter")
        assert not isinstance(app.screen, FindingsScreen)
        row = records_list(app).selected_row()
        assert row is not None
        record = app.store.records[row]
        # The record holding the finding was filtered out: the filter gives way.
        assert record.kind == "bitmap-complete" and record.bitmap == "inc1"
        assert record.offset <= first[1].offset < record.end
        assert app.filter_text == ""
        await pilot.press("e", "down", "enter")
        record = app.store.records[records_list(app).selected_row() or 0]
        assert record.bitmap == "sync" and record.fields["flags_width"] == 2
        await pilot.press("e", "escape")
        assert not isinstance(app.screen, FindingsScreen)

    drive(MigsharkApp.for_path(demo), scenario)


def test_findings_view_says_when_there_are_none(tmp_path: Path) -> None:
    clean = tmp_path / "clean.bin"
    clean.write_bytes(build_demo_stream(clean=True))

    async def scenario(app: MigsharkApp, pilot: Pilot[None]) -> None:
        await pilot.press("e")
        assert isinstance(app.screen, FindingsScreen)
        assert str(app.screen.query_one("#no-findings", Static).render()) == "No findings."

    drive(MigsharkApp.for_path(clean), scenario)


def test_help_screen_opens_and_closes(demo: Path) -> None:
    async def scenario(app: MigsharkApp, pilot: Pilot[None]) -> None:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        assert "Display filter" in str(app.screen.query_one("#help", Static).render())
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)

    drive(MigsharkApp.for_path(demo), scenario)


def test_exports_json_and_filtered_text(demo: Path, tmp_path: Path) -> None:
    _, _, result = expected_records(demo)
    out = tmp_path / "out"
    out.mkdir()

    async def scenario(app: MigsharkApp, pilot: Pilot[None]) -> None:
        await pilot.press("x")
        exported = json.loads((out / "demo.bin.migshark.json").read_text())
        assert exported == json.loads(json.dumps(analysis_json(result)))
        app.set_filter('kind == BITS and node == "drive1"')
        await pilot.press("t")
        lines = (out / "demo.bin.records.txt").read_text().splitlines()
        assert lines[0] == '# filter: kind == BITS and node == "drive1"'
        listing = records_list(app)
        expected = [format_event_line(listing.store_row(i) + 1,
                                      app.store.records[listing.store_row(i)])
                    for i in range(listing.row_count)]
        assert lines[1:] == expected and len(expected) == 4

    drive(MigsharkApp.for_path(demo, export_dir=out), scenario)


def test_quit_key_exits(demo: Path) -> None:
    async def scenario(app: MigsharkApp, pilot: Pilot[None]) -> None:
        await pilot.press("q")
        await pilot.pause()
        assert app._exit  # noqa: SLF001 - the only public sign is the app ending

    drive(MigsharkApp.for_path(demo), scenario)


def test_unreadable_input_is_reported_not_raised(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a capture at all" * 10)

    async def scenario(app: MigsharkApp, pilot: Pilot[None]) -> None:
        assert app.error and "neither a pcap" in app.error
        assert "ERROR: " in str(app.main.query_one("#status", Static).render())
        await pilot.press("x", "b", "e", "escape")  # nothing to show, nothing breaks

    drive(MigsharkApp.for_path(junk), scenario)


class SteppedSource:
    """A source that stops halfway until the test lets it go on."""

    name = "stepped"

    def __init__(self, events: list[tuple[str, Any]]) -> None:
        self.events = events
        self.release = threading.Event()
        self.halfway = threading.Event()

    def run(self, deliver: Deliver, stop: threading.Event) -> dict[str, Any] | None:
        tracker = BitmapTracker()
        half = len(self.events) // 2

        def batch(events: list[tuple[str, Any]], progress: float) -> Batch:
            for _, event in events:
                tracker.consume(event)
            return Batch(events, snapshot_tracker("s", tracker), progress)

        deliver(batch(self.events[:half], 0.5))
        self.halfway.set()
        while not self.release.wait(0.05):
            if stop.is_set():
                return None
        deliver(batch(self.events[half:], 1.0))
        return None


def test_usable_while_loading_with_progress(demo: Path) -> None:
    records, _, _ = expected_records(demo)
    events: list[tuple[str, Any]] = []
    analyze_path(demo, AnalysisOptions(), lambda stream, event: events.append(("s", event)))
    source = SteppedSource(events)

    async def main() -> None:
        app = MigsharkApp(source)
        async with app.run_test(size=(80, 24)) as pilot:
            while not source.halfway.is_set() or not app.store.records:
                await pilot.pause(0.02)
            await pilot.pause()
            bar = app.main.query_one(ProgressBar)
            assert bar.display and bar.progress == 0.5
            assert "loading" in str(app.main.query_one("#status", Static).render())
            await pilot.press("down", "e")
            assert isinstance(app.screen, FindingsScreen)
            # The demo's findings are in its second half.
            assert app.screen.query_one("#no-findings").display
            await pilot.press("escape", "b")
            screen = app.screen
            assert isinstance(screen, BitmapsScreen)
            disk_map = screen.query_one(DiskMap)
            assert disk_map.snapshot is not None and not disk_map.snapshot.cells
            assert "no BITS received yet" in str(disk_map.render())
            source.release.set()
            await app.wait_loaded()
            # The open bitmaps view follows the stream: the map fills in.
            for _ in range(100):
                if disk_map.snapshot is not None and disk_map.snapshot.cells:
                    break
                await pilot.pause(0.05)
            assert disk_map.snapshot is not None and "d" in disk_map.snapshot.cells
            assert str(screen.query_one(DataTable).get_row_at(0)[7]) == "reconstructed"
            await pilot.press("escape", "e")
            groups = [str(node.label) for node in app.screen.query_one(Tree).root.children]
            assert groups[0] == "warning (2)"
            await pilot.press("escape")
            assert len(app.store) == len(records) and not bar.display

    asyncio.run(main())


def test_live_push_follow_and_pause(demo: Path) -> None:
    records, _, _ = expected_records(demo)

    async def main() -> None:
        app = MigsharkApp(None, title="live")
        async with app.run_test(size=(80, 24)) as pilot:
            listing = records_list(app)
            app.push_events("s", records[:10])
            await pilot.pause()
            assert len(app.store) == 10 and listing.selected_row() == 0
            await pilot.press("f")
            assert listing.follow and listing.selected_row() == 9
            app.push_events("s", records[10:20])
            await pilot.pause()
            assert listing.selected_row() == 19
            await pilot.press("space")
            assert "PAUSED" in str(app.main.query_one("#status", Static).render())
            app.push_events("s", records[20:30])
            await pilot.pause()
            assert len(app.store) == 20
            await pilot.press("space")
            assert len(app.store) == 30 and listing.selected_row() == 29
            await pilot.press("up")  # moving by hand stops following
            assert not listing.follow and listing.selected_row() == 28

    asyncio.run(main())


def test_a_million_rows_render_only_what_is_visible() -> None:
    store = Store()
    record = Record(offset=0, length=9, kind="bitmap-bits", section="dirty-bitmap",
                    node="drive0", bitmap="inc0", fields={"first_sector": 0})
    store.records = [record] * 1_000_000
    store.record_stream = ["s"] * 1_000_000
    store.severity[999_999] = Severity.ERROR

    async def main() -> None:
        app = MigsharkApp(None)
        async with app.run_test(size=(80, 24)) as pilot:
            listing = records_list(app)
            listing.store = store
            app.store = store
            listing.rows_added([])
            await pilot.pause()
            calls: list[int] = []
            original = listing.render_line

            def counting(y: int) -> Any:
                calls.append(y)
                return original(y)

            listing.render_line = counting  # type: ignore[method-assign]
            await pilot.press("end")
            await pilot.pause()
            assert listing.selected_row() == 999_999
            assert listing.scroll_offset.y == 1_000_000 - listing.size.height
            assert 0 < len(calls) <= 4 * listing.size.height
            assert len(app.main.query("*")) < 60  # no widget per row
            # Filtering a million rows happens in a thread; the keys keep working.
            app.set_filter("severity >= error")
            assert app.filtering
            await pilot.press("question_mark", "escape")
            for _ in range(600):
                if not app.filtering:
                    break
                await pilot.pause(0.05)
            assert not app.filtering and listing.row_count == 1
            assert listing.selected_row() == 999_999

    asyncio.run(main())


def test_works_at_80x24(demo: Path) -> None:
    async def scenario(app: MigsharkApp, pilot: Pilot[None]) -> None:
        for selector in ("#status", "#filter", "#columns", "#records", "#detail", "#hex-pane"):
            region = app.main.query_one(selector).region
            assert region.height >= 1 and region.width > 0, selector
        assert records_list(app).size.height >= 4

    drive(MigsharkApp.for_path(demo), scenario, size=(80, 24))


def test_cli_has_a_tui_command_and_a_default_capture() -> None:
    args = build_parser().parse_args(["tui", "--port", "4444"])
    assert args.path is None and args.port == 4444
    capture = default_capture()
    assert capture is None or capture.exists()


class CaptureReplaySource:
    """What a live capture does: frames one by one through CaptureDemux, a Batcher as sink."""

    name = "replay"

    def __init__(self, path: Path) -> None:
        self.path = path

    def run(self, deliver: Deliver, stop: threading.Event) -> dict[str, Any] | None:
        from migshark.analyzer.analysis import CaptureDemux
        from migshark.analyzer.capture import CaptureReader, parse_frame
        from migshark.tui.model import Batcher

        batcher = Batcher(deliver, stop)
        demux = CaptureDemux(AnalysisOptions(keep_buffers=True), batcher)
        reader = CaptureReader(str(self.path))
        for frame in reader:
            segment = parse_frame(frame.linktype, frame.data, frame.timestamp)
            if segment is not None:
                demux.segment(segment)
            batcher.flush_if_due()
        demux.finish()
        reader.close()
        batcher.flush(final=True)
        return None


def test_a_live_style_source_shows_what_the_file_shows() -> None:
    from testkit.paths import CAPTURES
    from testkit.require import require

    capture = CAPTURES / "real" / "postcopy-1node.pcap"
    require(capture.exists(), f"{capture} is missing")
    records, _, result = expected_records(capture)

    async def scenario(app: MigsharkApp, pilot: Pilot[None]) -> None:
        assert [(r.offset, r.kind) for r in app.store.records] == [
            (r.offset, r.kind) for r in records]
        shas = {(s.summary["node"], s.summary["name"]): s.summary["sha256"]
                for s in app.store.bitmaps}
        assert shas == {(b["node"], b["name"]): b["sha256"]
                        for b in result.as_json()["bitmaps"]}
        await pilot.press("x")  # a live source has no analysis JSON: a warning, no file
        assert app.analysis is None

    drive(MigsharkApp(CaptureReplaySource(capture)), scenario)


def test_batcher_hands_over_pending_events_when_due() -> None:
    delivered: list[Batch] = []
    batcher = Batcher(delivered.append, threading.Event())
    record = Record(offset=0, length=8, kind="file-header")

    class FakeStream:
        name = "s"
        tracker = BitmapTracker()

    batcher(FakeStream(), record)  # type: ignore[arg-type]
    batcher.flush_if_due()
    assert delivered == [] or delivered[0].events == [("s", record)]
    batcher.last_flush -= 1.0  # as if the live capture had been quiet for a second
    batcher.flush_if_due()
    assert [event for batch in delivered for event in batch.events] == [("s", record)]
    batcher.flush_if_due()  # nothing pending: no empty batches
    assert len(delivered) == 1


def test_the_analyzer_does_not_load_the_tui() -> None:
    import subprocess
    import sys

    code = ("import sys, migshark.analyzer.cli, migshark.analyzer.analysis; "
            "print(sorted(m for m in sys.modules if m.startswith(('migshark.tui', 'textual'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"


def test_names_that_look_like_markup_are_shown_as_they_are(tmp_path: Path) -> None:
    from migshark.dissectors import grammar as g

    node, name = "[/red]", "[bold]x[/]"
    stream = b"".join([
        g.build_file_header(),
        g.build_section_start(g.ItemType.SECTION_START, 1, g.DIRTY_BITMAP_SECTION_IDSTR, 0, 1),
        g.bitmap_record(g.BitmapFlag.START, device_name=node, bitmap_name=name,
                        granularity=65536, bitmap_flags=1),
        g.bitmap_record(g.BitmapFlag.EOS),
        g.build_footer(1),
        g.build_eof(),
    ])
    path = tmp_path / "[red]odd.bin"
    path.write_bytes(stream)

    async def scenario(app: MigsharkApp, pilot: Pilot[None]) -> None:
        row = next(i for i, r in enumerate(app.store.records) if r.kind == "bitmap-start")
        assert records_list(app).select_row(row)
        await pilot.pause()
        labels = [str(n.label) for n in app.main.query_one("#detail", Tree).root.children[1]
                  .children]
        record = app.store.records[row]
        shown = f"Node: {node}"
        if record.spans is not None:
            shown += f"  [0x{record.offset + 1:x}+7]"
        assert shown in labels
        assert "[red]odd.bin" in str(app.main.query_one("#status", Static).render())
        await pilot.press("e")  # incomplete-bitmap names the bitmap in its message
        assert any(name in str(leaf.label) for group in app.screen.query_one(Tree).root.children
                   for leaf in group.children)
        await pilot.press("escape", "b")
        assert [str(c) for c in app.screen.query_one(DataTable).get_row_at(0)][:2] == [node, name]
        await pilot.press("escape")
        app.main.query_one("#filter", Input).value = 'kind == BITS "[/red]"'
        await pilot.pause()
        assert "[/red]" in str(app.main.query_one("#filter-error", Static).render())

    drive(MigsharkApp.for_path(path), scenario)


def test_undecodable_and_control_bytes_in_names_never_reach_the_terminal(tmp_path: Path
                                                                         ) -> None:
    from migshark.dissectors import grammar as g
    from migshark.tui.widgets import safe_text

    node = b"dr\xff\x1b[2J".decode("utf-8", "surrogateescape")
    assert safe_text(node) == "dr\\xff\\x1b[2J"
    stream = b"".join([
        g.build_file_header(),
        g.build_section_start(g.ItemType.SECTION_START, 1, g.DIRTY_BITMAP_SECTION_IDSTR, 0, 1),
        g.bitmap_record(g.BitmapFlag.START, device_name=node, bitmap_name="b",
                        granularity=65536, bitmap_flags=1),
        g.bitmap_record(g.BitmapFlag.EOS), g.build_footer(1), g.build_eof(),
    ])
    path = write_bytes(tmp_path / "odd.bin", stream)

    async def scenario(app: MigsharkApp, pilot: Pilot[None]) -> None:
        row = next(i for i, r in enumerate(app.store.records) if r.kind == "bitmap-start")
        assert records_list(app).select_row(row)
        await pilot.pause()
        await pilot.press("b")
        await pilot.pause()
        screenshot = app.export_screenshot()
        assert "\x1b[2J" not in screenshot and "\udcff" not in screenshot
        assert "dr\\xff\\x1b[2J" in screenshot
        await pilot.press("escape", "e")
        await pilot.pause()
        assert "\x1b[2J" not in app.export_screenshot()

    drive(MigsharkApp.for_path(path), scenario)


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
