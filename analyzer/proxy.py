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
connections to the same address, starting with 0x11223344) are forwarded too; they
are labelled and their pages are not decoded.
"""

from __future__ import annotations

import argparse
import json
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

from migshark.analyzer import findings
from migshark.analyzer.analysis import AnalysisOptions, AnalysisResult, EventSink, MigrationStream
from migshark.analyzer.records import Event, Finding, Record, Severity
from migshark.analyzer.returnpath import ReturnPathDecoder

MULTIFD_MAGIC = 0x11223344
MULTIFD_MAGIC_BYTES = MULTIFD_MAGIC.to_bytes(4, "big")
RECV_SIZE = 1 << 20
ACCEPT_POLL = 0.05
EXIT_OK, EXIT_ERRORS, EXIT_UNUSABLE = 0, 1, 2

FORWARD, BACKWARD = "source->destination", "destination->source"


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


class ConnectionAnalysis:
    """Both directions of one connection, decoded in arrival order.

    Sans-IO like the decoders: `data(direction, bytes)` and `end()`. Used by the proxy
    and by tests; live capture has its own per-flow equivalent.
    """

    def __init__(self, name: str, options: AnalysisOptions,
                 on_event: Any = None) -> None:
        self.name = name
        self.options = options
        self.on_event = on_event
        self.kind: str | None = None  # "migration", "multifd" or None until 4 bytes
        self.stream: MigrationStream | None = None
        self.return_path = ReturnPathDecoder()
        self.forward_bytes = 0
        self.backward_bytes = 0
        self.reset_by: str | None = None
        self._head = bytearray()
        self._backlog: list[tuple[bytes, float | None]] = []
        self.notes: list[Finding] = []

    def data(self, direction: str, chunk: bytes, timestamp: float | None = None) -> None:
        if direction == FORWARD:
            self.forward_bytes += len(chunk)
            self._forward(chunk, timestamp)
        else:
            self.backward_bytes += len(chunk)
            if self.kind == "multifd":
                return
            if self.stream is None:
                # the return path can only speak after the stream opened it; keep
                # order anyway in case the first forward bytes are still queued
                self._backlog.append((chunk, timestamp))
                return
            self._backward(chunk, timestamp)

    def reset(self, direction: str) -> None:
        self.reset_by = "source" if direction == FORWARD else "destination"

    def end(self) -> None:
        if self.kind is None and self._head:
            self._start(bytes(self._head), None)
        if self.stream is None:
            return
        for chunk, timestamp in self._backlog:
            self._backward(chunk, timestamp)
        self._backlog.clear()
        if self.reset_by is not None:
            self.stream.add_finding(findings.make(
                "peer-reset", f"the {self.reset_by} reset the connection after "
                f"{self.stream.decoder.offset} stream bytes", self.stream.decoder.offset))
        self._return_path_events(self.return_path.finish())
        self.stream.finish()

    def _forward(self, chunk: bytes, timestamp: float | None) -> None:
        if self.kind == "multifd":
            return
        if self.stream is not None:
            self.stream.feed(chunk, timestamp)
            return
        self._head += chunk
        if len(self._head) >= 4:
            self._start(bytes(self._head), timestamp)

    def _start(self, head: bytes, timestamp: float | None) -> None:
        self._head.clear()
        if head[:4] == MULTIFD_MAGIC_BYTES:
            self.kind = "multifd"
            note = findings.make("multifd-channel",
                                 f"{self.name}: multifd channel, pages not decoded", 0)
            self.notes.append(note)
            if self.on_event is not None:
                self.on_event(None, note)
            return
        # anything else is decoded as a migration stream: a wrong magic is a finding
        self.kind = "migration"
        self.stream = MigrationStream(self.name, self.options, self.on_event)
        self.stream.feed(head, timestamp)
        for chunk, ts in self._backlog:
            self._backward(chunk, ts)
        self._backlog.clear()

    def _backward(self, chunk: bytes, timestamp: float | None) -> None:
        self._return_path_events(self.return_path.feed(chunk, timestamp))

    def _return_path_events(self, events: list[Event]) -> None:
        assert self.stream is not None
        for event in events:
            if isinstance(event, Finding):
                self.stream.add_finding(event)
            elif self.on_event is not None:
                self.on_event(self.stream, event)

    def result(self, path: str) -> dict[str, Any] | None:
        if self.stream is None:
            return None
        result = AnalysisResult(path, "proxy", [self.stream]).as_json()
        result["return_path"] = {
            "bytes": self.backward_bytes,
            "messages": dict(sorted(self.return_path.messages.items())),
            "shut_code": self.return_path.shut_code,
        }
        return result


class ProxiedConnection:
    """Two forwarding threads and one analysis thread for one accepted connection."""

    def __init__(self, number: int, client: socket.socket, target: Address,
                 options: AnalysisOptions, output: Output, path: str,
                 sink: EventSink | None = None) -> None:
        self.sink = sink
        self.client = client
        self.target = target
        self.output = output
        self.path = path
        self.name = f"connection {number} ({_peer_name(client)} -> {target})"
        self.queue: queue.SimpleQueue[tuple[str, bytes | None, float]] = queue.SimpleQueue()
        self.analysis = ConnectionAnalysis(self.name, options, self._event)
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

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
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
        while ended < 2:
            direction, chunk, timestamp = self.queue.get()
            if chunk is None:
                ended += 1
                continue
            if broken:
                continue
            try:
                if not chunk:
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

    def _event(self, stream: MigrationStream | None, event: Event) -> None:
        if self.sink is not None:
            self.sink(stream, event)
            return
        if self.output.as_json or isinstance(event, Record):
            return
        from migshark.analyzer.cli import format_event_line

        self.output.line(f"{self.name}: {format_event_line(0, event).strip()}")

    def _report(self) -> None:
        self.result = self.analysis.result(self.path)
        if self.result is None:
            if self.analysis.kind == "multifd" and not self.output.as_json:
                self.output.line(f"{self.name}: multifd channel closed, "
                                 f"{self.analysis.forward_bytes:,} bytes forwarded")
            return
        stream = self.analysis.stream
        assert stream is not None
        self.worst = max((f.severity for f in stream.findings), default=None)
        if self.output.as_json:
            self.output.line(json.dumps(self.result))
            return
        from migshark.analyzer.cli import _format_migration

        lines = _format_migration(stream.result())
        rp = self.result["return_path"]
        messages = ", ".join(f"{k} x{v}" for k, v in rp["messages"].items()) or "none"
        lines.append(f"  return path  : {rp['bytes']:,} bytes; messages: {messages}")
        if self.error:
            lines.append(f"  proxy error  : {self.error}")
        self.output.line("\n".join(lines))


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
        self.connections: list[ProxiedConnection] = []
        self.interrupted = threading.Event()

    def serve(self) -> Severity | None:
        """Forward until interrupted (or, with once, the first migration ended);
        the worst severity found, ERROR for a connection that failed outright."""
        options = AnalysisOptions(keep_buffers=False)
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
                                               options, self.output, str(self.bound),
                                               self.sink)
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
