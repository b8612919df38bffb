"""The timer trigger end to end: a real engine, real worker processes, a real store on disk."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from eventrun.engine.api import Invocation, Status
from eventrun.engine.core import Engine
from eventrun.engine.errors import ManifestError
from eventrun.engine.manifest import load_manifest
from eventrun.triggers.timer import TimerTrigger, parse_slot, to_envelope

UTC = timezone.utc
EVERY_SECOND = "* * * * * * *"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def timer(name: str = "every", cron: str = EVERY_SECOND, **more: Any) -> dict[str, Any]:
    """One timer trigger table."""
    return {"type": "timer", "name": name, "cron": cron, **more}


class World:
    """A manifest and data directory, and the engine + timer trigger living on them."""

    def __init__(self, folder: Path, functions: Mapping[str, Mapping[str, Any]]) -> None:
        self.path = folder / "eventrun.toml"
        self.data_dir = folder / "data"
        self.write(functions)
        self.live: list[tuple[Engine, TimerTrigger]] = []

    def write(self, functions: Mapping[str, Mapping[str, Any]]) -> None:
        """(Re)write the manifest."""
        lines = ["[server]", f"data_dir = {_toml(str(self.data_dir))}", 'shutdown_grace = "2s"', 'kill_grace = "1s"']
        for name, table in functions.items():
            lines += ["", f"[functions.{name}]"]
            lines += [f"{k} = {_toml(v)}" for k, v in table.items() if k != "triggers"]
            for trigger in table.get("triggers", ()):
                lines += ["", f"[[functions.{name}.triggers]]"]
                lines += [f"{k} = {_toml(v)}" for k, v in trigger.items()]
        self.path.write_text("\n".join(lines) + "\n")

    async def start(self) -> tuple[Engine, TimerTrigger]:
        """Build as `eventrun serve` does: the trigger validates before the engine starts."""
        manifest = load_manifest(self.path)
        engine = Engine(manifest)
        trigger = TimerTrigger(engine, manifest)
        await engine.start()
        self.live.append((engine, trigger))
        await trigger.start()
        return engine, trigger

    async def stop(self) -> None:
        """Stop the newest life: timer first, then the engine."""
        engine, trigger = self.live.pop()
        await trigger.stop()
        await engine.stop()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[Callable[..., World]]:
    """Factory: world(functions) -> World; whatever still lives is stopped at teardown."""
    worlds: list[World] = []

    def make(functions: Mapping[str, Mapping[str, Any]]) -> World:
        made = World(tmp_path, functions)
        worlds.append(made)
        return made

    yield make
    for made in worlds:
        while made.live:
            await made.stop()


async def ended_runs(engine: Engine, function: str, timeout: float = 15.0) -> list[Invocation]:
    """Every run of the function once ended, oldest first."""
    runs, _ = await engine.list(function=function, limit=1000)
    return [await engine.wait(run.request_id, timeout) for run in reversed(runs)]


def slot_of(run: Invocation) -> str:
    """The slot id the timer_echo handler saw."""
    assert run.status is Status.FINISHED, run
    return str(run.result["event"]["id"])


def created(run: Invocation) -> datetime:
    return datetime.fromisoformat(run.created_at)


def assert_consecutive(ids: list[str]) -> None:
    stamps = [parse_slot(i) for i in ids]
    assert all(b - a == timedelta(seconds=1) for a, b in zip(stamps, stamps[1:])), ids


async def test_every_second_fires_distinct_slots_with_scheduled_time_and_payload(world, handler, caplog):
    payload = {"kind": "tick", "n": 1, "nested": {"ok": True}}
    here = world({"tick": {"handler": handler("timer_echo"), "triggers": [timer(payload=payload)]}})
    engine, trigger = await here.start()
    with caplog.at_level(logging.INFO, logger="eventrun"):
        await asyncio.sleep(3.6)
    await trigger.stop()
    # A slot fired is a run, as an HTTP event is: no line of the server's log each (at INFO, a
    # schedule of every second wrote 86,400 a day).
    assert not [r.getMessage() for r in caplog.records if "accepted as" in r.getMessage()]
    runs = await ended_runs(engine, "tick")

    assert len(runs) >= 3, runs
    ids = [slot_of(run) for run in runs]
    assert len(set(ids)) == len(ids), ids
    assert ids == sorted(ids), "accepted in slot order"
    assert_consecutive(ids)
    for run in runs:
        event = run.result["event"]
        assert event["data"] == payload
        assert event["type"] == "eventrun.timer.fired"
        assert event["source"] == "timer://tick/every"
        assert event["eventruntrigger"] == "timer" and run.trigger == "timer"
        assert event["time"] == event["id"] and event["id"].endswith("Z")
        slot = parse_slot(event["id"])
        assert slot <= created(run) < slot + timedelta(seconds=2), "accepted at its slot, stamped with the slot"
    assert (await engine.get_state("timer:tick/every")) == ids[-1]
    assert trigger.state()["Schedules"][0]["LastFire"] == ids[-1]


async def test_a_restart_never_repeats_a_slot_and_skips_missed_ones_by_default(world, handler):
    here = world({"tick": {"handler": handler("timer_echo"), "triggers": [timer()]}})
    engine, _ = await here.start()
    await asyncio.sleep(2.3)
    await here.stop()

    await asyncio.sleep(1.5)  # at least one slot passes while down
    restarted = datetime.now(UTC)
    engine, trigger = await here.start()
    await asyncio.sleep(2.3)
    await trigger.stop()
    runs = await ended_runs(engine, "tick")
    ids = [slot_of(run) for run in runs]

    assert len(ids) == len(set(ids)), f"a slot ran twice: {ids}"
    first_life = [i for i, run in zip(ids, runs) if created(run) < restarted]
    second_life = [i for i, run in zip(ids, runs) if created(run) >= restarted]
    assert first_life and second_life, ids
    assert all(parse_slot(i) > restarted for i in second_life), "no slot from before the restart (catch_up is off)"
    assert_consecutive(first_life)
    assert_consecutive(second_life)

    # A slot handed in again (a stale scheduler, a second server) maps to the same run.
    again = await engine.accept_batch([to_envelope("tick", "every", parse_slot(ids[0]), None)])
    assert again[0].created is False and again[0].request_id == runs[0].request_id


async def test_two_timers_on_the_same_data_run_each_slot_once(world, handler):
    here = world({"tick": {"handler": handler("timer_echo"), "triggers": [timer()]}})
    engine, first = await here.start()
    second = TimerTrigger(engine, engine.manifest)  # a twin scheduler on the same store
    await second.start()
    try:
        await asyncio.sleep(2.6)
    finally:
        await second.stop()
    await first.stop()
    runs = await ended_runs(engine, "tick")
    ids = [slot_of(run) for run in runs]
    assert len(ids) >= 2 and len(ids) == len(set(ids)), ids
    assert_consecutive(ids)
    counters = [t.state()["Schedules"][0] for t in (first, second)]
    assert sum(c["Fired"] for c in counters) == len(ids)
    assert sum(c["Duplicates"] for c in counters) >= len(ids) - 1, counters


async def test_catch_up_runs_exactly_the_last_missed_slot_once(world, handler):
    here = world({"tock": {"handler": handler("timer_echo"), "triggers": [timer(catch_up=True)]}})
    await here.start()
    await asyncio.sleep(2.3)
    engine, _ = here.live[-1]
    last_before = max(slot_of(run) for run in await ended_runs(engine, "tock"))
    await here.stop()

    await asyncio.sleep(3.2)  # three or more slots are missed
    before = datetime.now(UTC)
    engine, trigger = await here.start()
    after = datetime.now(UTC)
    await asyncio.sleep(1.5)
    await trigger.stop()
    runs = await ended_runs(engine, "tock")
    ids = [slot_of(run) for run in runs]
    assert len(ids) == len(set(ids)), ids
    later = sorted(i for i in ids if i > last_before)

    caught_up = later[0]
    assert parse_slot(caught_up) <= after
    assert parse_slot(caught_up) >= before.replace(microsecond=0), "the LAST missed slot, not the first"
    assert parse_slot(caught_up) - parse_slot(last_before) >= timedelta(seconds=3), (last_before, caught_up)
    assert [run for run in runs if before <= created(run) <= after] == [
        run for run in runs if slot_of(run) == caught_up
    ], "exactly one run is accepted on start"
    assert all(parse_slot(i) > after for i in later[1:]), "then the schedule goes on from now"


async def test_overlap_false_skips_slots_while_the_previous_run_is_active(world, handler):
    slow = {"handler": handler("timer_sleepy"), "concurrency": 4, "timeout": "30s"}
    here = world(
        {
            "solo": {**slow, "triggers": [timer(overlap=False, payload={"seconds": 2.5})]},
            "crowd": {**slow, "triggers": [timer(payload={"seconds": 2.5})]},
        }
    )
    engine, trigger = await here.start()
    most = {"solo": 0, "crowd": 0}
    loop = asyncio.get_running_loop()
    until = loop.time() + 6.0
    while loop.time() < until:
        for name in most:
            most[name] = max(most[name], (await engine.active(name, f"timer://{name}/every")))
        await asyncio.sleep(0.05)
    await trigger.stop()
    skipped = trigger.state()["Schedules"][0]
    solo, _ = await engine.list(function="solo", limit=100)
    crowd, _ = await engine.list(function="crowd", limit=100)

    assert most["solo"] == 1, most
    assert most["crowd"] >= 2, f"control: with overlap the runs pile up ({most})"
    assert 1 <= len(solo) <= 3 < len(crowd), (len(solo), len(crowd))
    assert skipped["Function"] == "solo" and skipped["Skipped"] >= 2, skipped
    finished = sorted(
        (r for r in [(await engine.get(run.request_id)) for run in solo] if r.started_at and r.ended_at),
        key=lambda r: r.started_at or "",
    )
    for one, two in zip(finished, finished[1:]):
        assert (one.ended_at or "") <= (two.started_at or ""), "solo runs never overlap"


@pytest.mark.parametrize(
    ("trigger_table", "fragments"),
    [
        (timer(name="nightly", cron="0 0 2 * * 9 *"), ["day-of-week field '9'"]),
        (timer(name="nightly", cron="0 2 * *"), ["expected 7 fields", "got 4"]),
        (timer(name="nightly", timezone="Asia/Shangai"), ["timezone: unknown time zone 'Asia/Shangai'"]),
    ],
)
async def test_a_bad_cron_or_zone_is_refused_before_the_engine_starts(world, handler, trigger_table, fragments):
    here = world(
        {
            "fine": {"handler": handler("timer_echo"), "triggers": [timer()]},
            "report": {"handler": handler("timer_echo"), "triggers": [timer(name="ok"), trigger_table]},
        }
    )
    with pytest.raises(ManifestError) as caught:
        await here.start()
    message = str(caught.value)
    assert "functions.report.triggers[1]." in message and "(timer 'nightly')" in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert not here.live, "nothing started"
    assert not (here.data_dir / "eventrun.db").exists(), "the store was never opened"


# --------------------------------------------------------------------------- through `eventrun serve`


@pytest.mark.e2e
async def test_serve_runs_timers_and_reports_them(eventrun_server, http, handler, poll_until):
    functions = {"tick": {"handler": handler("timer_echo"), "triggers": [timer(payload={"kind": "tick"})]}}
    server = eventrun_server(functions)
    api = server.client(http)

    async def finished() -> list[dict[str, Any]]:
        reply = await api.list(function="tick", status="FINISHED")
        assert reply.status == 200, reply.text
        runs = reply.json["Invocations"]
        return runs if len(runs) >= 2 else []

    runs = await poll_until(finished, 15, "no timer runs finished")
    ids = set()
    for run in runs:
        state = await api.status(run["RequestId"])
        event = state["Result"]["event"]
        assert state["Trigger"] == "timer"
        assert event["source"] == "timer://tick/every" and event["data"] == {"kind": "tick"}
        ids.add(event["id"])
    assert len(ids) == len(runs)
    health = (await api.request("GET", "/healthz")).json
    schedule = health["Triggers"]["timer"]["Schedules"][0]
    assert schedule["Function"] == "tick" and schedule["Fired"] >= 2, health
    metrics = (await api.request("GET", "/metrics")).text
    fired = re.search(r'^eventrun_timer_fired_total\{function="tick",trigger="every"\} (\d+)$', metrics, re.M)
    assert fired is not None and int(fired.group(1)) >= 2, metrics
    assert re.search(r'^eventrun_timer_errors_total\{function="tick",trigger="every"\} 0$', metrics, re.M), metrics


@pytest.mark.e2e
def test_serve_refuses_a_bad_cron_naming_function_and_trigger(eventrun_server, handler):
    functions = {"report": {"handler": handler("timer_echo"), "triggers": [timer(name="nightly", cron="0 0 25 * * * *")]}}
    server = eventrun_server(functions, start=False)
    code = server.run_to_exit()
    stderr = server.stderr_text()
    assert code != 0, server.log_text()
    first = stderr.splitlines()[0]
    assert first.startswith(f"eventrun: {server.manifest_path}: functions.report.triggers[0].cron: '0 0 25 * * * *' (timer 'nightly'): "), stderr
    assert "hour field '25'" in first, stderr
    assert "Traceback" not in stderr, stderr


@pytest.mark.e2e
async def test_serve_timer_fires_again_after_a_postgresql_outage(postgres, postgres_link, eventrun_server, http, handler, poll_until):
    # Reported: PostgreSQL stopped for 3 s stopped a timer with overlap = false for good ("timer
    # tick/every2 stopped by an unexpected error", a ConnectionRefusedError while it counted the
    # runs going on), and /healthz still showed it running, with a NextFire long past.
    functions = {"tick": {"handler": handler("timer_echo"), "triggers": [timer(name="every2", cron="*/2 * * * * * *", overlap=False)]}}
    store = {"store": {"url": postgres_link.url(postgres)}, "cluster": {"node_id": "node-1"}}
    server = eventrun_server(functions, extra=store)
    api = server.client(http)

    async def timer_state() -> dict[str, Any]:
        return (await api.request("GET", "/healthz")).json["Triggers"]["timer"]  # type: ignore[no-any-return]

    async def fired(at_least: int) -> bool:
        return (await timer_state())["Schedules"][0]["Fired"] >= at_least

    await poll_until(lambda: fired(1), 15, "no slot fired before the outage")
    postgres_link.cut()
    await asyncio.sleep(3)
    postgres_link.mend()
    before = (await timer_state())["Schedules"][0]["Fired"]
    await poll_until(lambda: fired(before + 2), 15, "no slot fired after the outage")
    state = await timer_state()
    [schedule] = state["Schedules"]
    assert state["Status"] == "running" and schedule["Failure"] is None, state
    assert parse_slot(schedule["NextFire"]) > datetime.now(UTC) - timedelta(seconds=1), state
    log = server.log_text()
    assert "stopped by an unexpected error" not in log, log
    assert "Failed to restore the pool connection floor" not in log, log  # (asyncpg's, with a traceback each time)
