"""`migshark live`: the connection tracker fed from captured segments, the root check, and a
real sniffed migration (root + real QEMU) compared with QEMU's own hashes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from migshark.analyzer import cli
from migshark.analyzer.analysis import AnalysisOptions, CaptureDemux, analyze_path
from migshark.analyzer.capture import ACK, FIN, PSH, RST, SYN, TcpSegment
from migshark.analyzer.connections import (
    FORWARD,
    CaptureConnections,
    Connection,
    ConnectionKind,
)
from migshark.analyzer.pcapwriter import PcapngWriter
from migshark.analyzer.records import Finding
from migshark.analyzer.returnpath import ReturnPathMessage, build_message
from migshark.dissectors import grammar as g
from testkit.paths import REPO_ROOT
from testkit.processes import interrupt_after, reap, wait_for_banner
from testkit.realqemu.harness import PRESETS, run_migration
from testkit.require import require_root, require_tools
from testkit.synthetic import precopy_stream

SRC, DST = "10.0.0.1", "10.0.0.2"


class _Conn:
    """Segments of one TCP connection, numbered the way a capture would see them."""

    def __init__(self, sport: int, dport: int) -> None:
        self.sport, self.dport = sport, dport
        self.seq = {True: 1000, False: 5000}

    def seg(self, forward: bool, payload: bytes = b"", flags: int = ACK) -> TcpSegment:
        src, dst = (SRC, DST) if forward else (DST, SRC)
        sport, dport = (self.sport, self.dport) if forward else (self.dport, self.sport)
        seq = self.seq[forward]
        self.seq[forward] += len(payload) + (1 if flags & (SYN | FIN) else 0)
        return TcpSegment(0.0, src, sport, dst, dport, seq, self.seq[not forward], flags,
                          memoryview(payload), 65535)

    def handshake(self) -> list[TcpSegment]:
        return [self.seg(True, flags=SYN), self.seg(False, flags=SYN | ACK), self.seg(True)]


def test_tracker_decodes_return_path_labels_multifd_and_ends_on_reset() -> None:
    seen: list[tuple[str, str]] = []
    labelled: list[tuple[str, str]] = []
    ended: list[Connection] = []
    tracker = CaptureConnections(
        AnalysisOptions(port=4444),
        lambda stream, event: seen.append(
            (stream.name, event.code if isinstance(event, Finding) else event.kind)),
        lambda connection, finding: labelled.append((connection.name, finding.code)),
        ended.append)
    main, multifd = _Conn(40000, 4444), _Conn(40001, 4444)
    stream = precopy_stream()
    segments = main.handshake() + multifd.handshake()
    segments.append(main.seg(True, stream[:3000], PSH | ACK))
    segments.append(multifd.seg(True, (0x11223344).to_bytes(4, "big") + b"\0" * 400))
    pong = build_message(ReturnPathMessage.PONG, b"\0\0\0\x07")
    segments.append(main.seg(False, pong))
    segments.append(main.seg(True, stream[3000:], PSH | ACK))
    # the destination resets: no FIN will ever follow, the migration must end now
    segments.append(main.seg(False, flags=RST))
    for segment in segments:
        tracker.segment(segment)
    assert len(tracker.streams) == 1, "the multifd channel is not a migration"
    migration = tracker.connection_of(tracker.streams[0])
    assert migration is not None and migration.kind is ConnectionKind.MIGRATION
    assert ended == [migration]
    channels = tracker.of_kind(ConnectionKind.MULTIFD)
    assert [c.flow.sport for c in channels if c.flow] == [40001]
    assert labelled == [(channels[0].name, "multifd-channel")]
    name = tracker.streams[0].name
    assert (name, "rp-message") in seen
    resets = [f for f in tracker.streams[0].findings if f.code == "peer-reset"]
    assert len(resets) == 1 and "from the destination (10.0.0.2:4444)" in resets[0].message
    assert migration.return_path.messages == {"PONG": 1}
    assert tracker.streams[0].result()["complete"] is True
    result = migration.result("live:lo", "live")
    assert result is not None and result["migrations"][0]["return_path"]["bytes"] == len(pong)
    # the multifd channel ends with its FIN, as a connection without a report
    for segment in [multifd.seg(True, flags=FIN | ACK)]:
        tracker.segment(segment)
    assert ended[1:] == channels and channels[0].result("live:lo", "live") is None
    assert channels[0].closed == {FORWARD} and migration.closed == set()


def test_tracker_ignores_other_traffic_and_claims_by_port_mid_stream() -> None:
    """Without --port only magic makes a connection; with it the port claims a flow
    whose start the capture missed (decoded after a gap)."""
    stream = precopy_stream()
    unrelated, mid = _Conn(40000, 22), _Conn(40001, 4444)
    by_magic = CaptureConnections(AnalysisOptions())
    for segment in unrelated.handshake() + [unrelated.seg(True, b"SSH-2.0-x\r\n", PSH | ACK),
                                            unrelated.seg(False, b"SSH-2.0-y\r\n", PSH | ACK)]:
        by_magic.segment(segment)
    assert by_magic.connections == []
    # the first 100 bytes went by before the capture began: no SYN, no QEVM magic
    mid.seq[True] += 100
    segments = [mid.seg(True, stream[100:], PSH | ACK), mid.seg(True, flags=FIN | ACK)]
    by_port = CaptureConnections(AnalysisOptions(port=4444))
    offline = CaptureDemux(AnalysisOptions(port=4444))
    for segment in segments:
        by_port.segment(segment)
        offline.segment(segment)
    by_port.finish()
    offline.finish()
    assert len(by_port.streams) == 1 and by_port.connections[0].ended
    # decoded as offline analysis decodes the same flow
    assert by_port.streams[0].result() == offline.streams[0].result()
    assert by_port.streams[0].result()["stream_bytes"] == len(stream) - 100


def test_reset_after_the_destination_closed_still_ends_the_migration() -> None:
    """FIN from the destination, then its RST to the source's next bytes: the
    reassembler has closed that direction, yet the migration must end."""
    ended: list[Connection] = []
    tracker = CaptureConnections(AnalysisOptions(), on_end=ended.append)
    conn = _Conn(40000, 4444)
    stream = precopy_stream(eof=False)
    for segment in conn.handshake() + [conn.seg(True, stream[:2000], PSH | ACK),
                                       conn.seg(False, flags=FIN | ACK),
                                       conn.seg(True, stream[2000:], PSH | ACK)]:
        tracker.segment(segment)
    assert ended == []
    tracker.segment(conn.seg(False, flags=RST))
    assert ended == tracker.connections
    assert "peer-reset" in [f.code for f in tracker.streams[0].findings]


def test_pcapng_writer_round_trips_through_the_reader(tmp_path: Path) -> None:
    # odd lengths exercise the block padding
    frame = bytearray(range(61))
    path = tmp_path / "x.pcapng"
    writer = PcapngWriter(open(path, "wb"), 1, "lo")
    writer.write(1.5, bytes(frame))
    writer.write(2.25, bytes(frame) + b"x")
    writer.close()
    from migshark.analyzer.capture import CaptureReader

    with CaptureReader(path) as reader:
        frames = [(f.timestamp, bytes(f.data)) for f in reader]
        assert reader.interfaces[0].name == "lo"
    assert frames == [(1.5, bytes(frame)), (2.25, bytes(frame) + b"x")]


def test_live_says_it_needs_root(monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["live", "-i", "lo", "--once"]) == 2
    err = capsys.readouterr().err
    assert "needs root" in err and "Traceback" not in err


def test_live_bad_interface_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    require_root()
    assert cli.main(["live", "-i", "no-such-if0", "--once"]) == 2
    err = capsys.readouterr().err
    assert "no-such-if0" in err and "Traceback" not in err


def _start_live(port: int, pcapng: Path, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "migshark", "live", "-i", "lo", "--port", str(port),
         "--json", "-w", str(pcapng), *extra],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # frames are captured from the moment it says so, like tcpdump's "listening on"
    wait_for_banner(proc, b"listening on", 15, "live")
    return proc


def _sniff_real_migration(tmp_path: Path, preset: str) -> dict:
    require_root()
    require_tools("qemu-system-x86_64", "qemu-img", "tcpdump")
    procs: list[subprocess.Popen[bytes]] = []
    pcapng = tmp_path / "live.pcapng"

    def via(dest_uri: str) -> str:
        procs.append(_start_live(int(dest_uri.rsplit(":", 1)[1]), pcapng, "--once"))
        return dest_uri

    try:
        result = run_migration(PRESETS[preset], tmp_path, capture=False, timeout=30, via=via)
        try:
            out, err = procs[0].communicate(timeout=10)
        except subprocess.TimeoutExpired:
            # Ctrl-C makes it report what it has: show that instead of a bare timeout
            procs[0].send_signal(signal.SIGINT)
            out, err = procs[0].communicate(timeout=5)
            raise AssertionError(f"live did not see the migration end: {out[-3000:]!r} "
                                 f"{err[-2000:]!r}") from None
    finally:
        for proc in procs:
            reap(proc)
    assert procs[0].returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 1, "--once prints exactly one migration"
    report = json.loads(lines[0])
    assert report["kernel"]["drops"] == 0
    assert report["kernel"]["packets"] > 0
    codes = {f["code"] for f in report["migrations"][0]["findings"]}
    assert not codes & {"capture-gap", "kernel-drops", "truncated"}, codes
    truth = result.ground_truth["bitmaps"]
    got = {(b["node"], b["name"]): b for b in report["migrations"][0]["bitmaps"]}
    assert len(got) == len(truth) > 0
    for bitmap in truth:
        mine = got[(bitmap["node"], bitmap["name"])]
        assert (mine["sha256"], mine["dirty_bytes"]) == (bitmap["sha256"], bitmap["dirty_bytes"])
    # what -w wrote is a capture of the same migration
    offline = analyze_path(pcapng, AnalysisOptions()).as_json()
    assert sorted(b["sha256"] for b in offline["bitmaps"]) == sorted(b["sha256"] for b in truth)
    return report


@pytest.mark.qemu
def test_live_precopy_real_qemu(tmp_path: Path) -> None:
    _sniff_real_migration(tmp_path, "precopy")


@pytest.mark.qemu
def test_live_postcopy_real_qemu(tmp_path: Path) -> None:
    report = _sniff_real_migration(tmp_path, "postcopy")
    assert report["migrations"][0]["phases"][-1] == "postcopy-run"


@pytest.mark.qemu
def test_live_decodes_a_real_return_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    from testkit.realqemu import harness

    def caps_with_return_path(qmp: harness.QMPClient) -> None:
        qmp.cmd("migrate-set-capabilities", capabilities=[
            {"capability": name, "state": True}
            for name in ("dirty-bitmaps", "events", "return-path")])

    monkeypatch.setattr(harness, "_set_caps", caps_with_return_path)
    report = _sniff_real_migration(tmp_path, "postcopy-1node")
    # shaped as the proxy reports it: PONG and SHUT are 8 bytes each on the wire
    return_path = report["migrations"][0]["return_path"]
    assert return_path == {"bytes": 16, "messages": {"PONG": 1, "SHUT": 1}, "shut_code": 0}


@pytest.mark.qemu
def test_live_labels_real_multifd_channels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    from testkit.realqemu import harness

    def caps_with_multifd(qmp: harness.QMPClient) -> None:
        qmp.cmd("migrate-set-capabilities", capabilities=[
            {"capability": name, "state": True}
            for name in ("dirty-bitmaps", "events", "multifd")])

    monkeypatch.setattr(harness, "_set_caps", caps_with_multifd)
    report = _sniff_real_migration(tmp_path, "precopy")
    # QEMU 7.2 opens multifd-channels (default 2) extra connections to the same port
    assert len(report["multifd_channels"]) == 2


def test_text_output_prints_records_as_they_happen(monkeypatch: pytest.MonkeyPatch) -> None:
    from migshark.analyzer.live import LiveCapture

    class Args:
        iface, port, bpf, json, once, write = "lo", None, None, False, True, None

    capture = LiveCapture(Args())  # type: ignore[arg-type]
    capture.out = io.StringIO()
    conn = _Conn(40000, 4444)
    stream = g.build_file_header() + g.build_configuration("pc-i440fx-7.2") + g.build_eof()
    for segment in conn.handshake() + [conn.seg(True, stream, PSH | ACK),
                                       conn.seg(True, flags=FIN | ACK)]:
        capture.tracker.segment(segment)
    text = capture.out.getvalue()
    assert "configuration" in text and "pc-i440fx-7.2" in text
    assert "Migration stream" in text  # the per-migration summary at FIN
    assert capture.stop is True


def test_ctrl_c_reports_the_unfinished_migration(tmp_path: Path) -> None:
    """Bytes sniffed on lo from a connection that is still open when Ctrl-C comes."""
    require_root()
    import socket

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    proc = _start_live(port, tmp_path / "partial.pcapng")
    try:
        client = socket.create_connection(("127.0.0.1", port))
        peer, _ = server.accept()
        partial = precopy_stream()[:700]  # the bitmaps started, nothing sent for them
        # the frames are on lo once the peer has them
        out, err = interrupt_after(proc, client, peer, partial)
        client.close()
        peer.close()
    finally:
        server.close()
        reap(proc)
    assert b"Traceback" not in err, err.decode()
    report = json.loads(out.decode().splitlines()[0])
    migration = report["migrations"][0]
    assert migration["complete"] is False
    assert migration["stream_bytes"] == len(partial)
    assert {b["name"] for b in report["migrations"][0]["bitmaps"]} == {"inc0", "inc1"}
    assert {b["status"] for b in report["migrations"][0]["bitmaps"]} == {"incomplete"}


def test_kernel_drops_become_findings_on_open_migrations() -> None:
    import struct
    from types import SimpleNamespace

    from migshark.analyzer.live import PACKET_STATISTICS, SOL_PACKET, LiveCapture

    class Args:
        iface, port, bpf, json, once, write = "lo", None, None, False, False, None

    class PacketSocket:
        def getsockopt(self, level: int, option: int, size: int) -> bytes:
            assert (level, option, size) == (SOL_PACKET, PACKET_STATISTICS, 8)
            return struct.pack("II", 120, 7)  # struct tpacket_stats: packets, drops

    capture = LiveCapture(Args())  # type: ignore[arg-type]
    capture.out = io.StringIO()
    conn = _Conn(40000, 4444)
    for segment in conn.handshake() + [conn.seg(True, precopy_stream()[:500], PSH | ACK)]:
        capture.tracker.segment(segment)
    capture.sock = SimpleNamespace(ins=PacketSocket())  # type: ignore[assignment]  # stand-in
    capture._poll_drops()
    drops = [f for f in capture.tracker.streams[0].findings if f.code == "kernel-drops"]
    assert len(drops) == 1 and drops[0].severity.label == "error"
    assert "7 packets" in drops[0].message
    assert (capture.packets_total, capture.drops_total) == (120, 7)
    assert "kernel-drops" in capture.out.getvalue()  # printed as it happens
