"""The accounting commands of ``nomoat``: ``migrate``, ``usage`` and
``ledger copy|load``. They talk to the database named by the config's
``[accounting] database`` directly (no gateway needs to run: the ledger is
read and moved where it lives)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime
from pathlib import Path

from sqlalchemy.engine import URL

from gateway.accounting.db import DatabaseUrlError, async_url, migrate, open_engine
from gateway.accounting.transfer import copy_database, load_records, read_spill
from gateway.accounting.usage import (
    GROUPS,
    GroupBy,
    UsageGroup,
    UsageQueryError,
    parse_group,
    parse_time,
    report,
    table,
    usage_by,
)
from gateway.settings import ConfigError, load_settings
from gateway.wire import encoder


def _database(config: Path | None, command: str) -> URL | None:
    try:
        return async_url(load_settings(config).accounting.database)
    except ConfigError as error:
        print(f"nomoat: configuration error:\n{error}", file=sys.stderr)
    except DatabaseUrlError as error:
        print(f"nomoat {command}: {error}", file=sys.stderr)
    return None


def _shown(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def migrate_command(args: argparse.Namespace) -> int:
    url = _database(args.config, "migrate")
    if url is None:
        return 2
    try:
        migrate(url)
    except Exception as error:
        print(f"nomoat migrate: {_shown(url)}: {error}", file=sys.stderr)
        return 1
    print(f"nomoat migrate: {_shown(url)} is at the latest schema")
    return 0


async def _query(
    url: URL, group_by: GroupBy, since: datetime | None, until: datetime | None
) -> list[UsageGroup]:
    engine = open_engine(url)
    try:
        return await usage_by(engine, group_by, since, until)
    finally:
        await engine.dispose()


def usage_command(args: argparse.Namespace) -> int:
    url = _database(args.config, "usage")
    if url is None:
        return 2
    try:
        group_by = parse_group(args.group_by)
        since, until = parse_time(args.since, "since"), parse_time(args.until, "until")
        data = asyncio.run(_query(url, group_by, since, until))
    except UsageQueryError as error:
        print(f"nomoat usage: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        print(f"nomoat usage: {_shown(url)}: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(encoder.encode(report(group_by, since, until, data)).decode())
    else:
        print(table(data, group_by))
    return 0


def copy_command(args: argparse.Namespace) -> int:
    source = async_url(args.source) if args.source else _database(args.config, "ledger copy")
    if source is None:
        return 2
    try:
        target = async_url(args.to)
        copied = asyncio.run(copy_database(source, target))
    except DatabaseUrlError as error:
        print(f"nomoat ledger copy: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        print(f"nomoat ledger copy: {error}", file=sys.stderr)
        return 1
    print(f"nomoat ledger copy: {_shown(source)} -> {_shown(target)}")
    for item in copied.tables:
        print(
            f"  {item.table:<11} {item.source_rows:>9} in the source, "
            f"{item.written:>9} written, {item.target_rows:>9} in the target"
        )
    if not copied.complete:
        print("nomoat ledger copy: the target holds fewer rows than the source", file=sys.stderr)
        return 1
    return 0


def load_command(args: argparse.Namespace) -> int:
    url = _database(args.config, "ledger load")
    if url is None:
        return 2
    try:
        count = asyncio.run(load_records(read_spill(args.file), url))
    except Exception as error:
        print(f"nomoat ledger load: {error}", file=sys.stderr)
        return 1
    print(f"nomoat ledger load: {count} records from {args.file} are in {_shown(url)}")
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``migrate``, ``usage`` and ``ledger`` on the ``nomoat`` parser."""
    migrating = commands.add_parser(
        "migrate", help="bring the accounting database to the latest schema"
    )
    migrating.add_argument("--config", type=Path, help="TOML file ([accounting] database)")
    migrating.set_defaults(handler=migrate_command)

    summing = commands.add_parser("usage", help="the ledger summed per key, team, model, ...")
    summing.add_argument("--config", type=Path, help="TOML file ([accounting] database)")
    summing.add_argument("--group-by", default="model", choices=GROUPS)
    summing.add_argument("--since", help="ISO 8601 date or time (UTC), or Unix seconds")
    summing.add_argument("--until", help="ISO 8601 date or time (UTC), or Unix seconds; excluded")
    summing.add_argument("--json", action="store_true", help="JSON, as GET /admin/usage")
    summing.set_defaults(handler=usage_command)

    ledger = commands.add_parser("ledger", help="move the accounting data")
    actions = ledger.add_subparsers(dest="action", required=True)
    copying = actions.add_parser(
        "copy", help="copy every record to another database (e.g. SQLite -> PostgreSQL)"
    )
    copying.add_argument("--to", required=True, help="postgresql://... or sqlite:///PATH")
    copying.add_argument("--config", type=Path, help="TOML file: its database is the source")
    copying.add_argument("--from", dest="source", help="the source database URL instead")
    copying.set_defaults(handler=copy_command)
    loading = actions.add_parser("load", help="write records spilled at shutdown")
    loading.add_argument("file", type=Path, help="a ledger-unwritten.jsonl file")
    loading.add_argument("--config", type=Path, help="TOML file ([accounting] database)")
    loading.set_defaults(handler=load_command)
