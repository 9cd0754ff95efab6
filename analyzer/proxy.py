"""`migshark proxy`: forward a migration between two QEMUs and analyse it in transit.

The source migrates to the proxy (`--listen`), the proxy connects to the real
destination (`--to`) and copies every byte both ways unchanged, return path included.
Forwarding comes first: each direction has its own thread that only receives, sends
and hands the very same bytes object to a queue; one analysis thread per connection
drains that queue into a MigrationStream (source to destination) and a
ReturnPathDecoder (destination to source). A slow analysis therefore never slows the
migration; it only lets the queue grow.

Addresses are `tcp:HOST:PORT` (port 0 picks a free port, printed on stderr) or
`unix:PATH`, the spelling QEMU's `migrate` and `-incoming` use. Every accepted
connection is forwarded and analysed on its own, so multifd channels (extra
connections to the same address) are forwarded too; what each connection carries,
its return path and its results are the connection tracker's
(analyzer.connections, shared with live capture). This module only forwards.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

from migshark.analyzer import report
from migshark.analyzer.analysis import AnalysisOptions, EventSink, MigrationStream
from migshark.analyzer.connections import (
    BACKWARD,
    FORWARD,
    Connection,
    ConnectionKind,
    ConnectionTable,
    Direction,
)
from migshark.analyzer.records import Event, Finding, Record, Severity

RECV_SIZE = 1 << 20
ACCEPT_POLL = 0.05
EXIT_OK, EXIT_ERRORS, EXIT_UNUSABLE = 0, 1, 2


class AddressError(ValueError):
    pass


@dataclass(frozen=True)
class Address:
    kind: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_address(text: str) -> Address:
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise AddressError(f"{text!r}: expected tcp:HOST:PORT or unix:PATH")
    if kind == "unix":
        return Address("unix", path=rest)
    if kind != "tcp":
        raise AddressError(f"{text!r}: unknown transport {kind!r} (tcp or unix)")
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise AddressError(f"{text!r}: expected tcp:HOST:PORT")
    return Address("tcp", host=host, port=int(port))


def listen(address: Address) -> socket.socket:
    if address.kind == "unix":
        try:
            if stat.S_ISSOCK(os.stat(address.path).st_mode):
                os.unlink(address.path)  # a stale socket from an earlier run
        except FileNotFoundError:
            pass
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(address.path)
    else:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        server = socket.socket(family, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((address.host, address.port))
    server.listen(16)
    return server


def connect(address: Address, timeout: float = 10.0) -> socket.socket:
    if address.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address.path)
    else:
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
    sock.settimeout(None)
    _nodelay(sock)
    return sock


def bound_address(server: socket.socket, address: Address) -> Address:
    if address.kind == "unix":
        return address
    host, port = server.getsockname()[:2]
    return Address("tcp", host=host, port=port)


def _peer_name(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(peer, tuple):
        host = f"[{peer[0]}]" if ":" in peer[0] else peer[0]
        return f"{host}:{peer[1]}"
    return "unix socket"


def _nodelay(sock: socket.socket) -> None:
    # Return-path messages are tiny and latency-bound (postcopy page requests): the
    # extra hop must not hold them back for Nagle.
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Output:
    """Serialises lines from several analysis threads."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        with self.lock:
            self.out.write(text + "\n")
            self.out.flush()


class ProxiedConnection:
    """Two forwarding threads and one analysis thread for one accepted connection."""

    def __init__(self, number: int, client: socket.socket, target: Address,
                 table: ConnectionTable, output: Output, path: str) -> None:
        self.client = client
        self.target = target
        self.output = output
        self.path = path
        self.name = f"connection {number} ({_peer_name(client)} -> {target})"
        self.queue: queue.SimpleQueue[tuple[Direction, bytes | None, float]] = (
            queue.SimpleQueue())
        # whatever connects to the proxy is meant to migrate: a wrong magic is a finding
        self.analysis: Connection = table.open(self.name, claim=True)
        self.server: socket.socket | None = None
        self.error: str | None = None
        self.threads: list[threading.Thread] = []
        self.done = threading.Event()
        self.result: dict[str, Any] | None = None
        self.worst: Severity | None = None
        self._lock = threading.Lock()
        self._pumps_running = 2

    def start(self) -> None:
        try:
            self.server = connect(self.target)
        except OSError as error:
            self.error = f"cannot connect to {self.target}: {error.strerror or error}"
            print(f"migshark proxy: {self.name}: {self.error}", file=sys.stderr, flush=True)
            self.client.close()
            self.done.set()
            return
        _nodelay(self.client)
        forward = threading.Thread(target=self._pump, args=(self.client, self.server, FORWARD),
                                   name=f"{self.name} fwd")
        backward = threading.Thread(target=self._pump,
                                    args=(self.server, self.client, BACKWARD),
                                    name=f"{self.name} back")
        analyse = threading.Thread(target=self._analyse, name=f"{self.name} analysis",
                                   daemon=True)
        self.threads = [forward, backward, analyse]
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        """Tear the connection down (Ctrl-C): the pumps see EOF or an error and end."""
        for sock in (self.client, self.server):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _pump(self, src: socket.socket, dst: socket.socket, direction: Direction) -> None:
        put = self.queue.put
        recv = src.recv
        send = dst.sendall
        try:
            while True:
                chunk = recv(RECV_SIZE)
                if not chunk:
                    break
                send(chunk)
                put((direction, chunk, time.time()))
            # pass the half-close on: QEMU's side sees EOF exactly as without us
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            put((direction, None, time.time()))
            self._pump_ended()
        except OSError:
            # A reset on either socket: make the peer see a reset as well, not a clean EOF.
            put((direction, b"", time.time()))
            for sock in (src, dst):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            put((direction, None, time.time()))
            self._pump_ended()

    def _pump_ended(self) -> None:
        with self._lock:
            self._pumps_running -= 1
            last = self._pumps_running == 0
        if last:
            for sock in (self.client, self.server):
                if sock is not None:
                    sock.close()

    def _analyse(self) -> None:
        ended = 0
        broken = False
        reset: set[Direction] = set()
        while ended < 2:
            direction, chunk, timestamp = self.queue.get()
            if chunk is None:
                ended += 1
                if direction not in reset:
                    self.analysis.close(direction)
                continue
            if broken:
                continue
            try:
                if not chunk:
                    reset.add(direction)
                    self.analysis.reset(direction)
                else:
                    self.analysis.data(direction, chunk, timestamp)
            except Exception as error:  # noqa: BLE001 - a bug here must not stop forwarding
                self.error = f"analysis failed: {error!r}"
                broken = True
        try:
            if not broken:
                self.analysis.end()
        except Exception as error:  # noqa: BLE001
            self.error = f"analysis failed: {error!r}"
        try:
            self._report()
        finally:
            self.done.set()

    def _report(self) -> None:
        analysis = self.analysis
        self.worst = analysis.worst_severity()
        self.result = analysis.result(self.path, "proxy")
        if self.result is None:
            if analysis.kind is ConnectionKind.MULTIFD and not self.output.as_json:
                self.output.line(report.format_connection_closed(analysis))
            return
        if self.output.as_json:
            self.output.line(report.json_line(self.result))
        else:
            self.output.line(report.format_connection_report(analysis, self.error))


class ProxyServer:
    """The accept loop: every connection is forwarded and analysed (see module doc).

    `interrupted` ends the loop (Ctrl-C in the CLI, quitting in the TUI); `sink`, when
    given, receives every event instead of the text output (the TUI's batcher).
    """

    def __init__(self, listen_at: Address, target: Address, output: Output, *,
                 once: bool, sink: EventSink | None = None) -> None:
        self.listen_at = listen_at
        self.target = target
        self.output = output
        self.once = once
        self.sink = sink
        self.server = listen(listen_at)  # OSError: the caller says why
        self.bound = bound_address(self.server, listen_at)
        self.table = ConnectionTable(AnalysisOptions(keep_buffers=False),
                                     sink if sink is not None else self._print_event,
                                     None if sink is not None else self._print_finding)
        self.connections: list[ProxiedConnection] = []
        self.interrupted = threading.Event()

    def _print_event(self, stream: MigrationStream, event: Event) -> None:
        # Records would be a flood at line rate: the text output shows findings only.
        if self.output.as_json or isinstance(event, Record):
            return
        self.output.line(f"{stream.name}: {report.format_event_line(0, event).strip()}")

    def _print_finding(self, connection: Connection, finding: Finding) -> None:
        if not self.output.as_json:
            self.output.line(f"{connection.name}: "
                             f"{report.format_event_line(0, finding).strip()}")

    def serve(self) -> Severity | None:
        """Forward until interrupted (or, with once, the first migration ended);
        the worst severity found, ERROR for a connection that failed outright."""
        # A forwarding thread that wakes up waits for the analysis thread to give up the
        # GIL; the default 5 ms switch interval would stall the migration that long.
        sys.setswitchinterval(0.0002)
        connections = self.connections
        self.server.settimeout(ACCEPT_POLL)
        try:
            while not self.interrupted.is_set():
                # with --once, multifd channels that connect after the main one are
                # still accepted until the migration stream itself ends
                if self.once and connections and connections[0].done.is_set():
                    break
                try:
                    client, _ = self.server.accept()
                except TimeoutError:
                    continue
                client.settimeout(None)
                connection = ProxiedConnection(len(connections) + 1, client, self.target,
                                               self.table, self.output, str(self.bound))
                connections.append(connection)
                connection.start()
            if self.interrupted.is_set():
                for connection in connections:
                    connection.stop()
        finally:
            self.server.close()
            if self.listen_at.kind == "unix":
                try:
                    os.unlink(self.listen_at.path)
                except OSError:
                    pass
        worst: Severity | None = None
        for connection in connections:
            connection.done.wait()
            if connection.worst is not None:
                worst = max(worst or connection.worst, connection.worst)
            if connection.error and connection.result is None:
                worst = Severity.ERROR
        return worst


def open_proxy(args: argparse.Namespace, output: Output, sink: EventSink | None = None
               ) -> ProxyServer | str:
    """A listening ProxyServer for `--listen`/`--to`, or why there cannot be one."""
    try:
        listen_at = parse_address(args.listen)
        target = parse_address(args.to)
    except AddressError as error:
        return str(error)
    try:
        return ProxyServer(listen_at, target, output, once=args.once, sink=sink)
    except OSError as error:
        return f"cannot listen on {listen_at}: {error.strerror or error}"


def run_proxy(args: argparse.Namespace) -> int:
    proxy = open_proxy(args, Output(sys.stdout, args.json))
    if isinstance(proxy, str):
        print(f"migshark proxy: {proxy}", file=sys.stderr)
        return EXIT_UNUSABLE
    print(f"migshark proxy: listening on {proxy.bound}, forwarding to {proxy.target}",
          file=sys.stderr, flush=True)

    # Ctrl-C and SIGTERM only set a flag: an exception raised at an arbitrary point
    # (say, between starting a connection's threads) could leave a connection that
    # never reports. The accept loop notices the flag within ACCEPT_POLL.
    def request_stop(signum: int, frame: Any) -> None:
        proxy.interrupted.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    worst = proxy.serve()
    return EXIT_ERRORS if worst == Severity.ERROR else EXIT_OK
