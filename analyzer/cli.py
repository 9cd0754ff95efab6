"""The `migshark` command line.

Exit codes (CI-friendly): 0 when no finding is an error, 1 when one is, 2 when the
input cannot be read at all (with a one-line reason on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

# records is small and format_event_line (a per-event loop in dump and the TUI)
# needs Finding; everything heavier is imported by the handler that uses it, so that
# `analyze` never loads the encoder or sockets and `--help` stays cheap.
from migshark.analyzer.records import Event, Finding, Record, Severity

if TYPE_CHECKING:
    from migshark.analyzer.analysis import AnalysisOptions, AnalysisResult, MigrationStream

EXIT_OK, EXIT_ERRORS, EXIT_UNREADABLE = 0, 1, 2


def run() -> NoReturn:
    """The console script: main(), then for the batch commands an exit that skips
    tearing the interpreter down (freeing every object costs tens of milliseconds
    after a large capture; nothing of ours needs atexit there). Interactive and
    long-running commands (tui, live, proxy) exit normally."""
    parser = build_parser()
    args = parser.parse_args()
    if getattr(args, "batch", False):
        # The imports make objects in bulk and no garbage: no collections while they
        # run, and what they made is kept out of every later one (freeze).
        gc.disable()
        import migshark.analyzer.analysis  # noqa: F401 - the handler's heavy imports, done here

        gc.freeze()
        gc.enable()
    code = _dispatch(parser, args)
    if getattr(args, "batch", False):
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:
            pass
        os._exit(code)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return _dispatch(parser, parser.parse_args(argv))


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_UNREADABLE
    from migshark.analyzer.analysis import InputError

    try:
        return int(args.handler(args))
    except InputError as error:
        print(f"migshark: {error}", file=sys.stderr)
        return EXIT_UNREADABLE
    except BrokenPipeError:
        # The reader (head, less) went away; keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="migshark",
        description="Analyze QEMU live-migration streams and their dirty bitmaps.",
    )
    from migshark import __version__

    parser.add_argument("--version", action="version", version=f"migshark {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    analyze = sub.add_parser("analyze", help="summarise a capture or raw stream")
    _input_arguments(analyze)
    analyze.add_argument("--json", action="store_true", help="print one JSON object")
    analyze.add_argument("--export-scenario", metavar="FILE", default=None,
                         help="also write a scenario (TOML) that regenerates the bitmaps "
                              "seen on the wire (migshark generate)")
    analyze.set_defaults(handler=cmd_analyze, batch=True)

    dump = sub.add_parser("dump", help="one line per record, like tshark")
    _input_arguments(dump)
    dump.add_argument("-V", "--verbose", action="store_true",
                      help="print every field of each record")
    dump.add_argument("--ram-detail", action="store_true",
                      help="one record per RAM page instead of one per section payload")
    dump.set_defaults(handler=cmd_dump, batch=True)

    tui = sub.add_parser("tui", help="browse records, bitmaps and findings in a terminal UI")
    tui.add_argument("path", nargs="?", default=None,
                     help="pcap, pcapng or raw migration stream (default: the bundled demo)")
    tui.add_argument("--port", type=int, default=None,
                     help="TCP port of the destination (default: find flows starting "
                          "with QEVM)")
    tui.set_defaults(handler=cmd_tui)

    live = sub.add_parser("live", help="sniff a migration as it happens (root)")
    live.add_argument("-i", "--iface", default="lo", help="interface (default: lo)")
    live.add_argument("--port", type=int, default=None,
                      help="destination TCP port (default: flows starting with QEVM)")
    live.add_argument("--bpf", default=None, help="capture filter (default: tcp [port N])")
    live.add_argument("--json", action="store_true",
                      help="one JSON line per finished migration, shaped like analyze --json")
    live.add_argument("--once", action="store_true", help="exit after the first migration")
    live.add_argument("-w", "--write", metavar="FILE.pcapng", default=None,
                      help="also write the captured frames as pcapng")
    live.add_argument("--tui", action="store_true",
                      help="show the capture in the TUI (follow with f, pause with space)")
    live.set_defaults(handler=cmd_live)

    proxy = sub.add_parser("proxy", help="forward a migration and analyse it in transit")
    proxy.add_argument("--listen", required=True, metavar="ADDR",
                       help="tcp:HOST:PORT or unix:PATH the source migrates to")
    proxy.add_argument("--to", required=True, metavar="ADDR",
                       help="tcp:HOST:PORT or unix:PATH of the real destination")
    proxy.add_argument("--json", action="store_true",
                       help="one JSON line per finished migration, shaped like analyze --json")
    proxy.add_argument("--once", action="store_true", help="exit after the first migration")
    proxy.add_argument("--tui", action="store_true",
                       help="show the forwarded migration in the TUI")
    proxy.set_defaults(handler=cmd_proxy)

    generate = sub.add_parser(
        "generate", help="write the stream QEMU would send for a scenario, with faults")
    generate.add_argument("scenario", help="scenario TOML file (docs/scenarios.md)")
    generate.add_argument("-o", "--output", required=True, metavar="OUT",
                          help="OUT.bin (raw stream), OUT.pcap or OUT.pcapng; the "
                               "expected result goes to OUT.expected.json")
    generate.add_argument("--fault", action="append", default=[], metavar="NAME",
                          help="add a fault (repeatable; docs/faults.md), e.g. "
                               "drop-eos, truncate-at=4096, gap")
    generate.add_argument("--no-scenario-faults", action="store_true",
                          help="ignore the faults listed in the scenario file")
    generate.set_defaults(handler=cmd_generate)

    replay = sub.add_parser("replay", help="send a scenario or captured stream to a "
                                           "listening QEMU (-incoming tcp:HOST:PORT)")
    replay.add_argument("source", help="scenario .toml, raw stream, pcap or pcapng")
    replay.add_argument("--to", required=True, metavar="tcp:HOST:PORT",
                        help="the destination's -incoming address")
    replay.add_argument("--fault", action="append", default=[], metavar="NAME",
                        help="add a stream fault to a scenario (docs/faults.md)")
    replay.add_argument("--splice", metavar="CAPTURE", default=None,
                        help="send CAPTURE's stream with its dirty-bitmap section payloads "
                             "replaced by the scenario's (RAM and devices stay real)")
    replay.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for the destination (default 30)")
    replay.set_defaults(handler=cmd_replay)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from migshark.analyzer.encoder import cmd_generate as run_generate

    return run_generate(args)


def cmd_replay(args: argparse.Namespace) -> int:
    from migshark.analyzer.replay import cmd_replay as run_replay

    return run_replay(args)


def cmd_live(args: argparse.Namespace) -> int:
    if args.tui:
        from migshark.tui.live import run_live_tui  # the CLI is the one place that wires tui in

        return run_live_tui(args)
    from migshark.analyzer.live import run_live  # scapy is slow to import: only when asked for

    return run_live(args)


def cmd_proxy(args: argparse.Namespace) -> int:
    if args.tui:
        from migshark.tui.proxy import run_proxy_tui

        return run_proxy_tui(args)
    from migshark.analyzer.proxy import run_proxy

    return run_proxy(args)


def cmd_tui(args: argparse.Namespace) -> int:
    from migshark.tui.app import run  # textual loads only for the TUI; analyzer never needs tui

    return run(args.path, args.port)


def _input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="pcap, pcapng or raw migration stream")
    parser.add_argument("--port", type=int, default=None,
                        help="TCP port of the destination (default: find flows starting "
                             "with QEVM)")
    parser.add_argument("--destination", metavar="FILE", default=None,
                        help="the destination's query-block or query-named-block-nodes "
                             "output (JSON): check nodes and existing bitmaps against it")
    parser.add_argument("--bitmap-mapping", metavar="FILE", default=None,
                        help="the destination's block-bitmap-mapping parameter (JSON)")
    parser.add_argument("--dialect", choices=["qemu", "2017"], default="qemu",
                        help="the loader to judge against: QEMU as merged (default) or "
                             "the 2017 draft format")


def _options(args: argparse.Namespace, **extra: Any) -> AnalysisOptions:
    from migshark.analyzer.analysis import AnalysisOptions, InputError
    from migshark.analyzer.bitmaps import Dialect

    # Subcommands without these options (live, proxy) judge against plain QEMU.
    # Their loaders are imported only when used: every import is start-up time.
    context = getattr(args, "destination", None)
    if context:
        from migshark.analyzer.destination import DestinationError, load_destination

        try:
            extra.setdefault("destination", load_destination(context))
        except DestinationError as error:
            raise InputError(str(error)) from None
    mapping = getattr(args, "bitmap_mapping", None)
    if mapping:
        from migshark.analyzer.mapping import MappingError, load_mapping

        try:
            extra.setdefault("mapping", load_mapping(mapping))
        except MappingError as error:
            raise InputError(str(error)) from None
    extra.setdefault("dialect", Dialect(getattr(args, "dialect", "qemu")))
    return AnalysisOptions(port=args.port, **extra)


def exit_code(result: AnalysisResult) -> int:
    return EXIT_ERRORS if result.worst_severity() == Severity.ERROR else EXIT_OK


def cmd_analyze(args: argparse.Namespace) -> int:
    import json

    from migshark.analyzer.analysis import analyze_path

    exporter = None
    if args.export_scenario:
        from migshark.analyzer.encoder import ScenarioExporter

        exporter = ScenarioExporter()
    result = analyze_path(args.path, _options(args, keep_buffers=True),
                          exporter.sink if exporter else None)
    if exporter is not None and not exporter.write(result, args.export_scenario):
        print("migshark: no migration stream to export a scenario from", file=sys.stderr)
    if args.json:
        # One write: json.dump() writes each token, one syscall each when unbuffered.
        sys.stdout.write(json.dumps(result.as_json(), indent=2) + "\n")
    else:
        sys.stdout.write(format_summary(result))
    return exit_code(result)


def cmd_dump(args: argparse.Namespace) -> int:
    from migshark.analyzer.analysis import analyze_path

    out = sys.stdout
    numbers = {"n": 0}

    def sink(stream: MigrationStream, event: Event) -> None:
        numbers["n"] += 1
        out.write(format_event_line(numbers["n"], event) + "\n")
        if args.verbose and isinstance(event, Record):
            for line in format_record_detail(event):
                out.write("    " + line + "\n")

    result = analyze_path(args.path, _options(args, ram_detail=args.ram_detail,
                                              keep_buffers=True), sink)
    for finding in result.input_findings:
        out.write(format_event_line(0, finding) + "\n")
    return exit_code(result)


# --- text formatting (also used by the TUI's text export) ----------------------

_KEY_FIELDS = ("idstr", "section_id", "machine_type", "command", "packaged_length",
               "granularity", "bitmap_flags", "first_sector", "sector_count", "zeroes",
               "buffer_size", "pages", "zero_pages", "total_bytes", "method", "size",
               "devices", "addr", "block")


def record_info(record: Record) -> str:
    parts = []
    for key in _KEY_FIELDS:
        if key in record.fields:
            value = record.fields[key]
            if key in ("bitmap_flags",) and isinstance(value, int):
                value = f"{value:#04x}"
            elif key == "addr":
                value = f"{value:#x}"
            parts.append(f"{key}={value}")
    if "flag_names" in record.fields and record.fields.get("flags_width", 1) > 1:
        parts.append(f"flags_width={record.fields['flags_width']}")
    return " ".join(parts)


def format_event_line(number: int, event: Event) -> str:
    if isinstance(event, Finding):
        return (f"{'':>6} {event.offset:>12}  [{event.severity.label}] {event.code}: "
                f"{event.message}")
    bitmap = f"{event.node}/{event.bitmap}" if event.bitmap else "-"
    indent = "  " if event.depth else ""
    return (f"{number:>6} {event.offset:>12}  {event.section or '-':<14} "
            f"{indent}{event.kind:<16} {bitmap:<24} {record_info(event)}").rstrip()


def format_record_detail(record: Record) -> list[str]:
    lines = [f"offset: {record.offset} ({record.offset:#x}), length: {record.length}",
             f"section: {record.section} (id {record.section_id})"]
    if record.bitmap:
        lines.append(f"bitmap: node={record.node} name={record.bitmap}")
    for key, value in record.fields.items():
        if isinstance(value, bytes):
            shown = value[:32].hex() + ("..." if len(value) > 32 else "")
            value = f"{len(value)} bytes: {shown}"
        lines.append(f"{key}: {value}")
    return lines


def format_summary(result: AnalysisResult) -> str:
    out: list[str] = [f"migshark: {result.path} ({result.input_format})"]
    for finding in result.input_findings:
        out.append(f"  [{finding.severity.label}] {finding.code}: {finding.message}")
    for migration in result.migrations:
        out += _format_migration(migration.result())
    out.append("")
    return "\n".join(out)


def _format_migration(summary: dict[str, Any]) -> list[str]:
    out = [f"\nMigration stream {summary['stream']}"]
    out.append(f"  machine type : {summary['machine_type'] or 'unknown'}")
    out.append(f"  phases       : {', '.join(summary['phases']) or 'none seen'}")
    ended = "ends with EOF" if summary["complete"] else "no EOF"
    out.append(f"  stream       : {summary['stream_bytes']:,} bytes, {ended}, "
               f"{summary['ram_iterations']} RAM iteration(s)")
    out.append("  sections     :")
    # Device sections are many and small; list them as one line (JSON keeps each).
    main_sections = ("ram", "dirty-bitmap", "(framing)")
    devices = {k: v for k, v in summary["sections"].items() if k not in main_sections}
    for name in main_sections:
        if name in summary["sections"]:
            out.append(f"    {name:<28} {summary['sections'][name]:>14,} bytes")
    if devices:
        label = f"device state ({len(devices)} sections)"
        out.append(f"    {label:<28} {sum(devices.values()):>14,} bytes")
    out.append(f"  bitmaps ({len(summary['bitmaps'])}):")
    if summary["bitmaps"]:
        out.append(f"    {'node/name':<28} {'granularity':>11} {'flags':<6} {'disk size':>14} "
                   f"{'dirty bytes':>14}  {'status':<13} sha256")
    for bitmap in summary["bitmaps"]:
        flags = ("E" if bitmap["enabled"] else "-") + ("P" if bitmap["persistent"] else "-")
        label = f"{bitmap['node']}/{bitmap['name']}"
        if (bitmap["real_node"], bitmap["real_name"]) != (bitmap["node"], bitmap["name"]):
            label += f" (= {bitmap['real_node']}/{bitmap['real_name']})"
        out.append(
            f"    {label:<28} {bitmap['granularity'] or '?':>11} {flags:<6} "
            f"{_num(bitmap['disk_size']):>14} {_num(bitmap['dirty_bytes']):>14}  "
            f"{bitmap['status']:<13} {bitmap['sha256'] or '(' + str(bitmap['reason']) + ')'}")
    shown = [f for f in summary["findings"] if f["code"] != "phase"]
    for severity in ("error", "warning", "note"):
        group = [f for f in shown if f["severity"] == severity]
        if not group:
            continue
        out.append(f"  {severity}s ({len(group)}):")
        for finding in group:
            where = f"{finding['offset']:#010x}"
            out.append(f"    {where}  {finding['code']:<22} {finding['message']}")
    if not shown:
        out.append("  findings     : none")
    return out


def _num(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


if __name__ == "__main__":
    run()
