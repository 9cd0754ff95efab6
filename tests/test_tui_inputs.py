"""Every generated fault capture goes through the TUI's data path without an exception,
and one of them through every view of the real app."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from textual.widgets import DataTable, Tree

from migshark.dissectors.registry import describe
from migshark.tui.app import BitmapsScreen, FindingsScreen, MigsharkApp
from migshark.tui.fields import ByteSource
from migshark.tui.model import Batch, FileSource, Store
from migshark.tui.widgets import DiskMap, RecordList, _resample, format_row, record_style
from testkit.paths import CAPTURES

GENERATED = sorted(p for p in (CAPTURES / "generated").glob("*")
                   if p.suffix in (".bin", ".pcap", ".pcapng"))


@pytest.mark.parametrize("capture", GENERATED, ids=[p.name for p in GENERATED])
def test_fault_capture_through_the_data_path(capture: Path) -> None:
    store = Store()
    batches: list[Batch] = []
    analysis = FileSource(capture, in_process=True).decode(batches.append, threading.Event())
    for batch in batches:
        for stream, event in batch.events:
            store.add(stream, event)
    found = analysis["input_findings"] + [f for m in analysis["migrations"] for f in m["findings"]]
    assert found == [] or store.findings
    raw = ByteSource(capture if capture.suffix == ".bin" else None)
    for row, record in enumerate(store.records):
        for view in describe(record):
            assert record.offset <= view.offset <= record.end
            assert view.offset + view.length <= max(record.end, record.offset)
            assert isinstance(view.text, str)
        data, _ = raw.record_bytes(record)
        assert len(data) <= record.length
        assert format_row(row + 1, record, store.first_time)
        record_style(record, store.severity.get(row))
    for stream, finding in store.findings:
        row = store.row_for_finding(stream, finding)
        assert row is None or 0 <= row < len(store.records)
    final = [b for b in batches if b.bitmaps is not None][-1].bitmaps or []
    for snap in final:
        assert set(_resample(snap.cells, 80 * 10, 80)) <= {"d", "c", "m"}


def test_a_damaged_capture_through_every_view() -> None:
    capture = CAPTURES / "generated" / "gap.pcap"
    if not capture.exists():
        pytest.skip(f"{capture} not generated")

    async def main() -> None:
        app = MigsharkApp.for_path(capture)
        async with app.run_test(size=(80, 24)) as pilot:
            await app.wait_loaded()
            await pilot.pause()
            assert app.error is None and len(app.store) > 0
            await pilot.press("e")
            screen = app.screen
            assert isinstance(screen, FindingsScreen)
            groups = [str(node.label) for node in screen.query_one(Tree).root.children]
            assert groups[0].startswith("error")
            await pilot.press("enter")
            listing = app.main.query_one(RecordList)
            assert listing.selected_row() is not None
            await pilot.press("b")
            assert isinstance(app.screen, BitmapsScreen)
            app.screen.query_one(DataTable)
            app.screen.query_one(DiskMap).render()
            await pilot.press("escape", "end", "up", "pageup")
            app.set_filter("severity >= error")
            assert listing.row_count >= 1

    asyncio.run(main())
