"""--destination and --bitmap-mapping: loading QEMU's JSON, and the CLI around them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from migshark.analyzer.cli import main
from migshark.analyzer.destination import DestinationError, load_destination, parse_destination
from migshark.analyzer.mapping import MappingError, load_mapping, parse_mapping
from migshark.dissectors import grammar as g
from testkit.crafted import GRAN, F, StreamBuilder, finish_ok, started

# Trimmed from a real QEMU 7.2 destination: -drive ...,id=drive0,node-name=disk0 with
# block-dirty-bitmap-add node=disk0 name=existing granularity=4096.
QUERY_BLOCK = {"return": [{
    "device": "drive0", "locked": False, "removable": True, "type": "unknown",
    "inserted": {
        "node-name": "disk0", "drv": "qcow2", "ro": False, "file": "d.qcow2",
        "image": {"virtual-size": 67108864, "filename": "d.qcow2", "format": "qcow2"},
        "dirty-bitmaps": [{"name": "existing", "recording": True, "persistent": False,
                           "busy": False, "granularity": 4096, "count": 0}],
    },
}]}
QUERY_NAMED_BLOCK_NODES = {"return": [
    {"node-name": "disk0", "drv": "qcow2",
     "image": {"virtual-size": 67108864, "filename": "d.qcow2", "format": "qcow2"},
     "dirty-bitmaps": [{"name": "existing", "recording": True, "persistent": False,
                        "busy": False, "granularity": 4096, "count": 0}]},
    {"node-name": "#block041", "drv": "file",
     "image": {"virtual-size": 197120, "filename": "d.qcow2", "format": "file"}},
]}


def test_query_block_reply() -> None:
    context = parse_destination(QUERY_BLOCK)
    assert context.devices == {"drive0": "disk0"}
    assert context.nodes == {"disk0"}
    assert context.bitmaps == {("disk0", "existing"): 4096}
    assert context.sizes == {"disk0": 67108864}
    assert context.resolve("drive0") == "disk0"
    assert context.resolve("disk0") == "disk0"
    assert context.resolve("drive0", node_only=True) is None
    assert context.resolve("other") is None


def test_query_named_block_nodes_bare_list() -> None:
    context = parse_destination(QUERY_NAMED_BLOCK_NODES["return"])
    assert context.nodes == {"disk0", "#block041"}
    assert context.devices == {}
    assert context.bitmaps == {("disk0", "existing"): 4096}


def test_both_replies_together() -> None:
    context = parse_destination([QUERY_BLOCK, QUERY_NAMED_BLOCK_NODES])
    assert context.devices == {"drive0": "disk0"}
    assert context.nodes == {"disk0", "#block041"}


def test_an_empty_drive_has_no_node() -> None:
    context = parse_destination([{"device": "cd0", "locked": False, "removable": True}])
    assert context.resolve("cd0") is None


@pytest.mark.parametrize("document", [
    {"error": {"class": "GenericError", "desc": "x"}},
    [{"something": 1}],
    "query-block",
    [{"node-name": "n", "dirty-bitmaps": [{"name": "b"}]}],
])
def test_bad_destination_documents(document: object) -> None:
    with pytest.raises(DestinationError):
        parse_destination(document)


def test_destination_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DestinationError, match="not JSON"):
        load_destination(bad)
    with pytest.raises(DestinationError, match="No such file"):
        load_destination(tmp_path / "missing.json")


MAPPING = [
    {"node-name": "disk-a", "alias": "alias-node-0",
     "bitmaps": [{"name": "bitmap-a1", "alias": "bx"},
                 {"name": "bitmap-a2", "alias": "by", "transform": {"persistent": True}}]},
    {"node-name": "disk-b", "alias": "alias-node-1",
     "bitmaps": [{"name": "bitmap-b1", "alias": "bx"}]},
]


def test_mapping_shapes() -> None:
    for document in (MAPPING, {"block-bitmap-mapping": MAPPING},
                     {"execute": "migrate-set-parameters",
                      "arguments": {"block-bitmap-mapping": MAPPING}}):
        mapping = parse_mapping(document)
        assert mapping.aliases() == {
            ("alias-node-0", "bx"): ("disk-a", "bitmap-a1"),
            ("alias-node-0", "by"): ("disk-a", "bitmap-a2"),
            ("alias-node-1", "bx"): ("disk-b", "bitmap-b1"),
        }
        by = mapping.bitmap("alias-node-0", "by")
        assert by is not None and by.persistent is True


@pytest.mark.parametrize(("document", "reason"), [
    ([{"node-name": "a", "alias": "x"}, {"node-name": "b", "alias": "x"}], "used twice"),
    ([{"node-name": "a", "alias": "x"}, {"node-name": "a", "alias": "y"}], "mapped twice"),
    ([{"node-name": "a", "alias": "x" * 256}], "longer than 255"),
    ([{"node-name": "a", "alias": "x", "bitmaps": [{"name": "b", "alias": "c"},
                                                   {"name": "d", "alias": "c"}]}],
     "used twice"),
    ([{"alias": "x"}], "node-name"),
    ({"other": 1}, "expected a list"),
])
def test_mapping_rejects_what_qemu_rejects(document: object, reason: str) -> None:
    with pytest.raises(MappingError, match=reason):
        parse_mapping(document)


def test_mapping_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "m.json"
    bad.write_text("[")
    with pytest.raises(MappingError, match="not JSON"):
        load_mapping(bad)


# --- the CLI ----------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, data: object) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_cli_destination_turns_an_existing_bitmap_into_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = started(node="drive0", name="existing", granularity=4096)
    s.record(F.COMPLETE)
    finish_ok(s)
    stream = tmp_path / "s.bin"
    stream.write_bytes(s.data())
    assert main(["analyze", str(stream)]) == 0
    capsys.readouterr()
    destination = _write(tmp_path, "dest.json", QUERY_BLOCK)
    assert main(["analyze", str(stream), "--destination", destination]) == 1
    out = capsys.readouterr().out
    assert "errors (1):" in out
    assert "bitmap-exists" in out
    assert main(["analyze", str(stream), "--destination", destination,
                 "--dialect", "2017"]) == 0
    capsys.readouterr()
    assert main(["analyze", str(stream), "--destination", destination, "--json"]) == 1
    (migration,) = json.loads(capsys.readouterr().out)["migrations"]
    reported = migration["findings"]
    assert [f["code"] for f in reported if f["severity"] == "error"] == ["bitmap-exists"]


def test_cli_mapping_shows_real_names_and_reports_unknown_aliases(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = StreamBuilder()
    s.section()
    s.record(F.START, device_name="alias-node-0", bitmap_name="bx", granularity=GRAN,
             bitmap_flags=1)
    s.record(F.START, bitmap_name="zz", granularity=GRAN, bitmap_flags=1)
    s.eos()
    s.footer()
    s.section(g.ItemType.SECTION_END)
    s.record(F.COMPLETE, bitmap_name="bx")
    finish_ok(s)
    stream = tmp_path / "s.bin"
    stream.write_bytes(s.data())
    mapping = _write(tmp_path, "mapping.json", MAPPING)
    assert main(["analyze", str(stream), "--bitmap-mapping", mapping]) == 1
    out = capsys.readouterr().out
    assert "alias-node-0/bx (= disk-a/bitmap-a1)" in out
    assert "unknown-bitmap" in out and "Unknown bitmap alias 'zz'" in out


def test_cli_unreadable_option_files_exit_2(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    s = started()
    finish_ok(s)
    stream = tmp_path / "s.bin"
    stream.write_bytes(s.data())
    bad = tmp_path / "bad.json"
    bad.write_text("nope")
    for option in ("--destination", "--bitmap-mapping"):
        assert main(["analyze", str(stream), option, str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("migshark: ") and "not JSON" in err
        assert "Traceback" not in err
    assert main(["dump", str(stream), "--destination", str(tmp_path / "none.json")]) == 2
