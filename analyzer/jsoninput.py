"""Reading a user-supplied JSON file (QMP output, migration parameters) for the CLI."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def load_json_input(path: str | os.PathLike[str], parse: Callable[[Any], T],
                    error: type[Exception]) -> T:
    """parse(document) for the JSON in `path`; every failure becomes `error` with a
    one-line message that names the file."""
    name = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except OSError as failure:
        raise error(f"{name}: {failure.strerror or failure}") from None
    except ValueError as failure:
        raise error(f"{name}: not JSON ({failure})") from None
    try:
        return parse(document)
    except error as failure:
        raise error(f"{name}: {failure}") from None
