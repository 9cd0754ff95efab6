"""`migshark live --tui` and `proxy --tui`: a real migration appears in the app."""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from pathlib import Path

import pytest

from migshark.tui.app import MigsharkApp
from migshark.tui.live import LiveSource
from migshark.tui.proxy import ProxySource
from testkit.require import require_root, require_tools


def _live_args(port: int) -> argparse.Namespace:
    return argparse.Namespace(iface="lo", port=port, bpf=None, json=False, once=True,
                              write=None, tui=True)


def _migrate_into_app(tmp_path: Path, make_source) -> tuple[MigsharkApp, dict]:
    """Run a real precopy migration whose destination URI `make_source` wraps in an
    EventSource; drive the app on that source until the source is done."""
    require_tools("qemu-system-x86_64", "qemu-img", "tcpdump")
    from testkit.realqemu.harness import PRESETS, run_migration

    apps: list[MigsharkApp] = []
    started = threading.Event()
    outcome: dict = {}

    def via(dest_uri: str) -> str:
        source, uri = make_source(dest_uri)
        # The socket is open: bytes wait in the kernel until the app's worker reads.
        apps.append(MigsharkApp(source, title=source.name))
        started.set()
        return uri

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
    return app, outcome["result"].ground_truth


def _assert_app_shows_truth(app: MigsharkApp, truth: dict, fmt: str) -> None:
    expected = {(b["node"], b["name"]): b for b in truth["bitmaps"]}
    shown = {(s.summary["node"], s.summary["name"]): s.summary for s in app.store.bitmaps}
    assert set(shown) == set(expected)
    for key, bitmap in expected.items():
        assert shown[key]["sha256"] == bitmap["sha256"]
        assert shown[key]["dirty_bytes"] == bitmap["dirty_bytes"]
    assert app.analysis is not None and app.analysis["format"] == fmt
    kinds = {record.kind for record in app.store.records}
    assert {"bitmap-start", "bitmap-bits", "bitmap-complete"} <= kinds


@pytest.mark.qemu
def test_live_tui_shows_a_real_migration(tmp_path: Path) -> None:
    require_root()

    def sniff(dest_uri: str) -> tuple[LiveSource, str]:
        source = LiveSource(_live_args(int(dest_uri.rsplit(":", 1)[1])))
        assert source.open() is None
        return source, dest_uri

    app, truth = _migrate_into_app(tmp_path, sniff)
    _assert_app_shows_truth(app, truth, "live")


@pytest.mark.qemu
def test_proxy_tui_shows_a_real_migration(tmp_path: Path) -> None:
    def forward(dest_uri: str) -> tuple[ProxySource, str]:
        args = argparse.Namespace(listen="tcp:127.0.0.1:0", to=dest_uri, once=True,
                                  json=False, tui=True)
        source = ProxySource(args)
        assert source.open() is None
        assert source.proxy is not None
        return source, str(source.proxy.bound)

    app, truth = _migrate_into_app(tmp_path, forward)
    _assert_app_shows_truth(app, truth, "proxy")
    # The destination got every byte: it holds the bitmaps QEMU's source had.
    assert all(b["dest_sha256"] == b["sha256"] for b in truth["bitmaps"])


def test_live_tui_option_reaches_the_tui_source(capsys: pytest.CaptureFixture[str]) -> None:
    require_root()
    from migshark.analyzer import cli

    # A bad interface fails in LiveSource.open(), before any terminal is taken over.
    assert cli.main(["live", "--tui", "-i", "no-such-if0"]) == 2
    err = capsys.readouterr().err
    assert "no-such-if0" in err and "Traceback" not in err


def test_proxy_tui_option_reaches_the_tui_source(capsys: pytest.CaptureFixture[str]) -> None:
    from migshark.analyzer import cli

    # An address it cannot use fails in ProxySource.open(), before the terminal is taken.
    assert cli.main(["proxy", "--tui", "--listen", "bogus", "--to", "tcp:127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "Traceback" not in err
