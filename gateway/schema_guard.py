"""JSON schemas (``response_format``, tools' ``parameters``) checked before any
engine builds a grammar from them.

A grammar is built from a schema by expanding it: ``maxItems: 1000`` becomes a
thousand nested groups, an enum a thousand alternatives, and llama.cpp then
parses that text recursively and matches it against every token of the
vocabulary at every step. Unbounded, a request of 200 bytes overflows the
engine's stack, fills its memory or occupies it for hours (docs/security.md).
So every schema is measured here first, in pure Python and in time linear in
its size, against :class:`SchemaLimits`; what exceeds a limit is refused with
a 400 whose ``param`` is the place in the schema
(``response_format.json_schema.schema.properties.tags.maxItems``).

The checks here are the ones any grammar engine needs. What only llama.cpp
needs (the pattern syntax its converter handles, the grammar text it can
parse) is checked by :mod:`gateway.engine.grammar`, inside the backend.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeAlias

import msgspec

from gateway import wire
from gateway.errors import InvalidRequestError

Json: TypeAlias = "bool | int | float | str | list[Json] | dict[str, Json] | None"
JsonObject: TypeAlias = dict[str, Json]


@dataclass(frozen=True, slots=True)
class SchemaLimits:
    """How big one schema may be (``[limits]`` ``schema_*`` in the config)."""

    # The schema's JSON text.
    max_bytes: int = 64 * 1024
    # Subschemas nested in each other, following $ref.
    max_depth: int = 32
    # Properties over the whole schema, and optional ones in one object (the
    # converter's work grows with the square of the optional ones).
    max_properties: int = 1000
    max_optional_properties: int = 100
    # enum values plus consts over the whole schema.
    max_enum_values: int = 1000
    # minItems, maxItems, minLength, maxLength, and a pattern's {m,n} and
    # its size once repetitions are expanded.
    max_repetition: int = 1000
    max_pattern_length: int = 1000
    # The grammar built from all of a request's schemas (estimated here,
    # measured by the engine).
    max_grammar_bytes: int = 256 * 1024


# The most an operator may allow: past these, llama.cpp or its schema
# converter fails (a nesting over 1000 groups is refused by llama.cpp, 1000
# optional properties exceed the converter's recursion) or costs too much.
# An engine applies these to every schema, whatever the gateway in front of
# it was configured with.
SCHEMA_CEILINGS = SchemaLimits(
    max_bytes=1024 * 1024,
    max_depth=64,
    max_properties=5000,
    max_optional_properties=500,
    max_enum_values=2000,
    max_repetition=1000,
    max_pattern_length=10_000,
    max_grammar_bytes=2 * 1024 * 1024,
)

_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_BOUNDS = (("minItems", "maxItems"), ("minLength", "maxLength"))
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")

# Bytes of grammar per unit, for the estimate (measured against
# llama-cpp-python's converter: tests/test_schema_guard.py keeps it an upper bound).
_RULE_BYTES = 48
_PER_CHAR_REPETITION = 12
PATTERN_POSITION_BYTES = 28
_PER_ITEM_SEPARATOR = 20


@dataclass(slots=True)
class _Tally:
    properties: int = 0
    enum_values: int = 0
    grammar_bytes: int = 0
    patterns: list[Site] = field(default_factory=list)
    refs: list[Site] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Site:
    """A keyword the engine looks at again (``pattern``, ``$ref``): its
    param, and the schema object holding it."""

    param: str
    owner: JsonObject

    def text(self, key: str) -> str:
        value = self.owner[key]
        assert isinstance(value, str)  # checked by the walk
        return value


@dataclass(frozen=True, slots=True)
class CheckedSchema:
    """A schema that passed: parsed, with what the engine checks further."""

    document: Json
    param: str
    patterns: tuple[Site, ...]
    grammar_estimate: int
    # Where each (resolvable, local) $ref is.
    refs: tuple[Site, ...] = ()


# A path names the client's property names, of any length: at most this
# much of it is quoted back (its start and its end, where the fault is).
_PATH_CHARS = 400


def refuse(param: str, message: str) -> InvalidRequestError:
    if len(param) > _PATH_CHARS:
        param = f"{param[:240]}...{param[-(_PATH_CHARS - 243) :]}"
    return InvalidRequestError(f"{param}: {message}", param=param)


def parse_schema(raw: bytes, param: str) -> Json:
    try:
        document: Json = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError) as error:
        raise refuse(param, f"not valid JSON ({error})") from None
    return document


def check_schema(raw: bytes, limits: SchemaLimits, param: str) -> CheckedSchema:
    """Parse and measure one schema (``null``: any object); raise a 400 naming
    the place and the limit it exceeds."""
    if len(raw) > limits.max_bytes:
        raise refuse(param, f"the schema is {len(raw)} bytes; at most {limits.max_bytes} allowed")
    document = parse_schema(raw, param)
    if document is None:
        return CheckedSchema(None, param, (), _RULE_BYTES)
    if not isinstance(document, dict):
        raise refuse(param, "a JSON schema must be an object")
    walker = _Walker(document, limits)
    walker.schema(document, param, 1, 0)
    height = walker.height(document, param, 1)
    if height > limits.max_depth:
        raise refuse(param, f"nested {height} levels deep via $ref; at most {limits.max_depth}")
    tally = walker.tally
    return CheckedSchema(
        document, param, tuple(tally.patterns), tally.grammar_bytes, tuple(tally.refs)
    )


class _Walker:
    def __init__(self, root: JsonObject, limits: SchemaLimits) -> None:
        self.root = root
        self.limits = limits
        self.tally = _Tally()
        self._heights: dict[int, int] = {}
        self._in_progress: set[int] = set()

    # ----------------------------------------------------- one pass, no $ref

    def schema(self, node: Json, param: str, depth: int, name_len: int) -> None:
        limits = self.limits
        if isinstance(node, bool):
            return
        if not isinstance(node, dict):
            raise refuse(param, "a subschema must be an object or a boolean")
        if depth > limits.max_depth:
            raise refuse(param, f"subschemas nested deeper than {limits.max_depth} levels")
        self.tally.grammar_bytes += _RULE_BYTES + 2 * name_len
        self._type(node, param)
        self._values(node, param)
        self._bounds(node, param, name_len)
        self._ref(node, param)
        if "pattern" in node:
            self._pattern(node, param)
        self._object(node, param, depth, name_len)
        self._children(node, param, depth, name_len)
        if self.tally.grammar_bytes > limits.max_grammar_bytes:
            raise refuse(
                param,
                f"the grammar for this schema would exceed {limits.max_grammar_bytes} bytes "
                "(lower maxItems, maxLength, enum sizes or pattern repetitions)",
            )

    def _type(self, node: JsonObject, param: str) -> None:
        kind = node.get("type")
        kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
        for each in kinds:
            if each not in _TYPES:
                raise refuse(f"{param}.type", f"unknown type {json.dumps(each)[:64]}")

    def _values(self, node: JsonObject, param: str) -> None:
        if "enum" in node:
            values = node["enum"]
            if not isinstance(values, list) or not values:
                raise refuse(f"{param}.enum", "enum must be a non-empty array")
            self._count_values(len(values), f"{param}.enum")
            self.tally.grammar_bytes += sum(2 * len(json.dumps(v)) + 8 for v in values)
        if "const" in node:
            self._count_values(1, f"{param}.const")
            self.tally.grammar_bytes += 2 * len(json.dumps(node["const"])) + 8

    def _count_values(self, count: int, param: str) -> None:
        self.tally.enum_values += count
        if self.tally.enum_values > self.limits.max_enum_values:
            raise refuse(
                param,
                f"more than {self.limits.max_enum_values} enum and const values in one schema",
            )

    def _bounds(self, node: JsonObject, param: str, name_len: int) -> None:
        limit = self.limits.max_repetition
        for low_key, high_key in _BOUNDS:
            low = self._bound(node, low_key, param, limit)
            high = self._bound(node, high_key, param, limit)
            if low is not None and high is not None and high < low:
                raise refuse(
                    f"{param}.{high_key}",
                    f"{high_key} {high} is below {low_key} {low}: no value fits",
                )
            copies = max(low or 0, high or 0)
            if low_key == "minItems":
                item_name = name_len + 5
                self.tally.grammar_bytes += copies * (item_name + _PER_ITEM_SEPARATOR)
            else:
                self.tally.grammar_bytes += copies * _PER_CHAR_REPETITION

    @staticmethod
    def _bound(node: JsonObject, key: str, param: str, limit: int) -> int | None:
        if key not in node:
            return None
        value = node[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise refuse(f"{param}.{key}", f"{key} must be a non-negative integer")
        if value > limit:
            raise refuse(f"{param}.{key}", f"{key} is {value}; at most {limit} allowed")
        return value

    def _ref(self, node: JsonObject, param: str) -> None:
        if "$ref" in node:
            self._resolve(node["$ref"], f"{param}.$ref")
            self.tally.refs.append(Site(f"{param}.$ref", node))

    def _resolve(self, ref: Json, param: str) -> JsonObject:
        if ref == "#":
            return self.root
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise refuse(param, "only local references (# or #/...) are supported")
        target: Json = self.root
        for part in ref[2:].split("/"):
            if not isinstance(target, dict) or part not in target:
                raise refuse(param, f"{ref[:200]} does not point into this schema")
            target = target[part]
        if not isinstance(target, dict):
            raise refuse(param, f"{ref[:200]} does not point to a schema object")
        return target

    def _pattern(self, node: JsonObject, param: str) -> None:
        pattern = node["pattern"]
        where = f"{param}.pattern"
        if not isinstance(pattern, str):
            raise refuse(where, "pattern must be a string")
        if len(pattern) > self.limits.max_pattern_length:
            raise refuse(
                where,
                f"the pattern is {len(pattern)} characters; "
                f"at most {self.limits.max_pattern_length} allowed",
            )
        # Positions once repetitions are expanded, roughly: its length plus
        # each {m,n}'s bound (an engine counts exactly, nesting included).
        positions = len(pattern)
        for match in _QUANTIFIER.finditer(pattern):
            low, high = match.groups()
            for number in (low, high):
                if number and int(number) > self.limits.max_repetition:
                    raise refuse(
                        where,
                        f"the repetition {match.group(0)} exceeds {self.limits.max_repetition}",
                    )
            positions += int(high or low)
        self.tally.patterns.append(Site(where, node))
        self.tally.grammar_bytes += PATTERN_POSITION_BYTES * max(positions, 1)

    def _object(self, node: JsonObject, param: str, depth: int, name_len: int) -> None:
        properties = node.get("properties")
        required = node.get("required")
        if required is not None and (
            not isinstance(required, list) or not all(isinstance(r, str) for r in required)
        ):
            raise refuse(f"{param}.required", "required must be an array of property names")
        if not isinstance(properties, dict):
            return
        limits = self.limits
        self.tally.properties += len(properties)
        if self.tally.properties > limits.max_properties:
            raise refuse(
                f"{param}.properties",
                f"more than {limits.max_properties} properties in one schema",
            )
        optional = len(set(properties) - set(required or ()))
        if optional > limits.max_optional_properties:
            raise refuse(
                f"{param}.properties",
                f"{optional} optional properties in one object; at most "
                f"{limits.max_optional_properties} (list the others in required)",
            )
        for name in properties:
            self.tally.grammar_bytes += 2 * (len(json.dumps(name)) + name_len) + 40
        self.tally.grammar_bytes += optional * (name_len + 24)

    def _children(self, node: JsonObject, param: str, depth: int, name_len: int) -> None:
        for child, where, child_name in _subschemas(node, param, name_len):
            self.schema(child, where, depth + 1, child_name)

    # ----------------------------------------------- nesting, following $ref

    def height(self, node: Json, param: str, depth: int) -> int:
        """How deep the converter recurses below ``node``, following each
        $ref (a recursive one once: it becomes a recursive rule)."""
        if not isinstance(node, dict):
            return 0
        if depth > self.limits.max_depth:
            raise refuse(
                param, f"subschemas nested deeper than {self.limits.max_depth} levels, via $ref"
            )
        key = id(node)
        if key in self._heights:
            return self._heights[key]
        if key in self._in_progress:
            return 0
        self._in_progress.add(key)
        below = 0
        ref = node.get("$ref")
        if isinstance(ref, str):
            target = self._resolve(ref, f"{param}.$ref")
            below = self.height(target, f"{param}.$ref", depth + 1)
        for child, where, _ in _subschemas(node, param, 0):
            below = max(below, self.height(child, where, depth + 1))
        self._in_progress.discard(key)
        self._heights[key] = below + 1
        return below + 1


def _subschemas(node: JsonObject, param: str, name_len: int) -> Iterator[tuple[Json, str, int]]:
    """Each subschema with its param and the length of the converter's rule name."""
    for key in _SCHEMA_MAPS:
        children = node.get(key)
        if isinstance(children, dict):
            for name, child in children.items():
                yield child, f"{param}.{key}.{name}", name_len + len(name) + 1
        elif key in node:
            raise refuse(f"{param}.{key}", f"{key} must be an object")
    for key in _SCHEMA_LISTS:
        children = node.get(key)
        if isinstance(children, list):
            if not children:
                raise refuse(f"{param}.{key}", f"{key} must not be empty: no value would fit")
            for index, child in enumerate(children):
                yield child, f"{param}.{key}[{index}]", name_len + 14
        elif key in node:
            raise refuse(f"{param}.{key}", f"{key} must be an array")
    items = node.get("items")
    if isinstance(items, list):
        for index, child in enumerate(items):
            yield child, f"{param}.items[{index}]", name_len + 10
    elif items is not None:
        yield items, f"{param}.items", name_len + 5
    for key in ("additionalProperties", "not"):
        if key in node:
            yield node[key], f"{param}.{key}", name_len + 17


# ------------------------------------------------------------ a request's schemas


@dataclass(frozen=True, slots=True)
class SchemaSource:
    """One schema of a request and where it is."""

    param: str
    raw: bytes


def request_schemas(request: wire.ChatCompletionRequest) -> list[SchemaSource]:
    """Every JSON schema a chat request carries, with its param."""
    found = []
    response_format = request.response_format
    if isinstance(response_format, wire.ResponseFormatJsonSchema):
        raw = bytes(response_format.json_schema.schema)
        found.append(SchemaSource("response_format.json_schema.schema", raw))
    for index, tool in enumerate(request.tools or ()):
        raw = bytes(tool.function.parameters)
        found.append(SchemaSource(f"tools[{index}].function.parameters", raw))
    return found


def check_request(request: wire.ChatCompletionRequest, limits: SchemaLimits) -> None:
    """Check every schema of ``request``, and the grammar they add up to."""
    total = 0
    for source in request_schemas(request):
        checked = check_schema(source.raw, limits, source.param)
        total += checked.grammar_estimate
        if total > limits.max_grammar_bytes:
            raise refuse(
                source.param,
                f"the request's schemas would make a grammar over {limits.max_grammar_bytes} "
                "bytes (fewer or smaller schemas)",
            )
