"""Engine.call (a sync call's record written behind it, in batches) and Engine.counts (shared, reused)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from eventrun.engine import core
from eventrun.engine.api import Status
from eventrun.engine.core import Engine
from eventrun.engine.envelope import Envelope, new_id
from eventrun.engine.errors import StoreError
from eventrun.engine.manifest import load_manifest


@pytest.fixture
async def engine(start_engine: Callable[..., Awaitable[Engine]]) -> Engine:
    """An engine on its own SQLite store with one sync function that echoes its event's data."""
    return await start_engine(
        '[server]\ndata_dir = "data"\n\n'
        '[functions.echo]\nhandler = "echo.py:main_handler"\nasync_execution = false\ntimeout = "30s"\nconcurrency = 8\n',
        {"echo.py": "def main_handler(event, context):\n    return event['data']\n"},
    )


def call(n: int) -> Envelope:
    return Envelope(id=new_id(), source="/http/echo", type="eventrun.http.request", function="echo", trigger="http", data={"n": n})


async def stored_statuses(engine: Engine) -> dict[str, str]:
    return dict(engine.store._db.execute("SELECT request_id, status FROM invocations").fetchall())  # type: ignore[union-attr]


async def test_calls_answered_together_are_recorded_in_one_commit(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    await asyncio.gather(*(engine.call(call(n), unique=True) for n in range(6)))  # six warm instances
    await asyncio.sleep(core.WRITE_BEHIND * 4)
    warm_up = await stored_statuses(engine)
    monkeypatch.setattr(core, "WRITE_BEHIND", 1.0)  # longer than six calls on warm instances take
    commits = []
    writer = engine.store._writer  # type: ignore[union-attr]
    flush = writer._flush

    def counting_flush() -> None:
        commits.append(len(writer._outbox))
        flush()

    monkeypatch.setattr(writer, "_flush", counting_flush)
    answers = await asyncio.gather(*(engine.call(call(n), unique=True) for n in range(6)))
    assert [a.status for a in answers] == [Status.FINISHED] * 6
    assert [a.result for a in answers] == [{"n": n} for n in range(6)]
    assert await stored_statuses(engine) == warm_up, "nothing is written before the batch goes"
    assert [await engine.get(a.request_id) for a in answers] == answers, "meanwhile the engine answers for them"

    await asyncio.sleep(core.WRITE_BEHIND * 1.5)
    assert await stored_statuses(engine) == {**warm_up, **{a.request_id: "FINISHED" for a in answers}}
    assert [await engine.get(a.request_id) for a in answers] == answers, "the store's record is what the caller got"
    assert commits == [18], "six acceptances, six starts and six ends sent as one frame"
    assert not engine._behind


async def test_a_call_with_a_key_of_its_own_is_recorded_before_it_runs(engine: Engine) -> None:
    answer = await engine.call(call(1), unique=False)
    assert answer.status is Status.FINISHED
    assert (await stored_statuses(engine))[answer.request_id] == "FINISHED"
    assert not engine._behind


async def test_a_record_that_cannot_be_sent_is_reported_and_let_go(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def closed(*_args: object) -> None:
        raise RuntimeError("store is not open")

    monkeypatch.setattr(engine.store, "accept_behind", closed)
    monkeypatch.setattr(engine.store, "start_behind", closed)
    monkeypatch.setattr(engine.store, "finish_behind", closed)
    with caplog.at_level(logging.ERROR, logger="eventrun.engine.core"):
        answer = await engine.call(call(7), unique=True)
        await asyncio.sleep(core.WRITE_BEHIND * 4)
    assert answer.status is Status.FINISHED and answer.result == {"n": 7}
    assert not engine._behind and not engine._unsent, "nothing is held for a record that was never written"
    said = [r.getMessage() for r in caplog.records]
    assert any(answer.request_id in m and "end" in m and "store is not open" in m for m in said), said


@pytest.mark.parametrize(
    "failure, error_type, message",
    [
        (OSError(24, "Too many open files"), "InstanceStartFailed", "no instance could be started: [Errno 24] Too many open files"),
        (RuntimeError("a bug"), "InternalError", "eventrun failed while running it (RuntimeError: a bug); see the server log"),
    ],
)
async def test_a_run_that_eventrun_itself_cannot_run_ends_failed_and_frees_its_slot(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, failure: Exception, error_type: str, message: str
) -> None:
    async def fails(spec: object) -> None:
        raise failure

    monkeypatch.setattr(engine.pool, "acquire", fails)
    called = await engine.call(call(1), unique=True)  # a sync call, its record written behind
    queued = await engine.wait((await engine.accept(call(2))).request_id, timeout=10)  # the durable path
    for invocation in (called, queued):
        assert (invocation.status, invocation.error_type, invocation.error_message) == (Status.FAILED, error_type, message)
    monkeypatch.undo()
    assert engine.dispatcher.running("echo") == 0
    again = await engine.call(call(3), unique=True)
    assert (again.status, again.result) == (Status.FINISHED, {"n": 3})


async def test_a_record_the_store_refuses_is_sent_again_until_it_is_written(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from eventrun.engine.errors import StoreError

    refusals = {"accept_behind": 2, "start_behind": 2, "finish_behind": 3}
    sent: list[str] = []
    for name, times in refusals.items():
        real = getattr(engine.store, name)

        def refusing(*args: object, _name: str = name, _real=real) -> asyncio.Future[object]:
            sent.append(_name)
            if refusals[_name] > 0:  # as a full disk does: the commit fails, nothing is recorded
                refusals[_name] -= 1
                future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
                future.set_exception(StoreError("the store refused the write (database or disk is full)"))
                return future
            return _real(*args)

        monkeypatch.setattr(engine.store, name, refusing)
    monkeypatch.setattr(engine._refused_records, "every", 0.0)  # a line for each refused send
    with caplog.at_level(logging.WARNING, logger="eventrun.engine.core"):
        answer = await engine.call(call(8), unique=True)
        assert answer.status is Status.FINISHED and answer.result == {"n": 8}
        for _ in range(100):
            if not engine._behind:
                break
            await asyncio.sleep(0.05)
    assert not engine._behind and not engine._unsent
    assert (await stored_statuses(engine)) == {answer.request_id: "FINISHED"}
    stored = await engine.store.get(answer.request_id)
    assert stored is not None and stored.result == {"n": 8} and stored.started_at is not None
    assert sent.count("finish_behind") >= 4 and refusals == {"accept_behind": 0, "start_behind": 0, "finish_behind": 0}
    assert any("the store refused the end of sync call" in r.getMessage() for r in caplog.records)
    recovered = [r.getMessage() for r in caplog.records if r.getMessage().startswith("the store records sync calls' records again")]
    assert recovered and "more refused" not in recovered[0], recovered


async def test_ends_the_store_refuses_are_logged_once_a_while_not_each_try(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from eventrun.engine.errors import StoreError

    monkeypatch.setattr(engine._refused_ends, "every", 0.25)
    refusals: dict[str, int] = {}
    ended_at: dict[str, set[object]] = {}  # the end's time each try gave
    real = engine.store.finish

    async def refusing(request_id: str, *args: object, **kwargs: object) -> bool:
        refusals[request_id] = refusals.get(request_id, 0) + 1
        ended_at.setdefault(request_id, set()).add(args[1])
        if refusals[request_id] <= 3:  # 0.1 + 0.2 + 0.4 s of retries for each run
            raise StoreError("the store refused the write (database or disk is full)")
        return await real(request_id, *args, **kwargs)

    monkeypatch.setattr(engine.store, "finish", refusing)
    with caplog.at_level(logging.WARNING, logger="eventrun.engine.core"):
        # With an Idempotency-Key of their own, the calls take the durable path: each end is committed.
        answers = await asyncio.gather(*(engine.call(call(n)) for n in range(6)))
    assert [a.status for a in answers] == [Status.FINISHED] * 6
    assert sorted(refusals.values()) == [4] * 6
    # The end is recorded at its time, not the time the store took it (a second later).
    assert all(len(times) == 1 for times in ended_at.values()), ended_at
    lines = [r.getMessage() for r in caplog.records if "the store refused the end of run" in r.getMessage()]
    assert 1 <= len(lines) <= 6, lines  # 18 refusals over about 0.7 s: a line at most every 0.25 s
    assert any("more refused since the last such line" in line for line in lines), lines
    # Each refusal is in a line: counted by one, or by the recovery's line (the first end recorded).
    recovered = [r.getMessage() for r in caplog.records if r.getMessage().startswith("the store records runs' ends again")]
    assert len(recovered) == 1, recovered
    counted = [int(m) for m in re.findall(r"\((?:and )?(\d+) more refused since the last such line\)", "\n".join(lines + recovered))]
    assert len(lines) + sum(counted) == 18, (lines, recovered)


async def test_a_start_recorded_by_a_commit_whose_answer_was_lost_runs_when_tried_again(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store committed the start (RUNNING) but its answer never came (a dropped connection,
    # a writer that died after its commit): the engine tries the start again, and the store takes
    # the same start, at the same time, as this one, rather than leaving the run RUNNING with
    # nothing running it.
    from eventrun.engine.errors import StoreError

    real = engine.store.begin
    tries: list[str] = []

    async def answer_lost(request_id: str, started_at: str) -> bytes | None:
        tries.append(started_at)
        envelope = await real(request_id, started_at)
        if len(tries) == 1:
            assert envelope is not None
            raise StoreError("the store's writer process 1 was killed by signal 9")
        return envelope

    monkeypatch.setattr(engine.store, "begin", answer_lost)
    answer = await asyncio.wait_for(engine.call(call(9)), 15)  # (a key of its own: the durable path)
    assert answer.status is Status.FINISHED and answer.result == {"n": 9}, answer
    assert len(tries) == 2 and tries[0] == tries[1], tries
    assert (await stored_statuses(engine)) == {answer.request_id: "FINISHED"}
    assert not engine._start_tried


async def test_listeners_hear_of_a_sync_call_once_its_record_is_written(engine: Engine) -> None:
    await engine.call(call(0), unique=True)  # a warm instance
    heard: list[tuple[str, str, str | None]] = []

    def listener(invocation) -> None:  # what the store holds of the run when the listener hears of it
        stored = engine.store._db.execute(  # type: ignore[union-attr]
            "SELECT status FROM invocations WHERE request_id = ?", (invocation.request_id,)
        ).fetchone()
        heard.append((invocation.request_id, invocation.status.value, stored[0] if stored else None))

    engine.add_listener(listener)
    answer = await engine.call(call(1), unique=True)
    assert answer.status is Status.FINISHED
    async with asyncio.timeout(5):
        while answer.request_id not in [request_id for request_id, _, _ in heard]:
            await asyncio.sleep(0.01)
    await asyncio.sleep(core.WRITE_BEHIND * 4)
    # Told once, with its end (and what that owes, e.g. its deliveries) in the store already.
    assert [h for h in heard if h[0] == answer.request_id] == [(answer.request_id, "FINISHED", "FINISHED")]


async def test_a_sync_call_queued_longer_than_its_timeout_is_answered_once_its_run_ends(tmp_path: Path) -> None:
    # One at a time, each run 0.9 s of a 1 s timeout: the eighth waits its turn about 6.3 s,
    # longer than its own timeout, kill_grace and the margin put together.
    (tmp_path / "nap.py").write_text("import time\n\ndef main_handler(event, context):\n    time.sleep(0.9)\n    return event['data']\n")
    (tmp_path / "eventrun.toml").write_text(
        '[server]\ndata_dir = "data"\nkill_grace = "0.1s"\n\n'
        '[functions.nap]\nhandler = "nap.py:main_handler"\nasync_execution = false\ntimeout = "1s"\nconcurrency = 1\n'
    )
    async with Engine(load_manifest(tmp_path / "eventrun.toml")) as engine:
        calls = [
            Envelope(id=new_id(), source="/http/nap", type="eventrun.http.request", function="nap", trigger="http", data=n)
            for n in range(8)
        ]
        answers = await asyncio.gather(*(engine.call(envelope, unique=True) for envelope in calls))
    assert [(a.status, a.result) for a in answers] == [(Status.FINISHED, n) for n in range(8)]


@pytest.mark.parametrize("failing", [1, 3], ids=["the first look", "every look for a while"])
async def test_a_call_whose_run_the_store_cannot_show_for_a_moment_is_still_answered(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, failing: int
) -> None:
    # A dropped connection to the store answered an accepted call 503 StoreUnavailable (8 of 9
    # such calls had run): a client that sends it again, as a 503 says, runs it twice.
    monkeypatch.setattr(core, "WAIT_RECHECK", 0.05)
    get = engine.store.get
    looks = 0

    async def flaky_get(request_id: str) -> Any:
        nonlocal looks
        looks += 1
        if looks <= failing:
            raise StoreError("the PostgreSQL store cannot serve this now (ConnectionResetError)")
        return await get(request_id)

    monkeypatch.setattr(engine.store, "get", flaky_get)
    answer = await asyncio.wait_for(engine.call(call(7), unique=False), 10)  # (recorded first: an Idempotency-Key's)
    assert (answer.status, answer.result) == (Status.FINISHED, {"n": 7})
    assert looks > failing
