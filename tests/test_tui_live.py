"""`migshark live --tui`: a real migration sniffed on lo appears in the app."""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tools
from tui.app import MigsharkApp
from tui.live import LiveSource


def _live_args(port: int) -> argparse.Namespace:
    return argparse.Namespace(iface="lo", port=port, bpf=None, json=False, once=True,
                              write=None, tui=True)


@pytest.mark.qemu
def test_live_tui_shows_a_real_migration(tmp_path: Path) -> None:
    require_root()
    require_tools("qemu-system-x86_64", "qemu-img", "tcpdump")
    from tests.realqemu.harness import PRESETS, run_migration

    apps: list[MigsharkApp] = []
    started = threading.Event()
    outcome: dict = {}

    def via(dest_uri: str) -> str:
        source = LiveSource(_live_args(int(dest_uri.rsplit(":", 1)[1])))
        assert source.open() is None
        # The socket is open: frames queue in the kernel until the app's worker reads.
        apps.append(MigsharkApp(source, title=source.name))
        started.set()
        return dest_uri

    def migrate() -> None:
        try:
            outcome["result"] = run_migration(PRESETS["precopy"], tmp_path, capture=False,
                                              timeout=30, via=via)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = error
            started.set()

    thread = threading.Thread(target=migrate, daemon=True)
    thread.start()
    assert started.wait(30), "the migration never reached the destination URI"
    assert "error" not in outcome, outcome.get("error")
    app = apps[0]

    async def main() -> None:
        async with app.run_test(size=(100, 30)) as pilot:
            deadline = time.monotonic() + 60
            while not app.loaded.is_set() and time.monotonic() < deadline:
                await pilot.pause(0.1)
            await pilot.pause()

    asyncio.run(main())
    thread.join(60)
    assert "error" not in outcome, outcome.get("error")
    truth = {(b["node"], b["name"]): b for b in outcome["result"].ground_truth["bitmaps"]}
    shown = {(s.summary["node"], s.summary["name"]): s.summary for s in app.store.bitmaps}
    assert set(shown) == set(truth)
    for key, bitmap in truth.items():
        assert shown[key]["sha256"] == bitmap["sha256"]
        assert shown[key]["dirty_bytes"] == bitmap["dirty_bytes"]
    assert app.analysis is not None and app.analysis["format"] == "live"
    kinds = {record.kind for record in app.store.records}
    assert {"bitmap-start", "bitmap-bits", "bitmap-complete"} <= kinds


def test_live_tui_option_reaches_the_tui_source(capsys: pytest.CaptureFixture[str]) -> None:
    require_root()
    from analyzer import cli

    # A bad interface fails in LiveSource.open(), before any terminal is taken over.
    assert cli.main(["live", "--tui", "-i", "no-such-if0"]) == 2
    err = capsys.readouterr().err
    assert "no-such-if0" in err and "Traceback" not in err
