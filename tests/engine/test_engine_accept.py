"""Engine.accept_batch: each event's answer, its run queued once, and the counters, whatever the batch holds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import pytest

from eventrun.engine import envelope
from eventrun.engine.core import Engine
from eventrun.engine.envelope import Envelope, Templated, TemplatedBatch, encode, expand, template_prefix
from eventrun.engine.store import SQLiteStore


@pytest.fixture
async def engine(store_url: str, start_engine: Callable[..., Awaitable[Engine]]) -> Engine:
    """An engine (on each kind of store) with functions a and b whose runs never start."""
    store = f'[store]\nurl = "{store_url}"\n\n' if store_url else ""
    return await start_engine(
        f'[server]\ndata_dir = "data"\n\n{store}'
        '[functions.a]\nhandler = "noop.py:main_handler"\n\n'
        '[functions.b]\nhandler = "noop.py:main_handler"\n',
        {"noop.py": "def main_handler(event, context):\n    return None\n"},
        paused=True,
    )


async def rows(engine: Engine, sql: str) -> list[tuple[Any, ...]]:
    """What a query finds in the engine's store, whichever kind it is."""
    if isinstance(engine.store, SQLiteStore):
        return engine.store._db.execute(sql).fetchall()
    return [tuple(r) for r in await engine.store.pool.fetch(sql)]


def event(function: str, id: str) -> Envelope:
    return Envelope(id=id, source="test://batch", type="t", function=function, trigger="kafka", data={"id": id})


async def test_a_batch_of_new_events_of_one_function(engine: Engine) -> None:
    answers = await engine.accept_batch([event("a", str(i)) for i in range(5)])
    assert [a.created for a in answers] == [True] * 5
    assert len({a.request_id for a in answers}) == 5
    assert engine.backlog("a") == 5 and engine.backlog("b") == 0
    assert engine.metrics.accepted["a"] == 5
    assert [(await engine.get(a.request_id)).function for a in answers] == ["a"] * 5


async def test_a_batch_mixing_functions_and_known_events(engine: Engine) -> None:
    first = await engine.accept_batch([event("a", "1"), event("b", "1")])
    answers = await engine.accept_batch([event("a", "1"), event("a", "2"), event("b", "2"), event("b", "1")])
    assert [a.created for a in answers] == [False, True, True, False]
    assert (answers[0].request_id, answers[3].request_id) == (first[0].request_id, first[1].request_id)
    assert engine.backlog("a") == 2 and engine.backlog("b") == 2
    assert (engine.metrics.accepted["a"], engine.metrics.accepted["b"]) == (2, 2)
    assert (engine.metrics.duplicates["a"], engine.metrics.duplicates["b"]) == (1, 1)
    assert [(await engine.get(a.request_id)).function for a in answers] == ["a", "a", "b", "b"]


TEMPLATE = b'{"id":"%(0)b","source":"test://batch","data":{"n":%(1)b,"tag":%(2)b,"again":%(1)b,"pct":"100%%"}}'


def templated(function: str, id: str, n: int) -> Templated:
    stored = template_prefix(TEMPLATE) + b"%s\x00%d\x00%s" % (id.encode(), n, b'"t\\u0000"')
    return Templated(id, "test://batch", function, "kafka", stored, TEMPLATE)


async def test_a_templated_envelope_keeps_its_fields_and_is_read_back_whole(engine: Engine) -> None:
    batch = [templated("a", "t1", 1), event("a", "e1"), templated("b", "t2", 2)]
    answers = await engine.accept_batch(batch)
    assert [a.created for a in answers] == [True, True, True]
    for answer, (id, n) in zip(answers[::2], [("t1", 1), ("t2", 2)]):
        whole = b'{"id":"%s","source":"test://batch","data":{"n":%d,"tag":"t\\u0000","again":%d,"pct":"100%%"}}'
        assert (await engine.store.envelope(answer.request_id)) == whole % (id.encode(), n, n)
    assert (await engine.store.envelope(answers[1].request_id)) == encode(batch[1])
    stored = await rows(engine, "SELECT envelope FROM invocations ORDER BY request_id")
    assert [bytes(s) for (s,) in stored][::2] == [batch[0].stored, batch[2].stored], "only the fields were written"
    assert await rows(engine, "SELECT count(*) FROM templates") == [(1,)]
    # Given again it maps to the same run, like any event with that function, source and id.
    again = await engine.accept_batch([templated("a", "t1", 1)])
    assert again[0].request_id == answers[0].request_id and not again[0].created


async def test_a_batch_of_templated_envelopes_by_column_is_accepted_as_each_would_be(engine: Engine) -> None:
    items = [templated("a", f"t{n}", n) for n in range(5)]
    first = items[0]
    batch = TemplatedBatch(first.source, first.function, first.trigger, TEMPLATE, [e.id for e in items],
                           [e.stored for e in items])
    assert list(batch) == items
    answers = await engine.accept_batch(batch[:3])
    assert [a.created for a in answers] == [True] * 3
    for answer, item in zip(answers, items):
        assert (await engine.store.envelope(answer.request_id)) == expand(item.stored, TEMPLATE)
        invocation = await engine.get(answer.request_id)
        assert (invocation.function, invocation.trigger, invocation.status.value) == ("a", "kafka", "QUEUED")
    # The whole batch again: the first three map to their runs, the last two are new.
    again = await engine.accept_batch(batch)
    assert [(a.request_id, a.created) for a in again[:3]] == [(a.request_id, False) for a in answers]
    assert [a.created for a in again[3:]] == [True, True]
    assert await rows(engine, "SELECT count(*) FROM invocations") == [(5,)]


async def test_a_run_is_created_in_the_millisecond_of_its_request_id(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # CreatedAt was read from the clock apart from the RequestId: a millisecond turning between
    # the two put a run outside the since/until (which go by RequestIds) of its own CreatedAt.
    clock = [1_800_000_000_000_000_000]  # ns; a millisecond goes by at each reading

    def tick_ns() -> int:
        clock[0] += 1_000_000
        return clock[0]

    issued = envelope._issued[0]
    monkeypatch.setattr(envelope.time, "time_ns", tick_ns)
    monkeypatch.setattr(envelope.time, "time", lambda: tick_ns() / 1e9)
    try:
        answers = [*await engine.accept_batch([event("a", "1"), event("b", "2")]), *await engine.accept_batch([event("a", "3")])]
    finally:
        monkeypatch.undo()
        envelope._issued[0] = issued  # (the ids given out after would be in 2027, as these are)
    for answer in answers:
        run = await engine.get(answer.request_id)
        created_ms = datetime.fromisoformat(run.created_at).timestamp() * 1000
        assert round(created_ms) == int(answer.request_id.replace("-", "")[:12], 16), (run.created_at, answer.request_id)
