"""Property tests: any valid scenario encodes to a stream the analyzer rebuilds
exactly, and its export regenerates the same dirty-bitmap records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migshark.analyzer.analysis import analyze_path
from migshark.analyzer.encoder import ScenarioExporter, encode
from migshark.analyzer.scenario import ScenarioError, scenario_from_dict

GRANULARITIES = [512, 1024, 4096, 65536, 1 << 20]


@st.composite
def scenarios(draw: Any) -> dict[str, Any]:
    nodes = []
    for index in range(draw(st.integers(1, 3))):
        size = draw(st.integers(1, 40_000)) * 512
        bitmaps = []
        for number in range(draw(st.integers(1, 3))):
            extents = []
            for _ in range(draw(st.integers(0, 4))):
                offset = draw(st.integers(0, size - 1))
                extents.append([offset, draw(st.integers(1, size - offset))])
            bitmaps.append({
                "name": f"b{number}",
                "granularity": draw(st.sampled_from(GRANULARITIES)),
                "enabled": draw(st.booleans()),
                "persistent": draw(st.booleans()),
                "dirty": extents,
                "density": draw(st.sampled_from([0.0, 0.0, 0.01, 0.5])),
            })
        nodes.append({"name": f"node{index}", "size": size, "bitmaps": bitmaps})
    return {"mode": draw(st.sampled_from(["precopy", "postcopy"])),
            "ram": {"blocks": [{"name": "pc.ram", "size": 16384}]},
            "iterations": draw(st.integers(1, 3)), "nodes": nodes,
            "seed": draw(st.integers(0, 1000))}


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenarios())
def test_any_scenario_reads_back_and_exports_to_itself(tmp_path: Path,
                                                       data: dict[str, Any]) -> None:
    scenario = scenario_from_dict(data)
    encoded = encode(scenario)
    path = tmp_path / "p.bin"
    path.write_bytes(encoded.data)
    exporter = ScenarioExporter()
    result = analyze_path(path, sink=exporter.sink)
    summary = result.as_json()
    assert [f for f in summary["findings"] if f["severity"] != "note"] == []
    got = [(b["node"], b["name"], b["sha256"], b["dirty_bytes"], b["disk_size"])
           for b in summary["bitmaps"]]
    want = [(b["node"], b["name"], b["sha256"], b["dirty_bytes"], b["disk_size"])
            for b in encoded.expected["bitmaps"]]
    assert got == want
    exported = exporter.scenarios(result)[0]
    exported["ram"] = data["ram"]
    exported["iterations"] = data["iterations"]
    exported["seed"] = data["seed"]
    again = encode(scenario_from_dict(exported))
    assert [m for m in again.marks if m.kind.startswith("bitmap-")] == [
        m for m in encoded.marks if m.kind.startswith("bitmap-")]
    assert again.data == encoded.data


@settings(deadline=None)
@given(st.dictionaries(st.sampled_from(["mode", "nodes", "ram", "iterations", "faults",
                                        "transport", "seed", "colour"]),
                       st.one_of(st.integers(-5, 5), st.text(max_size=5), st.booleans(),
                                 st.lists(st.integers(), max_size=3),
                                 st.lists(st.dictionaries(st.text(max_size=6),
                                                          st.integers(), max_size=3),
                                          max_size=2))))
def test_bad_scenarios_raise_scenario_error_only(data: dict[str, Any]) -> None:
    try:
        scenario_from_dict(data)
    except ScenarioError:
        pass
