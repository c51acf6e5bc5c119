"""A chat stream's typed chunks as the Responses API's event stream.

OpenAI's sequence, which the SDK's ``responses.stream(...)`` helpers
accumulate into their final Response: ``response.created`` and
``response.in_progress``; for each output item ``response.output_item.added``,
then for a message ``response.content_part.added``, the
``response.output_text.delta`` events, ``response.output_text.done`` and
``response.content_part.done``, for a function call the
``response.function_call_arguments.delta`` events and ``.done``; then
``response.output_item.done``; last ``response.completed`` (or
``response.incomplete`` when the token budget cut it). Every event has its
``sequence_number`` and goes out as ``event: <type>`` and ``data: <json>``.
An item is finished before the next one is added.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from gateway import wire
from gateway.errors import GatewayError, InternalError
from gateway.openai_responses import types as rt
from gateway.openai_responses.translate import (
    Echo,
    built_response,
    ended_status,
    new_id,
    usage_of,
)
from gateway.streams import closing

_log = logging.getLogger(__name__)
# Called with the finished Response before its last event is sent (the
# store: a client that reads the stream to its end can retrieve it at once).
Finished = Callable[[rt.Response], Awaitable[None]]


@dataclass(slots=True)
class _Call:
    item: rt.FunctionCallItem
    output_index: int
    arguments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ResponseEvents:
    """The events of one streamed Response, built from its chat chunks."""

    response_id: str
    created_at: int
    echo: Echo
    output: list[rt.OutputItem] = field(default_factory=list)
    sequence: int = 0
    # The message item being written, and its text so far.
    message: rt.OutputMessage | None = None
    text: list[str] = field(default_factory=list)
    # Function calls by their chat index; the one being written is last.
    calls: dict[int, _Call] = field(default_factory=dict)
    open_call: _Call | None = None
    finish_reason: str | None = None
    usage: wire.Usage | None = None

    def _numbered(self, event: rt.Event) -> rt.Event:
        event.sequence_number = self.sequence
        self.sequence += 1
        return event

    def started(self) -> list[rt.Event]:
        response = built_response(self.response_id, self.created_at, self.echo, [], "in_progress")
        return [
            self._numbered(rt.ResponseCreated(response=response)),
            self._numbered(rt.ResponseInProgress(response=response)),
        ]

    def chunk(self, chunk: wire.ChatCompletionChunk) -> list[rt.Event]:
        """The events one chat chunk makes (its first choice's)."""
        if isinstance(chunk.usage, wire.Usage):
            self.usage = chunk.usage
        events: list[rt.Event] = []
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            delta = choice.delta
            text = delta.content if isinstance(delta.content, str) else None
            if not text and isinstance(delta.refusal, str):
                text = delta.refusal
            if text:
                events += self._text(text)
            for call in delta.tool_calls or ():
                events += self._call(call)
            if choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason
        return events

    def _text(self, text: str) -> list[rt.Event]:
        events: list[rt.Event] = []
        if self.message is None:
            events += self._close_call()
            self.message = rt.OutputMessage(id=new_id("msg"), status="in_progress")
            index = len(self.output)
            self.output.append(self.message)
            events.append(self._numbered(rt.OutputItemAdded(output_index=index, item=self.message)))
            events.append(
                self._numbered(
                    rt.ContentPartAdded(
                        item_id=self.message.id,
                        output_index=index,
                        content_index=0,
                        part=rt.OutputText(text=""),
                    )
                )
            )
        self.text.append(text)
        index = self.output.index(self.message)
        events.append(
            self._numbered(
                rt.TextDelta(
                    item_id=self.message.id, output_index=index, content_index=0, delta=text
                )
            )
        )
        return events

    def _close_message(self, status: str = "completed") -> list[rt.Event]:
        message = self.message
        if message is None:
            return []
        self.message = None
        index = self.output.index(message)
        text = "".join(self.text)
        self.text = []
        part = rt.OutputText(text=text)
        done = rt.OutputMessage(
            id=message.id,
            status="incomplete" if status == "incomplete" else "completed",
            content=[part],
        )
        self.output[index] = done
        return [
            self._numbered(
                rt.TextDone(item_id=message.id, output_index=index, content_index=0, text=text)
            ),
            self._numbered(
                rt.ContentPartDone(
                    item_id=message.id, output_index=index, content_index=0, part=part
                )
            ),
            self._numbered(rt.OutputItemDone(output_index=index, item=done)),
        ]

    def _call(self, delta: wire.ToolCallDelta) -> list[rt.Event]:
        events: list[rt.Event] = []
        call = self.calls.get(delta.index)
        function = delta.function
        if call is None:
            events += self._close_message()
            events += self._close_call()
            item = rt.FunctionCallItem(
                id=new_id("fc"),
                status="in_progress",
                call_id=delta.id or new_id("call"),
                name=(function.name if function is not None else None) or "",
                arguments="",
            )
            call = _Call(item, len(self.output))
            self.calls[delta.index] = call
            self.open_call = call
            self.output.append(item)
            events.append(
                self._numbered(rt.OutputItemAdded(output_index=call.output_index, item=item))
            )
        elif function is not None and function.name and not call.item.name:
            call.item.name = function.name
        fragment = function.arguments if function is not None else None
        if fragment:
            call.arguments.append(fragment)
            events.append(
                self._numbered(
                    rt.ArgumentsDelta(
                        item_id=call.item.id, output_index=call.output_index, delta=fragment
                    )
                )
            )
        return events

    def _close_call(self) -> list[rt.Event]:
        call = self.open_call
        if call is None:
            return []
        self.open_call = None
        arguments = "".join(call.arguments)
        done = rt.FunctionCallItem(
            id=call.item.id,
            status="completed",
            call_id=call.item.call_id,
            name=call.item.name,
            arguments=arguments,
        )
        self.output[call.output_index] = done
        return [
            self._numbered(
                rt.ArgumentsDone(
                    item_id=done.id,
                    output_index=call.output_index,
                    name=done.name,
                    arguments=arguments,
                )
            ),
            self._numbered(rt.OutputItemDone(output_index=call.output_index, item=done)),
        ]

    def finished(self) -> tuple[rt.Response, list[rt.Event]]:
        """The items still open closed, and the whole Response (its last
        event is :meth:`last`, sent once the Response is stored)."""
        status, incomplete = ended_status(self.finish_reason)
        events = self._close_message(status) + self._close_call()
        completed_at = int(time.time()) if status == "completed" else None
        response = built_response(
            self.response_id,
            self.created_at,
            self.echo,
            list(self.output),
            status,
            incomplete,
            usage_of(self.usage),
            completed_at,
        )
        return response, events

    def last(self, response: rt.Response) -> rt.Event:
        if response.status == "incomplete":
            return self._numbered(rt.ResponseIncomplete(response=response))
        return self._numbered(rt.ResponseCompleted(response=response))

    def failure(self, error: GatewayError) -> rt.Event:
        detail = rt.ErrorDetail(
            type=error.error_type, code=error.code, message=error.message, param=error.param
        )
        return self._numbered(
            rt.ErrorEvent(code=error.code, message=error.message, param=error.param, error=detail)
        )


def framed(event: rt.Event) -> bytes:
    """One server-sent event as OpenAI frames the Responses stream."""
    kind = type(event).__struct_config__.tag
    return b"event: " + str(kind).encode() + b"\ndata: " + rt.encoder.encode(event) + b"\n\n"


async def response_events(
    chunks: AsyncIterator[wire.ChatCompletionChunk],
    events: ResponseEvents,
    finished: Finished,
) -> AsyncIterator[bytes]:
    """The stream's SSE bytes. A failure after the first event cannot change
    the status any more: it ends the stream with an ``error`` event (the SDK
    raises ``APIError``), and nothing is stored."""
    try:
        # Inside: a client that leaves at any event closes the chat stream
        # (and so stops the generation) at once.
        async with closing(chunks):
            for event in events.started():
                yield framed(event)
            async for chunk in chunks:
                for event in events.chunk(chunk):
                    yield framed(event)
        response, closing_events = events.finished()
        for event in closing_events:
            yield framed(event)
        await finished(response)
    except GatewayError as error:
        yield framed(events.failure(error))
        return
    except Exception:
        _log.exception("a Responses stream failed after its first event")
        yield framed(events.failure(InternalError("The stream failed; the answer is incomplete.")))
        return
    yield framed(events.last(response))
