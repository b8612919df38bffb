"""The HTTP gateway reads a RequestId in any case: RequestIds are UUIDs, and a UUID is case-blind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from eventrun.engine.api import Accepted, Invocation, Status
from eventrun.engine.errors import InvocationNotFound
from eventrun.engine.manifest import Manifest
from eventrun.triggers.http import build_app

REQUEST_ID = "0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b"


class OneRunEngine:
    """The engine's read and act methods for a single stored run, named in lower case as stores
    name it; every other RequestId is unknown."""

    def __init__(self) -> None:
        self.manifest = Manifest()
        self.run = Invocation(
            request_id=REQUEST_ID, function="resize", trigger="http", status=Status.FINISHED,
            created_at="2024-05-01T10:00:00.000Z",
        )

    def _find(self, request_id: str) -> Invocation:
        if request_id != REQUEST_ID:
            raise InvocationNotFound(request_id)
        return self.run

    async def get(self, request_id: str) -> Invocation:
        return self._find(request_id)

    async def links(self, request_id: str) -> tuple[str | None, list[str]]:
        self._find(request_id)
        return None, []

    async def envelope(self, request_id: str) -> bytes:
        self._find(request_id)
        return b"{}"

    async def log_file(self, request_id: str) -> Path | None:
        self._find(request_id)
        return None

    async def log_pieces(self, request_id: str) -> AsyncIterator[bytes]:
        self._find(request_id)
        yield b"a line\n"

    async def terminate(self, request_id: str) -> Invocation:
        return self._find(request_id)

    async def replay(self, request_id: str, *, key: str | None = None) -> Accepted:
        self._find(request_id)
        return Accepted("0190a1b2-c3d4-7e5f-8a6b-000000000001", created=True)


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(build_app(OneRunEngine()))) as test_client:  # type: ignore[arg-type]
        yield test_client


@pytest.mark.parametrize(
    ("method", "route", "status"),
    [
        ("GET", "/invocations/{}", 200),
        ("GET", "/invocations/{}/event", 200),
        ("GET", "/invocations/{}/logs", 200),
        ("POST", "/invocations/{}/terminate", 200),
        ("POST", "/invocations/{}/replay", 202),
    ],
)
@pytest.mark.parametrize("spelling", [REQUEST_ID.upper(), REQUEST_ID[:9] + REQUEST_ID[9:].upper()], ids=["upper", "mixed"])
async def test_every_route_reads_a_request_id_in_any_case(
    client: TestClient, method: str, route: str, status: int, spelling: str
) -> None:
    response = await client.request(method, route.format(spelling))
    assert response.status == status, await response.text()


async def test_the_answer_names_the_run_in_lower_case(client: TestClient) -> None:
    response = await client.get(f"/invocations/{REQUEST_ID.upper()}")
    assert (await response.json())["RequestId"] == REQUEST_ID
    replayed = await client.post(f"/invocations/{REQUEST_ID.upper()}/replay")
    assert (await replayed.json())["ReplayOf"] == REQUEST_ID
