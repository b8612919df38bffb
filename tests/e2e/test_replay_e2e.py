"""Replay: a new run of an ended run's envelope, linked both ways; in bulk by filter; from the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
import pytest

from server_process import BOTH_STORES, handler

pytestmark = [pytest.mark.e2e, BOTH_STORES]


async def cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "eventrun.cli", *args, "--url", url]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )


async def test_a_failed_run_is_replayed_with_its_envelope_and_linked_both_ways(eventrun_server, http: aiohttp.ClientSession) -> None:
    server = eventrun_server({"pid": {"handler": handler("pid")}, "sleepy": {"handler": handler("sleepy")}})
    api = server.client(http)
    original = await api.accepted("pid", {"fail": True})
    assert (await api.wait_ended(original))["Status"] == "FAILED"
    reply = await api.request("POST", f"/invocations/{original}/replay")
    assert reply.status == 202, reply.text
    again = reply.json["RequestId"]
    assert reply.json["ReplayOf"] == original and reply.headers["X-Request-Id"] == again != original
    assert (await api.wait_ended(again))["Status"] == "FAILED"  # the same event, so the same failure
    first = (await api.request("GET", f"/invocations/{original}/event")).json
    second = (await api.request("GET", f"/invocations/{again}/event")).json
    assert first == second and first["data"] == {"fail": True}
    assert (await api.status(original))["Replays"] == [again]
    replayed = await api.status(again)
    assert replayed["ReplayOf"] == original and replayed["Replays"] == [] and replayed["Trigger"] == "http"
    third = (await api.request("POST", f"/invocations/{original}/replay")).json["RequestId"]
    assert (await api.status(original))["Replays"] == [again, third]
    # Still going: refused. Unknown: not found.
    going = await api.accepted("sleepy", {"seconds": 30, "quiet": True})
    refused = await api.request("POST", f"/invocations/{going}/replay")
    assert refused.status == 409 and refused.error(409)["Code"] == "InvocationActive", refused.text
    missing = await api.request("POST", "/invocations/01a24565-00f3-7000-b97d-74f7456f1511/replay")
    assert missing.status == 404


async def test_a_replay_sent_again_with_its_idempotency_key_answers_the_same_run(eventrun_server, http: aiohttp.ClientSession) -> None:
    server = eventrun_server({"pid": {"handler": handler("pid")}})
    api = server.client(http)
    original = await api.accepted("pid", {"fail": True})
    await api.wait_ended(original)
    sent = [await api.request("POST", f"/invocations/{original}/replay", headers={"Idempotency-Key": "k1"}) for _ in range(2)]
    assert [reply.status for reply in sent] == [202, 202], [reply.text for reply in sent]
    again = sent[0].json["RequestId"]
    assert sent[1].json == {"RequestId": again, "ReplayOf": original} and sent[1].headers["X-Request-Id"] == again
    assert (await api.status(original))["Replays"] == [again], "one replay, one run"
    too_long = await api.request("POST", f"/invocations/{original}/replay", headers={"Idempotency-Key": "k" * 257})
    assert too_long.status == 400 and "Idempotency-Key header: at most 256 characters" in too_long.error(400)["Message"]


async def test_runs_are_replayed_in_bulk_by_filter_each_once(eventrun_server, http: aiohttp.ClientSession) -> None:
    server = eventrun_server({"pid": {"handler": handler("pid")}})
    api = server.client(http)
    failed = [await api.accepted("pid", {"fail": True, "n": n}) for n in range(3)]
    finished = await api.accepted("pid", {"n": 9})
    for request_id in [*failed, finished]:
        await api.wait_ended(request_id)

    async def bulk(**body: object) -> dict:
        reply = await api.request("POST", "/functions/pid/replay", json=body)
        assert reply.status == 200, reply.text
        return reply.json  # type: ignore[no-any-return]

    dry = await bulk(Status="FAILED", DryRun=True)
    assert dry["DryRun"] is True and sorted(p["ReplayOf"] for p in dry["Replayed"]) == sorted(failed)
    assert all(p["RequestId"] is None for p in dry["Replayed"])
    assert len((await api.list(function="pid")).json["Invocations"]) == 4, "a dry run runs nothing"
    done = await bulk(Status="FAILED", Limit=2)
    assert [p["ReplayOf"] for p in done["Replayed"]] == failed[::-1][:2], "newest first, at most Limit"
    assert len({p["RequestId"] for p in done["Replayed"]}) == 2
    for pair in done["Replayed"]:
        assert (await api.wait_ended(pair["RequestId"]))["ReplayOf"] == pair["ReplayOf"]
    whole = await bulk(Status="FAILED", Limit=1.0, DryRun=True)
    assert len(whole["Replayed"]) == 1, "a number with no fraction is an integer, as JSON Schema has it"
    # Page by page from the Cursor: each run that matches once, the last page's Cursor null.
    pages, cursor = [], None
    while True:
        page = await bulk(Status="FAILED", Limit=2, DryRun=True, **({"Cursor": cursor} if cursor else {}))
        pages.append([p["ReplayOf"] for p in page["Replayed"]])
        cursor = page["Cursor"]
        if cursor is None:
            break
    assert sum(pages, []) == sorted(sum(pages, []), reverse=True) and set(failed) <= set(sum(pages, []))
    assert len(sum(pages, [])) == len(set(sum(pages, []))), pages
    unknown = await api.request("POST", "/functions/pid/replay", json={"Cursor": "not-a-cursor"})
    assert unknown.status == 400 and "cursor 'not-a-cursor' is not a cursor this server gave out" in unknown.error(400)["Message"]
    refusals = [
        ({"Status": "RUNNING"}, "Status: only ended runs"), ({"Limit": 0}, "Limit"), ({"Limit": 1.5}, "Limit"),
        ({"Limit": True}, "Limit: expected an integer from 1 to 1000, got true"), ({"Colour": 1}, "unknown field"),
        ({"Since": 5}, "Since: expected a string, got 5"), ({"DryRun": None}, "DryRun: expected true or false, got null"),
        ({"Status": "DONE"}, "Status: expected one of"), ({"Trigger": "ftp"}, "Trigger: expected one of"),
    ]
    for body, message in refusals:
        reply = await api.request("POST", "/functions/pid/replay", json=body)
        assert reply.status == 400 and message in reply.error(400)["Message"], reply.text
    # The CLI: one run, and a filter with a time given as a duration ago.
    dry = await cli("replay", finished, "--dry-run", url=server.url)
    assert (dry.returncode, dry.stdout, dry.stderr) == (0, f"{finished}\n", "1 run would be replayed: pid, FINISHED\n")
    filtered = await cli("replay", finished, "--status", "FAILED", url=server.url)
    assert (filtered.returncode, filtered.stdout) == (2, ""), filtered.stderr
    assert len(filtered.stderr.splitlines()) == 1 and "--status" in filtered.stderr, filtered.stderr
    assert (await api.status(finished))["Replays"] == [], "neither a dry run nor a refused filter replays"
    out = await cli("replay", finished, url=server.url)
    assert out.returncode == 0, out.stderr
    assert (await api.status(out.stdout.strip()))["ReplayOf"] == finished
    listed = await cli("replay", "--function", "pid", "--status", "FINISHED", "--since", "1h", "--dry-run", url=server.url)
    assert listed.returncode == 0 and finished in listed.stdout.split(), listed.stderr
    assert "would be replayed" in listed.stderr


async def test_a_bulk_replay_sent_again_with_its_idempotency_key_answers_the_same_replays(
    eventrun_server, http: aiohttp.ClientSession
) -> None:
    server = eventrun_server({"pid": {"handler": handler("pid")}})
    api = server.client(http)
    failed = [await api.accepted("pid", {"fail": True, "n": n}) for n in range(2)]
    for request_id in failed:
        await api.wait_ended(request_id)
    key = {"Idempotency-Key": "nightly:2024-05-01"}

    async def bulk(**body: object) -> dict:
        reply = await api.request("POST", "/functions/pid/replay", json=body, headers=key)
        assert reply.status == 200, reply.text
        return reply.json  # type: ignore[no-any-return]

    first = await bulk(Status="FAILED")
    assert sorted(p["ReplayOf"] for p in first["Replayed"]) == sorted(failed)
    for pair in first["Replayed"]:
        assert (await api.wait_ended(pair["RequestId"]))["Status"] == "FAILED"
    assert await bulk(Status="FAILED") == first, "the failed replays are not replayed; the runs' replays are the same"
    assert await bulk(Status="FAILED", DryRun=True) == {**first, "DryRun": True}
    assert len((await api.list(function="pid")).json["Invocations"]) == 4
    # The CLI sends the same key, and a dry run shows the replays made with it.
    listed = await cli(
        "replay", "--function", "pid", "--status", "FAILED", "--idempotency-key", key["Idempotency-Key"], "--dry-run",
        url=server.url,
    )
    shown = [f"{p['ReplayOf']} -> {p['RequestId']}" for p in first["Replayed"]]
    assert (listed.returncode, listed.stdout.splitlines()) == (0, shown), listed.stderr
    too_long = await api.request("POST", "/functions/pid/replay", json={}, headers={"Idempotency-Key": "k" * 257})
    assert too_long.status == 400 and "Idempotency-Key header: at most 256 characters" in too_long.error(400)["Message"]
    # The key sent is the one used: another key, or none, replays anew.
    made_first = {pair["RequestId"] for pair in first["Replayed"]}
    for headers in ({"Idempotency-Key": "nightly:2024-05-02"}, {}):
        reply = await api.request("POST", "/functions/pid/replay", json={"Status": "FAILED", "Limit": 1}, headers=headers)
        assert reply.status == 200, reply.text
        [pair] = reply.json["Replayed"]
        assert pair["RequestId"] not in made_first, (headers, pair)
        await api.wait_ended(pair["RequestId"])
