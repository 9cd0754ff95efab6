"""`migshark proxy` between two real QEMUs (TCP and unix socket), plus its pure parts."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from migshark.analyzer.analysis import AnalysisOptions
from migshark.analyzer.connections import (
    BACKWARD,
    FORWARD,
    MULTIFD_MAGIC_BYTES,
    Connection,
    ConnectionKind,
    ConnectionTable,
)
from migshark.analyzer.proxy import AddressError, parse_address
from migshark.analyzer.returnpath import ReturnPathMessage, build_message
from migshark.dissectors import grammar as g
from testkit.paths import REPO_ROOT
from testkit.processes import interrupt_after, reap, wait_for_banner
from testkit.realqemu.harness import PRESETS, run_migration
from testkit.require import require_tools
from testkit.synthetic import precopy_stream

QEMU_TOOLS = ("qemu-system-x86_64", "qemu-img")


def test_parse_address() -> None:
    assert str(parse_address("tcp:127.0.0.1:4444")) == "tcp:127.0.0.1:4444"
    assert parse_address("tcp:[::1]:5").host == "::1"
    assert parse_address("unix:/tmp/x.sock").path == "/tmp/x.sock"
    for bad in ("127.0.0.1:4", "tcp:host", "tcp::5", "udp:a:1", "unix:", "tcp:a:99999"):
        with pytest.raises(AddressError):
            parse_address(bad)


def test_connection_labels_multifd_and_decodes_return_path() -> None:
    labelled: list[tuple[str, str]] = []
    table = ConnectionTable(AnalysisOptions(),
                            on_finding=lambda c, f: labelled.append((c.name, f.code)))
    multifd = table.open("c2", claim=True)
    multifd.data(FORWARD, MULTIFD_MAGIC_BYTES[:2])
    multifd.data(FORWARD, MULTIFD_MAGIC_BYTES[2:] + b"\0" * 5000)
    multifd.end()
    assert multifd.kind is ConnectionKind.MULTIFD and multifd.stream is None
    assert [n.code for n in multifd.notes] == ["multifd-channel"]
    assert labelled == [("c2", "multifd-channel")]
    assert multifd.forward_bytes == 4 + 5000 and multifd.result("test", "proxy") is None

    main = table.open("c1", claim=True)
    # a return-path byte that overtakes the stream's first bytes is kept in order
    main.data(BACKWARD, build_message(ReturnPathMessage.SHUT, b"\0\0\0\3")[:3])
    main.data(FORWARD, g.build_file_header() + g.build_eof())
    main.data(BACKWARD, build_message(ReturnPathMessage.SHUT, b"\0\0\0\3")[3:])
    main.end()
    result = main.result("test", "proxy")
    assert result is not None
    assert result["migrations"][0]["return_path"]["messages"] == {"SHUT": 1}
    assert result["migrations"][0]["return_path"]["shut_code"] == 3
    shut = build_message(ReturnPathMessage.SHUT, b"1234")
    assert result["migrations"][0]["return_path"]["bytes"] == len(shut)
    assert "return-path-error" in [f["code"] for f in result["migrations"][0]["findings"]]
    assert table.streams == [main.stream]
    worst = table.worst_severity()
    assert worst is not None and worst.label == "error"


def test_connection_claimed_or_not_and_reset_by_either_side() -> None:
    """Whatever connects to the proxy is claimed: a wrong magic is the decoder's finding.
    Unclaimed, it is unknown and has no report. A reset is noted once, by its sender."""
    claimed = Connection("c", AnalysisOptions(), claim=True)
    claimed.data(FORWARD, b"GET / HTTP/1.1\r\n")
    claimed.reset(BACKWARD)
    claimed.reset(FORWARD)  # the second side's error after the first reset: no new note
    claimed.end()
    assert claimed.kind is ConnectionKind.MIGRATION
    result = claimed.result("test", "proxy")
    assert result is not None
    codes = [f["code"] for f in result["migrations"][0]["findings"]]
    assert codes.count("peer-reset") == 1
    reset = next(f for f in result["migrations"][0]["findings"] if f["code"] == "peer-reset")
    assert reset["message"].startswith("the destination reset the connection")
    assert result["migrations"][0]["complete"] is False

    unknown = Connection("u", AnalysisOptions())
    unknown.data(FORWARD, b"SSH-2.0-OpenSSH\r\n")
    unknown.data(BACKWARD, b"SSH-2.0-x\r\n")
    unknown.end()
    assert unknown.kind is ConnectionKind.UNKNOWN and unknown.result("t", "proxy") is None
    # shorter than a magic, then closed: still unknown, never a crash
    short = Connection("s", AnalysisOptions())
    short.data(FORWARD, b"QE")
    short.end()
    assert short.kind is ConnectionKind.UNKNOWN and short.stream is None


def _start_proxy(listen: str, to: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "migshark", "proxy", "--listen", listen, "--to", to,
         "--json", "--once"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = wait_for_banner(proc, b"\n", 10, "proxy").decode().splitlines()[0]
    assert "listening on" in line, line
    # "migshark proxy: listening on tcp:127.0.0.1:PORT, forwarding to ..."
    return proc, line.split("listening on ", 1)[1].split(",", 1)[0]


def _migrate_through_proxy(tmp_path: Path, incoming: str | None,
                           preset: str = "precopy") -> dict:

    proxies: list[subprocess.Popen[bytes]] = []

    def via(dest_uri: str) -> str:
        listen = f"unix:{tmp_path}/proxy.sock" if incoming else "tcp:127.0.0.1:0"
        proc, bound = _start_proxy(listen, dest_uri)
        proxies.append(proc)
        return bound

    try:
        result = run_migration(PRESETS[preset], tmp_path, capture=False, timeout=30,
                               incoming=incoming, via=via)
        proc = proxies[0]
        out, err = proc.communicate(timeout=15)
    finally:
        for proc in proxies:
            reap(proc)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 1, out
    report = json.loads(lines[0])
    truth = result.ground_truth
    assert truth["dest_outcome"] == "completed"
    got = {(b["node"], b["name"]): b for b in report["migrations"][0]["bitmaps"]}
    assert len(got) == len(truth["bitmaps"]) == len(PRESETS[preset].drives[0].bitmaps) + sum(
        len(d.bitmaps) for d in PRESETS[preset].drives[1:])
    for bitmap in truth["bitmaps"]:
        mine = got[(bitmap["node"], bitmap["name"])]
        assert mine["sha256"] == bitmap["sha256"], bitmap["name"]
        assert mine["dirty_bytes"] == bitmap["dirty_bytes"], bitmap["name"]
        # the destination loaded exactly what the source had: bytes arrived unchanged
        assert bitmap["dest_sha256"] == bitmap["sha256"], bitmap["name"]
    assert report["migrations"][0]["complete"] is True
    assert not [f for f in report["migrations"][0]["findings"] if f["severity"] == "error"]
    return report


@pytest.mark.qemu
def test_proxy_tcp_real_qemu(tmp_path: Path) -> None:
    require_tools(*QEMU_TOOLS)
    _migrate_through_proxy(tmp_path, None)


@pytest.mark.qemu
def test_proxy_unix_socket_real_qemu(tmp_path: Path) -> None:
    require_tools(*QEMU_TOOLS)
    _migrate_through_proxy(tmp_path, f"unix:{tmp_path}/dest.sock")


@pytest.mark.qemu
def test_proxy_postcopy_real_qemu(tmp_path: Path) -> None:
    require_tools(*QEMU_TOOLS)
    report = _migrate_through_proxy(tmp_path, None, "postcopy-1node")
    assert report["migrations"][0]["phases"][-2:] == ["postcopy-listen", "postcopy-run"]


@pytest.mark.qemu
def test_proxy_decodes_a_real_return_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """With the return-path capability the destination talks back; the proxy decodes it."""
    require_tools(*QEMU_TOOLS)
    from testkit.realqemu import harness

    def caps_with_return_path(qmp: harness.QMPClient) -> None:
        qmp.cmd("migrate-set-capabilities", capabilities=[
            {"capability": name, "state": True}
            for name in ("dirty-bitmaps", "events", "return-path")])

    monkeypatch.setattr(harness, "_set_caps", caps_with_return_path)
    report = _migrate_through_proxy(tmp_path, None, "postcopy-1node")
    # postcopy pings the destination once (PONG) and the destination ends with SHUT 0
    assert report["migrations"][0]["return_path"]["messages"] == {"PONG": 1, "SHUT": 1}
    assert report["migrations"][0]["return_path"]["shut_code"] == 0
    assert not [f for f in report["migrations"][0]["findings"] if f["section"] == "return-path"]


@pytest.mark.qemu
def test_proxy_forwards_multifd_channels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    """multifd opens extra connections to the same address; each is forwarded, and the
    main stream still yields QEMU's bitmaps."""
    require_tools(*QEMU_TOOLS)
    from testkit.realqemu import harness

    def caps_with_multifd(qmp: harness.QMPClient) -> None:
        qmp.cmd("migrate-set-capabilities", capabilities=[
            {"capability": name, "state": True}
            for name in ("dirty-bitmaps", "events", "multifd")])

    monkeypatch.setattr(harness, "_set_caps", caps_with_multifd)
    # the migration only completes if every channel reached the destination
    _migrate_through_proxy(tmp_path, None, "precopy")


def _fake_destination() -> tuple[socket.socket, str]:
    server = socket.create_server(("127.0.0.1", 0))
    return server, f"tcp:127.0.0.1:{server.getsockname()[1]}"


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_proxy_forwards_byte_for_byte_and_passes_half_close_on() -> None:
    server, dest = _fake_destination()
    proc, bound = _start_proxy("tcp:127.0.0.1:0", dest)
    stream = precopy_stream()
    reply = build_message(ReturnPathMessage.PONG, b"\0\0\0\1") + build_message(
        ReturnPathMessage.SHUT, b"\0\0\0\0")
    try:
        host, port = bound.removeprefix("tcp:").rsplit(":", 1)
        client = socket.create_connection((host, int(port)), timeout=10)
        peer, _ = server.accept()
        peer.settimeout(10)
        for i in range(0, len(stream), 777):  # odd chunks: the framing must not matter
            client.sendall(stream[i : i + 777])
        client.shutdown(socket.SHUT_WR)
        got = _read_all(peer)  # ends only if the proxy passed the half-close on
        peer.sendall(reply)
        peer.close()
        back = _read_all(client)
        client.close()
        out, err = proc.communicate(timeout=15)
    finally:
        server.close()
        reap(proc)
    assert got == stream
    assert back == reply
    assert proc.returncode == 0, err.decode()
    report = json.loads(out.decode().splitlines()[0])
    assert report["migrations"][0]["complete"] is True
    assert {b["name"] for b in report["migrations"][0]["bitmaps"]} == {"inc0", "inc1"}
    return_path = report["migrations"][0]["return_path"]
    assert return_path == {"bytes": len(reply), "messages": {"PONG": 1, "SHUT": 1}, "shut_code": 0}


def test_proxy_ctrl_c_reports_the_open_connection() -> None:
    server, dest = _fake_destination()
    proc, bound = _start_proxy("tcp:127.0.0.1:0", dest)
    partial = precopy_stream()[:700]
    try:
        host, port = bound.removeprefix("tcp:").rsplit(":", 1)
        client = socket.create_connection((host, int(port)), timeout=10)
        peer, _ = server.accept()
        out, err = interrupt_after(proc, client, peer, partial)
        client.close()
        peer.close()
    finally:
        server.close()
        reap(proc)
    assert b"Traceback" not in err, err.decode()
    report = json.loads(out.decode().splitlines()[0])
    assert report["migrations"][0]["complete"] is False
    assert {b["status"] for b in report["migrations"][0]["bitmaps"]} == {"incomplete"}


def test_proxy_text_output_reports_each_connection() -> None:
    """In-process, text mode: a multifd channel's label and close line, the migration's
    findings as they happen and its report with the return path, all through
    analyzer.report."""
    import io
    import threading

    from migshark.analyzer.proxy import Output, ProxyServer

    server, dest = _fake_destination()
    out = io.StringIO()
    proxy = ProxyServer(parse_address("tcp:127.0.0.1:0"), parse_address(dest),
                        Output(out, as_json=False), once=False)
    serving = threading.Thread(target=proxy.serve, daemon=True)
    serving.start()
    address = (proxy.bound.host, proxy.bound.port)
    shut = build_message(ReturnPathMessage.SHUT, b"\0\0\0\0")
    try:
        channel = socket.create_connection(address, timeout=10)
        channel_peer, _ = server.accept()
        channel.sendall(MULTIFD_MAGIC_BYTES + bytes(1000))
        channel.shutdown(socket.SHUT_WR)
        assert len(_read_all(channel_peer)) == 1004
        channel_peer.close()
        channel.close()
        client = socket.create_connection(address, timeout=10)
        peer, _ = server.accept()
        peer.settimeout(10)
        client.sendall(precopy_stream()[:-300])  # cut: the migration ends with an error
        client.shutdown(socket.SHUT_WR)
        _read_all(peer)
        peer.sendall(shut)
        peer.close()
        _read_all(client)
        client.close()
        assert proxy.connections[1].done.wait(15), "the migration's report never came"
        proxy.interrupted.set()
        serving.join(15)
    finally:
        proxy.interrupted.set()
        server.close()
    assert not serving.is_alive()
    text = out.getvalue()
    assert "multifd channel, pages not decoded" in text
    assert "connection 1 (" in text and "multifd channel closed, 1,004 bytes forwarded" in text
    assert "connection 2 (" in text and "[error] truncated:" in text
    assert "\nMigration stream connection 2 (" in text
    assert f"  return path  : {len(shut)} bytes; messages: SHUT x1" in text
    assert proxy.table.worst_severity() is not None
    assert [c.kind for c in proxy.table.connections] == [ConnectionKind.MULTIFD,
                                                         ConnectionKind.MIGRATION]
