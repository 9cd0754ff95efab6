"""Regenerate captures/generated/: one small capture per fault, with its expected result.

    python captures/generated/regenerate.py

Every file is `migshark generate captures/scenarios/small.toml` (or the scenario
named in the manifest) with one fault; `X.expected.json` next to `X` says which
bitmaps and findings `migshark analyze X` must report. tests/test_encoder_generated.py
checks them all and that regenerating gives the same bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from migshark.analyzer.encoder import encode, generate  # noqa: E402
from migshark.analyzer.scenario import load_scenario, parse_fault  # noqa: E402

SCENARIOS = ROOT / "captures" / "scenarios"


def truncation_point() -> int:
    """The middle of the first BITS buffer: a cut QEMU would meet in completion."""
    encoded = encode(load_scenario(SCENARIOS / "small.toml"), [])
    mark = next(m for m in encoded.marks if m.kind == "bitmap-bits" and m.length > 30)
    return mark.offset + mark.length // 2


def manifest() -> list[tuple[str, str, list[str]]]:
    """(output file name, scenario stem, faults)."""
    stream = ["drop-eos", "wrong-granularity-start", "wrong-buffer-size",
              "bits-unknown-bitmap", "reserved-start-flags", "oversized-buffer",
              "bad-section-version", "footer-mismatch", "multibyte-flags"]
    out = [("clean.bin", "small", []), ("clean.pcap", "small", []),
           ("clean.pcapng", "small", []), ("postcopy.pcap", "postcopy", []),
           ("mapping.bin", "mapping", [])]
    out += [(f"{fault}.bin", "small", [fault]) for fault in stream]
    out.append(("truncate-at.bin", "small", [f"truncate-at={truncation_point()}"]))
    out += [(f"{fault}.pcap", "small", [fault])
            for fault in ("reorder", "duplicate", "overlap-retransmit", "gap", "rst")]
    return out


def main() -> None:
    for name, stem, faults in manifest():
        scenario = load_scenario(SCENARIOS / f"{stem}.toml")
        expected = generate(scenario, HERE / name, [parse_fault(f) for f in faults])
        codes = ", ".join(f["code"] for f in expected["findings"]) or "no findings"
        print(f"{name}: {expected['stream_bytes']} stream bytes, {codes}")


if __name__ == "__main__":
    main()
