"""The `migshark` command line.

Exit codes (CI-friendly): 0 when no finding is an error, 1 when one is, 2 when the
input cannot be read at all (with a one-line reason on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

# records is small; everything heavier is imported by the handler that uses it, so that
# `analyze` never loads the encoder or sockets and `--help` stays cheap.
from migshark.analyzer.records import Severity

if TYPE_CHECKING:
    from migshark.analyzer.analysis import AnalysisOptions, AnalysisResult
    from migshark.analyzer.report import DumpStyle

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
        import migshark.analyzer.report  # noqa: F401

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
    from migshark.analyzer.inputs import UnreadableInput

    try:
        return int(args.handler(args))
    except (InputError, UnreadableInput) as error:
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
    dump.add_argument("-Y", "--display-filter", metavar="FILTER", default=None,
                      help="show only records matching FILTER (the TUI's display filter, "
                           "e.g. 'kind == BITS and bitmap.granularity > 512'); records "
                           "keep their numbers")
    dump.add_argument("-c", "--count", metavar="N", type=_positive, default=None,
                      help="stop after showing N records")
    dump.add_argument("--json", action="store_true",
                      help="one JSON object per line for each record and finding "
                           "(docs/json.md)")
    dump.add_argument("-T", dest="output_format", choices=["text", "fields"], default="text",
                      help="fields: one line per record of the -e fields, tab-separated")
    dump.add_argument("-e", dest="fields", action="append", default=[], metavar="FIELD",
                      help="with -T fields: a registry filter name (bitmap.granularity) or "
                           "one of no, offset, length, kind, section, node, bitmap, stream "
                           "(repeatable)")
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

    plugin = sub.add_parser("wireshark-plugin",
                            help="write the Wireshark Lua dissector (docs/wireshark.md)")
    plugin_target = plugin.add_mutually_exclusive_group(required=True)
    plugin_target.add_argument("-o", "--output", metavar="FILE.lua", help="write it here")
    plugin_target.add_argument("--install", action="store_true",
                               help="put it in Wireshark's personal Lua plugin folder")
    plugin.set_defaults(handler=cmd_wireshark_plugin)
    return parser


# Faults that another fault keeps off the wire: with drop-eos the generator treats every
# bitmap as damaged from the first section payload on (a destination stops at the first
# error), so a fault that bends a later BITS chunk would silently not be written.
# tests/test_generate_cli.py checks this table against what the generator does.
FAULTS_HIDDEN_BY = {
    "drop-eos": ("wrong-granularity-start", "wrong-buffer-size", "oversized-buffer"),
}


def fault_conflict(texts: Sequence[str]) -> str | None:
    """Why a list of --fault values cannot all be applied (None when they can)."""
    names = [text.partition("=")[0].strip() for text in texts]
    for name in names:
        if names.count(name) > 1:
            return f"--fault {name} is given {names.count(name)} times; give it once"
    for hider, hidden in FAULTS_HIDDEN_BY.items():
        lost = [name for name in names if name in hidden]
        if hider in names and lost:
            return (f"--fault {hider} ends the dirty-bitmap section before the chunk that "
                    f"{', '.join(lost)} would bend reaches the destination; choose one")
    return None


def cmd_generate(args: argparse.Namespace) -> int:
    from migshark.analyzer.encoder import cmd_generate as run_generate

    conflict = fault_conflict(args.fault)
    if conflict:
        print(f"migshark generate: {conflict}", file=sys.stderr)
        return EXIT_UNREADABLE
    return run_generate(args)


def cmd_wireshark_plugin(args: argparse.Namespace) -> int:
    from migshark.analyzer.wireshark_plugin import run_wireshark_plugin

    return run_wireshark_plugin(args)


def cmd_replay(args: argparse.Namespace) -> int:
    from migshark.analyzer.replay import cmd_replay as run_replay

    conflict = fault_conflict(args.fault)
    if conflict:
        print(f"migshark replay: {conflict}", file=sys.stderr)
        return EXIT_UNREADABLE
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
    parser.add_argument("path", help="pcap, pcapng or raw migration stream, or - for "
                                     "stdin; gzip, xz or zstd compressed is read as is")
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
    from migshark.analyzer.analysis import analyze_path
    from migshark.analyzer.report import format_summary, render_json

    exporter = None
    if args.export_scenario:
        from migshark.analyzer.encoder import ScenarioExporter

        exporter = ScenarioExporter()
    result = analyze_path(args.path, _options(args, keep_buffers=True),
                          exporter.sink if exporter else None)
    if args.json:
        # One write: json.dump() writes each token, one syscall each when unbuffered.
        sys.stdout.write(render_json(result))
    else:
        sys.stdout.write(format_summary(result))
    if exporter is not None:
        # After the summary: a scenario that cannot be written loses no analysis.
        try:
            if not exporter.write(result, args.export_scenario):
                print("migshark: no migration stream to export a scenario from",
                      file=sys.stderr)
        except OSError as error:
            sys.stdout.flush()
            print(f"migshark: cannot write the scenario to {args.export_scenario}: "
                  f"{error.strerror or error}", file=sys.stderr)
            return EXIT_UNREADABLE
    return exit_code(result)


def cmd_dump(args: argparse.Namespace) -> int:
    from migshark.analyzer.analysis import InputError, analyze_path
    from migshark.analyzer.report import DumpLimitReached, DumpPrinter, DumpStyle

    style = DumpStyle.JSON if args.json else DumpStyle(args.output_format)
    columns = _dump_columns(style, args.fields)
    select: Callable[[int, Any], bool] | None = None
    if args.display_filter is not None:
        # -Y is the TUI's display filter language: one implementation, wired in here.
        from migshark.tui.filter import FilterError, RowView, parse_filter

        try:
            predicate = parse_filter(args.display_filter)
        except FilterError as error:
            raise InputError(f"bad display filter at column {error.position + 1}: {error}"
                             ) from None
        if predicate is not None:
            # A finding reaches dump after its record: its severity is not known yet.
            def select(number: int, record: Any) -> bool:
                return predicate(RowView(number, record, None))
    printer = DumpPrinter(sys.stdout, args.verbose, style=style, limit=args.count,
                          select=select, columns=columns)
    try:
        result = analyze_path(args.path, _options(args, ram_detail=args.ram_detail,
                                                  keep_buffers=True), printer)
    except DumpLimitReached:
        # Stopped early: judged on the findings that came before the stop.
        return EXIT_ERRORS if printer.worst == Severity.ERROR else EXIT_OK
    printer.input_findings(result)
    return exit_code(result)


def _dump_columns(style: DumpStyle, names: list[str]) -> list[str]:
    from migshark.analyzer.analysis import InputError
    from migshark.analyzer.report import RECORD_COLUMNS, DumpStyle
    from migshark.dissectors.registry import lookup

    if style is not DumpStyle.FIELDS:
        if names:
            raise InputError("-e FIELD needs -T fields")
        return []
    if not names:
        raise InputError("-T fields needs at least one -e FIELD")
    unknown = [name for name in names if name not in RECORD_COLUMNS and lookup(name) is None]
    if unknown:
        raise InputError(f"unknown field {unknown[0]!r} for -e (a registry filter name such "
                         f"as bitmap.granularity, or one of {', '.join(RECORD_COLUMNS)})")
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


if __name__ == "__main__":
    run()
