"""The generated Wireshark plugin, run in real tshark: it must show what migshark shows.

Each capture is dissected with `tshark -X lua_script:PLUGIN -T pdml`; every
`qemu_mig.record` subtree of a dirty-bitmap kind is one record, compared field by
field with the records migshark's own decoder emits for the same capture.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from migshark.analyzer.analysis import AnalysisOptions, MigrationStream, analyze_path
from migshark.analyzer.findings import CATALOGUE
from migshark.analyzer.records import Record
from migshark.analyzer.wireshark_plugin import plugin_source, write_plugin
from migshark.dissectors import grammar as g
from migshark.dissectors import registry as r
from migshark.dissectors import wireshark
from testkit.paths import CAPTURES, REPO_ROOT
from testkit.require import require_tools

REAL_CAPTURES = sorted(p for p in (CAPTURES / "real").iterdir()
                       if p.suffix in (".pcap", ".pcapng"))
GENERATED_CAPTURES = sorted(p for p in (CAPTURES / "generated").iterdir()
                            if p.suffix in (".pcap", ".pcapng"))
SMALL_SCENARIO = CAPTURES / "scenarios" / "small.toml"

# The registry fields a dirty-bitmap record is compared on, by Wireshark abbreviation.
COMPARED = (r.BITMAP_FLAGS, r.BITMAP_NODE, r.BITMAP_NAME, r.BITMAP_GRANULARITY,
            r.BITMAP_START_FLAGS, r.BITMAP_START_SECTOR, r.BITMAP_NR_SECTORS,
            r.BITMAP_BUFFER_SIZE)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tools("tshark")
    path = tmp_path_factory.mktemp("wireshark") / "qemu_mig.lua"
    write_plugin(path)
    return path


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), **extra}


def _tshark(plugin: Path, capture: Path, *extra: str) -> str:
    done = subprocess.run(
        ["tshark", "-n", "-X", f"lua_script:{plugin}", "-r", str(capture), *extra],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "Lua Error" not in done.stdout, _lua_errors(done.stdout)
    return done.stdout


def _lua_errors(output: str) -> list[str]:
    return sorted(set(re.findall(r"Lua Error: [^\"<\n]*", output)))[:5]


def _number(text: str) -> int:
    return int(text, 0)


def _value(field: ET.Element) -> Any:
    show = field.get("show", "")
    name = field.get("name", "")
    info = r.lookup(name)
    if name == "qemu_mig.offset" or (info is not None and info.type.is_integer):
        return _number(show)
    return show


def plugin_records(pdml: str, kinds: frozenset[str] | None = None
                   ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(frame number, {abbrev: value}) for each qemu_mig.record in the PDML, in order;
    each record's `qemu_mig.record` key holds its kind."""
    root = ET.fromstring(pdml)
    for packet in root.iter("packet"):
        frame = 0
        for proto in packet.iter("proto"):
            if proto.get("name") == "frame":
                for field in proto.iter("field"):
                    if field.get("name") == "frame.number":
                        frame = int(field.get("show", "0"))
                        break
        for proto in packet.iter("proto"):
            if proto.get("name") != wireshark.PROTOCOL_NAME:
                continue
            for record in proto.iter("field"):
                if record.get("name") != "qemu_mig.record":
                    continue
                kind = record.get("show", "")
                if kinds is not None and kind not in kinds:
                    continue
                values: dict[str, Any] = {"qemu_mig.record": kind}
                for child in record:
                    name = child.get("name", "")
                    if name.startswith(r.ABBREV_PREFIX) and name not in values:
                        values[name] = _value(child)
                yield frame, values


def plugin_experts(pdml: str) -> set[str]:
    """The qemu_mig expert-info codes anywhere in the PDML."""
    return set(re.findall(r'name="qemu_mig\.expert\.([a-z0-9-]+)"', pdml))


BITMAP_KIND_NAMES = frozenset(kind.value for kind in r.BITMAP_KINDS)


def as_compared(values: dict[str, Any]) -> tuple[Any, ...]:
    return (values["qemu_mig.record"], values.get("qemu_mig.offset"),
            *(values.get(info.abbrev) for info in COMPARED))


@cache
def migshark_records(capture: Path) -> list[tuple[Any, ...]]:
    """The dirty-bitmap records of the capture's first migration stream, as migshark
    decodes them, in the shape as_compared() gives the plugin's."""
    out: list[tuple[Any, ...]] = []
    first: list[MigrationStream] = []

    def sink(stream: MigrationStream, event: Any) -> None:
        if not first:
            first.append(stream)
        if stream is not first[0] or not isinstance(event, Record):
            return
        if event.kind not in BITMAP_KIND_NAMES:
            return
        values: dict[str, Any] = {"qemu_mig.record": event.kind,
                                  "qemu_mig.offset": event.offset}
        for info in COMPARED:
            value = r.field_value(event, info)
            if value is not None:
                values[info.abbrev] = value
        out.append(as_compared(values))

    analyze_path(capture, AnalysisOptions(), sink)
    return out


def shown_records(plugin: Path, capture: Path, *extra: str) -> list[tuple[Any, ...]]:
    pdml = _tshark(plugin, capture, "-T", "pdml", *extra)
    return [as_compared(values) for _, values in plugin_records(pdml, BITMAP_KIND_NAMES)]


# --- the generator ------------------------------------------------------------------------


def test_every_registered_field_is_a_protofield() -> None:
    source = plugin_source()
    for name, info in r.FIELDS.items():
        if info.type == r.FieldType.LIST:
            continue
        assert f'F["{name}"] = ProtoField.' in source, name
        assert f'"{info.abbrev}"' in source


def test_template_uses_only_generated_fields_and_constants() -> None:
    source = plugin_source()
    template = (REPO_ROOT / "dissectors" / wireshark.TEMPLATE_NAME).read_text()
    defined_fields = set(re.findall(r'^F\["([^"]+)"\] = ', source, re.M))
    used_fields = set(re.findall(r'F\["([^"]+)"\]', template))
    assert used_fields - defined_fields == set()
    defined_constants = set(re.findall(r"^C\.([A-Z0-9_]+) = ", source, re.M))
    used_constants = set(re.findall(r"\bC\.([A-Z0-9_]+)", template))
    assert used_constants - defined_constants == set()
    used_experts = set(re.findall(r'expert\([^,]+, "([a-z-]+)"', template))
    assert used_experts == set(wireshark.expert_codes())
    assert used_experts <= set(CATALOGUE)
    assert {"missing-eos", "truncated", "capture-gap"} <= used_experts


def test_constants_come_from_the_grammar() -> None:
    source = plugin_source()
    assert f"C.BITMAP_MAX_BUFFER_SIZE = {g.BITMAP_MAX_BUFFER_SIZE}\n" in source
    assert f"C.BSF_RESERVED_MASK = {int(g.BitmapStartFlag.RESERVED_MASK)}\n" in source
    assert f"C.QEVM_MAGIC = {int.from_bytes(g.QEVM_MAGIC, 'big')}\n" in source
    for member in g.Command:
        assert f'[{int(member)}] = "{member.name}"' in source


def test_expert_severities_follow_the_catalogue() -> None:
    source = plugin_source()
    constants = {"error": "PI_ERROR", "warning": "PI_WARN", "note": "PI_NOTE"}
    for code in wireshark.expert_codes():
        line = next(line for line in source.splitlines()
                    if line.startswith(f'EXPERT["{code}"]'))
        assert line.endswith(constants[CATALOGUE[code].severity.label] + ")"), line


def test_generator_refuses_a_catalogue_without_a_code() -> None:
    partial = {code: wireshark.ExpertSource("error", "x")
               for code in wireshark.expert_codes()[1:]}
    with pytest.raises(KeyError):
        wireshark.generate_plugin(partial)


def test_lua_strings_escape_quotes_and_non_ascii() -> None:
    from migshark.dissectors.wireshark import _lua_string

    assert _lua_string('a"b\\c') == '"a\\"b\\\\c"'
    assert _lua_string("é\n") == '"\\195\\169\\010"'


def test_cli_writes_the_plugin(tmp_path: Path) -> None:
    out = tmp_path / "plugin.lua"
    done = subprocess.run([sys.executable, "-m", "migshark", "wireshark-plugin", "-o", str(out)],
                          capture_output=True, text=True, cwd=REPO_ROOT, check=False,
                          env=_env())
    assert done.returncode == 0, done.stderr
    assert out.read_text() == plugin_source()


def test_cli_install_goes_to_the_personal_plugin_folder(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "migshark", "wireshark-plugin", "--install"],
                          capture_output=True, text=True, cwd=REPO_ROOT, check=False,
                          env=_env(HOME=str(tmp_path)))
    assert done.returncode == 0, done.stderr
    installed = tmp_path / ".local" / "lib" / "wireshark" / "plugins" / "qemu_mig.lua"
    assert installed.read_text() == plugin_source()
    assert str(installed) in done.stdout


# --- in tshark --------------------------------------------------------------------------


def test_installed_plugin_registers_every_field_in_tshark(tmp_path: Path) -> None:
    require_tools("tshark")
    done = subprocess.run([sys.executable, "-m", "migshark", "wireshark-plugin", "--install"],
                          capture_output=True, text=True, cwd=REPO_ROOT, check=True,
                          env=_env(HOME=str(tmp_path)))
    assert done.returncode == 0
    # -G takes no -X: the plugin must load from the personal folder --install wrote.
    fields = subprocess.run(["tshark", "-G", "fields"], capture_output=True, text=True,
                            timeout=120, check=True, env=_env(HOME=str(tmp_path))).stdout
    registered = {line.split("\t")[2] for line in fields.splitlines()
                  if line.startswith("F\t") and "\tqemu_mig." in line}
    for info in r.FIELDS.values():
        if info.type != r.FieldType.LIST:
            assert info.abbrev in registered


@pytest.mark.parametrize("capture", REAL_CAPTURES + GENERATED_CAPTURES,
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_bitmap_records_equal_migshark(plugin: Path, capture: Path) -> None:
    expected = migshark_records(capture)
    assert expected, "the capture holds no dirty-bitmap records"
    # docs/wireshark.md: reordered captures need out-of-order reassembly, which in turn
    # waits forever for a segment the capture lost; so the gap capture goes without.
    prefs = () if "gap" in capture.name else ("-o", "tcp.reassemble_out_of_order:TRUE")
    shown = shown_records(plugin, capture, *prefs)
    assert shown == expected


def _bitmap_names(capture: Path) -> set[tuple[str, str]]:
    return {(record[3], record[4]) for record in migshark_records(capture)
            if record[3] is not None}


@pytest.mark.parametrize("capture", [CAPTURES / "real" / "precopy.pcap",
                                     CAPTURES / "real" / "mapping.pcapng"],
                         ids=lambda p: p.name)
def test_filter_on_bitmap_name_selects_exactly_its_records(plugin: Path, capture: Path
                                                           ) -> None:
    expected = migshark_records(capture)
    names = _bitmap_names(capture)
    assert len(names) >= 2
    for node, name in sorted(names)[:3]:
        shown = shown_records(plugin, capture, "-Y", f'qemu_mig.bitmap.name == "{name}"')
        # -Y keeps whole frames: other records of those frames come along.
        mine = [record for record in shown if record[4] == name]
        assert mine == [record for record in expected if record[4] == name], (node, name)
        frames = _tshark(plugin, capture, "-Y", f'qemu_mig.bitmap.name == "{name}"',
                         "-T", "fields", "-e", "frame.number").split()
        assert frames, name


def _verbose_records(text: str) -> list[list[str]]:
    """The records of `tshark -V -O qemu_mig` output: each its header line and the
    lines indented below it."""
    records: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("    ") and not line.startswith("     "):
            records.append([line.strip()])
        elif line.startswith("        ") and records:
            records[-1].append(line.strip())
    return records


def test_inherited_names_are_generated_and_lone_eos_has_none(plugin: Path) -> None:
    text = _tshark(plugin, CAPTURES / "real" / "precopy.pcap", "-V", "-O", "qemu_mig")
    bitmap_records = [lines for lines in _verbose_records(text)
                      if lines[0].startswith("Dirty bitmap")]
    assert bitmap_records
    inherited = 0
    for lines in bitmap_records:
        names = [line for line in lines if line.lstrip("[").startswith(("Node:", "Bitmap:"))]
        if lines[0] == "Dirty bitmap EOS":  # flags exactly EOS in these captures
            assert names == [], lines
            continue
        assert len(names) == 2, lines
        inherited += sum(line.startswith("[") for line in names)
    # Wireshark shows a generated field in brackets: the names a record inherits.
    assert inherited > 0
    assert "[Node: drive0]" in text


def test_ram_is_summarised_with_migshark_page_counts(plugin: Path) -> None:
    capture = CAPTURES / "real" / "precopy.pcap"
    pdml = _tshark(plugin, capture, "-T", "pdml")
    shown = list(plugin_records(pdml))
    summaries = [values for _, values in shown if values["qemu_mig.record"] == "ram-pages"]
    assert summaries
    counted: dict[str, int] = {"pages": 0, "zero_pages": 0}

    def sink(stream: MigrationStream, event: Any) -> None:
        if isinstance(event, Record) and event.kind == r.Kind.RAM_PAGES:
            for key in counted:
                counted[key] += event.fields.get(key, 0)

    analyze_path(capture, AnalysisOptions(), sink)
    assert counted["pages"] + counted["zero_pages"] > 1000
    assert sum(v["qemu_mig.ram.pages"] for v in summaries) == counted["pages"]
    assert sum(v["qemu_mig.ram.zero_pages"] for v in summaries) == counted["zero_pages"]
    # One summary per tvb, never one tree item per page.
    assert len(summaries) < counted["pages"] + counted["zero_pages"]
    assert {v["qemu_mig.record"] for _, v in shown}.isdisjoint({"ram-page", "ram-zero"})


def test_device_sections_show_idstr_instance_and_size(plugin: Path) -> None:
    capture = CAPTURES / "real" / "precopy.pcap"
    pdml = _tshark(plugin, capture, "-T", "pdml")
    devices = [values for _, values in plugin_records(pdml, frozenset(["device-state"]))]
    expected: list[tuple[str, int, int]] = []

    def sink(stream: MigrationStream, event: Any) -> None:
        if isinstance(event, Record) and event.kind == "device-state":
            expected.append((event.fields["idstr"], event.fields["instance_id"],
                             event.fields["size"]))

    analyze_path(capture, AnalysisOptions(), sink)
    assert expected
    assert [(v["qemu_mig.section.idstr"], v["qemu_mig.section.instance"],
             v["qemu_mig.device.size"]) for v in devices] == expected


def test_info_column_reads_like_dump(plugin: Path) -> None:
    info = _tshark(plugin, CAPTURES / "real" / "precopy.pcap", "-T", "fields",
                   "-e", "_ws.col.Info", "-Y", "qemu_mig.bitmap.granularity")
    assert "bitmap-start drive0/full-1m granularity=1048576 bitmap_flags=0x01" in info


# --- expert infos from generated fault captures ----------------------------------------

FAULT_EXPERTS = {
    "drop-eos": "missing-eos",
    "footer-mismatch": "footer-mismatch",
    "reserved-start-flags": "reserved-start-flags",
    "oversized-buffer": "buffer-too-large",
    "bad-section-version": "bad-section-version",
    "multibyte-flags": "multibyte-flags",
    "truncate-at=16890": "truncated",
    "gap": "capture-gap",
}


def _generate(tmp_path: Path, fault: str) -> Path:
    out = tmp_path / (re.sub(r"[^a-z0-9]+", "-", fault) + ".pcap")
    done = subprocess.run(
        [sys.executable, "-m", "migshark", "generate", str(SMALL_SCENARIO), "-o", str(out),
         "--fault", fault], capture_output=True, text=True, cwd=REPO_ROOT, check=False,
        env=_env())
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("fault", sorted(FAULT_EXPERTS))
def test_fault_capture_raises_its_expert_info(plugin: Path, tmp_path: Path, fault: str
                                             ) -> None:
    capture = _generate(tmp_path, fault)
    experts = plugin_experts(_tshark(plugin, capture, "-T", "pdml"))
    assert FAULT_EXPERTS[fault] in experts
    clean = plugin_experts(_tshark(plugin, CAPTURES / "generated" / "clean.pcap",
                                   "-T", "pdml"))
    assert FAULT_EXPERTS[fault] not in clean


def test_two_pass_dissection_shows_the_same_records(plugin: Path) -> None:
    capture = CAPTURES / "real" / "postcopy.pcap"
    assert shown_records(plugin, capture, "-2") == migshark_records(capture)


# --- fresh real-QEMU captures ------------------------------------------------------------

FRESH_PEERS = {"7.2": ("7.2", None), "10.0": ("10.0", None)}


@pytest.mark.qemu
@pytest.mark.parametrize("version", sorted(FRESH_PEERS))
@pytest.mark.parametrize("preset", ["precopy", "postcopy-1node"])
def test_fresh_real_qemu_capture_equals_migshark(plugin: Path, tmp_path: Path, version: str,
                                                preset: str) -> None:
    from testkit.realqemu.harness import PRESETS, run_migration
    from testkit.require import require_qemu, require_root

    require_tools("tcpdump")
    require_root()
    build = require_qemu(version)
    result = run_migration(PRESETS[preset], tmp_path, source=build, dest=build,
                           machine=FRESH_PEERS[version][1])
    for capture in (result.pcap, result.pcapng):
        if capture is None:
            continue
        expected = migshark_records(capture)
        assert expected
        assert shown_records(plugin, capture) == expected


# --- expert infos from crafted streams (faults `migshark generate` has no name for) ------


def _crafted_streams() -> dict[str, bytes]:
    from testkit.crafted import StreamBuilder, finish_ok, started

    F = g.BitmapFlag
    streams: dict[str, bytes] = {}
    s = started(granularity=1000)
    finish_ok(s)
    streams["invalid-granularity"] = s.data()
    s = started(bitmap_flags=0x05)
    finish_ok(s)
    streams["autoload-flag"] = s.data()
    s = started()
    s.record(F.COMPLETE | F.EXTRA_FLAGS, flags_width=4)
    finish_ok(s)
    streams["unknown-flags"] = s.data()
    s = StreamBuilder()
    s.add(bytes([0x55]))
    streams["unknown-item"] = s.data()
    s = StreamBuilder()
    s.section(g.ItemType.SECTION_PART, section_id=99)
    streams["unknown-section"] = s.data()
    s = StreamBuilder()
    s.add(bytes([g.ItemType.COMMAND]) + int(g.Command.PACKAGED).to_bytes(2, "big")
          + (2).to_bytes(2, "big") + b"\0\0")
    s.eof()
    streams["bad-command"] = s.data()
    return streams


CRAFTED = sorted(_crafted_streams())


@pytest.mark.parametrize("code", CRAFTED)
def test_crafted_stream_raises_its_expert_info(plugin: Path, tmp_path: Path, code: str
                                              ) -> None:
    from migshark.analyzer.pcapwriter import write_capture
    from migshark.analyzer.scenario import TransportSpec

    capture = tmp_path / f"{code}.pcap"
    write_capture(capture, _crafted_streams()[code], TransportSpec())
    assert code in plugin_experts(_tshark(plugin, capture, "-T", "pdml"))
    # migshark reports the same code for the same bytes
    found = {finding.code for finding in analyze_path(capture).all_findings()}
    assert code in found


def test_port_preference_decodes_a_stream_the_heuristic_refuses(plugin: Path,
                                                                tmp_path: Path) -> None:
    from migshark.analyzer.pcapwriter import write_capture
    from migshark.analyzer.scenario import TransportSpec

    capture = tmp_path / "version2.pcap"
    stream = g.QEVM_MAGIC + (2).to_bytes(4, "big") + bytes([g.ItemType.EOF])
    transport = TransportSpec()
    write_capture(capture, stream, transport)
    assert "bad-version" not in plugin_experts(_tshark(plugin, capture, "-T", "pdml"))
    by_port = _tshark(plugin, capture, "-T", "pdml", "-o", f"qemu_mig.port:{transport.dport}")
    assert "bad-version" in plugin_experts(by_port)


@pytest.mark.qemu
@pytest.mark.parametrize("version", sorted(FRESH_PEERS))
def test_fresh_multifd_capture_equals_migshark(plugin: Path, tmp_path: Path, version: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from testkit.realqemu import harness
    from testkit.require import require_qemu, require_root

    require_tools("tcpdump")
    require_root()
    build = require_qemu(version)

    def caps_with_multifd(qmp: harness.QMPClient) -> None:
        qmp.cmd("migrate-set-capabilities", capabilities=[
            {"capability": name, "state": True}
            for name in ("dirty-bitmaps", "events", "multifd")])

    monkeypatch.setattr(harness, "_set_caps", caps_with_multifd)
    result = harness.run_migration(harness.PRESETS["precopy"], tmp_path, source=build,
                                   dest=build)
    assert result.pcap is not None
    expected = migshark_records(result.pcap)
    assert expected
    assert shown_records(plugin, result.pcap) == expected
    # The multifd channels (their own connections, magic 0x11223344) are not claimed.
    frames = _tshark(plugin, result.pcap, "-Y", "qemu_mig", "-T", "fields",
                     "-e", "tcp.stream").split()
    assert len(set(frames)) == 1
    channels = _tshark(plugin, result.pcap, "-Y", "tcp.payload[0:4] == 11:22:33:44",
                       "-T", "fields", "-e", "tcp.stream").split()
    assert len(set(channels)) >= 2, "the migration used no multifd channel"
    assert set(channels).isdisjoint(frames)


@pytest.mark.parametrize("messy", [False, True], ids=["clean", "messy"])
@pytest.mark.parametrize("seed", [1, 2])
def test_any_segmentation_gives_the_same_records(plugin: Path, tmp_path: Path, seed: int,
                                                 messy: bool) -> None:
    """A real stream cut into segments of 1 byte to 64 KiB; messy adds duplicates,
    swapped segments and return-path bytes."""
    from testkit.pcapfiles import write_pcap
    from testkit.tcpflows import Conn, migration_frames

    stream = (CAPTURES / "real" / "exec.bin").read_bytes()
    conn = Conn("10.0.0.1", 40000, "10.0.0.2", 4444)
    capture = write_pcap(tmp_path / "cut.pcap", migration_frames(conn, stream, seed, messy))
    expected = migshark_records(capture)
    assert len(expected) > 10
    shown = shown_records(plugin, capture, "-o", "tcp.reassemble_out_of_order:TRUE")
    assert shown == expected
