"""Shared pytest configuration: the repository root goes on sys.path.

That makes `import migshark` load this checkout (not another installed copy) and
makes the shared helpers importable as `testkit`. Helpers live in testkit/, never
here: test modules do not import each other, conftest included.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
