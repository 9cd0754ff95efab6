"""Drive the real `migshark tui` in tmux as a person would: keys in, screen text out."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from testkit.paths import CAPTURES, REPO_ROOT
from testkit.processes import wait_until
from testkit.require import require, require_tools

CAPTURE = CAPTURES / "real" / "postcopy-1node.pcap"
WAIT_SECONDS = 30.0


class Tmux:
    def __init__(self, session: str) -> None:
        self.session = session

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", *args], capture_output=True, text=True, check=False)

    def start(self, command: str, width: int = 100, height: int = 30) -> None:
        result = self.run("new-session", "-d", "-s", self.session, "-x", str(width),
                          "-y", str(height), command)
        assert result.returncode == 0, result.stderr
        # A server started earlier may impose its default size; this session wants its own.
        self.run("resize-window", "-t", self.session, "-x", str(width), "-y", str(height))

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.run("send-keys", "-t", self.session, *(["-l"] if literal else []), *keys)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.session).stdout

    def alive(self) -> bool:
        return self.run("has-session", "-t", self.session).returncode == 0

    def wait_for(self, condition: Callable[[str], bool], what: str) -> str:
        """Poll the pane until `condition` holds: the app's own output is the event."""
        screen = ""

        def shown() -> bool:
            nonlocal screen
            screen = self.screen()
            return condition(screen)

        if not wait_until(shown, WAIT_SECONDS):
            pytest.fail(f"timed out waiting for {what}; the screen was:\n{screen}")
        return screen

    def wait_text(self, text: str) -> str:
        return self.wait_for(lambda screen: text in screen, repr(text))


def test_browse_a_real_capture_in_tmux(tmp_path: Path) -> None:
    require_tools("tmux")
    require(CAPTURE.exists(), f"{CAPTURE} is missing")
    # A copy, so that a stray export key can only write into tmp_path.
    capture = tmp_path / CAPTURE.name
    shutil.copyfile(CAPTURE, capture)
    tmux = Tmux(f"migshark-tui-test-{os.getpid()}")
    command = (f"cd {shlex.quote(str(REPO_ROOT))} && {shlex.quote(sys.executable)} "
               f"-m migshark tui {shlex.quote(str(capture))}")
    tmux.start(command)
    try:
        # Open: the whole capture is listed and decoding is over.
        screen = tmux.wait_for(lambda s: re.search(r"\| \d+ records \| \d+ findings?\s*$",
                                                   s.splitlines()[0] if s else "") is not None,
                               "the capture to finish loading")
        total = int(re.search(r"(\d+) records", screen).group(1))  # type: ignore[union-attr]
        assert total > 100 and "file-header" in screen

        # Filter to one bitmap.
        tmux.keys("/")
        tmux.wait_text("Enter applies")  # the filter box has the focus
        tmux.keys('bitmap == "one-64k"', literal=True)
        tmux.keys("Enter")
        screen = tmux.wait_text(f"/{total} records")
        rows = [line for line in screen.splitlines() if re.match(r"\d+\s+0x[0-9a-f]+\s", line)]
        assert rows and all("drive0/one-64k" in line for line in rows)

        # Open the bitmaps view and the map of that bitmap.
        tmux.keys("b")
        tmux.wait_text("Bitmaps")
        tmux.keys("Down")
        screen = tmux.wait_text("drive0/one-64k 128.0 MiB")
        assert "█" in screen  # one dirty 64 KiB granule is one dirty cell
        assert re.search(r"one-64k\s+65536\s+E-\s+128\.0 MiB\s+100%\s+64\.0 KiB", screen)

        # Back, then jump from a finding (the completion phase) to its record.
        tmux.keys("Escape")
        tmux.wait_text("Record ")
        tmux.keys("e")
        screen = tmux.wait_text("Findings:")
        match = re.search(r"(0x[0-9a-f]{8})  phase: migration phase: completion", screen)
        assert match, screen
        offset = int(match.group(1), 16)
        line_of_completion = next(i for i, line in enumerate(screen.splitlines())
                                  if "phase: migration phase: completion" in line)
        line_of_cursor = next(i for i, line in enumerate(screen.splitlines())
                              if "phase: migration phase: setup" in line)
        tmux.keys(*["Down"] * (line_of_completion - line_of_cursor))
        tmux.keys("Enter")
        screen = tmux.wait_text(f"at {offset:#x},")
        assert re.search(rf"Record \d+: section-\w+ at {offset:#x},", screen)
        assert f"{total} records" in screen.splitlines()[0]  # the filter gave way

        tmux.keys("q")
        tmux.wait_for(lambda s: not tmux.alive(), "the app to quit")
    finally:
        if tmux.alive():
            tmux.run("kill-session", "-t", tmux.session)
