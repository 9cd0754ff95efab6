"""Drive a real QEMU live migration with dirty bitmaps, capture it, record QEMU's truth.

Real QEMU is migshark's reference peer: it produces the streams we dissect and tells us,
through QMP, what the bitmaps in them really are.

API
---
    from tests.realqemu.harness import PRESETS, run_migration

    result = run_migration(PRESETS["precopy"], workdir)   # workdir: created if missing
    result.pcap          # Path of the loopback capture (tcp transport, capture=True)
    result.pcapng        # the same capture converted with editcap (None without editcap)
    result.raw           # raw stream file (exec transport), else None
    result.port          # TCP port of the migration (None for exec)
    result.ground_truth  # JSON-serialisable dict, see below

`run_migration(scenario, workdir, *, capture=True, timeout=60.0)` starts two
`qemu-system-x86_64 -machine pc -accel tcg -nodefaults -display none -m 64 -S` processes
(the source stays paused, so nothing changes once the truth is recorded), gives each the
scenario's qcow2 drives, creates and dirties the bitmaps on the source, records the
ground truth, migrates with the `dirty-bitmaps` capability and, for precopy and exec,
asks the destination for its hashes afterwards. Every process is killed on the way out
and every wait has a deadline: a stuck QEMU raises `HarnessError`/`QMPTimeout`, it never
hangs. Capturing needs root and tcpdump; `capture=False` runs the tcp transport without
them. Output files are `<scenario>.pcap`, `.pcapng`, `.bin` in `workdir`; the disk
images (sparse, up to a few hundred MB) also go there.

Ground truth (`result.ground_truth`)::

    {"scenario": str, "qemu_version": str, "mode": "precopy"|"postcopy",
     "transport": "tcp"|"exec", "port": int|None, "machine_type": str,
     "source_outcome": str,     # final query-migrate status on the source
     "dest_outcome": str,       # "completed", or what happened to the destination
     "bitmaps": [{"node": wire node name, "name": wire bitmap name,
                  "real_node": str, "real_name": str, "granularity": int,
                  "enabled": bool, "persistent": bool, "disk_size": int,
                  "dirty_bytes": int, "sha256": str, "dest_sha256": str|None}]}

- `node`/`name` are what the stream carries: the BlockBackend name (`driveN`) without a
  mapping, the aliases with `block-bitmap-mapping`. `real_node` is the name the source's
  QMP knows the node by (the node-name if the drive has one, else `driveN`).
- `dirty_bytes` is query-block's `count` (set bits * granularity, so a dirty partial last
  granule counts whole). `sha256` is `x-debug-block-dirty-bitmap-sha256` on the source
  before migrating (bits packed LSB-first in 64-bit little-endian words, see
  PROTOCOL-NOTES section 5); `dest_sha256` is the same query on the destination after
  the migration, or None when the destination could not answer.
- `bitmaps` follows the scenario's order (drive by drive), not the order on the wire.

Scenarios are `MigrationScenario` values; `PRESETS` holds the named ones (precopy,
postcopy, postcopy-1node, mapping, flags, exec). Each bitmap is dirtied by its own
`extents` only: the harness adds it, writes its extents with qemu-io while every other
bitmap of that drive is disabled, and re-enables the ones meant to be enabled at the end, so
`expected_dirty_bytes()` predicts query-block's count exactly.

Postcopy: with a paused source the RAM is sent in a few ms, so whether
`migrate-start-postcopy` lands before the migration completes is a race. The harness sets
`max-bandwidth` to 1 MiB/s (the ~0.35 MB of RAM then takes ~0.3 s, and
migrate-start-postcopy is sent right after `migrate` returns) and `downtime-limit` to
1 ms: QEMU 7.2 switches to postcopy only while the pending bitmap data (counted in
granules) is at least bandwidth * downtime-limit, otherwise it completes in precopy.
So a postcopy scenario needs a couple of thousand granules of bitmaps in total; the
harness raises if QEMU never reported postcopy-active.
QEMU 7.2 destinations abort in bitmap postcopy once the stream names a second node
(`bdrv_lookup_bs: Assertion 'qemu_in_main_thread()'`); with one node they complete. The
harness copes either way, records what happened in `dest_outcome`, and accepts a source
that ends in `postcopy-paused` (it noticed the dead destination before finishing); the
capture check (footer + EOF at the end of the stream) says whether everything went out.

`read_tcp_flow(pcap, port)` reassembles the migration connection from a capture
(`to_server` is the migration stream, `to_client` the return path) for quick checks.
"""

from __future__ import annotations

import json
import os
import resource
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .qmp import QMPClient, QMPClosed, QMPError, QMPTimeout

KiB = 1024
MiB = 1024 * KiB

QEMU = "qemu-system-x86_64"
MACHINE = "pc"
QEMU_BASE_ARGS = [
    "-machine", MACHINE, "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "64", "-S",
]  # fmt: skip

# Loopback frames reach 65549 bytes with GSO; tcpdump's default snaplen (262144) keeps
# them whole. Spelled out so nobody "optimises" it to 65535 and loses stream bytes.
SNAPLEN = 262144

# The kernel ring holds buffer/snaplen frames: tcpdump's default 2 MiB is only ~8 of
# them, and a burst of 64 KiB loopback frames overflows it (seen: "dropped by kernel").
CAPTURE_BUFFER_KIB = 64 * 1024

POSTCOPY_MAX_BANDWIDTH = 1 * MiB  # bytes/s
POSTCOPY_DOWNTIME_LIMIT_MS = 1

BITMAP_KEYS = (
    "node", "name", "real_node", "real_name", "granularity", "enabled", "persistent",
    "disk_size", "dirty_bytes", "sha256", "dest_sha256",
)  # fmt: skip

TERMINAL_STATES = {"completed", "failed", "cancelled", "postcopy-paused"}


class HarnessError(RuntimeError):
    """The migration or the capture did not go as the scenario requires."""


@dataclass(frozen=True)
class BitmapSpec:
    name: str
    granularity: int
    # (offset, length) byte ranges written while this is the only recording bitmap
    extents: tuple[tuple[int, int], ...] = ()
    enabled: bool = True
    persistent: bool = False
    alias: str | None = None  # wire name under block-bitmap-mapping


@dataclass(frozen=True)
class DriveSpec:
    size: int
    bitmaps: tuple[BitmapSpec, ...] = ()
    node_name: str | None = None  # node-name= of the qcow2 node on the source
    dest_node_name: str | None = None  # on the destination (default: node_name)
    alias: str | None = None  # wire node name under block-bitmap-mapping


@dataclass(frozen=True)
class MigrationScenario:
    name: str
    drives: tuple[DriveSpec, ...]
    mode: Literal["precopy", "postcopy"] = "precopy"
    transport: Literal["tcp", "exec"] = "tcp"
    description: str = ""

    @property
    def uses_mapping(self) -> bool:
        return any(d.alias is not None for d in self.drives)

    def validate(self) -> None:
        if self.mode == "postcopy" and self.transport != "tcp":
            raise ValueError("postcopy needs the tcp transport (return path)")
        for i, drive in enumerate(self.drives):
            if drive.size % 512:
                raise ValueError(f"drive{i}: size must be a multiple of 512")
            for bm in drive.bitmaps:
                g = bm.granularity
                if g < 512 or g > 2**31 or g & (g - 1):
                    raise ValueError(f"{bm.name}: granularity must be a power of two >= 512")
                for off, length in bm.extents:
                    if length <= 0 or off < 0 or off + length > drive.size:
                        raise ValueError(f"{bm.name}: extent {(off, length)} outside drive{i}")
            if self.uses_mapping and drive.bitmaps:
                if not (drive.alias and drive.node_name):
                    raise ValueError(f"drive{i}: a mapping needs node_name and alias")
                if any(bm.alias is None for bm in drive.bitmaps):
                    raise ValueError(f"drive{i}: a mapping needs an alias for every bitmap")


@dataclass
class MigrationResult:
    scenario: MigrationScenario
    workdir: Path
    ground_truth: dict[str, Any]
    pcap: Path | None = None
    pcapng: Path | None = None
    raw: Path | None = None
    port: int | None = None
    source_events: list[dict[str, Any]] = field(default_factory=list)
    dest_events: list[dict[str, Any]] = field(default_factory=list)

    def write_ground_truth(self, path: Path) -> None:
        path.write_text(json.dumps(self.ground_truth, indent=2) + "\n")


def expected_dirty_bytes(bitmap: BitmapSpec) -> int:
    """query-block's `count` for a bitmap dirtied only by its own extents."""
    g = bitmap.granularity
    granules: set[int] = set()
    for off, length in bitmap.extents:
        granules.update(range(off // g, (off + length - 1) // g + 1))
    return len(granules) * g


# -- presets ---------------------------------------------------------------------------

# 512-byte granularity: one BITS record covers 8192 bits = 4 MiB, so 4 MiB multiples
# are chunk boundaries; 4 KiB granularity: 32 MiB.
_D1_SIZE = 200 * MiB + 7680  # not a multiple of any granularity: a partial last granule

PRESETS: dict[str, MigrationScenario] = {
    "precopy": MigrationScenario(
        name="precopy",
        description="two drives, seven bitmaps of granularity 512 B .. 1 MiB, precopy",
        drives=(
            DriveSpec(
                size=64 * MiB,
                bitmaps=(
                    BitmapSpec("scatter-512", 512, (
                        (0, 512), (1000, 10), (3 * 64 * KiB + 512, 1536),
                        (4 * MiB - 1024, 2048),  # crosses the first chunk boundary
                        (12 * MiB + 7 * 512, 100 * 512),
                        (64 * MiB - 512, 512),  # very last granule
                    )),
                    BitmapSpec("clean-64k", 64 * KiB),
                    BitmapSpec("full-1m", 1 * MiB, ((0, 64 * MiB),)),
                ),
            ),
            DriveSpec(
                size=_D1_SIZE,
                bitmaps=(
                    BitmapSpec("mixed-64k", 64 * KiB, (
                        (0, 1), (5 * MiB + 123, 300000), (100 * MiB, 64 * KiB),
                        (150 * MiB - 1, 2),  # straddles two granules
                    )),
                    BitmapSpec("runs-512", 512, (
                        (8 * MiB, 8 * MiB),  # two whole chunks of ones
                        (20 * MiB - 256, 512),  # crosses a chunk boundary
                        (_D1_SIZE - 512, 512),  # in the short last chunk
                    )),
                    BitmapSpec("coarse-1m", 1 * MiB, (
                        (1 * MiB + 5, 3 * MiB), (200 * MiB + 4096, 2048),  # partial granule
                    )),
                    BitmapSpec("tiny-4k", 4 * KiB, (
                        (32 * MiB - 4 * KiB, 8 * KiB),  # crosses the 32 MiB chunk boundary
                        (77 * MiB, 4 * KiB),
                    )),
                ),
            ),
        ),
    ),
    "postcopy": MigrationScenario(
        name="postcopy",
        mode="postcopy",
        description="two drives, bitmaps sent after migrate-start-postcopy",
        drives=(
            DriveSpec(
                size=64 * MiB,
                bitmaps=(
                    BitmapSpec("pc-512", 512, (
                        (4096, 4096), (4 * MiB - 512, 1024), (33 * MiB, 2 * MiB),
                    )),
                ),
            ),
            DriveSpec(
                size=200 * MiB,
                bitmaps=(
                    BitmapSpec("pc-64k", 64 * KiB, ((0, 1 * MiB), (199 * MiB, 65 * KiB))),
                    BitmapSpec("pc-clean-1m", 1 * MiB),
                ),
            ),
        ),
    ),
    "postcopy-1node": MigrationScenario(
        name="postcopy-1node",
        mode="postcopy",
        description="postcopy with every bitmap on one node: the destination survives",
        drives=(
            DriveSpec(
                size=128 * MiB,
                bitmaps=(
                    BitmapSpec("one-512", 512, ((8 * MiB - 4096, 12288), (100 * MiB, 1 * MiB))),
                    BitmapSpec("one-64k", 64 * KiB, ((64 * KiB, 1),)),
                    BitmapSpec("one-clean-1m", 1 * MiB),
                ),
            ),
        ),
    ),
    "mapping": MigrationScenario(
        name="mapping",
        description="block-bitmap-mapping: node and bitmap aliases differ from real names",
        drives=(
            DriveSpec(
                size=64 * MiB,
                node_name="disk-a",
                dest_node_name="disk-a-dst",
                alias="alias-node-0",
                bitmaps=(
                    BitmapSpec("bitmap-a1", 64 * KiB, ((0, 1 * MiB),), alias="bx"),
                    BitmapSpec("bitmap-a2", 512, ((6 * MiB, 4096),), alias="by"),
                ),
            ),
            DriveSpec(
                size=32 * MiB,
                node_name="disk-b",
                alias="alias-node-1",
                # same bitmap alias as on the other node: aliases are per node
                bitmaps=(BitmapSpec("bitmap-b1", 1 * MiB, ((3 * MiB, 1),), alias="bx"),),
            ),
        ),
    ),
    "flags": MigrationScenario(
        name="flags",
        description="START flags: disabled, persistent, both, neither",
        drives=(
            DriveSpec(
                size=64 * MiB,
                bitmaps=(
                    BitmapSpec("disabled", 64 * KiB, ((0, 256 * KiB),), enabled=False),
                    BitmapSpec("persistent", 64 * KiB, ((1 * MiB, 64 * KiB),), persistent=True),
                    BitmapSpec("disabled-persistent", 1 * MiB, ((8 * MiB, 1 * MiB),),
                               enabled=False, persistent=True),
                    BitmapSpec("plain", 512, ((512, 512),)),
                ),
            ),
        ),
    ),
    "exec": MigrationScenario(
        name="exec",
        transport="exec",
        description="raw stream through exec:cat > FILE, loaded back with exec:cat FILE",
        drives=(
            DriveSpec(
                size=64 * MiB,
                bitmaps=(
                    BitmapSpec("raw-4k", 4 * KiB, ((0, 64 * KiB), (40 * MiB + 100, 4 * KiB))),
                    BitmapSpec("raw-clean-512", 512),
                ),
            ),
        ),
    ),
}


# -- processes -------------------------------------------------------------------------


def _no_core() -> None:
    # core_pattern is often a plain file name: an aborting destination would litter cwd
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Qemu:
    def __init__(self, role: str, workdir: Path, drives: list[str], extra: list[str]) -> None:
        self.role = role
        self.sock = workdir / f"{role}.qmp"
        self.log = workdir / f"{role}.log"
        self.sock.unlink(missing_ok=True)
        args = [QEMU, *QEMU_BASE_ARGS, "-qmp", f"unix:{self.sock},server=on,wait=off"]
        for d in drives:
            args += ["-drive", d]
        args += extra
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                args, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=_no_core,
            )  # fmt: skip
        self.qmp: QMPClient | None = None

    def connect(self, timeout: float) -> QMPClient:
        deadline = time.monotonic() + timeout
        while True:
            # a QEMU that dies on its command line never creates the socket: notice now
            if self.proc.poll() is not None:
                raise HarnessError(f"{self.role} QEMU exited at start: {self.log_tail()}")
            try:
                self.qmp = QMPClient.connect(self.sock, timeout=min(1.0, timeout))
                return self.qmp
            except (QMPTimeout, QMPClosed) as err:
                if time.monotonic() >= deadline:
                    raise HarnessError(
                        f"{self.role} QEMU did not come up: {err}; {self.log_tail()}"
                    ) from err

    def log_tail(self, n: int = 5) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def stop(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class _Capture:
    """tcpdump on lo for one port; started before migrating, stopped with SIGINT."""

    def __init__(self, path: Path, port: int, timeout: float) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-n", "-s", str(SNAPLEN), "-B", str(CAPTURE_BUFFER_KIB),
             "--immediate-mode", "-U", "-w", str(path), f"tcp port {port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.stderr = b""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        # packets are captured from the moment tcpdump says it is listening
        while b"listening on" not in self.stderr:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stderr], [], [], max(0.0, remaining))
            chunk = os.read(self.proc.stderr.fileno(), 4096) if ready else b""
            if not chunk:
                self.kill()
                raise HarnessError(f"tcpdump did not start: {self.stderr.decode(errors='replace')}")
            self.stderr += chunk

    def stop(self, timeout: float = 10.0) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise HarnessError("tcpdump did not stop on SIGINT") from None
        self.stderr += err or b""
        return self.stderr.decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


# -- helpers ---------------------------------------------------------------------------


def _hmp_checked(qmp: QMPClient, line: str) -> str:
    out = qmp.hmp(line)
    # HMP has no error channel: failures come back as text
    if "error" in out.lower() or "fail" in out.lower():
        raise HarnessError(f"HMP {line!r}: {out.strip()}")
    return out


def _set_caps(qmp: QMPClient) -> None:
    # migrate-start-postcopy only needs dirty-bitmaps, not postcopy-ram: without it
    # RAM stays precopy and only the bitmaps move after the switch
    caps = [{"capability": "dirty-bitmaps", "state": True}, {"capability": "events", "state": True}]
    qmp.cmd("migrate-set-capabilities", capabilities=caps)


def _mapping(scenario: MigrationScenario, dest: bool) -> list[dict[str, Any]]:
    out = []
    for drive in scenario.drives:
        if not drive.bitmaps:
            continue
        node = drive.node_name
        if dest and drive.dest_node_name:
            node = drive.dest_node_name
        out.append({
            "node-name": node,
            "alias": drive.alias,
            "bitmaps": [{"name": bm.name, "alias": bm.alias} for bm in drive.bitmaps],
        })  # fmt: skip
    return out


def _drive_args(scenario: MigrationScenario, workdir: Path, role: str) -> list[str]:
    args = []
    for i, drive in enumerate(scenario.drives):
        img = workdir / f"{role}-drive{i}.qcow2"
        img.unlink(missing_ok=True)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(drive.size)],
            check=True, timeout=30, capture_output=True,
        )  # fmt: skip
        node = drive.dest_node_name if role == "dst" and drive.dest_node_name else drive.node_name
        spec = f"file={img},if=none,id=drive{i},format=qcow2"
        if node:
            spec += f",node-name={node}"
        args.append(spec)
    return args


def _status(qmp: QMPClient) -> str:
    return str(qmp.cmd("query-migrate").get("status", "none"))


def _wait_status(qmp: QMPClient, states: set[str], deadline: float, what: str) -> str:
    while True:
        status = _status(qmp)
        if status in states:
            return status
        if time.monotonic() > deadline:
            raise HarnessError(f"{what}: still {status!r} at the deadline")
        time.sleep(0.02)


def _wait_port_closed(port: int, timeout: float) -> None:
    """Wait until no socket on `port` is still open (all closed or in TIME_WAIT), so the
    capture holds the FIN/RST exchange."""
    deadline = time.monotonic() + timeout
    hexport = f"{port:04X}"
    done_states = {"06", "07"}  # TIME_WAIT, CLOSE
    while time.monotonic() < deadline:
        busy = False
        try:
            lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
        except OSError:
            return
        for line in lines:
            parts = line.split()
            local, remote, state = parts[1], parts[2], parts[3]
            if hexport in (local.split(":")[1], remote.split(":")[1]) and state not in done_states:
                busy = True
                break
        if not busy:
            return
        time.sleep(0.02)


def _qemu_version(qmp: QMPClient) -> str:
    v = qmp.cmd("query-version")
    q = v["qemu"]
    text = f"{q['major']}.{q['minor']}.{q['micro']}"
    return f"{text} ({v['package'].strip()})" if v.get("package", "").strip() else text


def _machine_type(qmp: QMPClient) -> str:
    for m in qmp.cmd("query-machines"):
        if m.get("alias") == MACHINE or m.get("name") == MACHINE:
            return str(m["name"])
    return MACHINE


# -- reading the capture back -----------------------------------------------------------


@dataclass
class TcpFlow:
    """One TCP connection from a capture: the client-to-server bytes are the migration
    stream (the source connects to the destination), server-to-client the return path."""

    client_port: int
    server_port: int
    to_server: bytes
    to_client: bytes
    closed: bool  # a FIN or RST was captured
    gaps: int  # holes in the sequence space of either direction


def read_tcp_flow(pcap: Path, server_port: int) -> TcpFlow:
    """Reassemble the first connection to `server_port` from a classic pcap file.

    Only what tcpdump writes on lo is understood: Ethernet, IPv4, TCP. Enough for the
    harness to check that a capture is whole; migshark itself has its own readers.
    """
    data = pcap.read_bytes()
    if len(data) < 24:
        raise HarnessError(f"{pcap}: not a pcap file")
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise HarnessError(f"{pcap}: not a classic pcap file")
    (linktype,) = struct.unpack(endian + "I", data[20:24])
    if linktype != 1:
        raise HarnessError(f"{pcap}: link type {linktype}, expected Ethernet")
    segs: dict[bool, dict[int, bytes]] = {True: {}, False: {}}
    isn: dict[bool, int] = {}
    client_port = None
    closed = False
    off = 24
    while off + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[off + 8 : off + 12])[0]
        frame = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack(">H", ip[2:4])[0]
        if ip[9] != 6:
            continue
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack(">HHI", tcp[:8])
        tcp_flags = tcp[13]
        if server_port not in (sport, dport):
            continue
        to_server = dport == server_port
        peer = sport if to_server else dport
        if client_port is None:
            client_port = peer
        elif peer != client_port:
            continue  # a later connection to the same port
        if tcp_flags & 0x02:  # SYN: data starts at seq + 1
            isn[to_server] = (seq + 1) & 0xFFFFFFFF
        if tcp_flags & 0x05:  # FIN or RST
            closed = True
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if payload:
            segs[to_server].setdefault(seq, payload)

    def assemble(direction: bool) -> tuple[bytes, int]:
        if not segs[direction]:
            return b"", 0
        start = isn.get(direction, min(segs[direction]))
        out = bytearray()
        gaps = 0
        # relative offsets so a sequence number wrap cannot reorder segments
        ordered = sorted(((s - start) & 0xFFFFFFFF, p) for s, p in segs[direction].items())
        for rel, payload in ordered:
            if rel > len(out):
                gaps += 1
                out += bytes(rel - len(out))
            if rel + len(payload) > len(out):  # retransmissions add only what is new
                out += payload[len(out) - rel :]
        return bytes(out), gaps

    if client_port is None:
        raise HarnessError(f"{pcap}: no TCP traffic on port {server_port}")
    fwd, gaps_fwd = assemble(True)
    back, gaps_back = assemble(False)
    return TcpFlow(client_port, server_port, fwd, back, closed, gaps_fwd + gaps_back)


# -- the run ---------------------------------------------------------------------------


class UnusableRun(HarnessError):
    """The migration ran, but not as the scenario needs (capture incomplete, postcopy
    never entered): a race outside migshark, worth running again."""


def run_migration(
    scenario: MigrationScenario,
    workdir: Path,
    *,
    capture: bool = True,
    timeout: float = 60.0,
    incoming: str | None = None,
    via: Callable[[str], str] | None = None,
    attempts: int = 3,
) -> MigrationResult:
    """Migrate `scenario`, again (in a fresh subdirectory) when the capture is unusable.

    A run can be unusable for reasons outside migshark: a QEMU 7.2 destination that
    aborts during bitmap postcopy resets the connection while the source may still be
    sending, the migration can finish before migrate-start-postcopy lands, and tcpdump
    can drop frames on a loaded machine. Such runs are retried; any other failure is
    raised at once.
    """
    for attempt in range(1, attempts + 1):
        where = Path(workdir) if attempt == 1 else Path(workdir) / f"attempt-{attempt}"
        try:
            return _run_migration_once(scenario, where, capture=capture, timeout=timeout,
                                       incoming=incoming, via=via)
        except UnusableRun:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _run_migration_once(
    scenario: MigrationScenario,
    workdir: Path,
    *,
    capture: bool,
    timeout: float,
    incoming: str | None,
    via: Callable[[str], str] | None,
) -> MigrationResult:
    """Migrate `scenario` between two fresh QEMUs; see the module docstring.

    `incoming` is the URI the destination listens on (default: a free loopback TCP port;
    e.g. `unix:PATH`; no tcpdump capture then). `via(dest_uri)` runs once the destination
    listens and returns the URI the source migrates to: a hook to start a sniffer or a
    proxy in between.
    """
    scenario.validate()
    tools = [QEMU, "qemu-img"]
    if capture and scenario.transport == "tcp":
        tools.append("tcpdump")
    for tool in tools:
        if shutil.which(tool) is None:
            raise HarnessError(f"{tool} not found")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(0.5, deadline - time.monotonic())

    result = MigrationResult(scenario=scenario, workdir=workdir, ground_truth={})
    src = dst = None
    cap: _Capture | None = None
    try:
        src = _Qemu("src", workdir, _drive_args(scenario, workdir, "src"), [])
        dst = _Qemu("dst", workdir, _drive_args(scenario, workdir, "dst"), ["-incoming", "defer"])
        s = src.connect(left())
        d = dst.connect(left())

        entries = _prepare_bitmaps(s, scenario)

        # query-block gives flags, counts and the disk size; the source is paused (-S)
        # and bitmaps only change on writes, so this is exactly what will be sent
        blocks = {b["device"]: b for b in s.cmd("query-block")}
        for e in entries:
            inserted = blocks[e["_drive"]]["inserted"]
            info = next(x for x in inserted.get("dirty-bitmaps", []) if x["name"] == e["real_name"])
            e["granularity"] = int(info["granularity"])
            e["enabled"] = bool(info["recording"])
            e["persistent"] = bool(info["persistent"])
            e["disk_size"] = int(inserted["image"]["virtual-size"])
            e["dirty_bytes"] = int(info["count"])
            e["sha256"] = s.cmd(
                "x-debug-block-dirty-bitmap-sha256", node=e["real_node"], name=e["real_name"]
            )["sha256"]

        truth: dict[str, Any] = {
            "scenario": scenario.name,
            "qemu_version": _qemu_version(s),
            "mode": scenario.mode,
            "transport": scenario.transport,
            "port": None,
            "machine_type": _machine_type(s),
            "source_outcome": "not run",
            "dest_outcome": "not run",
            "bitmaps": entries,
        }
        result.ground_truth = truth

        postcopy = scenario.mode == "postcopy"
        for q in (s, d):
            _set_caps(q)
            if scenario.uses_mapping:
                q.cmd(
                    "migrate-set-parameters",
                    {"block-bitmap-mapping": _mapping(scenario, dest=q is d)},
                )
        if postcopy:
            s.cmd(
                "migrate-set-parameters",
                {"max-bandwidth": POSTCOPY_MAX_BANDWIDTH,
                 "downtime-limit": POSTCOPY_DOWNTIME_LIMIT_MS},
            )  # fmt: skip

        if scenario.transport == "exec":
            raw = workdir / f"{scenario.name}.bin"
            raw.unlink(missing_ok=True)
            s.cmd("migrate", uri=f"exec:cat > {shlex.quote(str(raw))}")
            status = _wait_status(s, TERMINAL_STATES, deadline, "source")
            if status != "completed":
                raise HarnessError(f"source migration ended {status!r}")
            result.raw = raw
            d.cmd("migrate-incoming", uri=f"exec:cat {shlex.quote(str(raw))}")
        else:
            if incoming is not None:
                d.cmd("migrate-incoming", uri=incoming)
                dest_uri = incoming
            else:
                port = _listen(d)
                result.port = truth["port"] = port
                dest_uri = f"tcp:127.0.0.1:{port}"
                if capture:
                    cap = _Capture(workdir / f"{scenario.name}.pcap", port, left())
            s.cmd("migrate", uri=via(dest_uri) if via is not None else dest_uri)
            if postcopy:
                # must land while RAM is still trickling out at max-bandwidth
                s.cmd("migrate-start-postcopy")
            status = _wait_status(s, TERMINAL_STATES, deadline, "source")
            seen = {e["data"].get("status") for e in s.all_events if e["event"] == "MIGRATION"}
            if postcopy and "postcopy-active" not in seen:
                raise UnusableRun(f"migration ended {status!r} without entering postcopy")
            # a destination that dies in postcopy makes the source pause ("Detected IO
            # failure for postcopy") if it notices before it has finished: both are fine,
            # the capture check below tells whether the whole stream went out
            ok = {"completed", "postcopy-paused"} if postcopy else {"completed"}
            if status not in ok:
                failure = UnusableRun if postcopy else HarnessError
                raise failure(f"source migration ended {status!r}; {src.log_tail()}")
        truth["source_outcome"] = status

        # a destination that neither finishes nor dies should not eat the whole budget
        truth["dest_outcome"] = _finish_dest(dst, entries, min(deadline, time.monotonic() + 15))

        if cap is not None:
            assert result.port is not None
            _wait_port_closed(result.port, min(3.0, left()))
            time.sleep(0.05)
            report = cap.stop()
            cap = None
            _check_tcpdump_report(report)
            result.pcap = workdir / f"{scenario.name}.pcap"
            _check_capture(result.pcap, result.port, postcopy)
            result.pcapng = _to_pcapng(result.pcap)

        truth["bitmaps"] = [{k: e[k] for k in BITMAP_KEYS} for e in entries]
        result.source_events = list(s.all_events)
        result.dest_events = list(d.all_events) if dst.qmp is not None else []
        return result
    finally:
        if cap is not None:
            cap.kill()
        for q in (src, dst):
            if q is not None:
                q.stop()


def _prepare_bitmaps(s: QMPClient, scenario: MigrationScenario) -> list[dict[str, Any]]:
    """Create and dirty the bitmaps; return ground-truth entries (names filled in)."""
    entries: list[dict[str, Any]] = []
    for i, drive in enumerate(scenario.drives):
        drive_id = f"drive{i}"
        real_node = drive.node_name or drive_id
        for bm in drive.bitmaps:
            s.cmd(
                "block-dirty-bitmap-add",
                node=real_node, name=bm.name, granularity=bm.granularity,
                persistent=bm.persistent,
            )  # fmt: skip
            for off, length in bm.extents:
                _hmp_checked(s, f'qemu-io {drive_id} "write -P 0x55 {off} {length}"')
            # keep later writes of this drive out of this bitmap
            s.cmd("block-dirty-bitmap-disable", node=real_node, name=bm.name)
            entries.append({
                "node": drive.alias if scenario.uses_mapping else drive_id,
                "name": bm.alias if scenario.uses_mapping else bm.name,
                "real_node": real_node,
                "real_name": bm.name,
                "dest_sha256": None,
                "_drive": drive_id,
                "_dest_node": drive.dest_node_name or real_node,
            })  # fmt: skip
        for bm in drive.bitmaps:
            if bm.enabled:
                s.cmd("block-dirty-bitmap-enable", node=real_node, name=bm.name)
    return entries


def _listen(d: QMPClient) -> int:
    # a port picked by binding 0 can be taken again before QEMU binds it: retry
    last: QMPError | None = None
    for _ in range(5):
        port = free_port()
        try:
            d.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            return port
        except QMPError as err:
            last = err
    raise HarnessError(f"destination could not listen: {last}")


def _finish_dest(dst: _Qemu, entries: list[dict[str, Any]], deadline: float) -> str:
    """Wait for the destination and record its hashes; return what happened to it."""
    assert dst.qmp is not None
    try:
        status = _wait_status(dst.qmp, {"completed", "failed"}, deadline, "destination")
        if status != "completed":
            return f"{status}: {dst.log_tail(2)}"
        for e in entries:
            e["dest_sha256"] = dst.qmp.cmd(
                "x-debug-block-dirty-bitmap-sha256", node=e["_dest_node"], name=e["real_name"]
            )["sha256"]
        return "completed"
    except (QMPClosed, QMPTimeout, HarnessError) as err:
        if dst.proc.poll() is None:
            try:
                dst.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                return f"no answer: {err}"
        rc = dst.proc.returncode
        how = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        return f"{how}: {dst.log_tail(2)}"


def _check_tcpdump_report(report: str) -> None:
    # "N packets dropped by kernel": a capture with holes is no reference
    for line in report.splitlines():
        words = line.split()
        if "dropped" in words and words[0].isdigit() and int(words[0]) != 0:
            raise UnusableRun(f"tcpdump lost packets: {report.strip()}")


def _check_capture(pcap: Path, port: int, postcopy: bool) -> None:
    """Refuse a capture that cannot serve as a reference: holes, no end, no stream."""
    flow = read_tcp_flow(pcap, port)
    problems = []
    if not flow.to_server.startswith(b"QEVM"):
        problems.append("the stream does not start with QEVM")
    if flow.gaps:
        problems.append(f"{flow.gaps} holes in the TCP sequence space")
    if not flow.closed:
        problems.append("no FIN/RST: the end of the connection is missing")
    # postcopy has no VMDESCRIPTION: the stream ends with a section footer + EOF
    if postcopy and not (flow.to_server[-1:] == b"\x00" and flow.to_server[-6:-5] == b"\x7e"):
        problems.append("the postcopy stream does not end with footer + EOF")
    if problems:
        raise UnusableRun(f"{pcap}: " + "; ".join(problems))


def _to_pcapng(pcap: Path) -> Path | None:
    if shutil.which("editcap") is None:
        return None
    out = pcap.with_suffix(".pcapng")
    subprocess.run(
        ["editcap", "-F", "pcapng", str(pcap), str(out)], check=True, timeout=60,
        capture_output=True,
    )  # fmt: skip
    return out
