"""Finding codes are registered names: findings.Code, checked against the catalogue."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from migshark.analyzer import findings
from migshark.analyzer.findings import CATALOGUE, Code

ROOT = Path(__file__).resolve().parent.parent
PRODUCT_DIRS = ("analyzer", "dissectors", "tui")
# Scenario fault names live in their own namespace (the TOML `faults = [...]` list);
# some are spelt like the finding they provoke, but they are not finding codes.
FAULT_NAME_FILES = {"analyzer/scenario.py", "analyzer/encoder.py"}
FAULT_NAMES = {"reserved-start-flags", "bad-section-version", "footer-mismatch",
               "multibyte-flags"}


def test_every_code_has_one_catalogue_entry_and_back() -> None:
    assert set(CATALOGUE) == set(Code)
    for code, kind in CATALOGUE.items():
        assert kind.code is code
        assert isinstance(code, Code)


def test_codes_equal_their_strings_so_json_is_unchanged() -> None:
    finding = findings.make(Code.MISSING_EOS, "no EOS", 12)
    assert finding.code == "missing-eos"
    assert json.dumps(finding.as_json()["code"]) == '"missing-eos"'
    assert {"missing-eos": 1}[finding.code] == 1


def test_make_stores_the_code_member_even_from_a_string() -> None:
    finding = findings.make("phase", "migration phase: setup", 0)  # type: ignore[arg-type]
    assert finding.code is Code.PHASE


@pytest.mark.parametrize("typo", ["missing_eos", "Missing-EOS", "missing-eos ", "", "phases"])
def test_make_refuses_an_unregistered_code(typo: str) -> None:
    with pytest.raises(ValueError, match="not a registered finding code"):
        findings.make(typo, "x", 0)  # type: ignore[arg-type]


def test_a_misspelt_member_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        _ = Code.MISSING_EOSS  # type: ignore[attr-defined]  # the typo under test


def _product_files() -> list[Path]:
    out = []
    for folder in PRODUCT_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            out.append(path)
    return out


def _dict_keys_and_subscripts(tree: ast.AST) -> set[int]:
    """ids of string constants used as a dict key or a subscript: field names such as
    fields["phase"], which are keys, not codes."""
    keys: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            keys.update(id(key) for key in node.keys if key is not None)
        elif isinstance(node, ast.Subscript):
            keys.add(id(node.slice))
    return keys


def test_no_code_string_literal_in_product_code() -> None:
    codes = {code.value for code in Code}
    found = []
    for path in _product_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel == "analyzer/findings.py":
            continue  # the registry itself
        tree = ast.parse(path.read_text())
        keys = _dict_keys_and_subscripts(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and node.value in codes and id(node) not in keys
                    and not (rel in FAULT_NAME_FILES and node.value in FAULT_NAMES)):
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert found == []


def test_the_scan_would_see_a_literal_code() -> None:
    # The check above must be able to fail: the same scan over a snippet finds one.
    tree = ast.parse('findings.make("missing-eos", "m", 0)\nx = {"phase": 1}\n')
    keys = _dict_keys_and_subscripts(tree)
    hits = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and node.value in {c.value for c in Code} and id(node) not in keys]
    assert hits == ["missing-eos"]
