"""`migshark replay`'s exit code says whether the destination took the stream."""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

from migshark.analyzer.cli import main
from testkit.paths import REPO_ROOT

STREAM = REPO_ROOT / "captures/generated/clean.bin"


def serve_once(read_bytes: int | None) -> tuple[int, threading.Thread]:
    """A destination that reads `read_bytes` (None: all) and then closes; with bytes
    still unread the kernel resets the connection, as when QEMU exits on a failed load."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def destination() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                if read_bytes is None:
                    while conn.recv(1 << 16):
                        pass
                    return
                conn.recv(read_bytes)
                # Linger 0: close with a reset at once, like an exiting process with
                # unread data.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=destination)
    thread.start()
    return port, thread


def test_replay_exits_1_when_the_destination_refuses(tmp_path: Path,
                                                     capsys: object) -> None:
    port, thread = serve_once(read_bytes=64)
    code = main(["replay", str(STREAM), "--to", f"tcp:127.0.0.1:{port}", "--timeout", "10"])
    thread.join(timeout=20)
    assert code == 1


def test_replay_exits_0_when_the_destination_reads_it_all() -> None:
    port, thread = serve_once(read_bytes=None)
    code = main(["replay", str(STREAM), "--to", f"tcp:127.0.0.1:{port}", "--timeout", "10"])
    thread.join(timeout=20)
    assert code == 0
