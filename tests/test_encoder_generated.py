"""captures/generated/: every bundled generated capture reads back as its expected
result says, and regenerating it gives the same bytes (the files are current)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from migshark.analyzer.analysis import analyze_path
from migshark.analyzer.encoder import generate
from migshark.analyzer.scenario import STREAM_FAULTS, TCP_FAULTS, load_scenario, parse_fault

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "captures" / "generated"
SCENARIOS = ROOT / "captures" / "scenarios"
EXPECTED = sorted(GENERATED.glob("*.expected.json"))


def test_there_is_a_capture_for_every_fault() -> None:
    faults = set()
    for path in EXPECTED:
        for fault in json.loads(path.read_text())["faults"]:
            faults.add(parse_fault(fault).name)
    assert faults == set(STREAM_FAULTS) | set(TCP_FAULTS)


@pytest.mark.parametrize("expected_file", EXPECTED, ids=lambda p: p.name)
def test_generated_capture_reads_back_as_expected(expected_file: Path, tmp_path: Path) -> None:
    capture = expected_file.with_name(expected_file.name.removesuffix(".expected.json"))
    expected: dict[str, Any] = json.loads(expected_file.read_text())
    result = analyze_path(capture).as_json()
    found = {(f["code"], f["offset"]) for f in result["findings"]}
    for want in expected["findings"]:
        assert (want["code"], want["offset"]) in found, want
    if not expected["findings"]:
        assert [f for f in result["findings"] if f["severity"] == "error"] == []
    got = {(b["node"], b["name"]): b for b in result["bitmaps"]}
    for bitmap in expected["bitmaps"]:
        if bitmap["status"] == "reconstructed":
            seen = got[(bitmap["node"], bitmap["name"])]
            assert (seen["sha256"], seen["dirty_bytes"], seen["disk_size"]) == (
                bitmap["sha256"], bitmap["dirty_bytes"], bitmap["disk_size"])
    # The file is what today's encoder writes for its scenario and faults.
    again = tmp_path / capture.name
    scenario = load_scenario(SCENARIOS / f"{expected['scenario']}.toml")
    assert generate(scenario, again, [parse_fault(f) for f in expected["faults"]]) == expected
    assert again.read_bytes() == capture.read_bytes()
