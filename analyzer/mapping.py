"""Load the `block-bitmap-mapping` migration parameter (`--bitmap-mapping FILE`).

The file holds the parameter in the shape QEMU takes it:

    [{"node-name": "disk-a", "alias": "alias-node-0",
      "bitmaps": [{"name": "bitmap-a1", "alias": "bx",
                   "transform": {"persistent": true}}]}]

A `migrate-set-parameters` argument object ({"block-bitmap-mapping": [...]}) or the
whole QMP command ({"execute": ..., "arguments": {...}}) is accepted as well.

On the destination QEMU's loader resolves every DEVICE_NAME through the node aliases
and every BITMAP_NAME through that node's bitmap aliases (construct_alias_map() with
name_to_alias=false); an alias not in the map cancels the bitmap migration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from migshark.analyzer.jsoninput import load_json_input

# qemu_put_counted_string() carries at most 255 bytes; QEMU refuses longer aliases.
MAX_ALIAS_LENGTH = 255


class MappingError(ValueError):
    """The mapping file cannot be used (one-line reason for the CLI)."""


@dataclass(frozen=True, slots=True)
class BitmapAlias:
    name: str
    alias: str
    persistent: bool | None = None  # transform.persistent, when the mapping sets it


@dataclass(frozen=True, slots=True)
class NodeAlias:
    node_name: str
    alias: str
    bitmaps: dict[str, BitmapAlias] = field(default_factory=dict)  # by alias


@dataclass(slots=True)
class BitmapMapping:
    """Node aliases (as they travel on the wire) to real node and bitmap names."""

    nodes: dict[str, NodeAlias] = field(default_factory=dict)  # by alias

    def node(self, alias: str) -> NodeAlias | None:
        return self.nodes.get(alias)

    def bitmap(self, node_alias: str, bitmap_alias: str) -> BitmapAlias | None:
        node = self.nodes.get(node_alias)
        return node.bitmaps.get(bitmap_alias) if node else None

    def aliases(self) -> dict[tuple[str, str], tuple[str, str]]:
        """(node alias, bitmap alias) -> (node name, bitmap name), for display."""
        return {
            (node.alias, bm.alias): (node.node_name, bm.name)
            for node in self.nodes.values()
            for bm in node.bitmaps.values()
        }


def load_mapping(path: str | os.PathLike[str]) -> BitmapMapping:
    return load_json_input(path, parse_mapping, MappingError)


def parse_mapping(document: Any) -> BitmapMapping:
    """Validate like QEMU's check_dirty_bitmap_mig_alias_map() and build the map."""
    entries = _unwrap(document)
    mapping = BitmapMapping()
    node_names: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"entry {index}"
        if not isinstance(entry, dict):
            raise MappingError(f"{where}: not an object")
        node_name = _string(entry, "node-name", where)
        alias = _string(entry, "alias", where)
        if len(alias.encode()) > MAX_ALIAS_LENGTH:
            raise MappingError(f"{where}: node alias '{alias}' is longer than 255 bytes")
        if alias in mapping.nodes:
            raise MappingError(f"{where}: node alias '{alias}' is used twice")
        if node_name in node_names:
            raise MappingError(f"{where}: node '{node_name}' is mapped twice")
        node_names.add(node_name)
        bitmaps_in = entry.get("bitmaps", [])
        if not isinstance(bitmaps_in, list):
            raise MappingError(f"{where}: 'bitmaps' is not a list")
        bitmaps: dict[str, BitmapAlias] = {}
        names: set[str] = set()
        for bm_index, bm in enumerate(bitmaps_in):
            bm_where = f"{where}, bitmap {bm_index}"
            if not isinstance(bm, dict):
                raise MappingError(f"{bm_where}: not an object")
            name = _string(bm, "name", bm_where)
            bm_alias = _string(bm, "alias", bm_where)
            if len(bm_alias.encode()) > MAX_ALIAS_LENGTH:
                raise MappingError(f"{bm_where}: bitmap alias '{bm_alias}' is longer than "
                                   "255 bytes")
            if bm_alias in bitmaps:
                raise MappingError(f"{bm_where}: bitmap alias '{bm_alias}' is used twice "
                                   f"on node alias '{alias}'")
            if name in names:
                raise MappingError(f"{bm_where}: bitmap '{name}' is mapped twice on node "
                                   f"'{node_name}'")
            names.add(name)
            transform = bm.get("transform")
            persistent = None
            if isinstance(transform, dict) and isinstance(transform.get("persistent"), bool):
                persistent = transform["persistent"]
            bitmaps[bm_alias] = BitmapAlias(name, bm_alias, persistent)
        mapping.nodes[alias] = NodeAlias(node_name, alias, bitmaps)
    return mapping


def _unwrap(document: Any) -> list[Any]:
    if isinstance(document, dict):
        if "arguments" in document and isinstance(document["arguments"], dict):
            document = document["arguments"]
        if "block-bitmap-mapping" in document:
            document = document["block-bitmap-mapping"]
    if not isinstance(document, list):
        raise MappingError("expected a list of {node-name, alias, bitmaps} objects")
    return document


def _string(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise MappingError(f"{where}: '{key}' must be a non-empty string")
    return value
