"""Start-up and shut-down of the subprocesses the tests and scripts drive.

A process is ready when it says so (tcpdump's and `migshark live`'s "listening on",
the proxy's first line) or when its port accepts: waiting for that instead of
sleeping a fixed time is what keeps these tests fast and free of races.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable

POLL_SECONDS = 0.05


class NotReady(RuntimeError):
    """A process did not become ready in time, or ended before it did."""


def wait_for_banner(proc: subprocess.Popen[bytes], banner: bytes, timeout: float,
                    what: str) -> bytes:
    """Read the process's stderr until `banner` appears; returns all read so far.

    On a timeout or an early end the process is killed, and the error shows what it
    printed, which usually says why it did not start.
    """
    assert proc.stderr is not None, "start the process with stderr=subprocess.PIPE"
    seen = b""
    deadline = time.monotonic() + timeout
    while banner not in seen:
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(proc.stderr.fileno(), 4096) if ready else b""
        if not chunk:
            proc.kill()
            raise NotReady(f"{what} did not start: {seen!r}")
        seen += chunk
    return seen


def wait_until(condition: Callable[[], bool], timeout: float,
               interval: float = POLL_SECONDS) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tcp_listening(port: int) -> bool:
    # /proc/net/tcp: local address is "IP:PORT" in hex; state 0A is LISTEN. Reading it
    # does not connect, so a server that accepts one connection only is not disturbed.
    with open("/proc/net/tcp") as table:
        return any(f":{port:04X} " in line and line.split()[3] == "0A" for line in table)


def wait_listening(port: int, timeout: float = 10.0) -> None:
    """Wait until something listens on the IPv4 TCP `port`."""
    if not wait_until(lambda: _tcp_listening(port), timeout):
        raise NotReady(f"nothing listened on port {port} after {timeout} s")


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read `size` bytes; the peer closing first is an error, not a hang."""
    received = bytearray()
    while len(received) < size:
        chunk = sock.recv(min(65536, size - len(received)))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(received)} of {size} bytes")
        received += chunk
    return bytes(received)


def interrupt_after(proc: subprocess.Popen[bytes], client: socket.socket,
                    peer: socket.socket, data: bytes, timeout: float = 15.0
                    ) -> tuple[bytes, bytes]:
    """Send `data` from `client`, wait until `peer` holds all of it (so it has passed
    the process under test), then Ctrl-C the process; returns its stdout and stderr."""
    client.sendall(data)
    recv_exactly(peer, len(data))
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=timeout)


def reap(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Kill the process if it still runs, and wait for it: nothing outlives a test."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=timeout)
