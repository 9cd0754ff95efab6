"""Grammar parsers compiled on demand."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from migshark.dissectors import grammar as g


class GrammarParser:
    """A grammar declaration's parser, compiled by construct once it has been used
    often enough to pay for compiling (a few ms each, at every start otherwise)."""

    COMPILE_AFTER = 64

    def __init__(self, declaration: Any) -> None:
        self.declaration = declaration
        self.parse: Callable[[bytes], Any] = self._counting_parse
        self.uses = 0

    def _counting_parse(self, data: bytes) -> Any:
        self.uses += 1
        if self.uses >= self.COMPILE_AFTER:
            self.parse = g.compiled(self.declaration).parse
        return self.declaration.parse(data)
