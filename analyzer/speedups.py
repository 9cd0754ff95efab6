"""The C hot loops (analyzer/_speedups.c) when they were built, else None.

Callers read `native` at call time, so tests can switch it off, and
MIGSHARK_PURE_PYTHON=1 runs the reference Python loops for a whole process.

The module declares its limits as constants (MAX_LANES, LANE_KEY_SIZE, HEADERS_LEN);
analyzer/fastpath.py sizes what it passes by them (docs/capture.md).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

native: ModuleType | None = None
if not os.environ.get("MIGSHARK_PURE_PYTHON"):
    try:
        native = importlib.import_module("migshark.analyzer._speedups")
    except ImportError:  # built without a compiler: the Python loops do the same work
        native = None
