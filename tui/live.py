"""`migshark live --tui`: a live capture feeding the same app as a file.

The capture loop is analyzer.live's; only its sink changes: events go to the app
in batches (tui.model.Batcher) instead of to stdout, and the app's stop event is
the capture's interrupt, so quitting the app ends the capture between batches.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Any

from migshark.analyzer.analysis import AnalysisResult
from migshark.analyzer.live import LiveCapture
from migshark.analyzer.report import analysis_json
from migshark.tui.model import Batcher, Deliver


class _CaptureForApp(LiveCapture):
    """LiveCapture whose periodic statistics poll also hands quiet-period events over."""

    batcher: Batcher | None = None

    def _poll_drops(self) -> None:
        super()._poll_drops()
        if self.batcher is not None:
            self.batcher.flush_if_due()


class LiveSource:
    """An EventSource (see tui.model) over a live capture on one interface."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.name = f"live:{args.iface}"
        self.capture = _CaptureForApp(args)
        # The per-migration text summary has no place on a terminal the app owns.
        self.capture.out = open(os.devnull, "w")  # noqa: SIM115 - closed in run()
        self.capture.tracker.sink = None

    def open(self) -> str | None:
        return self.capture.open()

    def run(self, deliver: Deliver, stop: threading.Event) -> dict[str, Any] | None:
        capture = self.capture
        batcher = Batcher(deliver, stop)
        capture.batcher = batcher
        capture.tracker.sink = batcher
        capture.interrupted = stop
        try:
            capture.run()
        finally:
            capture.out.close()
        batcher.flush(final=True)
        return analysis_json(AnalysisResult(self.name, "live", capture.tracker.streams))


def run_live_tui(args: argparse.Namespace) -> int:
    from migshark.tui.app import run_live_source

    if os.geteuid() != 0:
        print("migshark live: needs root (raw packet capture); run as root or use "
              "`migshark proxy`, which needs no privileges", file=sys.stderr)
        return 2
    return run_live_source(LiveSource(args), "live")
