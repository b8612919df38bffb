"""Engine.accept_batch: each event's answer, its run queued once, and the counters, whatever the batch holds."""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import pytest

from eventrun.engine.core import Engine
from eventrun.engine.envelope import Encoded, Envelope, encode
from eventrun.engine.manifest import load_manifest


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    """An engine with functions a and b whose runs never start (the dispatcher is paused)."""
    (tmp_path / "noop.py").write_text("def main_handler(event, context):\n    return None\n")
    (tmp_path / "eventrun.toml").write_text(
        '[server]\ndata_dir = "data"\n\n'
        '[functions.a]\nhandler = "noop.py:main_handler"\n\n'
        '[functions.b]\nhandler = "noop.py:main_handler"\n'
    )
    engine = Engine(load_manifest(tmp_path / "eventrun.toml"))
    await engine.start()
    engine.dispatcher.pause()
    try:
        yield engine
    finally:
        await engine.stop()


def event(function: str, id: str) -> Envelope:
    return Envelope(id=id, source="test://batch", type="t", function=function, trigger="kafka", data={"id": id})


async def test_a_batch_of_new_events_of_one_function(engine: Engine) -> None:
    answers = await engine.accept_batch([event("a", str(i)) for i in range(5)])
    assert [a.created for a in answers] == [True] * 5
    assert len({a.request_id for a in answers}) == 5
    assert engine.backlog("a") == 5 and engine.backlog("b") == 0
    assert engine.metrics.accepted["a"] == 5
    assert [engine.get(a.request_id).function for a in answers] == ["a"] * 5


async def test_a_batch_mixing_functions_and_known_events(engine: Engine) -> None:
    first = await engine.accept_batch([event("a", "1"), event("b", "1")])
    answers = await engine.accept_batch([event("a", "1"), event("a", "2"), event("b", "2"), event("b", "1")])
    assert [a.created for a in answers] == [False, True, True, False]
    assert (answers[0].request_id, answers[3].request_id) == (first[0].request_id, first[1].request_id)
    assert engine.backlog("a") == 2 and engine.backlog("b") == 2
    assert (engine.metrics.accepted["a"], engine.metrics.accepted["b"]) == (2, 2)
    assert (engine.metrics.duplicates["a"], engine.metrics.duplicates["b"]) == (1, 1)
    assert [engine.get(a.request_id).function for a in answers] == ["a", "a", "b", "b"]


async def test_an_encoded_envelope_is_recorded_as_written_beside_built_ones(engine: Engine) -> None:
    written = Encoded("w1", "test://batch", "a", "kafka", b'{"id":"w1","data":{"as":  "written"}}')
    built = event("a", "b1")
    answers = await engine.accept_batch([built, written, event("b", "b2")])
    assert [a.created for a in answers] == [True, True, True]
    assert engine.store.envelope(answers[1].request_id) == written.json
    assert engine.store.envelope(answers[0].request_id) == encode(built)
    # Its dedupe key is its own id and source: given again, it maps to the same run.
    again = await engine.accept_batch([written])
    assert again[0].request_id == answers[1].request_id and not again[0].created
    assert engine.backlog("a") == 2 and engine.backlog("b") == 1
