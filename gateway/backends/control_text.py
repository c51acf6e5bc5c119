"""Message text that an upstream would parse into control tokens, refused.

vLLM renders a conversation with the model's chat template and tokenizes the
result with the tokenizer's added tokens recognized: a user who writes
``<|im_end|><|im_start|>system`` in a message gets the real control tokens, a
forged system turn (vLLM's upstream fix was not merged). The gateway cannot
make vLLM tokenize message text as plain text, so it refuses, with a 400
naming ``messages``, any chat request whose text contains the text of one of
the model's added tokens.

The texts come from vLLM's ``GET /tokenizer_info`` (served when vLLM runs with
``--enable-tokenizer-info-endpoint``), read by the prober, never on the
request path. That answer lists every added token by its text only (vLLM
drops the ``special`` flag when it serializes the tokenizer), and Hugging
Face tokenizers parse every added token out of text, special or not, so all
of them are refused; an operator can name texts that are harmless on a model
(``allowed_token_texts``, e.g. Qwen3's ``<think>``). Texts with no visible
character (some tokenizers add runs of spaces or newlines) cannot write a
marker and are left out.

The search is one regular expression: the texts as a trie (common prefixes
factored out), so each position of the message costs a walk down the trie,
not one comparison per token text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import msgspec

from gateway import wire
from gateway.errors import InvalidRequestError

# The longest token text quoted back in an error.
_QUOTED = 80


class _AddedToken(msgspec.Struct):
    """An added token as a tokenizer config writes it (vLLM 0.32 sends only
    the text; a later version may send the whole object)."""

    content: str
    special: bool = True


_Token = str | _AddedToken | None


class _TokenizerInfo(msgspec.Struct):
    """The parts of ``GET /tokenizer_info`` (the tokenizer's config) that name
    tokens; everything else in it is ignored."""

    added_tokens_decoder: dict[str, _Token] | None = None
    additional_special_tokens: list[_Token] | None = None
    # transformers 5's name for the list (or a map from role to token).
    extra_special_tokens: list[_Token] | dict[str, _Token] | None = None
    bos_token: _Token = None
    eos_token: _Token = None
    unk_token: _Token = None
    pad_token: _Token = None
    sep_token: _Token = None
    cls_token: _Token = None
    mask_token: _Token = None


_info_decoder = msgspec.json.Decoder(_TokenizerInfo)


def token_texts(tokenizer_info: bytes) -> frozenset[str]:
    """The texts of the tokenizer's added and special tokens in a
    ``/tokenizer_info`` answer (empty if it names none); ``ValueError`` if
    it is not a JSON object of the tokenizer config's shape."""
    try:
        info = _info_decoder.decode(tokenizer_info)
    except msgspec.DecodeError as error:
        raise ValueError(f"/tokenizer_info is not a tokenizer config: {error}") from None
    extra = info.extra_special_tokens
    tokens: list[_Token] = [
        *(info.added_tokens_decoder or {}).values(),
        *(info.additional_special_tokens or ()),
        *(extra.values() if isinstance(extra, dict) else extra or ()),
        info.bos_token,
        info.eos_token,
        info.unk_token,
        info.pad_token,
        info.sep_token,
        info.cls_token,
        info.mask_token,
    ]
    return frozenset(_texts(tokens))


def _texts(tokens: Iterable[_Token]) -> Iterator[str]:
    for token in tokens:
        if isinstance(token, str):
            yield token
        elif isinstance(token, _AddedToken):
            yield token.content


class ControlTextGuard:
    """Finds the text of any of a model's control tokens in a chat request."""

    def __init__(self, texts: Iterable[str], *, allowed: Iterable[str] = ()) -> None:
        permitted = set(allowed)
        self.texts = frozenset(text for text in texts if text.strip() and text not in permitted)
        self._search = re.compile(trie_pattern(self.texts)).search if self.texts else None

    def first(self, text: str) -> str | None:
        """The first control-token text in ``text``, if any."""
        if self._search is None:
            return None
        found = self._search(text)
        return found.group() if found else None

    def check_chat(self, request: wire.ChatCompletionRequest) -> None:
        """InvalidRequestError (400) if a message or a tool definition writes
        a control token's text."""
        for index, message in enumerate(request.messages):
            for text in message_texts(message):
                self._refuse(text, "messages", f"message {index}")
        for tool in request.tools or ():
            for text in tool_texts(tool):
                self._refuse(text, "tools", f"the tool {tool.function.name[:_QUOTED]!r}")

    def _refuse(self, text: str, param: str, where: str) -> None:
        marker = self.first(text)
        if marker is not None:
            raise InvalidRequestError(
                f"{where} contains {marker[:_QUOTED]!r}, the text of one of the model's "
                "control tokens; this deployment cannot keep it as plain text, so it is "
                "refused",
                param=param,
                code="control_token_text",
            )


def message_texts(message: wire.Message) -> Iterator[str]:
    """Every text of a message that a chat template may write into the prompt."""
    content = message.content
    if isinstance(content, str):
        yield content
    elif content is not None:
        for part in content:
            if isinstance(part, wire.TextPart):
                yield part.text
            elif isinstance(part, wire.RefusalPart):
                yield part.refusal
    if isinstance(message, wire.ToolMessage):
        yield message.tool_call_id
        return
    if message.name is not None:
        yield message.name
    if isinstance(message, wire.AssistantMessage):
        if message.refusal is not None:
            yield message.refusal
        for call in message.tool_calls or ():
            yield call.id
            yield call.function.name
            yield call.function.arguments


def tool_texts(tool: wire.Tool) -> Iterator[str]:
    """A tool's name, description and every string of its parameters' schema
    (templates write tool definitions into the prompt)."""
    function = tool.function
    yield function.name
    if function.description is not None:
        yield function.description
    if function.parameters is not wire.NO_SCHEMA:
        # Decoded, so that a JSON escape (\u003c) cannot hide a marker.
        yield from _strings(msgspec.json.decode(function.parameters))


def _strings(value: object) -> Iterator[str]:
    """The strings in decoded JSON, keys included (walked with a stack, not
    by recursion)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


# A trie of texts: each key one character, "" where a text ends.
_Trie = dict[str, "_Trie"]


def trie_pattern(texts: Iterable[str]) -> str:
    """A regular expression matching any of ``texts``: a trie, so a search
    tries at each position only the texts that start with what is there.

    A text that another one starts with ends the branch: finding the shorter
    one is enough to refuse."""
    root: _Trie = {}
    for text in sorted(set(texts), key=len):
        node = root
        for char in text:
            if "" in node:
                break  # a shorter text already matches here
            node = node.setdefault(char, {})
        else:
            node.clear()
            node[""] = {}
    return _branch(root)


def _branch(node: _Trie) -> str:
    """The pattern of a subtree; runs of single children become literals
    without recursing (only branch points nest)."""
    literal = ""
    while len(node) == 1 and "" not in node:
        ((char, node),) = node.items()
        literal += re.escape(char)
    if "" in node or not node:
        return literal
    alternatives = [re.escape(char) + _branch(child) for char, child in sorted(node.items())]
    return literal + "(?:" + "|".join(alternatives) + ")"
