"""Engine.replay_many: the ended runs that match, each replayed once, whatever happens to them meanwhile."""

from __future__ import annotations

import time

from eventrun.engine.api import Accepted, Status
from eventrun.engine.core import Engine
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
