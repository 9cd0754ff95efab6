#!/usr/bin/env python3
"""Capture a real QEMU migration of a 1 GiB VM whose RAM holds data, plus ground truth.

The guest RAM is a memory-backend-file pre-filled so that about half of its pages
are random (sent as full PAGE records) and half are zero (sent as ZERO records),
so the stream carries ~512 MiB of page data. A 4 GiB qcow2 disk carries two dirty
bitmaps (512-byte and 64 KiB granularity) dirtied with qemu-io. The source is
paused (-S), so RAM and bitmaps do not change while migrating and the hashes
QEMU prints before migrating are exactly what the stream must reconstruct.

Writes into OUTDIR: real-1g.pcap (tcpdump on lo, GSO frames as the kernel hands
them over) and real-1g.truth.json. Needs root (tcpdump), qemu-system-x86_64,
qemu-img. Not a test: it takes ~30 s and 2.5 GiB of disk.

    python bench/make_real_capture.py [--out bench/data] [--ram-mib 1024]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testkit.processes import (  # noqa: E402 - needs the repo root on sys.path
    free_port,
    wait_for_banner,
    wait_listening,
    wait_until,
)
from testkit.realqemu.qmp import QMPClient  # noqa: E402

PAGE = 4096
DISK_SIZE = 4 << 30
# (name, granularity, extents written while it records): spread over the whole disk so
# that BITS records with data and ZEROES records are interleaved.
BITMAPS = (
    ("bm-fine", 512, [(i * 97 * (1 << 20) + 3 * 512, 5 * 512 + 17 * i * 512)
                      for i in range(40)]),
    ("bm-coarse", 65536, [((1 << 30) + i * 61 * (1 << 20), 200 * 1024) for i in range(30)]),
)


def fill_ram_file(path: Path, size: int, seed: int = 7) -> tuple[int, int]:
    """Write `size` bytes where each page is random or zero with equal chance."""
    rng = random.Random(seed)
    data_pages = zero_pages = 0
    chunk_pages = 256
    zero_page = bytes(PAGE)
    with open(path, "wb") as out:
        for _ in range(size // (chunk_pages * PAGE)):
            parts = []
            for _ in range(chunk_pages):
                if rng.getrandbits(1):
                    parts.append(rng.randbytes(PAGE))
                    data_pages += 1
                else:
                    parts.append(zero_page)
                    zero_pages += 1
            out.write(b"".join(parts))
    return data_pages, zero_pages


def start_qemu(role: str, workdir: Path, ram_mib: int, memory: str, disk: Path,
               extra: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
    sock = workdir / f"{role}.qmp"
    sock.unlink(missing_ok=True)
    args = [
        "qemu-system-x86_64", "-machine", "pc,memory-backend=mem0", "-accel", "tcg",
        "-nodefaults", "-display", "none", "-m", f"{ram_mib}M", "-S",
        "-object", memory,
        "-drive", f"file={disk},if=none,id=drive0,format=qcow2",
        "-qmp", f"unix:{sock},server=on,wait=off", *extra,
    ]  # fmt: skip
    log = open(workdir / f"{role}.log", "wb")  # noqa: SIM115 - lives as long as QEMU
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log), sock


def connect(proc: subprocess.Popen[bytes], sock: Path, timeout: float = 20.0) -> QMPClient:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU exited at start (status {proc.returncode})")
        try:
            return QMPClient.connect(sock, timeout=1.0)
        except (OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise


def wait_status(qmp: QMPClient, wanted: set[str], timeout: float) -> str:
    status = "none"

    def reached() -> bool:
        nonlocal status
        status = str(qmp.cmd("query-migrate").get("status", "none"))
        return status in wanted

    if not wait_until(reached, timeout, interval=0.1):
        raise RuntimeError(f"migration still {status!r} after {timeout} s")
    return status


def start_tcpdump(pcap: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["tcpdump", "-i", "lo", "-n", "-s", "0", "-B", "65536", "-w", str(pcap),
         f"tcp port {port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Packets are captured from the moment tcpdump says it is listening.
    wait_for_banner(proc, b"listening on", 10, "tcpdump")
    return proc


def capture(out: Path, ram_mib: int, name: str) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    work = out / f"{name}.work"
    work.mkdir(exist_ok=True)
    ram_file = work / "ram.img"
    t0 = time.monotonic()
    data_pages, zero_pages = fill_ram_file(ram_file, ram_mib << 20)
    print(f"RAM file: {data_pages} data pages, {zero_pages} zero pages "
          f"({time.monotonic() - t0:.1f} s)", file=sys.stderr)
    disks = {}
    for role in ("src", "dst"):
        disks[role] = work / f"{role}.qcow2"
        disks[role].unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disks[role]),
                        str(DISK_SIZE)], check=True)
    port = free_port()
    src, src_sock = start_qemu(
        "src", work, ram_mib,
        f"memory-backend-file,id=mem0,size={ram_mib}M,mem-path={ram_file},share=on",
        disks["src"], [])
    dst, dst_sock = start_qemu(
        "dst", work, ram_mib, f"memory-backend-ram,id=mem0,size={ram_mib}M", disks["dst"],
        ["-incoming", f"tcp:127.0.0.1:{port}"])
    tcpdump = None
    ok = False
    pcap = out / f"{name}.pcap"
    try:
        s = connect(src, src_sock)
        d = connect(dst, dst_sock)
        for bm_name, granularity, extents in BITMAPS:
            s.cmd("block-dirty-bitmap-add", node="drive0", name=bm_name, granularity=granularity)
            for offset, length in extents:
                reply = s.hmp(f'qemu-io drive0 "write -P 0x5a {offset} {length}"')
                if "error" in reply.lower() or "fail" in reply.lower():
                    raise RuntimeError(f"qemu-io: {reply}")
            # Later extents belong to the next bitmap only.
            s.cmd("block-dirty-bitmap-disable", node="drive0", name=bm_name)
        blocks = {b["device"]: b for b in s.cmd("query-block")}
        inserted = blocks["drive0"]["inserted"]
        truth_bitmaps = []
        for info in inserted["dirty-bitmaps"]:
            truth_bitmaps.append({
                "node": "drive0", "name": info["name"],
                "granularity": info["granularity"], "dirty_bytes": info["count"],
                "disk_size": inserted["image"]["virtual-size"],
                "sha256": s.cmd("x-debug-block-dirty-bitmap-sha256", node="drive0",
                                name=info["name"])["sha256"],
            })
        caps = [{"capability": "dirty-bitmaps", "state": True}]
        for q in (s, d):
            q.cmd("migrate-set-capabilities", capabilities=caps)
        s.cmd("migrate-set-parameters", {"max-bandwidth": 10 << 30})
        wait_listening(port)
        tcpdump = start_tcpdump(pcap, port)
        t0 = time.monotonic()
        s.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        status = wait_status(s, {"completed", "failed", "cancelled"}, 300)
        elapsed = time.monotonic() - t0
        if status != "completed":
            raise RuntimeError(f"source migration {status}")
        dst_status = wait_status(d, {"completed", "failed"}, 60)
        for bm in truth_bitmaps:
            bm["dest_sha256"] = d.cmd("x-debug-block-dirty-bitmap-sha256", node="drive0",
                                      name=bm["name"])["sha256"]
        stats = s.cmd("query-migrate").get("ram", {})
        time.sleep(0.3)  # let the FIN/ACK exchange reach the capture
        tcpdump.send_signal(signal.SIGINT)
        _, err = tcpdump.communicate(timeout=30)
        tcpdump = None
        report = err.decode(errors="replace")
        truth = {
            "qemu_version": s.cmd("query-version")["qemu"],
            "port": port,
            "ram_mib": ram_mib,
            "ram_file_data_pages": data_pages,
            "ram_file_zero_pages": zero_pages,
            "migration_seconds": round(elapsed, 3),
            "source_status": status,
            "dest_status": dst_status,
            "ram_stats": stats,
            "tcpdump": report.strip().splitlines()[-3:],
            "bitmaps": truth_bitmaps,
        }
        (out / f"{name}.truth.json").write_text(json.dumps(truth, indent=2) + "\n")
        ok = True
        return truth
    finally:
        if tcpdump is not None:
            tcpdump.kill()
        for proc in (src, dst):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        ram_file.unlink(missing_ok=True)
        for disk in disks.values():
            disk.unlink(missing_ok=True)
        if ok:  # QEMU logs and sockets are kept only to explain a failure
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "data")
    parser.add_argument("--ram-mib", type=int, default=1024)
    parser.add_argument("--name", default="real-1g")
    args = parser.parse_args()
    truth = capture(args.out, args.ram_mib, args.name)
    print(json.dumps({k: truth[k] for k in ("migration_seconds", "tcpdump", "bitmaps")},
                     indent=2))
    dropped = [line for line in truth["tcpdump"] if "dropped by kernel" in line]
    if dropped and not dropped[0].startswith("0 "):
        print("warning: tcpdump dropped packets; rerun for a complete capture", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
