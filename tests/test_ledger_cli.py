"""``nomoat migrate``, ``nomoat usage`` and ``nomoat ledger load`` on a real
SQLite database (fast: no server, the CLI's ``main`` in this process)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from conftest import Cli

from gateway.accounting.db import async_url, open_engine
from gateway.accounting.ledger import Ledger, LedgerOptions, UsageRecord, encode_record
from gateway.exchange import Exchange


def write_config(tmp_path: Path) -> tuple[Path, str]:
    database = f"sqlite:///{tmp_path / 'ledger.db'}"
    config = tmp_path / "nomoat.toml"
    config.write_text(f'[accounting]\ndatabase = "{database}"\n')
    return config, database


def record(index: int, model: str) -> UsageRecord:
    exchange = Exchange(f"chatcmpl-{index}", "chat", 0.0, path="/v1/chat/completions")
    exchange.model, exchange.key_id = model, f"key-{index % 2}"
    exchange.charged_nano = 1_500_000_000  # 1.5 USD
    return UsageRecord.of(exchange, 200, None, now=0.25)


async def fill(database: str, records: list[UsageRecord]) -> None:
    engine = open_engine(async_url(database))
    ledger = Ledger(engine, LedgerOptions())
    for item in records:
        ledger.record(item)
    await ledger.flush()
    await engine.dispose()


def test_migrate_then_usage_as_a_table_and_as_json(tmp_path: Path, cli: Cli) -> None:
    config, database = write_config(tmp_path)
    migrated = cli("migrate", "--config", str(config))
    assert migrated.returncode == 0, migrated.stderr
    assert "latest schema" in migrated.stdout
    asyncio.run(fill(database, [record(i, "small" if i < 3 else "large") for i in range(5)]))
    shown = cli("usage", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    header, *lines = shown.stdout.splitlines()
    assert header.split() == [
        "model", "requests", "prompt", "cached", "completion", "cost_usd", "compute_usd"
    ]  # fmt: skip
    assert [line.split()[:2] for line in lines] == [["large", "2"], ["small", "3"]]
    assert lines[1].split()[5] == "4.500000"
    as_json = cli("usage", "--config", str(config), "--group-by", "key", "--json")
    report = json.loads(as_json.stdout)
    assert report["group_by"] == "key"
    assert {g["group"]: g["requests"] for g in report["data"]} == {"key-0": 3, "key-1": 2}
    assert sum(g["cost_usd"] for g in report["data"]) == 7.5


def test_usage_refuses_a_bad_window_or_group(tmp_path: Path, cli: Cli) -> None:
    config, _ = write_config(tmp_path)
    cli("migrate", "--config", str(config))
    bad = cli("usage", "--config", str(config), "--since", "last tuesday")
    assert bad.returncode == 2 and "since" in bad.stderr


def test_spilled_records_are_loaded_once(tmp_path: Path, cli: Cli) -> None:
    config, _ = write_config(tmp_path)
    cli("migrate", "--config", str(config))
    spill = tmp_path / "ledger-unwritten.jsonl"
    spill.write_bytes(b"".join(encode_record(record(i, "m")) + b"\n" for i in range(4)))
    for _ in range(2):  # loading twice counts each record once
        loaded = cli("ledger", "load", str(spill), "--config", str(config))
        assert loaded.returncode == 0, loaded.stderr
    report = json.loads(cli("usage", "--config", str(config), "--json").stdout)
    assert [g["requests"] for g in report["data"]] == [4]
