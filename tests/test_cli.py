"""The migshark command line: output shapes and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

from testkit import synthetic
from testkit.paths import REPO_ROOT


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "migshark", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_analyze_text_summary(tmp_path):
    path = tmp_path / "s.bin"
    path.write_bytes(synthetic.precopy_stream())
    done = run_cli("analyze", str(path))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "machine type : pc-i440fx-7.2" in out
    assert "phases       : setup, iteration, completion" in out
    assert "device state (1 sections)" in out
    assert "drive0/inc0" in out and "drive0/inc1" in out
    assert "findings     : none" in out


def test_analyze_json_shape_and_exit_codes(tmp_path):
    path = tmp_path / "s.bin"
    path.write_bytes(synthetic.precopy_stream())
    done = run_cli("analyze", "--json", str(path))
    report = json.loads(done.stdout)
    assert done.returncode == 0
    for bitmap in report["bitmaps"]:
        assert {"node", "name", "granularity", "enabled", "persistent", "disk_size",
                "dirty_bytes", "sha256", "complete"} <= set(bitmap)
    path.write_bytes(synthetic.precopy_stream()[:-300])
    done = run_cli("analyze", "--json", str(path))
    assert done.returncode == 1
    report = json.loads(done.stdout)
    truncated = [f for f in report["findings"] if f["code"] == "truncated"]
    assert truncated and truncated[0]["severity"] == "error"
    assert {"code", "severity", "message", "offset"} <= set(truncated[0])


def test_unreadable_inputs_exit_2_with_one_line(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello, not a capture")
    for target in (str(junk), str(tmp_path / "missing.pcap"), str(tmp_path)):
        done = run_cli("analyze", target)
        assert done.returncode == 2
        assert len(done.stderr.strip().splitlines()) == 1
        assert "Traceback" not in done.stderr


def test_dump_lines_and_verbose(tmp_path):
    path = tmp_path / "s.bin"
    data = synthetic.precopy_stream()
    path.write_bytes(data)
    done = run_cli("dump", str(path))
    lines = done.stdout.splitlines()
    starts = [line for line in lines if "bitmap-start" in line]
    assert len(starts) == 2 and "drive0/inc0" in starts[0] and "granularity=65536" in starts[0]
    assert any("section-end" in line and "dirty-bitmap" in line for line in lines)
    verbose = run_cli("dump", "-V", str(path)).stdout
    assert "first_sector: 0" in verbose and "buffer_size: 1024" in verbose
    detail = run_cli("dump", "--ram-detail", str(path)).stdout
    assert detail.count("ram-page ") == 4 and detail.count("ram-zero ") == 2
    assert "ram-pages" not in detail
