"""A longer fuzz run of the analysis, with the invariants of testkit/fuzzing.py.

    python bench/fuzz.py [--seconds 300] [--engine atheris|hypothesis]

With atheris (pip install atheris) the run is coverage-guided from the test seeds
(generated streams and, when captures/real/exec.bin exists, its dirty-bitmap
sections). Without it, hypothesis mutates the same seeds with many examples. Each
input is analysed whole and also fed in pieces; any exception, a record or finding
outside the data, or findings that depend on the chunking is a failure. Prints the
number of inputs run and the result.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _check(data: bytes) -> None:
    from testkit.fuzzing import check_invariants

    whole = check_invariants(data)[1]
    chunk = 1 + (len(data) * 7919 + 13) % 997  # a deterministic, input-dependent chunking
    pieces = check_invariants(data, chunk=chunk)[1]
    if [(f.code, f.offset) for f in whole] != [(f.code, f.offset) for f in pieces]:
        raise AssertionError(f"findings depend on chunking (chunk={chunk})")


def run_atheris(seconds: int) -> int:
    import atheris  # type: ignore[import-untyped]  # optional, and without types

    with atheris.instrument_imports():
        import migshark.analyzer.bitmaps  # noqa: F401
        import migshark.analyzer.decoder  # noqa: F401
        import migshark.dissectors.grammar  # noqa: F401
    from testkit.fuzzing import seeds

    corpus = Path(tempfile.mkdtemp(prefix="migshark-fuzz-"))
    for index, seed in enumerate(seeds()):
        (corpus / f"seed{index}").write_bytes(seed)
    def one_input(data: bytes) -> None:
        _check(data)

    # libFuzzer ends the process itself; its final stats line "Done N runs in S
    # second(s)" is the count, and any failure stops it with the crashing input saved.
    print(f"fuzz: atheris for {seconds} s from {len(seeds())} seeds in {corpus}", flush=True)
    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", "-max_len=65536",
                   "-rss_limit_mb=2048", "-print_final_stats=1", str(corpus)], one_input)
    atheris.Fuzz()
    return 0


def run_hypothesis(seconds: int) -> int:
    from hypothesis import HealthCheck, given, settings

    from testkit.fuzzing import mutated

    count = [0]
    deadline = time.monotonic() + seconds

    # Batches of fresh random examples until the time is up (one huge max_examples
    # would keep hypothesis generating long after the deadline).
    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutated())
    def batch(data: bytes) -> None:
        count[0] += 1
        _check(data)

    began = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch()
    except Exception as error:  # report the failure with the count, then fail
        print(f"fuzz: hypothesis FAILED after {count[0]} inputs: {error!r}", flush=True)
        return 1
    print(f"fuzz: hypothesis ran {count[0]} inputs in {time.monotonic() - began:.0f} s: "
          "no failure", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=300)
    parser.add_argument("--engine", choices=["atheris", "hypothesis"], default=None)
    args = parser.parse_args()
    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    os.environ.setdefault("PYTHONHASHSEED", "0")
    if engine == "atheris":
        return run_atheris(args.seconds)
    return run_hypothesis(args.seconds)


if __name__ == "__main__":
    raise SystemExit(main())
