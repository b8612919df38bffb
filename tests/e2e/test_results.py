"""Results of any size up to the limit come back whole; past it the run fails clearly."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


async def test_a_large_result_comes_back_whole(eventrun_server, http, handler):
    server = eventrun_server({"big": {"handler": handler("big")}})
    api = server.client(http)
    request_id = await api.accepted("big", {"size": 1_000_000})
    ended = await api.wait_ended(request_id)
    assert ended["Status"] == "FINISHED", ended
    assert ended["Result"] == "x" * 1_000_000
    # The 200,000-character line was logged in pieces, none of them lost.
    async with http.get(f"{server.url}/invocations/{request_id}/logs") as response:
        text = await response.text()
    assert sum(line.count("y") for line in text.splitlines()) == 200_000


async def test_a_result_over_the_limit_fails_and_says_why(eventrun_server, http, handler):
    server = eventrun_server({"big": {"handler": handler("big")}})
    api = server.client(http)
    request_id = await api.accepted("big", {"size": 7 * 1024 * 1024})
    ended = await api.wait_ended(request_id)
    assert ended["Status"] == "FAILED", ended
    assert ended["ErrorType"] == "ResultTooLarge"
    assert "limit" in ended["ErrorMessage"]
