"""The documented JSON (docs/json.md): versioned, and per migration at its top level."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from migshark.analyzer.pcapwriter import build_frame, conversation
from migshark.analyzer.report import SCHEMA_VERSION
from migshark.analyzer.scenario import TransportSpec
from testkit import synthetic
from testkit.paths import REPO_ROOT
from testkit.pcapfiles import SNAPLEN, micros, pcap_bytes

LINKTYPE_ETHERNET = 1


def analyze_json(path: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "migshark", "analyze", "--json", str(path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


def two_migrations(tmp_path: Path) -> Path:
    """Two different migrations interleaved in one capture: a clean one, and one that
    is cut short (so that their findings and bitmaps differ)."""
    whole = synthetic.precopy_stream()
    cut = synthetic.precopy_stream()[:-300]
    first = TransportSpec(sport=40001, dport=4444)
    second = replace(first, sport=40002, dport=4445, start_time=first.start_time + 0.0005)
    frames = []
    for stream, transport in ((whole, first), (cut, second)):
        packets, _ = conversation(stream, transport)
        frames += [(p.timestamp, build_frame(p, transport, n)) for n, p in enumerate(packets)]
    frames.sort(key=lambda item: item[0])
    path = tmp_path / "two.pcap"
    path.write_bytes(pcap_bytes([(*micros(t), frame) for t, frame in frames],
                                linktype=LINKTYPE_ETHERNET, snaplen=SNAPLEN))
    return path


def test_top_level_never_mixes_migrations(tmp_path: Path) -> None:
    report = analyze_json(two_migrations(tmp_path))
    assert set(report) == {"schema_version", "input", "format", "input_findings", "migrations"}
    assert report["schema_version"] == SCHEMA_VERSION
    clean, cut = sorted(report["migrations"], key=lambda m: m["stream"])
    assert clean["schema_version"] == cut["schema_version"] == SCHEMA_VERSION
    assert clean["complete"] and not cut["complete"]
    assert "truncated" in {f["code"] for f in cut["findings"]}
    assert "truncated" not in {f["code"] for f in clean["findings"]}
    # each migration's bitmaps are its own: the cut one never completes its bitmaps
    assert {b["status"] for b in clean["bitmaps"]} == {"reconstructed"}
    assert "incomplete" in {b["status"] for b in cut["bitmaps"]}


def test_docs_describe_every_key_written(tmp_path: Path) -> None:
    """docs/json.md names every key analyze --json writes (top, migration, bitmap,
    finding), so that the documentation cannot fall behind the output."""
    docs = (REPO_ROOT / "docs/json.md").read_text()
    documented = set(re.findall(r"`([a-z_0-9]+)`", docs))
    report = analyze_json(REPO_ROOT / "captures/real/postcopy.pcap")
    migration = report["migrations"][0]
    keys = set(report) | set(migration) | set(migration["bitmaps"][0])
    keys |= set(migration["findings"][0])
    assert keys - documented == set()


def test_every_json_output_is_versioned(tmp_path: Path) -> None:
    stream = tmp_path / "s.bin"
    stream.write_bytes(synthetic.precopy_stream()[:-300])
    done = subprocess.run([sys.executable, "-m", "migshark", "dump", "--json", str(stream)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    objects = [json.loads(line) for line in done.stdout.splitlines()]
    assert {o["type"] for o in objects} == {"record", "finding"}
    assert all(o["schema_version"] == SCHEMA_VERSION for o in objects)
