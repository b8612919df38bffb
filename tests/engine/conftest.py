"""Fixtures shared by the engine's tests: each store test runs against SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import pytest

from eventrun.engine.core import Engine
from eventrun.engine.manifest import load_manifest
from eventrun.engine.postgres import PostgresStore
from eventrun.engine.store import SQLiteStore


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    """An open SQLite store in a fresh folder, closed after the test."""
    store = SQLiteStore(tmp_path / "eventrun.db")
    store.open()
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
async def postgres_store(postgres: str) -> AsyncIterator[PostgresStore]:
    """An open PostgreSQL store on a fresh database, closed after the test."""
    store = PostgresStore(postgres, "node-a")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest) -> SQLiteStore | PostgresStore:
    """An open store of each kind in turn: what holds for one must hold for the other."""
    return request.getfixturevalue(f"{request.param}_store")  # type: ignore[no-any-return]


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest) -> str:
    """[store] url for each kind of store in turn: empty for SQLite, a fresh database's for PostgreSQL."""
    return request.getfixturevalue("postgres") if request.param == "postgres" else ""  # type: ignore[no-any-return]


StartEngine = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def start_engine(tmp_path: Path) -> AsyncIterator[StartEngine]:
    """Factory: start_engine(manifest, files={name: text}, paused=False) -> a started Engine.

    Writes the handler files and `manifest` (as eventrun.toml) to tmp_path and starts an engine
    on it; `paused`: its dispatcher starts no run (they stay queued). Every engine started here
    is stopped at teardown, the last one first.
    """
    started: list[Engine] = []

    async def start(manifest: str, files: Mapping[str, str] | None = None, *, paused: bool = False) -> Engine:
        for name, text in (files or {}).items():
            (tmp_path / name).write_text(text)
        (tmp_path / "eventrun.toml").write_text(manifest)
        engine = Engine(load_manifest(tmp_path / "eventrun.toml"))
        if paused:
            engine.dispatcher.pause()  # (a node of a cluster then claims nothing either: no slot is free)
        await engine.start()
        started.append(engine)
        return engine

    try:
        yield start
    finally:
        for engine in reversed(started):
            await engine.stop()


@pytest.fixture
async def idle_engine(start_engine: StartEngine) -> Engine:
    """An engine on its own SQLite store with a function f whose runs never start (they stay queued)."""
    return await start_engine(
        '[server]\ndata_dir = "data"\n\n[functions.f]\nhandler = "noop.py:main_handler"\n',
        {"noop.py": "def main_handler(event, context):\n    return None\n"},
        paused=True,
    )


@pytest.fixture
async def node_x(postgres: str, engine: Engine) -> AsyncIterator[PostgresStore]:
    """Another node's store on the database of the test module's `engine` (joined after it): a
    node whose runs never go anywhere."""
    store = PostgresStore(postgres, "node-x")
    await store.open()
    try:
        yield store
    finally:
        await store.close()
