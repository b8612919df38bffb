"""The dispatcher: FIFO per function, per-function concurrency, the global cap, QPS buckets."""

from __future__ import annotations

import asyncio

import pytest

from eventrun.engine import dispatcher as dispatcher_module
from eventrun.engine.dispatcher import Dispatcher, QpsWindow
from eventrun.engine.errors import Throttled


class Recorder:
    """An execute() whose runs last until released, recording their order."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}

    async def __call__(self, function: str, request_id: str) -> None:
        self.started.append(request_id)
        gate = self.gates.setdefault(request_id, asyncio.Event())
        await gate.wait()

    def release(self, request_id: str) -> None:
        self.gates.setdefault(request_id, asyncio.Event()).set()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_runs_start_in_order_up_to_the_function_concurrency() -> None:
    runs = Recorder()
    dispatcher = Dispatcher(concurrency={"f": 2}, qps_limits={"f": 100}, max_running=10, execute=runs)
    for i in range(5):
        dispatcher.submit("f", f"r{i}")
    await settle()
    assert runs.started == ["r0", "r1"]
    assert (dispatcher.running("f"), dispatcher.queued("f")) == (2, 3)
    runs.release("r1")
    await settle()
    assert runs.started == ["r0", "r1", "r2"]
    for i in range(5):
        runs.release(f"r{i}")
    await settle()
    assert runs.started == [f"r{i}" for i in range(5)]
    assert dispatcher.total_running == 0


async def test_the_global_cap_is_shared_fairly_between_functions() -> None:
    runs = Recorder()
    dispatcher = Dispatcher(concurrency={"a": 5, "b": 5}, qps_limits={"a": 9, "b": 9}, max_running=2, execute=runs)
    for i in range(4):
        dispatcher.submit("a", f"a{i}")  # a0 and a1 take both slots at once
    for i in range(2):
        dispatcher.submit("b", f"b{i}")
    await settle()
    assert runs.started == ["a0", "a1"]
    # From here both functions wait: freed slots alternate between them.
    for done in ("a0", "a1", "b0"):
        runs.release(done)
        await settle()
    assert runs.started == ["a0", "a1", "b0", "a2", "b1"]
    assert dispatcher.total_running == 2
    for request_id in ("a2", "a3", "b1"):
        runs.release(request_id)
    while dispatcher.queued("a") or dispatcher.queued("b") or dispatcher.total_running:
        await dispatcher.drain(1)
        await settle()
    assert runs.started == ["a0", "a1", "b0", "a2", "b1", "a3"]


async def test_a_queued_run_can_be_removed_but_not_a_started_one() -> None:
    runs = Recorder()
    dispatcher = Dispatcher(concurrency={"f": 1}, qps_limits={"f": 9}, max_running=9, execute=runs)
    dispatcher.submit("f", "r0")
    dispatcher.submit("f", "r1")
    await settle()
    assert dispatcher.remove("f", "r1")
    assert not dispatcher.remove("f", "r0")
    runs.release("r0")
    await settle()
    assert runs.started == ["r0"]


async def test_cancel_all_cancels_runs_going_and_lets_released_ones_record_their_end() -> None:
    outcomes: dict[str, str] = {}
    ending = asyncio.Event()  # a store slow to commit: the released run's end waits for it

    async def execute(function: str, request_id: str) -> None:
        if request_id == "running":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                outcomes[request_id] = "cancelled"
                raise
        dispatcher.release(function, request_id)  # its slot goes; only its end is left to record
        try:
            await ending.wait()
        except asyncio.CancelledError:
            outcomes[request_id] = "end cancelled"
            raise
        outcomes[request_id] = "end recorded"

    dispatcher = Dispatcher(concurrency={"f": 2}, qps_limits={"f": 9}, max_running=9, execute=execute)
    dispatcher.submit("f", "running", "ending")
    await settle()
    asyncio.get_running_loop().call_later(0.05, ending.set)
    await dispatcher.cancel_all(5.0)
    assert outcomes == {"running": "cancelled", "ending": "end recorded"}

    # An end that takes longer than the grace (a store that refuses it) is cancelled after it.
    ending.clear()
    outcomes.clear()
    dispatcher = Dispatcher(concurrency={"f": 2}, qps_limits={"f": 9}, max_running=9, execute=execute)
    dispatcher.submit("f", "stuck")
    await settle()
    await dispatcher.cancel_all(0.05)
    assert outcomes == {"stuck": "end cancelled"}
    assert dispatcher.task("stuck") is None


async def test_pause_starts_nothing_new_and_drain_reports_what_still_runs() -> None:
    runs = Recorder()
    dispatcher = Dispatcher(concurrency={"f": 1}, qps_limits={"f": 9}, max_running=9, execute=runs)
    dispatcher.submit("f", "r0")
    await settle()
    dispatcher.pause()
    dispatcher.submit("f", "r1")
    assert await dispatcher.drain(0.05) == {"r0"}
    await dispatcher.cancel_all(1.0)
    assert runs.started == ["r0"]
    assert dispatcher.queued("f") == 1


def test_the_qps_window_lets_in_the_rate_in_any_one_second(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(dispatcher_module.time, "monotonic", lambda: clock[0])
    window = QpsWindow(3)
    assert [window.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert window.take() == pytest.approx(1.0)
    clock[0] = 100.5
    assert window.take() == pytest.approx(0.5), "no more until the first is a second old"
    clock[0] = 101.0
    assert window.take() == 0.0 and window.take() == 0.0 and window.take() == 0.0
    assert window.take() == pytest.approx(1.0), "a token bucket would let in 3 more here: 6 in one second"
    window.give_back()  # the last one was a repeat
    assert window.take() == 0.0
    window.rate = 1  # this node's share shrank: the 3 of the last second must age out first
    clock[0] = 101.5
    assert window.take() == pytest.approx(0.5)


def test_throttle_names_the_function_and_gives_a_whole_retry_after() -> None:
    dispatcher = Dispatcher(concurrency={"f": 1}, qps_limits={"f": 1}, max_running=1, execute=Recorder())
    dispatcher.throttle("f")
    with pytest.raises(Throttled) as caught:
        dispatcher.throttle("f")
    assert caught.value.retry_after >= 1
    assert "'f'" in str(caught.value) and "1 events per second" in str(caught.value)


async def test_a_run_that_releases_its_slot_lets_the_next_start_while_it_records_its_end() -> None:
    runs = Recorder()
    dispatcher = Dispatcher(concurrency={"f": 1}, qps_limits={"f": 100}, max_running=1, execute=runs)
    dispatcher.submit("f", "r0", "r1", "r2")
    await settle()
    assert runs.started == ["r0"]
    dispatcher.release("f", "r0")  # r0's instance is free; it still records its end
    await settle()
    assert runs.started == ["r0", "r1"]
    assert (dispatcher.running("f"), dispatcher.total_running, dispatcher.queued("f")) == (1, 1, 1)
    runs.release("r0")  # r0 ends: its slot is not given back twice
    await settle()
    assert runs.started == ["r0", "r1"]
    assert dispatcher.running("f") == 1
    runs.release("r1")
    await settle()
    assert runs.started == ["r0", "r1", "r2"]
    runs.release("r2")
    await settle()
    assert (dispatcher.running("f"), dispatcher.total_running) == (0, 0)


async def test_free_slots_count_the_function_the_global_cap_and_what_waits() -> None:
    runs = Recorder()
    dispatcher = Dispatcher(concurrency={"f": 3, "g": 5}, qps_limits={"f": 1, "g": 1}, max_running=4, execute=runs)
    assert (dispatcher.free("f"), dispatcher.free("g")) == (3, 4)
    dispatcher.submit("f", "f0", "f1")
    await settle()
    assert (dispatcher.free("f"), dispatcher.free("g")) == (1, 2)
    dispatcher.submit("g", "g0", "g1", "g2")  # two start, one waits for the global cap
    await settle()
    assert (dispatcher.free("f"), dispatcher.free("g")) == (0, 0)
    assert dispatcher.take_queued() == ["g2"] and dispatcher.queued("g") == 0
    dispatcher.pause()
    runs.release("f0")
    await settle()
    assert dispatcher.free("f") == 0, "a paused dispatcher takes nothing more"
    for rid in ("f1", "g0", "g1"):
        runs.release(rid)
    await settle()


def test_a_shared_qps_limit_takes_the_node_s_share() -> None:
    dispatcher = Dispatcher(concurrency={"f": 1}, qps_limits={"f": 10}, max_running=1, execute=Recorder())
    dispatcher.share_qps({"f": 3})  # (a third of 10 on each of three nodes)
    for _ in range(3):
        dispatcher.throttle("f")
    with pytest.raises(Throttled, match=r"at most 10 events per second across the nodes \(3 a second on this one\)"):
        dispatcher.throttle("f")


async def test_a_run_starts_now_only_with_a_free_slot_and_nothing_waiting() -> None:
    runs = Recorder()
    dispatcher = Dispatcher(concurrency={"f": 2, "g": 1}, qps_limits={"f": 9, "g": 9}, max_running=2, execute=runs)
    assert dispatcher.can_start("f")
    dispatcher.start_now("f", "now")
    await settle()
    assert runs.started == ["now"] and dispatcher.running("f") == 1
    dispatcher.submit("g", "g0")  # takes the last global slot
    await settle()
    assert not dispatcher.can_start("f"), "the global cap is reached"
    runs.release("g0")
    await settle()
    assert dispatcher.can_start("f")
    dispatcher.submit("f", "queued-a")
    dispatcher.submit("f", "queued-b")  # concurrency 2: waits behind "now" and "queued-a"
    await settle()
    assert dispatcher.queued("f") == 1
    assert not dispatcher.can_start("f"), "a run that waits goes first"
    with pytest.raises(RuntimeError):
        dispatcher.start_now("f", "jumper")
    for request_id in ("now", "queued-a", "queued-b"):
        runs.release(request_id)
    await settle()
    assert runs.started == ["now", "g0", "queued-a", "queued-b"]
    dispatcher.pause()
    assert not dispatcher.can_start("f"), "nothing starts while shutting down"


async def test_a_run_retried_later_is_next_of_its_function_and_nothing_starts_while_held() -> None:
    started: list[str] = []
    refused = {"r0"}
    dispatcher: Dispatcher

    async def execute(function: str, request_id: str) -> None:
        started.append(request_id)
        if request_id in refused:  # as the engine does when the store refuses a start
            refused.discard(request_id)
            dispatcher.retry_later(function, request_id, 0.2)

    dispatcher = Dispatcher(concurrency={"f": 1, "g": 1}, qps_limits={"f": 100, "g": 100}, max_running=10, execute=execute)
    dispatcher.submit("f", "r0", "r1")
    await settle()
    assert started == ["r0"]
    dispatcher.submit("g", "g0")  # another function's run waits too: nothing starts while held
    await settle()
    assert started == ["r0"] and dispatcher.queued("f") == 2 and dispatcher.free("g") == 0
    await asyncio.sleep(0.3)
    assert sorted(started[1:]) == ["g0", "r0", "r1"] and started.index("r0", 1) < started.index("r1")
    assert dispatcher.total_running == 0 and dispatcher.queued("f") == 0


async def test_a_function_this_node_does_not_serve_has_nothing_queued_or_running_here() -> None:
    # With a shared store, a terminate of another node's run of such a function asked this one
    # to take it out of its queue: a KeyError, and the terminate answered 500.
    runs = Recorder()
    dispatcher = Dispatcher(concurrency={"f": 1}, qps_limits={"f": 100}, max_running=10, execute=runs)
    assert dispatcher.remove("only1", "r1") is False
    assert (dispatcher.queued("only1"), dispatcher.running("only1")) == (0, 0)
