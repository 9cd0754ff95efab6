"""docs/findings.md is generated from the catalogue and must be up to date."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from migshark.analyzer.findings import CATALOGUE

ROOT = Path(__file__).resolve().parent.parent


def _generator():  # noqa: ANN202 - a module
    spec = importlib.util.spec_from_file_location("gen_findings", ROOT / "docs" / "gen_findings.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_findings_doc_is_up_to_date() -> None:
    committed = (ROOT / "docs" / "findings.md").read_text()
    assert committed == _generator().render(), (
        "docs/findings.md is stale: run python docs/gen_findings.py")


def test_every_code_is_documented_with_what_qemu_does() -> None:
    text = _generator().render()
    for code, kind in CATALOGUE.items():
        assert f"### `{code}` ({kind.severity.label})" in text
        assert kind.meaning and kind.qemu, code
        if kind.message:
            assert f"`{kind.message}`" in text


def test_messages_quote_qemu_for_the_bitmap_loader() -> None:
    # Spot checks against QEMU 7.2's migration/block-dirty-bitmap.c and savevm.c.
    assert CATALOGUE["buffer-too-large"].message == (
        "Bitmap migration stream buffer allocation request is too large")
    assert CATALOGUE["reserved-start-flags"].message == (
        "Unknown flags in migrated dirty bitmap header: %x")
    assert CATALOGUE["bitmap-exists"].message == (
        "Bitmap with the same name ('%s') already exists on destination")
    assert CATALOGUE["no-bitmap-name"].message == "Error: block device name is not set"
    assert CATALOGUE["unknown-item"].message == "Unknown savevm section type %d"
