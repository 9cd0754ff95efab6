#!/usr/bin/env python3
"""Re-cut the migration stream of a loopback capture into 1448-byte segments.

Loopback captures hold GSO frames of up to 64 KiB; a capture taken on a real
network (MTU 1500, timestamps off) carries the same bytes in 1448-byte segments
with an ACK for every second one, i.e. ~45x more frames. The client-to-server
stream is reassembled with migshark's own capture layer (which the benchmark also
checks against QEMU's ground truth) and written out by testkit/tcpflows.py.

    python bench/resegment.py IN.pcap OUT.pcap [--mss 1448]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from migshark.analyzer.capture import (  # noqa: E402
    CaptureReader,
    StreamData,
    StreamGap,
    TcpReassembler,
    parse_frame,
)
from migshark.analyzer.capture.tcp import StreamOpened  # noqa: E402
from testkit.tcpflows import TcpPcapWriter  # noqa: E402

QEVM = b"QEVM"


def resegment(src: Path, dst: Path, mss: int = 1448) -> dict[str, int]:
    reader = CaptureReader(src)
    reassembler = TcpReassembler()
    flow = None
    port = None
    stream_bytes = 0
    with open(dst, "wb", buffering=1 << 22) as out:
        writer: TcpPcapWriter | None = None
        for frame in reader:
            segment = parse_frame(frame.linktype, frame.data, frame.timestamp)
            if segment is None:
                continue
            for event in reassembler.feed(segment):
                if isinstance(event, StreamOpened) or event.flow != flow and flow is not None:
                    continue
                if isinstance(event, StreamGap):
                    raise SystemExit(f"{src}: the stream has a {event.length}-byte gap")
                if not isinstance(event, StreamData):
                    continue
                if flow is None:
                    if event.offset != 0 or bytes(event.data[:4]) != QEVM:
                        continue
                    flow, port = event.flow, event.flow.dport
                    writer = TcpPcapWriter(out, mss=mss, client=("192.0.2.1", flow.sport),
                                           server=("192.0.2.2", port),
                                           start_time=frame.timestamp)
                assert writer is not None
                writer.send(event.data)
                stream_bytes += len(event.data)
        for event in reassembler.finish():
            if isinstance(event, StreamData) and event.flow == flow and writer is not None:
                writer.send(event.data)
                stream_bytes += len(event.data)
        if writer is None:
            raise SystemExit(f"{src}: no QEVM stream found")
        writer.close()
    reader.close()
    return {"stream_bytes": stream_bytes, "frames": writer.frames, "port": port or 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--mss", type=int, default=1448)
    args = parser.parse_args()
    print(resegment(args.src, args.dst, args.mss))
    return 0


if __name__ == "__main__":
    sys.exit(main())
