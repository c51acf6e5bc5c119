"""Grammars for llama.cpp, built only from schemas and text it can take.

A schema reaches llama.cpp in three steps, each guarded:

1. :func:`gateway.schema_guard.check_schema` measures it (sizes, depth,
   counts, repetitions), with the engine's ceilings; then every ``pattern`` is
   parsed and rewritten canonically (:mod:`gateway.schema_regex`).
2. llama-cpp-python's converter turns it into GBNF text, which
   :func:`gbnf_problem` reads as llama.cpp's parser would, without recursion:
   nesting (llama.cpp recurses once per group and overflows its stack past
   a few thousand), the repetition threshold llama.cpp enforces only after
   recursing, escapes, undefined rules. Text llama.cpp would refuse never
   reaches it, so it never prints a whole grammar to stderr either.
3. llama.cpp compiles it once for the vocabulary (a left recursion is
   refused there); grammars that compiled are kept in a :class:`GrammarCache`
   bounded by count and bytes.

What no check can see before generating (a grammar that allows no token at
some point, or is slow to match) is handled while sampling, in
:mod:`gateway.engine.native`.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from llama_cpp.llama_grammar import SchemaConverter

from gateway.errors import InvalidRequestError
from gateway.schema_guard import (
    PATTERN_POSITION_BYTES,
    SCHEMA_CEILINGS,
    CheckedSchema,
    Json,
    JsonObject,
    SchemaLimits,
    Site,
    check_schema,
    refuse,
)
from gateway.schema_regex import PatternError, parse_pattern

# llama.cpp's MAX_REPETITION_THRESHOLD (src/llama-grammar.cpp).
REPETITION_THRESHOLD = 2000
# Groups nested in grammar text. llama.cpp's parser uses about 500 bytes of
# stack per level (a 1 MiB thread stack overflows near 3000); a nesting past
# 1000 optional groups is over its repetition threshold anyway.
MAX_NESTING = 1000

# Each token with the blanks before it (fewer matches: this runs on every
# grammar not yet cached, under the GIL).
_TOKEN = re.compile(
    r"""
    [ \t]*
    (?: (?P<space>[ \t]+$)
    | (?P<newline>\r\n|\r|\n)
    | (?P<comment>\#[^\r\n]*)
    | (?P<literal>"(?:[^"\\]|\\.)*")
    | (?P<chars>\[(?:[^\]\\]|\\.)*\])
    | (?P<define>::=)
    | (?P<name>[a-zA-Z0-9-]+)
    | (?P<count>\{[^}]*\})
    | (?P<op>[()|.*+?])
    )""",
    re.VERBOSE | re.DOTALL,
)
_ESCAPE = re.compile(r"""\\(?:x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[trn\\"\[\]-])""")
_NUL_ESCAPE = re.compile(r"\\(?:x00|u0000|U00000000)")
_COUNT = re.compile(r"\{[ \t]*(\d{1,18})[ \t]*(?:(,)[ \t]*(\d{0,18})[ \t]*)?\}")
_NEWLINE_OK_AFTER = frozenset({"define", "|", "("})


@dataclass(frozen=True, slots=True)
class _Group:
    symbols_before: int


class _GbnfReader:
    """llama.cpp's ``llama_grammar_parser`` in outline: the same tokens,
    symbol ids and repetition accounting, on an explicit stack."""

    def __init__(self) -> None:
        self.named: set[str] = set()
        self.defined: set[str] = set()
        self.generated = 0
        self.groups: list[_Group] = []
        # Symbols of the item a repetition would apply to (None: nothing yet).
        self.previous: int | None = None

    @property
    def symbols(self) -> int:
        return len(self.named) + self.generated

    def read(self, text: str) -> str | None:
        position = 0
        in_rule = False
        expect_define = False
        newline_ok = True
        for match in _TOKEN.finditer(text):
            if match.start() != position:
                return f"unexpected text at byte {position}"
            position = match.end()
            kind = match.lastgroup or ""
            value = match.group(kind)
            if kind in ("space", "comment"):
                continue
            if kind == "newline":
                if in_rule and not self.groups and not newline_ok:
                    in_rule = False
                continue
            if not in_rule:
                if kind != "name":
                    return f"expected a rule name at byte {match.start()}"
                self.named.add(value)
                self.defined.add(value)
                in_rule, expect_define = True, True
                continue
            if expect_define:
                if kind != "define":
                    return f"expected ::= at byte {match.start()}"
                expect_define, newline_ok = False, True
                self.previous = None
                continue
            problem = self.element(kind, value)
            if problem:
                return problem
            newline_ok = kind == "define" or value in _NEWLINE_OK_AFTER
        if position != len(text):
            return f"unexpected text at byte {position}"
        if self.groups:
            return "an unclosed group"
        if expect_define:
            return "a rule without ::="
        undefined = self.named - self.defined
        if undefined:
            return f"undefined rule {sorted(undefined)[0]}"
        if "root" not in self.defined:
            return "no root rule"
        return None

    def element(self, kind: str, value: str) -> str | None:
        if kind in ("literal", "chars"):
            # An empty one adds no element: nothing for a repetition to apply to.
            empty = value in ('""', "[]", "[^]")
            return self.characters(value) or self.symbol(None if empty else 1)
        if kind == "name":
            self.named.add(value)
            return self.symbol(1)
        if kind == "count":
            return self.count(value)
        if kind == "define":
            return "::= inside a rule (a missing newline)"
        if value == ".":
            return self.symbol(1)
        if value == "|":
            self.previous = None
            return None
        if value == "(":
            self.groups.append(_Group(self.symbols))
            self.generated += 1
            self.previous = None
            if len(self.groups) > MAX_NESTING:
                return f"groups nested deeper than {MAX_NESTING}"
            return None
        if value == ")":
            if not self.groups:
                return "an unbalanced )"
            group = self.groups.pop()
            return self.symbol(max(1, self.symbols - group.symbols_before))
        bounds = {"*": (0, None), "+": (1, None), "?": (0, 1)}[value]
        return self.repeat(*bounds)

    def symbol(self, rules: int | None) -> str | None:
        """An item of ``rules`` symbols was read (None: an empty one)."""
        self.previous = rules
        return None

    @staticmethod
    def characters(value: str) -> str | None:
        inner = value[1:-1]
        if "\x00" in inner or _NUL_ESCAPE.search(inner):
            return "the NUL character, which no token produces"
        if "\\" in _ESCAPE.sub("", inner):
            return f"an escape llama.cpp does not know in {value[:80]}"
        return None

    def count(self, value: str) -> str | None:
        match = _COUNT.fullmatch(value)
        if match is None:
            return f"a malformed repetition {value[:40]}"
        low = int(match.group(1))
        high: int | None = low
        if match.group(2):
            high = int(match.group(3)) if match.group(3) else None
        if low > REPETITION_THRESHOLD:
            return f"a repetition over {REPETITION_THRESHOLD}"
        if high is not None and high > REPETITION_THRESHOLD:
            high = None  # what llama.cpp does
        return self.repeat(low, high)

    def repeat(self, low: int, high: int | None) -> str | None:
        if self.previous is None:
            return "a repetition with nothing before it"
        total = high if high is not None and high > 0 else (low if low > 0 else 1)
        if self.previous * total > REPETITION_THRESHOLD:
            return (
                f"repetitions of {self.previous * total} rules "
                f"(llama.cpp allows {REPETITION_THRESHOLD})"
            )
        self.generated += 1 if high is None else high - low
        self.previous *= total
        return None


def gbnf_problem(text: str, max_bytes: int) -> str | None:
    """Why llama.cpp would refuse (or crash on) this grammar, or None."""
    if len(text) > max_bytes:
        return f"the grammar is {len(text)} bytes; at most {max_bytes} allowed"
    if "\x00" in text:
        return "the NUL character, which no token produces"
    return _GbnfReader().read(text)


# ------------------------------------------------------------------ schemas


def canonical_schema(
    raw: bytes, param: str, limits: SchemaLimits = SCHEMA_CEILINGS
) -> CheckedSchema:
    """The schema checked against ``limits``, its patterns and references
    rewritten (in place) in the spelling the converter handles; a 400 naming
    the place otherwise."""
    checked = check_schema(raw, limits, param)
    positions = 0
    for site in checked.patterns:
        try:
            pattern = parse_pattern(site.text("pattern"))
        except PatternError as error:
            raise refuse(site.param, f"unsupported pattern: {error}") from None
        if pattern.positions > limits.max_repetition:
            raise refuse(
                site.param,
                f"the pattern expands to {pattern.positions} characters once its "
                f"repetitions are counted; at most {limits.max_repetition}",
            )
        positions += pattern.positions
        if checked.grammar_estimate + PATTERN_POSITION_BYTES * positions > limits.max_grammar_bytes:
            raise refuse(
                site.param,
                f"with their repetitions counted, the patterns would make a grammar over "
                f"{limits.max_grammar_bytes} bytes",
            )
        site.owner["pattern"] = pattern.render()
    if isinstance(checked.document, dict) and checked.refs:
        _spell_refs_for_the_converter(checked.document, checked.refs)
    return checked


_DEFINITIONS = ("$defs", "definitions")


def _spell_refs_for_the_converter(root: JsonObject, refs: tuple[Site, ...]) -> None:
    """References written the way the converter resolves them.

    It names a referenced rule after the last part of the reference, unescaped
    (``#/$defs/linked_list_node`` makes a rule name llama.cpp cannot parse, and
    two definitions called ``x`` in different places become one), it knows no
    ``#``, and a $ref at the root hides every other $ref from it. So every
    definition referenced is renamed ``def-N`` in one ``$defs``, ``#`` names a
    copy of the root, and a root that is a $ref becomes what it refers to.
    References to anything but a definition or the root are refused.
    """
    targets: dict[str, JsonObject] = {}
    for site in refs:
        ref = site.text("$ref")
        parts = ref[2:].split("/")
        if ref == "#":
            if site.owner is root:
                raise refuse(site.param, "the schema refers to itself and nothing else")
            continue
        if len(parts) != 2 or parts[0] not in _DEFINITIONS:
            raise refuse(site.param, "a $ref must name a definition (#/$defs/NAME) or be #")
        definitions = root[parts[0]]
        assert isinstance(definitions, dict)  # resolved by the guard
        target = definitions[parts[1]]
        assert isinstance(target, dict)
        targets[ref] = target
    followed: set[str] = set()
    while isinstance(at_root := root.get("$ref"), str):
        if at_root == "#" or at_root in followed:
            where = next((site.param for site in refs if site.owner is root), refs[0].param)
            raise refuse(where, "the schema refers to itself and nothing else")
        followed.add(at_root)
        del root["$ref"]
        for key, value in targets[at_root].items():
            root.setdefault(key, value)
    if any(site.owner.get("$ref") == "#" for site in refs):
        targets["#"] = {key: value for key, value in root.items() if key not in _DEFINITIONS}
    names = {ref: f"def-{index}" for index, ref in enumerate(targets)}
    for site in refs:
        if isinstance(written := site.owner.get("$ref"), str):
            site.owner["$ref"] = f"#/$defs/{names[written]}"
    for key in _DEFINITIONS:
        root.pop(key, None)
    root["$defs"] = {names[ref]: target for ref, target in targets.items()}


class GrammarCache:
    """Grammars that compiled, by schema text; least recently used ones go
    once there are more than ``max_entries`` or they hold more than
    ``max_bytes`` (schema and grammar text together). Requests are prepared
    in worker threads: every access holds a lock."""

    def __init__(self, *, max_entries: int = 64, max_bytes: int = 8 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, schema: str) -> str | None:
        with self._lock:
            grammar = self._entries.get(schema)
            if grammar is not None:
                self._entries.move_to_end(schema)
            return grammar

    def put(self, schema: str, grammar: str) -> None:
        size = len(schema) + len(grammar)
        with self._lock:
            if size > self.max_bytes or schema in self._entries:
                return
            self._entries[schema] = grammar
            self.bytes += size
            while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                old_schema, old_grammar = self._entries.popitem(last=False)
                self.bytes -= len(old_schema) + len(old_grammar)


# What a GBNF literal must escape: its quote, line breaks, and the backslash
# itself. llama-cpp-python's converter leaves backslashes alone, so a value
# holding ``\"`` closed the literal early and the rest was read as grammar (an
# alternative the schema never allowed), and any backslash in a const, enum
# value or property name matched the wrong JSON.
_LITERAL_ESCAPES = {"\r": "\\r", "\n": "\\n", '"': '\\"', "\\": "\\\\"}
_LITERAL_SPECIAL = re.compile(r'[\r\n"\\]')


class _Converter(SchemaConverter):
    """llama-cpp-python's schema converter, with literals escaped whole."""

    def _format_literal(self, literal: str) -> str:
        escaped = _LITERAL_SPECIAL.sub(lambda m: _LITERAL_ESCAPES[m.group(0)], literal)
        return f'"{escaped}"'


def schema_to_gbnf(schema: str) -> str:
    """GBNF for a JSON schema's text, as llama-cpp-python's
    ``json_schema_to_gbnf`` makes it but for the escaping of literals."""
    # The library's methods are unannotated.
    converter = _Converter(  # type: ignore[no-untyped-call]
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    resolved = converter.resolve_refs(json.loads(schema), "stdin")
    converter.visit(resolved, "")  # type: ignore[no-untyped-call]
    return str(converter.format_grammar())  # type: ignore[no-untyped-call]


def grammar_for(
    schema: Json,
    param: str,
    *,
    compiles: Callable[[str], bool],
    cache: GrammarCache,
    max_bytes: int = SCHEMA_CEILINGS.max_grammar_bytes,
) -> str:
    """GBNF for a checked, canonical schema, known to compile; a 400 naming
    ``param`` if llama.cpp cannot take it."""
    text = json.dumps(schema)
    cached = cache.get(text)
    if cached is not None:
        return cached
    try:
        grammar = schema_to_gbnf(text)
    except Exception as error:  # the converter raises bare Exceptions and asserts
        detail = str(error)[:300] or type(error).__name__
        raise InvalidRequestError(
            f"{param}: the JSON schema is not supported: {detail}", param=param
        ) from None
    problem = gbnf_problem(grammar, max_bytes)
    if problem is not None:
        raise InvalidRequestError(
            f"{param}: the JSON schema makes a grammar llama.cpp cannot take: {problem}",
            param=param,
        )
    if not compiles(grammar):
        raise InvalidRequestError(
            f"{param}: llama.cpp refused the grammar made from this JSON schema "
            "(for example a left recursion through $ref)",
            param=param,
        )
    cache.put(text, grammar)
    return grammar
