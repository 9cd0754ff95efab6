"""`migshark replay`: send a generated or captured migration stream to a listening
destination (`qemu-system-x86_64 -incoming tcp:HOST:PORT`).

The source is a scenario (.toml, encoded with its faults plus --fault ones), a raw
stream, or a capture (the first TCP flow that starts with QEVM). The stream is sent
as it is, then the sending side is shut down and we wait for the destination to
close the connection, which QEMU does once it has loaded (or refused) the stream.
The return path is not opened: replayed streams are precopy as far as the
destination is concerned, or postcopy without a source to answer page requests.
"""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migshark.analyzer.scenario import Fault, ScenarioError, load_scenario, parse_fault
from migshark.dissectors.registry import Kind

SEND_CHUNK = 1 << 16


class ReplayError(Exception):
    """The source cannot be read or the destination cannot be reached."""


@dataclass
class ReplayReport:
    sent: int
    total: int
    closed_by_peer: bool
    reset_by_peer: bool
    seconds: float

    @property
    def accepted(self) -> bool:
        """Whether the destination read the whole stream and then closed in order.

        QEMU's incoming side reads until the load ends; when the load fails it exits,
        and the kernel resets a connection with bytes still unread, so a reset (or an
        incomplete send) means the destination stopped reading: it refused the stream.
        A stream that fails only at its very end (truncated) is read whole before QEMU
        gives up: that looks like an orderly close, and only the destination's own
        status can tell."""
        return self.sent == self.total and self.closed_by_peer and not self.reset_by_peer

    def summary(self) -> str:
        how = ("reset the connection: it stopped reading, the stream was refused"
               if self.reset_by_peer else
               "closed the connection" if self.closed_by_peer else "did not close in time")
        return (f"sent {self.sent} of {self.total} stream bytes in {self.seconds:.2f} s; "
                f"the destination {how}")


def load_stream(source: str | Path, faults: list[Fault] | None = None) -> bytes:
    """The stream bytes of a scenario, raw stream or capture."""
    from migshark.analyzer.encoder import encode

    path = Path(source)
    faults = faults or []
    if path.suffix == ".toml":
        scenario = load_scenario(path)
        all_faults = list(scenario.faults) + faults
        tcp = [str(f) for f in all_faults if f.tcp_level]
        if tcp:
            raise ScenarioError(f"TCP faults ({', '.join(tcp)}) only exist in captures")
        return encode(scenario, all_faults).data
    if faults:
        raise ScenarioError("--fault applies to scenarios, not to captured streams")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise ReplayError(f"{path}: {error.strerror or error}") from None
    if magic == b"QEVM":
        return path.read_bytes()
    return _captured_stream(path)


def _captured_stream(path: Path) -> bytes:
    from migshark.analyzer.capture import (
        CaptureFormatError,
        CaptureReader,
        StreamData,
        TcpReassembler,
        parse_frame,
    )

    reassembler = TcpReassembler()
    flows: dict[Any, bytearray] = {}

    def take(events: list[Any]) -> None:
        for event in events:
            if isinstance(event, StreamData):
                flows.setdefault(event.flow, bytearray()).extend(event.data)

    try:
        for frame in CaptureReader(str(path)):
            segment = parse_frame(frame.linktype, frame.data, frame.timestamp)
            if segment is not None:
                take(reassembler.feed(segment))
    except (CaptureFormatError, OSError) as error:
        raise ReplayError(f"{path}: {error}") from None
    take(reassembler.finish())
    for data in flows.values():
        if data[:4] == b"QEVM":
            return bytes(data)
    raise ReplayError(f"{path}: no TCP flow starting with QEVM")


def parse_address(text: str) -> tuple[str, int]:
    kind, _, rest = text.partition(":")
    host, _, port = rest.rpartition(":")
    if kind != "tcp" or not host or not port.isdigit():
        raise ReplayError(f"--to {text!r}: expected tcp:HOST:PORT")
    return host.strip("[]"), int(port)


def send_stream(data: bytes, host: str, port: int, timeout: float = 30.0) -> ReplayReport:
    started = time.monotonic()
    sent = 0
    closed = reset = False
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as error:
        raise ReplayError(f"cannot connect to {host}:{port}: {error.strerror or error}"
                          ) from None
    with sock:
        try:
            view = memoryview(data)
            while sent < len(data):
                sent += sock.send(view[sent : sent + SEND_CHUNK])
            sock.shutdown(socket.SHUT_WR)
            # QEMU closes its end once the load finished or failed; anything it sends
            # (nothing, without a return path) is drained.
            while sock.recv(4096):
                pass
            closed = True
        except ConnectionResetError:
            reset = True
        except BrokenPipeError:
            closed = True
        except TimeoutError:
            pass
        except OSError as error:
            # A reset that lands before our shutdown() leaves the socket unconnected.
            if error.errno != errno.ENOTCONN:
                raise ReplayError(f"sending to {host}:{port}: {error.strerror or error}"
                                  ) from None
            reset = True
    return ReplayReport(sent, len(data), closed, reset, time.monotonic() - started)


def cmd_replay(args: Any) -> int:
    import sys

    try:
        host, port = parse_address(args.to)
        faults = [parse_fault(f) for f in args.fault]
        if args.splice:
            data = spliced_stream(args.source, args.splice, faults)
        else:
            data = load_stream(args.source, faults)
        report = send_stream(data, host, port, args.timeout)
    except (ReplayError, ScenarioError) as error:
        print(f"migshark replay: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.accepted else 1


# --- splicing a generated dirty-bitmap section into a real stream --------------------

_SECTION_KINDS = (Kind.SECTION_START, Kind.SECTION_PART, Kind.SECTION_END)


def _bitmap_payload_spans(kinds_and_spans: list[tuple[str, int, int]], data: bytes
                          ) -> list[tuple[str, int, int]]:
    return [(kind, lo, hi) for kind, lo, hi in kinds_and_spans if data[lo:hi] != b"\x01"]


def _real_spans(stream: bytes) -> list[tuple[str, int, int]]:
    from migshark.analyzer.decoder import StreamDecoder
    from migshark.analyzer.records import Record
    from migshark.dissectors.grammar import DIRTY_BITMAP_SECTION_IDSTR

    spans: list[tuple[str, int, int]] = []
    pending: tuple[str, int] | None = None
    decoder = StreamDecoder()
    for event in decoder.feed(stream) + decoder.finish():
        if not isinstance(event, Record):
            continue
        if event.kind in _SECTION_KINDS and event.section == DIRTY_BITMAP_SECTION_IDSTR:
            pending = (event.kind, event.end)
        elif event.kind == Kind.FOOTER and pending is not None:
            spans.append((pending[0], pending[1], event.offset))
            pending = None
    return spans


def splice(real: bytes, generated: Any) -> bytes:
    """`real` with its dirty-bitmap section payloads replaced by the generated ones.

    The setup START payload takes the generated START payload, the END payload the
    generated END payload, and the first PART that carried more than EOS (postcopy
    BITS) the generated BITS PART; other such PARTs shrink to EOS. RAM, devices and
    every header and footer stay QEMU's, so the destination gets a whole machine.
    """
    from migshark.dissectors.grammar import DIRTY_BITMAP_SECTION_IDSTR

    generated_spans: list[tuple[str, int, int]] = []
    pending: tuple[str, int] | None = None
    for mark in generated.marks:
        if mark.kind in _SECTION_KINDS and mark.info.get("section_id") == _generated_id():
            pending = (mark.kind, mark.end)
        elif mark.kind == Kind.FOOTER and pending is not None:
            generated_spans.append((pending[0], pending[1], mark.offset))
            pending = None
    wanted = {kind: generated.data[lo:hi] for kind, lo, hi in
              _bitmap_payload_spans(generated_spans, generated.data)}
    real_spans = _bitmap_payload_spans(_real_spans(real), real)
    kinds = [kind for kind, _, _ in real_spans]
    if Kind.SECTION_START not in kinds:
        raise ReplayError(f"the capture has no {DIRTY_BITMAP_SECTION_IDSTR} section to "
                          "splice into (was dirty-bitmaps on?)")
    if (Kind.SECTION_PART in wanted) != (Kind.SECTION_PART in kinds):
        raise ReplayError("the scenario's mode (precopy/postcopy) differs from the capture's")
    out = bytearray()
    position = 0
    part_done = False
    for kind, lo, hi in real_spans:
        out += real[position:lo]
        if kind == Kind.SECTION_PART:
            out += b"\x01" if part_done else wanted[Kind.SECTION_PART]
            part_done = True
        else:
            out += wanted.get(kind, b"\x01")
        position = hi
    out += real[position:]
    return bytes(out)


def spliced_stream(scenario_path: str | Path, capture: str | Path,
                   faults: list[Fault] | None = None) -> bytes:
    from migshark.analyzer.encoder import encode

    scenario = load_scenario(scenario_path)
    if Path(scenario_path).suffix != ".toml":
        raise ScenarioError("--splice needs a scenario (.toml) as the source")
    return splice(load_stream(capture), encode(scenario, list(scenario.faults) + (faults or [])))


def _generated_id() -> int:
    from migshark.analyzer.encoder import DIRTY_BITMAP_SECTION_ID

    return DIRTY_BITMAP_SECTION_ID
