#!/usr/bin/env python3
"""A generated migration capture inside unrelated TCP traffic, as on a busy host.

A capture taken without a port filter on a hypervisor holds the migration
connection among many others. This writes a migration made by make_generated.py
(small RAM) and interleaves the frames of `--connections` unrelated connections
(handshake, data of `--noise-mss`-byte segments, delayed ACKs, FIN) until they make
`--noise-frames` frames, in a seeded random order that keeps each connection's own
order. Timestamps are rewritten to advance by one microsecond per frame, so time
stays monotonic across the merge.

Two bench inputs (bench/run) are made with it:

  noisy-500k   ~500k unrelated frames of 60 connections (small segments) around a
               64 MiB migration: the lane meets another flow every few frames
  sparse-400m  ~400 MB of unrelated 64 KiB frames of 400 connections with a 64 MiB
               migration thinly spread through it: most of the file is not migration

Writes NAME.pcap and NAME.truth.json (the generator's truth of the migration).

    python bench/make_noisy.py --name noisy-500k --connections 60 --noise-frames 500000
"""

from __future__ import annotations

import argparse
import io
import json
import random
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from make_generated import PAGE, generate  # noqa: E402

from testkit.pcapfiles import LINKTYPE_ETHERNET, PCAP_MAGIC_NANOS  # noqa: E402
from testkit.tcpflows import TcpPcapWriter  # noqa: E402

_REC = struct.Struct("<IIII")
PCAP_HEADER = struct.Struct("<IHHiIII")
_FILE_HEADER_LEN = PCAP_HEADER.size

PRESETS = {
    "noisy-500k": {"connections": 60, "noise_frames": 500_000, "noise_mss": 200,
                   "ram_mib": 64, "mss": 1448},
    "sparse-400m": {"connections": 400, "noise_frames": 11_000, "noise_mss": 65483,
                    "ram_mib": 64, "mss": 1448},
}


def records(pcap: bytes | memoryview) -> Iterator[memoryview]:
    """The records (header and data) of a classic pcap written by TcpPcapWriter."""
    view = memoryview(pcap)
    off = _FILE_HEADER_LEN
    while off + 16 <= len(view):
        caplen = _REC.unpack_from(view, off)[2]
        end = off + 16 + caplen
        yield view[off:end]
        off = end


def noise_connection(index: int, frames: int, mss: int, seed: int) -> bytes:
    """One unrelated connection of about `frames` frames (not a migration: no QEVM)."""
    out = io.BytesIO()
    writer = TcpPcapWriter(out, mss=mss, client=(f"10.1.{index >> 8}.{index & 0xFF}",
                                                 20000 + index),
                           server=("10.2.0.1", 5000 + index % 100))
    segments = max(1, (frames - 5) * 2 // 3)  # an ACK every second segment
    rng = random.Random(seed)
    payload = rng.randbytes(min(segments * mss, 1 << 20))
    left = segments * mss
    while left > 0:
        chunk = payload[: min(left, len(payload))]
        writer.send(chunk)
        left -= len(chunk)
    writer.close()
    return out.getvalue()


def make(path: Path, connections: int, noise_frames: int, noise_mss: int, ram_mib: float,
         mss: int, seed: int = 5, migrations: int = 1) -> dict[str, object]:
    """Write the capture; the truth of its (first) migration, plus the counts.
    With `migrations` > 1, more migrations of the same VM to other ports are
    interleaved too (as many connections as a multi-migration host has)."""
    sources: list[list[memoryview]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(migrations):
            migration_path = Path(tmp) / f"migration{i}.pcap"
            migration_truth = generate(migration_path, int(ram_mib * (1 << 20)) // PAGE * PAGE,
                                       mss, client=("192.0.2.1", 50000 + i),
                                       server=("192.0.2.2", 4444 + i))
            if i == 0:
                truth = migration_truth
            sources.append(list(records(migration_path.read_bytes())))
    per_connection = max(6, noise_frames // connections)
    migration_frames = sum(len(s) for s in sources)
    sources += [list(records(noise_connection(i, per_connection, noise_mss, seed + i)))
                for i in range(connections)]
    noise = sum(len(s) for s in sources) - migration_frames
    rng = random.Random(seed)
    # Interleave: every source's frames keep their order; which source comes next is
    # drawn in proportion to what it has left, so all are spread over the whole file.
    positions = [0] * len(sources)
    order: list[int] = []
    for i, source in enumerate(sources):
        order += [i] * len(source)
    rng.shuffle(order)
    time_us = 1_700_000_000 * 1_000_000
    with open(path, "wb", buffering=1 << 22) as out:
        out.write(PCAP_HEADER.pack(PCAP_MAGIC_NANOS, 2, 4, 0, 0, 262144, LINKTYPE_ETHERNET))
        for i in order:
            record = sources[i][positions[i]]
            positions[i] += 1
            time_us += 1
            out.write(_REC.pack(time_us // 1_000_000, time_us % 1_000_000 * 1000,
                                *_REC.unpack_from(record, 0)[2:]))
            out.write(record[16:])
    truth.update(generator="bench/make_noisy.py", connections=connections,
                 noise_frames=noise, migration_frames=migration_frames)
    return truth


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BENCH / "data")
    parser.add_argument("--name", required=True)
    parser.add_argument("--connections", type=int)
    parser.add_argument("--noise-frames", type=int)
    parser.add_argument("--noise-mss", type=int)
    parser.add_argument("--ram-mib", type=float)
    parser.add_argument("--mss", type=int)
    args = parser.parse_args()
    settings = dict(PRESETS.get(args.name, PRESETS["noisy-500k"]))
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    args.out.mkdir(parents=True, exist_ok=True)
    truth = make(args.out / f"{args.name}.pcap", **settings)  # type: ignore[arg-type]
    (args.out / f"{args.name}.truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    print(json.dumps({k: truth[k] for k in ("connections", "noise_frames",
                                             "migration_frames")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
