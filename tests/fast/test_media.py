"""Image URLs reach an engine (which would fetch them from its own network)
only as the operator allows: limits.media_urls."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import Start
from .support import MODEL, error_of, pool

pytestmark = pytest.mark.anyio

DATA_URL = "data:image/png;base64,iVBORw0KGgo="
AUDIO = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(*parts: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Describe images."},
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, *parts]},
        ],
    }


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "https://internal.example/cat.png",
        "file:///etc/passwd",
        "HTTP://10.0.0.1/",
        "ftp://example.com/a.png",
        "//example.com/a.png",
    ],
)
async def test_by_default_only_data_urls_reach_the_engine(start: Start, url: str) -> None:
    async with start(pool("a")) as gw:
        refused = await gw.http.post("/v1/chat/completions", json=chat(image(DATA_URL), image(url)))
        error = error_of(refused, 400)
        assert error["param"] == "messages[1].content[2].image_url.url"
        assert "limits.media_urls" in error["message"]
        assert gw.backend("a").calls == []
        accepted = await gw.http.post("/v1/chat/completions", json=chat(image(DATA_URL), AUDIO))
        assert accepted.status_code == 200, accepted.text
        assert len(gw.backend("a").calls) == 1


async def test_remote_urls_pass_when_the_operator_allows_them(start: Start) -> None:
    async with start(pool("a", limits={"media_urls": "remote"})) as gw:
        for url in ("https://example.com/cat.png", "http://example.com/cat.png", DATA_URL):
            answer = await gw.http.post("/v1/chat/completions", json=chat(image(url)))
            assert answer.status_code == 200, answer.text
        # Other schemes never do.
        refused = await gw.http.post("/v1/chat/completions", json=chat(image("file:///etc/hosts")))
        assert error_of(refused, 400)["param"] == "messages[1].content[1].image_url.url"


async def test_none_refuses_every_media_part(start: Start) -> None:
    async with start(pool("a", limits={"media_urls": "none"})) as gw:
        refused = await gw.http.post("/v1/chat/completions", json=chat(image(DATA_URL)))
        assert error_of(refused, 400)["param"] == "messages[1].content[1].image_url.url"
        refused = await gw.http.post("/v1/chat/completions", json=chat(AUDIO))
        assert error_of(refused, 400)["param"] == "messages[1].content[1].input_audio"
        assert (await gw.http.post("/v1/chat/completions", json=chat())).status_code == 200
