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
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext

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
    """An ``AnyValue``'s content, dispatching as the SDK's ``_encode_value``."""
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
            cache_key: tuple[object, ...]
            if kind is float:
                # By its bits: 0.0 and -0.0 are equal in a dict.
                cache_key = (tag, key, kind, _DOUBLE.pack(value))
            elif kind in _CACHED_TYPES or (
                isinstance(value, str) and len(value) <= _CACHED_STR_LENGTH
            ):
                # The type is part of the key: True and 1 are equal in a dict.
                cache_key = (tag, key, kind, value)
            elif isinstance(value, list | tuple) and len(value) <= _CACHED_ITEMS:
                # A short list of strings or integers (a route's candidates,
                # finish reasons), keyed by its items and their types.
                items = tuple(value)
                types = tuple(map(type, items))
                if float in types:
                    out.append(bytes((tag,)) + self._key_value(key, value))
                    continue
                cache_key = (tag, key, items, types)
            else:
                out.append(bytes((tag,)) + self._key_value(key, value))
                continue
            try:
                found = pairs.get(cache_key)
            except TypeError:  # an unhashable item (a list in a list)
                out.append(bytes((tag,)) + self._key_value(key, value))
                continue
            if found is None:
                found = bytes((tag,)) + self._key_value(key, value)
                if len(pairs) >= _CACHE_LIMIT:
                    pairs.clear()
                pairs[cache_key] = found
            out.append(found)
        return b"".join(out)

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
        context = span.get_span_context()
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
        parent = span.parent
        if parent:
            parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
        if span.name:
            parts.append(_field(0x2A, span.name.encode("utf-8")))
        parts.append(b"\x30" + _varint(span.kind.value + 1))
        if span.start_time:
            parts.append(b"\x39" + _FIXED64.pack(span.start_time))
        if span.end_time:
            parts.append(b"\x41" + _FIXED64.pack(span.end_time))
        parts.append(self._attributes(0x4A, span.attributes))
        if span.dropped_attributes:
            parts.append(b"\x50" + _varint(span.dropped_attributes))
        for event in span.events:
            content = b"\x09" + _FIXED64.pack(event.timestamp) if event.timestamp else b""
            if event.name:
                content += _field(0x12, event.name.encode("utf-8"))
            content += self._attributes(0x1A, event.attributes)
            if event.dropped_attributes:
                content += b"\x20" + _varint(event.dropped_attributes)
            parts.append(_field(0x5A, content))
        if span.dropped_events:
            parts.append(b"\x60" + _varint(span.dropped_events))
        for link in span.links:
            content = b"\x0a\x10" + link.context.trace_id.to_bytes(16, "big")
            content += b"\x12\x08" + link.context.span_id.to_bytes(8, "big")
            content += self._attributes(0x22, link.attributes)
            if link.dropped_attributes:
                content += b"\x28" + _varint(link.dropped_attributes)
            content += b"\x35" + _FIXED32.pack(_flags(link.context))
            parts.append(_field(0x6A, content))
        if span.dropped_links:
            parts.append(b"\x70" + _varint(span.dropped_links))
        status = span.status
        content = b""
        if status.description:
            content += _field(0x12, status.description.encode("utf-8"))
        if status.status_code.value:
            content += b"\x18" + _varint(status.status_code.value)
        parts.append(b"\x7a" + _varint(len(content)) + content)
        parts.append(b"\x85\x01" + _FIXED32.pack(_flags(parent)))
        return b"".join(parts)

    def request(self, spans: Sequence[ReadableSpan]) -> bytes:
        """An ``ExportTraceServiceRequest``: spans grouped by resource, then by
        instrumentation scope, in the order first met (as the SDK groups)."""
        groups: list[tuple[Resource, list[tuple[InstrumentationScope | None, list[bytes]]]]] = []
        for span in spans:
            resource = span.resource
            scopes = next((g[1] for g in groups if g[0] is resource), None)
            if scopes is None:
                scopes = []
                groups.append((resource, scopes))
            scope = span.instrumentation_scope or None
            encoded = next((s[1] for s in scopes if s[0] is scope), None)
            if encoded is None:
                encoded = []
                scopes.append((scope, encoded))
            encoded.append(_field(0x12, self.span(span)))
        out = []
        for resource, scopes in groups:
            content = _field(0x0A, self._resource(resource))
            for scope, encoded in scopes:
                scope_spans = _field(0x0A, self._scope(scope)) + b"".join(encoded)
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
