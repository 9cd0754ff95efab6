"""Scenarios for the reference encoder: what a generated migration stream contains.

A scenario is a TOML file (read with tomllib) or the equivalent dict. The format
is documented in docs/scenarios.md; every key has a default except the bitmaps'
names and the nodes' sizes, so the smallest useful scenario is::

    [[nodes]]
    name = "drive0"
    size = "64 MiB"

    [[nodes.bitmaps]]
    name = "bitmap0"
    granularity = 65536
    dirty = [[0, 1048576]]

Bitmaps are sent in the order they are listed (node by node), which is the wire
order; QEMU itself lists a node's bitmaps newest first.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migshark.dissectors import grammar as g

STREAM_FAULTS = (
    "drop-eos",
    "wrong-granularity-start",
    "wrong-buffer-size",
    "bits-unknown-bitmap",
    "reserved-start-flags",
    "truncate-at",
    "oversized-buffer",
    "bad-section-version",
    "footer-mismatch",
    "multibyte-flags",
)
TCP_FAULTS = ("reorder", "duplicate", "overlap-retransmit", "gap", "rst")
ALL_FAULTS = STREAM_FAULTS + TCP_FAULTS
# Faults that carry a value after '=' (truncate-at=OFFSET).
FAULTS_WITH_VALUE = ("truncate-at",)

DEFAULT_MACHINE_TYPE = "pc-i440fx-7.2"
# The encoder holds each bitmap densely (16 MiB of words at this bound): 64 GiB at
# 512-byte granularity, 8 TiB at 64 KiB.
MAX_GRANULES = 1 << 27
DEFAULT_TIMESTAMP = 1_700_000_000.0


class ScenarioError(ValueError):
    """The scenario is not valid; the message says which key and why."""


@dataclass(frozen=True)
class Fault:
    name: str
    value: int | None = None

    def __str__(self) -> str:
        return self.name if self.value is None else f"{self.name}={self.value}"

    @property
    def tcp_level(self) -> bool:
        return self.name in TCP_FAULTS


@dataclass
class RamBlock:
    name: str
    size: int
    # Fraction of pages that carry (seeded pseudo-random) data; the rest are zero pages.
    data_fraction: float = 0.1


@dataclass
class BitmapSpec:
    name: str
    granularity: int = 65536
    enabled: bool = True
    persistent: bool = False
    alias: str | None = None
    dirty: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) bytes
    density: float = 0.0  # fraction of granules dirtied at random (seeded), besides `dirty`
    seed: int | None = None

    @property
    def wire_name(self) -> str:
        return self.alias or self.name


@dataclass
class NodeSpec:
    name: str
    size: int
    alias: str | None = None
    bitmaps: list[BitmapSpec] = field(default_factory=list)

    @property
    def wire_name(self) -> str:
        return self.alias or self.name


@dataclass
class TransportSpec:
    src: str = "127.0.0.1"
    dst: str = "127.0.0.1"
    sport: int = 51234
    dport: int = 4444
    mss: int = 1448
    bandwidth: float = 125_000_000.0  # bytes per second of stream payload
    start_time: float = DEFAULT_TIMESTAMP
    ack_every: int = 2  # the destination ACKs every N data segments


@dataclass
class Scenario:
    name: str = "scenario"
    machine_type: str = DEFAULT_MACHINE_TYPE
    mode: str = "precopy"
    iterations: int = 2
    seed: int = 0
    ram: list[RamBlock] = field(default_factory=list)
    nodes: list[NodeSpec] = field(default_factory=list)
    devices: bool = True
    transport: TransportSpec = field(default_factory=TransportSpec)
    faults: list[Fault] = field(default_factory=list)

    @property
    def uses_mapping(self) -> bool:
        return any(node.alias for node in self.nodes)

    def bitmaps(self) -> list[tuple[NodeSpec, BitmapSpec]]:
        return [(node, bitmap) for node in self.nodes for bitmap in node.bitmaps]


# --- parsing ----------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any, where: str) -> int:
    """An int, or a string such as "64 MiB" / "4k" (binary units)."""
    if isinstance(value, bool):
        raise ScenarioError(f"{where}: expected a size, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match.group(2).lower() in _UNITS:
            return int(match.group(1)) * _UNITS[match.group(2).lower()]
    raise ScenarioError(f"{where}: expected a size like 65536 or \"64 MiB\", got {value!r}")


def parse_fault(text: str) -> Fault:
    name, _, value = text.partition("=")
    name = name.strip()
    if name not in ALL_FAULTS:
        raise ScenarioError(f"unknown fault {name!r}; known: {', '.join(ALL_FAULTS)}")
    if name in FAULTS_WITH_VALUE:
        if not value:
            raise ScenarioError(f"fault {name} needs a value: {name}=OFFSET")
        try:
            return Fault(name, int(value, 0))
        except ValueError:
            raise ScenarioError(f"fault {name}: {value!r} is not an integer") from None
    if value:
        raise ScenarioError(f"fault {name} takes no value")
    return Fault(name)


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise ScenarioError(f"{path}: {error.strerror or error}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ScenarioError(f"{path}: not valid TOML: {error}") from None
    data.setdefault("name", path.stem)
    return scenario_from_dict(data)


def scenario_from_dict(data: dict[str, Any]) -> Scenario:
    _only(data, "scenario", {"name", "machine_type", "mode", "iterations", "seed", "ram",
                             "nodes", "devices", "transport", "faults"})
    scenario = Scenario(
        name=str(data.get("name", "scenario")),
        machine_type=_str(data, "machine_type", DEFAULT_MACHINE_TYPE, "scenario"),
        mode=_str(data, "mode", "precopy", "scenario"),
        iterations=_int(data, "iterations", 2, "scenario"),
        seed=_int(data, "seed", 0, "scenario"),
        devices=_bool(data, "devices", True, "scenario"),
    )
    if scenario.mode not in ("precopy", "postcopy"):
        raise ScenarioError(f"mode must be precopy or postcopy, not {scenario.mode!r}")
    if scenario.iterations < 1:
        raise ScenarioError("iterations must be at least 1")
    ram = data.get("ram", {"blocks": [{"name": "pc.ram", "size": 1 << 20}]})
    if not isinstance(ram, dict):
        raise ScenarioError("ram must be a table with a `blocks` array")
    _only(ram, "ram", {"blocks"})
    for i, block in enumerate(_tables(ram, "blocks", "ram")):
        where = f"ram.blocks[{i}]"
        _only(block, where, {"name", "size", "data_fraction"})
        scenario.ram.append(RamBlock(
            name=_str(block, "name", None, where),
            size=parse_size(block.get("size", 1 << 20), f"{where}.size"),
            data_fraction=_float(block, "data_fraction", 0.1, where),
        ))
    for i, node in enumerate(_tables(data, "nodes", "scenario")):
        scenario.nodes.append(_node(node, f"nodes[{i}]"))
    transport = data.get("transport", {})
    if not isinstance(transport, dict):
        raise ScenarioError("transport must be a table")
    _only(transport, "transport", {"src", "dst", "sport", "dport", "mss", "bandwidth",
                                   "start_time", "ack_every"})
    defaults = TransportSpec()
    scenario.transport = TransportSpec(
        src=_str(transport, "src", defaults.src, "transport"),
        dst=_str(transport, "dst", defaults.dst, "transport"),
        sport=_int(transport, "sport", defaults.sport, "transport"),
        dport=_int(transport, "dport", defaults.dport, "transport"),
        mss=_int(transport, "mss", defaults.mss, "transport"),
        bandwidth=_float(transport, "bandwidth", defaults.bandwidth, "transport"),
        start_time=_float(transport, "start_time", defaults.start_time, "transport"),
        ack_every=_int(transport, "ack_every", defaults.ack_every, "transport"),
    )
    faults = data.get("faults", [])
    if not isinstance(faults, list) or not all(isinstance(f, str) for f in faults):
        raise ScenarioError("faults must be an array of strings")
    scenario.faults = [parse_fault(f) for f in faults]
    validate(scenario)
    return scenario


def _node(data: Any, where: str) -> NodeSpec:
    if not isinstance(data, dict):
        raise ScenarioError(f"{where} must be a table")
    _only(data, where, {"name", "size", "alias", "bitmaps"})
    node = NodeSpec(
        name=_str(data, "name", None, where),
        size=parse_size(_required(data, "size", where), f"{where}.size"),
        alias=_str(data, "alias", None, where, optional=True),
    )
    for i, bitmap in enumerate(_tables(data, "bitmaps", where)):
        bwhere = f"{where}.bitmaps[{i}]"
        _only(bitmap, bwhere, {"name", "granularity", "enabled", "persistent", "alias",
                               "dirty", "density", "seed"})
        dirty = bitmap.get("dirty", [])
        if not isinstance(dirty, list):
            raise ScenarioError(f"{bwhere}.dirty must be an array of [offset, length]")
        extents = []
        for j, extent in enumerate(dirty):
            if not (isinstance(extent, list) and len(extent) == 2):
                raise ScenarioError(f"{bwhere}.dirty[{j}] must be [offset, length]")
            extents.append((parse_size(extent[0], f"{bwhere}.dirty[{j}]"),
                            parse_size(extent[1], f"{bwhere}.dirty[{j}]")))
        seed = bitmap.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ScenarioError(f"{bwhere}.seed must be an integer")
        node.bitmaps.append(BitmapSpec(
            name=_str(bitmap, "name", None, bwhere),
            granularity=parse_size(bitmap.get("granularity", 65536), f"{bwhere}.granularity"),
            enabled=_bool(bitmap, "enabled", True, bwhere),
            persistent=_bool(bitmap, "persistent", False, bwhere),
            alias=_str(bitmap, "alias", None, bwhere, optional=True),
            dirty=extents,
            density=_float(bitmap, "density", 0.0, bwhere),
            seed=seed,
        ))
    return node


def validate(scenario: Scenario) -> None:
    """Refuse what QEMU could never send (the faults are how to send the impossible)."""
    if len(scenario.machine_type.encode()) > 255:
        raise ScenarioError("machine_type longer than 255 bytes")
    names = set()
    for block in scenario.ram:
        if not block.name or len(block.name.encode()) > 255:
            raise ScenarioError(f"ram block name {block.name!r} must be 1..255 bytes")
        if block.size <= 0 or block.size % g.DEFAULT_TARGET_PAGE_SIZE:
            raise ScenarioError(f"ram block {block.name}: size must be a positive multiple "
                                f"of {g.DEFAULT_TARGET_PAGE_SIZE}")
        if not 0.0 <= block.data_fraction <= 1.0:
            raise ScenarioError(f"ram block {block.name}: data_fraction must be in 0..1")
        if block.name in names:
            raise ScenarioError(f"ram block {block.name} listed twice")
        names.add(block.name)
    if not scenario.ram:
        raise ScenarioError("at least one RAM block is needed")
    mapped = scenario.uses_mapping
    wire_nodes = set()
    for node in scenario.nodes:
        if node.size <= 0 or node.size % g.SECTOR_SIZE:
            raise ScenarioError(f"node {node.name}: size must be a positive multiple of 512")
        if not node.wire_name or len(node.wire_name.encode()) > 255:
            raise ScenarioError(f"node {node.name}: name/alias must be 1..255 bytes")
        if mapped and node.bitmaps and not node.alias:
            raise ScenarioError(f"node {node.name}: with block-bitmap-mapping every node "
                                "with bitmaps needs an alias")
        if node.wire_name in wire_nodes:
            raise ScenarioError(f"node name/alias {node.wire_name} used twice")
        wire_nodes.add(node.wire_name)
        wire_bitmaps = set()
        for bitmap in node.bitmaps:
            gran = bitmap.granularity
            if gran < g.MIN_GRANULARITY or gran > g.MAX_GRANULARITY or gran & (gran - 1):
                raise ScenarioError(f"bitmap {node.name}/{bitmap.name}: granularity must be "
                                    "a power of two from 512 to 2^31")
            if -(-node.size // gran) > MAX_GRANULES:
                raise ScenarioError(f"bitmap {node.name}/{bitmap.name}: more than "
                                    f"{MAX_GRANULES} granules; use a coarser granularity")
            if mapped and not bitmap.alias:
                raise ScenarioError(f"bitmap {node.name}/{bitmap.name}: with "
                                    "block-bitmap-mapping every bitmap needs an alias")
            if not bitmap.wire_name or len(bitmap.wire_name.encode()) > 255:
                raise ScenarioError(f"bitmap {bitmap.name}: name/alias must be 1..255 bytes")
            if bitmap.wire_name in wire_bitmaps:
                raise ScenarioError(f"bitmap {node.name}/{bitmap.wire_name} listed twice")
            wire_bitmaps.add(bitmap.wire_name)
            for offset, length in bitmap.dirty:
                if offset < 0 or length <= 0 or offset + length > node.size:
                    raise ScenarioError(f"bitmap {node.name}/{bitmap.name}: dirty extent "
                                        f"[{offset}, {length}] is outside the node")
            if not 0.0 <= bitmap.density <= 1.0:
                raise ScenarioError(f"bitmap {node.name}/{bitmap.name}: density must be "
                                    "in 0..1")
    t = scenario.transport
    for address in (t.src, t.dst):
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            raise ScenarioError(f"transport: {address!r} is not an IPv4 address") from None
    for port in (t.sport, t.dport):
        if not 0 < port < 65536:
            raise ScenarioError(f"transport: port {port} out of range")
    if not 64 <= t.mss <= 65495:
        raise ScenarioError("transport.mss must be 64..65495")
    if t.bandwidth <= 0:
        raise ScenarioError("transport.bandwidth must be positive (bytes per second)")
    if t.ack_every < 1:
        raise ScenarioError("transport.ack_every must be at least 1")


# --- small typed accessors ----------------------------------------------------------


def _only(data: dict[str, Any], where: str, allowed: set[str]) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")


def _required(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ScenarioError(f"{where}.{key} is required")
    return data[key]


def _tables(data: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ScenarioError(f"{where}.{key} must be an array of tables")
    return value


def _str(data: dict[str, Any], key: str, default: str | None, where: str,
         optional: bool = False) -> Any:
    if key not in data:
        if default is None and not optional:
            raise ScenarioError(f"{where}.{key} is required")
        return default
    value = data[key]
    if not isinstance(value, str):
        raise ScenarioError(f"{where}.{key} must be a string")
    return value


def _int(data: dict[str, Any], key: str, default: int, where: str) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ScenarioError(f"{where}.{key} must be an integer")
    return value


def _float(data: dict[str, Any], key: str, default: float, where: str) -> float:
    value = data.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ScenarioError(f"{where}.{key} must be a number")
    return float(value)


def _bool(data: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ScenarioError(f"{where}.{key} must be true or false")
    return value


# --- writing ----------------------------------------------------------------------


def scenario_to_toml(data: dict[str, Any]) -> str:
    """TOML text for a scenario dict of the shape scenario_from_dict() reads."""
    lines: list[str] = []
    for key, value in data.items():
        if key not in ("ram", "nodes", "transport"):
            lines.append(f"{key} = {_toml_value(value)}")
    for block in data.get("ram", {}).get("blocks", []):
        lines += ["", "[[ram.blocks]]"] + [f"{k} = {_toml_value(v)}" for k, v in block.items()]
    for node in data.get("nodes", []):
        lines += ["", "[[nodes]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in node.items() if k != "bitmaps"]
        for bitmap in node.get("bitmaps", []):
            lines += ["", "[[nodes.bitmaps]]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in bitmap.items()]
    if data.get("transport"):
        lines += ["", "[transport]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in data["transport"].items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        import json

        # A JSON string is a valid TOML basic string for every character JSON escapes.
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
