"""Results of any size up to the limit come back whole; past it the run fails clearly."""

from __future__ import annotations

import re

import pytest

from server_process import BOTH_STORES

pytestmark = [pytest.mark.e2e, BOTH_STORES]


async def test_a_large_result_comes_back_whole(eventrun_server, http, handler):
    server = eventrun_server({"big": {"handler": handler("big")}})
    api = server.client(http)
    request_id = await api.accepted("big", {"size": 1_000_000})
    ended = await api.wait_ended(request_id)
    assert ended["Status"] == "FINISHED", ended
    assert ended["Result"] == "x" * 1_000_000
    # The 200,000-character line was logged in pieces, none of them lost; the line of
    # multi-byte characters too, each piece cut between characters.
    async with http.get(f"{server.url}/invocations/{request_id}/logs") as response:
        text = await response.text()
    assert sum(line.count("y") for line in text.splitlines()) == 200_000
    mixed = [line.split(" ", 1)[1] for line in text.splitlines() if "€" in line or "\ufffd" in line]
    assert len(mixed) > 1 and "".join(mixed) == "é€𝄞" * 30_000


@pytest.mark.parametrize("size", [70_000, 2 * 1024 * 1024])
async def test_a_large_result_comes_back_whole_while_a_thread_of_the_run_prints(
    eventrun_server, http, handler, poll_until, size
):
    # The outcome shares the pipe with the run's output, and the thread's lines used to land
    # inside it ("unreadable outcome"): it goes in pieces that each arrive whole.
    server = eventrun_server({"heartbeat": {"handler": handler("heartbeat"), "async_execution": False, "timeout": "30s"}})
    api = server.client(http)
    for _ in range(3):  # (the instance stays warm: the last run's thread still prints into the next)
        reply = await api.invoke("heartbeat", {"size": size})
        assert reply.status == 200, reply.text[:500]
        answer = reply.json
        assert answer["Status"] == "FINISHED", {**answer, "Result": None}
        assert answer["Result"] == {"blob": "z" * size}
        request_id = answer["RequestId"]
        await poll_until(
            lambda: _heartbeats(api, request_id), 10, f"no heartbeat line in the log of {request_id}"
        )


async def _heartbeats(api, request_id: str) -> bool:
    """Whether the run's log holds lines of its thread's, each whole."""
    found = re.findall(r"^\S+ (heartbeat \d+)$", await api.logs(request_id), re.MULTILINE)
    return len(found) > 10


async def test_a_result_over_the_limit_fails_and_says_why(eventrun_server, http, handler):
    server = eventrun_server({"big": {"handler": handler("big")}})
    api = server.client(http)
    request_id = await api.accepted("big", {"size": 7 * 1024 * 1024})
    ended = await api.wait_ended(request_id)
    assert ended["Status"] == "FAILED", ended
    assert ended["ErrorType"] == "ResultTooLarge"
    assert "limit" in ended["ErrorMessage"]


@pytest.mark.parametrize(
    ("kind", "result"),
    [
        ("datetime", {"at": "2026-11-30T12:00:00+00:00"}),
        ("int-keys", {"1": "one", "2": "two"}),
    ],
)
async def test_results_are_encoded_by_one_set_of_rules(eventrun_server, http, handler, kind, result):
    # Dates and non-string keys as orjson writes them (the rules of every other JSON eventrun writes).
    server = eventrun_server({"shapes": {"handler": handler("shapes")}})
    api = server.client(http)
    ended = await api.wait_ended(await api.accepted("shapes", {"kind": kind}))
    assert ended["Status"] == "FINISHED", ended
    assert ended["Result"] == result


async def test_a_result_that_is_not_json_fails_and_says_why(eventrun_server, http, handler):
    server = eventrun_server({"shapes": {"handler": handler("shapes")}})
    api = server.client(http)
    ended = await api.wait_ended(await api.accepted("shapes", {"kind": "object"}))
    assert ended["Status"] == "FAILED", ended
    assert ended["ErrorType"] == "ResultNotSerializable"
    assert "not JSON-serialisable" in ended["ErrorMessage"]


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        # NaN used to be stored as null: the run ended FINISHED with another value than the one returned.
        ("nan", "result[0] is NaN; JSON has no NaN or Infinity (return such a number as a string, or None)"),
        (
            "big-int",
            "it holds an integer beyond 64 bits (a result's integers fit in 64 bits; return a larger one as a string)",
        ),
    ],
)
async def test_a_result_json_cannot_hold_fails_and_says_what_to_do(eventrun_server, http, handler, kind, why):
    server = eventrun_server({"shapes": {"handler": handler("shapes")}})
    api = server.client(http)
    ended = await api.wait_ended(await api.accepted("shapes", {"kind": kind}))
    assert ended["Status"] == "FAILED" and ended["ErrorType"] == "ResultNotSerializable", ended
    assert ended["ErrorMessage"] == f"the handler's return value is not JSON-serialisable: {why}"


async def test_an_error_message_that_is_not_valid_text_still_comes_back(eventrun_server, http, handler):
    # A lone surrogate cannot be sent as UTF-8: it comes back as "?", the rest as it was.
    server = eventrun_server({"shapes": {"handler": handler("shapes")}})
    api = server.client(http)
    request_id = await api.accepted("shapes", {"kind": "raise"})
    ended = await api.wait_ended(request_id)
    assert ended["Status"] == "FAILED", ended
    assert ended["ErrorType"] == "ValueError"
    assert ended["ErrorMessage"] == "n\u00e4chster Versuch ? fehlgeschlagen"
