"""The JSON schema guard (gateway/schema_guard.py): each limit, the param it
names, and real-world schemas that must pass. Fast: no engine, no server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway import testing
from gateway.errors import InvalidRequestError
from gateway.schema_guard import (
    SCHEMA_CEILINGS,
    SchemaLimits,
    check_request,
    check_schema,
)
from gateway.settings import LimitSettings
from gateway.validation import decode_chat

ROOT = "response_format.json_schema.schema"


def refused(schema: Any, limits: SchemaLimits | None = None) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        check_schema(json.dumps(schema).encode(), limits or SchemaLimits(), ROOT)
    return caught.value


def nested_arrays(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


# ------------------------------------------------------------------ each limit


def test_schema_size_is_bounded() -> None:
    big = {"type": "object", "description": "x" * 70_000}
    error = refused(big)
    assert error.param == ROOT and "at most 65536" in error.message


def test_depth_is_bounded_and_the_param_is_where_it_is_crossed() -> None:
    check_schema(json.dumps(nested_arrays(32)).encode(), SchemaLimits(), ROOT)
    error = refused(nested_arrays(33))
    assert error.param == ROOT + ".items" * 32
    assert "deeper than 32" in error.message


def test_depth_counts_ref_chains() -> None:
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(40)}
    defs["d40"] = {"type": "string"}
    error = refused({"$defs": defs, "type": "object", "properties": {"a": {"$ref": "#/$defs/d0"}}})
    assert "via $ref" in error.message and error.param.startswith(ROOT + ".properties.a.$ref")


def test_recursive_refs_are_allowed() -> None:
    linked = {
        "type": "object",
        "properties": {"value": {"type": "number"}, "next": {"$ref": "#/$defs/node"}},
        "$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}},
    }
    check_schema(json.dumps(linked).encode(), SchemaLimits(), ROOT)


def test_properties_are_bounded_in_total() -> None:
    wide = {
        "type": "object",
        "properties": {f"p{i}": {"type": "integer"} for i in range(60)},
        "required": [f"p{i}" for i in range(60)],
    }
    error = refused(wide, SchemaLimits(max_properties=50))
    assert error.param == ROOT + ".properties" and "more than 50 properties" in error.message


def test_optional_properties_are_bounded_per_object() -> None:
    loose = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(101)}}
    error = refused(loose)
    assert error.param == ROOT + ".properties"
    assert "101 optional properties" in error.message


def test_enum_values_are_bounded_with_consts() -> None:
    schema = {
        "anyOf": [{"enum": list(range(999))}, {"const": "a"}, {"const": "b"}],
    }
    error = refused(schema)
    assert error.param == ROOT + ".anyOf[2].const"
    assert "more than 1000 enum and const values" in error.message


@pytest.mark.parametrize("key", ["minItems", "maxItems", "minLength", "maxLength"])
def test_length_bounds_are_bounded(key: str) -> None:
    kind = "array" if "Items" in key else "string"
    error = refused({"type": "object", "properties": {"a": {"type": kind, key: 100_000}}})
    assert error.param == f"{ROOT}.properties.a.{key}"
    assert f"{key} is 100000; at most 1000" in error.message


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_length_bounds_must_be_counts(value: object) -> None:
    error = refused({"type": "string", "maxLength": value})
    assert error.param == ROOT + ".maxLength"


def test_bounds_that_allow_nothing_are_refused() -> None:
    error = refused({"type": "array", "minItems": 5, "maxItems": 2})
    assert error.param == ROOT + ".maxItems" and "no value fits" in error.message


def test_pattern_length_and_repetitions_are_bounded() -> None:
    error = refused({"type": "string", "pattern": "^" + "a" * 1001 + "$"})
    assert error.param == ROOT + ".pattern" and "at most 1000" in error.message
    error = refused({"type": "string", "pattern": "^a{5,100000}$"})
    assert error.param == ROOT + ".pattern" and "exceeds 1000" in error.message


def test_the_grammar_a_schema_expands_to_is_bounded() -> None:
    # Each of 300 properties may hold 1000 characters: small schema, huge grammar.
    schema = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string", "maxLength": 1000} for i in range(300)},
        "required": [f"p{i}" for i in range(300)],
    }
    error = refused(schema)
    assert "grammar" in error.message and error.param.startswith(ROOT + ".properties.p")


@pytest.mark.parametrize(
    ("schema", "param", "words"),
    [
        ({"enum": []}, ROOT + ".enum", "non-empty"),
        ({"anyOf": []}, ROOT + ".anyOf", "must not be empty"),
        ({"type": "strnig"}, ROOT + ".type", "unknown type"),
        ({"$ref": "https://example.com/s.json"}, ROOT + ".$ref", "only local references"),
        ({"$ref": "#/$defs/missing"}, ROOT + ".$ref", "does not point"),
        ({"properties": {"a": 3}}, ROOT + ".properties.a", "object or a boolean"),
        ({"required": "a"}, ROOT + ".required", "array of property names"),
        ([1, 2], ROOT, "must be an object"),
    ],
)
def test_malformed_schemas_name_their_place(schema: Any, param: str, words: str) -> None:
    error = refused(schema)
    assert error.param == param and words in error.message


def test_invalid_json_and_null() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_schema(b"[" * 5000 + b"]" * 5000, SchemaLimits(), ROOT)
    assert caught.value.param == ROOT
    assert check_schema(b"null", SchemaLimits(), ROOT).document is None


# ----------------------------------------------------- through the gateway's decoder


def chat_body(**fields: Any) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return json.dumps(body).encode()


def response_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


def tool(name: str, parameters: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def test_decode_chat_refuses_with_the_param_inside_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "array", "maxItems": 100_000}}}
    with pytest.raises(InvalidRequestError) as caught:
        decode_chat(chat_body(response_format=response_format(schema)), LimitSettings())
    assert caught.value.param == ROOT + ".properties.a.maxItems"
    assert caught.value.status_code == 400


def test_decode_chat_refuses_with_the_param_inside_a_tool() -> None:
    items = {"anyOf": [{}, {"pattern": "^a{0,5000}$"}]}
    bad = {"type": "object", "properties": {"x": {"type": "array", "items": items}}}
    tools = [tool("ok", {"type": "object"}), tool("bad", bad)]
    with pytest.raises(InvalidRequestError) as caught:
        decode_chat(chat_body(tools=tools, tool_choice="required"), LimitSettings())
    assert caught.value.param == "tools[1].function.parameters.properties.x.items.anyOf[1].pattern"


def test_operators_set_the_limits() -> None:
    body = chat_body(response_format=response_format({"type": "string", "maxLength": 500}))
    decode_chat(body, LimitSettings())
    with pytest.raises(InvalidRequestError, match="at most 100 allowed"):
        decode_chat(body, LimitSettings(schema_max_repetition=100))


def test_limits_cannot_be_raised_past_what_llama_cpp_takes() -> None:
    with pytest.raises(ValueError, match="schema_max_repetition"):
        LimitSettings(schema_max_repetition=SCHEMA_CEILINGS.max_repetition + 1)
    assert LimitSettings().schema_limits() == SchemaLimits()


def test_the_request_total_is_bounded() -> None:
    schema = {"type": "array", "items": {"type": "integer"}, "maxItems": 1000}
    tools = [tool(f"t{i}", schema) for i in range(20)]
    request = testing.chat_request(tools=tools, tool_choice="required")
    with pytest.raises(InvalidRequestError, match="request's schemas") as caught:
        check_request(request, SchemaLimits())
    assert caught.value.param is not None and caught.value.param.startswith("tools[")


# ------------------------------------------------------------- real-world schemas

# From OpenAI's structured-outputs and function-calling guides, and typical tools.
REAL_WORLD: dict[str, Any] = {
    "math_reasoning": {
        "type": "object",
        "properties": {
            "steps": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"explanation": {"type": "string"}, "output": {"type": "string"}},
                    "required": ["explanation", "output"],
                    "additionalProperties": False,
                },
            },
            "final_answer": {"type": "string"},
        },
        "required": ["steps", "final_answer"],
        "additionalProperties": False,
    },
    "research_paper": {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "authors": {"type": "array", "items": {"type": "string"}},
            "abstract": {"type": "string"},
            "keywords": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["title", "authors", "abstract", "keywords"],
        "additionalProperties": False,
    },
    "ui_recursive": {
        "type": "object",
        "properties": {
            "type": {"type": "string", "enum": ["div", "button", "header", "section", "field"]},
            "label": {"type": "string"},
            "children": {"type": "array", "items": {"$ref": "#"}},
            "attributes": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "value": {"type": "string"}},
                    "required": ["name", "value"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["type", "label", "children", "attributes"],
        "additionalProperties": False,
    },
    "linked_list": {
        "type": "object",
        "properties": {"linked_list": {"$ref": "#/$defs/linked_list_node"}},
        "$defs": {
            "linked_list_node": {
                "type": "object",
                "properties": {
                    "value": {"type": "number"},
                    "next": {"anyOf": [{"$ref": "#/$defs/linked_list_node"}, {"type": "null"}]},
                },
                "required": ["next", "value"],
                "additionalProperties": False,
            }
        },
        "required": ["linked_list"],
        "additionalProperties": False,
    },
    "moderation": {
        "type": "object",
        "properties": {
            "is_violating": {"type": "boolean"},
            "category": {"type": ["string", "null"], "enum": ["violence", "sexual", "self_harm"]},
            "explanation_if_violating": {"type": ["string", "null"]},
        },
        "required": ["is_violating", "category", "explanation_if_violating"],
        "additionalProperties": False,
    },
    "get_weather": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "City and country e.g. Bogotá"},
            "units": {"type": ["string", "null"], "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location", "units"],
        "additionalProperties": False,
    },
    "user_profile": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 100},
            "username": {"type": "string", "pattern": "^@[a-zA-Z0-9_]+$"},
            "email": {"type": "string", "format": "email"},
            "birthday": {"type": "string", "format": "date"},
            "phone": {"type": "string", "pattern": r"^\+?[0-9]{1,3}[- ]?[0-9]{3,14}$"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "username", "email"],
    },
    "search_tool": {
        "type": "object",
        "properties": {
            "query": {"type": "string"},
            "max_results": {"type": "integer"},
            "sort": {"type": "string", "enum": ["relevance", "date"]},
            "filters": {
                "type": "object",
                "properties": {
                    "site": {"type": "string"},
                    "after": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
                },
            },
        },
        "required": ["query"],
    },
    "countries_enum": {"type": "string", "enum": [f"country-{i:03d}" for i in range(250)]},
}


@pytest.mark.parametrize("name", sorted(REAL_WORLD))
def test_real_world_schemas_pass_with_room_to_spare(name: str) -> None:
    raw = json.dumps(REAL_WORLD[name]).encode()
    checked = check_schema(raw, SchemaLimits(), ROOT)
    # Comfortably: a quarter of every default would still do.
    tight = SchemaLimits(
        max_bytes=16 * 1024,
        max_depth=8,
        max_properties=250,
        max_optional_properties=25,
        max_enum_values=250,
        max_repetition=250,
        max_pattern_length=250,
        max_grammar_bytes=64 * 1024,
    )
    check_schema(raw, tight, ROOT)
    assert checked.grammar_estimate < 64 * 1024


def test_a_long_property_name_is_not_echoed_whole() -> None:
    # The fuzz suite's finding: the path of a fault under a 5,000-character
    # property name came back whole, in the message and in param.
    name = "A" * 5_000
    schema = {"type": "object", "properties": {name: {"$ref": "#/$defs/missing"}}}
    error = refused(schema)
    assert error.param is not None and len(error.param) <= 400
    assert error.param.startswith(f"{ROOT}.properties.AAA") and error.param.endswith("AAAA.$ref")
    assert len(error.message) < 700 and "does not point into this schema" in error.message
