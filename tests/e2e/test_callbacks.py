"""callback_url: the outcome of each ended run is POSTed to the function's URL."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import pytest

from server_process import BOTH_STORES
from aiohttp import web

pytestmark = [pytest.mark.e2e, BOTH_STORES]


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, asyncio.Queue[tuple[dict[str, Any], str]]]]:
    """A local HTTP endpoint that records what is POSTed to it."""
    received: asyncio.Queue[tuple[dict[str, Any], str]] = asyncio.Queue()

    async def hook(request: web.Request) -> web.Response:
        await received.put((await request.json(), request.headers.get("X-Request-Id", "")))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/hook", received
    finally:
        await runner.cleanup()


async def test_outcomes_are_posted_to_the_callback_url(eventrun_server, http, handler, receiver):
    url, received = receiver
    server = eventrun_server(
        {
            "quick": {"handler": handler("quick"), "callback_url": url},
            "boom": {"handler": handler("boom"), "callback_url": url},
            "silent": {"handler": handler("quick")},
        }
    )
    api = server.client(http)

    finished = await api.accepted("quick", {"n": 7})
    body, header = await asyncio.wait_for(received.get(), 20)
    assert body["RequestId"] == finished == header
    assert body["FunctionName"] == "quick"
    assert body["Status"] == "FINISHED"
    assert body["Result"]["data"] == {"n": 7}

    failed = await api.accepted("boom", {})
    body, _ = await asyncio.wait_for(received.get(), 20)
    assert (body["RequestId"], body["Status"], body["ErrorType"]) == (failed, "FAILED", "ValueError")

    # A function without callback_url sends nothing.
    quiet = await api.accepted("silent", {})
    await api.wait_ended(quiet)
    await asyncio.sleep(0.5)
    assert received.empty()
    health = await (await http.get(f"{server.url}/healthz")).json()
    assert health["Triggers"]["deliveries"]["sent"] == 2


async def test_a_run_cut_short_by_a_crash_is_reported_after_restart(eventrun_server, http, handler, receiver):
    url, received = receiver
    server = eventrun_server({"sleepy": {"handler": handler("sleepy"), "callback_url": url}})
    api = server.client(http)
    request_id = await api.accepted("sleepy", {"seconds": 30})
    await api.wait_for(request_id, {"RUNNING"}, timeout=15)
    server.kill9()
    assert received.empty()

    server.restart()
    body, _ = await asyncio.wait_for(received.get(), 20)
    assert (body["RequestId"], body["Status"], body["ErrorType"]) == (request_id, "FAILED", "ServerStopped")
