"""The connections of a migration, as seen from the middle (live capture and proxy).

A QEMU migration is one or more connections from the source to the destination:

- the main migration stream, whose first bytes are the QEVM magic; its reverse
  direction is the return path (destination-to-source messages);
- multifd channels, extra connections starting with the multifd magic, carrying RAM
  pages (labelled, not decoded);
- anything else is unknown, unless the caller claims it as a migration (the proxy,
  where whatever connects is meant to migrate, and `live --port`): then a wrong magic
  is a finding of the decoder, not a silence.

`Connection` is sans-IO, like the decoders: bytes and ends go in by direction, events
come out of sinks, and `result()` is the per-connection report. `ConnectionTable`
holds every connection of a run (the proxy opens one per accepted socket);
`CaptureConnections` adds what a packet capture needs on top: TCP reassembly, and
finding out which flow of a connection is the source's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Protocol

from migshark.analyzer import findings
from migshark.analyzer.analysis import AnalysisOptions, AnalysisResult, EventSink, MigrationStream
from migshark.analyzer.capture import (
    RST,
    FlowKey,
    StreamClosed,
    StreamData,
    StreamGap,
    StreamReset,
    TcpReassembler,
    TcpSegment,
)
from migshark.analyzer.findings import Code
from migshark.analyzer.records import Event, Finding, Severity
from migshark.analyzer.report import analysis_json
from migshark.analyzer.returnpath import ReturnPathDecoder
from migshark.dissectors.grammar import QEVM_MAGIC
from migshark.dissectors.multifd import MULTIFD_MAGIC_BYTES, is_multifd_channel

# Both magics ("QEVM", multifd's 0x11223344) are four bytes: that many tell the kinds apart.
MAGIC_LENGTH = len(QEVM_MAGIC)
assert len(MULTIFD_MAGIC_BYTES) == MAGIC_LENGTH


class Direction(StrEnum):
    FORWARD = "source->destination"
    BACKWARD = "destination->source"

    @property
    def sender(self) -> str:
        return "source" if self is Direction.FORWARD else "destination"


FORWARD, BACKWARD = Direction.FORWARD, Direction.BACKWARD


class ConnectionKind(StrEnum):
    MIGRATION = "migration"
    MULTIFD = "multifd"
    UNKNOWN = "unknown"


def classify(head: bytes | bytearray) -> ConnectionKind | None:
    """What a connection carries, from the first bytes its source sent (None: too few)."""
    if len(head) < MAGIC_LENGTH:
        return None
    magic = bytes(head[:MAGIC_LENGTH])
    if magic == QEVM_MAGIC:
        return ConnectionKind.MIGRATION
    if is_multifd_channel(magic):
        return ConnectionKind.MULTIFD
    return ConnectionKind.UNKNOWN


class ConnectionFindingSink(Protocol):
    """Receives the findings about a connection itself, such as the multifd label.

    Events of a migration stream go to an EventSink, which is always given the
    stream; a connection without one (a multifd channel) has findings too, and no
    stream to name: they come here, with the connection."""

    def __call__(self, connection: Connection, finding: Finding, /) -> None: ...


class ConnectionEndSink(Protocol):
    """Told once per connection, after it ended and its stream (if any) finished."""

    def __call__(self, connection: Connection, /) -> None: ...


class Connection:
    """Both directions of one connection, decoded in arrival order.

    `claim` decodes the connection as a migration stream whatever its first bytes
    are, a multifd channel excepted."""

    def __init__(self, name: str, options: AnalysisOptions, *,
                 sink: EventSink | None = None,
                 on_finding: ConnectionFindingSink | None = None,
                 on_end: ConnectionEndSink | None = None,
                 claim: bool = False, flow: FlowKey | None = None,
                 on_migration: Callable[[MigrationStream], None] | None = None) -> None:
        self.name = name
        self._on_migration = on_migration
        self.options = options
        self.sink = sink
        self.on_finding = on_finding
        self.on_end = on_end
        self.claim = claim
        self.flow = flow  # the source's direction, when the connection is a TCP flow pair
        self.kind: ConnectionKind | None = None
        self.stream: MigrationStream | None = None
        self.return_path = ReturnPathDecoder()
        self.forward_bytes = 0
        self.backward_bytes = 0
        self.reset_by: str | None = None
        self.closed: set[Direction] = set()  # directions whose sender finished (FIN)
        self.notes: list[Finding] = []
        self.ended = False
        self._reset_from: str | None = None
        self._reset_noted = False
        self._head = bytearray()
        # Return-path bytes that overtook the stream's first bytes: kept, in order,
        # until the stream exists (only the stream can open a return path).
        self._backlog: list[tuple[bytes | memoryview, float | None]] = []

    # --- input ------------------------------------------------------------------

    def data(self, direction: Direction, chunk: bytes | memoryview,
             timestamp: float | None = None) -> None:
        if self.ended:
            return  # a late retransmission after a reset: the report is already made
        if direction is FORWARD:
            self.forward_bytes += len(chunk)
            if self.stream is not None:
                self.stream.feed(chunk, timestamp)
            elif self.kind is None:
                self._head += chunk
                if len(self._head) >= MAGIC_LENGTH:
                    self._start(timestamp)
            return
        self.backward_bytes += len(chunk)
        if self.stream is not None:
            self._return_path_events(self.return_path.feed(chunk, timestamp))
        elif self.kind is None:
            self._backlog.append((bytes(chunk), timestamp))

    def gap(self, direction: Direction, length: int, timestamp: float | None = None) -> None:
        """Bytes lost in one direction (a capture gap)."""
        if self.ended:
            return
        if direction is FORWARD:
            if self.stream is None and self.kind is None and self.claim:
                # the connection's start is missing: decode from here, the gap first
                self._begin_migration(timestamp)
            if self.stream is not None:
                self.stream.gap(length, timestamp)
        elif self.stream is not None:
            self._return_path_events(self.return_path.gap(length, timestamp))

    def reset(self, direction: Direction, peer: str | None = None) -> None:
        """The connection was reset by the sender of `direction` (`peer`: its address)."""
        if self.reset_by is not None or self.ended:
            return
        self.reset_by = direction.sender
        self._reset_from = peer
        self._note_reset()

    def close(self, direction: Direction) -> None:
        """The sender of `direction` finished sending (a FIN, a clean end of file)."""
        self.closed.add(direction)

    def end(self) -> None:
        """Both directions are over (or given up): finish decoding, once."""
        if self.ended:
            return
        self.ended = True
        if self.kind is None and self._head:
            self._start(None)
        if self.stream is not None:
            self._note_reset()
            self._return_path_events(self.return_path.finish())
            self.stream.finish()
        if self.on_end is not None:
            self.on_end(self)

    # --- results ----------------------------------------------------------------

    def worst_severity(self) -> Severity | None:
        found = self.stream.findings if self.stream is not None else self.notes
        return max((f.severity for f in found), default=None)

    def result(self, path: str, input_format: str) -> dict[str, Any] | None:
        """The connection's report, shaped like `analyze --json` plus its return path;
        None when it carried no migration stream."""
        if self.stream is None:
            return None
        result = analysis_json(AnalysisResult(path, input_format, [self.stream]))
        # The return path belongs to this connection's migration, not to the input.
        result["migrations"][0]["return_path"] = {
            "bytes": self.backward_bytes,
            "messages": dict(sorted(self.return_path.messages.items())),
            "shut_code": self.return_path.shut_code,
        }
        return result

    # --- internals --------------------------------------------------------------

    def _start(self, timestamp: float | None) -> None:
        kind = classify(self._head)
        if kind is ConnectionKind.MULTIFD:
            self._label(ConnectionKind.MULTIFD, Code.MULTIFD_CHANNEL,
                        f"{self.name}: multifd channel, pages not decoded")
        elif kind is ConnectionKind.MIGRATION or self.claim:
            self._begin_migration(timestamp)
        else:
            self.kind = ConnectionKind.UNKNOWN
        self._backlog.clear()
        self._head.clear()

    def _label(self, kind: ConnectionKind, code: Code, message: str) -> None:
        self.kind = kind
        note = findings.make(code, message, 0)
        self.notes.append(note)
        if self.on_finding is not None:
            self.on_finding(self, note)

    def _begin_migration(self, timestamp: float | None) -> None:
        self.kind = ConnectionKind.MIGRATION
        self.stream = MigrationStream(self.name, self.options, self.sink, self.flow)
        if self._on_migration is not None:
            self._on_migration(self.stream)
        if self._head:
            self.stream.feed(bytes(self._head), timestamp)
            self._head.clear()
        self._note_reset()
        for chunk, when in self._backlog:
            self._return_path_events(self.return_path.feed(chunk, when))
        self._backlog.clear()

    def _note_reset(self) -> None:
        if self.reset_by is None or self.stream is None or self._reset_noted:
            return
        self._reset_noted = True
        offset = self.stream.decoder.offset
        if self._reset_from is not None:
            message = (f"TCP RST from the {self.reset_by} ({self._reset_from}) "
                       f"after {offset} stream bytes")
        else:
            message = f"the {self.reset_by} reset the connection after {offset} stream bytes"
        self.stream.add_finding(findings.make(Code.PEER_RESET, message, offset))

    def _return_path_events(self, events: list[Event]) -> None:
        stream = self.stream
        assert stream is not None, "the return path is decoded only beside a stream"
        for event in events:
            if isinstance(event, Finding):
                stream.add_finding(event)
            elif self.sink is not None:
                self.sink(stream, event)


class ConnectionTable:
    """Every connection of one run and what they add up to.

    The sinks given here go to every connection opened; they may be replaced before
    the first connection opens (the TUI does). Opening is thread-safe: the proxy opens
    connections from its accept loop while the TUI reads the list."""

    def __init__(self, options: AnalysisOptions, sink: EventSink | None = None,
                 on_finding: ConnectionFindingSink | None = None,
                 on_end: ConnectionEndSink | None = None) -> None:
        self.options = options
        self.sink = sink
        self.on_finding = on_finding
        self.on_end = on_end
        self.connections: list[Connection] = []
        # in the order their migrations began: what a summary of the run lists
        self.streams: list[MigrationStream] = []
        self._lock = threading.Lock()

    def open(self, name: str, *, claim: bool = False,
             flow: FlowKey | None = None) -> Connection:
        connection = Connection(name, self.options, sink=self.sink,
                                on_finding=self.on_finding, on_end=self.on_end,
                                claim=claim, flow=flow, on_migration=self._migration_began)
        with self._lock:
            self.connections.append(connection)
        return connection

    def snapshot(self) -> list[Connection]:
        with self._lock:
            return list(self.connections)

    def _migration_began(self, stream: MigrationStream) -> None:
        with self._lock:
            self.streams.append(stream)

    def of_kind(self, kind: ConnectionKind) -> list[Connection]:
        return [c for c in self.snapshot() if c.kind is kind]

    def worst_severity(self) -> Severity | None:
        return max((s for c in self.snapshot() if (s := c.worst_severity()) is not None),
                   default=None)


class CaptureConnections(ConnectionTable):
    """Connections out of captured TCP segments (live capture).

    A flow becomes a connection when its first bytes carry a migration or multifd
    magic, or when its destination port is the one asked for (then even without its
    start: the capture may have begun mid-stream). The reverse flow of a connection is
    its backward direction. A reset from either side ends the connection at once:
    no FIN will follow a RST."""

    def __init__(self, options: AnalysisOptions, sink: EventSink | None = None,
                 on_finding: ConnectionFindingSink | None = None,
                 on_end: ConnectionEndSink | None = None) -> None:
        super().__init__(options, sink, on_finding, on_end)
        self.reassembler = TcpReassembler()
        self._by_flow: dict[FlowKey, tuple[Connection, Direction]] = {}
        # (src, sport, dst, dport) of both directions -> connections on that 4-tuple,
        # for resets the reassembler no longer reports (see _late_reset)
        self._by_address: dict[tuple[str, int, str, int], list[Connection]] = {}
        self._pending: dict[FlowKey, bytearray] = {}
        self._ignored: set[FlowKey] = set()

    def segment(self, segment: TcpSegment) -> None:
        for event in self.reassembler.feed(segment):
            self._event(event)
        if segment.flags & RST:
            self._late_reset(segment)

    def finish(self) -> None:
        """The capture is over: whatever is still open ends, marked incomplete."""
        for event in self.reassembler.finish():
            self._event(event)
        for flow, pending in list(self._pending.items()):
            if self._claimed(flow):
                self._open(flow).data(FORWARD, bytes(pending))
        self._pending.clear()
        for connection in self.snapshot():
            connection.end()

    def connection_of(self, stream: MigrationStream) -> Connection | None:
        return next((c for c in self.snapshot() if c.stream is stream), None)

    def _claimed(self, flow: FlowKey) -> bool:
        return self.options.port is not None and flow.dport == self.options.port

    def _open(self, flow: FlowKey) -> Connection:
        connection = self.open(str(flow), claim=self._claimed(flow), flow=flow)
        self._by_flow[flow] = (connection, FORWARD)
        for address in (flow[:4], flow.reverse()[:4]):
            self._by_address.setdefault(address, []).append(connection)
        return connection

    def _event(self, event: Any) -> None:
        flow = event.flow
        if isinstance(event, StreamData):
            self._data(flow, event)
        elif isinstance(event, StreamGap):
            entry = self._by_flow.get(flow)
            if entry is not None:
                entry[0].gap(entry[1], event.length, event.timestamp)
        elif isinstance(event, StreamReset):
            entry = self._by_flow.get(flow)
            if entry is None and (reverse := self._by_flow.get(flow.reverse())) is not None:
                entry = (reverse[0], BACKWARD if reverse[1] is FORWARD else FORWARD)
            if entry is not None:
                entry[0].reset(entry[1], f"{flow.src}:{flow.sport}")
                entry[0].end()
        elif isinstance(event, StreamClosed):
            entry = self._by_flow.get(flow)
            if entry is not None:
                entry[0].close(entry[1])
                if entry[1] is FORWARD:
                    # the source is done: what the destination still says is not awaited
                    entry[0].end()

    def _data(self, flow: FlowKey, event: StreamData) -> None:
        entry = self._by_flow.get(flow)
        if entry is not None:
            entry[0].data(entry[1], event.data, event.timestamp)
            return
        forward = self._by_flow.get(flow.reverse())
        if forward is not None and forward[1] is FORWARD:
            # the reverse of a connection: its return path, even if this flow spoke
            # first and was set aside then
            connection = forward[0]
            self._by_flow[flow] = (connection, BACKWARD)
            self._ignored.discard(flow)
            earlier = self._pending.pop(flow, b"")
            if earlier:
                connection.data(BACKWARD, bytes(earlier), event.timestamp)
            if event.offset > len(earlier):
                connection.gap(BACKWARD, event.offset - len(earlier), event.timestamp)
            connection.data(BACKWARD, event.data, event.timestamp)
            return
        if flow in self._ignored:
            return
        pending = self._pending.setdefault(flow, bytearray())
        if event.offset != len(pending):
            # The flow's start is missing; only --port can claim it.
            del self._pending[flow]
            if self._claimed(flow):
                connection = self._open(flow)
                connection.gap(FORWARD, event.offset - len(pending), event.timestamp)
                connection.data(FORWARD, event.data, event.timestamp)
            else:
                self._ignored.add(flow)
            return
        pending += event.data
        kind = classify(pending)
        if kind is None:
            return
        del self._pending[flow]
        wanted = (kind is ConnectionKind.MULTIFD or self._claimed(flow)
                  or (kind is ConnectionKind.MIGRATION and self.options.port is None))
        if wanted:
            self._open(flow).data(FORWARD, bytes(pending), event.timestamp)
        else:
            self._ignored.add(flow)

    def _late_reset(self, segment: TcpSegment) -> None:
        # A destination that closed (FIN) and then died answers the source's next bytes
        # with a RST. The reassembler ignores a RST on a direction already closed, so no
        # StreamReset comes and the migration would wait forever for a FIN the source
        # can no longer send: end it here.
        address = (segment.src, segment.sport, segment.dst, segment.dport)
        for connection in self._by_address.get(address, ()):
            flow = connection.flow
            if connection.ended or flow is None:
                continue
            sender = FORWARD if segment.src == flow.src else BACKWARD
            connection.reset(sender, f"{segment.src}:{segment.sport}")
            connection.end()
