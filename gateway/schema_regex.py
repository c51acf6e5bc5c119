"""JSON schema ``pattern`` regexes: parsed into a small syntax tree, measured,
and written back in the one spelling llama.cpp's grammar converter handles.

llama-cpp-python's schema converter copies a pattern into the grammar nearly
character by character. That makes it fragile: ``\\.`` or ``\\d`` become
escapes the grammar parser refuses, a bare ``}`` or ``]`` sends it into an
endless loop (a thread at 100 % for good), a trailing backslash escapes the
grammar's closing quote, and ``a{1000000000}`` builds a gigabyte string.
Here a pattern is parsed by a strict, bounded parser (a subset of ECMA-262
and Python syntax: what a grammar can express), refused with the reason if it
falls outside, and rendered canonically: metacharacters and anything not
plainly printable become one-character classes with hex escapes, so nothing
in a pattern can reach the grammar's own syntax.

Not supported (a grammar cannot express them, or the converter cannot):
lookarounds, backreferences, word boundaries, ``^``/``$`` anywhere but the
two ends, unanchored patterns, alternation at the top level, possessive
quantifiers, Unicode property classes, and the NUL character.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_CODE_POINT = 0x10FFFF
# Groups nested deeper than this are refused: the parser and the converter
# both recurse once per group.
MAX_GROUP_DEPTH = 32

Ranges = tuple[tuple[int, int], ...]


class PatternError(ValueError):
    """A pattern outside the supported subset; the message says why."""


@dataclass(frozen=True, slots=True)
class CharSet:
    """Characters matched by one position: sorted, disjoint, inclusive ranges."""

    ranges: Ranges


@dataclass(frozen=True, slots=True)
class Repeat:
    item: Node
    low: int
    high: int | None  # None: unbounded


@dataclass(frozen=True, slots=True)
class Group:
    alternatives: tuple[Sequence, ...]


Node = CharSet | Repeat | Group
Sequence = tuple[Node, ...]

_DIGITS: Ranges = ((0x30, 0x39),)
_WORD: Ranges = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
# ECMA-262's \s (JSON Schema patterns are ECMA-262 regular expressions).
_SPACE: Ranges = (
    (0x09, 0x0D),
    (0x20, 0x20),
    (0xA0, 0xA0),
    (0x1680, 0x1680),
    (0x2000, 0x200A),
    (0x2028, 0x2029),
    (0x202F, 0x202F),
    (0x205F, 0x205F),
    (0x3000, 0x3000),
    (0xFEFF, 0xFEFF),
)
_ANY_BUT_NEWLINES: Ranges = ((0x00, 0x09), (0x0B, 0x0C), (0x0E, MAX_CODE_POINT))
_CLASS_ESCAPES = {"d": _DIGITS, "w": _WORD, "s": _SPACE}
_CHAR_ESCAPES = {"t": 0x09, "n": 0x0A, "v": 0x0B, "f": 0x0C, "r": 0x0D}
_SPECIAL = set("^$|()[]{}*+?.\\")
# Printed as themselves; every other character becomes a class with a hex escape.
_PLAIN = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-@:,;'!#%&=~<>/`")


def _normalized(ranges: list[tuple[int, int]]) -> Ranges:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return tuple(merged)


def complement(ranges: Ranges) -> Ranges:
    result = []
    start = 0
    for low, high in ranges:
        if low > start:
            result.append((start, low - 1))
        start = high + 1
    if start <= MAX_CODE_POINT:
        result.append((start, MAX_CODE_POINT))
    return tuple(result)


class _Parser:
    """Recursive descent over ``text`` (the pattern without its anchors)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.at = 0

    def fail(self, reason: str) -> PatternError:
        # +2: counted from 1, and after the leading ^.
        return PatternError(f"{reason} (at character {self.at + 2} of the pattern)")

    def peek(self) -> str | None:
        return self.text[self.at] if self.at < len(self.text) else None

    def alternatives(self, depth: int) -> tuple[Sequence, ...]:
        found = [self.sequence(depth)]
        while self.peek() == "|":
            self.at += 1
            found.append(self.sequence(depth))
        return tuple(found)

    def sequence(self, depth: int) -> Sequence:
        items: list[Node] = []
        while (char := self.peek()) is not None and char not in "|)":
            if char in "*+?{":
                raise self.fail("nothing to repeat before this quantifier")
            atom = self.atom(depth)
            items.append(self.quantified(atom))
        return tuple(items)

    def atom(self, depth: int) -> Node:
        char = self.text[self.at]
        self.at += 1
        if char == "(":
            return self.group(depth + 1)
        if char == "[":
            return CharSet(self.char_class())
        if char == ".":
            return CharSet(_ANY_BUT_NEWLINES)
        if char == "\\":
            return CharSet(self.escape(in_class=False))
        if char in "^$":
            self.at -= 1
            raise self.fail(f"{char!r} is supported only at the very start or end")
        return CharSet(((ord(char), ord(char)),))  # ] and } alone are literals too

    def group(self, depth: int) -> Group:
        if depth > MAX_GROUP_DEPTH:
            raise self.fail(f"groups nested deeper than {MAX_GROUP_DEPTH}")
        if self.text.startswith("?:", self.at):
            self.at += 2
        elif self.peek() == "?":
            raise self.fail("lookarounds and named or flagged groups are not supported")
        alternatives = self.alternatives(depth)
        if self.peek() != ")":
            raise self.fail("unclosed group")
        self.at += 1
        return Group(alternatives)

    def quantified(self, atom: Node) -> Node:
        char = self.peek()
        if char is None or char not in "*+?{":
            return atom
        self.at += 1
        if char == "*":
            low, high = 0, None
        elif char == "+":
            low, high = 1, None
        elif char == "?":
            low, high = 0, 1
        else:
            low, high = self.bounds()
        following = self.peek()
        if following == "?":  # lazy: the same strings for a whole-string match
            self.at += 1
        elif following is not None and following in "*+{":
            raise self.fail("a quantifier cannot follow another (possessive or doubled)")
        if high == 0:
            raise self.fail("a repetition of zero times")
        if high is None and _can_be_empty(atom):
            # llama.cpp refuses the grammar (left recursion): say why here.
            raise self.fail("an unbounded repetition of something that can be empty")
        return Repeat(atom, low, high)

    def bounds(self) -> tuple[int, int | None]:
        end = self.text.find("}", self.at)
        if end < 0:
            raise self.fail("unclosed repetition {m,n}")
        body = self.text[self.at : end]
        low_text, comma, high_text = body.partition(",")
        if not low_text.isascii() or not low_text.isdigit() or len(low_text) > 9:
            raise self.fail("a repetition must be {m}, {m,} or {m,n} with small decimal numbers")
        if high_text and (not high_text.isascii() or not high_text.isdigit() or len(high_text) > 9):
            raise self.fail("a repetition must be {m}, {m,} or {m,n} with small decimal numbers")
        self.at = end + 1
        low = int(low_text)
        high = int(high_text) if high_text else (None if comma else low)
        if high is not None and high < low:
            raise self.fail(f"repetition {{{body}}} has its maximum below its minimum")
        return low, high

    def escape(self, *, in_class: bool) -> Ranges:
        char = self.peek()
        if char is None:
            raise self.fail("a pattern cannot end with a backslash")
        self.at += 1
        if char in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[char]
        if char.lower() in _CLASS_ESCAPES:
            return complement(_CLASS_ESCAPES[char.lower()])
        if char in _CHAR_ESCAPES:
            return ((_CHAR_ESCAPES[char], _CHAR_ESCAPES[char]),)
        if char in "xu":
            size = 2 if char == "x" else 4
            digits = self.text[self.at : self.at + size]
            if len(digits) != size or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise self.fail(f"\\{char} needs {size} hexadecimal digits")
            self.at += size
            point = int(digits, 16)
            return ((point, point),)
        if char == "b" and in_class:
            return ((0x08, 0x08),)
        if char.isalnum():
            raise self.fail(
                f"\\{char} is not supported (no word boundaries, backreferences, "
                "anchors other than ^ and $, or property classes)"
            )
        return ((ord(char), ord(char)),)

    def char_class(self) -> Ranges:
        negated = self.peek() == "^"
        if negated:
            self.at += 1
        if self.peek() == "]":
            raise self.fail("a class cannot start with ] (escape it as \\])")
        ranges: list[tuple[int, int]] = []
        while (char := self.peek()) != "]":
            if char is None:
                raise self.fail("unclosed character class")
            if char == "[":
                raise self.fail("[ inside a class must be escaped as \\[")
            low = self.class_member()
            if self.peek() == "-" and self.text[self.at + 1 : self.at + 2] not in ("]", ""):
                self.at += 1
                high = self.class_member()
                if not _single(low) or not _single(high):
                    raise self.fail("a class range must go from one character to another")
                if high[0][0] < low[0][0]:
                    raise self.fail("a class range goes backwards")
                ranges.append((low[0][0], high[0][0]))
            else:
                ranges.extend(low)
        self.at += 1
        result = _normalized(ranges)
        return complement(result) if negated else result

    def class_member(self) -> Ranges:
        char = self.text[self.at]
        self.at += 1
        if char == "\\":
            return self.escape(in_class=True)
        return ((ord(char), ord(char)),)


@dataclass(frozen=True, slots=True)
class Pattern:
    """A parsed pattern: its tree, and the positions a grammar expands it to."""

    body: tuple[Sequence, ...]
    positions: int
    largest_bound: int

    def render(self) -> str:
        """The pattern in the spelling llama.cpp's converter copies faithfully."""
        return "^" + _alternatives(self.body) + "$"


def parse_pattern(pattern: str) -> Pattern:
    """Parse a whole-string pattern (``^...$``); :class:`PatternError` if it
    is outside the supported subset."""
    if "\x00" in pattern:
        raise PatternError("the NUL character cannot be generated")
    if not pattern.startswith("^") or not pattern.endswith("$") or len(pattern) < 2:
        raise PatternError(
            "patterns must be anchored: start with ^ and end with $ (the whole value matches)"
        )
    inner = pattern[1:-1]
    if _ends_with_escape(inner):
        raise PatternError("the closing $ is escaped: patterns must end with an unescaped $")
    parser = _Parser(inner)
    body = parser.alternatives(0)
    if parser.at < len(inner):
        raise parser.fail("unbalanced )")
    if len(body) > 1:
        raise PatternError(
            "alternation at the top level: write ^(a|b)$, not ^a|b$ (which anchors each side once)"
        )
    for node in _nodes(body):
        if isinstance(node, CharSet) and not node.ranges:
            raise PatternError("a character class matches no character")
        if isinstance(node, CharSet) and node.ranges == ((0, 0),):
            raise PatternError("the NUL character cannot be generated")
    return Pattern(body, _positions_of(body), _largest_bound(body))


def _single(ranges: Ranges) -> bool:
    return len(ranges) == 1 and ranges[0][0] == ranges[0][1]


def _can_be_empty(node: Node) -> bool:
    if isinstance(node, CharSet):
        return False
    if isinstance(node, Repeat):
        return node.low == 0 or _can_be_empty(node.item)
    return any(all(_can_be_empty(item) for item in sequence) for sequence in node.alternatives)


def _ends_with_escape(text: str) -> bool:
    backslashes = len(text) - len(text.rstrip("\\"))
    return backslashes % 2 == 1


def _nodes(alternatives: tuple[Sequence, ...]) -> list[Node]:
    """Every node of the tree (iteratively: depth is bounded, but why recurse)."""
    found: list[Node] = []
    pending: list[Node] = [node for sequence in alternatives for node in sequence]
    while pending:
        node = pending.pop()
        found.append(node)
        if isinstance(node, Repeat):
            pending.append(node.item)
        elif isinstance(node, Group):
            pending.extend(n for sequence in node.alternatives for n in sequence)
    return found


def _positions(node: Node) -> int:
    """Character positions once repetitions are expanded, as the converter
    does: ``x{m,n}`` is n copies of x, ``x{m,}`` m + 1, ``x*`` one."""
    if isinstance(node, CharSet):
        return 1
    if isinstance(node, Group):
        return _positions_of(node.alternatives)
    copies = node.high if node.high is not None else node.low + 1
    return _positions(node.item) * max(copies, 1)


def _positions_of(alternatives: tuple[Sequence, ...]) -> int:
    return sum(_positions(node) for sequence in alternatives for node in sequence)


def _largest_bound(alternatives: tuple[Sequence, ...]) -> int:
    bounds = [
        max(node.low, node.high or 0) for node in _nodes(alternatives) if isinstance(node, Repeat)
    ]
    return max(bounds, default=0)


# ------------------------------------------------------------------ rendering


def _hex(point: int) -> str:
    if point <= 0xFF:
        return f"\\x{point:02X}"
    if point <= 0xFFFF:
        return f"\\u{point:04X}"
    return f"\\U{point:08X}"


def _char_set(ranges: Ranges) -> str:
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1] and chr(ranges[0][0]) in _PLAIN:
        return chr(ranges[0][0])
    if ranges == _ANY_BUT_NEWLINES:
        return "."
    inverse = complement(ranges)
    negated = len(inverse) < len(ranges)
    shown = inverse if negated else ranges
    body = "".join(_hex(low) if low == high else f"{_hex(low)}-{_hex(high)}" for low, high in shown)
    return "[" + ("^" if negated else "") + body + "]"


def _node(node: Node) -> str:
    if isinstance(node, CharSet):
        return _char_set(node.ranges)
    if isinstance(node, Group):
        return "(" + _alternatives(node.alternatives) + ")"
    item = _node(node.item)
    if node.low == 0 and node.high is None:
        return item + "*"
    if node.low == 1 and node.high is None:
        return item + "+"
    if node.low == 0 and node.high == 1:
        return item + "?"
    if node.high is None:
        return f"{item}{{{node.low},}}"
    if node.high == node.low:
        return f"{item}{{{node.low}}}"
    return f"{item}{{{node.low},{node.high}}}"


def _alternatives(alternatives: tuple[Sequence, ...]) -> str:
    return "|".join("".join(_node(node) for node in sequence) for sequence in alternatives)
