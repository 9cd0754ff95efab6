"""`migshark wireshark-plugin`: write the generated Lua dissector, or install it.

The generator lives in dissectors/ and imports nothing of the analyzer's; this is
where the findings catalogue (the expert infos' severities and texts) is handed to it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from migshark.analyzer.findings import CATALOGUE, Code
from migshark.dissectors.wireshark import ExpertSource, default_plugin_path, generate_plugin


def expert_sources() -> dict[str, ExpertSource]:
    """The findings catalogue as the plugin generator takes it."""
    # A stream cut inside a record is malformed data; every other code is the protocol's.
    return {code: ExpertSource(kind.severity.label, kind.meaning,
                               malformed=code is Code.TRUNCATED)
            for code, kind in CATALOGUE.items()}


def plugin_source() -> str:
    return generate_plugin(expert_sources())


def write_plugin(path: Path) -> None:
    """Write the plugin atomically, so that a running Wireshark never loads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(plugin_source(), encoding="utf-8")
    os.replace(partial, path)


def run_wireshark_plugin(args: argparse.Namespace) -> int:
    path = default_plugin_path() if args.install else Path(args.output)
    try:
        write_plugin(path)
    except OSError as error:
        print(f"migshark: cannot write {path}: {error.strerror or error}", file=sys.stderr)
        return 2
    if args.install:
        print(f"installed the Wireshark plugin as {path}\n"
              "restart Wireshark (or Analyze > Reload Lua Plugins); tshark loads it on start")
    else:
        print(f"wrote {path}")
    return 0
