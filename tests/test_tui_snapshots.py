"""Snapshots of the TUI's main screens on a real QEMU capture (pytest-textual-snapshot).

The capture is small (postcopy, one node, three bitmaps) so the screens are
stable: nothing shown depends on the clock, the path or the run.
Update with `pytest tests/test_tui_snapshots.py --snapshot-update` after a
deliberate change, and look at the SVGs before committing them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Input

from migshark.tui.app import MigsharkApp
from migshark.tui.widgets import RecordList
from testkit.paths import CAPTURES
from testkit.require import require

CAPTURE = CAPTURES / "real" / "postcopy-1node.pcap"


@pytest.fixture
def app() -> MigsharkApp:
    require(CAPTURE.exists(), f"{CAPTURE} is missing (make it with testkit/realqemu)")
    return MigsharkApp.for_path(Path(CAPTURE))


def prepare(then: Callable[[MigsharkApp, Pilot[Any]], Any] | None = None):  # noqa: ANN201
    async def run_before(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app, MigsharkApp)
        await app.wait_loaded()
        # A blinking cursor would make the picture depend on the moment it is taken.
        for box in app.main.query(Input):
            box.cursor_blink = False
        await pilot.pause()
        if then is not None:
            result = then(app, pilot)
            if result is not None:
                await result
        await pilot.pause()
    return run_before


async def select_a_start(app: MigsharkApp, pilot: Pilot[Any]) -> None:
    # Setup records: their capture times do not depend on how segments are batched.
    row = next(i for i, r in enumerate(app.store.records)
               if r.kind == "bitmap-start" and r.bitmap == "one-64k")
    app.main.query_one(RecordList).select_row(row)


def test_main_screen(snap_compare: Any, app: MigsharkApp) -> None:
    assert snap_compare(app, terminal_size=(100, 30), run_before=prepare(select_a_start))


def test_main_screen_80x24(snap_compare: Any, app: MigsharkApp) -> None:
    assert snap_compare(app, terminal_size=(80, 24), run_before=prepare())


def test_bitmaps_screen(snap_compare: Any, app: MigsharkApp) -> None:
    assert snap_compare(app, terminal_size=(100, 30), press=["b", "down", "down"],
                        run_before=prepare())


def test_findings_screen(snap_compare: Any, app: MigsharkApp) -> None:
    assert snap_compare(app, terminal_size=(100, 30), press=["e"], run_before=prepare())


def test_invalid_filter(snap_compare: Any, app: MigsharkApp) -> None:
    assert snap_compare(app, terminal_size=(100, 30),
                        press=["slash", "k", "i", "n", "d", "space", "=", "="],
                        run_before=prepare())


def test_filtered(snap_compare: Any, app: MigsharkApp) -> None:
    def filter_starts(app: MigsharkApp, pilot: Pilot[Any]) -> None:
        app.set_filter("kind == start and offset < 1000")

    assert snap_compare(app, terminal_size=(100, 30), run_before=prepare(filter_starts))


def test_help_screen(snap_compare: Any, app: MigsharkApp) -> None:
    assert snap_compare(app, terminal_size=(100, 30), press=["question_mark"],
                        run_before=prepare())
