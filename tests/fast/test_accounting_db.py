"""The accounting database seam: URLs and the migrations on SQLite."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.accounting.db import DatabaseUrlError, async_url, default_database_path, migrate

TABLES = {"teams", "api_keys", "usage", "node_costs", "responses"}


def test_an_empty_setting_is_sqlite_in_the_data_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_database_path() == tmp_path / "nomoat" / "accounting.db"
    url = async_url("")
    assert url.drivername == "sqlite+aiosqlite"
    assert url.database == str(tmp_path / "nomoat" / "accounting.db")


def test_user_urls_get_their_async_driver() -> None:
    assert async_url("sqlite:////var/x.db").drivername == "sqlite+aiosqlite"
    pg = async_url("postgresql://u:p%40ss@127.0.0.1:5432/db")
    assert pg.drivername == "postgresql+asyncpg"
    assert pg.password == "p@ss"


@pytest.mark.parametrize("setting", ["mysql://h/db", "not a url at all"])
def test_unsupported_databases_are_refused_with_what_to_write(setting: str) -> None:
    with pytest.raises(DatabaseUrlError, match=r"accounting\.database"):
        async_url(setting)


def test_migrations_create_the_schema_on_sqlite_and_are_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "ledger.db"
    url = async_url(f"sqlite:///{path}")
    migrate(url)
    migrate(url)  # a second start finds nothing to do
    with sqlite3.connect(path) as connection:
        names = {row[0] for row in connection.execute("select name from sqlite_master")}
        (version,) = connection.execute("select version_num from alembic_version").fetchone()
    assert names >= TABLES
    assert version == "0003_responses_bounds"
