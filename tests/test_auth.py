"""Authentication (gateway/auth.py): hashing, constant-time comparison,
fingerprints, and both authenticators, through a fake request that has only
what they read (an ASGI scope's headers). Fast: no server."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.auth import (
    KEY_HASH_FORMAT,
    AdminAuthenticator,
    Authenticator,
    bearer_token,
    hash_api_key,
    key_fingerprint,
    key_matches,
)
from gateway.errors import AuthenticationError, PermissionDeniedError

API_KEY = "sk-nomoat-api-0123456789abcdef"
OTHER_API_KEY = "sk-nomoat-api-fedcba9876543210"
ADMIN_KEY = "sk-nomoat-admin-0123456789abcdef"
API_HASHES = (hash_api_key(API_KEY), hash_api_key(OTHER_API_KEY))
ADMIN_HASHES = (hash_api_key(ADMIN_KEY),)


@dataclass
class FakeRequest:
    """Only what the authenticators read: the ASGI scope's header list."""

    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    @property
    def scope(self) -> dict[str, Any]:
        return {"type": "http", "headers": self.headers}


def request(authorization: str | None = None, *others: tuple[bytes, bytes]) -> FakeRequest:
    headers = [*others]
    if authorization is not None:
        headers.append((b"authorization", authorization.encode("latin-1")))
    return FakeRequest(headers)


# ------------------------------------------------------------ hashes


def test_hash_api_key_is_sha256_hex_in_the_configured_format() -> None:
    hashed = hash_api_key(API_KEY)
    assert hashed == "sha256:" + hashlib.sha256(API_KEY.encode()).hexdigest()
    assert KEY_HASH_FORMAT.fullmatch(hashed)
    assert hash_api_key(API_KEY) == hashed
    assert hash_api_key(API_KEY + "x") != hashed


def test_key_matches_returns_the_stored_hash() -> None:
    hashes = [hash_api_key("first-key-0123456789"), hash_api_key("second-key-0123456789")]
    assert key_matches("second-key-0123456789", hashes) == hashes[1]
    assert key_matches("first-key-0123456789", hashes) == hashes[0]
    assert key_matches("wrong-key-0123456789", hashes) is None
    assert key_matches("", hashes) is None
    assert key_matches("first-key-0123456789", []) is None


def test_key_matches_compares_every_entry_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first entry matches, yet every entry is still compared, each with
    hmac.compare_digest: timing reveals neither the match nor its position."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    hashes = [hash_api_key(f"key-number-{i}-0123456789") for i in range(4)]
    assert key_matches("key-number-0-0123456789", hashes) == hashes[0]
    assert len(calls) == 4


def test_a_fingerprint_is_twelve_digits_of_the_hash_and_not_the_key() -> None:
    stored = hash_api_key(API_KEY)
    fingerprint = key_fingerprint(stored)
    assert re.fullmatch(r"[0-9a-f]{12}", fingerprint)
    assert stored.removeprefix("sha256:").startswith(fingerprint)
    assert fingerprint not in API_KEY


# ------------------------------------------------------------ bearer tokens


@pytest.mark.parametrize(
    ("authorization", "token"),
    [
        (f"Bearer {API_KEY}", API_KEY),
        (f"bearer {API_KEY}", API_KEY),  # the scheme is case-insensitive
        (f"Bearer   {API_KEY}  ", API_KEY),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer    ", None),
        (f"Basic {API_KEY}", None),
        (API_KEY, None),
    ],
)
def test_bearer_token(authorization: str | None, token: str | None) -> None:
    assert bearer_token(request(authorization)) == token


def test_bearer_token_reads_the_authorization_header_among_others() -> None:
    fake = request(f"Bearer {API_KEY}", (b"x-session-id", b"s1"), (b"cookie", b"a=b"))
    assert bearer_token(fake) == API_KEY


# ------------------------------------------------------------ API keys


def test_keys_off_lets_every_request_through_without_a_fingerprint() -> None:
    authenticate = Authenticator(())
    assert authenticate(request()) is None
    assert authenticate(request("Bearer anything-at-all")) is None


def test_a_missing_header_is_a_401_without_a_code() -> None:
    with pytest.raises(AuthenticationError, match="didn't provide an API key") as caught:
        Authenticator(API_HASHES)(request())
    assert caught.value.status_code == 401
    assert caught.value.code is None


@pytest.mark.parametrize("authorization", [f"Basic {API_KEY}", API_KEY, "Bearer ", ""])
def test_a_wrong_scheme_or_an_empty_key_is_a_401(authorization: str) -> None:
    with pytest.raises(AuthenticationError, match="didn't provide an API key"):
        Authenticator(API_HASHES)(request(authorization))


def test_a_wrong_key_is_a_401_invalid_api_key() -> None:
    with pytest.raises(AuthenticationError, match="Incorrect API key") as caught:
        Authenticator(API_HASHES)(request("Bearer sk-not-a-configured-key-0000"))
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


def test_the_right_key_gives_its_fingerprint() -> None:
    authenticate = Authenticator(API_HASHES)
    assert authenticate(request(f"Bearer {API_KEY}")) == key_fingerprint(API_HASHES[0])
    assert authenticate(request(f"Bearer {OTHER_API_KEY}")) == key_fingerprint(API_HASHES[1])


def test_an_admin_key_is_not_an_api_key() -> None:
    with pytest.raises(AuthenticationError, match="Incorrect API key"):
        Authenticator(API_HASHES)(request(f"Bearer {ADMIN_KEY}"))


# ------------------------------------------------------------ admin keys


def test_the_admin_api_is_open_only_without_any_key() -> None:
    AdminAuthenticator((), ())(request())
    with pytest.raises(AuthenticationError):
        AdminAuthenticator(API_HASHES, ())(request())
    with pytest.raises(AuthenticationError):
        AdminAuthenticator((), ADMIN_HASHES)(request())


def test_an_admin_key_passes() -> None:
    AdminAuthenticator(API_HASHES, ADMIN_HASHES)(request(f"Bearer {ADMIN_KEY}"))
    AdminAuthenticator((), ADMIN_HASHES)(request(f"bearer {ADMIN_KEY}"))


def test_the_admin_api_without_a_key_is_a_401_naming_the_admin_key() -> None:
    with pytest.raises(AuthenticationError, match="needs an admin key") as caught:
        AdminAuthenticator(API_HASHES, ADMIN_HASHES)(request(f"Basic {ADMIN_KEY}"))
    assert caught.value.code is None


def test_an_api_key_on_the_admin_api_is_a_403() -> None:
    with pytest.raises(PermissionDeniedError, match="may not use the admin API") as caught:
        AdminAuthenticator(API_HASHES, ADMIN_HASHES)(request(f"Bearer {API_KEY}"))
    assert caught.value.status_code == 403


def test_an_unknown_key_on_the_admin_api_is_a_401() -> None:
    with pytest.raises(AuthenticationError, match="Incorrect API key"):
        AdminAuthenticator(API_HASHES, ADMIN_HASHES)(request("Bearer sk-nobody-000000000000"))
