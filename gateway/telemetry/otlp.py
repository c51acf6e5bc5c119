"""OTLP/protobuf encoding of finished spans, written straight to bytes.

The SDK's encoder (``opentelemetry.exporter.otlp.proto.common``) builds one
protobuf object per span, attribute and value, then serialises them: about
140 us for the two spans of a request, on the export thread, which holds
the GIL meanwhile, more than all the tracing done on the request path
(measured: docs/tracing.md, "Cost"). This module writes the same bytes
(``ExportTraceServiceRequest``, fields in number order, proto3 defaults
left out, exactly as ``SerializePartialToString`` does; a test compares the
two) with the encodings that repeat from one request to the next cached:
each attribute's key, and whole key-value pairs of short values (the
method, the route, the model, the provider, the deployment, a sampling
parameter), the resource and the instrumentation scope.

:class:`FastOTLPSpanExporter` is the SDK's OTLP http/protobuf exporter
(its transport, retries, headers, compression and variables) with this
encoder in place of the SDK's.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence

from opentelemetry.exporter.otlp.proto.http._common import _is_request_too_large
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status

from gateway.telemetry import semconv as names

_logger = logging.getLogger(__name__)
_DOUBLE = struct.Struct("<d")
_FIXED64 = struct.Struct("<Q")
_FIXED32 = struct.Struct("<I")
_INT64_MASK = (1 << 64) - 1
# Span.flags: the parent's is_remote is known, and whether it is remote.
_FLAGS_HAS_IS_REMOTE = 0x100
_FLAGS_IS_REMOTE = 0x200
# Key-value pairs whose encoding is kept; the cache is emptied when full (a
# response id or a token count is seldom seen twice, a model name always).
_CACHE_LIMIT = 8192
_CACHED_STR_LENGTH = 64
_CACHED_TYPES = frozenset({bool, int})
_CACHED_ITEMS = 8
# The largest length written in one byte.
_SHORT = 0x7F
# Attributes whose value is new with every request: never cached.
_UNIQUE_KEYS = frozenset({names.REQUEST_ID, names.RESPONSE_ID})


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (``tag`` is the whole tag byte)."""
    return bytes((tag,)) + _varint(len(payload)) + payload


def _any_value(value: object) -> bytes:
    """An ``AnyValue``'s content, dispatching as the SDK's ``_encode_value``
    (the exact types nomoat records first, without ``isinstance`` chains)."""
    kind = type(value)
    if type(value) is str:
        return _field(0x0A, value.encode("utf-8"))
    if type(value) is float:
        return b"\x21" + _DOUBLE.pack(value)
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if type(value) is int:
        return b"\x18" + _varint(value & _INT64_MASK)
    if type(value) is list or type(value) is tuple:
        return _field(0x2A, b"".join([_field(0x0A, _any_value(item)) for item in value]))
    return _other_value(value)


def _other_value(value: object) -> bytes:
    """Any other value (subclasses of the above, bytes, mappings, None)."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(0x0A, value.encode("utf-8"))
    if isinstance(value, int):
        return b"\x18" + _varint(value & _INT64_MASK)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    if isinstance(value, bytes):
        return _field(0x3A, value)
    if isinstance(value, Sequence):
        items = b"".join(_field(0x0A, _any_value(item)) for item in value)
        return _field(0x2A, items)
    if isinstance(value, Mapping):
        pairs = b"".join(
            _field(0x0A, _field(0x0A, str(k).encode("utf-8")) + _field(0x12, _any_value(v)))
            for k, v in value.items()
        )
        return _field(0x32, pairs)
    raise TypeError(f"no OTLP value for {type(value).__name__}")


class SpanEncoder:
    """Encodes batches of finished spans; keeps what repeats (one per exporter:
    it runs on the exporter's thread only)."""

    def __init__(self) -> None:
        self._keys: dict[str, bytes] = {}
        self._pairs: dict[object, bytes] = {}
        self._float_heads: dict[tuple[int, str], bytes] = {}
        self._names: dict[str, bytes] = {}
        self._blocks: dict[int, tuple[object, bytes]] = {}

    # ------------------------------------------------------------ attributes
    def _key_value(self, key: str, value: object) -> bytes:
        """One ``KeyValue`` message, its length first (without its tag)."""
        prefix = self._keys.get(key)
        if prefix is None:
            prefix = _field(0x0A, key.encode("utf-8"))
            self._keys[key] = prefix
        content = prefix + _field(0x12, _any_value(value))
        return _varint(len(content)) + content

    def _attributes(self, tag: int, attributes: Mapping[str, object] | None) -> bytes:
        """Repeated ``KeyValue`` fields (``tag``: the field's tag byte)."""
        if not attributes:
            return b""
        pairs = self._pairs
        out = []
        for key, value in attributes.items():
            kind = value.__class__
            if kind is str:
                # The common case first: one look-up (a string equals no
                # other type's value: no type in the key).
                found = pairs.get((tag, key, value))
                if found is None:
                    found = self._string_pair(tag, key, value)  # type: ignore[arg-type]
                out.append(found)
            elif kind is float:
                # Seldom the same twice (a time, a score): never cached, but
                # everything before the value is the same for a key.
                head = self._float_heads.get((tag, key))
                if head is None:
                    head = self._float_head(tag, key)
                out.append(head + _DOUBLE.pack(value))
            elif kind is int or kind is bool:
                # The type is part of the key: True and 1 are equal in a dict.
                found = pairs.get((tag, key, kind, value))
                if found is None:
                    found = self._other_pair(tag, key, value, kind)
                out.append(found)
            else:
                out.append(self._other_pair(tag, key, value, kind))
        return b"".join(out)

    def _string_pair(self, tag: int, key: str, value: str) -> bytes:
        data = value.encode("utf-8")
        size = len(data)
        prefix = self._keys.get(key)
        if prefix is None or size > _SHORT:
            encoded = bytes((tag,)) + self._key_value(key, value)
        else:
            # Every length fits in one byte: written at once (an id, a
            # name), without the general encoder's calls.
            length = len(prefix) + size + 4
            if length > _SHORT:
                encoded = bytes((tag,)) + self._key_value(key, value)
            else:
                encoded = bytes((tag, length)) + prefix + bytes((0x12, size + 2, 0x0A, size)) + data
        if len(value) <= _CACHED_STR_LENGTH and key not in _UNIQUE_KEYS:
            self._remember((tag, key, value), encoded)
        return encoded

    def _float_head(self, tag: int, key: str) -> bytes:
        """A float ``KeyValue``'s bytes up to its 8 bytes of value (its
        length is the same whatever the value)."""
        encoded = bytes((tag,)) + self._key_value(key, 0.0)
        head = encoded[: -_DOUBLE.size]
        self._float_heads[(tag, key)] = head
        return head

    def _remember(self, cache_key: object, encoded: bytes) -> None:
        pairs = self._pairs
        if len(pairs) >= _CACHE_LIMIT:
            pairs.clear()
        pairs[cache_key] = encoded

    def _other_pair(self, tag: int, key: str, value: object, kind: type) -> bytes:
        """Any value but a string or a float: booleans and integers, short
        lists of strings or integers (a route's candidates, finish reasons)
        cached, keyed by their types too (True and 1 are equal in a dict)."""
        cache_key: tuple[object, ...]
        if key in _UNIQUE_KEYS:
            return bytes((tag,)) + self._key_value(key, value)
        if kind in _CACHED_TYPES:
            cache_key = (tag, key, kind, value)
        elif isinstance(value, list | tuple) and len(value) <= _CACHED_ITEMS:
            items = tuple(value)
            types = tuple(map(type, items))
            if float in types:
                return bytes((tag,)) + self._key_value(key, value)
            cache_key = (tag, key, items, types)
        else:
            return bytes((tag,)) + self._key_value(key, value)
        try:
            found = self._pairs.get(cache_key)
        except TypeError:  # an unhashable item (a list in a list)
            return bytes((tag,)) + self._key_value(key, value)
        if found is None:
            found = bytes((tag,)) + self._key_value(key, value)
            self._remember(cache_key, found)
        return found

    # ------------------------------------------------------- resource, scope
    def _block(self, owner: object, make: bytes) -> bytes:
        self._blocks[id(owner)] = (owner, make)
        return make

    def _resource(self, resource: Resource) -> bytes:
        found = self._blocks.get(id(resource))
        if found is not None and found[0] is resource:
            return found[1]
        return self._block(resource, self._attributes(0x0A, resource.attributes))

    def _scope(self, scope: InstrumentationScope | None) -> bytes:
        found = self._blocks.get(id(scope))
        if found is not None and found[0] is scope:
            return found[1]
        if scope is None:
            return self._block(scope, b"")
        content = _field(0x0A, scope.name.encode("utf-8")) if scope.name else b""
        if scope.version:
            content += _field(0x12, scope.version.encode("utf-8"))
        content += self._attributes(0x1A, scope.attributes)
        return self._block(scope, content)

    # ------------------------------------------------------------------ spans
    def span(self, span: ReadableSpan) -> bytes:
        """One ``Span`` message's content."""
        if type(span) is not ReadableSpan:
            # The SDK's own Span (a subclass): through its public properties.
            return self._span_of(
                span.get_span_context(),
                span.parent,
                span.name,
                span.kind,
                span.start_time,
                span.end_time,
                span.attributes,
                span.dropped_attributes,
                span.events,
                span.dropped_events,
                span.links,
                span.dropped_links,
                span.status,
            )
        # What nomoat's recorder hands over: the same fields read directly,
        # without the properties' copies (a tuple of the events, a read-only
        # view of the attributes); dropped counts exist only for the SDK's
        # bounded collections.
        attributes = span._attributes
        events = span._events
        links = span._links
        return self._span_of(
            span._context,
            span._parent,
            span._name,
            span._kind,
            span._start_time,
            span._end_time,
            attributes,
            0 if attributes is None or type(attributes) is dict else span.dropped_attributes,
            events,
            0 if type(events) is list or type(events) is tuple else span.dropped_events,
            links,
            0 if type(links) is list or type(links) is tuple else span.dropped_links,
            span._status,
        )

    def _span_of(
        self,
        context: SpanContext | None,
        parent: SpanContext | None,
        name: str,
        kind: SpanKind,
        start_time: int | None,
        end_time: int | None,
        attributes: Mapping[str, object] | None,
        dropped_attributes: int,
        events: Sequence[Event],
        dropped_events: int,
        links: Sequence[Link],
        dropped_links: int,
        status: Status,
    ) -> bytes:
        assert context is not None
        parts = [
            b"\x0a\x10" + context.trace_id.to_bytes(16, "big"),
            b"\x12\x08" + context.span_id.to_bytes(8, "big"),
        ]
        state = context.trace_state
        if state:
            parts.append(
                _field(0x1A, ",".join(f"{k}={v}" for k, v in state.items()).encode("utf-8"))
            )
        if parent:
            parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
        if name:
            encoded_name = self._names.get(name)
            if encoded_name is None:
                encoded_name = self._remember_name(name)
            parts.append(encoded_name)
        parts.append(_KINDS[kind])
        if start_time:
            parts.append(b"\x39" + _FIXED64.pack(start_time))
        if end_time:
            parts.append(b"\x41" + _FIXED64.pack(end_time))
        if attributes:
            parts.append(self._attributes(0x4A, attributes))
        if dropped_attributes:
            parts.append(b"\x50" + _varint(dropped_attributes))
        for event in events:
            content = b"\x09" + _FIXED64.pack(event.timestamp) if event.timestamp else b""
            if event.name:
                content += _field(0x12, event.name.encode("utf-8"))
            content += self._attributes(0x1A, event.attributes)
            if event.dropped_attributes:
                content += b"\x20" + _varint(event.dropped_attributes)
            parts.append(_field(0x5A, content))
        if dropped_events:
            parts.append(b"\x60" + _varint(dropped_events))
        for link in links:
            content = b"\x0a\x10" + link.context.trace_id.to_bytes(16, "big")
            content += b"\x12\x08" + link.context.span_id.to_bytes(8, "big")
            content += self._attributes(0x22, link.attributes)
            if link.dropped_attributes:
                content += b"\x28" + _varint(link.dropped_attributes)
            content += b"\x35" + _FIXED32.pack(_flags(link.context))
            parts.append(_field(0x6A, content))
        if dropped_links:
            parts.append(b"\x70" + _varint(dropped_links))
        if status is _UNSET_STATUS or not (status.description or status.status_code.value):
            parts.append(b"\x7a\x00")
        else:
            content = b""
            if status.description:
                content += _field(0x12, status.description.encode("utf-8"))
            if status.status_code.value:
                content += b"\x18" + _varint(status.status_code.value)
            parts.append(b"\x7a" + _varint(len(content)) + content)
        parts.append(_REMOTE_FLAGS if parent is not None and parent.is_remote else _LOCAL_FLAGS)
        return b"".join(parts)

    def _remember_name(self, name: str) -> bytes:
        encoded = _field(0x2A, name.encode("utf-8"))
        if len(self._names) >= _CACHE_LIMIT:
            self._names.clear()
        self._names[name] = encoded
        return encoded

    def request(self, spans: Sequence[ReadableSpan]) -> bytes:
        """An ``ExportTraceServiceRequest``: spans grouped by resource, then by
        instrumentation scope, in the order first met (as the SDK groups)."""
        groups: list[tuple[Resource, list[tuple[InstrumentationScope | None, list[bytes]]]]] = []
        # The group of the span before: nomoat's spans share one resource
        # and one scope, so most spans need no search.
        last_resource: Resource | None = None
        last_scope: InstrumentationScope | None = None
        encoded: list[bytes] = []
        for span in spans:
            resource = span.resource
            scope = span.instrumentation_scope or None
            if resource is not last_resource or scope is not last_scope or not groups:
                scopes = next((g[1] for g in groups if g[0] is resource), None)
                if scopes is None:
                    scopes = []
                    groups.append((resource, scopes))
                found = next((s[1] for s in scopes if s[0] is scope), None)
                if found is None:
                    found = []
                    scopes.append((scope, found))
                encoded = found
                last_resource = resource
                last_scope = scope
            body = self.span(span)
            encoded.append(b"\x12" + _varint(len(body)) + body)
        out = []
        for resource, scopes in groups:
            content = _field(0x0A, self._resource(resource))
            for scope, spans_encoded in scopes:
                scope_spans = _field(0x0A, self._scope(scope)) + b"".join(spans_encoded)
                if scope is not None and scope.schema_url:
                    scope_spans += _field(0x1A, scope.schema_url.encode("utf-8"))
                content += _field(0x12, scope_spans)
            if resource.schema_url:
                content += _field(0x1A, resource.schema_url.encode("utf-8"))
            out.append(_field(0x0A, content))
        return b"".join(out)


def _flags(parent: SpanContext | None) -> int:
    if parent is not None and parent.is_remote:
        return _FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE
    return _FLAGS_HAS_IS_REMOTE


# Whole fields that take a few values: the kind, the flags (the parent's
# is_remote known; remote or not), the empty status.
_KINDS = {kind: b"\x30" + _varint(kind.value + 1) for kind in SpanKind}
_LOCAL_FLAGS = b"\x85\x01" + _FIXED32.pack(_FLAGS_HAS_IS_REMOTE)
_REMOTE_FLAGS = b"\x85\x01" + _FIXED32.pack(_FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE)
_UNSET_STATUS = Status()


class FastOTLPSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP http/protobuf span exporter with :class:`SpanEncoder`
    in place of the SDK's encoder; everything else (endpoint, headers,
    compression, retries, the ``OTEL_EXPORTER_OTLP_*`` variables) is the
    SDK's."""

    def __init__(
        self, endpoint: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(endpoint=endpoint, headers=headers)
        self._encoder = SpanEncoder()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        try:
            data = self._encoder.request(spans)
        except Exception:
            _logger.exception("Failed to encode a batch of %d spans", len(spans))
            return SpanExportResult.FAILURE
        if _is_request_too_large(data, self._max_request_size):
            _logger.warning("Dropping a batch of spans: %d bytes encoded", len(data))
            return SpanExportResult.FAILURE
        # From the bytes on, the SDK's client: retries, headers, compression.
        result = self._client.export(data)
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE
