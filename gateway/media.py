"""Which media a chat request may carry to an engine (``limits.media_urls``).

An ``image_url`` part names a URL that the engine behind the gateway (vLLM,
a hosted API) fetches itself, from its own network: a client could make it
reach hosts the client cannot (metadata services, internal APIs) or read
``file:`` URLs the engine is allowed to serve. So by default only ``data:``
URLs pass, whose content is inside the request; ``"remote"`` lets http(s)
URLs through as well, for engines whose network is meant for it; ``"none"``
refuses media parts altogether (``input_audio`` carries its data inline and
is refused only there). Anything else is a 400 naming the part.
"""

from __future__ import annotations

from typing import Literal

from gateway import wire
from gateway.errors import InvalidRequestError

MediaPolicy = Literal["none", "data", "remote"]
_ALLOWED_SCHEMES: dict[MediaPolicy, tuple[str, ...]] = {
    "none": (),
    "data": ("data:",),
    "remote": ("data:", "http://", "https://"),
}


def check_media(request: wire.ChatCompletionRequest, policy: MediaPolicy) -> None:
    """Refuse the first media part ``policy`` does not allow."""
    allowed = _ALLOWED_SCHEMES[policy]
    for index, message in enumerate(request.messages):
        if not isinstance(message, wire.UserMessage) or isinstance(message.content, str):
            continue
        for position, part in enumerate(message.content):
            where = f"messages[{index}].content[{position}]"
            if isinstance(part, wire.ImagePart):
                url = part.image_url.url
                if not url.lower().startswith(allowed):
                    raise _refused(f"{where}.image_url.url", _what(url), policy)
            elif isinstance(part, wire.AudioPart) and policy == "none":
                raise _refused(f"{where}.input_audio", "audio", policy)


def _what(url: str) -> str:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    return f"an image URL of scheme {scheme!r}" if scheme.isalnum() else "an image URL"


def _refused(param: str, what: str, policy: MediaPolicy) -> InvalidRequestError:
    allowed = {
        "none": "no media parts",
        "data": "only data: URLs (the image inline)",
        "remote": "only data:, http: and https: URLs",
    }[policy]
    return InvalidRequestError(
        f"{param}: {what} is not accepted here; this gateway forwards {allowed} "
        "(limits.media_urls)",
        param=param,
    )
