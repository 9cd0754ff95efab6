"""`migshark live`: decode migrations from a network interface as they happen.

Frames come from scapy's Linux listening socket (`conf.L2listen`, a PF_PACKET socket
with the BPF filter attached in the kernel), but they are not dissected by scapy: each
raw frame goes through the same path as an offline capture, `parse_frame` ->
`CaptureDemux` (TCP reassembly, one MigrationStream per migration). The scapy layer in
dissectors/scapy_layer.py is for display and building, not for this hot loop.

Loopback specifics, as libpcap handles them: every frame on `lo` is seen twice by a
packet socket (once outgoing, once incoming), so outgoing copies are skipped there;
GSO frames reach 65549 bytes, so the receive buffer is far larger than scapy's MTU.

Kernel drops are read with getsockopt(PACKET_STATISTICS), which also resets the
counters, and become a `kernel-drops` finding on every migration open at the time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any, BinaryIO

from migshark.analyzer import findings
from migshark.analyzer.analysis import (
    AnalysisOptions,
    AnalysisResult,
    CaptureDemux,
    MigrationStream,
)
from migshark.analyzer.capture import RST, FlowKey, StreamData, StreamGap, StreamReset, parse_frame
from migshark.analyzer.capture.frames import LINKTYPE_ETHERNET, LINKTYPE_RAW
from migshark.analyzer.records import Event, Finding, Record, Severity
from migshark.analyzer.returnpath import ReturnPathDecoder

EXIT_OK, EXIT_ERRORS, EXIT_UNUSABLE = 0, 1, 2
SNAPLEN = 262144
RCVBUF = 256 << 20
MULTIFD_MAGIC_BYTES = (0x11223344).to_bytes(4, "big")

SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_RCVBUFFORCE = 33
PACKET_OUTGOING = 4
ARPHRD_LOOPBACK = 772
ARPHRD_NONE = 0xFFFE
ARPHRD_IPGRE = 778
_RAW_IP_HATYPES = {ARPHRD_NONE, ARPHRD_IPGRE, 776}  # tun, gre, sit: no link header
STATS_INTERVAL = 0.5
DRAIN_BATCH = 1024


class PcapngWriter:
    """Minimal pcapng: one section, one interface, enhanced packet blocks (ns stamps)."""

    def __init__(self, handle: BinaryIO, linktype: int, iface: str) -> None:
        self.handle = handle
        shb_body = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
        self._block(0x0A0D0D0A, shb_body)
        name = iface.encode()
        options = (self._option(2, name) + self._option(9, b"\x09")
                   + struct.pack("<HH", 0, 0))
        self._block(1, struct.pack("<HHI", linktype, 0, SNAPLEN) + options)

    @staticmethod
    def _option(code: int, value: bytes) -> bytes:
        pad = -len(value) % 4
        return struct.pack("<HH", code, len(value)) + value + b"\0" * pad

    def _block(self, block_type: int, body: bytes) -> None:
        length = 12 + len(body)
        self.handle.write(struct.pack("<II", block_type, length) + body
                          + struct.pack("<I", length))

    def write(self, timestamp: float, frame: bytes) -> None:
        ns = int(timestamp * 1_000_000_000)
        pad = -len(frame) % 4
        body = (struct.pack("<IIIII", 0, ns >> 32, ns & 0xFFFFFFFF, len(frame), len(frame))
                + frame + b"\0" * pad)
        self._block(6, body)

    def close(self) -> None:
        self.handle.close()


class LiveDemux(CaptureDemux):
    """CaptureDemux plus what a live view needs: the return path of each migration is
    decoded, multifd channels are labelled instead of being taken for migrations, and a
    reset from either side ends the migration at once (no FIN will follow a RST)."""

    def __init__(self, options: AnalysisOptions, sink: Any = None) -> None:
        super().__init__(options, sink)
        self.return_paths: dict[FlowKey, ReturnPathDecoder] = {}
        self.multifd: set[FlowKey] = set()

    def _event(self, event: Any) -> None:
        flow = event.flow
        forward = self._by_flow.get(flow.reverse())
        if forward is not None and flow not in self._by_flow:
            if isinstance(event, StreamData):
                self._return_path(forward, self.return_paths.setdefault(
                    flow, ReturnPathDecoder()).feed(event.data, event.timestamp))
                return
            if isinstance(event, StreamGap) and flow in self.return_paths:
                self._return_path(forward, self.return_paths[flow].gap(
                    event.length, event.timestamp))
                return
        if (isinstance(event, StreamData) and flow not in self._by_flow
                and flow not in self._ignored):
            head = bytes(self._pending.get(flow, b"")) + bytes(event.data[:4])
            if len(head) >= 4 and head[:4] == MULTIFD_MAGIC_BYTES:
                self._pending.pop(flow, None)
                self._ignored.add(flow)
                self.multifd.add(flow)
                if self.sink is not None:
                    self.sink(None, findings.make(
                        "multifd-channel", f"{flow}: multifd channel, pages not decoded", 0))
                return
        super()._event(event)
        if isinstance(event, StreamReset) and forward is not None and not forward.closed:
            self._end(forward)

    def segment(self, segment: Any) -> None:
        super().segment(segment)
        if not segment.flags & RST:
            return
        # A destination that closed (FIN) and then died answers the source's next bytes
        # with a RST. The reassembler ignores a RST on a direction already closed, so no
        # StreamReset comes and the migration would wait forever for a FIN the source
        # can no longer send: end it here.
        tuples = {(segment.src, segment.sport, segment.dst, segment.dport),
                  (segment.dst, segment.dport, segment.src, segment.sport)}
        for flow, stream in list(self._by_flow.items()):
            if stream.closed or flow[:4] not in tuples:
                continue
            if "peer-reset" not in {f.code for f in stream.findings}:
                side = "destination" if flow.src != segment.src else "source"
                stream.add_finding(findings.make(
                    "peer-reset", f"TCP RST from the {side} ({segment.src}:{segment.sport}) "
                    f"after {stream.decoder.offset} stream bytes", stream.decoder.offset))
            self._end(stream)

    def _return_path(self, stream: MigrationStream, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Finding):
                stream.add_finding(event)
            elif self.sink is not None:
                self.sink(stream, event)

    def return_path_for(self, stream: MigrationStream) -> ReturnPathDecoder | None:
        if stream.flow is None:
            return None
        return self.return_paths.get(stream.flow.reverse())


class LiveCapture:
    """The sniffing loop and its reporting; `run()` returns the exit code."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = sys.stdout
        self.worst: Severity | None = None
        self.finished = 0
        self.numbers = 0
        self.drops_total = 0
        self.packets_total = 0
        self.writer: PcapngWriter | None = None
        self.demux = LiveDemux(AnalysisOptions(port=args.port, keep_buffers=False),
                               self._sink)
        self.demux.on_stream_end = self._stream_ended
        self.stop = False
        # Ctrl-C and SIGTERM only set this, checked between batches: an exception
        # raised in the middle of reassembly would leave its state half-updated.
        self.interrupted = threading.Event()

    def install_signal_handlers(self) -> None:
        def request_stop(signum: int, frame: Any) -> None:
            self.interrupted.set()

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)

    # --- output -------------------------------------------------------------

    def _sink(self, stream: MigrationStream | None, event: Event) -> None:
        if self.args.json:
            return
        self.numbers += 1
        from migshark.analyzer.cli import format_event_line

        prefix = f"[{stream.name}] " if stream is not None and self._several() else ""
        self.out.write(prefix + format_event_line(self.numbers, event) + "\n")
        self.out.flush()

    def _several(self) -> bool:
        return len(self.demux.streams) > 1

    def _stream_ended(self, stream: MigrationStream) -> None:
        self._poll_drops()
        return_path = self.demux.return_path_for(stream)
        if return_path is not None:
            self.demux._return_path(stream, return_path.finish())
        self.finished += 1
        worst = max((f.severity for f in stream.findings), default=None)
        if worst is not None:
            self.worst = max(self.worst or worst, worst)
        summary = AnalysisResult(f"live:{self.args.iface}", "live", [stream]).as_json()
        summary["return_path"] = {
            "messages": dict(sorted(return_path.messages.items())) if return_path else {},
            "shut_code": return_path.shut_code if return_path else None,
        }
        summary["kernel"] = {"packets": self.packets_total, "drops": self.drops_total}
        summary["multifd_channels"] = sorted(str(flow) for flow in self.demux.multifd)
        if self.args.json:
            self.out.write(json.dumps(summary) + "\n")
        else:
            from migshark.analyzer.cli import _format_migration

            self.out.write("\n".join(_format_migration(stream.result())) + "\n")
            messages = summary["return_path"]["messages"]
            shown = ", ".join(f"{k} x{v}" for k, v in messages.items()) or "none"
            self.out.write(f"  return path  : {shown}\n")
        self.out.flush()
        if self.args.once:
            self.stop = True

    # --- kernel statistics --------------------------------------------------

    def _poll_drops(self) -> None:
        sock = getattr(self, "sock", None)
        if sock is None:
            return
        try:
            raw = sock.ins.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        except OSError:
            return
        packets, drops = struct.unpack("II", raw)
        self.packets_total += packets
        if not drops:
            return
        self.drops_total += drops
        message = (f"the kernel dropped {drops} packets ({self.drops_total} in total) before "
                   "migshark read them; expect capture gaps")
        open_streams = [s for s in self.demux.streams if not s.closed]
        for stream in open_streams:
            stream.add_finding(findings.make("kernel-drops", message, stream.decoder.offset))
        if not open_streams:
            self._sink(None, findings.make("kernel-drops", message, 0))

    # --- the loop -----------------------------------------------------------

    def _drain(self, limit: int) -> int:
        """Read and decode up to `limit` queued frames without blocking; how many were read.

        One select per batch instead of per frame; the bound lets the caller read the
        drop statistics during a long burst."""
        ins = self.sock.ins
        recv = self.sock._recv_raw  # scapy's recvmsg with timestamps and VLAN aux data
        segment = self.demux.segment
        linktype = self.linktype
        writer = self.writer
        skip_outgoing = self.loopback
        for count in range(limit):
            try:
                frame, sa_ll, timestamp = recv(ins, SNAPLEN)
            except BlockingIOError:
                return count
            if not frame or (skip_outgoing and sa_ll[2] == PACKET_OUTGOING):
                continue
            if timestamp is None:
                timestamp = time.time()
            if writer is not None:
                writer.write(timestamp, frame)
            parsed = parse_frame(linktype, frame, timestamp)
            if parsed is not None:
                segment(parsed)
                if self.stop:
                    return count + 1
        return limit

    def open(self) -> str | None:
        """Open the capture socket; an error message when that is impossible."""
        import scapy.arch  # noqa: F401 - fills conf.L2listen for this platform
        from scapy.config import conf
        from scapy.error import Scapy_Exception

        # scapy warns that it cannot name lo's link layer: we never ask it to
        logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
        bpf = self.args.bpf or (f"tcp port {self.args.port}" if self.args.port else "tcp")
        import scapy.arch.common as scapy_common

        # scapy compiles the filter with snaplen = its MTU (65535), so the kernel would cut
        # loopback GSO frames (up to 65549 bytes) and lose stream bytes: compile with ours
        mtu = scapy_common.MTU
        scapy_common.MTU = SNAPLEN
        try:
            self.sock = conf.L2listen(iface=self.args.iface, filter=bpf)
        except PermissionError:
            return "needs root (raw packet capture); run as root or use `migshark proxy`"
        except (OSError, Scapy_Exception, ValueError) as error:
            return f"cannot capture on {self.args.iface!r} with filter {bpf!r}: {error}"
        finally:
            scapy_common.MTU = mtu
        try:
            self.sock.ins.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except OSError:
            self.sock.ins.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        hatype = self.sock.ins.getsockname()[3]
        self.loopback = hatype == ARPHRD_LOOPBACK
        self.linktype = LINKTYPE_RAW if hatype in _RAW_IP_HATYPES else LINKTYPE_ETHERNET
        # counters since the socket opened are noise from before the filter applied
        self.sock.ins.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        if self.args.write:
            try:
                handle = open(self.args.write, "wb")  # noqa: SIM115 - closed in run()
            except OSError as error:
                self.sock.close()
                return f"cannot write {self.args.write}: {error.strerror or error}"
            self.writer = PcapngWriter(handle, self.linktype, self.args.iface)
        self.bpf = bpf
        return None

    def run(self) -> int:
        ins = self.sock.ins
        last_stats = time.monotonic()
        ins.setblocking(False)
        interrupted = self.interrupted
        try:
            while not self.stop and not interrupted.is_set():
                ready, _, _ = select.select([ins], [], [], STATS_INTERVAL)
                now = time.monotonic()
                if now - last_stats >= STATS_INTERVAL:
                    last_stats = now
                    self._poll_drops()
                if ready:
                    self._drain(DRAIN_BATCH)
            if interrupted.is_set():
                # what the kernel already captured before Ctrl-C belongs to the report
                while not self.stop and self._drain(DRAIN_BATCH) == DRAIN_BATCH:
                    pass
        finally:
            self._poll_drops()
            if not self.stop:
                # interrupted: report what was still in flight, marked incomplete
                self.demux.finish()
            self.sock.close()
            if self.writer is not None:
                self.writer.close()
        return EXIT_ERRORS if self.worst == Severity.ERROR else EXIT_OK


def run_live(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("migshark live: needs root (raw packet capture); run as root or use "
              "`migshark proxy`, which needs no privileges", file=sys.stderr)
        return EXIT_UNUSABLE
    capture = LiveCapture(args)
    error = capture.open()
    if error is not None:
        print(f"migshark live: {error}", file=sys.stderr)
        return EXIT_UNUSABLE
    capture.install_signal_handlers()
    print(f"migshark live: listening on {args.iface} (filter: {capture.bpf})",
          file=sys.stderr, flush=True)
    return capture.run()


__all__ = ["LiveCapture", "LiveDemux", "PcapngWriter", "Record", "run_live"]
