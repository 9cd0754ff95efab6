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
