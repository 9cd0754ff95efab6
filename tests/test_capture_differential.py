"""The C lane against pure Python: the full per-record event stream must be equal.

tests/test_fastpath.py and tests/test_speedups.py compare summaries (analyze --json);
here every Record and Finding the analysis emits, with all its attributes but the
timestamp, in order and per stream, is compared between the C lane
(analyzer/_speedups.c) and the pure-Python lane, on: every bundled capture, a
generated capture with 1,000 TCP connections around a migration, several migrations
interleaved with many flows, and seeded mutations (byte flips, cuts) of those.

Timestamps are left out (see testkit/lanes.py).
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from migshark.analyzer import speedups
from migshark.analyzer.capture import CaptureReader
from migshark.analyzer.records import Record
from testkit.lanes import NOT_BUILT, both_lanes, event_stream
from testkit.paths import CAPTURES, REPO_ROOT
from testkit.require import require

BUNDLED = sorted(p for d in ("real", "generated") for p in (CAPTURES / d).iterdir()
                 if p.suffix in (".pcap", ".pcapng"))


def _bench_module(name: str) -> ModuleType:
    """A bench script as a module (bench/ is scripts, not a package)."""
    if name not in sys.modules:
        bench = str(REPO_ROOT / "bench")
        if bench not in sys.path:
            sys.path.insert(0, bench)
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def records_of(events: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [e for e in events if e[1] == Record.__name__]


def to_pcapng(src: Path, dst: Path) -> Path:
    _bench_module("to_pcapng").convert(src, dst)
    return dst


def noisy_capture(path: Path, connections: int, noise_frames: int, migrations: int = 1,
                  noise_mss: int = 200, seed: int = 5) -> dict[str, Any]:
    make: Any = _bench_module("make_noisy").make
    truth: dict[str, Any] = make(path, connections=connections, noise_frames=noise_frames,
                                 noise_mss=noise_mss, ram_mib=0.5, mss=1448, seed=seed,
                                 migrations=migrations)
    return truth


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_bundled_captures_give_the_same_event_stream(path, monkeypatch):
    events = both_lanes(path, monkeypatch)
    assert records_of(events), "no record decoded: the comparison would be empty"


@pytest.fixture(scope="module")
def thousand_connections(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    path = tmp_path_factory.mktemp("noisy") / "thousand.pcap"
    truth = noisy_capture(path, connections=1000, noise_frames=20_000)
    return path, truth


def test_thousand_connections_give_the_same_event_stream_and_the_truth(
        thousand_connections, monkeypatch):
    path, truth = thousand_connections
    assert truth["connections"] == 1000 and truth["noise_frames"] >= 20_000
    events = both_lanes(path, monkeypatch)
    result = events[-1][1]
    assert len(result["migrations"]) == 1
    got = {b["name"]: b["sha256"] for b in result["bitmaps"]}
    assert got == {b["name"]: b["sha256"] for b in truth["bitmaps"]}


def test_thousand_connections_as_pcapng(thousand_connections, monkeypatch, tmp_path):
    path, truth = thousand_connections
    events = both_lanes(to_pcapng(path, tmp_path / "thousand.pcapng"), monkeypatch)
    got = {b["name"]: b["sha256"] for b in events[-1][1]["bitmaps"]}
    assert got == {b["name"]: b["sha256"] for b in truth["bitmaps"]}


@pytest.mark.parametrize("seed", [1, 2])
def test_interleaved_migrations_and_flows(tmp_path, monkeypatch, seed):
    path = tmp_path / "interleaved.pcap"
    truth = noisy_capture(path, connections=40, noise_frames=6_000, migrations=3,
                          noise_mss=1448, seed=seed)
    events = both_lanes(path, monkeypatch)
    result = events[-1][1]
    assert len(result["migrations"]) == 3
    for migration in result["migrations"]:
        got = {b["name"]: b["sha256"] for b in migration["bitmaps"]}
        assert got == {b["name"]: b["sha256"] for b in truth["bitmaps"]}


def _mutants(base: bytes, seed: int, count: int) -> list[tuple[str, bytes]]:
    """Seeded byte flips (in the headers' region of records as much as anywhere) and
    cuts, the first 24 bytes (pcap) or SHB left alone half of the time."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        data = bytearray(base)
        if i % 4 == 3:
            cut = rng.randrange(len(data))
            out.append((f"cut@{cut}", bytes(data[:cut])))
            continue
        flips = []
        for _ in range(rng.choice((1, 2, 8, 32))):
            pos = rng.randrange(24 if i % 2 else 0, len(data))
            data[pos] ^= 1 << rng.randrange(8)
            flips.append(pos)
        out.append((f"flip@{flips[0]}+{len(flips) - 1}", bytes(data)))
    return out


@pytest.fixture(scope="module")
def mutation_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("bases")
    noisy = folder / "noisy.pcap"
    noisy_capture(noisy, connections=80, noise_frames=1_500, noise_mss=600)
    return {"noisy.pcap": noisy.read_bytes(),
            "noisy.pcapng": to_pcapng(noisy, folder / "noisy.pcapng").read_bytes(),
            "clean.pcap": (CAPTURES / "generated" / "clean.pcap").read_bytes(),
            "clean.pcapng": (CAPTURES / "generated" / "clean.pcapng").read_bytes()}


@pytest.mark.parametrize("base", ["noisy.pcap", "noisy.pcapng", "clean.pcap", "clean.pcapng"])
@pytest.mark.parametrize("seed", range(3))
def test_mutated_captures_give_the_same_event_stream(mutation_bases, base, seed, tmp_path,
                                                     monkeypatch):
    outcomes = set()
    for name, data in _mutants(mutation_bases[base], seed * 100 + len(base), 8):
        path = tmp_path / f"{name}{Path(base).suffix}"
        path.write_bytes(data)
        events = both_lanes(path, monkeypatch)
        outcomes.add(type(events[-1][1]).__name__)
    # the mutations reach the analysis, not only the file header check
    assert "dict" in outcomes


class _SmallTable:
    """The C extension with a smaller lane limit declared: the lane must choose
    which lanes C gets and leave the rest to Python, with the same result."""

    def __init__(self, native: Any, limit: int) -> None:
        self._native = native
        self.MAX_LANES = limit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._native, name)


@pytest.mark.parametrize("limit", [0, 1, 16])
def test_more_connections_than_the_c_table_holds(thousand_connections, monkeypatch, limit):
    path, truth = thousand_connections
    require(speedups.native is not None, NOT_BUILT)
    flows = set()
    with CaptureReader(path) as reader:
        for frame in reader:
            flows.add(bytes(frame.data[26:38]))
    assert len(flows) > 2 * 1000  # each direction of each connection is one lane
    reference = both_lanes(path, monkeypatch)
    monkeypatch.setattr(speedups, "native", _SmallTable(speedups.native, limit))
    assert event_stream(path) == reference
