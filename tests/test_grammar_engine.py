"""Grammars for llama.cpp (gateway/engine/grammar.py, gateway/schema_regex.py):
the grammar reader agrees with llama.cpp's own parser, patterns are rewritten
into what the converter handles (same language), the backend refuses what
would crash llama.cpp even when no gateway checked the request, and the cache
is bounded. Fast: llama.cpp's grammar parser runs without a model; anything
that could crash it runs in a child process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import llama_cpp as lc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llama_cpp.llama_grammar import json_schema_to_gbnf

from gateway import testing
from gateway.backends import llamacpp_params as params
from gateway.engine.grammar import GrammarCache, canonical_schema, gbnf_problem, grammar_for
from gateway.errors import InvalidRequestError
from gateway.schema_guard import SCHEMA_CEILINGS
from gateway.schema_regex import PatternError, parse_pattern

ROOT = "response_format.json_schema.schema"


@pytest.fixture(scope="module", autouse=True)
def _llama() -> Iterator[None]:
    lc.llama_backend_init()
    yield


def llama_accepts(grammar: str) -> bool:
    """llama.cpp's verdict (no vocabulary: our grammars have no token syntax)."""
    sampler = lc.llama_sampler_init_grammar(None, grammar.encode(), b"root")
    if not sampler:
        return False
    lc.llama_sampler_free(sampler)
    return True


# ------------------------------------------------------- the grammar reader

AGREED = [
    'root ::= "a"',
    'root ::= ("a" | "b")* "c"\n',
    'root ::= x # a comment\nx ::= [a-z]{2,5} "\\x41\\u00e9\\U0001F600"',
    'root ::= "a" |\n  "b"',
    'root ::= (\n "a"\n "b" )+',
    'root ::= [^"\\\\\\]-]*',
    'root ::= "a"{2000}',
    'root ::= "a"{1,2001}',
    "root ::= " + '("a" ' * 1000 + ")?" * 1000,
    'root ::= ("a" ("b")?){3}',
    # refused by both:
    'root ::= "\\q"',
    "root ::= [\\d]",
    "root ::= y",
    'root ::= "a"{2001}',
    "root ::= " + '("a" ' * 1001 + ")?" * 1001,
    'root ::= ("a" ("b"){40}){60}',
    'root ::= *"a"',
    'root ::= ""*',
    'root ::= ("a"',
    'root ::= "a")',
    'root "a"',
    'other ::= "a"',
    'root ::= "a"\nroot ::= "b" ::= "c"',
    'root ::= "unterminated',
]
# Refused by the reader, taken by llama.cpp: never made from a schema, and
# not worth the risk (token syntax; plain groups nested past 1000).
STRICTER = [
    'root ::= "a" <[5]>',
    'root ::= "a" !<[5]>',
    "root ::= " + "(" * 1001 + '"a"' + ")" * 1001,
]


@pytest.mark.parametrize("grammar", AGREED, ids=lambda g: repr(g[:30]))
def test_the_reader_agrees_with_llama_cpp(grammar: str) -> None:
    assert (gbnf_problem(grammar, 1 << 20) is None) == llama_accepts(grammar)


@pytest.mark.parametrize("grammar", STRICTER, ids=lambda g: repr(g[:30]))
def test_the_reader_is_stricter_where_it_pays(grammar: str) -> None:
    assert gbnf_problem(grammar, 1 << 20) is not None and llama_accepts(grammar)


def test_the_reader_refuses_what_would_crash_llama_cpp_quickly() -> None:
    # 20000 nested groups overflow llama.cpp's stack (SIGSEGV) before its
    # repetition check; plain nesting past 1000 is refused too.
    for grammar in [
        "root ::= " + '("a" ' * 20000 + ")?" * 20000,
        "root ::= " + "(" * 1001 + '"a"' + ")" * 1001,
    ]:
        started = time.perf_counter()
        problem = gbnf_problem(grammar, 1 << 20)
        assert problem is not None and "nested deeper than 1000" in problem
        assert time.perf_counter() - started < 0.5


def test_a_nul_character_is_refused() -> None:
    assert "NUL" in (gbnf_problem('root ::= "\\x00"', 1 << 20) or "")
    assert "NUL" in (gbnf_problem('root ::= "a\x00"', 1 << 20) or "")


def test_the_grammar_size_is_bounded() -> None:
    assert "at most 10 allowed" in (gbnf_problem('root ::= "abcdefghijk"', 10) or "")


def test_deep_nesting_really_crashes_llama_cpp() -> None:
    """Why the reader exists: this grammar kills the process that parses it."""
    grammar = "root ::= " + '("a" ' * 30000 + ")?" * 30000
    script = (
        "import llama_cpp as lc, sys\n"
        "lc.llama_backend_init()\n"
        "lc.llama_sampler_init_grammar(None, sys.stdin.read().encode(), b'root')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], input=grammar.encode(), capture_output=True, timeout=120
    )
    assert done.returncode < 0  # killed by a signal (SIGSEGV)


# ------------------------------------------------------------------ patterns

PATTERNS = [
    r"^\d{4}-\d{2}-\d{2}$",
    r"^[a-z]+\.[a-z]+$",
    r"^@[a-zA-Z0-9_]+$",
    r"^\+?[0-9]{1,3}[- ]?[0-9]{3,14}$",
    r"^([a-z0-9-]+\.)+[a-z]{2,}$",
    r"^[^@\s]+@[^@\s]+\.[^@\s]+$",
    r"^(?:25[0-5]|2[0-4]\d|[01]?\d?\d)(?:\.(?:25[0-5]|2[0-4]\d|[01]?\d?\d)){3}$",
    r"^a}]\$\^\.\\\"'$",
    r"^(red|green|blue)?$",
    r"^[\w.-]{1,64}$",
    r"^\S+\s\S+$",
    r"^[A-Z]{3}-\d{4}$",
    r"^(a|)b*?c+?$",
    "^é[à-ÿ]\U0001f600$",
    r"^[\x41-\x5A\u00e9]\t\n$",
]


PYTHON_ONLY_SPACES = frozenset("\x1c\x1d\x1e\x1f")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_are_rewritten_into_the_same_language(pattern: str) -> None:
    rendered = parse_pattern(pattern).render()
    grammar = json_schema_to_gbnf(json.dumps({"type": "string", "pattern": rendered}))
    assert gbnf_problem(grammar, 1 << 20) is None and llama_accepts(grammar)
    # Python reads both spellings: they must accept exactly the same strings
    # (ASCII ones where \d, \w, \s appear: Python's are Unicode-wide, ECMA's
    # not; and not \x1c-\x1f, the separators Python's \s takes and ECMA's not).
    original, canonical = re.compile(pattern), re.compile(rendered)
    class_escapes = re.search(r"\\[dDwWsS]", pattern) is not None

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.from_regex(original, fullmatch=True), st.text(max_size=12)))
    def same(text: str) -> None:
        if class_escapes and not (text.isascii() and PYTHON_ONLY_SPACES.isdisjoint(text)):
            return
        assert bool(original.fullmatch(text)) == bool(canonical.fullmatch(text))

    same()


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("[a-z]+", "anchored"),
        (r"^a\$", "escaped"),
        ("^a|b$", "top level"),
        (r"^(?=a)a$", "lookarounds"),
        (r"^(a)\1$", "not supported"),
        (r"^\bword$", "not supported"),
        (r"^\p{L}$", "not supported"),
        ("^a**$", "cannot follow"),
        ("^a++$", "cannot follow"),
        ("^*a$", "nothing to repeat"),
        ("^(a*)*$", "can be empty"),
        ("^a{0}$", "zero times"),
        ("^a{5,2}$", "below its minimum"),
        ("^a{1,x}$", "small decimal"),
        ("^[]a]$", "cannot start with ]"),
        ("^[a-$", "unclosed"),
        ("^[z-a]$", "backwards"),
        ("^[^\\x00-\\U0010FFFF]$", "not supported"),
        ("^(a$", "unclosed group"),
        ("^a)$", "unbalanced"),
        (r"^\x00$", "NUL"),
        ("^" + "(" * 40 + "a" + ")" * 40 + "$", "deeper than 32"),
    ],
)
def test_unsupported_patterns_say_why(pattern: str, reason: str) -> None:
    with pytest.raises(PatternError, match=re.escape(reason)):
        parse_pattern(pattern)


def test_a_pattern_that_hung_the_converter_now_converts() -> None:
    """llama-cpp-python's converter loops forever on a bare } or ] (a thread
    at 100 % for good); rewritten, it finishes at once."""
    done: list[str] = []
    schema = json.dumps({"type": "string", "pattern": parse_pattern("^a}]$").render()})
    worker = threading.Thread(target=lambda: done.append(json_schema_to_gbnf(schema)), daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert done, "the converter did not finish"


def test_pattern_size_counts_expanded_repetitions() -> None:
    assert parse_pattern("^(a{10}){10}b?$").positions == 101
    with pytest.raises(InvalidRequestError, match="expands to 1000000") as caught:
        canonical_schema(
            json.dumps({"properties": {"a": {"pattern": "^((a{100}){100}){100}$"}}}).encode(), ROOT
        )
    assert caught.value.param == ROOT + ".properties.a.pattern"


# ------------------------------------------------- the backend protects itself

CRASHERS: dict[str, Any] = {
    "maxItems": {"type": "array", "items": {"type": "integer"}, "maxItems": 100_000},
    "maxLength": {"type": "string", "maxLength": 100_000},
    "minItems": {"type": "array", "items": {"type": "integer"}, "minItems": 100_000_000},
    "nul pattern": {"type": "string", "pattern": "^\\x00$"},
    "pattern repetition": {"type": "string", "pattern": "^a{100000000}$"},
    "enormous enum": {"enum": list(range(100_000))},
    "deep": {
        "type": "object",
        "properties": {"a": json.loads('{"items":' * 200 + "{}" + "}" * 200)},
    },
    "left recursion": {"type": "object", "properties": {"x": {"$ref": "#/properties/x"}}},
}


class Spy:
    """Stands in for llama.cpp: records what would have reached it."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, grammar: str) -> bool:
        self.seen.append(grammar)
        return llama_accepts(grammar)


def chat_with_schema(schema: Any) -> Any:
    return testing.chat_request(
        response_format={"type": "json_schema", "json_schema": {"name": "o", "schema": schema}}
    )


@pytest.mark.parametrize("name", sorted(CRASHERS))
def test_the_backend_refuses_crashers_without_a_gateway_in_front(name: str) -> None:
    """The llama.cpp backend checks every schema itself (an edge node's engine,
    a hook that rewrote the request): each of these once crashed, hung or
    stalled the engine; now a 400, and llama.cpp never sees the grammar."""
    spy = Spy()
    builder = params.GrammarBuilder(compiles=spy, cache=GrammarCache())
    started = time.perf_counter()
    with pytest.raises(InvalidRequestError) as caught:
        params.response_grammar(chat_with_schema(CRASHERS[name]), None, builder)
    assert time.perf_counter() - started < 2
    assert caught.value.param is not None and caught.value.param.startswith(ROOT)
    assert spy.seen == [] or name == "left recursion"


def gbnf_string(text: str) -> str:
    """``text`` as one GBNF literal (what llama.cpp reads back as ``text``)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.mark.parametrize("value", ['a"' + "(" * 30_000, 'a\\" | "zzz', "back\\slash"])
def test_quotes_and_backslashes_stay_inside_their_literal(value: str) -> None:
    """llama-cpp-python's converter escapes the quotes of a value's JSON but
    not its backslashes, so ``"a\\""`` closed the literal early and the rest
    was read as grammar (30000 ``(`` crashed llama.cpp; ``| "zzz"`` allowed
    another answer). Now a value is one literal, whatever it holds."""
    grammar = grammar_for({"const": value}, ROOT, compiles=llama_accepts, cache=GrammarCache())
    assert grammar.splitlines()[0] == "root ::= " + gbnf_string(json.dumps(value))
    # The library's own output, for the record: not that literal.
    library = str(json_schema_to_gbnf(json.dumps({"const": value})))
    assert library.splitlines()[0] != grammar.splitlines()[0]


def test_tool_schemas_are_checked_where_they_are() -> None:
    tools = [
        {"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "bad", "parameters": CRASHERS["maxItems"]}},
    ]
    request = testing.chat_request(tools=tools, tool_choice="required")
    plan = params.tool_plan(request, "m")
    assert plan is not None
    builder = params.GrammarBuilder(compiles=Spy(), cache=GrammarCache())
    with pytest.raises(InvalidRequestError) as caught:
        params.response_grammar(request, plan, builder)
    assert caught.value.param == "tools[1].function.parameters.maxItems"


def test_schemas_at_the_ceilings_compile() -> None:
    """What an operator may allow at most, llama.cpp takes."""
    ceiling = SCHEMA_CEILINGS.max_repetition
    schemas = [
        {"type": "array", "items": {"type": "integer"}, "maxItems": ceiling},
        {"type": "array", "items": {"type": "integer"}, "minItems": ceiling, "maxItems": ceiling},
        {"type": "string", "maxLength": ceiling},
        {"type": "string", "pattern": f"^a{{0,{ceiling - 1}}}$"},
        {"enum": [f"v{i}" for i in range(SCHEMA_CEILINGS.max_enum_values)]},
        {
            "type": "object",
            "properties": {f"p{i}": {} for i in range(SCHEMA_CEILINGS.max_optional_properties)},
        },
    ]
    builder = params.GrammarBuilder(compiles=llama_accepts, cache=GrammarCache())
    for schema in schemas:
        grammar = params.response_grammar(chat_with_schema(schema), None, builder)
        assert grammar is not None and grammar.param == ROOT


def test_openai_examples_with_refs_convert() -> None:
    """The converter cannot resolve `#` or a $ref at the root: both are
    rewritten for it."""
    from tests.test_schema_guard import REAL_WORLD

    builder = params.GrammarBuilder(compiles=llama_accepts, cache=GrammarCache())
    for schema in REAL_WORLD.values():
        assert params.response_grammar(chat_with_schema(schema), None, builder) is not None
    rooted = {
        "$ref": "#/$defs/node",
        "$defs": {"node": {"type": "object", "properties": {"n": {"$ref": "#/$defs/node"}}}},
    }
    assert params.response_grammar(chat_with_schema(rooted), None, builder) is not None


# --------------------------------------------------------------------- cache


def test_the_cache_is_bounded_by_count_and_bytes() -> None:
    cache = GrammarCache(max_entries=3, max_bytes=100)
    for index in range(5):
        cache.put(f"s{index}", "g" * 10)
    assert len(cache) == 3 and cache.get("s0") is None and cache.get("s4") == "g" * 10
    cache.get("s2")  # used: survives the next eviction
    cache.put("s5", "g" * 60)
    assert cache.get("s2") is not None and cache.get("s3") is None
    assert cache.bytes <= 100
    cache.put("huge", "g" * 200)
    assert cache.get("huge") is None and cache.bytes <= 100


def test_the_cache_keeps_its_accounts_under_threads() -> None:
    """Requests are prepared in worker threads, several at once."""
    cache = GrammarCache(max_entries=8, max_bytes=400)

    def churn(offset: int) -> None:
        for index in range(300):
            key = f"s{(index * 7 + offset) % 20}"
            if cache.get(key) is None:
                cache.put(key, "g" * (10 + index % 30))

    workers = [threading.Thread(target=churn, args=(n,)) for n in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    held = [(key, cache.get(key)) for key in (f"s{n}" for n in range(20))]
    assert cache.bytes == sum(len(key) + len(value) for key, value in held if value)
    assert len(cache) <= 8 and cache.bytes <= 400


def test_a_compiled_grammar_is_reused_and_a_refused_one_is_not_kept() -> None:
    spy = Spy()
    cache = GrammarCache()
    schema: dict[str, Any] = {"type": "object", "properties": {"a": {"type": "string"}}}
    first = grammar_for(schema, ROOT, compiles=spy, cache=cache)
    assert grammar_for(schema, ROOT, compiles=spy, cache=cache) == first
    assert len(spy.seen) == 1 and len(cache) == 1
    left = {"type": "object", "properties": {"x": {"$ref": "#/properties/x"}}}
    for _ in range(2):
        with pytest.raises(InvalidRequestError, match="refused the grammar"):
            grammar_for(left, ROOT, compiles=spy, cache=cache)
    assert len(cache) == 1


@pytest.mark.parametrize("key", ["²", "١٢", "99999999999999999999", "-1", " 1", "1.0"])
def test_logit_bias_keys_are_ascii_token_ids(key: str) -> None:
    """str.isdigit() is true for "²", which int() then refuses (a 500)."""
    with pytest.raises(InvalidRequestError) as caught:
        params.logit_bias({key: 1.0}, 100)
    assert caught.value.param == "logit_bias"
    assert params.logit_bias({"12": -1.0}, 100) == ((12, -1.0),)


# ------------------------------------------------------------- random schemas

_PATTERN_PIECES = [
    "a",
    "b",
    "[a-c]",
    ".",
    "\\d",
    "(a|b)",
    "x?",
    "y*",
    "z+",
    "a{2}",
    "b{1,3}",
    "}",
    "]",
    "\\.",
]
_LEAF = st.one_of(
    st.just({}),
    st.sampled_from([{"type": t} for t in ("string", "integer", "number", "boolean", "null")]),
    st.builds(
        lambda low, high: {"type": "string", "minLength": low, "maxLength": high},
        st.integers(0, 1200),
        st.integers(0, 1200),
    ),
    st.builds(
        lambda parts: {"type": "string", "pattern": "^" + "".join(parts) + "$"},
        st.lists(st.sampled_from(_PATTERN_PIECES), max_size=6),
    ),
    st.builds(
        lambda values: {"enum": values},
        st.lists(st.one_of(st.integers(), st.text(max_size=6)), max_size=4),
    ),
    st.builds(lambda value: {"const": value}, st.text(max_size=6)),
)


def _composite(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    names = st.text(alphabet='ab_-x "\\\n', min_size=1, max_size=4)
    return st.one_of(
        st.builds(
            lambda props, required: {
                "type": "object",
                "properties": props,
                "required": [name for name in props if required],
            },
            st.dictionaries(names, children, max_size=4),
            st.booleans(),
        ),
        st.builds(
            lambda item, low, high: {
                "type": "array",
                "items": item,
                "minItems": low,
                "maxItems": high,
            },
            children,
            st.integers(0, 1100),
            st.integers(0, 1100),
        ),
        st.builds(lambda options: {"anyOf": options}, st.lists(children, max_size=3)),
    )


SCHEMAS = st.recursive(_LEAF, _composite, max_leaves=12)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(SCHEMAS)
def test_any_schema_is_a_grammar_llama_cpp_takes_or_a_400(schema: Any) -> None:
    """Whatever the schema, the backend answers a grammar that llama.cpp
    compiles or an InvalidRequestError: never another exception (a 500), and
    nothing that reaches llama.cpp crashes it."""
    builder = params.GrammarBuilder(compiles=llama_accepts, cache=GrammarCache())
    try:
        grammar = params.response_grammar(chat_with_schema(schema), None, builder)
    except InvalidRequestError as error:
        assert error.param is not None and error.param.startswith(ROOT)
        return
    assert grammar is not None and gbnf_problem(grammar.text, 1 << 21) is None


def test_many_patterns_cannot_add_up_to_a_huge_grammar() -> None:
    """Each pattern within its limit, together far past the grammar's: refused
    before the converter builds the text."""
    props = {f"p{i}": {"type": "string", "pattern": "^(a{10}){99}$"} for i in range(200)}
    schema = {"type": "object", "properties": props, "required": list(props)}
    with pytest.raises(InvalidRequestError, match="patterns would make a grammar") as caught:
        canonical_schema(json.dumps(schema).encode(), ROOT)
    assert caught.value.param is not None and caught.value.param.endswith(".pattern")
