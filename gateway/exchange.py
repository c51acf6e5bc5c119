"""One client request as the metrics and the access log see it.

The HTTP handler opens an :class:`Exchange` when a request arrives; the
pipeline fills in where it went and what it used (through the
:class:`~gateway.decisions.RouteTrace` it already hands back); the handler
closes it when the last byte is sent, the request fails, or the client
leaves. Nothing here is prompt text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway import wire
from gateway.contract import AdapterUse, ComputeMeter, Target, UsageReport
from gateway.errors import GatewayError

# The OpenTelemetry GenAI operation name of each endpoint (gen_ai.operation.name).
# (Keyed by gateway.endpoints' names.)
OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}


@dataclass(slots=True)
class Exchange:
    """What became of one request. Times are ``time.monotonic()`` instants."""

    request_id: str
    operation: str
    arrived: float
    path: str = ""
    # The catalog model that served it (never the client's raw name, which
    # may be anything: an ad hoc stack, a typo).
    model: str = ""
    # What the client asked for, for the access log only.
    requested: str = ""
    deployment: str = ""
    backend: str = ""
    adapter: str = ""
    # Every adapter it used, with its scale (the label above names one).
    adapters: tuple[AdapterUse, ...] = ()
    stream: bool = False
    attempts: int = 0
    usage: wire.Usage | None = None
    # Output tokens counted on a stream cut before its usage came.
    estimated_output_tokens: int | None = None
    first_token_at: float | None = None
    key_id: str | None = None
    # Accounting (gateway/accounting): who asked (the managed key's team, the
    # body's ``user``), how the answer ended, and what it cost in nano-USD:
    # ``charged_nano`` at the deployment's token prices (budgets count it),
    # ``compute_nano`` its share of a self-hosted node's usd_per_hour.
    team_id: str | None = None
    user: str | None = None
    finish_reason: str | None = None
    charged_nano: int = 0
    compute_nano: int = 0
    # Self-hosted nodes' busy seconds spent on it, per backend: what
    # compute_nano prices (gateway/accounting/compute.py).
    compute: ComputeMeter = field(default_factory=ComputeMeter)
    # The exact tokens an engine reports when the answer carried no usage
    # (a cut stream): preferred to estimated_output_tokens once delivered.
    reported: UsageReport = field(default_factory=UsageReport)
    # The trace this request belongs to, when tracing is on (hex, W3C form).
    trace_id: str | None = None
    span_id: str | None = None
    closed: bool = False
    # On an edge node: the key its gateway sent to fetch this request's usage
    # by, should the gateway lose it (gateway/edge_usage.py).
    usage_key: str | None = None
    # Run once when it closes (after everything above is final): the
    # admission ticket's settlement (gateway/accounting/admission.py).
    finish: Callable[[Exchange], None] | None = None

    def answered_by(self, target: Target, backend: str) -> None:
        self.deployment = target.deployment
        self.backend = backend
        self.adapter = adapter_label(target)
        self.adapters = target.adapters

    def seconds(self, now: float | None = None) -> float:
        return (now if now is not None else time.monotonic()) - self.arrived

    def output_tokens(self) -> int | None:
        """Generated tokens: the usage's, else those counted on a cut stream."""
        if self.usage is not None:
            return self.usage.completion_tokens
        return self.estimated_output_tokens

    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrived


def adapter_label(target: Target) -> str:
    """The adapter a request used, as a bounded label: its registered name,
    ``stack`` for several at once (ad hoc stacks are combinations without
    end), empty for the base model."""
    if not target.adapters:
        return ""
    if len(target.adapters) > 1:
        return "stack"
    return target.adapters[0].adapter.name


def finish_reason(
    answer: wire.ChatCompletion | wire.ChatCompletionChunk | wire.Completion,
) -> str | None:
    """The first choice's finish reason (a chunk carries it on its last
    content chunk; n > 1 answers are accounted by their first choice)."""
    for choice in answer.choices:
        return choice.finish_reason
    return None


def error_type(error: BaseException) -> str:
    """``error.type`` of the GenAI conventions: the error's code, a small set
    the gateway's own classes define, or ``_OTHER``."""
    if isinstance(error, GatewayError):
        return error.code or error.error_type
    return "_OTHER"


def status_class(status: int) -> str:
    return f"{status // 100}xx"
