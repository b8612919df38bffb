"""Engine.terminate on one node: every caller gets the run's end, however many ask at once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

import pytest

from eventrun.engine.api import Status
from eventrun.engine.core import Engine
from eventrun.engine.envelope import Envelope
from eventrun.engine.errors import InvocationEnded
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


async def test_terminates_of_a_queued_run_at_once_each_get_its_end(engine: Engine) -> None:
    accepted = await engine.accept(Envelope(id="e", source="/test", type="t", function="f", trigger="http", data=None))
    answers = await asyncio.gather(*(engine.terminate(accepted.request_id) for _ in range(3)), return_exceptions=True)
    for answer in answers:  # the run ABORTED, or that it has ended (409): never "QUEUED" while it ends
        assert isinstance(answer, InvocationEnded) or answer.status is Status.ABORTED, answers
    assert any(not isinstance(answer, Exception) for answer in answers)
    assert (await engine.get(accepted.request_id)).status is Status.ABORTED
