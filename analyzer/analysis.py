"""From an input (raw stream, pcap, pcapng) to per-migration results.

The pipeline: capture reader -> frame parser -> TCP reassembly (analyzer.capture)
-> StreamDecoder (records and findings) -> BitmapTracker (bitmaps) -> summary.
Everything is streamed; nothing here keeps data that grows with the capture,
except the findings list and what callers choose to keep from `on_event`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from migshark.analyzer import findings, inputs
from migshark.analyzer.bitmaps import BitmapTracker, DestinationContext, Dialect
from migshark.analyzer.capture import (
    CaptureFormatError,
    CaptureReader,
    FlowKey,
    StreamClosed,
    StreamData,
    StreamGap,
    StreamOpened,
    StreamReset,
    TcpReassembler,
    sniff_format,
)
from migshark.analyzer.decode.resync import SIGNATURE_LOOKAHEAD, find_migration_records
from migshark.analyzer.decoder import StreamDecoder
from migshark.analyzer.fastpath import pump_capture
from migshark.analyzer.findings import Code
from migshark.analyzer.records import Event, Fields, Finding, Record, Severity
from migshark.dissectors.grammar import QEVM_MAGIC
from migshark.dissectors.registry import Kind

if TYPE_CHECKING:  # only for --bitmap-mapping, loaded by the CLI when given
    from migshark.analyzer.mapping import BitmapMapping

RAW_CHUNK = 1 << 20
# How many bytes of a flow that does not start with QEVM are searched for migration
# records (a capture that began mid-migration) before it is judged not to be one.
SNIFF_LIMIT = 64 << 20

EventSink = Callable[["MigrationStream", Event], None]


class InputError(Exception):
    """The input cannot be read at all (exit code 2)."""


class AnalysisOptions(Fields):
    _fields = ("port", "ram_detail", "keep_buffers", "destination", "aliases", "vmdesc",
               "mapping", "dialect")

    def __init__(self, port: int | None = None, ram_detail: bool = False,
                 keep_buffers: bool = True, destination: DestinationContext | None = None,
                 aliases: dict[tuple[str, str], tuple[str, str]] | None = None,
                 vmdesc: dict[str, Any] | None = None,
                 mapping: BitmapMapping | None = None,  # block-bitmap-mapping of the destination
                 dialect: Dialect = Dialect.QEMU) -> None:
        self.port = port
        self.ram_detail = ram_detail
        self.keep_buffers = keep_buffers
        self.destination = destination
        self.aliases: dict[tuple[str, str], tuple[str, str]] = {} if aliases is None else aliases
        self.vmdesc = vmdesc
        self.mapping = mapping
        self.dialect = dialect


class MigrationStream:
    """One migration stream: its decoder, bitmap tracker and running summary."""

    def __init__(self, name: str, options: AnalysisOptions, sink: EventSink | None = None,
                 flow: FlowKey | None = None) -> None:
        self.name = name
        self.flow = flow
        self.decoder = StreamDecoder(vmdesc=options.vmdesc, ram_detail=options.ram_detail)
        self.tracker = BitmapTracker(options.destination, options.aliases,
                                     mapping=options.mapping, dialect=options.dialect)
        self.findings: list[Finding] = []
        self.section_bytes: Counter[str] = Counter()
        self.record_counts: Counter[str] = Counter()
        self.phases: list[str] = []
        self.iterations = 0
        self.sink = sink
        self.keep_buffers = options.keep_buffers
        self.first_timestamp: float | None = None
        self.last_timestamp: float | None = None
        self.bytes_seen = 0
        self.closed = False

    def feed(self, data: bytes | memoryview, timestamp: float | None = None) -> None:
        self._note_time(timestamp)
        self.bytes_seen += len(data)
        self._handle(self.decoder.feed(data, timestamp))

    def ram_walk_state(self) -> tuple[int, int, int, int, int] | None:
        return self.decoder.ram_walk_state()

    def ram_walked(self, taken: int, pages: int, zero_pages: int, skip: int, skip_start: int,
                   timestamp: float) -> None:
        """Bytes walked outside the decoder (see StreamDecoder.ram_walked): no events."""
        self._note_time(timestamp)
        self.bytes_seen += taken
        self.decoder.ram_walked(taken, pages, zero_pages, skip, skip_start, timestamp)

    def gap(self, length: int, timestamp: float | None = None) -> None:
        self._note_time(timestamp)
        self._handle(self.decoder.gap(length, timestamp))

    def add_finding(self, finding: Finding) -> None:
        self._handle([finding])

    def finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._handle(self.decoder.finish())
        self._handle(self.tracker.finish(self.decoder.offset))

    def _note_time(self, timestamp: float | None) -> None:
        if timestamp is None:
            return
        if self.first_timestamp is None:
            self.first_timestamp = timestamp
        self.last_timestamp = timestamp

    def _handle(self, events: Sequence[Event]) -> None:
        for event in events:
            if isinstance(event, Record):
                self.record_counts[event.kind] += 1
                self.section_bytes[event.section or "(framing)"] += event.length
                if event.kind == Kind.SECTION_PART and event.section == "ram":
                    self.iterations += 1
            else:
                self.findings.append(event)
                if event.code == Code.PHASE:
                    self.phases.append(event.fields["phase"])
            if self.sink is not None:
                self.sink(self, event)
            for extra in self.tracker.consume(event):
                self.findings.append(extra)
                if self.sink is not None:
                    self.sink(self, extra)
            if isinstance(event, Record) and not self.keep_buffers:
                event.fields.pop("buffer", None)

    def result(self) -> dict[str, Any]:
        ordered = sorted(self.findings, key=lambda f: (f.offset, -f.severity))
        return {
            "stream": self.name,
            "machine_type": self.decoder.machine_type,
            "phases": self.phases,
            "ram_iterations": self.iterations,
            "stream_bytes": self.decoder.offset,
            "complete": self.decoder.ended,
            "sections": dict(sorted(self.section_bytes.items())),
            "records": dict(sorted(self.record_counts.items())),
            "first_timestamp": self.first_timestamp,
            "last_timestamp": self.last_timestamp,
            "bitmaps": self.tracker.results(),
            "findings": [f.as_json() for f in ordered],
        }


class AnalysisResult(Fields):
    _fields = ("path", "input_format", "migrations", "input_findings")

    def __init__(self, path: str, input_format: str, migrations: list[MigrationStream],
                 input_findings: list[Finding] | None = None) -> None:
        self.path = path
        self.input_format = input_format
        self.migrations = migrations
        self.input_findings: list[Finding] = [] if input_findings is None else input_findings

    def all_findings(self) -> Iterator[Finding]:
        yield from self.input_findings
        for migration in self.migrations:
            yield from migration.findings

    def worst_severity(self) -> Severity | None:
        return max((f.severity for f in self.all_findings()), default=None)

    def as_json(self) -> dict[str, Any]:
        per_stream = [m.result() for m in self.migrations]
        bitmaps, found = [], [f.as_json() for f in self.input_findings]
        for result in per_stream:
            bitmaps += [dict(b, stream=result["stream"]) for b in result["bitmaps"]]
            found += [dict(f, stream=result["stream"]) for f in result["findings"]]
        first = per_stream[0] if per_stream else {}
        return {
            "input": self.path,
            "format": self.input_format,
            "machine_type": first.get("machine_type"),
            "phases": first.get("phases", []),
            "sections": first.get("sections", {}),
            "bitmaps": bitmaps,
            "findings": found,
            "migrations": per_stream,
        }


def analyze_path(path: str | os.PathLike[str], options: AnalysisOptions | None = None,
                 sink: EventSink | None = None) -> AnalysisResult:
    options = options or AnalysisOptions()
    path = os.fspath(path)
    if inputs.needs_spooling(path):  # stdin, a pipe, a compressed file: see inputs.py
        with inputs.spooled(path) as local:
            result = analyze_path(local, options, sink)
        result.path = path
        return result
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory")
    try:
        kind = sniff_format(path)
    except OSError as error:
        raise InputError(f"{path}: {error.strerror or error}") from None
    if kind == "raw":
        return _analyze_raw(path, options, sink)
    return _analyze_capture(path, kind, options, sink)


def _analyze_raw(path: str, options: AnalysisOptions, sink: EventSink | None) -> AnalysisResult:
    try:
        size = os.path.getsize(path)
        handle = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as error:
        raise InputError(f"{path}: {error.strerror or error}") from None
    with handle:
        mid_stream = None
        if size < 4 or handle.read(4) != QEVM_MAGIC:
            # Perhaps a stream cut after its start: a migration by its records.
            handle.seek(0)
            mid_stream = _find_records_in_file(handle)
            if mid_stream is None:
                raise InputError(
                    f"{path}: neither a pcap/pcapng capture nor a QEVM migration stream")
        if options.vmdesc is None:
            options.vmdesc = find_vmdescription(handle, size)
        stream = MigrationStream(Path(path).name, options, sink)
        if mid_stream is not None:
            stream.decoder.start_mid_stream(mid_stream)
            handle.seek(mid_stream)
        else:
            handle.seek(0)
        while chunk := handle.read(RAW_CHUNK):
            stream.feed(chunk)
        stream.finish()
    return AnalysisResult(path, "raw", [stream])


def _find_records_in_file(handle: Any) -> int | None:
    """Where migration records start in the first SNIFF_LIMIT bytes of a raw file
    that does not start with QEVM (None: nowhere)."""
    sniffer = _Sniffer(0)
    while sniffer.searched < SNIFF_LIMIT and (chunk := handle.read(RAW_CHUNK)):
        found = sniffer.search(chunk)
        if found is not None:
            return found[0]
    return None


def find_vmdescription(handle: Any, size: int) -> dict[str, Any] | None:
    """Read the VMDESCRIPTION JSON at the end of a raw precopy stream, if there is one.

    The description is the stream's last item (after EOF), so it can be found from
    the end: the last `0x00 0x06 be32(len)` whose JSON runs exactly to the end.
    """
    import json
    import struct

    tail_size = min(size, 16 << 20)
    handle.seek(size - tail_size)
    tail = handle.read(tail_size)
    handle.seek(0)
    pos = len(tail)
    while True:
        pos = tail.rfind(b"\x00\x06", 0, pos)
        if pos < 0:
            return None
        if pos + 6 <= len(tail):
            (length,) = struct.unpack_from(">I", tail, pos + 2)
            if pos + 6 + length == len(tail) and tail[pos + 6 : pos + 7] == b"{":
                try:
                    desc = json.loads(tail[pos + 6 :])
                except ValueError:
                    return None
                return desc if isinstance(desc, dict) else None


def _analyze_capture(path: str, kind: str, options: AnalysisOptions, sink: EventSink | None
                     ) -> AnalysisResult:
    input_findings: list[Finding] = []
    try:
        reader = CaptureReader(path)
    except CaptureFormatError as error:
        raise InputError(str(error)) from None
    except OSError as error:
        raise InputError(f"{path}: {error.strerror or error}") from None
    demux = CaptureDemux(options, sink)
    try:
        pump_capture(reader, demux)
    except CaptureFormatError as error:
        input_findings.append(findings.make(Code.CAPTURE_TRUNCATED, str(error), 0))
    finally:
        demux.finish()
    if reader.truncated_at is not None:
        input_findings.append(findings.make(
            Code.CAPTURE_TRUNCATED,
            f"the capture file ends inside a record at file offset {reader.truncated_at}: "
            f"{reader.truncated_reason}", 0))
    reader.close()
    if not demux.streams:
        where = f"on port {options.port}" if options.port else "starting with QEVM"
        cut = f"; {input_findings[0].message}" if input_findings else ""
        raise InputError(f"{path}: no migration stream found (no TCP flow {where}){cut}")
    return AnalysisResult(path, kind, demux.streams, input_findings)


class _Sniffer(Fields):
    """The search of one flow for migration records: the bytes kept across segment
    boundaries, where they start in the flow, and how much was searched."""

    _fields = ("carry", "carry_offset", "searched")

    def __init__(self, carry_offset: int) -> None:
        self.carry = b""
        self.carry_offset = carry_offset
        self.searched = 0

    def search(self, data: bytes | memoryview) -> tuple[int, bytes] | None:
        """Where in the flow migration records start, and the bytes from there on
        (None: not in what arrived so far)."""
        window = self.carry + bytes(data)
        found = find_migration_records(window)
        if found is not None:
            return self.carry_offset + found, window[found:]
        self.searched += len(data)
        keep = min(len(window), SIGNATURE_LOOKAHEAD)
        self.carry_offset += len(window) - keep
        self.carry = window[len(window) - keep :]
        return None


class CaptureDemux:
    """Feeds TCP segments through reassembly to one MigrationStream per migration flow.

    A flow is a migration when its first bytes are QEVM, when its destination port is
    the one asked for, or (no port asked for, and the capture missed the flow's start)
    when migration records turn up in its first SNIFF_LIMIT bytes: a capture that began
    after the migration did.
    Used by offline analysis and by live capture.
    """

    def __init__(self, options: AnalysisOptions, sink: EventSink | None = None) -> None:
        self.options = options
        self.sink = sink
        self.reassembler = TcpReassembler()
        self.streams: list[MigrationStream] = []
        self._by_flow: dict[FlowKey, MigrationStream] = {}
        self._pending: dict[FlowKey, bytearray] = {}
        self._ignored: set[FlowKey] = set()
        self._sniffing: dict[FlowKey, _Sniffer] = {}
        # Flows whose SYN the capture holds: their first bytes are the stream's first,
        # so one that does not start with QEVM is no migration and is never searched.
        self._started: set[FlowKey] = set()
        self.on_stream_end: Callable[[MigrationStream], None] | None = None

    def stream_of(self, flow: FlowKey) -> MigrationStream | None:
        """The migration stream of `flow`, if it is one (yet)."""
        return self._by_flow.get(flow)

    def discards(self, flow: FlowKey) -> bool:
        """Whether in-order data of `flow` would be dropped unread: the flow was judged
        not a migration. The capture lane then skips such data without feeding it
        (docs/capture.md); a subclass that reads such flows (LiveDemux: the return
        path) handles its own events and so never lets it."""
        return flow in self._ignored and type(self)._event is CaptureDemux._event

    def segment(self, segment: Any) -> None:
        for event in self.reassembler.feed(segment):
            self._event(event)

    def finish(self) -> None:
        for event in self.reassembler.finish():
            self._event(event)
        for flow, pending in list(self._pending.items()):
            if self.options.port is not None and flow.dport == self.options.port:
                self._start(flow).feed(bytes(pending))
        self._pending.clear()
        for stream in self.streams:
            if not stream.closed:
                self._end(stream)

    def _start(self, flow: FlowKey) -> MigrationStream:
        stream = MigrationStream(str(flow), self.options, self.sink, flow)
        self._by_flow[flow] = stream
        self.streams.append(stream)
        return stream

    def _sniff(self, flow: FlowKey, sniffer: _Sniffer, data: bytes | memoryview,
               timestamp: float) -> None:
        found = sniffer.search(data)
        if found is not None:
            del self._sniffing[flow]
            offset, rest = found
            stream = self._start(flow)
            stream.decoder.start_mid_stream(offset)
            stream.feed(rest, timestamp)
        elif sniffer.searched >= SNIFF_LIMIT:
            del self._sniffing[flow]
            self._ignored.add(flow)

    def _end(self, stream: MigrationStream) -> None:
        stream.finish()
        if self.on_stream_end is not None:
            self.on_stream_end(stream)

    def _event(self, event: Any) -> None:
        flow = event.flow
        if isinstance(event, StreamData):
            stream = self._by_flow.get(flow)
            if stream is not None:
                stream.feed(event.data, event.timestamp)
                return
            if flow in self._ignored:
                return
            sniffer = self._sniffing.get(flow)
            if sniffer is not None:
                self._sniff(flow, sniffer, event.data, event.timestamp)
                return
            pending = self._pending.setdefault(flow, bytearray())
            if event.offset != len(pending):
                # The flow's start is missing: --port claims it, else its records may.
                if self.options.port is not None and flow.dport == self.options.port:
                    stream = self._start(flow)
                    stream.gap(event.offset - len(pending), event.timestamp)
                    stream.feed(event.data, event.timestamp)
                elif self.options.port is None:
                    sniffer = self._sniffing[flow] = _Sniffer(event.offset)
                    self._sniff(flow, sniffer, event.data, event.timestamp)
                else:
                    self._ignored.add(flow)
                self._pending.pop(flow, None)
                self._started.discard(flow)
                return
            pending += event.data
            if len(pending) < 4:
                return
            del self._pending[flow]
            by_port = self.options.port is not None and flow.dport == self.options.port
            by_magic = self.options.port is None and pending[:4] == QEVM_MAGIC
            if by_port or by_magic:
                self._start(flow).feed(bytes(pending), event.timestamp)
            elif self.options.port is None and flow not in self._started:
                sniffer = self._sniffing[flow] = _Sniffer(0)
                self._sniff(flow, sniffer, bytes(pending), event.timestamp)
            else:
                self._ignored.add(flow)
            self._started.discard(flow)
        elif isinstance(event, StreamGap):
            stream = self._by_flow.get(flow)
            if stream is not None:
                stream.gap(event.length, event.timestamp)
        elif isinstance(event, StreamReset):
            for stream in (self._by_flow.get(flow), self._by_flow.get(flow.reverse())):
                if stream is not None and not stream.closed:
                    side = "destination" if stream.flow != flow else "source"
                    stream.add_finding(findings.make(
                        Code.PEER_RESET, f"TCP RST from the {side} ({flow.src}:{flow.sport}) "
                        f"after {stream.decoder.offset} stream bytes",
                        stream.decoder.offset))
            stream = self._by_flow.get(flow)
            if stream is not None:
                self._end(stream)
        elif isinstance(event, StreamClosed):
            stream = self._by_flow.get(flow)
            if stream is not None:
                self._end(stream)
        elif isinstance(event, StreamOpened):
            if event.syn_seen:
                self._started.add(flow)
