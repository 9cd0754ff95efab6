"""A small synchronous QMP client over a unix socket.

Only what the harness needs: connect (retrying while QEMU creates its socket), read the
greeting, negotiate `qmp_capabilities`, run commands, and collect asynchronous events.
Every blocking call has a deadline, so a wedged or dead QEMU turns into an exception
instead of a hung test.

    with QMPClient.connect(sock_path, timeout=10) as qmp:
        qmp.cmd("block-dirty-bitmap-add", node="drive0", name="b0", granularity=65536)
        qmp.cmd("migrate-set-parameters", {"max-bandwidth": 1 << 20})
        qmp.wait_event("MIGRATION", timeout=5, match={"status": "completed"})

Arguments with hyphens can be given as a dict (second positional argument); keyword
arguments are passed through unchanged and merged into it. The command name and that dict
are positional-only so QMP arguments called `name` or `command` work as keywords.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT = 10.0


class QMPError(Exception):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPTimeout(TimeoutError):
    """No (matching) message arrived before the deadline."""


class QMPClosed(ConnectionError):
    """QEMU closed the monitor socket (usually: the process exited)."""


class QMPClient:
    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._sock = sock
        self._buf = b""
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []  # not yet consumed by wait_event
        self.all_events: list[dict[str, Any]] = []  # every event ever received
        self.greeting: dict[str, Any] = {}
        self._next_id = 0

    @classmethod
    def connect(cls, path: Path | str, timeout: float = DEFAULT_TIMEOUT) -> QMPClient:
        """Connect to QEMU's `-qmp unix:PATH,server=on,wait=off` socket and negotiate.

        QEMU creates the socket a little after the process starts, so connection
        refusals are retried until `timeout`.
        """
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as err:
                sock.close()
                if time.monotonic() >= deadline:
                    raise QMPTimeout(f"cannot connect to QMP socket {path}: {err}") from err
                time.sleep(0.02)
            except OSError:
                sock.close()
                raise
        client = cls(sock, timeout)
        try:
            greeting = client._read_message(deadline)
            if "QMP" not in greeting:
                raise QMPError("greeting", "ProtocolError", f"unexpected greeting {greeting!r}")
            client.greeting = greeting
            client.cmd("qmp_capabilities")
        except BaseException:
            client.close()
            raise
        return client

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    # -- low level -------------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QMPTimeout("timed out waiting for a QMP message")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as err:
                raise QMPTimeout("timed out waiting for a QMP message") from err
            except ConnectionResetError as err:
                raise QMPClosed("QMP connection reset") from err
            if not chunk:
                raise QMPClosed("QMP connection closed by QEMU")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise QMPError("read", "ProtocolError", f"non-object message {msg!r}")
        return msg

    def _pump(self, deadline: float) -> dict[str, Any]:
        """Read one message; events are stored and returned as well."""
        msg = self._read_message(deadline)
        if "event" in msg:
            self.events.append(msg)
            self.all_events.append(msg)
        return msg

    # -- API -----------------------------------------------------------------------------

    def cmd(
        self,
        command: str,
        args: Mapping[str, Any] | None = None,
        /,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run a command; return its `return` value or raise QMPError with QEMU's error."""
        arguments: dict[str, Any] = dict(args or {})
        arguments.update(kwargs)
        self._next_id += 1
        cmd_id = self._next_id
        request: dict[str, Any] = {"execute": command, "id": cmd_id}
        if arguments:
            request["arguments"] = arguments
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError) as err:
            raise QMPClosed(f"{command}: QMP connection closed by QEMU") from err
        while True:
            msg = self._pump(deadline)
            if msg.get("id") != cmd_id:
                continue
            if "error" in msg:
                err = msg["error"]
                raise QMPError(command, err.get("class", "?"), err.get("desc", "?"))
            return msg.get("return")

    def hmp(self, command_line: str, timeout: float | None = None) -> str:
        """Run a human-monitor command; QEMU reports HMP failures only as text."""
        out = self.cmd("human-monitor-command", {"command-line": command_line}, timeout=timeout)
        return str(out or "")

    def wait_event(
        self,
        name: str,
        timeout: float | None = None,
        match: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Return the first not yet consumed event `name` whose data contains `match`.

        Events that arrived earlier (for example while a command was running) count;
        a returned event is removed from `events` so the next call finds the next one.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)

        def matches(ev: dict[str, Any]) -> bool:
            if ev.get("event") != name:
                return False
            data = ev.get("data", {})
            return all(data.get(k) == v for k, v in (match or {}).items())

        while True:
            for i, ev in enumerate(self.events):
                if matches(ev):
                    return self.events.pop(i)
            try:
                self._pump(deadline)
            except QMPTimeout as err:
                raise QMPTimeout(f"timed out waiting for event {name} {match or ''}") from err
