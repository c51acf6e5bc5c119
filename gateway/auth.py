"""Authentication: API keys and admin keys, in one place.

Keys are never stored. The config holds ``sha256:<hex>`` hashes (printed by
``nomoat hash-key``); a presented key is hashed and compared with every stored
hash in constant time, and the request is then known by its key's fingerprint
(the first 12 hex digits of the hash), which is not a secret and may be logged.

Once any key is configured, every ``/v1`` request needs one of
``server.api_key_hashes``, and the admin API needs one of
``server.admin_key_hashes`` (an ordinary API key gets a 403). With no keys at
all (loopback development) both are open; but a gateway that listens beyond
loopback without keys (``allow_unauthenticated_network``) keeps its admin
API closed: opening the models to a network must not also hand it the
power to register and remove adapters. ``/metrics`` needs any key of either
list when ``server.metrics_requires_key`` is set.

The authenticators read only the request's ASGI scope: the header list as the
server gave it (names in lowercase), without building Litestar's header mapping.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from litestar.types import Scope

from gateway.accounting.principal import Principal
from gateway.errors import AuthenticationError, PermissionDeniedError

KEY_HASH_PREFIX = "sha256:"
# Sent by a gateway to its edge nodes with each request: the fingerprint of
# the client's key, so the node keeps its tenants apart (prompt cache, fair
# queue) though they all arrive with the gateway's one key. Trusted only by
# engines told to (``nomoat edge``); the gateway never forwards a client's.
TENANT_HEADER = "x-nomoat-tenant"
_TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Exactly what hash_api_key produces: lowercase hex, so a stored hash can match.
KEY_HASH_FORMAT = re.compile(r"sha256:[0-9a-f]{64}")
FINGERPRINT_DIGITS = 12


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the server to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hash_api_key(key: str) -> str:
    return KEY_HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def key_fingerprint(stored_hash: str) -> str:
    """A short, non-secret id for a key: the first 12 digits of its hash."""
    return stored_hash.removeprefix(KEY_HASH_PREFIX)[:FINGERPRINT_DIGITS]


def key_matches(presented: str, hashes: Iterable[str]) -> str | None:
    """The matching stored hash, compared in constant time, or None."""
    return hash_matches(hash_api_key(presented), hashes)


def hash_matches(presented_hash: str, hashes: Iterable[str]) -> str | None:
    """The stored hash equal to ``presented_hash`` (compared in constant time), or None."""
    candidate = presented_hash.encode()
    found = None
    for stored in hashes:
        # Compare against every entry, so timing does not reveal which matched.
        if hmac.compare_digest(candidate, stored.encode()):
            found = stored
    return found


def tenant_of(key_id: str | None, headers: Mapping[str, str]) -> str:
    """Whose request this is, for an engine that trusts ``TENANT_HEADER``:
    the key it came with and the tenant its gateway named (a malformed
    tenant is ignored)."""
    tenant = headers.get(TENANT_HEADER, "")
    owner = key_id or ""
    return f"{owner}/{tenant}" if _TENANT.fullmatch(tenant) else owner


class HasScope(Protocol):
    """What the authenticators read of a request (Litestar's ``Request`` has it)."""

    @property
    def scope(self) -> Scope: ...


def bearer_token(request: HasScope) -> str | None:
    """The key of ``Authorization: Bearer KEY`` (the first such header), or
    None when the header is missing, empty or of another scheme."""
    for name, value in request.scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


class Authenticator:
    """The OpenAI endpoints (and ``/status``): any configured API key."""

    def __init__(self, api_key_hashes: tuple[str, ...]) -> None:
        self._hashes = api_key_hashes

    def __call__(self, request: HasScope) -> str | None:
        """The key's fingerprint, None if keys are off; raises 401 otherwise."""
        if not self._hashes:
            return None
        token = bearer_token(request)
        if token is None:
            raise AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                code=None,
            )
        matched = key_matches(token, self._hashes)
        if matched is None:
            raise AuthenticationError("Incorrect API key provided.")
        return key_fingerprint(matched)


class AdminAuthenticator:
    """The admin API: an admin key once any key exists; open with none, if
    the server listens on loopback only (``network``: it does not).

    No key or an unknown one is a 401; a valid API key (static or managed)
    that is not an admin key is a 403 (it is known, but may not do this),
    and so is every call while the admin API is closed. Managed keys count
    as keys: once one exists, an admin API that was open closes (else any
    local client could mint itself a key), and ``nomoat keys`` remains.
    """

    def __init__(
        self,
        api_key_hashes: tuple[str, ...],
        admin_key_hashes: tuple[str, ...],
        *,
        network: bool = False,
        managed: Callable[[], ManagedKeyLookup | None] = lambda: None,
    ) -> None:
        no_keys = not api_key_hashes and not admin_key_hashes
        self._open = no_keys and not network
        self._closed = no_keys and network
        self._admin = admin_key_hashes
        self._api = api_key_hashes
        self._managed = managed

    def __call__(self, request: HasScope) -> None:
        managed = self._managed()
        if self._open:
            if managed is None or not managed.exist:
                return
            raise PermissionDeniedError(
                "The admin API is closed: managed API keys exist and no admin key is "
                "configured. Configure server.admin_key_hashes to use it (or manage keys "
                "with `nomoat keys`)."
            )
        if self._closed:
            raise PermissionDeniedError(
                "The admin API is closed: this server listens beyond loopback without keys. "
                "Configure server.admin_key_hashes to use it."
            )
        token = bearer_token(request)
        if token is None:
            raise AuthenticationError(
                "The admin API needs an admin key: send 'Authorization: Bearer ADMIN_KEY'.",
                code=None,
            )
        presented = hash_api_key(token)
        if hash_matches(presented, self._admin) is not None:
            return
        known = hash_matches(presented, self._api) is not None or (
            managed is not None and managed.lookup(presented) is not None
        )
        if known:
            raise PermissionDeniedError("This key may not use the admin API.")
        raise AuthenticationError("Incorrect API key provided.")


class ManagedKeyLookup(Protocol):
    """Managed keys as the authenticator reads them
    (:class:`gateway.accounting.keys.ManagedKeys`)."""

    @property
    def exist(self) -> bool:
        """Whether any managed key was ever created."""
        ...

    def lookup(self, key_hash: str) -> Principal | None:
        """The key's principal; None for no managed key; raises 401 for a
        revoked or expired one."""
        ...


class PrincipalAuthenticator:
    """The OpenAI endpoints (and ``/status``): a static key of
    ``server.api_key_hashes`` or a managed key (``/admin/keys``, ``nomoat
    keys``), as the :class:`Principal` the limits, budgets and ledger read.

    Open (no key needed) only while there is no static key and no managed
    key was ever created. ``managed`` is called per request: the managed
    keys exist once the server has started (None: accounting is off).

    A managed key is found by its hash in a dict: the lookup's timing can
    only tell about the hash of the presented key, which gives nothing away
    about any stored key.
    """

    def __init__(
        self,
        api_key_hashes: tuple[str, ...],
        managed: Callable[[], ManagedKeyLookup | None] = lambda: None,
        static: Mapping[str, Principal] | None = None,
    ) -> None:
        self._hashes = api_key_hashes
        # A static key's principal: as ``static`` has it by fingerprint (its
        # limits and budget, [[accounting.static_keys]]), else its id alone.
        given = static or {}
        self._static = {
            stored: given.get(key_fingerprint(stored)) or Principal(key_fingerprint(stored))
            for stored in api_key_hashes
        }
        self._managed = managed

    def principal(self, request: HasScope) -> Principal | None:
        """Who is asking; None if keys are off; raises 401 otherwise."""
        managed = self._managed()
        if not self._hashes and (managed is None or not managed.exist):
            return None
        token = bearer_token(request)
        if token is None:
            raise AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                code=None,
            )
        presented = hash_api_key(token)
        matched = hash_matches(presented, self._hashes)
        if matched is not None:
            return self._static[matched]
        found = managed.lookup(presented) if managed is not None else None
        if found is None:
            raise AuthenticationError("Incorrect API key provided.")
        return found

    def __call__(self, request: HasScope) -> str | None:
        """The key's id (a managed key's id, a static key's fingerprint), as
        :class:`Authenticator` gives it."""
        principal = self.principal(request)
        return None if principal is None else principal.key_id
