"""Engine.replay_many: the ended runs that match, each replayed once, whatever happens to them meanwhile;
and retention's pruning, which deletes them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace

import pytest

from eventrun.engine.api import Accepted, Status
from eventrun.engine.core import Engine
from eventrun.engine.errors import StoreError
from eventrun.engine.envelope import Envelope, now_rfc3339


async def test_runs_deleted_while_a_bulk_replay_goes_on_are_passed_over(idle_engine: Engine, monkeypatch) -> None:
    ended = []
    for n in range(3):
        accepted = await idle_engine.accept(Envelope(id=f"e{n}", source="/test", type="t", function="f", trigger="http", data=n))
        assert await idle_engine.store.finish(accepted.request_id, Status.FAILED, now_rfc3339())
        ended.append(accepted.request_id)
    replay = idle_engine.replay

    async def replay_then_prune(request_id: str, *, key: str | None = None) -> Accepted:
        accepted = await replay(request_id, key=key)
        await idle_engine.prune(int(time.time() * 1000) + 60_000)  # retention deletes the other ended runs
        return accepted

    monkeypatch.setattr(idle_engine, "replay", replay_then_prune)
    pairs = (await idle_engine.replay_many("f", status=Status.FAILED))[0]
    assert [original for original, _ in pairs] == [ended[2]]  # newest first; the rest were deleted meanwhile
    (new,) = [new for _, new in pairs]
    assert new is not None and (await idle_engine.get(new)).status is Status.QUEUED


async def _ended(engine: Engine, event_id: str) -> str:
    accepted = await engine.accept(Envelope(id=event_id, source="/test", type="t", function="f", trigger="http", data=1))
    assert await engine.store.finish(accepted.request_id, Status.FAILED, now_rfc3339())
    return accepted.request_id


async def test_a_replay_sent_again_with_its_idempotency_key_is_the_same_replay(idle_engine: Engine) -> None:
    # A client that got no answer (a timeout, a dropped connection) sends the replay again.
    original, other = await _ended(idle_engine, "e1"), await _ended(idle_engine, "e2")
    first = await idle_engine.replay(original, key="retry-1")
    assert first.created
    assert await idle_engine.replay(original, key="retry-1") == Accepted(first.request_id, False)
    together = await asyncio.gather(*(idle_engine.replay(original, key="retry-2") for _ in range(3)))
    assert len({accepted.request_id for accepted in together}) == 1, together
    assert [accepted.created for accepted in together].count(True) == 1, together
    another_key = await idle_engine.replay(original, key="retry-3")
    unkeyed = [await idle_engine.replay(original), await idle_engine.replay(original)]
    _, replays = await idle_engine.links(original)
    assert sorted(replays) == sorted([first.request_id, together[0].request_id, another_key.request_id, *(a.request_id for a in unkeyed)])
    assert len(set(replays)) == 5, "a key names one replay; without one, each is new"
    of_other = await idle_engine.replay(other, key="retry-1")
    assert of_other.created and of_other.request_id not in replays, "a key is the replay of one run"
    queued, _ = await idle_engine.list(function="f", status=Status.QUEUED)
    assert len(queued) == 6, "one run for each replay, none for a repeat"


async def test_pruning_the_store_cannot_serve_is_logged_once_and_its_recovery_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A PostgreSQL outage wrote a traceback every round; now one line, then one when it prunes again.
    class Stop(BaseException):
        pass

    rounds = 0

    async def prune(_ended_before_ms: int) -> int:
        nonlocal rounds
        rounds += 1
        if rounds <= 3:
            raise StoreError("the PostgreSQL store cannot serve this now (ConnectionRefusedError)")
        if rounds == 5:
            raise Stop
        return 0

    async def no_wait(_seconds: float) -> None:
        return None

    engine = SimpleNamespace(manifest=SimpleNamespace(server=SimpleNamespace(retention=3600.0)), prune=prune)
    monkeypatch.setattr(asyncio, "sleep", no_wait)  # the rounds, one after the other
    with caplog.at_level(logging.WARNING, logger="eventrun.engine.core"), pytest.raises(Stop):
        await Engine._prune_forever(engine)  # type: ignore[arg-type]
    assert [r.getMessage() for r in caplog.records] == [
        "pruning runs past their retention failed"
        " (the PostgreSQL store cannot serve this now (ConnectionRefusedError)); trying again every 60s",
        "runs past their retention are pruned again (2 more failed since the last such line)",
    ]
    assert not any(r.exc_info for r in caplog.records), "no traceback for a store that cannot serve"


# -- a bulk replay with an Idempotency-Key: each run's replay under the key made once ---------------


@pytest.fixture
async def engine(store_url: str, start_engine: Callable[..., Awaitable[Engine]]) -> Engine:
    """An engine on each kind of store with a function f whose runs never start (they stay queued)."""
    store = f'[store]\nurl = "{store_url}"\n\n' if store_url else ""
    return await start_engine(
        f'[server]\ndata_dir = "data"\n\n{store}[functions.f]\nhandler = "noop.py:main_handler"\n',
        {"noop.py": "def main_handler(event, context):\n    return None\n"},
        paused=True,
    )


async def _runs(engine: Engine) -> list[str]:
    page, _ = await engine.list(function="f", limit=1000, results=False)
    return [invocation.request_id for invocation in page]


async def _replays(engine: Engine, original: str) -> list[str]:
    _, replays = await engine.links(original)
    return replays


async def test_a_bulk_replay_sent_again_with_its_key_answers_the_same_replays_and_makes_no_others(engine: Engine) -> None:
    originals = [await _ended(engine, f"e{n}") for n in range(3)]
    first = (await engine.replay_many("f", status=Status.FAILED, key="bulk-1"))[0]
    assert [original for original, _ in first] == originals[::-1]
    assert (await engine.replay_many("f", status=Status.FAILED, key="bulk-1"))[0] == first
    assert len(await _runs(engine)) == 6, "three runs, and one replay of each"
    for original, new in first:
        assert await _replays(engine, original) == [new]
    unkeyed = (await engine.replay_many("f", status=Status.FAILED))[0]
    assert {new for _, new in unkeyed}.isdisjoint(new for _, new in first), "without a key, each sending replays anew"


async def test_a_bulk_replay_sent_several_times_at_once_with_its_key_replays_each_run_once(engine: Engine) -> None:
    originals = [await _ended(engine, f"e{n}") for n in range(3)]
    together = [pairs for pairs, _ in await asyncio.gather(*(engine.replay_many("f", status=Status.FAILED, key="bulk-1") for _ in range(4)))]
    assert all(answer == together[0] for answer in together), together
    assert [original for original, _ in together[0]] == originals[::-1]
    for original in originals:
        assert len(await _replays(engine, original)) == 1
    assert len(await _runs(engine)) == 6


async def test_a_bulk_replay_sent_again_does_not_replay_the_replays_it_made(engine: Engine) -> None:
    # A key may hold ':', as the replays' event ids do (replay:{original}:{key}).
    originals = [await _ended(engine, f"e{n}") for n in range(2)]
    key = "nightly:2024-05-01:1"
    first = (await engine.replay_many("f", status=Status.FAILED, key=key))[0]
    for _, new in first:
        assert new is not None and await engine.store.finish(new, Status.FAILED, now_rfc3339())
    assert (await engine.replay_many("f", status=Status.FAILED, key=key))[0] == first, "the failed replays are passed over"
    assert (await engine.replay_many("f", status=Status.FAILED, key=key, dry_run=True))[0] == first
    assert len(await _runs(engine)) == 4
    # Only the replays made with this very key are: with another (even one its end spells), they are runs like any other.
    other = (await engine.replay_many("f", status=Status.FAILED, key="01:1"))[0]
    replays = [new for _, new in first]
    assert [original for original, _ in other] == [*replays[::-1], *originals[::-1]]


async def test_a_dry_run_with_a_key_shows_the_replays_made_with_it_and_replays_nothing(engine: Engine) -> None:
    older, newer = await _ended(engine, "e1"), await _ended(engine, "e2")
    made = await engine.replay(older, key="k")
    assert (await engine.replay_many("f", status=Status.FAILED, key="k", dry_run=True))[0] == [
        (newer, None), (older, made.request_id)
    ]
    assert (await engine.replay_many("f", status=Status.FAILED, key="other", dry_run=True))[0] == [(newer, None), (older, None)]
    assert len(await _runs(engine)) == 3, "a dry run replays nothing"
    done = (await engine.replay_many("f", status=Status.FAILED, key="k"))[0]
    assert done[1] == (older, made.request_id) and done[0][1] not in (None, made.request_id)


async def test_a_bulk_replay_goes_on_from_its_cursor_to_the_runs_after_those_it_picked(engine: Engine) -> None:
    # Limit is at most 1,000: a day's 2,001 failures could not be reached past the first 1,000.
    originals = [await _ended(engine, f"e{n}") for n in range(7)]
    newest_first = originals[::-1]
    seen: list[str] = []
    cursor = None
    answers = []
    while True:
        pairs, cursor = await engine.replay_many("f", status=Status.FAILED, limit=3, key="day", cursor=cursor)
        answers.append((pairs, cursor))
        seen += [original for original, _ in pairs]
        if cursor is None:
            break
    assert seen == newest_first and [len(pairs) for pairs, _ in answers] == [3, 3, 1]
    # Sent again with its key and cursor, a page answers the same replays, and goes on from the same place.
    assert await engine.replay_many("f", status=Status.FAILED, limit=3, key="day", cursor=answers[0][1]) == answers[1]
    assert len(await _runs(engine)) == 14, "seven runs, each replayed once"
    dry, dry_cursor = await engine.replay_many("f", status=Status.FAILED, limit=5, dry_run=True)
    assert len(dry) == 5 and dry_cursor is not None
