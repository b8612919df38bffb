"""Fixtures shared by the engine's tests: each store test runs against SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

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


@pytest.fixture
async def idle_engine(tmp_path: Path) -> AsyncIterator[Engine]:
    """An engine on its own SQLite store with a function f whose runs never start (they stay queued)."""
    (tmp_path / "noop.py").write_text("def main_handler(event, context):\n    return None\n")
    (tmp_path / "eventrun.toml").write_text('[server]\ndata_dir = "data"\n\n[functions.f]\nhandler = "noop.py:main_handler"\n')
    engine = Engine(load_manifest(tmp_path / "eventrun.toml"))
    engine.dispatcher.pause()
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()
