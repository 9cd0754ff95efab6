"""Every text and JSON rendering of migshark's results, in one place.

`analyze` (summary and --json), `dump` (one line per event, -V detail), `live` and
`proxy` (events as they happen, one report per finished connection) and the TUI (record
lines, text export) all render here, so that one result always reads the same wherever
it is shown. Nothing here decodes or does I/O of its own beyond the stream it is given:
the callers choose where text goes.

Import cost matters: `dump` and the TUI call format_event_line once per event, and every
command imports this module at start-up, so it depends on records and the field
registry (which every decoding command loads anyway) only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Any, TextIO

from migshark.analyzer.findings import Code
from migshark.analyzer.records import Event, Finding, Record, Severity
from migshark.dissectors.registry import (
    FieldInfo,
    FieldView,
    describe,
    field_value,
    kind_info,
    lookup,
)

if TYPE_CHECKING:
    from migshark.analyzer.analysis import AnalysisResult, MigrationStream
    from migshark.analyzer.connections import Connection

# Shown as one line each in the text summary; every other section is device state.
_MAIN_SECTIONS = ("ram", "dirty-bitmap", "(framing)")


# --- one event ---------------------------------------------------------------------

# Summary fields per record kind, looked up once per kind: dump calls record_info for
# every record of a capture.
_summary_fields: dict[str, tuple[FieldInfo, ...]] = {}


def _summary_of(kind: str) -> tuple[FieldInfo, ...]:
    fields = _summary_fields.get(kind)
    if fields is None:
        info = kind_info(kind)
        fields = _summary_fields[kind] = info.summary if info else ()
    return fields


def record_info(record: Record) -> str:
    """The one-line summary of a record: its kind's summary fields (the registry's)."""
    parts = []
    for field_info in _summary_of(record.kind):
        key = field_info.key
        if key in record.fields:
            value = record.fields[key]
            if key == "bitmap_flags" and isinstance(value, int):
                value = f"{value:#04x}"
            elif key == "addr":
                value = f"{value:#x}"
            parts.append(f"{key}={value}")
    if "flag_names" in record.fields and record.fields.get("flags_width", 1) > 1:
        parts.append(f"flags_width={record.fields['flags_width']}")
    return " ".join(parts)


def format_event_line(number: int, event: Event) -> str:
    if isinstance(event, Finding):
        return (f"{'':>6} {event.offset:>#12x}  [{event.severity.label}] {event.code}: "
                f"{event.message}")
    bitmap = f"{event.node}/{event.bitmap}" if event.bitmap else "-"
    indent = "  " if event.depth else ""
    return (f"{number:>6} {event.offset:>#12x}  {event.section or '-':<14} "
            f"{indent}{event.kind:<16} {bitmap:<24} {record_info(event)}").rstrip()


def format_record_detail(record: Record) -> list[str]:
    """`dump -V`: every field of a record as the registry describes it, with its bytes.

    A generated field (derived or inherited, no bytes of its own) is in brackets, as
    Wireshark shows them."""
    lines = [f"offset: {record.offset:#x}, length: {record.length}",
             f"section: {record.section} (id {record.section_id})"]
    if record.bitmap:
        lines.append(f"bitmap: node={record.node} name={record.bitmap}")
    lines += [format_field_view(view) for view in describe(record)]
    return lines


def format_field_view(view: FieldView) -> str:
    info = view.info
    text = view.text
    if isinstance(view.value, (bytes, bytearray)):
        text += ": " + view.value[:32].hex() + ("..." if len(view.value) > 32 else "")
    label = f"{view.name or info.label} ({info.filter_name})" if view.registered else view.label
    where = f"@{view.offset:#x}+{view.length}" if view.exact else "(whole record)"
    line = f"{label}: {text}  {where}"
    if view.generated:
        line = f"[{label}: {text}]"
    return ("  " if info.bitmask else "") + line


# The version of every JSON object migshark writes (docs/json.md): bumped when a field
# changes meaning or goes away; new fields may appear without a bump.
SCHEMA_VERSION = 2

RecordSelector = Callable[[int, Record], bool]


class DumpStyle(StrEnum):
    TEXT = "text"
    JSON = "json"  # one JSON object per line (--json)
    FIELDS = "fields"  # -T fields -e NAME ...: tab-separated values


class DumpLimitReached(Exception):
    """Raised out of the sink once -c N records are out: nothing more is wanted."""


# What `-T fields -e` takes besides the registry's filter names: every record's columns.
RECORD_COLUMNS = ("no", "offset", "length", "kind", "section", "node", "bitmap", "stream")


def record_column(number: int, stream: str, record: Record, name: str) -> Any:
    if name == "no":
        return number
    if name == "stream":
        return stream
    return getattr(record, name)


def field_json_name(view: FieldView) -> str:
    """A field's key in dump --json: its filter name; an element of a list field keeps
    its index (ram.blocks[0].idstr)."""
    if not view.name:
        return view.info.filter_name
    return view.info.filter_name.split(".", 1)[0] + "." + view.name


def _json_value(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, Enum):
        return value.value
    return value


def record_json(number: int, stream: str, record: Record) -> dict[str, Any]:
    """One record of dump --json: where it is, what it is and every registered field
    (value and, for a field with bytes of its own, [offset, length])."""
    fields: dict[str, Any] = {}
    ranges: dict[str, list[int]] = {}
    for view in describe(record):
        name = field_json_name(view)
        fields.setdefault(name, _json_value(view.value))
        if view.exact:
            ranges.setdefault(name, [view.offset, view.length])
    return {"schema_version": SCHEMA_VERSION, "type": "record", "number": number,
            "stream": stream, "offset": record.offset, "length": record.length,
            "kind": str(record.kind), "section": record.section,
            "section_id": record.section_id, "node": record.node, "bitmap": record.bitmap,
            "fields": fields, "ranges": ranges}


def finding_json(stream: str | None, finding: Finding) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "type": "finding", "stream": stream,
            **finding.as_json()}


class DumpPrinter:
    """The `dump` sink: one numbered line (or JSON object, or field row) per record.

    Records are numbered 1, 2, ... in the order the decoder produced them, over every
    stream, like tshark's frame numbers and the TUI's No. column; findings are not
    numbered (the TUI attaches them to records). `select` is -Y's filter: a record it
    refuses is counted but not shown, and neither are the findings that follow it.
    `limit` is -c: at most that many records are shown, then DumpLimitReached."""

    def __init__(self, out: TextIO, verbose: bool = False, *,
                 style: DumpStyle = DumpStyle.TEXT, select: RecordSelector | None = None,
                 limit: int | None = None, columns: Sequence[str] = (),
                 separator: str = "\t") -> None:
        self.out = out
        self.verbose = verbose
        self.style = style
        self.select = select
        self.limit = limit
        self.separator = separator
        self.columns = [(name, lookup(name)) for name in columns]
        self.number = 0
        self.shown = 0
        self.worst: Severity | None = None  # of every finding received, shown or not
        self._showing = True  # whether the last record was shown (its findings are)

    def __call__(self, stream: MigrationStream | None, event: Event) -> None:
        name = stream.name if stream is not None else ""
        if isinstance(event, Finding):
            if self.worst is None or event.severity > self.worst:
                self.worst = event.severity
            if self._showing:
                self._finding(name, event)
            return
        self.number += 1
        self._showing = self.select is None or self.select(self.number, event)
        if not self._showing:
            return
        if self.limit is not None and self.shown >= self.limit:
            raise DumpLimitReached
        self.shown += 1
        if self.style is DumpStyle.JSON:
            self.out.write(json.dumps(record_json(self.number, name, event)) + "\n")
        elif self.style is DumpStyle.FIELDS:
            self.out.write(self._field_row(name, event) + "\n")
        else:
            self.out.write(format_event_line(self.number, event) + "\n")
            if self.verbose:
                for line in format_record_detail(event):
                    self.out.write("    " + line + "\n")

    def _finding(self, stream: str | None, finding: Finding) -> None:
        if self.style is DumpStyle.JSON:
            self.out.write(json.dumps(finding_json(stream, finding)) + "\n")
        elif self.style is DumpStyle.TEXT:
            self.out.write(format_event_line(0, finding) + "\n")

    def _field_row(self, stream: str, record: Record) -> str:
        cells = []
        for name, info in self.columns:
            value = (record_column(self.number, stream, record, name) if info is None
                     else field_value(record, info))
            cells.append("" if value is None else str(_json_value(value)))
        return self.separator.join(cells)

    def input_findings(self, result: AnalysisResult) -> None:
        """Findings about the input file itself (not about a stream) come last."""
        for finding in result.input_findings:
            self._finding(None, finding)


# --- analyze -------------------------------------------------------------------------

def analysis_json(result: AnalysisResult) -> dict[str, Any]:
    """The documented JSON of an analysis (docs/json.md): what is about the input at
    the top, one object per migration stream below it, never one migration's fields
    mixed with another's at the top (schema 1 took machine_type, phases and sections
    from the first migration and bitmaps and findings from all of them)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "input": result.path,
        "format": result.input_format,
        "input_findings": [f.as_json() for f in result.input_findings],
        "migrations": [migration_json(m.result()) for m in result.migrations],
    }


def migration_json(summary: dict[str, Any]) -> dict[str, Any]:
    """One migration stream's object (MigrationStream.result()), versioned so that a
    line of live/proxy --json or an element of analyze's "migrations" stands alone."""
    return {"schema_version": SCHEMA_VERSION, **summary}


def render_json(result: AnalysisResult) -> str:
    """`analyze --json`: the result as one indented JSON document."""
    return json.dumps(analysis_json(result), indent=2) + "\n"


def format_summary(result: AnalysisResult) -> str:
    out: list[str] = [f"migshark: {result.path} ({result.input_format})"]
    for finding in result.input_findings:
        out.append(f"  [{finding.severity.label}] {finding.code}: {finding.message}")
    for migration in result.migrations:
        out += format_migration(migration.result())
    out.append("")
    return "\n".join(out)


def format_migration(summary: dict[str, Any]) -> list[str]:
    """The text block of one migration stream (MigrationStream.result())."""
    out = [f"\nMigration stream {summary['stream']}"]
    out.append(f"  machine type : {summary['machine_type'] or 'unknown'}")
    out.append(f"  phases       : {', '.join(summary['phases']) or 'none seen'}")
    ended = "ends with EOF" if summary["complete"] else "no EOF"
    out.append(f"  stream       : {summary['stream_bytes']:,} bytes, {ended}, "
               f"{summary['ram_iterations']} RAM iteration(s)")
    out.append("  sections     :")
    # Device sections are many and small; list them as one line (JSON keeps each).
    devices = {k: v for k, v in summary["sections"].items() if k not in _MAIN_SECTIONS}
    for name in _MAIN_SECTIONS:
        if name in summary["sections"]:
            out.append(f"    {name:<28} {summary['sections'][name]:>14,} bytes")
    if devices:
        label = f"device state ({len(devices)} sections)"
        out.append(f"    {label:<28} {sum(devices.values()):>14,} bytes")
    out += _format_bitmaps(summary["bitmaps"])
    out += _format_findings(summary["findings"])
    return out


def _format_bitmaps(bitmaps: list[dict[str, Any]]) -> list[str]:
    out = [f"  bitmaps ({len(bitmaps)}):"]
    if bitmaps:
        out.append(f"    {'node/name':<28} {'granularity':>11} {'flags':<6} {'disk size':>14} "
                   f"{'dirty bytes':>14}  {'status':<13} sha256")
    for bitmap in bitmaps:
        flags = ("??" if bitmap["enabled"] is None  # no START in the capture: unknown
                 else ("E" if bitmap["enabled"] else "-") + ("P" if bitmap["persistent"] else "-"))
        label = f"{bitmap['node']}/{bitmap['name']}"
        if (bitmap["real_node"], bitmap["real_name"]) != (bitmap["node"], bitmap["name"]):
            label += f" (= {bitmap['real_node']}/{bitmap['real_name']})"
        out.append(
            f"    {label:<28} {bitmap['granularity'] or '?':>11} {flags:<6} "
            f"{_num(bitmap['disk_size']):>14} {_num(bitmap['dirty_bytes']):>14}  "
            f"{bitmap['status']:<13} {bitmap['sha256'] or '(' + str(bitmap['reason']) + ')'}")
    return out


def _format_findings(found: list[dict[str, Any]]) -> list[str]:
    # Phase notes are already the "phases" line.
    shown = [f for f in found if f["code"] != Code.PHASE]
    out: list[str] = []
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


# --- live and proxy ------------------------------------------------------------------

def json_line(result: dict[str, Any]) -> str:
    """One finished connection as one JSON line (live --json, proxy --json)."""
    return json.dumps(result)


def format_connection_report(connection: Connection, error: str | None = None) -> str:
    """The text report of one finished migration connection: the migration's block
    plus what only a connection has (its return path, a proxy's own failure)."""
    assert connection.stream is not None, "only a migration connection has a report"
    lines = format_migration(connection.stream.result())
    return_path = connection.return_path
    messages = ", ".join(f"{k} x{v}" for k, v in sorted(return_path.messages.items()))
    lines.append(f"  return path  : {connection.backward_bytes:,} bytes; "
                 f"messages: {messages or 'none'}")
    if error:
        lines.append(f"  proxy error  : {error}")
    return "\n".join(lines)


def format_connection_closed(connection: Connection) -> str:
    """One line for a connection that carried no migration stream of its own."""
    return (f"{connection.name}: {connection.kind} channel closed, "
            f"{connection.forward_bytes:,} bytes forwarded")
