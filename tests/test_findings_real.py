"""Findings on real QEMU captures: none that is an error or a warning.

The captures come from the real-QEMU harness (captures/real/, with ground-truth
JSON next to each). Each capture is decoded once; the destination and mapping
variants replay its events through fresh bitmap trackers, which is all those
options change.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from migshark.analyzer.analysis import AnalysisOptions, MigrationStream, analyze_path
from migshark.analyzer.bitmaps import BitmapTracker, DestinationContext
from migshark.analyzer.mapping import parse_mapping
from migshark.analyzer.records import Event, Finding, Record, Severity
from testkit.paths import CAPTURES
from testkit.require import require

REAL = CAPTURES / "real"


def _truths() -> list[Path]:
    return sorted(REAL.glob("*.json")) if REAL.is_dir() else []


def _capture_of(truth_path: Path) -> Path | None:
    files = json.loads(truth_path.read_text()).get("files", {})
    name = files.get("pcap") or files.get("raw") or files.get("pcapng")
    return REAL / name if name else None


@cache
def _decoded(path: str) -> tuple[list[Finding], list[Event]]:
    """Every finding of the capture, and the events of its (first) migration stream."""
    events: list[Event] = []
    first: list[MigrationStream] = []

    def sink(stream: MigrationStream, event: Event) -> None:
        if not first:
            first.append(stream)
        if stream is first[0]:
            events.append(event)

    result = analyze_path(path, AnalysisOptions(keep_buffers=True), sink)
    return list(result.all_findings()), events


def _replay(events: list[Event], tracker: BitmapTracker) -> list[Finding]:
    found: list[Finding] = []
    for event in events:
        if isinstance(event, Record) or event.code in ("capture-gap", "resynchronised"):
            found += tracker.consume(event)
    return found + tracker.finish(0)


def _serious(found: list[Finding]) -> list[tuple[str, int, str]]:
    return [(f.code, f.offset, f.message) for f in found if f.severity >= Severity.WARNING]


def _truth(name: str) -> dict[str, Any]:
    path = REAL / f"{name}.json"
    require(path.exists(), f"no real capture {path} (run the real-QEMU harness)")
    return json.loads(path.read_text())


def test_real_captures_exist() -> None:
    require(bool(_truths()), f"no real captures in {REAL} (run the real-QEMU harness)")


@pytest.mark.parametrize("truth_path", _truths(), ids=lambda p: p.stem)
def test_no_error_or_warning_on_a_real_capture(truth_path: Path) -> None:
    capture = _capture_of(truth_path)
    require(capture is not None and capture.exists(), f"{truth_path.stem}: capture missing")
    assert capture is not None
    found, _ = _decoded(str(capture))
    truth = json.loads(truth_path.read_text())
    if truth.get("dest_outcome") != "completed":
        # A QEMU 7.2 destination may abort during bitmap postcopy; the reset that
        # follows is the capture telling the truth, not a false positive.
        found = [f for f in found if f.code != "peer-reset"]
    assert _serious(found) == []


def _precopy_events() -> tuple[dict[str, Any], list[Event]]:
    truth = _truth("precopy")
    capture = _capture_of(REAL / "precopy.json")
    require(capture is not None and capture.exists(), "precopy capture missing")
    return truth, _decoded(str(capture))[1]


def _destination_from(truth: dict[str, Any]) -> DestinationContext:
    """A destination like the harness's: one node per drive, sized like the source."""
    context = DestinationContext()
    for bitmap in truth["bitmaps"]:
        node = f"node-{bitmap['real_node']}"
        context.devices[bitmap["real_node"]] = node
        context.nodes.add(node)
        context.sizes[node] = bitmap["disk_size"]
    return context


def test_real_precopy_against_its_destination_is_clean() -> None:
    truth, events = _precopy_events()
    tracker = BitmapTracker(_destination_from(truth))
    assert _serious(_replay(events, tracker)) == []
    assert {(b["node"], b["name"]) for b in tracker.results()} == {
        (b["node"], b["name"]) for b in truth["bitmaps"]}


def test_real_precopy_to_a_destination_that_has_one_of_the_bitmaps() -> None:
    truth, events = _precopy_events()
    destination = _destination_from(truth)
    victim = truth["bitmaps"][0]
    destination.bitmaps[(f"node-{victim['real_node']}", victim["real_name"])] = 65536
    found = _replay(events, BitmapTracker(destination))
    starts = [e for e in events if isinstance(e, Record) and e.kind == "bitmap-start"
              and (e.node, e.bitmap) == (victim["node"], victim["name"])]
    assert [(f.code, f.offset) for f in found if f.severity >= Severity.WARNING] == [
        ("bitmap-exists", starts[0].offset)]


def test_real_precopy_to_a_destination_without_the_second_drive() -> None:
    truth, events = _precopy_events()
    destination = _destination_from(truth)
    del destination.devices["drive1"]
    found = _replay(events, BitmapTracker(destination))
    assert {f.code for f in found if f.severity >= Severity.WARNING} == {"unknown-node"}
    assert len([f for f in found if f.code == "unknown-node"]) == 1


def _mapping_from(truth: dict[str, Any], *, drop: int | None = None) -> list[dict[str, Any]]:
    nodes: dict[str, dict[str, Any]] = {}
    for index, bitmap in enumerate(truth["bitmaps"]):
        entry = nodes.setdefault(bitmap["node"], {"node-name": bitmap["real_node"],
                                                  "alias": bitmap["node"], "bitmaps": []})
        if index != drop:
            entry["bitmaps"].append({"name": bitmap["real_name"], "alias": bitmap["name"]})
    return list(nodes.values())


def test_real_mapping_capture_with_its_mapping() -> None:
    truth = _truth("mapping")
    capture = _capture_of(REAL / "mapping.json")
    require(capture is not None and capture.exists(), "mapping capture missing")
    events = _decoded(str(capture))[1]
    tracker = BitmapTracker(mapping=parse_mapping(_mapping_from(truth)))
    assert _serious(_replay(events, tracker)) == []
    assert sorted((b["real_node"], b["real_name"]) for b in tracker.results()) == sorted(
        (b["real_node"], b["real_name"]) for b in truth["bitmaps"])
    # A mapping without one bitmap alias: QEMU's "Unknown bitmap alias".
    dropped = truth["bitmaps"][1]
    partial = BitmapTracker(mapping=parse_mapping(_mapping_from(truth, drop=1)))
    found = [f for f in _replay(events, partial) if f.severity >= Severity.WARNING]
    assert [(f.code, f.node, f.bitmap) for f in found] == [
        ("unknown-bitmap", dropped["node"], dropped["name"])]
