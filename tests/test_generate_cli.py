"""`generate`/`replay --fault`: every fault given is applied, or the command refuses."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

from migshark.analyzer.cli import FAULTS_HIDDEN_BY, fault_conflict
from migshark.analyzer.encoder import encode
from migshark.analyzer.scenario import STREAM_FAULTS, ScenarioError, load_scenario, parse_fault
from testkit.paths import REPO_ROOT

SCENARIO = REPO_ROOT / "captures/scenarios/mapping.toml"


def expected_codes(names: tuple[str, ...]) -> set[str] | None:
    scenario = load_scenario(SCENARIO)
    faults = [parse_fault(name + ("=300" if name == "truncate-at" else "")) for name in names]
    try:
        encoded = encode(scenario, faults)
    except ScenarioError:
        return None  # the generator refuses the combination itself
    return {finding["code"] for finding in encoded.expected["findings"]}


def test_the_hidden_fault_table_is_what_the_generator_does() -> None:
    single = {name: expected_codes((name,)) for name in STREAM_FAULTS}
    lost = set()
    for pair in itertools.combinations(STREAM_FAULTS, 2):
        both = expected_codes(pair)
        first, second = single[pair[0]], single[pair[1]]
        assert first is not None and second is not None
        if both is not None and not (first | second) <= both:
            lost.add(frozenset(pair))
    table = {frozenset((hider, hidden)) for hider, hiddens in FAULTS_HIDDEN_BY.items()
             for hidden in hiddens}
    assert lost == table


def test_conflicts_are_named() -> None:
    assert fault_conflict(["drop-eos", "bits-unknown-bitmap"]) is None
    assert "wrong-buffer-size" in (fault_conflict(["drop-eos", "wrong-buffer-size"]) or "")
    assert "2 times" in (fault_conflict(["gap", "gap"]) or "")
    assert "2 times" in (fault_conflict(["truncate-at=10", "truncate-at=20"]) or "")


def run_generate(tmp_path: Path, *faults: str) -> subprocess.CompletedProcess[str]:
    args = [arg for fault in faults for arg in ("--fault", fault)]
    return subprocess.run([sys.executable, "-m", "migshark", "generate", str(SCENARIO),
                           "-o", str(tmp_path / "out.bin"), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def test_generate_refuses_a_fault_it_would_drop(tmp_path: Path) -> None:
    done = run_generate(tmp_path, "drop-eos", "wrong-buffer-size")
    assert done.returncode == 2 and not (tmp_path / "out.bin").exists()
    assert "choose one" in done.stderr and len(done.stderr.splitlines()) == 1
    kept = run_generate(tmp_path, "drop-eos", "bits-unknown-bitmap")
    assert kept.returncode == 0, kept.stderr
    assert "missing-eos" in kept.stdout and "unknown-bitmap" in kept.stdout
