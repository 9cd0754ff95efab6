"""The display filter language, parsed by hand (recursive descent).

    expr    := or
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | primary
    primary := "(" expr ")" | FIELD OP VALUE | FIELD
    OP      := == != < <= > >= contains
    VALUE   := "string" | 'string' | number (decimal or 0x hex) | bare word

A bare FIELD is true when the record has that field with a truthy value
(`bitmap`, `zeroes`). Comparisons with a missing value are false, like
Wireshark's. Examples: `bitmap == "inc0" and kind == BITS`, `severity >= warning`,
`section == ram`, `node == "drive0"`, `offset > 1000`, `not (kind == ram-pages)`.

Field names come from the field registry (dissectors.registry): its filter names
(`bitmap.granularity`, with or without Wireshark's `qemu_mig.` prefix, and bit fields
such as `bitmap.flags.zeroes`) and, as short names, the decoder's keys
(`granularity`). Value strings are values: `command == PACKAGED`.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from migshark.analyzer.records import Record, Severity
from migshark.dissectors import registry
from migshark.dissectors.registry import FieldInfo


class FilterError(ValueError):
    """A filter that does not parse; `position` points into the text."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


@dataclass(frozen=True, slots=True)
class RowView:
    """What a filter sees of one row of the record list."""

    number: int
    record: Record
    severity: Severity | None
    codes: tuple[str, ...] = ()


Predicate = Callable[[RowView], bool]

# Fields every record has (the record list's columns and the worst finding).
BUILTIN_FIELDS = ("kind", "section", "bitmap", "node", "offset", "length", "end", "severity",
                  "no", "section_id", "depth", "time", "code")
# The decoder's own keys (`granularity`, `first_sector`) stay usable as short names for
# any record that has them; the registry's filter names (`bitmap.granularity`, also
# as `qemu_mig.bitmap.granularity`) look only at the kinds that carry the field.
RECORD_FIELDS = tuple(sorted(registry.RECORD_KEYS - set(BUILTIN_FIELDS)))
KNOWN_FIELDS = frozenset(BUILTIN_FIELDS + RECORD_FIELDS) | frozenset(registry.FIELDS)

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge,
}
_KEYWORDS = {"and", "or", "not", "contains"}
MAX_NESTING = 64

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<op>==|!=|<=|>=|<|>|=)
  | (?P<paren>[()])
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<number>0[xX][0-9a-fA-F]+|\d+(?![\w.-]))
  | (?P<word>[A-Za-z_][\w.\-/]*)
  | (?P<badstring>["'])
""", re.VERBOSE)


@dataclass(slots=True)
class Token:
    kind: str
    text: str
    position: int
    value: Any = None


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise FilterError(f"unexpected character {text[pos]!r}", pos)
        kind = match.lastgroup or ""
        raw = match.group()
        if kind == "badstring":
            raise FilterError("unterminated string", pos)
        if kind == "string":
            tokens.append(Token("value", raw, pos, re.sub(r"\\(.)", r"\1", raw[1:-1])))
        elif kind == "number":
            base = 16 if raw[:2] in ("0x", "0X") else 10
            tokens.append(Token("value", raw, pos, int(raw, base)))
        elif kind == "word":
            lowered = raw.lower()
            tokens.append(Token(lowered if lowered in _KEYWORDS else "word", raw, pos, raw))
        elif kind == "op":
            tokens.append(Token("op", "==" if raw == "=" else raw, pos))
        elif kind == "paren":
            tokens.append(Token(raw, raw, pos))
        pos = match.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = tokenize(text)
        self.index = 0
        self.depth = 0

    @property
    def current(self) -> Token:
        return self.tokens[self.index]

    def take(self) -> Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def parse(self) -> Predicate:
        predicate = self.parse_or()
        if self.current.kind != "end":
            raise FilterError(f"unexpected {self.current.text!r}", self.current.position)
        return predicate

    def parse_or(self) -> Predicate:
        terms = [self.parse_and()]
        while self.current.kind == "or":
            self.take()
            terms.append(self.parse_and())
        if len(terms) == 1:
            return terms[0]
        return lambda row: any(term(row) for term in terms)

    def parse_and(self) -> Predicate:
        terms = [self.parse_not()]
        while self.current.kind == "and":
            self.take()
            terms.append(self.parse_not())
        if len(terms) == 1:
            return terms[0]
        return lambda row: all(term(row) for term in terms)

    def parse_not(self) -> Predicate:
        if self.current.kind == "not":
            token = self.take()
            self.enter(token)
            inner = self.parse_not()
            self.depth -= 1
            return lambda row: not inner(row)
        return self.parse_primary()

    def enter(self, token: Token) -> None:
        # Nesting is recursion, here and when the predicate runs: bound it.
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise FilterError(f"nested more than {MAX_NESTING} deep", token.position)

    def parse_primary(self) -> Predicate:
        token = self.current
        if token.kind == "(":
            self.take()
            self.enter(token)
            inner = self.parse_or()
            self.depth -= 1
            if self.current.kind != ")":
                raise FilterError("missing ')'", self.current.position)
            self.take()
            return inner
        if token.kind == "end":
            raise FilterError("expression expected", token.position)
        if token.kind != "word":
            raise FilterError(f"field name expected, not {token.text!r}", token.position)
        self.take()
        name = token.text.lower()
        info = None if name in BUILTIN_FIELDS else registry.lookup(name)
        if info is None and name not in KNOWN_FIELDS:
            raise FilterError(f"unknown field {token.text!r}", token.position)
        if self.current.kind not in ("op", "contains"):
            if info is not None:
                return lambda row: bool(registry.field_value(row.record, info))
            return lambda row: bool(field_value(row, name))
        op = self.take()
        value_token = self.current
        if value_token.kind not in ("value", "word"):
            raise FilterError("value expected after " + (op.text or "operator"),
                              value_token.position)
        self.take()
        if info is not None:
            return _registered_comparison(info, op, value_token)
        return _comparison(name, op, value_token)


def _registered_comparison(info: FieldInfo, op: Token, token: Token) -> Predicate:
    """A comparison on a registry field. Its value strings work as values
    (`command == PACKAGED`, `item == SECTION_START`); strings compare without case."""
    wanted: Any = token.value
    names = info.values or info.bit_names or {}
    if isinstance(wanted, str) and names:
        by_name = {name.lower(): number for number, name in names.items()}
        if wanted.lower() in by_name and op.kind != "contains":
            wanted = by_name[wanted.lower()]
    if op.kind == "contains":
        needle = str(wanted).lower()

        def contains(row: RowView) -> bool:
            actual = registry.field_value(row.record, info)
            if actual is None:
                return False
            shown = info.value_name(actual) if info.values else actual
            return needle in str(shown).lower()
        return contains
    compare = _COMPARE[op.text]

    def compares(row: RowView) -> bool:
        actual = registry.field_value(row.record, info)
        if actual is None:
            return False
        if isinstance(wanted, str):
            shown = info.value_name(actual) if info.values else actual
            return bool(compare(str(shown).lower(), wanted.lower()))
        if not isinstance(actual, int):
            return False
        return bool(compare(actual, wanted))
    return compares


def _comparison(name: str, op: Token, token: Token) -> Predicate:
    value = token.value
    if name == "severity":
        try:
            wanted: Any = Severity.parse(str(value))
        except KeyError:
            raise FilterError(f"severity is note, warning or error, not {token.text!r}",
                              token.position) from None
    elif name == "kind" and isinstance(value, str):
        wanted = value.lower()
    else:
        wanted = value
    if op.kind == "contains":
        needle = str(wanted).lower()
        return lambda row: needle in str(field_value(row, name) or "").lower()
    compare = _COMPARE[op.text]
    if name == "kind" and op.text in ("==", "!="):
        # `kind == BITS` names the record kind without its family prefix.
        def matches_kind(row: RowView) -> bool:
            kind = row.record.kind
            hit = kind == wanted or kind.endswith("-" + wanted)
            return hit if op.text == "==" else not hit
        return matches_kind
    if name == "code" and op.text in ("==", "!="):
        equal = op.text == "=="
        return lambda row: (wanted in row.codes) == equal
    if name in ("bitmap", "node") and op.text in ("==", "!=") and isinstance(wanted, str):
        def matches_name(row: RowView) -> bool:
            record = row.record
            if name == "node":
                actual = record.node
                hit = actual is not None and actual == wanted
            else:
                hit = record.bitmap is not None and wanted in (
                    record.bitmap, f"{record.node}/{record.bitmap}")
            return hit if op.text == "==" else not hit
        return matches_name

    def compares(row: RowView) -> bool:
        actual = field_value(row, name)
        if actual is None:
            return False
        if isinstance(wanted, int) and not isinstance(actual, int):
            return False
        if isinstance(wanted, str):
            actual = str(actual)
            if isinstance(row.record.fields.get(name), str) or name in ("section", "kind"):
                return bool(compare(actual.lower(), wanted.lower()))
        try:
            return bool(compare(actual, wanted))
        except TypeError:
            return False
    return compares


def field_value(row: RowView, name: str) -> Any:
    record = row.record
    if name == "kind":
        return record.kind
    if name == "section":
        return record.section
    if name == "bitmap":
        return record.bitmap
    if name == "node":
        return record.node
    if name == "offset":
        return record.offset
    if name == "length":
        return record.length
    if name == "end":
        return record.end
    if name == "severity":
        return row.severity
    if name == "no":
        return row.number
    if name == "section_id":
        return record.section_id
    if name == "depth":
        return record.depth
    if name == "time":
        return record.timestamp
    if name == "code":
        return ",".join(row.codes) or None
    return record.fields.get(name)


def parse_filter(text: str) -> Predicate | None:
    """The predicate for `text`, or None for an empty filter; FilterError when invalid."""
    if not text.strip():
        return None
    return _Parser(text).parse()
