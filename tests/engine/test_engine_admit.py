"""qps_limit counts new events: a repeat of one accepted before (its Idempotency-Key) takes no token."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import SimpleNamespace

import pytest

from eventrun.engine import dispatcher
from eventrun.engine.core import Engine
from eventrun.engine.envelope import Envelope, new_id
from eventrun.engine.api import Status
from eventrun.engine.errors import FunctionNotFound, Throttled
from test_store import row


@pytest.fixture
async def engine(monkeypatch: pytest.MonkeyPatch, start_engine: Callable[..., Awaitable[Engine]]) -> Engine:
    """An engine whose async function `a` and sync function `s` each take 2 new events a second,
    in a second that lasts (the buckets' clock stands still: no token comes back by itself)."""
    monkeypatch.setattr(dispatcher, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    return await start_engine(
        '[server]\ndata_dir = "data"\n\n'
        '[functions.a]\nhandler = "echo.py:main_handler"\nqps_limit = 2\n\n'
        '[functions.s]\nhandler = "echo.py:main_handler"\nqps_limit = 2\nasync_execution = false\n',
        {"echo.py": "def main_handler(event, context):\n    return event['data']\n"},
    )


def event(function: str, key: str | None = None) -> Envelope:
    return Envelope(id=key or new_id(), source=f"/http/{function}", type="t", function=function, trigger="http", data={})


async def test_repeats_of_an_accepted_event_take_no_token(engine: Engine) -> None:
    first = await engine.accept(event("a", "order-1"), repeatable=True)
    for _ in range(5):  # retries, within the second: one token was taken, and only one
        again = await engine.accept(event("a", "order-1"), repeatable=True)
        assert (again.request_id, again.created) == (first.request_id, False)
    assert (await engine.accept(event("a"))).created  # the second token is still there for a new event
    with pytest.raises(Throttled):
        await engine.accept(event("a"))
    assert (engine.metrics.accepted["a"], engine.metrics.duplicates["a"], engine.metrics.throttled["a"]) == (2, 5, 1)


async def test_repeats_of_a_sync_call_take_no_token_and_get_its_answer(engine: Engine) -> None:
    first = await engine.call(event("s", "call-1"))
    for _ in range(3):
        again = await engine.call(event("s", "call-1"))
        assert (again.request_id, again.status, again.result) == (first.request_id, first.status, first.result)
    assert (await engine.call(event("s"), unique=True)).result == {}  # the second token
    with pytest.raises(Throttled):
        await engine.call(event("s"), unique=True)
    assert engine.metrics.throttled["s"] == 1 and engine.metrics.duplicates["s"] == 3


async def test_repeats_at_the_same_moment_as_new_events_leave_them_the_limit(engine: Engine) -> None:
    await engine.accept(event("a", "order-1"), repeatable=True)  # one token of two left
    again, new = await asyncio.gather(
        engine.accept(event("a", "order-1"), repeatable=True), engine.accept(event("a")), return_exceptions=True
    )
    assert not isinstance(again, Exception) and not again.created, again
    assert not isinstance(new, Exception) and new.created, new  # the token the repeat did not take
    assert engine.metrics.throttled["a"] == 0


async def test_runs_of_a_function_the_manifest_lacks_are_listed_if_the_store_has_them(idle_engine: Engine) -> None:
    # Dropped from the manifest since, or another node's (nodes may have different manifests).
    with pytest.raises(FunctionNotFound):
        await idle_engine.list(function="gone")  # none anywhere: most likely a typo
    gone = row("old", function="gone", source="/http/gone")
    await idle_engine.store.accept([gone])
    runs, _ = await idle_engine.list(function="gone")
    assert [run.request_id for run in runs] == [gone.request_id]
    assert (await idle_engine.list(function="gone", status=Status.RUNNING))[0] == [], "filtered out: an empty page"


async def test_runs_of_a_function_the_manifest_lacks_are_counted_after_the_manifest_s(idle_engine: Engine) -> None:
    await idle_engine.store.accept([row("old", function="gone", source="/http/gone"), row("new", function="f")])
    counts = await idle_engine.counts()
    assert list(counts) == ["f", "gone"], counts
    assert counts["gone"] == {**{status.value: 0 for status in Status}, "QUEUED": 1}
    assert counts["f"]["QUEUED"] == 1
