"""Real PostgreSQL and Redis servers for the tests, one of each per run.

`.ci/run` installs them (Debian's postgresql-15 and redis-server); each is
started here on a free loopback port with its data in a temporary directory,
and stopped at the end of the run. ``NOMOAT_TEST_POSTGRES`` /
``NOMOAT_TEST_REDIS`` name running servers to use instead.

PostgreSQL refuses to run as root: as root, its commands run as the
``postgres`` user that Debian's package creates.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PG_BIN_DIRS = (Path("/usr/lib/postgresql/15/bin"), Path("/usr/lib/postgresql/16/bin"))
START_SECONDS = 30


class ServiceMissingError(RuntimeError):
    """A server binary is not installed (`.ci/run` installs it)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pg_bin(name: str) -> str:
    for directory in PG_BIN_DIRS:
        if (directory / name).exists():
            return str(directory / name)
    found = shutil.which(name)
    if found is None:
        raise ServiceMissingError(f"PostgreSQL's {name} is not installed")
    return found


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {START_SECONDS} s")


@contextmanager
def _serving(command: list[str], port: int, log_path: Path, what: str) -> Iterator[None]:
    """``command`` running, its output in ``log_path``, once it listens on
    ``port``; stopped (killed if it does not stop) when the block ends."""
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for_port(port, server, what)
            yield
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@contextmanager
def running_postgres(root: Path) -> Iterator[str]:
    """A PostgreSQL cluster on loopback; yields ``postgresql://...`` of its
    ``postgres`` database (tests make their own with :func:`fresh_database`)."""
    given = os.environ.get("NOMOAT_TEST_POSTGRES")
    if given:
        yield given
        return
    if os.geteuid() == 0:
        # pytest's temporary directories are private to root: the postgres
        # user gets its own directory, removed at the end.
        root = Path(tempfile.mkdtemp(prefix="nomoat-pg-"))
        shutil.chown(root, "postgres")
    data = root / "pgdata"
    data.mkdir(parents=True)
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
    subprocess.run(
        _as_postgres(
            [_pg_bin("initdb"), "-D", str(data), "-U", "nomoat", "--auth=trust", "-E", "UTF8"]
        ),
        check=True,
        capture_output=True,
    )
    port = _free_port()
    command = _as_postgres(
        [
            _pg_bin("postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "-k",
            str(root),
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ]
    )
    try:
        with _serving(command, port, root / "postgres.log", "postgres"):
            yield f"postgresql://nomoat@127.0.0.1:{port}/postgres"
    finally:
        if os.geteuid() == 0:
            shutil.rmtree(root, ignore_errors=True)


def fresh_database(admin_url: str) -> str:
    """A new, empty database on the cluster of ``admin_url``; its URL."""
    import asyncio

    import asyncpg  # type: ignore[import-untyped]

    name = "t_" + uuid.uuid4().hex[:12]

    async def create() -> None:
        connection = await asyncpg.connect(admin_url)
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()

    asyncio.run(create())
    return admin_url.rsplit("/", 1)[0] + "/" + name


@contextmanager
def running_redis(root: Path) -> Iterator[str]:
    """A Redis server on loopback, without persistence; yields ``redis://...``."""
    given = os.environ.get("NOMOAT_TEST_REDIS")
    if given:
        yield given
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceMissingError("redis-server is not installed")
    port = _free_port()
    root.mkdir(parents=True, exist_ok=True)
    command = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(root),
    ]
    with _serving(command, port, root / "redis.log", "redis-server"):
        yield f"redis://127.0.0.1:{port}/0"
