#!/usr/bin/env python3
"""Regenerate captures/real/: real QEMU migrations with dirty bitmaps + QEMU's truth.

    sudo python captures/make_real_captures.py            # every preset
    sudo python captures/make_real_captures.py precopy    # just some

For each preset of testkit/realqemu/harness.py this writes `<scenario>.pcap` and
`<scenario>.pcapng` (tcp transport) or `<scenario>.bin` (exec transport), and
`<scenario>.json`: the harness's ground truth plus `description` and `files`. Needs
root (tcpdump), qemu-system-x86_64, qemu-img, tcpdump and editcap. Disk images and
logs go to a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import argparse
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

from testkit.realqemu.harness import PRESETS, run_migration  # noqa: E402


def make(name: str, out: Path) -> dict[str, Any]:
    scenario = PRESETS[name]
    with tempfile.TemporaryDirectory(prefix=f"migshark-{name}-") as tmp:
        result = run_migration(scenario, Path(tmp))
        files: dict[str, str | None] = {"pcap": None, "pcapng": None, "raw": None}
        for kind, path in (("pcap", result.pcap), ("pcapng", result.pcapng), ("raw", result.raw)):
            if path is not None:
                shutil.copyfile(path, out / path.name)
                files[kind] = path.name
    truth = dict(result.ground_truth)
    truth["description"] = scenario.description
    truth["files"] = files
    (out / f"{name}.json").write_text(json.dumps(truth, indent=2) + "\n")
    return truth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"default: all of {', '.join(PRESETS)}")
    parser.add_argument("--out", type=Path, default=OUT, help="output directory")
    args = parser.parse_args(argv)
    names = args.scenarios or list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(PRESETS)}")
    if os.geteuid() != 0 and any(PRESETS[n].transport == "tcp" for n in names):
        parser.error("capturing on lo needs root (tcpdump)")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        truth = make(name, args.out)
        files = [f for f in truth["files"].values() if f]
        sizes = ", ".join(f"{f} {(args.out / f).stat().st_size:,} B" for f in files)
        print(f"{name}: dest {truth['dest_outcome']}; {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
