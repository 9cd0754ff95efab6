"""Installing migshark as a user would: a wheel into a fresh venv.

What must hold: site-packages gains `migshark/` and its dist-info and nothing else at
the top level (no generic `analyzer`, `tui`, `dissectors` to collide with other
projects), and both entry points work from a folder that is not the checkout.

The wheel is built without build isolation (the machine's setuptools; no network)
from a copy of the source, so that the checkout gets no build/ or egg-info of its own
while other tests run. The venv sees the system site-packages for the dependencies
(construct, scapy, textual), and pip installs from the wheel only (--no-index).
Deselect with `-m "not install"`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Not part of the package and large or generated: left out of the build copy.
NOT_COPIED = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                    "*.so", ".mypy_cache", ".ruff_cache", ".pytest_cache",
                                    ".venv", "captures", "tmp")
TIMEOUT = 120

pytestmark = pytest.mark.install


def _run(*argv: str | Path, cwd: Path, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)
    assert done.returncode == 0, f"{argv}: {done.stdout}\n{done.stderr}"
    return done


def _clean_env() -> dict[str, str]:
    # The test run's PYTHONPATH points at the checkout: the installed copy must stand
    # on its own, so nothing of the checkout may leak in.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _venv_site_packages(venv: Path) -> Path:
    relative = Path(sysconfig.get_path("purelib")).relative_to(sysconfig.get_path("data"))
    return venv / relative


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str], set[str]]:
    """(venv, top-level names of site-packages before, after installing the wheel)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    shutil.copytree(REPO_ROOT, source, symlinks=True, ignore=NOT_COPIED)
    env = _clean_env()
    wheels = root / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
         "--no-build-isolation", "-w", wheels, source, cwd=root, env=env)
    (wheel,) = wheels.glob("migshark-*.whl")
    venv = root / "venv"
    # No pip of its own (seconds saved). The test run's own site-packages, with pip and
    # migshark's dependencies, is put on the venv's path by a .pth file: unlike
    # --system-site-packages this also holds when the test run is itself in a venv
    # (Debian's python3 through scripts/venv), whose packages are not the system's.
    # Only site directories have their .pth files run, so the checkout's editable
    # finder does not come along.
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root, env=env)
    site = _venv_site_packages(venv)
    outer = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "outer-site-packages.pth").write_text("".join(f"{p}\n" for p in outer))
    before = {p.name for p in site.iterdir()}
    _run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-index", wheel, cwd=root, env=env)
    after = {p.name for p in site.iterdir()}
    return venv, before, after


def test_site_packages_gains_only_migshark(installed: tuple[Path, set[str], set[str]]
                                          ) -> None:
    venv, before, after = installed
    added = after - before
    dist_info = [name for name in added if name.endswith(".dist-info")]
    assert added - set(dist_info) == {"migshark"}
    assert len(dist_info) == 1 and dist_info[0].startswith("migshark-")
    package = _venv_site_packages(venv) / "migshark"
    for part in ("analyzer/cli.py", "analyzer/report.py", "analyzer/connections.py",
                 "dissectors/grammar.py", "tui/app.py", "py.typed", "__main__.py"):
        assert (package / part).is_file(), part
    for symlink in ("analyzer", "dissectors", "tui"):
        assert not (package / symlink).is_symlink(), "the checkout's links are not installed"
    metadata = (_venv_site_packages(venv) / dist_info[0] / "METADATA").read_text()
    assert "License-Expression: MIT" in metadata
    assert "Classifier: Typing :: Typed" in metadata


def test_entry_points_work_from_any_folder(installed: tuple[Path, set[str], set[str]],
                                           tmp_path: Path) -> None:
    venv, _, _ = installed
    env = _clean_env()
    from migshark import __version__

    version = _run(venv / "bin" / "migshark", "--version", cwd=tmp_path, env=env)
    assert version.stdout.strip() == f"migshark {__version__}"
    usage = _run(venv / "bin" / "python", "-m", "migshark", "--help", cwd=tmp_path, env=env)
    assert usage.stdout.startswith("usage: migshark")
    for command in ("analyze", "dump", "tui", "live", "proxy", "generate", "replay"):
        assert command in usage.stdout
    # the copy that runs is the installed one, not the shared editable install
    where = _run(venv / "bin" / "python", "-c", "import migshark; print(migshark.__file__)",
                 cwd=tmp_path, env=env)
    assert Path(where.stdout.strip()).is_relative_to(_venv_site_packages(venv))


def test_installed_copy_analyses_a_capture(installed: tuple[Path, set[str], set[str]],
                                           tmp_path: Path) -> None:
    """The installed package is complete enough to do the product's job."""
    venv, _, _ = installed
    from migshark.dissectors import grammar as g

    stream = tmp_path / "tiny.bin"
    stream.write_bytes(g.build_file_header() + g.build_configuration("pc-i440fx-7.2")
                       + g.build_eof())
    done = _run(venv / "bin" / "migshark", "analyze", "--json", stream.name, cwd=tmp_path,
                env=_clean_env())
    assert '"machine_type": "pc-i440fx-7.2"' in done.stdout
