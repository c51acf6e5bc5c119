"""``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

A Responses request takes the chat request's path through the gateway, step
for step as gateway/app.py's chat handler: authenticate, read, decode
(here: resolve ``previous_response_id`` and translate to chat), admit (rate
limits, budget), then the chat pipeline (routing, adapters, hooks, traces),
one exchange (one ledger row, labelled ``responses`` and ``/v1/responses``).
The stream is always the pipeline's typed chunks (never the byte relay:
each chunk becomes Responses events). The Response is stored, when asked
(``store``, true by default), before the client gets its last byte.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

from litestar import delete, get
from litestar.params import FromPath
from litestar.types import ASGIApp, ControllerRouterHandler

from gateway.accounting.principal import Principal
from gateway.auth import PrincipalAuthenticator
from gateway.decisions import RouteTrace
from gateway.endpoints import CHAT
from gateway.errors import InvalidRequestError, NotFoundError
from gateway.handling import (
    AnyRequest,
    Call,
    OpenAIRoute,
    cancel_on_disconnect,
    openai_post,
)
from gateway.openai_responses import types as rt
from gateway.openai_responses.events import ResponseEvents, response_events
from gateway.openai_responses.store import ResponseStore, StoredResponse
from gateway.openai_responses.translate import (
    Echo,
    chat_request,
    conversation_of,
    decode_responses,
    echo_of,
    input_items,
    renamed,
    response_of,
    shown,
    stored_conversation,
)
from gateway.responses import EventStream, JsonAnswer

if TYPE_CHECKING:
    from gateway.app import Runtime

PATH = "/v1/responses"
# The exchange's operation (metrics' label) and the decision logs' endpoint.
ENDPOINT = "responses"
ID_PREFIX = "resp"
T = TypeVar("T")


def _not_found(response_id: str, param: str | None = None) -> NotFoundError:
    return NotFoundError(
        f"Response with id '{shown(response_id)}' not found.", param=param, code=None
    )


async def _named_as_asked(work: Awaitable[T]) -> T:
    """``work``'s result; its 400s (the engine's context check among them)
    name the Responses request's parameters, not the chat request's."""
    try:
        return await work
    except InvalidRequestError as error:
        error.param = renamed(error.param)
        raise


class Turn:
    """One Responses request on its way: what its Response echoes, the
    conversation it continues, and where it is stored (if it is)."""

    def __init__(
        self,
        response_id: str,
        created_at: int,
        echo: Echo,
        conversation: list[rt.InputItem],
        owner: str | None,
        store: ResponseStore,
    ) -> None:
        self.response_id = response_id
        self.created_at = created_at
        self.echo = echo
        self.conversation = conversation
        self.owner = owner
        self.store = store

    async def finished(self, response: rt.Response) -> None:
        """Stored, if the request asked for it."""
        if not self.echo.store:
            return
        record = StoredResponse(
            id=response.id,
            owner=self.owner,
            created_at=response.created_at,
            model=response.model,
            previous_response_id=response.previous_response_id,
            conversation=stored_conversation(self.conversation, response.output),
            response=rt.encoder.encode(response),
        )
        await self.store.save(record)


def build_response_handlers(
    runtime: Runtime, authenticate: PrincipalAuthenticator
) -> list[ControllerRouterHandler]:
    """The Responses API's handlers over ``runtime``'s pipeline and its store
    (one for the app, built at start-up)."""
    route_header = runtime.settings.server.route_header
    limits = runtime.settings.limits
    store = runtime.response_store

    def owner_of(principal: Principal | None) -> str | None:
        return principal.key_id if principal is not None else None

    async def history(previous: str | None, owner: str | None) -> list[rt.InputItem]:
        if previous is None:
            return []
        record = await store().find(previous, owner)
        if record is None:
            raise _not_found(previous, "previous_response_id")
        return conversation_of(record.conversation)

    async def work(call: Call) -> ASGIApp:
        request, exchange, span, ctx = call.request, call.exchange, call.span, call.ctx
        observer = runtime.observer
        key_id = owner_of(call.principal)
        pipeline = runtime.serving()
        raw = await request.body()
        asked = decode_responses(raw, limits)
        conversation = [
            *await history(asked.previous_response_id, key_id),
            *input_items(asked),
        ]
        chat = call.told = chat_request(asked, conversation, limits)
        exchange.requested, exchange.stream = asked.model, bool(asked.stream)
        exchange.user = asked.user
        call.ticket = await runtime.admit(call.principal, chat, len(raw), exchange)
        if span is not None:
            span.set_model(asked.model)
        trace = RouteTrace(ENDPOINT, len(raw), span, exchange)
        turn = Turn(
            ctx.request_id, ctx.created, echo_of(asked, asked.model), conversation, key_id, store()
        )
        if asked.stream:
            # Typed chunks always: each becomes Responses events.
            primed = _named_as_asked(pipeline.stream(CHAT, chat, ctx, trace))
            chunks = await cancel_on_disconnect(request, primed)
            watched = observer.watching(chunks, exchange)
            if span is not None:
                watched = span.watch(watched)
            events = ResponseEvents(turn.response_id, turn.created_at, turn.echo)
            sent = response_events(watched, events, turn.finished)
            return EventStream(sent, call.headers(trace, route_header))
        answering = _named_as_asked(pipeline.answer(CHAT, chat, ctx, trace))
        answer = await cancel_on_disconnect(request, answering)
        if span is not None:
            span.sent(answer)
        response = response_of(
            answer, turn.response_id, turn.created_at, turn.echo, int(time.time())
        )
        await turn.finished(response)
        observer.close(exchange, 200, None)
        headers = call.headers(trace, route_header)
        if runtime.costing is not None:
            headers.extend(runtime.costing.answer_headers(exchange))
        return JsonAnswer(rt.encoder.encode(response), headers=headers)

    create = openai_post(
        runtime, OpenAIRoute(PATH, ENDPOINT, ID_PREFIX, separator="_"), authenticate, work
    )

    @get(PATH + "/{response_id:str}", name="responses.retrieve")
    async def retrieve(request: AnyRequest, response_id: FromPath[str]) -> ASGIApp:
        owner = owner_of(authenticate.principal(request))
        record = await store().find(response_id, owner)
        if record is None:
            raise _not_found(response_id)
        return JsonAnswer(record.response)

    @delete(PATH + "/{response_id:str}", status_code=200, name="responses.delete")
    async def remove(request: AnyRequest, response_id: FromPath[str]) -> ASGIApp:
        owner = owner_of(authenticate.principal(request))
        if not await store().delete(response_id, owner):
            raise _not_found(response_id)
        return JsonAnswer(rt.encoder.encode(rt.Deleted(id=response_id)))

    return [create, retrieve, remove]
