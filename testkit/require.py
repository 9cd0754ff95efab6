"""Skip or fail a test whose real-world dependency (QEMU, tcpdump, root...) is missing.

Locally a missing tool skips with a reason; CI sets MIGSHARK_REQUIRE_REAL=1 so that
the same situation fails instead of silently passing.
"""

from __future__ import annotations

import os
import shutil

import pytest


def real_tools_required() -> bool:
    return os.environ.get("MIGSHARK_REQUIRE_REAL", "") not in ("", "0")


def require(condition: bool, reason: str) -> None:
    """Skip (locally) or fail (CI) when a real-world dependency is missing."""
    if condition:
        return
    if real_tools_required():
        pytest.fail(f"MIGSHARK_REQUIRE_REAL is set but: {reason}")
    pytest.skip(reason)


def require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    require(not missing, f"missing tools: {', '.join(missing)}")


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (packet capture)")
