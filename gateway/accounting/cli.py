"""``nomoat keys create|list|revoke`` and ``nomoat teams create|list|delete``.

They write the accounting database named by the config's ``[accounting]``
directly, not through a gateway's admin API: they work before any gateway
runs (the first key of a new deployment, a Helm hook), need no admin key in
the environment, and every running gateway sees the change within
``key_refresh_seconds`` through the same poll that carries a change made
on another replica. Pending migrations are applied first when
``migrate_on_start`` is set, as a gateway would at start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec

from gateway.accounting.db import DatabaseUrlError, async_url, migrate, open_engine
from gateway.accounting.forms import (
    KeyForm,
    KeyInfo,
    TeamForm,
    TeamInfo,
    created_key,
    key_info,
    new_key,
    new_team,
    team_info,
)
from gateway.accounting.store import KeyStore
from gateway.errors import GatewayError
from gateway.settings import ConfigError, load_settings

T = TypeVar("T")
# A record as stored, and as shown (its info).
Record = TypeVar("Record")
Info = TypeVar("Info")


class _Named(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...


Named = TypeVar("Named", bound=_Named)
Handler = Callable[[argparse.Namespace], int]
_PERIODS = ("day", "month", "total")


def _with_store(
    args: argparse.Namespace, work: Callable[[KeyStore], Awaitable[T]]
) -> tuple[T | None, int]:
    """``work`` run on the config's accounting database; (result, exit code)."""
    try:
        settings = load_settings(args.config).accounting
        if not settings.enabled:
            raise ConfigError(["accounting.enabled is false: managed keys need accounting"])
        url = async_url(settings.database)
        if settings.migrate_on_start:
            migrate(url)
    except (ConfigError, DatabaseUrlError) as error:
        print(f"nomoat: configuration error:\n{error}", file=sys.stderr)
        return None, 2

    async def run() -> T:
        engine = open_engine(url)
        try:
            return await work(KeyStore(engine))
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run()), 0
    except GatewayError as error:
        print(f"nomoat {args.command} {args.action}: {error.message}", file=sys.stderr)
        return None, 1


def _form(kind: type[T], fields: dict[str, Any]) -> T:
    present = {name: value for name, value in fields.items() if value is not None}
    try:
        return msgspec.convert(present, kind, strict=False)
    except msgspec.ValidationError as error:
        raise ValueError(str(error)) from None


def _print_json(payload: object) -> None:
    print(json.dumps(msgspec.to_builtins(payload), indent=2))


def _when(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M")


def _budget(usd: float | None, period: str | None) -> str:
    return "-" if usd is None else f"${usd:g}/{period}"


def keys_table(keys: list[KeyInfo]) -> str:
    lines = [
        f"{'id':<28} {'name':<20} {'team':<29} {'models':<24} {'budget':<14} "
        f"{'rpm':>6} {'tpm':>8} {'expires':<16} status"
    ]
    for key in keys:
        status = "revoked" if key.revoked_at is not None else "live"
        models = ",".join(key.models) if key.models is not None else "*"
        lines.append(
            f"{key.id:<28} {key.name:<20} {key.team or '-':<29} {models:<24} "
            f"{_budget(key.budget_usd, key.budget_period):<14} {key.rpm or '-':>6} "
            f"{key.tpm or '-':>8} {_when(key.expires_at):<16} {status}"
        )
    return "\n".join(lines)


def teams_table(teams: list[TeamInfo]) -> str:
    lines = [f"{'id':<29} {'name':<24} {'budget':<14} {'rpm':>6} {'tpm':>8}"]
    for team in teams:
        lines.append(
            f"{team.id:<29} {team.name:<24} {_budget(team.budget_usd, team.budget_period):<14} "
            f"{team.rpm or '-':>6} {team.tpm or '-':>8}"
        )
    return "\n".join(lines)


def create_key(args: argparse.Namespace) -> int:
    fields = {
        "name": args.name,
        "team": args.team,
        "models": args.model or None,
        "budget_usd": args.budget_usd,
        "budget_period": args.budget_period,
        "rpm": args.rpm,
        "tpm": args.tpm,
        "expires_at": args.expires_at,
    }
    wanted = _wanted(args, lambda: new_key(_form(KeyForm, fields)))
    if wanted is None:
        return 2
    made, code = _with_store(args, lambda store: store.create_key(wanted))
    if made is None:
        return code
    record, secret = made
    if args.json:
        _print_json(created_key(record, secret))
        return 0
    print(f"created {record.id} ({record.name})")
    print(f"key: {secret}")
    print("This is the only time the key is shown: keep it now.")
    return 0


def list_keys(args: argparse.Namespace) -> int:
    return _listed(args, lambda store: store.keys(revoked=args.all), key_info, keys_table)


def revoke_key(args: argparse.Namespace) -> int:
    return _removed(args, lambda store: store.revoke_key(args.id), "revoked")


def create_team(args: argparse.Namespace) -> int:
    fields = {
        "name": args.name,
        "budget_usd": args.budget_usd,
        "budget_period": args.budget_period,
        "rpm": args.rpm,
        "tpm": args.tpm,
    }
    wanted = _wanted(args, lambda: new_team(_form(TeamForm, fields)))
    if wanted is None:
        return 2
    team, code = _with_store(args, lambda store: store.create_team(wanted))
    if team is None:
        return code
    if args.json:
        _print_json(team_info(team))
    else:
        print(f"created {team.id} ({team.name})")
    return 0


def list_teams(args: argparse.Namespace) -> int:
    return _listed(args, lambda store: store.teams(), team_info, teams_table)


def delete_team(args: argparse.Namespace) -> int:
    return _removed(args, lambda store: store.delete_team(args.id), "deleted")


def _wanted(args: argparse.Namespace, build: Callable[[], T]) -> T | None:
    """What ``keys create`` or ``teams create`` asks for, or None (said why)."""
    try:
        return build()
    except (ValueError, GatewayError) as error:
        print(f"nomoat {args.command} {args.action}: {_message(error)}", file=sys.stderr)
        return None


def _listed(
    args: argparse.Namespace,
    fetch: Callable[[KeyStore], Awaitable[list[Record]]],
    info: Callable[[Record], Info],
    table: Callable[[list[Info]], str],
) -> int:
    """``keys list`` and ``teams list``: each record's info, as JSON or a table."""
    records, code = _with_store(args, fetch)
    if records is None:
        return code
    infos = [info(record) for record in records]
    if args.json:
        _print_json(infos)
    else:
        print(table(infos))
    return 0


def _removed(
    args: argparse.Namespace, work: Callable[[KeyStore], Awaitable[Named]], done: str
) -> int:
    """``keys revoke`` and ``teams delete``: what was ``done`` to which."""
    record, code = _with_store(args, work)
    if record is None:
        return code
    print(f"{done} {record.id} ({record.name})")
    return 0


def _message(error: Exception) -> str:
    return error.message if isinstance(error, GatewayError) else str(error)


def _common(command: argparse.ArgumentParser, handler: Handler, *, json_output: bool) -> None:
    command.add_argument("--config", type=Path, help="TOML file (its [accounting] database)")
    if json_output:
        command.add_argument("--json", action="store_true", help="print JSON")
    command.set_defaults(handler=handler)


def _limits(command: argparse.ArgumentParser) -> None:
    command.add_argument("--budget-usd", type=float, help="the budget, in USD")
    command.add_argument(
        "--budget-period", choices=_PERIODS, help="when the budget resets (default: total)"
    )
    command.add_argument("--rpm", type=int, help="requests per minute")
    command.add_argument("--tpm", type=int, help="tokens per minute")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``nomoat keys ...`` and ``nomoat teams ...`` on the CLI's subcommands."""
    keys = commands.add_parser("keys", help="managed API keys: create, list, revoke")
    key_commands = keys.add_subparsers(dest="action", required=True)
    make = key_commands.add_parser("create", help="create a key (shown once)")
    make.add_argument("--name", required=True)
    make.add_argument("--team", help="the team's id or name")
    make.add_argument(
        "--model", action="append", help="a model the key may use (repeatable; default: all)"
    )
    _limits(make)
    make.add_argument("--expires-at", help="RFC 3339 time or Unix seconds (default: never)")
    _common(make, create_key, json_output=True)
    listing = key_commands.add_parser("list", help="list keys")
    listing.add_argument("--all", action="store_true", help="revoked keys too")
    _common(listing, list_keys, json_output=True)
    revoke = key_commands.add_parser("revoke", help="revoke a key (every replica within 1 s)")
    revoke.add_argument("id")
    _common(revoke, revoke_key, json_output=False)

    teams = commands.add_parser("teams", help="teams: create, list, delete")
    team_commands = teams.add_subparsers(dest="action", required=True)
    make_team = team_commands.add_parser("create", help="create a team")
    make_team.add_argument("--name", required=True)
    _limits(make_team)
    _common(make_team, create_team, json_output=True)
    _common(team_commands.add_parser("list", help="list teams"), list_teams, json_output=True)
    drop = team_commands.add_parser("delete", help="delete a team with no live key")
    drop.add_argument("id")
    _common(drop, delete_team, json_output=False)
