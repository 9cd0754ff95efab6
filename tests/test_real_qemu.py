"""migshark against real QEMU: every bitmap must match what QEMU itself reports.

Two sources of real streams: the bundled captures in captures/real/ (made by
captures/make_real_captures.py, ground truth recorded from QEMU at the time), and
fresh migrations run here by testkit/realqemu/harness.py, between the system's QEMU 7.2
and the QEMU 10.0 of scripts/install-qemu10 in all four directions. Ground truth always
comes from QEMU's QMP (x-debug-block-dirty-bitmap-sha256, query-block), never from us.
"""

from __future__ import annotations

import io
import json
import random
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from migshark.analyzer.analysis import AnalysisOptions, analyze_path
from migshark.analyzer.cli import main as cli_main
from migshark.analyzer.decoder import StreamDecoder
from migshark.analyzer.records import Finding, Record, Severity
from testkit.paths import CAPTURES
from testkit.require import require_qemu, require_root, require_tools

if TYPE_CHECKING:
    from testkit.realqemu.harness import MigrationResult

REAL = CAPTURES / "real"
TRUTH_FILES = sorted(REAL.glob("*.json"))
COMPARED = ("granularity", "enabled", "persistent", "disk_size", "dirty_bytes", "sha256")


def _inputs_for(truth_file: Path) -> list[Path]:
    return [p for p in (truth_file.with_suffix(s) for s in (".pcap", ".pcapng", ".bin"))
            if p.exists()]


def assert_matches_qemu(path: Path, truth: dict) -> dict:
    result = analyze_path(path, AnalysisOptions(port=truth.get("port")))
    report = result.as_json()
    ours = {(b["node"], b["name"]): b for b in report["bitmaps"]}
    theirs = {(b["node"], b["name"]): b for b in truth["bitmaps"]}
    assert set(ours) == set(theirs), f"{path.name}: bitmaps differ"
    for key, expected in theirs.items():
        got = ours[key]
        for name in COMPARED:
            assert got[name] == expected[name], f"{path.name} {key} {name}"
        assert got["complete"] is True
        assert (got["real_node"], got["real_name"]) == (key[0], key[1]) or truth.get(
            "scenario") == "mapping"
    problems = [f for f in report["findings"] if f["severity"] in ("error", "warning")]
    # A QEMU 7.2 destination may die during bitmap postcopy (PROTOCOL-NOTES 4): its
    # RST is then the only thing worth a warning.
    allowed = {"peer-reset"} if truth["mode"] == "postcopy" else set()
    assert [f for f in problems if f["code"] not in allowed] == [], path.name
    assert report["machine_type"] == truth["machine_type"]
    return report


@pytest.mark.parametrize("truth_file", TRUTH_FILES, ids=lambda p: p.stem)
def test_bundled_captures_match_qemu(truth_file):
    truth = json.loads(truth_file.read_text())
    inputs = _inputs_for(truth_file)
    assert inputs, f"no capture beside {truth_file.name}"
    for path in inputs:
        assert_matches_qemu(path, truth)


def test_bundled_captures_exist():
    scenarios = {json.loads(p.read_text())["scenario"] for p in TRUTH_FILES}
    assert {"precopy", "postcopy", "mapping", "flags", "exec"} <= scenarios
    versions = {json.loads(p.read_text())["qemu_version"].split(".")[0] for p in TRUTH_FILES}
    assert versions == {"7", "10"}


def test_bundled_qemu10_capture_has_its_newer_stream() -> None:
    """QEMU 10.0 on its own machine type: SWITCHOVER_START before the postcopy package,
    decoded without a finding (assert_matches_qemu, via the bundled-captures test)."""
    truth = json.loads((REAL / "qemu10-postcopy-1node.json").read_text())
    assert truth["machine_type"] == "pc-i440fx-10.0"
    from testkit.realqemu.harness import read_tcp_flow

    data = read_tcp_flow(REAL / truth["files"]["pcap"], truth["port"]).to_server
    decoder = StreamDecoder()
    events = decoder.feed(data) + decoder.finish()
    commands = [e.fields["command"] for e in events
                if isinstance(e, Record) and e.kind == "command"]
    assert commands == ["POSTCOPY_ADVISE", "SWITCHOVER_START", "PACKAGED", "POSTCOPY_LISTEN",
                        "POSTCOPY_RUN"]
    assert not [e for e in events if isinstance(e, Finding) and e.severity > Severity.NOTE]


def _signature(events: list) -> list:
    return [(e.offset, e.length, e.kind, e.node, e.bitmap) if isinstance(e, Record)
            else (e.code, e.offset) for e in events]


def test_real_stream_one_byte_at_a_time():
    data = (REAL / "exec.bin").read_bytes()
    whole = StreamDecoder()
    expected = whole.feed(data) + whole.finish()
    bytewise = StreamDecoder()
    got = []
    view = memoryview(data)
    for index in range(len(data)):
        got += bytewise.feed(view[index : index + 1])
    got += bytewise.finish()
    assert _signature(got) == _signature(expected)
    assert not [e for e in got if isinstance(e, Finding) and e.severity > Severity.NOTE]


def _postcopy_stream() -> bytes:
    """The source-to-destination bytes of the bundled postcopy capture: few records
    (no idle iterations), so hundreds of cut copies analyse quickly."""
    from testkit.realqemu.harness import read_tcp_flow

    truth = json.loads((REAL / "postcopy.json").read_text())
    return read_tcp_flow(REAL / "postcopy.pcap", truth["port"]).to_server


def test_real_stream_cut_at_many_offsets(tmp_path):
    data = _postcopy_stream()
    assert data[:4] == b"QEVM"
    rng = random.Random(2024)
    cuts = sorted(rng.sample(range(8, len(data) - 1), 200)
                  + [9, 100, len(data) // 2, len(data) - 2])
    cut_file = tmp_path / "cut.bin"
    for cut in cuts:
        cut_file.write_bytes(data[:cut])
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli_main(["analyze", "--json", str(cut_file)])
        assert code == 1, (cut, err.getvalue())
        (migration,) = json.loads(out.getvalue())["migrations"]
        codes = [f["code"] for f in migration["findings"]]
        assert "truncated" in codes, cut
        for bitmap in migration["bitmaps"]:
            if bitmap["sha256"] is not None:
                assert bitmap["complete"] and bitmap["covered"]


def test_cut_capture_file_is_reported_not_crashed(tmp_path):
    data = (REAL / "precopy.pcap").read_bytes()
    for cut in (30, 5000, len(data) // 3, len(data) - 7):
        path = tmp_path / f"cut{cut}.pcap"
        path.write_bytes(data[:cut])
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli_main(["analyze", "--json", str(path)])
        assert "Traceback" not in err.getvalue()
        if code == 2:
            assert "no migration stream found" in err.getvalue(), cut
            continue
        report = json.loads(out.getvalue())
        codes = {f["code"] for f in report["input_findings"]} | {
            f["code"] for migration in report["migrations"] for f in migration["findings"]}
        assert "capture-truncated" in codes, cut
        # Cut inside the migration: the stream is incomplete, an error. Cut in the
        # last frames (FIN/ACKs after EOF): only the capture is damaged, a warning.
        assert code == (1 if cut < len(data) // 2 else 0), cut
        assert ("truncated" in codes) == (code == 1), cut


FRESH = ["precopy", "postcopy", "postcopy-1node", "mapping", "flags", "exec"]

# (source, destination, machine type of both): across versions both sides must run the
# older machine type, since each QEMU refuses a stream whose machine type is not its own
PEERS = {
    "7.2-7.2": ("7.2", "7.2", None),
    "10.0-10.0": ("10.0", "10.0", None),
    "10.0-7.2": ("10.0", "7.2", "pc-i440fx-7.2"),
    "7.2-10.0": ("7.2", "10.0", "pc-i440fx-7.2"),
}


def _commands(result: MigrationResult) -> list[str]:
    """The QEMU_VM_COMMAND records of a harness run's migration stream, in order."""
    from testkit.realqemu.harness import read_tcp_flow

    if result.raw is not None:
        data = result.raw.read_bytes()
    else:
        assert result.pcap is not None and result.port is not None
        data = read_tcp_flow(result.pcap, result.port).to_server
    decoder = StreamDecoder()
    events = decoder.feed(data) + decoder.finish()
    return [e.fields["command"] for e in events if isinstance(e, Record) and e.kind == "command"]


@pytest.mark.qemu
@pytest.mark.parametrize("peers", PEERS)
@pytest.mark.parametrize("preset", FRESH)
def test_fresh_migration_matches_qemu(preset: str, peers: str, tmp_path: Path) -> None:
    require_tools("tcpdump")
    require_root()
    from testkit.realqemu.harness import PRESETS, run_migration

    source_version, dest_version, machine = PEERS[peers]
    source, dest = require_qemu(source_version), require_qemu(dest_version)
    result = run_migration(PRESETS[preset], tmp_path, source=source, dest=dest,
                           machine=machine)
    truth = result.ground_truth
    # the builds asked for are the ones that ran, with the machine type asked for
    assert truth["qemu_version"].startswith(source_version + ".")
    assert truth["dest_qemu_version"].startswith(dest_version + ".")
    assert truth["machine_type"] == (machine or f"pc-i440fx-{source_version}")
    inputs = [p for p in (result.pcap, result.pcapng, result.raw) if p is not None]
    assert inputs
    for path in inputs:
        assert_matches_qemu(path, truth)
    # QEMU 10.0 announces the switchover (MIG_CMD_SWITCHOVER_START) on its own machine
    # types only: pc-i440fx-7.2 keeps the 7.2 stream, which a 7.2 destination expects
    sends_switchover_start = truth["machine_type"] == "pc-i440fx-10.0"
    assert ("SWITCHOVER_START" in _commands(result)) == sends_switchover_start
    if truth["mode"] == "precopy" or preset == "postcopy-1node":
        # The destination QEMU agrees with the source: the stream carried the truth.
        assert truth["dest_outcome"] == "completed"
        assert all(b["dest_sha256"] == b["sha256"] for b in truth["bitmaps"])
    else:
        # Two nodes in bitmap postcopy: 7.2 and 10.0.2 destinations abort alike.
        assert "qemu_in_main_thread" in truth["dest_outcome"], truth["dest_outcome"]


@pytest.mark.qemu
@pytest.mark.parametrize(("source_version", "dest_version"), [("10.0", "7.2"), ("7.2", "10.0")])
def test_default_machine_type_is_refused_across_versions(
    source_version: str, dest_version: str, tmp_path: Path
) -> None:
    """Each QEMU runs its own newest machine type by default (`pc`), and a destination
    refuses a stream whose machine type is not its own: QEMU says why, and the stream
    migshark decodes carries the source's machine type."""
    require_tools("tcpdump")
    require_root()
    from testkit.realqemu.harness import PRESETS, run_migration

    source, dest = require_qemu(source_version), require_qemu(dest_version)
    result = run_migration(PRESETS["flags"], tmp_path, source=source, dest=dest,
                           allow_failure=True, attempts=1)
    truth = result.ground_truth
    refusal = (f"Machine type received is 'pc-i440fx-{source_version}' "
               f"and local is 'pc-i440fx-{dest_version}'")
    assert refusal in truth["dest_outcome"], truth["dest_outcome"]
    assert truth["source_outcome"] == "failed"
    assert all(b["dest_sha256"] is None for b in truth["bitmaps"])
    assert result.pcap is not None
    report = analyze_path(result.pcap, AnalysisOptions(port=truth["port"])).as_json()
    assert report["machine_type"] == f"pc-i440fx-{source_version}"
