"""Load what a destination already has (`--destination FILE`).

The file is the destination's QMP `query-block` or `query-named-block-nodes` output:
the bare list, or the whole reply ({"return": [...]}). Both may be concatenated in a
list of replies. From it come the names a DEVICE_NAME can resolve to (device names
and node names), the bitmaps that already exist with their granularity, and each
node's virtual size.
"""

from __future__ import annotations

import os
from typing import Any

from migshark.analyzer.bitmaps import DestinationContext
from migshark.analyzer.jsoninput import load_json_input


class DestinationError(ValueError):
    """The destination file cannot be used (one-line reason for the CLI)."""


def load_destination(path: str | os.PathLike[str]) -> DestinationContext:
    return load_json_input(path, parse_destination, DestinationError)


def parse_destination(document: Any) -> DestinationContext:
    context = DestinationContext()
    entries = list(_entries(document))
    if not entries and not (isinstance(document, list | dict) and _is_empty_reply(document)):
        raise DestinationError("expected query-block or query-named-block-nodes output")
    for entry in entries:
        if "inserted" in entry or "device" in entry and "node-name" not in entry:
            _add_block(context, entry)
        elif "node-name" in entry:
            _add_node(context, entry)
        else:
            raise DestinationError(
                "an entry has neither 'device' (query-block) nor 'node-name' "
                "(query-named-block-nodes)")
    return context


def _is_empty_reply(document: Any) -> bool:
    if isinstance(document, list):
        return all(_is_empty_reply(item) for item in document)
    return isinstance(document, dict) and document.get("return") == []


def _entries(document: Any) -> Any:
    """Yield the BlockInfo / BlockDeviceInfo objects, whatever wraps them."""
    if isinstance(document, dict):
        if "return" in document:
            yield from _entries(document["return"])
        elif "device" in document or "node-name" in document or "inserted" in document:
            yield document
        else:
            raise DestinationError("an object that is neither a QMP reply nor a block entry")
    elif isinstance(document, list):
        for item in document:
            yield from _entries(item)
    else:
        raise DestinationError(f"unexpected JSON value {type(document).__name__}")


def _add_block(context: DestinationContext, entry: dict[str, Any]) -> None:
    device = entry.get("device")
    inserted = entry.get("inserted")
    if not isinstance(inserted, dict):
        return  # an empty drive: no node for a bitmap to live on
    node = inserted.get("node-name")
    if not isinstance(node, str) or not node:
        raise DestinationError(f"query-block entry {device!r} has no inserted node-name")
    if isinstance(device, str) and device:
        context.devices[device] = node
    _add_node(context, inserted)
    # Before QEMU 4.2 the bitmaps were listed on BlockInfo rather than on the node.
    _add_bitmaps(context, node, entry.get("dirty-bitmaps"))


def _add_node(context: DestinationContext, entry: dict[str, Any]) -> None:
    node = entry.get("node-name")
    if not isinstance(node, str) or not node:
        raise DestinationError("a node entry without a node-name")
    context.nodes.add(node)
    image = entry.get("image")
    if isinstance(image, dict) and isinstance(image.get("virtual-size"), int):
        context.sizes[node] = image["virtual-size"]
    _add_bitmaps(context, node, entry.get("dirty-bitmaps"))


def _add_bitmaps(context: DestinationContext, node: str, bitmaps: Any) -> None:
    if bitmaps is None:
        return
    if not isinstance(bitmaps, list):
        raise DestinationError(f"node {node!r}: 'dirty-bitmaps' is not a list")
    for bitmap in bitmaps:
        if not isinstance(bitmap, dict):
            raise DestinationError(f"node {node!r}: a dirty bitmap entry is not an object")
        name = bitmap.get("name")
        granularity = bitmap.get("granularity")
        if not isinstance(name, str):
            continue  # anonymous bitmaps (successors) cannot clash with a migrated name
        if not isinstance(granularity, int):
            raise DestinationError(f"bitmap {node}/{name} has no integer granularity")
        context.bitmaps[(node, name)] = granularity
