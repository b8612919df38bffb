"""The deliverer's pure parts, and its choice between trying again and giving up."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from eventrun.destinations import Deliverer, DeliveryFailed, log_tail, signature
from eventrun.engine.api import Delivery, Invocation, Outbox, Status


def test_the_signature_covers_the_time_and_the_body() -> None:
    header = signature("k", b'{"a":1}', now=1_700_000_000)
    assert header == "t=1700000000,v1=" + hmac.new(b"k", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    assert signature("k", b'{"a":2}', now=1_700_000_000) != header
    assert signature("other", b'{"a":1}', now=1_700_000_000) != header


def test_a_log_tail_starts_at_a_line_and_keeps_the_end() -> None:
    log = b"".join(b"line %d\n" % i for i in range(1000))
    tail = log_tail(log, limit=100)
    assert tail.endswith("line 999\n") and tail.startswith("line ")
    assert len(tail.encode()) <= 100
    assert log_tail(b"short\n") == "short\n"
    assert log_tail(b"\xff\xfe broken utf-8\n") == "\ufffd\ufffd broken utf-8\n"


class FakeStore:
    def __init__(self, ended_at: str) -> None:
        self.ended_at = ended_at
        self.settled: list[dict[str, Any]] = []

    async def get(self, request_id: str) -> Invocation:
        return Invocation(request_id=request_id, function="f", trigger="http", status=Status.FAILED, created_at=self.ended_at, ended_at=self.ended_at)

    async def settle_delivery(self, delivery_id: int, **outcome: Any) -> None:
        self.settled.append(outcome)


async def attempt_failing(ended_at: str, attempts: int) -> dict[str, Any]:
    store = FakeStore(ended_at)
    engine = SimpleNamespace(store=store)
    manifest = SimpleNamespace(functions={})
    deliverer = Deliverer(engine, manifest)  # type: ignore[arg-type]

    async def fail(_delivery: Delivery) -> None:
        raise DeliveryFailed("HTTP 503 busy")

    deliverer._make = fail  # type: ignore[method-assign]
    await deliverer._attempt(Delivery(1, "01a2461d-5009-7000-b391-852c8a6cf159", "f", "callback", "http://x", attempts))
    (outcome,) = store.settled
    return outcome


async def test_a_failing_delivery_backs_off_then_is_given_up_a_day_after_the_end() -> None:
    recent = await attempt_failing("2999-01-01T00:00:00.000Z", attempts=3)
    assert recent == {"error": "HTTP 503 busy", "retry_in": 8.0}
    capped = await attempt_failing("2999-01-01T00:00:00.000Z", attempts=40)
    assert capped["retry_in"] == 300.0
    old = await attempt_failing("2020-01-01T00:00:00.000Z", attempts=200)
    assert old == {"error": "HTTP 503 busy", "give_up": True}


class OutboxStore:
    """An outbox that says when its next delivery is due, and counts the claims made on it."""

    def __init__(self, next_in: float | None, due: int = 0) -> None:
        self.next_in = next_in
        self.due = due
        self.claims = 0
        self.counts = 0  # passes over the whole outbox

    async def outbox(self) -> Outbox:
        self.counts += 1
        return Outbox(pending=self.due, given_up=0)

    async def next_delivery(self) -> float | None:
        return self.next_in

    async def claim_deliveries(self, limit: int, lease: float) -> list[Delivery]:
        self.claims += 1
        claimed = [Delivery(i, f"r{i}", "f", "callback", "http://x", 0) for i in range(min(limit, self.due))]
        self.due -= len(claimed)
        return claimed


def deliverer_on(store: OutboxStore, destinations: dict[str, list[tuple[str, str]]]) -> Deliverer:
    functions = {name: SimpleNamespace(destinations=pairs) for name, pairs in destinations.items()}
    deliverer = Deliverer(SimpleNamespace(store=store), SimpleNamespace(functions=functions), poll=1.0)  # type: ignore[arg-type]

    async def delivered(_delivery: Delivery) -> None:
        return None

    deliverer._attempt = delivered  # type: ignore[method-assign]
    return deliverer


async def test_the_outbox_is_claimed_from_only_when_a_delivery_is_due() -> None:
    empty = OutboxStore(next_in=None)
    assert await deliverer_on(empty, {})._round() == 1.0
    later = OutboxStore(next_in=0.25, due=1)
    assert await deliverer_on(later, {})._round() == 0.25
    assert empty.claims == later.claims == 0, "a claim is a write: none while nothing is due"
    due = OutboxStore(next_in=-0.5, due=3)
    assert await deliverer_on(due, {})._round() == 0.0, "after a claim, look again at once"
    assert (due.claims, due.due) == (1, 0)


def test_only_the_end_of_a_run_owing_deliveries_wakes_the_deliverer() -> None:
    deliverer = deliverer_on(OutboxStore(next_in=None), {"owes": [("callback", "http://x")], "quiet": []})
    ended = {name: Invocation(request_id="r", function=name, trigger="http", status=Status.FAILED, created_at="t") for name in ("owes", "quiet")}
    deliverer._on_end(ended["quiet"])
    assert not deliverer._wake.is_set()
    deliverer._on_end(ended["owes"])
    assert deliverer._wake.is_set()


async def test_the_outbox_is_counted_in_the_background_at_most_once_a_poll() -> None:
    store = OutboxStore(next_in=30.0, due=7)
    deliverer = deliverer_on(store, {})
    for _ in range(5):  # e.g. five runs owing deliveries ended in a row
        assert await deliverer._round() == 1.0
    await asyncio.sleep(0.01)
    assert (store.counts, deliverer.pending) == (1, 7), "one count, shown in /healthz and /metrics"
    assert deliverer.state()["pending"] == 7 and "eventrun_outbox_pending 7" in deliverer.metrics()


async def test_an_outbox_the_store_cannot_read_is_logged_once_and_its_recovery_once(caplog: pytest.LogCaptureFixture) -> None:
    # A PostgreSQL outage wrote a traceback every poll; now one line, then one when it reads again.
    from eventrun.engine.errors import StoreError

    class Down(OutboxStore):
        failing = 3

        async def next_delivery(self) -> float | None:
            if self.failing:
                self.failing -= 1
                raise StoreError("the PostgreSQL store cannot serve this now (ConnectionRefusedError)")
            return await super().next_delivery()

    store = Down(next_in=None)
    deliverer = deliverer_on(store, {})
    deliverer._poll = 0.01
    with caplog.at_level(logging.WARNING, logger="eventrun.destinations"):
        task = asyncio.create_task(deliverer._deliver_forever())
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not store.failing:
                break
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if m.startswith("reading the outbox failed")] == [
        "reading the outbox failed (the PostgreSQL store cannot serve this now (ConnectionRefusedError)); trying again every 0.01s"
    ]
    assert "the outbox is read again, after 3 failed rounds" in messages
    assert not any(r.exc_info for r in caplog.records), "no traceback for a store that cannot serve"
