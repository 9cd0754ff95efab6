"""Best-of-N wall-clock time of `migshark analyze CAPTURE`, C lane and pure Python,
for one or more source trees, runs interleaved so that load from other processes on
the (shared) machine falls on all trees alike; the minimum is the least disturbed run.

    python3 bench/time_decode.py [--capture PATH] [--runs N] TREE [TREE...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def run_once(tree: str, capture: str, pure: bool) -> float:
    env = dict(os.environ, PYTHONPATH=tree)
    if pure:
        env["MIGSHARK_PURE_PYTHON"] = "1"
    else:
        env.pop("MIGSHARK_PURE_PYTHON", None)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "migshark", "analyze", capture], cwd=tree, env=env,
                   stdout=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("trees", nargs="+")
    parser.add_argument("--capture", default="captures/real/flags.pcap")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    best: dict[tuple[str, bool], float] = {}
    for _ in range(args.runs):
        for tree in args.trees:
            for pure in (False, True):
                took = run_once(tree, args.capture, pure)
                best[(tree, pure)] = min(best.get((tree, pure), took), took)
    for tree in args.trees:
        print(f"{tree}: C lane {best[(tree, False)]:.3f} s, "
              f"pure Python {best[(tree, True)]:.3f} s (best of {args.runs})")


if __name__ == "__main__":
    main()
