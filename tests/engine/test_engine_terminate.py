"""Engine.terminate on one node: every caller gets the run's end, however many ask at once."""

from __future__ import annotations

import asyncio

from eventrun.engine.api import Status
from eventrun.engine.core import Engine
from eventrun.engine.envelope import Envelope
from eventrun.engine.errors import InvocationEnded


async def test_terminates_of_a_queued_run_at_once_each_get_its_end(idle_engine: Engine) -> None:
    accepted = await idle_engine.accept(Envelope(id="e", source="/test", type="t", function="f", trigger="http", data=None))
    answers = await asyncio.gather(*(idle_engine.terminate(accepted.request_id) for _ in range(3)), return_exceptions=True)
    for answer in answers:  # the run ABORTED, or that it has ended (409): never "QUEUED" while it ends
        assert isinstance(answer, InvocationEnded) or answer.status is Status.ABORTED, answers
    assert any(not isinstance(answer, Exception) for answer in answers)
    assert (await idle_engine.get(accepted.request_id)).status is Status.ABORTED
