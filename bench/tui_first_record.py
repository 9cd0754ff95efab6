#!/usr/bin/env python3
"""Print the seconds from this script's start until the TUI shows its first record.

Runs `MigsharkApp.for_path(PATH)` headless; the clock stops inside apply_batch, the
moment the first batch holding a record reaches the record list. The time includes
importing textual and the app, i.e. what a user waits for after pressing Enter
(minus the interpreter's own start, ~20 ms).

    python bench/tui_first_record.py CAPTURE
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migshark.analyzer.records import Record  # noqa: E402
from migshark.tui.app import MigsharkApp  # noqa: E402
from migshark.tui.model import Batch  # noqa: E402


class TimedApp(MigsharkApp):
    first_record_at: float | None = None

    def apply_batch(self, batch: Batch) -> None:
        super().apply_batch(batch)
        if self.first_record_at is None and any(
                isinstance(event, Record) for _, event in batch.events):
            self.first_record_at = time.perf_counter() - STARTED
            self._stop.set()  # the decode worker gives up at its next batch
            self.exit()

    def finish_loading(self) -> None:
        super().finish_loading()
        if self.first_record_at is None:
            self.exit()


def main() -> int:
    app = TimedApp.for_path(sys.argv[1])
    assert isinstance(app, TimedApp)  # for_path builds the class it is called on
    app.run(headless=True)
    seconds = TimedApp.first_record_at if app.first_record_at is None else app.first_record_at
    print("n/a" if seconds is None else f"{seconds:.3f}", flush=True)
    # The decode thread may still be inside a long feed; do not wait for it.
    os._exit(0)


if __name__ == "__main__":
    main()
