"""`migshark live`: decode migrations from a network interface as they happen.

Frames come from scapy's Linux listening socket (`conf.L2listen`, a PF_PACKET socket
with the BPF filter attached in the kernel), but they are not dissected by scapy: each
raw frame goes through `parse_frame` (as an offline capture does) and then the
connection tracker, `analyzer.connections.CaptureConnections` (TCP reassembly, which
flow is a migration, a multifd channel or its return path, resets), shared with the
proxy. This module only captures and prints. The scapy layer in
dissectors/scapy_layer.py is for display and building, not for this hot loop.

Loopback specifics, as libpcap handles them: every frame on `lo` is seen twice by a
packet socket (once outgoing, once incoming), so outgoing copies are skipped there;
GSO frames reach 65549 bytes, so the receive buffer is far larger than scapy's MTU.

Kernel drops are read with getsockopt(PACKET_STATISTICS), which also resets the
counters, and become a `kernel-drops` finding on every migration open at the time.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from migshark.analyzer import findings, report
from migshark.analyzer.analysis import AnalysisOptions, MigrationStream
from migshark.analyzer.capture import parse_frame
from migshark.analyzer.capture.frames import LINKTYPE_ETHERNET, LINKTYPE_RAW
from migshark.analyzer.connections import CaptureConnections, Connection, ConnectionKind
from migshark.analyzer.findings import Code
from migshark.analyzer.records import Event, Finding, Record, Severity

if TYPE_CHECKING:  # -w only: the writer is imported when asked for
    from migshark.analyzer.pcapwriter import PcapngWriter

EXIT_OK, EXIT_ERRORS, EXIT_UNUSABLE = 0, 1, 2
SNAPLEN = 262144
RCVBUF = 256 << 20

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
        self.tracker = CaptureConnections(AnalysisOptions(port=args.port, keep_buffers=False),
                                        self._sink, self._connection_finding,
                                        self._connection_ended)
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

    def _sink(self, stream: MigrationStream, event: Event) -> None:
        self._print(stream.name if len(self.tracker.streams) > 1 else None, event)

    def _connection_finding(self, connection: Connection, finding: Finding) -> None:
        self._print(None, finding)  # the message names the connection

    def _print(self, prefix: str | None, event: Event) -> None:
        if self.args.json:
            return
        if isinstance(event, Record):  # findings are not numbered (dump, the TUI)
            self.numbers += 1
        line = report.format_event_line(self.numbers, event)
        self.out.write(f"[{prefix}] {line}\n" if prefix else line + "\n")
        self.out.flush()

    def _connection_ended(self, connection: Connection) -> None:
        if connection.stream is None:
            return  # a multifd channel: its label was printed when it was recognised
        self._poll_drops()
        self.finished += 1
        worst = connection.worst_severity()
        if worst is not None:
            self.worst = max(self.worst or worst, worst)
        if self.args.json:
            summary = connection.result(f"live:{self.args.iface}", "live")
            assert summary is not None
            summary["kernel"] = {"packets": self.packets_total, "drops": self.drops_total}
            summary["multifd_channels"] = sorted(
                str(c.flow) for c in self.tracker.of_kind(ConnectionKind.MULTIFD))
            self.out.write(report.json_line(summary) + "\n")
        else:
            self.out.write(report.format_connection_report(connection) + "\n")
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
        open_streams = [s for s in self.tracker.streams if not s.closed]
        for stream in open_streams:
            stream.add_finding(findings.make(Code.KERNEL_DROPS, message, stream.decoder.offset))
        if not open_streams:
            self._print(None, findings.make(Code.KERNEL_DROPS, message, 0))

    # --- the loop -----------------------------------------------------------

    def _drain(self, limit: int) -> int:
        """Read and decode up to `limit` queued frames without blocking; how many were read.

        One select per batch instead of per frame; the bound lets the caller read the
        drop statistics during a long burst."""
        ins = self.sock.ins
        recv = self.sock._recv_raw  # scapy's recvmsg with timestamps and VLAN aux data
        segment = self.tracker.segment
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
            from migshark.analyzer.pcapwriter import PcapngWriter

            try:
                handle = open(self.args.write, "wb")  # noqa: SIM115 - closed in run()
            except OSError as error:
                self.sock.close()
                return f"cannot write {self.args.write}: {error.strerror or error}"
            self.writer = PcapngWriter(handle, self.linktype, self.args.iface, SNAPLEN)
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
                self.tracker.finish()
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


__all__ = ["LiveCapture", "run_live"]
