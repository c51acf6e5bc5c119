"""The admin API of managed keys and teams (admin keys only, as the rest of
``/admin``; see :mod:`gateway.admin`).

``POST /admin/keys`` answers 201 with the key itself in ``key``: the only
time it is shown (it is stored hashed). ``DELETE /admin/keys/{id}`` revokes
the key: every replica refuses it within ``[accounting]
key_refresh_seconds`` (0.5 s by default), and this one at once.
``DELETE /admin/teams/{id}`` is refused while a key of the team is live.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from litestar import Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import FromPath
from litestar.types import ControllerRouterHandler

from gateway import wire
from gateway.accounting.forms import (
    ListOf,
    created_key,
    decode_form,
    key_form_decoder,
    key_info,
    new_key,
    new_team,
    team_form_decoder,
    team_info,
)
from gateway.accounting.keys import ManagedKeys
from gateway.accounting.store import KeyStore
from gateway.auth import AdminAuthenticator
from gateway.errors import NotFoundError

AnyRequest = Request[Any, Any, State]
JSON = "application/json"
T = TypeVar("T")


def _respond(payload: object, status: int = 200) -> Response[bytes]:
    return Response(wire.encoder.encode(payload), status_code=status, media_type=JSON)


def _found(record: T | None, missing: str) -> T:
    if record is None:
        raise NotFoundError(missing, param="id", code="not_found")
    return record


def build_key_handlers(
    managed: Callable[[], ManagedKeys | None], authenticate: AdminAuthenticator
) -> list[ControllerRouterHandler]:
    """``managed`` is called per request: the keys exist once started (None:
    accounting is off, and these paths answer 404 saying so)."""

    def keys() -> ManagedKeys:
        found = managed()
        if found is None:
            raise NotFoundError(
                "Managed keys need accounting: set [accounting] enabled = true.",
                code="accounting_disabled",
            )
        return found

    async def changed(work: Callable[[KeyStore], Awaitable[T]]) -> T:
        """``work`` done on the store, and seen by this replica at once
        (the others see it within their next poll)."""
        cache = keys()
        done = await work(cache.store)
        await cache.refresh()
        return done

    @post("/admin/keys", status_code=201)
    async def create_key(request: AnyRequest) -> Response[bytes]:
        authenticate(request)
        form = decode_form(key_form_decoder, await request.body(), "key")
        record, secret = await changed(lambda store: store.create_key(new_key(form)))
        return _respond(created_key(record, secret), 201)

    @get("/admin/keys")
    async def list_keys(request: AnyRequest) -> Response[bytes]:
        authenticate(request)
        records = await keys().store.keys()
        return _respond(ListOf(object="list", data=[key_info(k) for k in records]))

    @get("/admin/keys/{key_id:str}")
    async def get_key(request: AnyRequest, key_id: FromPath[str]) -> Response[bytes]:
        authenticate(request)
        record = _found(await keys().store.key(key_id), f"No API key `{key_id}`.")
        return _respond(key_info(record))

    @delete("/admin/keys/{key_id:str}", status_code=200)
    async def revoke_key(request: AnyRequest, key_id: FromPath[str]) -> Response[bytes]:
        authenticate(request)
        record = await changed(lambda store: store.revoke_key(key_id))
        return _respond(wire.Deleted(id=record.id, object="api_key", deleted=True))

    @post("/admin/teams", status_code=201)
    async def create_team(request: AnyRequest) -> Response[bytes]:
        authenticate(request)
        form = decode_form(team_form_decoder, await request.body(), "team")
        team = await changed(lambda store: store.create_team(new_team(form)))
        return _respond(team_info(team), 201)

    @get("/admin/teams")
    async def list_teams(request: AnyRequest) -> Response[bytes]:
        authenticate(request)
        teams = await keys().store.teams()
        return _respond(ListOf(object="list", data=[team_info(t) for t in teams]))

    @get("/admin/teams/{team_id:str}")
    async def get_team(request: AnyRequest, team_id: FromPath[str]) -> Response[bytes]:
        authenticate(request)
        team = _found(await keys().store.team(team_id), f"No team `{team_id}`.")
        return _respond(team_info(team))

    @delete("/admin/teams/{team_id:str}", status_code=200)
    async def delete_team(request: AnyRequest, team_id: FromPath[str]) -> Response[bytes]:
        authenticate(request)
        team = await changed(lambda store: store.delete_team(team_id))
        return _respond(wire.Deleted(id=team.id, object="team", deleted=True))

    return [
        create_key,
        list_keys,
        get_key,
        revoke_key,
        create_team,
        list_teams,
        get_team,
        delete_team,
    ]
