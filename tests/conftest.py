"""Shared fixtures: a real `eventrun serve` process per test, an HTTP client, and polling."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from postgres_service import postgres, postgres_link, postgres_server  # noqa: F401  (fixtures: a real PostgreSQL)
from server_process import ServerProcess, handler, pid_alive, poll_until


@pytest.fixture
def server_store(request: pytest.FixtureRequest) -> dict[str, dict[str, Any]]:
    """The store tables of the servers a test starts: none (SQLite in data_dir) unless a module
    parametrizes this fixture (indirect) with "postgres": then a fresh PostgreSQL database, and
    a fixed node id, so a restarted server is the same node (as a restarted single server is)."""
    if getattr(request, "param", "sqlite") == "postgres":
        return {"store": {"url": request.getfixturevalue("postgres")}, "cluster": {"node_id": "node-1"}}
    return {}


@pytest.fixture
def eventrun_server(tmp_path: Path, server_store: dict[str, dict[str, Any]]) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: eventrun_server(functions, server=..., extra=..., start=True) -> a ServerProcess.

    `functions` maps names to function tables (use `handler("quick")` for the handler);
    every server started here is stopped, and its process group reaped, at teardown.
    """
    servers: list[ServerProcess] = []

    def make(
        functions: Mapping[str, Mapping[str, Any]],
        *,
        server: Mapping[str, Any] | None = None,
        extra: Mapping[str, Mapping[str, Any]] | None = None,
        start: bool = True,
    ) -> ServerProcess:
        folder = tmp_path / f"server{len(servers)}"
        folder.mkdir()
        process = ServerProcess(folder, functions, server=server, extra={**server_store, **(extra or {})})
        servers.append(process)
        return process.start() if start else process

    yield make
    for process in servers:
        process.close()


@pytest.fixture
def no_eventrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No EVENTRUN_* variable of the calling environment reaches the test's manifests."""
    for key in list(os.environ):
        if key.startswith("EVENTRUN_"):
            monkeypatch.delenv(key)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp session with a generous overall timeout per request."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture(name="poll_until")
def poll_until_fixture() -> Callable[..., Awaitable[Any]]:
    """`await poll_until(fn, timeout, message)`: fn (sync or async) until truthy, else fail."""
    return poll_until


@pytest.fixture(name="handler")
def handler_fixture() -> Callable[..., str]:
    """`handler("quick")`: the manifest handler value of tests/e2e/handlers/quick.py."""
    return handler


@pytest.fixture(name="pid_alive")
def pid_alive_fixture() -> Callable[[int], bool]:
    """`pid_alive(pid)`: whether that process still runs."""
    return pid_alive
