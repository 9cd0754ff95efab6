"""Walk a device's vmstate payload with the layout QEMU's VMDESCRIPTION gives.

VMDESCRIPTION (JSON, sent after EOF in precopy) describes, per device section,
each field's size and array length, nested structs and the subsections that were
actually sent. Walking it tells exactly where a FULL section's payload ends.
"""

from __future__ import annotations

from typing import Any

SUBSECTION_MARKER = 0x05
# A description nests structs; a hostile one must not recurse without bound.
MAX_DEPTH = 32


class VmstateIncomplete(Exception):
    """More bytes are needed; `needed` is the buffer position that must be reached."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


class VmstateInvalid(ValueError):
    """The bytes do not follow the description."""


def walk_device(desc: dict[str, Any], buf: bytes | bytearray, pos: int, limit: int) -> int:
    """Return the position just past the device payload that starts at `pos`."""
    return _walk_struct(desc, buf, pos, limit, 0)


def _walk_struct(desc: dict[str, Any], buf: bytes | bytearray, pos: int, limit: int,
                 depth: int) -> int:
    if depth > MAX_DEPTH:
        raise VmstateInvalid("vmstate description nests too deeply")
    for field in desc.get("fields", []):
        if not isinstance(field, dict):
            raise VmstateInvalid("malformed field description")
        count = int(field.get("array_len", 1))
        if count < 0:
            raise VmstateInvalid(f"field {field.get('name')!r}: negative array length")
        if field.get("type") == "struct":
            for _ in range(count):
                pos = _walk_struct(field.get("struct", {}), buf, pos, limit, depth + 1)
        else:
            size = int(field.get("size", 0))
            if size < 0:
                raise VmstateInvalid(f"field {field.get('name')!r}: negative size")
            pos += size * count
            if pos > limit:
                raise VmstateIncomplete(pos)
    for sub in desc.get("subsections", []):
        if pos >= limit:
            raise VmstateIncomplete(pos + 1)
        if buf[pos] != SUBSECTION_MARKER:
            raise VmstateInvalid(
                f"subsection {sub.get('vmsd_name')!r} expected at +{pos}, found byte "
                f"{buf[pos]:#04x}")
        if pos + 2 > limit:
            raise VmstateIncomplete(pos + 2)
        name_len = buf[pos + 1]
        pos += 2 + name_len + 4
        if pos > limit:
            raise VmstateIncomplete(pos)
        pos = _walk_struct(sub, buf, pos, limit, depth + 1)
    return pos


def index_vmdesc(vmdesc: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """VMDESCRIPTION's device descriptions by (device name, instance id)."""
    devices = vmdesc.get("devices", []) if isinstance(vmdesc, dict) else []
    index: dict[tuple[str, int], dict[str, Any]] = {}
    for device in devices:
        if isinstance(device, dict) and "name" in device:
            index[(str(device["name"]), int(device.get("instance_id", 0)))] = device
    return index
