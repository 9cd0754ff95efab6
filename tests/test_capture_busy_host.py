"""Acceptance (issue 11): a real migration captured on a busy host without a port filter.

`tcpdump -i lo tcp` records a real QEMU migration while at least 400 other TCP
connections on loopback exchange data (half opened before the capture starts, so
their handshakes are missing, half during it). `migshark analyze` must give QEMU's
own hashes (x-debug-block-dirty-bitmap-sha256, read on the source by the harness)
on the C lane and on pure Python, and the per-record event streams of both must be
identical. Before the lane's limits were mirrored in Python, 33 connections were
enough to make the C lane fail such a capture.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from migshark.analyzer.capture import CaptureReader
from testkit.lanes import both_lanes
from testkit.paths import REPO_ROOT
from testkit.require import require_qemu, require_root, require_tools

BACKGROUND_CONNECTIONS = 400
ROUND_PAUSE = 0.1  # between rounds of one small send per connection: ~4k packets/s
TRAFFIC_LIMIT = 120.0  # seconds; the traffic stops then even if the test hangs
COMPARED = ("granularity", "disk_size", "dirty_bytes", "sha256")


class BackgroundTraffic:
    """An echo server on loopback and client connections that keep sending to it.

    Bounded: at most `limit` seconds, small sends at a fixed pace; everything is
    closed by stop()."""

    def __init__(self, limit: float = TRAFFIC_LIMIT) -> None:
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1024)
        self.port = self.server.getsockname()[1]
        self.clients: list[socket.socket] = []
        self.accepted: list[socket.socket] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.deadline = time.monotonic() + limit
        self.sent = 0
        self.threads = [threading.Thread(target=self._serve, daemon=True),
                        threading.Thread(target=self._talk, daemon=True)]
        for thread in self.threads:
            thread.start()

    def open(self, count: int) -> None:
        for _ in range(count):
            client = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            client.setblocking(False)
            with self.lock:
                self.clients.append(client)

    def _serve(self) -> None:
        """Accept and echo whatever arrives (so both directions carry data)."""
        self.server.setblocking(False)
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            with self.lock:
                watched = [self.server, *self.accepted]
            ready, _, _ = select.select(watched[:1000], [], [], 0.05)
            for sock in ready:
                if sock is self.server:
                    try:
                        conn, _ = self.server.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    with self.lock:
                        self.accepted.append(conn)
                    continue
                try:
                    data = sock.recv(65536)
                    if data:
                        sock.send(data[:256])
                except (BlockingIOError, ConnectionError):
                    pass

    def _talk(self) -> None:
        payload = b"background traffic, not a migration " * 4
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            with self.lock:
                clients = list(self.clients)
            for client in clients:
                try:
                    client.send(payload[: 40 + self.sent % 100])
                    self.sent += 1
                    client.recv(65536)
                except (BlockingIOError, ConnectionError):
                    pass
            self.stopping.wait(ROUND_PAUSE)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=10)
        for sock in [*self.clients, *self.accepted, self.server]:
            sock.close()


class AllTcpCapture:
    """tcpdump -i lo tcp (no port filter), started and stopped like the harness's."""

    def __init__(self, path: Path) -> None:
        from testkit.realqemu.harness import CAPTURE_BUFFER_KIB, SNAPLEN

        self.path = path
        self.proc = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-n", "-s", str(SNAPLEN), "-B", str(CAPTURE_BUFFER_KIB),
             "--immediate-mode", "-U", "-w", str(path), "tcp"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        said = b""
        deadline = time.monotonic() + 10
        while b"listening on" not in said:
            ready, _, _ = select.select([self.proc.stderr], [], [],
                                        max(0.0, deadline - time.monotonic()))
            chunk = os.read(self.proc.stderr.fileno(), 4096) if ready else b""
            if not chunk:
                self.proc.kill()
                raise RuntimeError(f"tcpdump did not start: {said.decode(errors='replace')}")
            said += chunk
        self.report = said

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            err = b""
        return (self.report + (err or b"")).decode(errors="replace")


def cli_analyze(path: Path, pure: bool) -> dict[str, Any]:
    """`migshark analyze --json` of this checkout, on the C lane or on pure Python."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("MIGSHARK_PURE_PYTHON", None)
    if pure:
        env["MIGSHARK_PURE_PYTHON"] = "1"
    done = subprocess.run([sys.executable, "-m", "migshark", "analyze", "--json", str(path)],
                          capture_output=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert done.returncode in (0, 1), done.stderr.decode(errors="replace")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def assert_qemu_hashes(result: dict[str, Any], truth: dict[str, Any], port: int) -> None:
    """The bitmaps of the migration to `port` are QEMU's. The capture holds every TCP
    connection on the host, so other tests' migrations may be in it too: that is
    the point of the exercise, and theirs are not compared."""
    mine = [m for m in result["migrations"] if m["stream"].split(" #")[0].endswith(f":{port}")]
    assert len(mine) == 1, [m["stream"] for m in result["migrations"]]
    ours = {(b["node"], b["name"]): b for b in mine[0]["bitmaps"]}
    theirs = {(b["node"], b["name"]): b for b in truth["bitmaps"]}
    assert set(ours) == set(theirs)
    for key, expected in theirs.items():
        assert ours[key]["complete"] is True, key
        for name in COMPARED:
            assert ours[key][name] == expected[name], (key, name)


def other_connections(path: Path, migration_port: int) -> int:
    """Connections in the capture that carry data and are not the migration's."""
    with_data = set()
    with CaptureReader(path) as reader:
        for frame in reader:
            data = frame.data
            if len(data) < 54 or data[12:14] != b"\x08\x00" or data[23] != 6:
                continue  # lo's frames are Ethernet; only IPv4 TCP is counted
            ihl = (data[14] & 15) * 4
            total = int.from_bytes(data[16:18], "big")
            tcp = 14 + ihl
            ports = (int.from_bytes(data[tcp:tcp + 2], "big"),
                     int.from_bytes(data[tcp + 2:tcp + 4], "big"))
            payload = total - ihl - (data[tcp + 12] >> 4) * 4
            if migration_port in ports or payload <= 0:
                continue
            with_data.add((bytes(data[26:34]), min(ports), max(ports)))
    return len(with_data)


def capture_busy_migration(workdir: Path, qemu: Any) -> tuple[Path, Any]:
    """One run: background connections, the capture, the migration; (pcap, result).
    Raises UnusableRun when tcpdump lost frames of the migration itself (the kernel
    drops frames when a loaded machine cannot keep up)."""
    from testkit.realqemu.harness import PRESETS, UnusableRun, read_tcp_flow, run_migration

    workdir.mkdir(parents=True, exist_ok=True)
    pcap = workdir / "busy.pcap"
    traffic = BackgroundTraffic()
    captures: list[AllTcpCapture] = []
    try:
        traffic.open(BACKGROUND_CONNECTIONS // 2)

        def capture_then_migrate(dest_uri: str) -> str:
            # Runs once the destination listens: from here on everything is recorded;
            # the second half of the connections opens with the capture running.
            captures.append(AllTcpCapture(pcap))
            traffic.open(BACKGROUND_CONNECTIONS - BACKGROUND_CONNECTIONS // 2)
            time.sleep(0.5)  # let every connection exchange data before migrating
            return dest_uri

        result = run_migration(PRESETS["precopy"], workdir / "run", capture=False,
                               via=capture_then_migrate, timeout=120, attempts=1,
                               source=qemu, dest=qemu)
        time.sleep(0.3)
    finally:
        traffic.stop()
        report = captures[0].stop() if captures else ""
    assert captures, "the harness never called via(): no capture was made"
    assert result.port is not None, "the harness reported no migration port"
    flow = read_tcp_flow(pcap, result.port)
    if flow.gaps or not flow.closed or not flow.to_server.startswith(b"QEVM"):
        raise UnusableRun(f"the migration's frames are not all captured: {report.strip()}")
    return pcap, result


@pytest.mark.qemu
@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_migration_among_400_connections_matches_qemu_on_both_lanes(version, tmp_path,
                                                                    monkeypatch):
    require_tools("tcpdump")
    require_root()
    qemu = require_qemu(version)
    from testkit.realqemu.harness import UnusableRun

    for attempt in range(1, 4):
        try:
            pcap, result = capture_busy_migration(tmp_path / f"attempt-{attempt}", qemu)
            break
        except UnusableRun:
            if attempt == 3:
                raise
    truth = result.ground_truth
    assert truth["qemu_version"].startswith(version + ".")
    assert other_connections(pcap, result.port) >= BACKGROUND_CONNECTIONS

    for pure in (False, True):
        assert_qemu_hashes(cli_analyze(pcap, pure), truth, result.port)
    events = both_lanes(pcap, monkeypatch)
    assert sum(1 for event in events if event[1] == "Record") > 1000
