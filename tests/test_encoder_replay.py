"""Replay generated streams into a real QEMU 7.2 destination.

- The clean scenario loads, and the destination's x-debug-block-dirty-bitmap-sha256
  equals the scenario's expected sha256 for every bitmap.
- Verdict parity: every fault a destination detects makes QEMU report its error, and
  `migshark analyze` on the same stream reports the matching finding. The table in
  docs/faults.md ("QEMU 7.2 verdicts") is this test's output: it fails when the table
  is stale, and MIGSHARK_UPDATE_DOCS=1 rewrites it.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from migshark.analyzer.analysis import analyze_path
from migshark.analyzer.encoder import encode
from migshark.analyzer.replay import ReplayReport, send_stream
from migshark.analyzer.scenario import load_scenario, parse_fault
from testkit.require import require, require_tools

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "captures" / "scenarios" / "replay-pc.toml"
DOCS = ROOT / "docs" / "faults.md"
TABLE_START = "<!-- verdicts:start (written by tests/test_encoder_replay.py) -->"
TABLE_END = "<!-- verdicts:end -->"

# fault -> (what QEMU's log must say, the finding migshark must report)
VERDICTS: dict[str, tuple[str, str]] = {
    "bits-unknown-bitmap": ("Error: unknown dirty bitmap 'never-started'", "unknown-bitmap"),
    "wrong-granularity-start": ("Migrated bitmap granularity doesn't match",
                                "granularity-mismatch"),
    "wrong-buffer-size": ("Migrated bitmap granularity doesn't match", "granularity-mismatch"),
    "reserved-start-flags": ("Unknown flags in migrated dirty bitmap header",
                             "reserved-start-flags"),
    "oversized-buffer": ("buffer allocation request is too large", "buffer-too-large"),
    "bad-section-version": ("unsupported version 2 for 'dirty-bitmap'", "bad-section-version"),
    "drop-eos": ("Unable to read node alias string", "missing-eos"),
    "footer-mismatch": ("Mismatched section id in footer for dirty-bitmap", "footer-mismatch"),
    "truncate-at=150000": ("Failed to read bitmap bits", "truncated"),
}

BITMAPS = ("scatter-512", "clean-64k", "disabled-1m")


@dataclass
class Outcome:
    report: ReplayReport
    status: str  # the destination's migration status, or how the process ended
    log: str
    hashes: dict[str, str | None]


def run_destination(workdir: Path, data: bytes) -> Outcome:
    from testkit.processes import free_port
    from testkit.realqemu.harness import _Qemu
    from testkit.realqemu.qmp import QMPClosed, QMPError, QMPTimeout

    disk = workdir / "drive0.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(disk), "64M"], check=True,
                   capture_output=True, timeout=30)
    port = free_port()
    qemu = _Qemu("dst", workdir, [f"file={disk},if=none,id=drive0,format=qcow2"],
                 ["-incoming", f"tcp:127.0.0.1:{port}"])
    try:
        qmp = qemu.connect(10)
        qmp.cmd("migrate-set-capabilities", capabilities=[
            {"capability": "dirty-bitmaps", "state": True},
            {"capability": "events", "state": True}])
        report = send_stream(data, "127.0.0.1", port, timeout=20)
        status = "exited"
        hashes: dict[str, str | None] = {}
        try:
            while status not in ("completed", "failed"):
                event = qmp.wait_event("MIGRATION", timeout=20)
                status = event["data"]["status"]
            for name in BITMAPS:
                try:
                    hashes[name] = qmp.cmd("x-debug-block-dirty-bitmap-sha256",
                                           node="drive0", name=name)["sha256"]
                except QMPError:
                    hashes[name] = None
        except QMPClosed:
            # A load that fails makes the destination exit.
            qemu.proc.wait(timeout=10)
            status = f"exited ({qemu.proc.returncode})"
        except QMPTimeout:
            status = "no outcome within 20 s"
        return Outcome(report, status, qemu.log.read_text(errors="replace"), hashes)
    finally:
        qemu.stop()


def analyzer_codes(tmp_path: Path, data: bytes) -> set[str]:
    path = tmp_path / "replayed.bin"
    path.write_bytes(data)
    return {f.code for f in analyze_path(path).all_findings()}


def test_clean_generated_stream_loads_with_the_expected_hashes(tmp_path: Path) -> None:
    require_tools("qemu-system-x86_64", "qemu-img")
    encoded = encode(load_scenario(SCENARIO))
    outcome = run_destination(tmp_path, encoded.data)
    assert outcome.report.sent == len(encoded.data)
    assert outcome.status == "completed", outcome.log
    expected = {b["name"]: b["sha256"] for b in encoded.expected["bitmaps"]}
    assert outcome.hashes == expected


_results: dict[str, tuple[str, str, str]] = {}
_lock = threading.Lock()


@pytest.mark.parametrize("fault", sorted(VERDICTS))
def test_fault_verdict_parity(tmp_path: Path, fault: str) -> None:
    require_tools("qemu-system-x86_64", "qemu-img")
    message, code = VERDICTS[fault]
    data = encode(load_scenario(SCENARIO), [parse_fault(fault)]).data
    outcome = run_destination(tmp_path, data)
    qemu_lines = [line.removeprefix("qemu-system-x86_64: ")
                  for line in outcome.log.splitlines() if message in line]
    assert qemu_lines, f"QEMU did not say {message!r}: {outcome.log!r}"
    # A refused bitmap never reaches the destination, whatever happened to the rest.
    assert not any(outcome.hashes.values())
    assert code in analyzer_codes(tmp_path, data)
    # Auto-generated node names (#block123) vary with the command line.
    said = re.sub(r"#block\d+", "#blockN", qemu_lines[0])
    with _lock:
        _results[fault] = (said, outcome.status, code)


def test_multibyte_flags_load_like_the_clean_stream(tmp_path: Path) -> None:
    require_tools("qemu-system-x86_64", "qemu-img")
    encoded = encode(load_scenario(SCENARIO), [parse_fault("multibyte-flags")])
    outcome = run_destination(tmp_path, encoded.data)
    assert outcome.status == "completed", outcome.log
    assert outcome.hashes == {b["name"]: b["sha256"] for b in encoded.expected["bitmaps"]}
    assert "multibyte-flags" in analyzer_codes(tmp_path, encoded.data)


def test_verdict_table_in_docs_is_current() -> None:
    if len(_results) != len(VERDICTS):
        pytest.skip("needs every verdict test of this module to have run and passed")
    rows = ["| Fault | QEMU 7.2 destination says | Destination outcome | migshark finding |",
            "|---|---|---|---|"]
    for fault in sorted(_results):
        said, status, code = _results[fault]
        rows.append(f"| `{fault}` | {said} | {status} | `{code}` |")
    table = "\n".join(rows)
    text = DOCS.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    if os.environ.get("MIGSHARK_UPDATE_DOCS"):
        DOCS.write_text(text[:start] + "\n" + table + "\n" + text[end:])
        return
    assert text[start:end].strip() == table, "run with MIGSHARK_UPDATE_DOCS=1 to refresh"


def test_cli_replay_reports_unreachable_destination_and_bad_addresses(
        capsys: pytest.CaptureFixture[str]) -> None:
    from migshark.analyzer.cli import main
    from testkit.processes import free_port

    port = free_port()  # nothing listens there
    assert main(["replay", str(SCENARIO), "--to", f"tcp:127.0.0.1:{port}"]) == 2
    assert "cannot connect" in capsys.readouterr().err
    assert main(["replay", str(SCENARIO), "--to", "unix:/x"]) == 2
    assert "tcp:HOST:PORT" in capsys.readouterr().err
    assert main(["replay", str(SCENARIO), "--to", "tcp:127.0.0.1:1", "--fault", "gap"]) == 2
    assert "only exist in captures" in capsys.readouterr().err


def test_cli_replay_sends_a_captured_stream_whole(tmp_path: Path) -> None:
    import socket

    from migshark.analyzer.cli import main
    from migshark.analyzer.encoder import generate

    capture = tmp_path / "c.pcapng"
    expected = generate(load_scenario(SCENARIO), capture, [parse_fault("reorder")])
    received = bytearray()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def receive() -> None:
            conn, _ = server.accept()
            with conn:
                while chunk := conn.recv(1 << 16):
                    received.extend(chunk)

        thread = threading.Thread(target=receive)
        thread.start()
        assert main(["replay", str(capture), "--to", f"tcp:127.0.0.1:{port}"]) == 0
        thread.join(timeout=20)
    assert len(received) == expected["stream_bytes"]
    assert bytes(received) == encode(load_scenario(SCENARIO)).data


def test_spliced_into_a_real_capture_loads_with_the_expected_hashes(tmp_path: Path) -> None:
    require_tools("qemu-system-x86_64", "qemu-img")
    from migshark.analyzer.replay import spliced_stream

    capture = ROOT / "captures" / "real" / "precopy.pcap"
    require(capture.exists(), f"{capture} missing")
    data = spliced_stream(SCENARIO, capture)
    assert data[:4] == b"QEVM" and data != capture.read_bytes()
    expected = {b["name"]: b["sha256"] for b in encode(load_scenario(SCENARIO)).expected[
        "bitmaps"]}
    path = tmp_path / "spliced.bin"
    path.write_bytes(data)
    analysed = analyze_path(path).as_json()
    assert {b["name"]: b["sha256"] for b in analysed["bitmaps"]} == expected
    assert [f for f in analysed["findings"] if f["severity"] == "error"] == []
    outcome = run_destination(tmp_path, data)
    assert outcome.status == "completed", outcome.log
    assert outcome.hashes == expected
