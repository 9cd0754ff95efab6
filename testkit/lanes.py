"""The per-record event stream of an analysis, and its comparison between the C lane
and pure Python (tests/test_capture_differential.py and
tests/test_capture_busy_host.py).

Every Record and Finding is compared with all its attributes but the timestamp: a
record's timestamp is that of the fed chunk that completed it, and the lanes feed in
different chunks (C gathers up to 64 KiB, or walks RAM records without feeding), so
it may name another frame of the same run; the streams' first and last timestamps,
in the compared summary, are equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from migshark.analyzer import speedups
from migshark.analyzer.analysis import InputError, MigrationStream, analyze_path
from migshark.analyzer.records import Event
from testkit.require import require

NOT_BUILT = "migshark.analyzer._speedups was not built (no C compiler or Python headers)"


def _plain(value: Any) -> Any:
    """Frame data may be views into the capture's mapping: compare their bytes."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def event_stream(path: Path) -> list[tuple[Any, ...]]:
    """Every event of analyze_path(path), as (stream, class, every attribute), plus
    the outcome: the JSON summary or the InputError's message."""
    events: list[tuple[Any, ...]] = []

    def sink(stream: MigrationStream | None, event: Event) -> None:
        events.append((stream.name if stream is not None else None, type(event).__name__,
                       *(_plain(getattr(event, name)) for name in event._fields
                         if name != "timestamp")))

    try:
        outcome: Any = analyze_path(path, sink=sink).as_json()
    except InputError as error:
        outcome = ("InputError", str(error))
    events.append(("outcome", outcome))
    return events


def reassembly_state(path: Path) -> list[Any]:
    """Every connection's reassembly statistics after a pass (both directions): the
    lanes also move flows whose data no event shows (skip lanes), and must move them
    as the reassembler would."""
    from migshark.analyzer.analysis import AnalysisOptions, CaptureDemux
    from migshark.analyzer.capture import CaptureFormatError, CaptureReader
    from migshark.analyzer.fastpath import pump_capture

    try:
        reader = CaptureReader(path)
    except CaptureFormatError as error:
        return [str(error)]
    demux = CaptureDemux(AnalysisOptions())
    outcome: Any = None
    try:
        pump_capture(reader, demux)
    except CaptureFormatError as error:
        outcome = str(error)
    state: list[Any] = [outcome, reader.truncated_at]
    for conn in demux.reassembler.connections:
        state.append((demux.reassembler.stats(conn.client), demux.reassembler.stats(conn.server)))
    demux.finish()
    state.append(demux.reassembler.last_timestamp)
    reader.close()
    return state


def both_lanes(path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    require(speedups.native is not None, NOT_BUILT)
    with_c = event_stream(path)
    c_state = reassembly_state(path)
    with monkeypatch.context() as patch:
        patch.setattr(speedups, "native", None)
        pure = event_stream(path)
        pure_state = reassembly_state(path)
    assert c_state == pure_state, "the lanes left the reassembler in different states"
    assert len(with_c) == len(pure)
    for i, (c_event, pure_event) in enumerate(zip(with_c, pure, strict=True)):
        assert c_event == pure_event, f"event {i} differs"
    return with_c
