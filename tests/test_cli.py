"""The migshark command line: output shapes and exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

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
    for bitmap in report["migrations"][0]["bitmaps"]:
        assert {"node", "name", "granularity", "enabled", "persistent", "disk_size",
                "dirty_bytes", "sha256", "complete"} <= set(bitmap)
    path.write_bytes(synthetic.precopy_stream()[:-300])
    done = run_cli("analyze", "--json", str(path))
    assert done.returncode == 1
    report = json.loads(done.stdout)
    truncated = [f for f in report["migrations"][0]["findings"] if f["code"] == "truncated"]
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
    # every field through the registry: label, filter name, value, its bytes
    assert re.search(r"Start sector \(bitmap\.start_sector\): 0  @0x[0-9a-f]+\+8", verbose)
    assert re.search(r"Buffer size \(bitmap\.buffer_size\): 1024  @0x[0-9a-f]+\+\d+", verbose)
    detail = run_cli("dump", "--ram-detail", str(path)).stdout
    assert detail.count("ram-page ") == 4 and detail.count("ram-zero ") == 2
    assert "ram-pages" not in detail


# --- analyzer.report: the renderings the CLI, live, proxy and the TUI share ---------

def test_render_json_is_what_analyze_json_prints(tmp_path: Path) -> None:
    from migshark.analyzer.analysis import AnalysisOptions, analyze_path
    from migshark.analyzer.report import format_summary, render_json

    path = tmp_path / "s.bin"
    path.write_bytes(synthetic.precopy_stream())
    result = analyze_path(path, AnalysisOptions())
    assert run_cli("analyze", "--json", str(path)).stdout == render_json(result)
    assert run_cli("analyze", str(path)).stdout == format_summary(result)


def test_dump_printer_numbers_events_and_puts_input_findings_last(tmp_path: Path) -> None:
    import io

    from migshark.analyzer.analysis import AnalysisOptions, analyze_path
    from migshark.analyzer.report import DumpPrinter

    path = tmp_path / "s.pcap"
    # a capture cut inside its last record: an input finding, after every event
    from migshark.analyzer.pcapwriter import write_capture
    from migshark.analyzer.scenario import TransportSpec

    write_capture(path, synthetic.precopy_stream(), TransportSpec())
    path.write_bytes(path.read_bytes()[:-7])
    out = io.StringIO()
    printer = DumpPrinter(out, verbose=True)
    result = analyze_path(path, AnalysisOptions(), printer)
    printer.input_findings(result)
    lines = out.getvalue().splitlines()
    # -V detail lines are indented field names; event lines start with a number or,
    # for findings, with blanks where the number would be
    detail = [line for line in lines if re.match(r" {4}(?: {2})?[A-Za-z\[]", line)]
    events = [line for line in lines if line not in detail]
    assert detail and all(": " in line for line in detail)
    numbers = [int(line.split()[0]) for line in events if re.match(r" {0,5}\d", line)]
    found = [line for line in events if not re.match(r" {0,5}\d", line)]
    # records are numbered 1, 2, ... as the TUI numbers its rows; findings are not
    assert numbers == list(range(1, printer.number + 1))
    assert len(found) > 1
    assert "] capture-truncated: " in found[-1] and found[-1].split()[0] == "0x0"
    assert not any("capture-truncated" in line for line in found[:-1])


def test_connection_reports_read_the_same_for_live_and_proxy() -> None:
    from migshark.analyzer.analysis import AnalysisOptions
    from migshark.analyzer.connections import BACKWARD, FORWARD, Connection
    from migshark.analyzer.report import format_connection_closed, format_connection_report
    from migshark.analyzer.returnpath import ReturnPathMessage, build_message
    from migshark.dissectors.multifd import MULTIFD_MAGIC_BYTES

    shut = build_message(ReturnPathMessage.SHUT, b"\0\0\0\0")
    main = Connection("connection 1", AnalysisOptions(), claim=True)
    main.data(FORWARD, synthetic.precopy_stream())
    main.data(BACKWARD, shut)
    main.end()
    text = format_connection_report(main)
    assert text.startswith("\nMigration stream connection 1\n")
    assert f"  return path  : {len(shut)} bytes; messages: SHUT x1" in text.splitlines()
    assert "proxy error" not in text
    assert format_connection_report(main, "analysis failed: X").endswith(
        "  proxy error  : analysis failed: X")
    channel = Connection("connection 2", AnalysisOptions(), claim=True)
    channel.data(FORWARD, MULTIFD_MAGIC_BYTES + bytes(2000))
    channel.end()
    assert format_connection_closed(channel) == (
        "connection 2: multifd channel closed, 2,004 bytes forwarded")


def test_export_scenario_into_a_missing_folder_is_a_clean_exit_2(tmp_path: Path) -> None:
    capture = REPO_ROOT / "captures/generated/clean.bin"
    done = run_cli("analyze", "--export-scenario", str(tmp_path / "no/such/x.toml"),
                   str(capture))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1
    assert "cannot write the scenario" in done.stderr and "no/such/x.toml" in done.stderr
    assert "Migration stream clean.bin" in done.stdout  # the summary is still printed
    ok = run_cli("analyze", "--export-scenario", str(tmp_path / "x.toml"), str(capture))
    assert ok.returncode == 0 and (tmp_path / "x.toml").read_text().startswith("# Exported")


def test_readme_gives_exit_codes_for_every_command() -> None:
    from migshark.analyzer.cli import build_parser

    parser = build_parser()
    commands = set(next(a for a in parser._actions if a.dest == "==SUPPRESS==" or
                        hasattr(a, "choices") and isinstance(a.choices, dict)).choices)
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme[readme.index("Exit codes, for every command"):]
    table = table[: table.index("\n\n", table.index("| command |"))]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    listed = {name.strip("` ") for row in rows for name in row.split("|")[1].split(",")
              for name in name.split("/")}
    assert commands == listed, (commands, listed)
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("migshark ")
