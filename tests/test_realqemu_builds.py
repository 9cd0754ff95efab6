"""The harness's registry of QEMU builds: the system's 7.2 and the 10.0 that
scripts/install-qemu10 unpacks beside it, and how a missing build is reported."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from testkit.paths import REPO_ROOT
from testkit.realqemu import harness
from testkit.realqemu.harness import QemuBuildMissing, _machine_type, _Qemu, qemu_build
from testkit.require import require_qemu


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the builds probed so far, so the test's environment is probed instead."""
    monkeypatch.setattr(harness, "_BUILDS", None)


def _fake_unpacked_qemu(root: Path, version_line: str) -> None:
    """A folder laid out as install-qemu10 leaves it, whose binaries print `version_line`."""
    bin_dir = root / "usr" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("qemu-system-x86_64", "qemu-img"):
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\necho '{version_line}'\n")
        script.chmod(0o755)
    for data in ("qemu", "seabios"):
        (root / "usr" / "share" / data).mkdir(parents=True)


@pytest.mark.usefixtures("fresh_registry")
def test_unpacked_build_is_found_with_its_own_firmware(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_unpacked_qemu(tmp_path, "QEMU emulator version 10.0.9 (Debian test)")
    monkeypatch.setenv(harness.QEMU10_DIR_ENV, str(tmp_path))
    build = qemu_build("10.0")
    assert build.full_version == "10.0.9 (Debian test)"
    assert build.system == str(tmp_path / "usr/bin/qemu-system-x86_64")
    assert build.img == str(tmp_path / "usr/bin/qemu-img")
    share = tmp_path / "usr" / "share"
    assert build.command() == [build.system, "-L", str(share / "qemu"),
                               "-L", str(share / "seabios")]


@pytest.mark.usefixtures("fresh_registry")
def test_a_binary_that_is_no_qemu_is_not_a_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_unpacked_qemu(tmp_path, "something else entirely")
    monkeypatch.setenv(harness.QEMU10_DIR_ENV, str(tmp_path))
    with pytest.raises(QemuBuildMissing, match="QEMU 10.0 not found"):
        qemu_build("10.0")


@pytest.mark.usefixtures("fresh_registry")
def test_missing_qemu10_skips_locally_and_fails_when_real_is_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(harness.QEMU10_DIR_ENV, str(tmp_path / "nothing-here"))
    monkeypatch.delenv("MIGSHARK_REQUIRE_REAL", raising=False)
    with pytest.raises(pytest.skip.Exception, match="install-qemu10"):
        require_qemu("10.0")
    monkeypatch.setenv("MIGSHARK_REQUIRE_REAL", "1")
    with pytest.raises(pytest.fail.Exception, match="MIGSHARK_REQUIRE_REAL.*QEMU 10.0"):
        require_qemu("10.0")


@pytest.mark.qemu
def test_both_builds_are_distinct_and_run(tmp_path: Path) -> None:
    old, new = require_qemu("7.2"), require_qemu("10.0")
    assert old.system != new.system and old.img != new.img
    assert old.full_version.startswith("7.2.") and new.full_version.startswith("10.0.")
    # each build's qemu-img is its own: it reports the same version as its emulator
    for build in (old, new):
        out = subprocess.run([build.img, "--version"], capture_output=True, text=True,
                             check=True, timeout=30).stdout
        assert f"version {build.full_version.split()[0]}" in out, out


@pytest.mark.qemu
def test_qemu10_comes_up_with_its_newest_machine_type(tmp_path: Path) -> None:
    build = require_qemu("10.0")
    qemu = _Qemu("probe", tmp_path, [], [], build=build)
    try:
        qmp = qemu.connect(20)
        assert qmp.cmd("query-version")["qemu"]["major"] == 10
        assert _machine_type(qmp) == "pc-i440fx-10.0"
        assert _machine_type(qmp, "pc-i440fx-7.2") == "pc-i440fx-7.2"
    finally:
        qemu.stop()


@pytest.mark.qemu
def test_install_script_leaves_an_installed_build_alone() -> None:
    """Idempotent: with QEMU 10.0 unpacked, install-qemu10 touches neither apt nor the
    folder (it would need root and the network otherwise)."""
    build = require_qemu("10.0")
    root = Path(build.system).parents[2]
    before = sorted((p.name, p.stat().st_mtime_ns) for p in root.iterdir())
    env = {**os.environ, harness.QEMU10_DIR_ENV: str(root)}
    run = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "install-qemu10")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "already in" in run.stdout
    assert sorted((p.name, p.stat().st_mtime_ns) for p in root.iterdir()) == before
