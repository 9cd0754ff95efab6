"""Inputs read the way tshark reads them: `-` for stdin, pipes, gzip/xz/zstd by content."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from migshark.analyzer import inputs
from migshark.analyzer.analysis import analyze_path
from testkit.paths import REPO_ROOT

PCAP = REPO_ROOT / "captures/real/postcopy.pcap"
RAW = REPO_ROOT / "captures/generated/clean.bin"


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "migshark", *args], cwd=REPO_ROOT,
                          capture_output=True, input=stdin, timeout=120)


def analyze_json(*args: str, stdin: bytes | None = None) -> dict:
    done = run_cli("analyze", "--json", *args, stdin=stdin)
    assert done.returncode in (0, 1), done.stderr
    report = json.loads(done.stdout)
    report.pop("input")  # the one thing that names the input as given
    return report


def spool_folders() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("migshark-")}


def test_stdin_equals_the_file() -> None:
    before = spool_folders()
    assert analyze_json("-", stdin=PCAP.read_bytes()) == analyze_json(str(PCAP))
    assert spool_folders() == before  # the spooled copy is gone


def test_compressed_captures_equal_the_plain_one(tmp_path: Path) -> None:
    plain = analyze_json(str(PCAP))
    # names that lie: detection is by content
    gz = tmp_path / "capture.pcap"
    gz.write_bytes(gzip.compress(PCAP.read_bytes()))
    xz = tmp_path / "capture.gz"
    xz.write_bytes(lzma.compress(PCAP.read_bytes()))
    assert analyze_json(str(gz)) == plain
    assert analyze_json(str(xz)) == plain
    assert analyze_json("-", stdin=gzip.compress(PCAP.read_bytes())) == plain


@pytest.mark.skipif(shutil.which("zstd") is None, reason="no zstd program")
def test_zstd_capture_equals_the_plain_one(tmp_path: Path) -> None:
    zst = tmp_path / "capture.pcap.zst"
    subprocess.run(["zstd", "-q", "-o", str(zst), str(PCAP)], check=True)
    assert analyze_json(str(zst)) == analyze_json(str(PCAP))


def test_a_compressed_raw_stream_keeps_its_name(tmp_path: Path) -> None:
    packed = tmp_path / "clean.bin.gz"
    packed.write_bytes(gzip.compress(RAW.read_bytes()))
    result = analyze_path(packed)
    assert result.path == str(packed)
    assert [m.name for m in result.migrations] == ["clean.bin"]
    plain = analyze_path(RAW)
    assert [m.result() for m in result.migrations] == [m.result() for m in plain.migrations]


def test_dump_reads_stdin() -> None:
    from_file = run_cli("dump", str(PCAP))
    from_pipe = run_cli("dump", "-", stdin=gzip.compress(PCAP.read_bytes()))
    assert from_pipe.returncode == from_file.returncode
    assert from_pipe.stdout == from_file.stdout and from_file.stdout


def test_bad_inputs_exit_2_with_one_line_naming_the_input() -> None:
    for data in (b"", b"\x1f\x8b broken gzip", gzip.compress(b"not a capture"),
                 gzip.compress(PCAP.read_bytes())[:500]):
        done = run_cli("analyze", "-", stdin=data)
        assert done.returncode == 2, (data[:10], done.stdout)
        lines = done.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("migshark: stdin: "), lines
        assert "migshark-" not in lines[0]  # never the spooled file's name


def test_compression_is_recognised_by_magic_only() -> None:
    assert inputs.compression_of(gzip.compress(b"x")) is inputs.Compression.GZIP
    assert inputs.compression_of(lzma.compress(b"x")) is inputs.Compression.XZ
    assert inputs.compression_of(b"\x28\xb5\x2f\xfd....") is inputs.Compression.ZSTD
    assert inputs.compression_of(PCAP.read_bytes()[:8]) is None
    assert not inputs.needs_spooling(str(PCAP))
    assert not inputs.needs_spooling(str(REPO_ROOT / "no-such-file"))
    assert inputs.needs_spooling("-")
