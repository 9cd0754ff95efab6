"""The C hot loops (analyzer/_speedups.c) when they were built, else None.

Callers read `native` at call time, so tests can switch it off, and
MIGSHARK_PURE_PYTHON=1 runs the reference Python loops for a whole process.
"""

from __future__ import annotations

import os
from types import ModuleType

native: ModuleType | None = None
if not os.environ.get("MIGSHARK_PURE_PYTHON"):
    try:
        from migshark.analyzer import _speedups as native
    except ImportError:  # built without a compiler: the Python loops do the same work
        native = None
