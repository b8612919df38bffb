"""The outbox: what a run's end owes is written by the end's own commit, claimed under a lease, settled once."""

from __future__ import annotations

import asyncio
import time

from eventrun.engine.api import Status
from eventrun.engine.envelope import now_rfc3339
from eventrun.engine.postgres import PostgresStore
from eventrun.engine.store import SQLiteStore

from test_store import row

Store = SQLiteStore | PostgresStore

OURS = ("f", "g")  # the functions of the claiming node's manifest
DESTINATIONS = {"f": [("callback", "http://receiver/done"), ("on_failure", "kafka:failures")], "g": []}


async def ended(store: Store, status: Status, *, function: str = "f") -> str:
    new = row(f"e-{time.monotonic_ns()}", function=function)
    await store.accept([new])
    await store.mark_running(new.request_id, now_rfc3339())
    assert await store.finish(new.request_id, status, now_rfc3339(), error_type=None if status is Status.FINISHED else "E")
    return new.request_id


async def test_each_end_owes_its_function_s_destinations(store: Store) -> None:
    await store.set_destinations(DESTINATIONS)
    finished = await ended(store, Status.FINISHED)
    failed = await ended(store, Status.FAILED)
    timed_out = await ended(store, Status.TIMED_OUT)
    aborted = await ended(store, Status.ABORTED)
    await ended(store, Status.FAILED, function="g")  # no destinations: owes nothing

    owed = {(d.request_id, d.kind, d.target) for d in await store.claim_deliveries(100, 60, OURS)}
    assert owed == {
        (finished, "callback", "http://receiver/done"),
        (failed, "callback", "http://receiver/done"),
        (failed, "on_failure", "kafka:failures"),
        (timed_out, "callback", "http://receiver/done"),
        (timed_out, "on_failure", "kafka:failures"),
        (aborted, "callback", "http://receiver/done"),
    }


async def test_a_second_end_of_a_run_owes_nothing_more(store: Store) -> None:
    await store.set_destinations(DESTINATIONS)
    request_id = await ended(store, Status.FINISHED)
    assert not await store.finish(request_id, Status.ABORTED, now_rfc3339())
    assert [d.kind for d in await store.claim_deliveries(100, 60, OURS)] == ["callback"]


async def test_a_claim_holds_until_settled_or_its_lease_runs_out(store: Store) -> None:
    await store.set_destinations({"f": [("callback", "http://receiver/done")]})
    first = await ended(store, Status.FINISHED)
    second = await ended(store, Status.FINISHED)

    held = await store.claim_deliveries(1, 0.3, OURS)
    assert [d.request_id for d in held] == [first], "oldest first, no more than asked"
    assert [d.request_id for d in await store.claim_deliveries(10, 60, OURS)] == [second]
    assert await store.claim_deliveries(10, 60, OURS) == [], "both are held"

    await asyncio.sleep(0.5)  # the first claim (0.3 s) runs out: another attempt may take it
    (again,) = await store.claim_deliveries(10, 60, OURS)
    assert (again.id, again.request_id, again.attempts) == (held[0].id, first, 0)

    await store.settle_delivery(again.id)
    outbox = await store.outbox()
    assert (outbox.pending, outbox.given_up) == (1, 0), "the delivered one is gone, the second still held"


async def test_a_claim_takes_none_to_a_busy_target(store: Store) -> None:
    # A receiver that hangs: the deliverer has as many attempts under way to it as it allows, so
    # the claim passes over its deliveries and takes the others' behind them.
    await store.set_destinations({"f": [("callback", "http://receiver/hangs")], "g": [("callback", "http://receiver/g")]})
    hung = [await ended(store, Status.FINISHED) for _ in range(3)]
    of_g = await ended(store, Status.FINISHED, function="g")
    busy = ["http://receiver/hangs"]
    assert [d.request_id for d in await store.claim_deliveries(2, 60, OURS, busy=busy)] == [of_g]
    assert await store.claim_deliveries(2, 60, OURS, busy=[*busy, "http://receiver/g"]) == []
    assert [d.request_id for d in await store.claim_deliveries(10, 60, OURS, busy=[])] == hung


async def test_a_node_claims_the_deliveries_of_a_function_it_lacks_only_once_they_are_overdue(postgres_store: PostgresStore) -> None:
    # Nodes with different manifests (a function being added node by node): one that lacks the
    # function took its deliveries and failed them (no callback_secret), delaying them for the
    # node that has it. A delivery no node takes (its function gone from every manifest) is
    # still taken in the end, to be tried and given up.
    store = postgres_store
    await store.set_destinations({"f": [("callback", "http://receiver/f")], "g": [("callback", "http://receiver/g")]})
    of_f = await ended(store, Status.FINISHED)
    of_g = await ended(store, Status.FINISHED, function="g")
    assert [d.request_id for d in await store.claim_deliveries(10, 60, ["g"], strays_after=0.5)] == [of_g]
    assert await store.claim_deliveries(10, 60, ["g"], strays_after=0.5) == [], "f's is left to a node that has f"
    await asyncio.sleep(0.6)
    assert [d.request_id for d in await store.claim_deliveries(10, 60, ["g"], strays_after=0.5)] == [of_f]


async def test_a_failed_attempt_is_tried_again_later_and_a_refused_one_given_up(store: Store) -> None:
    await store.set_destinations({"f": [("callback", "http://receiver/done")]})
    retried = await ended(store, Status.FINISHED)
    refused = await ended(store, Status.FINISHED)
    first, second = await store.claim_deliveries(10, 60, OURS)

    await store.settle_delivery(first.id, retry_in=0.3, error="HTTP 503")
    await store.settle_delivery(second.id, error="HTTP 400 bad", give_up=True)
    outbox = await store.outbox()
    assert (outbox.pending, outbox.given_up) == (1, 1)
    next_in = await store.next_delivery()
    assert next_in is not None and 0 < next_in <= 0.3, "the retry is due in 0.3 s"
    assert await store.claim_deliveries(10, 60, OURS) == [], "not due yet"

    await asyncio.sleep(0.4)
    (again,) = await store.claim_deliveries(10, 60, OURS)
    assert (again.request_id, again.attempts) == (retried, 1)
    assert refused != retried


async def test_claims_cut_off_by_a_stop_are_due_again_at_once(store: Store) -> None:
    await store.set_destinations({"f": [("callback", "http://receiver/done")]})
    request_id = await ended(store, Status.FINISHED)
    assert len(await store.claim_deliveries(10, 3600, OURS)) == 1
    await store.release_deliveries()
    (again,) = await store.claim_deliveries(10, 60, OURS)
    assert again.request_id == request_id


async def test_destinations_are_replaced_by_the_next_manifest(store: Store) -> None:
    await store.set_destinations(DESTINATIONS)
    await store.set_destinations({"f": [("on_failure", "http://receiver/failed")]})
    await ended(store, Status.FINISHED)
    failed = await ended(store, Status.FAILED)
    assert [(d.request_id, d.kind, d.target) for d in await store.claim_deliveries(10, 60, OURS)] == [
        (failed, "on_failure", "http://receiver/failed")
    ]


async def test_a_function_the_next_manifest_lacks_keeps_its_destinations(store: Store) -> None:
    # Dropped from the manifest, its runs still end (a restart ends them FAILED): what they owe
    # is held for a manifest that has it again. The SQLite store used to forget them.
    await store.set_destinations(DESTINATIONS)
    await store.set_destinations({"g": [("callback", "http://receiver/g")]})  # f is gone
    failed = await ended(store, Status.FAILED)
    assert {(d.request_id, d.kind) for d in await store.claim_deliveries(10, 60, OURS)} == {
        (failed, "callback"),
        (failed, "on_failure"),
    }


async def test_a_run_with_a_delivery_owed_outlives_its_retention(store: Store) -> None:
    await store.set_destinations({"f": [("callback", "http://receiver/done")]})
    owed = await ended(store, Status.FINISHED)
    given_up = await ended(store, Status.FINISHED)
    await store.set_destinations({"f": []})  # (a manifest that has f with none)
    plain = await ended(store, Status.FINISHED)
    first, second = await store.claim_deliveries(10, 60, OURS)
    assert (first.request_id, second.request_id) == (owed, given_up)
    await store.settle_delivery(second.id, error="HTTP 410", give_up=True)

    time.sleep(0.005)
    assert sorted(await store.prune(int(time.time() * 1000))) == sorted([given_up, plain])
    assert await store.get(owed) is not None
    assert (await store.outbox()).given_up == 0, "a given-up delivery goes with its run"


async def test_deliveries_of_a_run_ended_by_recovery_are_owed_too(sqlite_store: SQLiteStore) -> None:
    store = sqlite_store
    await store.set_destinations({"f": [("on_failure", "http://receiver/failed")]})
    new = row("cut-short")
    await store.accept([new])
    await store.mark_running(new.request_id, now_rfc3339())
    assert await store.recover(now_rfc3339(), "the server stopped") == [new.request_id]
    (owed,) = await store.claim_deliveries(10, 60, OURS)
    assert (owed.request_id, owed.kind) == (new.request_id, "on_failure")


async def test_a_run_of_a_dead_node_owes_its_deliveries(postgres_store: PostgresStore, postgres: str) -> None:
    store = postgres_store
    await store.set_destinations({"f": [("on_failure", "http://receiver/failed")]})
    other = PostgresStore(postgres, "node-b")
    await other.open()
    try:
        await other.join("http://b", lease=60)
        new = row("on-b")
        await other.accept([new])
        assert await other.claim("f", 1, 10) == [new.request_id]
        assert await other.mark_running(new.request_id, now_rfc3339())
    finally:
        await other.close()
    ended_runs = await store.fail_runs_of(["node-b"], now_rfc3339(), "NodeLost", lambda n: f"{n} was lost")
    assert ended_runs == [(new.request_id, "f")]
    (owed,) = await store.claim_deliveries(10, 60, OURS)
    assert (owed.request_id, owed.kind) == (new.request_id, "on_failure")


async def test_two_nodes_never_hold_one_delivery_at_once(postgres_store: PostgresStore, postgres: str) -> None:
    store = postgres_store
    await store.set_destinations({"f": [("callback", "http://receiver/done")]})
    owed = {await ended(store, Status.FINISHED) for _ in range(40)}
    other = PostgresStore(postgres, "node-b")
    await other.open()
    try:
        a, b = [], []
        for _ in range(8):
            got_a, got_b = await asyncio.gather(store.claim_deliveries(3, 60, OURS), other.claim_deliveries(3, 60, OURS))
            a += got_a
            b += got_b
        assert not {d.id for d in a} & {d.id for d in b}
        assert {d.request_id for d in a + b} == owed
    finally:
        await other.close()


async def test_when_the_next_delivery_is_due_is_known_without_counting(store: Store) -> None:
    assert await store.next_delivery() is None, "nothing pending"
    await store.set_destinations({"f": [("callback", "http://receiver/done")]})
    await ended(store, Status.FINISHED)
    next_in = await store.next_delivery()
    assert next_in is not None and next_in <= 0, "due at once"
    (claimed,) = await store.claim_deliveries(10, 60, OURS)
    held = await store.next_delivery()
    assert held is not None and 59 < held <= 60, "a claimed one is due again when its claim runs out"
    await store.settle_delivery(claimed.id, error="HTTP 410", give_up=True)
    assert await store.next_delivery() is None, "given up: no longer pending"


async def test_the_sqlite_outbox_is_counted_off_the_event_loop(sqlite_store: SQLiteStore) -> None:
    counting = sqlite_store._read_outbox

    def slow_count() -> tuple[int, int, int | None]:
        time.sleep(0.3)  # a pass over a large outbox
        return counting()

    sqlite_store._read_outbox = slow_count  # type: ignore[method-assign]
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(tick())
    try:
        await asyncio.sleep(0)
        before = ticks
        await sqlite_store.outbox()
        assert ticks - before >= 10, "the event loop went on while the outbox was counted"
    finally:
        ticking.cancel()
