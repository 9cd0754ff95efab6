"""`migshark dump`: -V from the field registry, and tshark's habits (-Y, -c, --json, -T fields)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from migshark.analyzer.records import Record
from migshark.analyzer.report import format_record_detail, record_info
from migshark.dissectors import registry
from testkit import synthetic
from testkit.paths import REPO_ROOT


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "migshark", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def bitmap_start_record() -> Record:
    """A START record as the decoder emits it (with its byte ranges)."""
    from migshark.analyzer.analysis import AnalysisOptions, analyze_path

    records: list[Record] = []
    path = REPO_ROOT / "captures/generated/clean.bin"
    analyze_path(path, AnalysisOptions(keep_buffers=True),
                 lambda stream, event: records.append(event) if isinstance(event, Record)
                 else None)
    return next(r for r in records if r.kind == registry.Kind.BITMAP_START)


def test_verbose_detail_is_every_registered_field_with_its_bytes() -> None:
    record = bitmap_start_record()
    lines = format_record_detail(record)
    views = registry.describe(record)
    # one line per field view, after the three header lines (offset, section, bitmap)
    assert len(lines) == 3 + len(views)
    granularity = next(line for line in lines if "(bitmap.granularity)" in line)
    view = next(v for v in views if v.info is registry.BITMAP_GRANULARITY)
    assert granularity.strip() == (f"Granularity (bitmap.granularity): {view.value}  "
                                   f"@{view.offset:#x}+4")
    # value strings and bit names, not bare numbers
    flags = next(line for line in lines if "(bitmap.flags):" in line)
    assert "START" in flags and "@" in flags
    assert any(line.startswith("      Start (bitmap.flags.start): set") for line in
               ["    " + line for line in lines])
    # generated fields are bracketed, as Wireshark marks them
    assert any(line.startswith("[Flag names (bitmap.flag_names):") for line in lines)


def test_one_line_summary_shows_the_registry_summary_fields() -> None:
    record = bitmap_start_record()
    info = registry.KINDS[registry.Kind.BITMAP_START]
    keys = [f.key for f in info.summary if f.key in record.fields]
    shown = [part.split("=", 1)[0] for part in record_info(record).split()]
    assert shown == keys and "granularity" in shown
    # the order is the registry's, whatever order the decoder filled the fields in
    assert keys == [k for k in registry.SUMMARY_KEYS if k in keys]


def test_dump_verbose_on_a_capture_names_fields_by_filter_name(tmp_path: Path) -> None:
    path = tmp_path / "s.bin"
    path.write_bytes(synthetic.precopy_stream())
    done = run_cli("dump", "-V", str(path))
    assert done.returncode == 0, done.stderr
    names = set(re.findall(r"\(([a-z_.]+)\): ", done.stdout))
    assert {"bitmap.granularity", "bitmap.node", "section.idstr", "bitmap.start_sector"} <= names
    assert names <= set(registry.FIELDS)


# --- tshark's habits: -Y, -c, --json, -T fields -e --------------------------------

CLEAN = "captures/generated/clean.bin"
REAL = "captures/real/postcopy.pcap"


def numbered_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r" *\d+ ", line)]


def test_display_filter_keeps_record_numbers() -> None:
    every = numbered_lines(run_cli("dump", CLEAN).stdout)
    done = run_cli("dump", "-Y", "bitmap.granularity == 65536", CLEAN)
    assert done.returncode == 0, done.stderr
    shown = numbered_lines(done.stdout)
    assert len(shown) == 2 and all("granularity=65536" in line for line in shown)
    # the same records, with the numbers they have unfiltered
    assert all(line in every for line in shown)
    assert "dirty-512" not in done.stdout


def test_bad_display_filter_is_a_one_line_error_exit_2() -> None:
    done = run_cli("dump", "-Y", "kind == ", CLEAN)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("migshark: bad display filter")
    assert len(done.stderr.splitlines()) == 1


def test_count_stops_after_n_records() -> None:
    done = run_cli("dump", "-c", "5", CLEAN)
    assert done.returncode == 0, done.stderr
    assert [int(line.split()[0]) for line in numbered_lines(done.stdout)] == [1, 2, 3, 4, 5]
    filtered = run_cli("dump", "-c", "2", "-Y", "kind == bitmap-start", CLEAN)
    assert len(numbered_lines(filtered.stdout)) == 2
    assert run_cli("dump", "-c", "0", CLEAN).returncode == 2


def dump_json(*args: str) -> list[dict]:
    import json

    done = run_cli("dump", "--json", *args)
    assert done.returncode in (0, 1), done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_dump_json_has_exactly_the_records_dump_prints() -> None:
    objects = dump_json(REAL)
    records = [o for o in objects if o["type"] == "record"]
    lines = numbered_lines(run_cli("dump", REAL).stdout)
    assert [r["number"] for r in records] == [int(line.split()[0]) for line in lines]
    assert [r["kind"] for r in records] == [line.split()[3] for line in lines]
    assert [f"{r['offset']:#x}" for r in records] == [line.split()[1] for line in lines]
    assert all(o["schema_version"] >= 2 for o in objects)
    bits = [r for r in records if r["kind"] == "bitmap-bits"]
    assert bits and all({"bitmap.start_sector", "bitmap.nr_sectors", "bitmap.flags"}
                        <= set(r["fields"]) for r in bits)
    assert all(r["node"] and r["bitmap"] for r in bits)


def test_dump_json_bitmap_records_carry_the_tui_detail_tree_fields() -> None:
    from textual.widgets import Tree

    from migshark.analyzer.analysis import AnalysisOptions, analyze_path
    from migshark.tui.app import MigsharkApp

    records: list[Record] = []
    analyze_path(REPO_ROOT / REAL, AnalysisOptions(keep_buffers=True),
                 lambda stream, event: records.append(event) if isinstance(event, Record)
                 else None)
    objects = [o for o in dump_json(REAL) if o["type"] == "record"]
    assert len(objects) == len(records)
    checked = 0
    for record, obj in zip(records, objects, strict=True):
        if not registry.Kind(record.kind).is_bitmap:
            continue
        tree: Tree[tuple[int, int] | None] = Tree("record")
        MigsharkApp._add_fields(tree, record, (record.offset, record.length))
        shown: list[str] = []
        stack = list(tree.root.children)
        while stack:
            node = stack.pop(0)
            shown.append(str(node.label))
            stack[:0] = list(node.children)
        tree_lines = shown[1:]  # the kind's title first
        json_fields = obj["fields"]
        assert len(tree_lines) == len(json_fields), (tree_lines, json_fields)
        for name, value in json_fields.items():
            info = registry.lookup(name.split("[", 1)[0])
            assert info is not None, name
            if info.type is registry.FieldType.BYTES:
                value = bytes.fromhex(value)  # JSON carries bytes as hex
            assert any(f": {info.display(value)}" in line for line in tree_lines), (name, value)
        checked += 1
    assert checked > 10


def test_fields_output_for_scripts() -> None:
    done = run_cli("dump", "-T", "fields", "-e", "no", "-e", "bitmap.node", "-e",
                   "bitmap.granularity", "-Y", "kind == bitmap-start", CLEAN)
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert rows == [["9", "drive0", "512"], ["10", "drive0", "65536"], ["11", "drive1", "65536"]]
    unknown = run_cli("dump", "-T", "fields", "-e", "bitmap.nope", CLEAN)
    assert unknown.returncode == 2 and "bitmap.nope" in unknown.stderr
    assert run_cli("dump", "-e", "no", CLEAN).returncode == 2


def test_dump_numbers_records_as_the_tui_store_does() -> None:
    """One numbering: record N in dump is row N of the TUI (findings are not numbered)."""
    from migshark.analyzer.analysis import AnalysisOptions, analyze_path
    from migshark.tui.model import Store

    store = Store()
    analyze_path(REPO_ROOT / REAL, AnalysisOptions(keep_buffers=True),
                 lambda stream, event: store.add(stream.name, event))
    records = [o for o in dump_json(REAL) if o["type"] == "record"]
    assert len(records) == len(store) and store.findings
    for obj in records:
        row = store.records[obj["number"] - 1]
        assert (row.offset, str(row.kind)) == (obj["offset"], obj["kind"])


def test_count_keeps_the_exit_code_of_what_was_read(tmp_path: Path) -> None:
    path = tmp_path / "cut.bin"
    data = synthetic.precopy_stream()
    path.write_bytes(data[:-300])  # truncated: an error finding, at the end
    assert run_cli("dump", "-c", "1", str(path)).returncode == 0  # stopped before it
    assert run_cli("dump", str(path)).returncode == 1
    # an error early in the stream, then more records: -c stops after it, still exit 1
    early = REPO_ROOT / "captures/generated/footer-mismatch.bin"
    stopped = run_cli("dump", "-c", "20", str(early))
    assert "[error] footer-mismatch" in stopped.stdout and stopped.returncode == 1
    assert len(numbered_lines(stopped.stdout)) == 20
