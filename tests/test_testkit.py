"""The helpers' direction: tests and scripts import testkit, never a test module.

A test module that imports another (or conftest) breaks when that one is renamed,
split or deleted, and pytest may import the same file twice under two names; a
benchmark that imports tests/ cannot run from a tree without them. Checked on the
source with `ast`, so that an import inside a function counts too.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.paths import REPO_ROOT


def imported_modules(source: str) -> Iterator[str]:
    """Every module an `import` names; a relative import is named by its dots."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield "." * node.level + (node.module or "")
            elif node.module == "tests":
                # `from tests import synthetic` imports the module tests.synthetic
                yield from (f"tests.{alias.name}" for alias in node.names)
            elif node.module is not None:
                yield node.module


def is_test_module(module: str, *, inside_tests: bool = True) -> bool:
    """tests, tests.anything, conftest or a test_* module; inside tests/ a relative
    import too, since there it can only reach another test module."""
    if module.startswith("."):
        return inside_tests
    top = module.split(".")[0]
    return top in ("tests", "conftest") or top.startswith("test_")


def python_files_under(folder: str) -> list[Path]:
    return sorted((REPO_ROOT / folder).rglob("*.py"))


def offending_imports(folder: str) -> list[str]:
    found = []
    for path in python_files_under(folder):
        for module in imported_modules(path.read_text()):
            if is_test_module(module, inside_tests=folder == "tests"):
                found.append(f"{path.relative_to(REPO_ROOT)} imports {module}")
    return found


@pytest.mark.parametrize("source, module", [
    ("from tests.conftest import CAPTURES", "tests.conftest"),
    ("from tests import synthetic", "tests.synthetic"),
    ("import tests.realqemu.harness", "tests.realqemu.harness"),
    ("from conftest import require", "conftest"),
    ("def f():\n    from test_fastpath import Conn", "test_fastpath"),
    ("from . import synthetic", "."),
])
def test_the_check_sees_every_way_of_importing_a_test_module(source: str, module: str) -> None:
    modules = list(imported_modules(source))
    assert modules == [module]
    assert is_test_module(module)


def test_relative_imports_count_only_inside_tests() -> None:
    assert is_test_module(".qmp", inside_tests=True)
    assert not is_test_module(".qmp", inside_tests=False)


def test_the_check_lets_product_and_testkit_imports_through() -> None:
    source = ("import pytest\nfrom migshark.analyzer import speedups\n"
              "from testkit.pcapfiles import write_pcap\nimport testkit.realqemu\n")
    assert not [m for m in imported_modules(source) if is_test_module(m)]


@pytest.mark.parametrize("folder", ["tests", "bench", "captures", "testkit"])
def test_no_module_imports_a_test_module(folder: str) -> None:
    assert python_files_under(folder), f"no Python files under {folder}/"
    assert offending_imports(folder) == []


def test_testkit_is_not_installed_with_the_product() -> None:
    setuptools = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "migshark" in setuptools["packages"]
    assert not [p for p in setuptools["packages"] if p.split(".")[0] == "testkit"]
    assert "testkit" not in setuptools["package-dir"]
