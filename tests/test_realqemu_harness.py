"""Tests of the real-QEMU harness itself (testkit/realqemu), against real QEMU.

Each scenario is migrated once per module (fixtures below); the tests then check what
the harness promises: the migration completed, the capture is whole and holds a QEMU
stream, the ground truth is complete and agrees with what the extents predict, and the
destination ended up with the bitmaps the source had.
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from testkit.realqemu.harness import (
    PRESETS,
    MigrationResult,
    expected_dirty_bytes,
    read_tcp_flow,
    run_migration,
)
from testkit.realqemu.qmp import QMPClient, QMPError, QMPTimeout
from testkit.require import require, require_root, require_tools

pytestmark = pytest.mark.qemu

QEMU_TOOLS = ("qemu-system-x86_64", "qemu-img")


def _run(name: str, tmp_path_factory: pytest.TempPathFactory) -> MigrationResult:
    scenario = PRESETS[name]
    if scenario.transport == "tcp":
        require_tools(*QEMU_TOOLS, "tcpdump")
        require_root()
    else:
        require_tools(*QEMU_TOOLS)
    return run_migration(scenario, tmp_path_factory.mktemp(name))


@pytest.fixture(scope="module")
def precopy(tmp_path_factory: pytest.TempPathFactory) -> MigrationResult:
    return _run("precopy", tmp_path_factory)


@pytest.fixture(scope="module")
def postcopy(tmp_path_factory: pytest.TempPathFactory) -> MigrationResult:
    return _run("postcopy", tmp_path_factory)


@pytest.fixture(scope="module")
def postcopy_1node(tmp_path_factory: pytest.TempPathFactory) -> MigrationResult:
    return _run("postcopy-1node", tmp_path_factory)


@pytest.fixture(scope="module")
def mapping(tmp_path_factory: pytest.TempPathFactory) -> MigrationResult:
    return _run("mapping", tmp_path_factory)


@pytest.fixture(scope="module")
def flags(tmp_path_factory: pytest.TempPathFactory) -> MigrationResult:
    return _run("flags", tmp_path_factory)


@pytest.fixture(scope="module")
def exec_result(tmp_path_factory: pytest.TempPathFactory) -> MigrationResult:
    return _run("exec", tmp_path_factory)


def _counted(s: str) -> bytes:
    return bytes([len(s)]) + s.encode()


def _stream(result: MigrationResult) -> bytes:
    if result.raw is not None:
        return result.raw.read_bytes()
    assert result.pcap is not None and result.port is not None
    return read_tcp_flow(result.pcap, result.port).to_server


def _check_truth(result: MigrationResult) -> None:
    truth = result.ground_truth
    assert json.loads(json.dumps(truth)) == truth
    assert truth["scenario"] == result.scenario.name
    assert truth["qemu_version"][0].isdigit()
    assert truth["machine_type"].startswith("pc-i440fx-")
    assert truth["mode"] == result.scenario.mode
    assert truth["transport"] == result.scenario.transport
    specs = [(d, b) for d in result.scenario.drives for b in d.bitmaps]
    assert len(truth["bitmaps"]) == len(specs)
    for entry, (drive, spec) in zip(truth["bitmaps"], specs, strict=True):
        assert entry["real_name"] == spec.name
        assert entry["granularity"] == spec.granularity
        assert entry["enabled"] == spec.enabled
        assert entry["persistent"] == spec.persistent
        assert entry["disk_size"] == drive.size
        assert entry["dirty_bytes"] == expected_dirty_bytes(spec), spec.name
        granules = math.ceil(drive.size / spec.granularity)
        assert 0 <= entry["dirty_bytes"] <= granules * spec.granularity
        assert len(entry["sha256"]) == 64 and int(entry["sha256"], 16) >= 0


# -- the QMP client --------------------------------------------------------------------


def test_qmp_client_errors_and_timeouts(tmp_path: Path) -> None:
    require_tools("qemu-system-x86_64")
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-nodefaults",
         "-display", "none", "-m", "64", "-S", "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with QMPClient.connect(sock, timeout=10) as qmp:
            assert "QMP" in qmp.greeting
            assert qmp.cmd("query-status")["status"] == "prelaunch"
            with pytest.raises(QMPError) as err:
                qmp.cmd("no-such-command")
            assert err.value.error_class == "CommandNotFound"
            with pytest.raises(QMPError, match="not found|Cannot find"):
                qmp.cmd("block-dirty-bitmap-add", node="nope", name="b")
            start = time.monotonic()
            with pytest.raises(QMPTimeout):
                qmp.wait_event("NO_SUCH_EVENT", timeout=0.3)
            assert time.monotonic() - start < 2
            # the client still works after a timeout
            assert qmp.cmd("query-status")["running"] is False
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_qmp_connect_times_out_without_qemu(tmp_path: Path) -> None:
    # a unix socket nobody accepts on: connect must give up, not hang
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)
        start = time.monotonic()
        with pytest.raises(QMPTimeout):
            QMPClient.connect(path, timeout=0.5)
        assert time.monotonic() - start < 3


# -- precopy ---------------------------------------------------------------------------


def test_precopy_capture_is_a_whole_qemu_stream(precopy: MigrationResult) -> None:
    assert precopy.pcap is not None and precopy.pcap.stat().st_size > 0
    assert precopy.port is not None
    flow = read_tcp_flow(precopy.pcap, precopy.port)
    assert flow.to_server[:8] == b"QEVM\x00\x00\x00\x03"
    assert flow.closed and flow.gaps == 0
    # precopy ends with EOF + VMDESCRIPTION (JSON)
    assert flow.to_server.rstrip().endswith(b"}")
    assert b"\x0cdirty-bitmap" in flow.to_server


def test_precopy_first_payload_seen_by_tshark(precopy: MigrationResult) -> None:
    require_tools("tshark")
    for path in (precopy.pcap, precopy.pcapng):
        assert path is not None and path.exists()
        out = subprocess.run(
            ["tshark", "-r", str(path), "-Y", f"tcp.dstport == {precopy.port} && tcp.len > 0",
             "-T", "fields", "-e", "tcp.payload"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout.split()  # fmt: skip
        assert out and out[0].replace(":", "").startswith("5145564d00000003"), path


def test_precopy_ground_truth(precopy: MigrationResult) -> None:
    _check_truth(precopy)
    truth = precopy.ground_truth
    assert truth["port"] == precopy.port
    assert truth["source_outcome"] == truth["dest_outcome"] == "completed"
    assert {b["granularity"] for b in truth["bitmaps"]} >= {512, 65536, 1 << 20}
    assert any(b["dirty_bytes"] == 0 for b in truth["bitmaps"])
    assert any(b["dirty_bytes"] == b["disk_size"] for b in truth["bitmaps"])
    assert any(b["disk_size"] >= 200 << 20 for b in truth["bitmaps"])


def test_precopy_hash_format_matches_protocol_notes(precopy: MigrationResult) -> None:
    # PROTOCOL-NOTES 5: SHA-256 of the bits packed LSB-first in 64-bit LE words
    by_name = {b["real_name"]: b for b in precopy.ground_truth["bitmaps"]}
    clean = by_name["clean-64k"]
    bits = math.ceil(clean["disk_size"] / clean["granularity"])
    words = math.ceil(bits / 64)
    assert clean["sha256"] == hashlib.sha256(bytes(words * 8)).hexdigest()
    full = by_name["full-1m"]  # 64 MiB / 1 MiB = 64 bits: exactly one all-ones word
    assert full["sha256"] == hashlib.sha256(b"\xff" * 8).hexdigest()


def test_precopy_destination_has_the_same_bitmaps(precopy: MigrationResult) -> None:
    for b in precopy.ground_truth["bitmaps"]:
        assert b["dest_sha256"] == b["sha256"], b["real_name"]


def test_precopy_wire_names_are_backend_names(precopy: MigrationResult) -> None:
    stream = _stream(precopy)
    for b in precopy.ground_truth["bitmaps"]:
        assert b["node"] == b["real_node"]
        assert _counted(b["node"]) in stream and _counted(b["name"]) in stream


def test_harness_leaves_no_process_behind(precopy: MigrationResult) -> None:
    needle = str(precopy.workdir).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        assert needle not in cmdline, cmdline.replace(b"\0", b" ")[:200]


# -- postcopy --------------------------------------------------------------------------


def test_postcopy_switches_and_captures_the_whole_stream(postcopy: MigrationResult) -> None:
    _check_truth(postcopy)
    statuses = [e["data"]["status"] for e in postcopy.source_events if e["event"] == "MIGRATION"]
    assert "postcopy-active" in statuses
    assert postcopy.pcap is not None and postcopy.port is not None
    flow = read_tcp_flow(postcopy.pcap, postcopy.port)
    assert flow.to_server.startswith(b"QEVM") and flow.gaps == 0 and flow.closed
    # POSTCOPY_LISTEN and POSTCOPY_RUN commands went out
    assert b"\x08\x00\x04\x00\x00" in flow.to_server and b"\x08\x00\x05\x00\x00" in flow.to_server


def test_postcopy_destination_outcome_is_recorded(postcopy: MigrationResult) -> None:
    truth = postcopy.ground_truth
    outcome = truth["dest_outcome"]
    if outcome == "completed":
        for b in truth["bitmaps"]:
            assert b["dest_sha256"] == b["sha256"]
    else:
        # QEMU 7.2 aborts looking up the second node from the postcopy listen thread
        assert "signal" in outcome or "exited" in outcome, outcome
        assert all(b["dest_sha256"] is None for b in truth["bitmaps"])


def test_postcopy_one_node_destination_agrees(postcopy_1node: MigrationResult) -> None:
    _check_truth(postcopy_1node)
    truth = postcopy_1node.ground_truth
    require(truth["dest_outcome"] == "completed", f"destination: {truth['dest_outcome']}")
    for b in truth["bitmaps"]:
        assert b["dest_sha256"] == b["sha256"], b["real_name"]


# -- mapping, flags, exec --------------------------------------------------------------


def test_mapping_puts_aliases_on_the_wire(mapping: MigrationResult) -> None:
    _check_truth(mapping)
    stream = _stream(mapping)
    for b in mapping.ground_truth["bitmaps"]:
        assert b["node"] != b["real_node"] and b["name"] != b["real_name"]
        assert _counted(b["node"]) in stream and _counted(b["name"]) in stream
        assert _counted(b["real_node"]) not in stream
        assert _counted(b["real_name"]) not in stream
        assert b["dest_sha256"] == b["sha256"]
    nodes = {b["node"] for b in mapping.ground_truth["bitmaps"]}
    assert len(nodes) == 2


def test_flags_scenario(flags: MigrationResult) -> None:
    _check_truth(flags)
    combos = {(b["enabled"], b["persistent"]) for b in flags.ground_truth["bitmaps"]}
    assert combos == {(True, False), (False, False), (True, True), (False, True)}
    for b in flags.ground_truth["bitmaps"]:
        assert b["dest_sha256"] == b["sha256"]


def test_exec_writes_a_raw_stream(exec_result: MigrationResult) -> None:
    _check_truth(exec_result)
    assert exec_result.pcap is None and exec_result.port is None
    assert exec_result.raw is not None
    data = exec_result.raw.read_bytes()
    assert data[:8] == b"QEVM\x00\x00\x00\x03"
    truth = exec_result.ground_truth
    assert truth["transport"] == "exec" and truth["port"] is None
    # the destination loaded the same file back
    assert truth["dest_outcome"] == "completed"
    for b in truth["bitmaps"]:
        assert b["dest_sha256"] == b["sha256"]


def test_ground_truth_files_are_consistent_with_presets() -> None:
    """The committed captures/real/*.json describe the presets they claim to."""
    real = Path(__file__).resolve().parent.parent / "captures" / "real"
    files = sorted(real.glob("*.json")) if real.is_dir() else []
    require(bool(files), "captures/real has no ground truth yet")
    for path in files:
        truth: dict[str, Any] = json.loads(path.read_text())
        scenario = PRESETS[truth["scenario"]]
        specs = [b for d in scenario.drives for b in d.bitmaps]
        assert [b["real_name"] for b in truth["bitmaps"]] == [s.name for s in specs]
        for name in truth.get("files", {}).values():
            if name:
                assert (real / name).stat().st_size > 0, name

