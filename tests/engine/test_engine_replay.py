"""Engine.replay_many: the ended runs that match, each replayed once, whatever happens to them meanwhile;
and retention's pruning, which deletes them."""

from __future__ import annotations

import asyncio
import logging
import time
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

    async def replay_then_prune(request_id: str) -> Accepted:
        accepted = await replay(request_id)
        await idle_engine.prune(int(time.time() * 1000) + 60_000)  # retention deletes the other ended runs
        return accepted

    monkeypatch.setattr(idle_engine, "replay", replay_then_prune)
    pairs = await idle_engine.replay_many("f", status=Status.FAILED)
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
