"""nomoat-classifier: choose the model from what the prompt looks like.

A request hook (``type = "classifier"``). When the client names the model
``applies_to`` (default ``"auto"``), the hook measures the prompt and sets
``model`` to that of the first matching rule (or ``default``); any other model
name is left alone. List it before hooks that depend on the model.

Features, all cheap heuristics (no model, no downloads):

* ``chars``: characters of text in all messages (or the prompt);
* ``tokens``: an estimate: one per CJK character, one per 4 other characters;
* ``code``: the user's text has a fenced block, or at least 30% of its lines
  (two or more) look like code (keywords, ``;``/``{`` endings, brackets);
* ``language``: the user's text's script (``ja``, ``ko``, ``zh``, ``ru``,
  ``uk``, ``el``, ``ar``, ``he``, ``hi``, ``th``) or, for Latin script, the
  language with the most stopwords (``en``, ``de``, ``fr``, ``es``, ``it``,
  ``pt``, ``nl``); ``und`` when unsure.

``code`` and ``language`` are judged on the first :data:`SAMPLE_CHARS` of the
user's text: what a text looks like shows in its first pages, and the cost of
a request stays bounded whatever its size (a 4 MB body: about 30 ms of CPU,
of which the loop is held at most one 64 KB window at a time; figures in
docs/security/redact.md). ``chars`` and ``tokens`` count the whole text.

A rule is ``{ when = FEATURE, model = NAME, ... }`` with ``when`` one of
``code``, ``prose`` (not code), ``long`` (needs ``min_chars`` or
``min_tokens``), ``short`` (needs ``max_chars`` or ``max_tokens``),
``language`` (needs ``languages``) or ``always``. Thresholds may be added to
any rule as further conditions: ``{ when = "code", min_chars = 2000, ... }``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.contract import (
    AnyRequest,
    AnyResponse,
    ChatCompletionRequest,
    HookType,
    PluginManifest,
    RequestContext,
    message_role,
)

__all__ = ["Classifier", "ClassifierConfig", "Features", "Rule", "features", "manifest"]

_log = logging.getLogger(__name__)
# Characters of the user's text that code and language are judged on.
SAMPLE_CHARS = 32 * 1024
# Characters counted per regex call when estimating tokens on the event loop.
WINDOW = 64 * 1024
Count = Annotated[int, Field(ge=0)]


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    when: Literal["code", "prose", "long", "short", "language", "always"]
    model: Annotated[str, Field(min_length=1)]
    min_chars: Count | None = None
    min_tokens: Count | None = None
    max_chars: Count | None = None
    max_tokens: Count | None = None
    languages: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _complete(self) -> Rule:
        if self.when == "long" and self.min_chars is None and self.min_tokens is None:
            raise ValueError('a "long" rule needs min_chars or min_tokens')
        if self.when == "short" and self.max_chars is None and self.max_tokens is None:
            raise ValueError('a "short" rule needs max_chars or max_tokens')
        if (self.when == "language") != bool(self.languages):
            raise ValueError('languages is required with when = "language", and only there')
        return self


class ClassifierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The model name clients send to ask for classification.
    applies_to: Annotated[str, Field(min_length=1)] = "auto"
    # Tried in order; the first match sets the model.
    rules: Annotated[tuple[Rule, ...], Field(min_length=1)]
    # The model when no rule matches; unset: the request goes on unchanged.
    default: str | None = None


@dataclass(frozen=True, slots=True)
class Features:
    chars: int
    tokens: int
    code: bool
    language: str


# --------------------------------------------------------------------- features


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):  # text parts carry `text`; others are skipped
        return [part.text for part in content if isinstance(getattr(part, "text", None), str)]
    return []


def _split(request: AnyRequest) -> tuple[str, str]:
    """(all text, the user's text)."""
    if isinstance(request, ChatCompletionRequest):
        every: list[str] = []
        users: list[str] = []
        for message in request.messages:
            texts = _texts(message.content)
            every += texts
            if message_role(message) == "user":
                users += texts
        return "\n".join(every), "\n".join(users or every)
    prompt = request.prompt
    items = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
    text = "\n".join(items)
    return text, text


_WIDE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def estimate_tokens(text: str) -> int:
    return _tokens(len(text), len(_WIDE.findall(text)))


def _tokens(chars: int, wide: int) -> int:
    return wide + math.ceil((chars - wide) / 4)


async def _count_wide(text: str) -> int:
    """CJK characters in ``text``, giving the loop a turn between windows."""
    count = 0
    for start in range(0, len(text), WINDOW):
        if start:
            await asyncio.sleep(0)
        count += len(_WIDE.findall(text, start, start + WINDOW))
    return count


# Leading whitespace is taken whole (possessive, and never past the line's
# end): a fence or code line cannot start inside it, and letting the engine
# try every shorter prefix made a line of n spaces cost n scans of the line
# (16,000 spaces: 10 s; and for the fence, whose \s crossed newlines, lines of
# spaces: 1 MB took 23 s).
_FENCE = re.compile(r"^[^\S\n]*+(```|~~~)", re.M)
_CODE_LINE = re.compile(
    r"""^\s*+(?:
        (?:def|class|import|from\s+[\w.]+\s+import|return|elif|fn|func|function|const|let|var
          |public|private|protected|static|package|\#include|using|namespace|async|await
          |SELECT|INSERT|UPDATE|DELETE|CREATE)\b
      | (?:if|for|while|switch)\s*\(        # C-like control flow
      | (?:if|for|while)\b.*:\s*$           # Python control flow
      | [})\]]+[;,]?\s*$                    # closing brackets alone
      | .*[;{]\s*$                          # statement or block ends
      | .*(?:=>|->|::|==|!=|&&|\|\|)        # operators
      | \w+(?:\.\w+)*\s*=\s*\S              # assignments
    )""",
    re.X,
)


def looks_like_code(text: str) -> bool:
    if _FENCE.search(text):
        return True
    lines = [line for line in text.splitlines() if line.strip()]
    code = sum(1 for line in lines if _CODE_LINE.match(line))
    return code >= 2 and code / len(lines) >= 0.3


_SCRIPTS = (  # checked in order: kana before Han, so Japanese is not Chinese
    ("ja", re.compile(r"[\u3040-\u30ff]")),
    ("ko", re.compile(r"[\uac00-\ud7af\u1100-\u11ff]")),
    ("zh", re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")),
    ("ru", re.compile(r"[\u0400-\u04ff]")),
    ("el", re.compile(r"[\u0370-\u03ff]")),
    ("ar", re.compile(r"[\u0600-\u06ff]")),
    ("he", re.compile(r"[\u0590-\u05ff]")),
    ("hi", re.compile(r"[\u0900-\u097f]")),
    ("th", re.compile(r"[\u0e00-\u0e7f]")),
)
_UKRAINIAN = re.compile(r"[іїєґІЇЄҐ]")  # Cyrillic letters Russian does not use
_STOPWORDS = {
    "en": "the and is are of to in that it you what how with for this be on not have please can",
    "de": "der die das und ist nicht ich sie ein eine zu mit auf für wie was bitte es den dem",
    "fr": "le la les et est un une des du que qui pas pour dans avec je vous ce sur il",
    "es": "el la los las y es un una que de en por para con no se qué cómo está del",
    "it": "il lo gli le e è un una che di per non con sono come cosa del della mi",
    "pt": "o a os as e é um uma que de em para com não por do da você como se",
    "nl": "de het een en is van niet dat ik je op te met voor zijn wat hoe maar",
}
_STOPWORD_SETS = {language: frozenset(words.split()) for language, words in _STOPWORDS.items()}
_WORD = re.compile(r"[^\W\d_]+")


def detect_language(text: str) -> str:
    """A script, or the Latin-script language with clearly most stopwords."""
    letters = sum(char.isalpha() for char in text)
    for language, script in _SCRIPTS:
        if letters and len(script.findall(text)) / letters >= 0.3:
            return "uk" if language == "ru" and _UKRAINIAN.search(text) else language
    words = [word.lower() for word in _WORD.findall(text)]
    hits = Counter({name: sum(w in stop for w in words) for name, stop in _STOPWORD_SETS.items()})
    ranked = hits.most_common(2)
    best, count = ranked[0]
    return best if count >= 2 and count > ranked[1][1] else "und"


def features(request: AnyRequest) -> Features:
    every, user = _split(request)
    return _judge(every, user, len(_WIDE.findall(every)))


def _judge(every: str, user: str, wide: int) -> Features:
    sample = user[:SAMPLE_CHARS]
    return Features(
        len(every), _tokens(len(every), wide), looks_like_code(sample), detect_language(sample)
    )


# ------------------------------------------------------------------------- rules


def matches(rule: Rule, found: Features) -> bool:
    limits = (
        (rule.min_chars, found.chars, 1),
        (rule.min_tokens, found.tokens, 1),
        (rule.max_chars, found.chars, -1),
        (rule.max_tokens, found.tokens, -1),
    )
    for limit, value, sign in limits:
        if limit is not None and (value - limit) * sign < 0:
            return False
    if rule.when == "code":
        return found.code
    if rule.when == "prose":
        return not found.code
    if rule.when == "language":
        return found.language in rule.languages
    return True  # long, short, always: the limits decided


def choose(rules: Iterable[Rule], found: Features, default: str | None) -> str | None:
    return next((rule.model for rule in rules if matches(rule, found)), default)


class Classifier:
    def __init__(self, config: ClassifierConfig) -> None:
        self.config = config

    async def on_request(
        self, request: AnyRequest, ctx: RequestContext
    ) -> AnyRequest | AnyResponse:
        if request.model != self.config.applies_to:
            return request
        # features(request), with the loop free between windows of a long text.
        every, user = _split(request)
        wide = await _count_wide(every)
        found = _judge(every, user, wide)
        model = choose(self.config.rules, found, self.config.default)
        _log.debug("classifier: %s -> %s for %s (%s)", request.model, model, ctx.request_id, found)
        if model is None:
            return request
        return msgspec.structs.replace(request, model=model)


def _factory(config: ClassifierConfig) -> Classifier:
    return Classifier(config)


manifest = PluginManifest(
    name="classifier",
    hooks={"classifier": HookType(ClassifierConfig, _factory)},
)
