#!/usr/bin/env python3
"""Regenerate captures/real/: real QEMU migrations with dirty bitmaps + QEMU's truth.

    sudo python captures/make_real_captures.py            # every preset, QEMU 7.2
    sudo python captures/make_real_captures.py precopy    # just some
    sudo python captures/make_real_captures.py --qemu 10.0 --memory 16 --pcap-only \\
        postcopy-1node                                    # qemu10-postcopy-1node.*

For each preset of testkit/realqemu/harness.py this writes `<scenario>.pcap` and
`<scenario>.pcapng` (tcp transport) or `<scenario>.bin` (exec transport), and
`<scenario>.json`: the harness's ground truth plus `description` and `files`. With
`--qemu 10.0` both sides run the QEMU 10.0 of scripts/install-qemu10 (its default
machine type, pc-i440fx-10.0) and the files are named `qemu10-<scenario>.*`. Needs
root (tcpdump), QEMU, qemu-img, tcpdump and editcap. Disk images and logs go to a
temporary directory that is removed afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT = REPO_ROOT / "captures" / "real"
sys.path.insert(0, str(REPO_ROOT))

from testkit.realqemu.harness import (  # noqa: E402
    PRESETS,
    QEMU10,
    QEMU72,
    QemuBuild,
    qemu_build,
    run_migration,
)


def file_prefix(version: str) -> str:
    """7.2 is the reference peer and keeps the plain names; others are prefixed."""
    return "" if version == QEMU72 else "qemu" + version.split(".")[0] + "-"


def make(name: str, out: Path, build: QemuBuild, *, memory_mib: int | None = None,
         pcap_only: bool = False) -> dict[str, Any]:
    scenario = PRESETS[name]
    if memory_mib is not None:
        scenario = dataclasses.replace(scenario, memory_mib=memory_mib)
    prefix = file_prefix(build.version)
    with tempfile.TemporaryDirectory(prefix=f"migshark-{name}-") as tmp:
        result = run_migration(scenario, Path(tmp), source=build, dest=build)
        files: dict[str, str | None] = {"pcap": None, "pcapng": None, "raw": None}
        for kind, path in (("pcap", result.pcap), ("pcapng", result.pcapng), ("raw", result.raw)):
            if path is not None and not (pcap_only and kind == "pcapng"):
                shutil.copyfile(path, out / (prefix + path.name))
                files[kind] = prefix + path.name
    truth = dict(result.ground_truth)
    truth["description"] = scenario.description
    truth["files"] = files
    (out / f"{prefix}{name}.json").write_text(json.dumps(truth, indent=2) + "\n")
    return truth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"default: all of {', '.join(PRESETS)}")
    parser.add_argument("--out", type=Path, default=OUT, help="output directory")
    parser.add_argument("--qemu", choices=(QEMU72, QEMU10), default=QEMU72,
                        help="the QEMU both sides run (default: %(default)s)")
    parser.add_argument("--memory", type=int, metavar="MIB",
                        help="guest RAM instead of the preset's (smaller captures)")
    parser.add_argument("--pcap-only", action="store_true",
                        help="no .pcapng copy (keeps small fixtures small)")
    args = parser.parse_args(argv)
    names = args.scenarios or list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(PRESETS)}")
    if os.geteuid() != 0 and any(PRESETS[n].transport == "tcp" for n in names):
        parser.error("capturing on lo needs root (tcpdump)")
    build = qemu_build(args.qemu)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        truth = make(name, args.out, build, memory_mib=args.memory, pcap_only=args.pcap_only)
        files = [f for f in truth["files"].values() if f]
        sizes = ", ".join(f"{f} {(args.out / f).stat().st_size:,} B" for f in files)
        print(f"{name}: dest {truth['dest_outcome']}; {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
