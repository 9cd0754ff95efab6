"""The reference encoder: what it writes is what the analyzer (and QEMU) reads back."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from migshark.analyzer.analysis import analyze_path
from migshark.analyzer.cli import main
from migshark.analyzer.encoder import (
    DIRTY_BITMAP_SECTION_ID,
    EncodedStream,
    encode,
    expected_path,
    generate,
)
from migshark.analyzer.scenario import (
    STREAM_FAULTS,
    ScenarioError,
    load_scenario,
    parse_fault,
    scenario_from_dict,
)
from migshark.dissectors import grammar as g

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "captures" / "scenarios"

KiB, MiB = 1 << 10, 1 << 20

BASE: dict[str, Any] = {
    "name": "unit",
    "seed": 3,
    "ram": {"blocks": [{"name": "pc.ram", "size": 256 * KiB, "data_fraction": 0.2},
                       {"name": "pc.bios", "size": 16 * KiB, "data_fraction": 1.0}]},
    "nodes": [
        {"name": "drive0", "size": 9 * MiB, "bitmaps": [
            {"name": "b512", "granularity": 512,
             "dirty": [[0, 512], [4 * MiB - 512, 1024], [9 * MiB - 512, 512]]},
            {"name": "clean", "granularity": 65536},
        ]},
        {"name": "drive1", "size": 5 * MiB + 7680, "bitmaps": [
            {"name": "b64k", "granularity": 65536, "persistent": True, "enabled": False,
             "dirty": [[5 * MiB + 7000, 10]]},
            {"name": "rand4k", "granularity": 4096, "density": 0.05},
        ]},
    ],
}

BITMAP_KEYS = ("node", "name", "granularity", "enabled", "persistent", "disk_size",
               "dirty_bytes", "sha256")


def scenario(**changes: Any) -> Any:
    data = copy.deepcopy(BASE)
    data.update(changes)
    return scenario_from_dict(data)


def analyzed(path: Path) -> dict[str, Any]:
    return analyze_path(path).as_json()


def comparable(bitmaps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: b[k] for k in BITMAP_KEYS} for b in bitmaps]


def errors(result: dict[str, Any]) -> list[tuple[str, int]]:
    return [(f["code"], f["offset"]) for f in result["findings"] if f["severity"] == "error"]


def codes_at(result: dict[str, Any]) -> set[tuple[str, int]]:
    return {(f["code"], f["offset"]) for f in result["findings"]}


def bitmap_records(encoded: EncodedStream) -> list[tuple[Any, Any]]:
    """(mark, parsed record) for every dirty-bitmap record the encoder wrote."""
    return [(m, g.BitmapRecord.parse(encoded.data[m.offset : m.end]))
            for m in encoded.marks if m.kind.startswith("bitmap-")]


# --- the clean stream -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
@pytest.mark.parametrize("suffix", [".bin", ".pcap", ".pcapng"])
def test_clean_stream_reads_back_exactly(tmp_path: Path, mode: str, suffix: str) -> None:
    out = tmp_path / f"clean{suffix}"
    expected = generate(scenario(mode=mode), out)
    result = analyzed(out)
    assert result["format"] == {".bin": "raw"}.get(suffix, suffix[1:])
    assert comparable(result["bitmaps"]) == comparable(expected["bitmaps"])
    assert all(b["status"] == "reconstructed" for b in result["bitmaps"])
    assert errors(result) == []
    assert [f for f in result["findings"] if f["severity"] == "warning"] == []
    assert result["migrations"][0]["complete"]
    assert result["migrations"][0]["stream_bytes"] == expected["stream_bytes"]
    assert json.loads(expected_path(out).read_text()) == expected


def test_expected_hash_is_qemus_serialisation_computed_by_hand() -> None:
    # 64 KiB at 512 B: 128 granules = two 64-bit words; granules 0 and 127 dirty.
    encoded = encode(scenario(nodes=[{"name": "d", "size": 64 * KiB, "bitmaps": [
        {"name": "b", "granularity": 512, "dirty": [[0, 1], [64 * KiB - 1, 1]]}]}]))
    words = (1).to_bytes(8, "little") + (1 << 63).to_bytes(8, "little")
    (bitmap,) = encoded.expected["bitmaps"]
    assert bitmap["sha256"] == hashlib.sha256(words).hexdigest()
    assert bitmap["dirty_bytes"] == 2 * 512
    bits = [rec for mark, rec in bitmap_records(encoded) if mark.kind == "bitmap-bits"]
    assert len(bits) == 1 and bits[0].buffer == words + bytes(16)  # padded to 32 bytes


def test_chunks_zeroes_and_padding_follow_send_bitmap_bits() -> None:
    encoded = encode(scenario())
    chunks = [(m.info["node"], m.info["bitmap"], rec) for m, rec in bitmap_records(encoded)
              if m.kind == "bitmap-bits"]
    b512 = [rec for node, name, rec in chunks if name == "b512"]
    # 9 MiB at 512 B = 18432 sectors: two chunks of 8192 granules and a short one.
    assert [(r.bits.first_sector, r.bits.sector_count) for r in b512] == [
        (0, 8192), (8192, 8192), (16384, 2048)]
    assert [r.buffer_size for r in b512] == [1024, 1024, 256]
    clean = [rec for node, name, rec in chunks if name == "clean"]
    assert len(clean) == 1 and clean[0].flags.value & g.BitmapFlag.ZEROES
    assert clean[0].buffer_size is None
    # 5 MiB + 7680 at 64 KiB: one chunk of 81 granules (the last one partial) = 2 words.
    b64k = [rec for node, name, rec in chunks if name == "b64k"]
    assert [(r.bits.sector_count, r.buffer_size) for r in b64k] == [(10255, 32)]
    assert all(r.buffer_size % 32 == 0 for _, _, r in chunks if r.buffer_size is not None)


def test_names_only_when_node_or_bitmap_changes_across_sections() -> None:
    encoded = encode(scenario())
    seen = [(m.kind, rec.device_name, rec.bitmap_name) for m, rec in bitmap_records(encoded)
            if m.kind in ("bitmap-start", "bitmap-complete")
            or (m.kind == "bitmap-bits" and rec.bits.first_sector == 0)]
    assert seen == [
        ("bitmap-start", "drive0", "b512"),
        ("bitmap-start", None, "clean"),
        ("bitmap-start", "drive1", "b64k"),
        ("bitmap-start", None, "rand4k"),
        # END: the memory still holds drive1/rand4k from the setup section.
        ("bitmap-bits", "drive0", "b512"),
        ("bitmap-bits", None, "clean"),
        ("bitmap-bits", "drive1", "b64k"),
        ("bitmap-bits", None, "rand4k"),
        ("bitmap-complete", "drive0", "b512"),
        ("bitmap-complete", None, "clean"),
        ("bitmap-complete", "drive1", "b64k"),
        ("bitmap-complete", None, "rand4k"),
    ]
    later = [rec for m, rec in bitmap_records(encoded)
             if m.kind == "bitmap-bits" and rec.bits.first_sector > 0]
    assert later and all(r.device_name is None and r.bitmap_name is None for r in later)


def test_framing_is_qemu_7_2_precopy_order() -> None:
    encoded = encode(scenario(iterations=3))
    kinds = [(m.kind, m.info.get("section_id")) for m in encoded.marks
             if m.kind in ("file-header", "configuration", "command", "section-start",
                           "section-part", "section-end", "section-full", "eof",
                           "vmdescription")]
    ram, dbm = 2, DIRTY_BITMAP_SECTION_ID
    assert kinds[:5] == [("file-header", None), ("configuration", None), ("command", None),
                         ("section-start", ram), ("section-start", dbm)]
    assert kinds[5:11] == [("section-part", ram), ("section-part", dbm)] * 3
    assert kinds[11:13] == [("section-end", ram), ("section-end", dbm)]
    assert kinds[13][0] == "section-full" and kinds[13][1] == 0  # timer is section 0
    assert kinds[-2:] == [("eof", None), ("vmdescription", None)]
    assert encoded.data[26:31] == g.build_command(g.Command.POSTCOPY_ADVISE)
    # Every section payload is followed by a footer for the same id.
    marks = encoded.marks
    for index, mark in enumerate(marks):
        if mark.kind.startswith("section-"):
            footer = next(m for m in marks[index + 1 :] if m.kind == "footer")
            assert footer.info["section_id"] == mark.info["section_id"]


def test_postcopy_packages_devices_and_sends_no_vmdescription(tmp_path: Path) -> None:
    out = tmp_path / "pc.bin"
    generate(scenario(mode="postcopy"), out)
    result = analyzed(out)
    phases = result["phases"]
    assert phases.index("postcopy-listen") < phases.index("postcopy-run")
    kinds = [m.kind for m in encode(scenario(mode="postcopy")).marks]
    assert "vmdescription" not in kinds and kinds[-1] == "eof"
    assert kinds.index("packaged") < kinds.index("bitmap-bits") < kinds.index(
        "bitmap-complete")


def test_same_scenario_same_bytes() -> None:
    assert encode(scenario()).data == encode(scenario()).data
    assert encode(scenario()).data != encode(scenario(seed=4)).data


def test_example_scenarios_load_and_read_back(tmp_path: Path) -> None:
    files = sorted(SCENARIOS.glob("*.toml"))
    assert files
    for path in files:
        loaded = load_scenario(path)
        out = tmp_path / (path.stem + ".bin")
        expected = generate(loaded, out, [])
        assert comparable(analyzed(out)["bitmaps"]) == comparable(expected["bitmaps"]), path


# --- stream faults ------------------------------------------------------------------

FAULT_CODES = {
    "drop-eos": "missing-eos",
    "wrong-granularity-start": "granularity-mismatch",
    "wrong-buffer-size": "granularity-mismatch",
    "bits-unknown-bitmap": "unknown-bitmap",
    "reserved-start-flags": "reserved-start-flags",
    "oversized-buffer": "buffer-too-large",
    "bad-section-version": "bad-section-version",
    "footer-mismatch": "footer-mismatch",
    "multibyte-flags": "multibyte-flags",
}


@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
@pytest.mark.parametrize("fault", sorted(FAULT_CODES))
def test_each_stream_fault_yields_its_finding(tmp_path: Path, fault: str, mode: str) -> None:
    out = tmp_path / "fault.bin"
    expected = generate(scenario(mode=mode), out, [parse_fault(fault)])
    assert FAULT_CODES[fault] in [f["code"] for f in expected["findings"]]
    result = analyzed(out)
    for want in expected["findings"]:
        assert (want["code"], want["offset"]) in codes_at(result), want
    intact = [b for b in expected["bitmaps"] if b["status"] == "reconstructed"]
    got = {(b["node"], b["name"]): b for b in result["bitmaps"]}
    for bitmap in intact:
        assert got[(bitmap["node"], bitmap["name"])]["sha256"] == bitmap["sha256"]


def test_every_stream_fault_is_tested() -> None:
    assert set(FAULT_CODES) | {"truncate-at"} == set(STREAM_FAULTS)


def test_faults_leave_the_other_bitmaps_alone() -> None:
    expected = encode(scenario(), [parse_fault("wrong-buffer-size")]).expected
    assert [b["status"] for b in expected["bitmaps"]] == [
        "incomplete", "reconstructed", "reconstructed", "reconstructed"]


@pytest.mark.parametrize("where", ["header", "section-start", "ram-page", "bitmap-bits",
                                   "bitmap-boundary", "vmdescription"])
def test_truncate_at_reports_truncated_where_the_data_ends(tmp_path: Path, where: str) -> None:
    clean = encode(scenario())
    marks = clean.marks
    if where == "header":
        at = 5
    elif where == "bitmap-boundary":
        at = next(m for m in marks if m.kind == "bitmap-start").end
    else:
        mark = next(m for m in marks if m.kind == where and m.length > 2)
        at = mark.offset + mark.length // 2
    out = tmp_path / "cut.bin"
    expected = generate(scenario(), out, [parse_fault(f"truncate-at={at}")])
    assert expected["stream_bytes"] == at and not expected["complete"]
    (truncated,) = [f for f in expected["findings"] if f["code"] == "truncated"]
    assert (truncated["code"], truncated["offset"]) in codes_at(analyzed(out))


# --- TCP faults ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pcap", ".pcapng"])
@pytest.mark.parametrize("fault", ["reorder", "duplicate", "overlap-retransmit"])
def test_tcp_noise_gives_the_clean_bitmaps(tmp_path: Path, fault: str, suffix: str) -> None:
    clean = generate(scenario(), tmp_path / f"clean{suffix}")
    out = tmp_path / f"{fault}{suffix}"
    generate(scenario(), out, [parse_fault(fault)])
    assert out.read_bytes() != (tmp_path / f"clean{suffix}").read_bytes()
    result = analyzed(out)
    assert comparable(result["bitmaps"]) == comparable(clean["bitmaps"])
    assert errors(result) == []


def test_gap_in_page_data_reports_it_and_keeps_later_bitmaps(tmp_path: Path) -> None:
    out = tmp_path / "gap.pcap"
    loaded = scenario()
    expected = generate(loaded, out, [parse_fault("gap")])
    (gap,) = [f for f in expected["findings"] if f["code"] == "capture-gap"]
    pages = encode(loaded).page_data_ranges()
    assert any(lo <= gap["offset"] and gap["offset"] + gap["length"] <= hi for lo, hi in pages)
    result = analyzed(out)
    assert ("capture-gap", gap["offset"]) in codes_at(result)
    assert comparable(result["bitmaps"]) == comparable(expected["bitmaps"])


def test_rst_reports_peer_reset(tmp_path: Path) -> None:
    out = tmp_path / "rst.pcapng"
    expected = generate(scenario(), out, [parse_fault("rst")])
    assert ("peer-reset", expected["stream_bytes"]) in codes_at(analyzed(out))


def test_tcp_fault_needs_a_capture(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="pcap"):
        generate(scenario(), tmp_path / "x.bin", [parse_fault("gap")])


# --- CLI and scenario errors ----------------------------------------------------------


def test_cli_generate_writes_output_and_expected(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.pcapng"
    code = main(["generate", str(SCENARIOS / "precopy-basic.toml"), "-o", str(out),
                 "--fault", "reserved-start-flags", "--fault", "duplicate"])
    assert code == 0
    expected = json.loads(expected_path(out).read_text())
    assert expected["format"] == "pcapng"
    assert expected["faults"] == ["reserved-start-flags", "duplicate"]
    assert "reserved-start-flags" in capsys.readouterr().out
    assert main(["analyze", str(out)]) == 1  # reserved flags are an error


@pytest.mark.parametrize("argv_fault", ["no-such-fault", "truncate-at", "truncate-at=x",
                                        "drop-eos=3"])
def test_cli_generate_refuses_bad_faults(tmp_path: Path, argv_fault: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", str(SCENARIOS / "precopy-basic.toml"), "-o",
                 str(tmp_path / "x.bin"), "--fault", argv_fault])
    assert code == 2
    assert "migshark generate:" in capsys.readouterr().err
    assert not (tmp_path / "x.bin").exists()


@pytest.mark.parametrize("change, message", [
    ({"mode": "colo"}, "mode"),
    ({"nodes": [{"name": "d", "size": 1000}]}, "multiple of 512"),
    ({"nodes": [{"name": "d", "size": 4096, "bitmaps": [
        {"name": "b", "granularity": 1000}]}]}, "power of two"),
    ({"nodes": [{"name": "d", "size": 4096, "bitmaps": [
        {"name": "b", "dirty": [[4000, 200]]}]}]}, "outside the node"),
    ({"nodes": [{"name": "d", "size": 4096, "colour": "red"}]}, "unknown key"),
    ({"nodes": [{"name": "d", "size": "12 parsecs"}]}, "size"),
    ({"faults": ["gap", "drop-eos", "bogus"]}, "unknown fault"),
])
def test_scenario_errors_say_what_is_wrong(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        scenario(**change)


def test_bad_toml_is_a_scenario_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("nodes = [[[")
    with pytest.raises(ScenarioError, match="TOML"):
        load_scenario(path)


@pytest.mark.parametrize("faults, message", [
    (["reserved-start-flags"], "need at least one bitmap"),
    (["wrong-buffer-size"], "dirty granule"),
])
def test_faults_refuse_scenarios_they_cannot_bend(faults: list[str], message: str) -> None:
    clean_only = scenario(nodes=[{"name": "d", "size": 4096, "bitmaps": [
        {"name": "b", "granularity": 512}]}])
    no_bitmaps = scenario(nodes=[])
    target = no_bitmaps if faults == ["reserved-start-flags"] else clean_only
    with pytest.raises(ScenarioError, match=message):
        encode(target, [parse_fault(f) for f in faults])


def test_two_faults_on_one_chunk_are_refused() -> None:
    with pytest.raises(ScenarioError, match="choose one"):
        encode(scenario(), [parse_fault("wrong-buffer-size"), parse_fault("oversized-buffer")])


def _tshark_expert(path: Path) -> list[str]:
    import subprocess

    out = subprocess.run(
        ["tshark", "-r", str(path), "-o", "tcp.check_checksum:TRUE",
         "-o", "ip.check_checksum:TRUE", "-Y",
         "tcp.checksum.status == 0 || ip.checksum.status == 0 || _ws.malformed "
         "|| tcp.analysis.flags", "-T", "fields", "-e", "_ws.expert.message"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    return [line for line in out.splitlines() if line]


def test_tshark_finds_nothing_wrong_in_a_clean_capture(tmp_path: Path) -> None:
    from testkit.require import require_tools

    require_tools("tshark")
    out = tmp_path / "clean.pcap"
    generate(scenario(), out)
    assert _tshark_expert(out) == []
    noisy = tmp_path / "dup.pcapng"
    generate(scenario(), noisy, [parse_fault("duplicate")])
    assert any("retransmission" in line for line in _tshark_expert(noisy))


def test_mapping_scenario_writes_the_block_bitmap_mapping(tmp_path: Path) -> None:
    from migshark.analyzer.analysis import AnalysisOptions
    from migshark.analyzer.encoder import mapping_path
    from migshark.analyzer.mapping import load_mapping

    out = tmp_path / "mapped.bin"
    expected = generate(load_scenario(SCENARIOS / "mapping.toml"), out)
    mapping = load_mapping(mapping_path(out))
    result = analyze_path(out, AnalysisOptions(mapping=mapping)).as_json()
    names = [(b["node"], b["name"], b["real_node"], b["real_name"]) for b in result["bitmaps"]]
    assert names == [(b["node"], b["name"], b["real_node"], b["real_name"])
                     for b in expected["bitmaps"]]
    assert ("alias-node-1", "bx", "disk-b", "bitmap-b1") in names
    assert not mapping_path(tmp_path / "clean.bin").exists()


def test_gap_needs_page_data_to_fall_into(tmp_path: Path) -> None:
    no_data = scenario(ram={"blocks": [{"name": "pc.ram", "size": 65536,
                                        "data_fraction": 0.0}]})
    with pytest.raises(ScenarioError, match="data_fraction"):
        generate(no_data, tmp_path / "gap.pcap", [parse_fault("gap")])
