"""Round trip on real QEMU 7.2 captures: export a scenario, generate it again, and the
dirty-bitmap section payloads are byte-identical to what QEMU sent.

A payload is the bytes between a dirty-bitmap SECTION_START/PART/END header and its
footer; the EOS-only PARTs of the iterations are left out (their number depends on
QEMU's timing, not on the bitmaps). The hashes of the regenerated bitmaps are also
checked against QEMU's own x-debug-block-dirty-bitmap-sha256 (the ground truth JSON).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from migshark.analyzer.analysis import AnalysisOptions, analyze_path
from migshark.analyzer.cli import main
from migshark.analyzer.encoder import ScenarioExporter, encode
from migshark.analyzer.records import Record
from migshark.analyzer.scenario import RamBlock, load_scenario, scenario_from_dict, scenario_to_toml
from testkit.require import require

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "captures" / "real"
EOS_ONLY = b"\x01"
# Every real capture: precopy, postcopy (two nodes, and one), block-bitmap-mapping
# aliases, START flags (disabled, persistent), the raw exec stream, and QEMU 10.0's
# postcopy (its SWITCHOVER_START included).
CAPTURES = ["precopy.pcap", "postcopy.pcap", "postcopy-1node.pcapng", "mapping.pcap",
            "flags.pcapng", "exec.bin", "qemu10-postcopy-1node.pcap"]


def real_payloads(path: Path) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    """The capture's dirty-bitmap payloads, and the exported scenario."""
    exporter = ScenarioExporter()
    spans: list[list[int]] = []
    kinds: list[str] = []

    def sink(migration: Any, event: Any) -> None:
        exporter.sink(migration, event)
        if not isinstance(event, Record):
            return
        if event.kind in ("section-start", "section-part", "section-end") and (
                event.section == "dirty-bitmap"):
            spans.append([event.end, -1])
            kinds.append(event.kind)
        elif event.kind == "footer" and spans and spans[-1][1] < 0:
            spans[-1][1] = event.offset

    result = analyze_path(path, AnalysisOptions(), sink)
    assert len(result.migrations) == 1
    # The payload bytes: re-read them from the reassembled stream the decoder saw.
    stream = _stream_bytes(path)
    payloads = [(kind, stream[lo:hi]) for kind, (lo, hi) in zip(kinds, spans,
                                                                        strict=True)]
    return [p for p in payloads if p[1] != EOS_ONLY], exporter.scenarios(result)[0]


def _stream_bytes(path: Path) -> bytes:
    from migshark.analyzer.capture import CaptureReader, StreamData, TcpReassembler, parse_frame

    if path.suffix == ".bin":
        return path.read_bytes()
    reassembler = TcpReassembler()
    flows: dict[Any, bytearray] = {}
    events: list[Any] = []
    for frame in CaptureReader(str(path)):
        segment = parse_frame(frame.linktype, frame.data, frame.timestamp)
        if segment is not None:
            events += reassembler.feed(segment)
    events += reassembler.finish()
    for event in events:
        if isinstance(event, StreamData):
            flows.setdefault(event.flow, bytearray()).extend(event.data)
    (stream,) = [bytes(data) for data in flows.values() if data[:4] == b"QEVM"]
    return stream


def generated_payloads(scenario_dict: dict[str, Any]) -> tuple[list[tuple[str, bytes]], Any]:
    scenario = scenario_from_dict(tomllib.loads(scenario_to_toml(scenario_dict)))
    # RAM contents and the number of idle iterations do not touch the bitmap payloads;
    # shrinking them keeps the test fast.
    scenario.ram = [RamBlock("pc.ram", 64 * 1024)]
    scenario.iterations = min(scenario.iterations, 2)
    encoded = encode(scenario)
    out = []
    start: tuple[str, int] | None = None
    for mark in encoded.marks:
        if mark.kind in ("section-start", "section-part", "section-end") and (
                mark.info["section_id"] == 3):
            start = (mark.kind, mark.end)
        elif mark.kind == "footer" and start is not None:
            payload = encoded.data[start[1] : mark.offset]
            if payload != EOS_ONLY:
                out.append((start[0], payload))
            start = None
    return out, encoded


@pytest.mark.parametrize("name", CAPTURES)
def test_real_capture_bitmap_payloads_regenerate_byte_identical(name: str) -> None:
    path = REAL / name
    require(path.exists(), f"{path} missing (captures/make_real_captures.py makes it)")
    real, scenario = real_payloads(path)
    generated, encoded = generated_payloads(scenario)
    assert [kind for kind, _ in generated] == [kind for kind, _ in real]
    for (kind, want), (_, got) in zip(real, generated, strict=True):
        assert got == want, f"{kind} payload differs at byte " + str(
            next(i for i, (a, b) in enumerate(zip(got + b"\0", want + b"\1", strict=False))
                 if a != b))
    truth = json.loads(path.with_suffix(".json").read_text())
    qemu = {(b["node"], b["name"]): b["sha256"] for b in truth["bitmaps"]}
    ours = {(b["node"], b["name"]): b["sha256"] for b in encoded.expected["bitmaps"]}
    assert ours == qemu


def test_cli_export_scenario_regenerates(tmp_path: Path) -> None:
    path = REAL / "postcopy-1node.pcap"
    require(path.exists(), f"{path} missing")
    exported = tmp_path / "exported.toml"
    assert main(["analyze", str(path), "--export-scenario", str(exported)]) in (0, 1)
    scenario = load_scenario(exported)
    assert scenario.mode == "postcopy"
    assert [(n.name, [b.name for b in n.bitmaps]) for n in scenario.nodes] == [
        ("drive0", ["one-clean-1m", "one-64k", "one-512"])]
