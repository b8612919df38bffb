"""Engine.replay_many: the ended runs that match, each replayed once, whatever happens to them meanwhile."""

from __future__ import annotations

import time
from pathlib import Path
from typing import AsyncIterator

import pytest

from eventrun.engine.api import Accepted, Status
from eventrun.engine.core import Engine
from eventrun.engine.envelope import Envelope, now_rfc3339
from eventrun.engine.manifest import load_manifest


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    """An engine with a function f whose runs never start."""
    (tmp_path / "noop.py").write_text("def main_handler(event, context):\n    return None\n")
    (tmp_path / "eventrun.toml").write_text('[server]\ndata_dir = "data"\n\n[functions.f]\nhandler = "noop.py:main_handler"\n')
    engine = Engine(load_manifest(tmp_path / "eventrun.toml"))
    engine.dispatcher.pause()
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def test_runs_deleted_while_a_bulk_replay_goes_on_are_passed_over(engine: Engine, monkeypatch) -> None:
    ended = []
    for n in range(3):
        accepted = await engine.accept(Envelope(id=f"e{n}", source="/test", type="t", function="f", trigger="http", data=n))
        assert await engine.store.finish(accepted.request_id, Status.FAILED, now_rfc3339())
        ended.append(accepted.request_id)
    replay = engine.replay

    async def replay_then_prune(request_id: str) -> Accepted:
        accepted = await replay(request_id)
        await engine.prune(int(time.time() * 1000) + 60_000)  # retention deletes the other ended runs
        return accepted

    monkeypatch.setattr(engine, "replay", replay_then_prune)
    pairs = await engine.replay_many("f", status=Status.FAILED)
    assert [original for original, _ in pairs] == [ended[2]]  # newest first; the rest were deleted meanwhile
    (new,) = [new for _, new in pairs]
    assert new is not None and (await engine.get(new)).status is Status.QUEUED
