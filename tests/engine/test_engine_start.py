"""What a start does with the queued runs of a function the manifest no longer has."""

from __future__ import annotations

import logging
import time

import pytest

from eventrun.engine.api import Status
from eventrun.engine.envelope import Envelope, new_id

from conftest import StartEngine

NOOP = {"noop.py": "def main_handler(event, context):\n    return None\n"}
BOTH = '[server]\ndata_dir = "data"\n\n[functions.kept]\nhandler = "noop.py:main_handler"\n\n[functions.gone]\nhandler = "noop.py:main_handler"\n'
KEPT = '[server]\ndata_dir = "data"\n\n[functions.kept]\nhandler = "noop.py:main_handler"\n'


def event(function: str) -> Envelope:
    return Envelope(id=new_id(), source=f"/http/{function}", type="t", function=function, trigger="http", data={})


async def test_queued_runs_of_a_removed_function_end_together_and_are_said_and_counted(
    start_engine: StartEngine, caplog: pytest.LogCaptureFixture
) -> None:
    before = await start_engine(BOTH, NOOP, paused=True)
    gone = [accepted.request_id for accepted in await before.accept_batch([event("gone") for _ in range(1500)])]
    await before.stop()

    began = time.monotonic()
    with caplog.at_level(logging.INFO, logger="eventrun.engine.core"):
        after = await start_engine(KEPT, paused=True)
    # One commit a run took 28 s for 19,000 runs before the server answered; they share commits now.
    assert time.monotonic() - began < 15
    for request_id in (gone[0], gone[-1]):
        run = await after.get(request_id)
        assert (run.status, run.error_type, run.error_message) == (
            Status.FAILED, "FunctionNotFound", "function 'gone' is no longer in the manifest",
        )
    said = [r.getMessage() for r in caplog.records if "no longer in the manifest" in r.getMessage()]
    assert said == ["1500 queued runs of function 'gone', which is no longer in the manifest, ended FAILED (FunctionNotFound)"]
    assert 'eventrun_runs_total{function="gone",status="FAILED"} 1500' in after.metrics_text()
    assert 'eventrun_runs_total{function="kept",status="FAILED"} 0' in after.metrics_text()
