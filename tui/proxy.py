"""`migshark proxy --tui`: the proxy's in-transit analysis shown in the Textual app.

Forwarding is analyzer.proxy's, unchanged; only the events' destination differs:
the app's Batcher instead of text on stdout. Each connection analyses in its own
thread, so the batcher is fed under a lock.
"""

from __future__ import annotations

import argparse
import io
import threading
from typing import Any

from migshark.analyzer.analysis import AnalysisResult, MigrationStream
from migshark.analyzer.proxy import Output, ProxyServer, open_proxy
from migshark.analyzer.records import Event
from migshark.analyzer.report import analysis_json
from migshark.tui.model import Batcher, Deliver

# How often events of a quiet connection are handed to the app.
FLUSH_INTERVAL = 0.25


class ProxySource:
    """An EventSource (see tui.model) over a forwarding proxy."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.name = f"proxy {args.listen} -> {args.to}"
        self._lock = threading.Lock()
        self._batcher: Batcher | None = None
        self.proxy: ProxyServer | None = None

    def open(self) -> str | None:
        opened = open_proxy(self.args, Output(io.StringIO(), as_json=True), self._sink)
        if isinstance(opened, str):
            return opened
        self.proxy = opened
        self.name = f"proxy {opened.bound} -> {opened.target}"
        return None

    def _sink(self, stream: MigrationStream, event: Event) -> None:
        with self._lock:
            if self._batcher is not None:
                self._batcher(stream, event)

    def run(self, deliver: Deliver, stop: threading.Event) -> dict[str, Any] | None:
        proxy = self.proxy
        assert proxy is not None, "open() first"
        with self._lock:
            self._batcher = batcher = Batcher(deliver, stop)
        finished = threading.Event()

        def flusher() -> None:
            while not finished.wait(FLUSH_INTERVAL):
                if stop.is_set():
                    proxy.interrupted.set()
                with self._lock:
                    batcher.flush_if_due()

        thread = threading.Thread(target=flusher, name="proxy tui flush", daemon=True)
        thread.start()
        try:
            proxy.serve()
        finally:
            finished.set()
            thread.join()
        with self._lock:
            batcher.flush(final=True)
        return analysis_json(AnalysisResult(str(proxy.bound), "proxy",
                                            list(proxy.table.streams)))


def run_proxy_tui(args: argparse.Namespace) -> int:
    from migshark.tui.app import run_live_source

    return run_live_source(ProxySource(args), "proxy")
