"""The deliverer's pure parts, and its choice between trying again and giving up."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, AsyncIterator, Collection

import aiohttp
import orjson
import pytest
import yarl
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import SecretStr

from eventrun.destinations import (
    LOG_TAIL, Deliverer, DeliveryFailed, Undeliverable, log_tail, retry_after, shown_target, signature,
)
from eventrun.engine.api import Delivery, Invocation, Outbox, Status
from eventrun.engine.manifest import KafkaConfig


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
    long_line = b"start\n" + "\u00e9".encode() * 5000 + b"\n"  # a last line of 10,001 bytes
    assert log_tail(long_line, limit=4096) == "\u00e9" * 2047 + "\n", "its end, from a whole character"
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

    async def claim_deliveries(
        self, limit: int, lease: float, functions: Collection[str], *, busy: Collection[str] = ()
    ) -> list[Delivery]:
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


async def test_attempts_the_store_cannot_record_are_logged_once_and_their_recovery_once(caplog: pytest.LogCaptureFixture) -> None:
    # A PostgreSQL outage wrote a traceback for every attempt; now one line, then one when it records again.
    from eventrun.engine.errors import StoreError

    class Down(FakeStore):
        failing = 3

        async def settle_delivery(self, delivery_id: int, **outcome: Any) -> None:
            if self.failing:
                self.failing -= 1
                raise StoreError("the PostgreSQL store cannot serve this now (ConnectionRefusedError)")
            await super().settle_delivery(delivery_id, **outcome)

    store = Down(RECENT)
    deliverer = Deliverer(SimpleNamespace(store=store), SimpleNamespace(functions={}))  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="eventrun.destinations"):
        for n in range(4):
            await deliverer._settle(Delivery(n, f"r{n}", "f", "callback", "http://x", 0))
    assert [r.getMessage() for r in caplog.records] == [
        "could not record the attempt to deliver callback of r0"
        " (the PostgreSQL store cannot serve this now (ConnectionRefusedError)); it goes again once its claim runs out",
        "attempts to deliver are recorded again (2 more failed since the last such line)",
    ]
    assert not any(r.exc_info for r in caplog.records), "no traceback for a store that cannot serve"
    assert store.settled == [{}]


# -- one target's attempts at once ------------------------------------------------------------

HANG, OK = "http://hangs.example/hook", "http://answers.example/hook"


class TargetedOutbox(FakeStore):
    """An outbox of deliveries waiting in order, claimed as the stores claim them: oldest first,
    none to a busy target."""

    def __init__(self, targets: list[str]) -> None:
        super().__init__(RECENT)
        self.waiting = [Delivery(n, f"r{n}", "f", "callback", target, 0) for n, target in enumerate(targets)]

    async def outbox(self) -> Outbox:
        return Outbox(pending=len(self.waiting), given_up=0)

    async def next_delivery(self) -> float | None:
        return -1.0 if self.waiting else None

    async def claim_deliveries(
        self, limit: int, lease: float, functions: Collection[str], *, busy: Collection[str] = ()
    ) -> list[Delivery]:
        claimed = [d for d in self.waiting if d.target not in busy][:limit]
        self.waiting = [d for d in self.waiting if d not in claimed]
        return claimed


@contextlib.asynccontextmanager
async def delivering(store: TargetedOutbox, *targets: str) -> AsyncIterator[tuple[Deliverer, list[str]]]:
    """A deliverer (16 slots) over the store whose HANG receiver never answers, for a manifest
    whose one function has these targets as destinations; the targets delivered to."""
    function = SimpleNamespace(destinations=[("callback", target) for target in targets])
    manifest = SimpleNamespace(functions={"f": function})
    deliverer = Deliverer(SimpleNamespace(store=store), manifest)  # type: ignore[arg-type]
    delivered: list[str] = []
    never = asyncio.Event()

    async def make(delivery: Delivery) -> None:
        if delivery.target == HANG:
            await never.wait()
        delivered.append(delivery.target)

    deliverer._make = make  # type: ignore[method-assign]
    try:
        yield deliverer, delivered
    finally:
        for task in deliverer._attempts:
            task.cancel()
        await asyncio.gather(*deliverer._attempts, return_exceptions=True)


async def rounds(deliverer: Deliverer, count: int) -> None:
    for _ in range(count):
        await deliverer._round()
        await asyncio.sleep(0)  # (the attempts started go as far as they can)


async def test_a_receiver_that_hangs_holds_half_the_slots_and_the_others_go_at_once() -> None:
    # One pool of 16 slots, claimed oldest first: 48 deliveries to a hung receiver held all 16,
    # and a delivery to another receiver, behind them, left 31 s later.
    store = TargetedOutbox([HANG] * 48 + [OK])
    async with delivering(store, HANG, OK) as (deliverer, delivered):
        await rounds(deliverer, 5)
        assert delivered == [OK], "the answering receiver's delivery went, behind the hung ones"
        assert deliverer._under_way == {HANG: 8}, "the hung receiver holds 16 // 2 slots, no more"
        assert len(store.waiting) == 40


async def test_a_claim_takes_no_more_than_a_target_under_way_has_room_for() -> None:
    store = TargetedOutbox([HANG] * 7)
    async with delivering(store) as (deliverer, _):
        await rounds(deliverer, 1)
        assert deliverer._under_way == {HANG: 7}
        store.waiting = TargetedOutbox([HANG] * 6).waiting  # more due to it
        await rounds(deliverer, 3)
        assert deliverer._under_way == {HANG: 8}, "room for one more, so a claim of one"


async def test_the_manifests_only_target_has_every_slot() -> None:
    # Halving the slots for a manifest with one receiver halved its deliveries at once for nothing.
    store = TargetedOutbox([HANG] * 40)
    async with delivering(store, HANG) as (deliverer, _):
        await rounds(deliverer, 4)
        assert deliverer._under_way == {HANG: 16}


async def test_a_stray_for_another_target_gets_its_share_beside_the_only_target() -> None:
    # Another node's overdue deliveries (strays) may go to targets this manifest does not name.
    store = TargetedOutbox([OK] * 20 + [HANG] * 20)
    async with delivering(store, HANG) as (deliverer, delivered):
        deliverer._make = lambda delivery: asyncio.Event().wait()  # type: ignore[assignment,method-assign]
        await rounds(deliverer, 6)
        assert deliverer._under_way == {OK: 8, HANG: 8}, "the stray's target is capped at half, the rest is HANG's"


# -- one delivery to a URL, against a local receiver ------------------------------------------

RECENT = "2999-01-01T00:00:00.000Z"  # a run's end that is not a day old
REQUEST_ID = "01a2461d-5009-7000-b391-852c8a6cf159"


@dataclass
class Hooks:
    """A local receiver: /ok takes a POST (and a GET), /moved/{status} redirects to /ok, /endless
    refuses with an answer that never ends, /busy/{status}?after=... answers with that status and
    that Retry-After."""

    url: str = ""
    seen: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)  # method, path, headers, body


@pytest.fixture
async def hooks() -> AsyncIterator[Hooks]:
    """The receiver, listening on a free port."""
    found = Hooks()
    done = asyncio.Event()

    async def record(request: web.Request) -> None:
        found.seen.append((request.method, request.path, dict(request.headers), await request.read()))

    async def ok(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(status=204 if request.method == "POST" else 200)

    async def moved(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(status=int(request.match_info["status"]), headers={"Location": "/ok?token=t0k3n"})

    async def endless(request: web.Request) -> web.StreamResponse:
        await record(request)
        response = web.StreamResponse(status=500)
        await response.prepare(request)
        await response.write(b"busy " * 20_000)
        await done.wait()  # the rest never comes
        return response

    async def busy(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(status=int(request.match_info["status"]), headers={"Retry-After": request.query["after"]})

    async def shouting(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(status=400, body=b"bad\x1b[31m request\x07\r\nsee\x00 docs")

    async def silent(request: web.Request) -> web.Response:
        await record(request)
        await done.wait()  # no answer
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/ok", ok)
    app.router.add_post("/silent", silent)
    app.router.add_post("/shouting", shouting)
    app.router.add_post("/busy/{status}", busy)
    app.router.add_post("/moved/{status}", moved)
    app.router.add_post("/endless", endless)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    found.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        yield found
    finally:
        done.set()
        await runner.cleanup()


def posting_function(secret: str = "") -> SimpleNamespace:
    return SimpleNamespace(callback_secret=SecretStr(secret), destinations=[])


@contextlib.asynccontextmanager
async def posting(
    functions: dict[str, Any], store: FakeStore | None = None, *, timeout: float = 5.0
) -> AsyncIterator[Deliverer]:
    """A deliverer with its HTTP session, for the functions given, over a store of recent ends."""
    store = store or FakeStore(RECENT)
    engine = SimpleNamespace(store=store, get=store.get)
    deliverer = Deliverer(engine, SimpleNamespace(functions=functions), timeout=timeout)  # type: ignore[arg-type]
    deliverer._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
    try:
        yield deliverer
    finally:
        await deliverer._session.close()


def to(url: str, function: str = "f", attempts: int = 0) -> Delivery:
    return Delivery(1, REQUEST_ID, function, "callback", url, attempts)


@pytest.mark.parametrize("status", [301, 302, 303, 307])
async def test_a_redirect_is_not_followed_and_the_delivery_is_given_up(hooks: Hooks, status: int) -> None:
    # Followed, 301 to 303 turned the POST into a GET without its body, answered 200: counted delivered.
    store = FakeStore(RECENT)
    async with posting({"f": posting_function()}, store) as deliverer:
        await deliverer._attempt(to(f"{hooks.url}/moved/{status}"))
    assert [(method, path) for method, path, _, _ in hooks.seen] == [("POST", f"/moved/{status}")]
    assert store.settled == [
        {
            "error": f"HTTP {status} redirect to /…: redirects are not followed; set the URL that takes the POST itself",
            "give_up": True,
        }
    ]
    assert (deliverer.sent, deliverer.given_up) == (0, 1)


async def test_a_receiver_that_does_not_answer_in_time_is_said_so(hooks: Hooks) -> None:
    # The log and the outbox said only "TimeoutError".
    store = FakeStore(RECENT)
    async with posting({"f": posting_function()}, store, timeout=0.3) as deliverer:
        await deliverer._attempt(to(f"{hooks.url}/silent"))
    assert [settled["error"] for settled in store.settled] == ["no answer within 0.3 s"]


async def test_a_refusing_answer_is_read_no_further_than_its_start(hooks: Hooks) -> None:
    async with posting({"f": posting_function()}) as deliverer:
        with pytest.raises(DeliveryFailed) as info:
            # (an answer read to its end would wait here for ever, and grow without bound)
            await asyncio.wait_for(deliverer._post(to(f"{hooks.url}/endless"), b"{}"), 3)
    problem = str(info.value)
    assert problem.startswith("HTTP 500 busy busy busy") and len(problem) <= len("HTTP 500 ") + 256, problem


async def test_a_refusing_answer_s_control_characters_are_escaped(hooks: Hooks) -> None:
    # It goes to the server's log and the outbox: an escape sequence would reach the terminal.
    async with posting({"f": posting_function()}) as deliverer:
        with pytest.raises(Undeliverable) as info:
            await deliverer._post(to(f"{hooks.url}/shouting"), b"{}")
    assert str(info.value) == "HTTP 400 bad\\x1b[31m request\\x07 see\\x00 docs"


async def test_a_switching_protocols_answer_is_a_failed_attempt_not_a_delivery() -> None:
    # A 101 was < 300, so counted as delivered.
    async def switch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(switch, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = FakeStore(RECENT)
    try:
        async with posting({"f": posting_function()}, store) as deliverer:
            await deliverer._attempt(to(f"http://127.0.0.1:{port}/hook"))
    finally:
        server.close()
        await server.wait_closed()
    assert store.settled == [{"error": "HTTP 101: an interim answer, not a 2xx", "retry_in": 1.0}]
    assert (deliverer.sent, deliverer.failed) == (0, 1)


@pytest.mark.parametrize(
    ("status", "after", "attempts", "retry_in"),
    [
        (429, "3600", 0, 300.0),  # an hour asked: as long as the backoff may be
        (503, "30", 0, 30.0),
        (429, "1", 5, 32.0),  # less than the backoff: backing off still
        (500, "30", 0, 1.0),  # a 500 asks nothing
        (503, "soon", 0, 1.0),  # nothing that can be read
    ],
)
async def test_a_retry_after_sets_the_next_attempt_s_time(
    hooks: Hooks, status: int, after: str, attempts: int, retry_in: float
) -> None:
    # It was ignored: tried again after 1, 2, 4 s although the receiver said 3600.
    store = FakeStore(RECENT)
    async with posting({"f": posting_function()}, store) as deliverer:
        await deliverer._attempt(to(f"{hooks.url}/busy/{status}?after={after}", attempts=attempts))
    (outcome,) = store.settled
    assert outcome["retry_in"] == retry_in, outcome


def test_a_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    now = 1_445_412_480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert retry_after("120", now) == 120.0
    assert retry_after(" 0 ", now) == 0.0
    assert retry_after("Wed, 21 Oct 2015 07:30:00 GMT", now) == 120.0
    assert retry_after("Wednesday, 21-Oct-15 07:29:00 GMT", now) == 60.0
    assert retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now) == 0.0, "a time gone by: at once"
    assert retry_after("-5", now) is None
    assert retry_after("1.5", now) is None
    assert retry_after("soon", now) is None
    assert retry_after("Mon, 01 Jan 99999 00:00:00 GMT", now) is None


async def test_a_failed_run_s_record_reads_only_the_end_of_its_log(hooks: Hooks) -> None:
    # A log may reach log_limit (64 MiB by default): its tail is all the record sends, and all that is read.
    whole = b"".join(b"line %06d\n" % n for n in range(100_000))
    asked: list[int | None] = []

    async def read_log(request_id: str, *, last: int | None = None) -> bytes:
        asked.append(last)
        return whole if last is None else whole[-last:]

    async def envelope(request_id: str) -> bytes:
        return b'{"data":1}'

    store = FakeStore(RECENT)
    engine = SimpleNamespace(store=store, get=store.get, read_log=read_log, envelope=envelope)
    deliverer = Deliverer(engine, SimpleNamespace(functions={"f": posting_function()}), timeout=5.0)  # type: ignore[arg-type]
    deliverer._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0))
    try:
        await deliverer._make(Delivery(1, REQUEST_ID, "f", "on_failure", f"{hooks.url}/ok", 0))
    finally:
        await deliverer._session.close()
    ((_, _, _, body),) = hooks.seen
    assert orjson.loads(body)["LogTail"] == log_tail(whole) and log_tail(whole).endswith("line 099999\n")
    assert asked == [LOG_TAIL + 1]


def test_a_destination_is_shown_without_its_credentials() -> None:
    assert shown_target("https://user:pw@Hooks.example.com:8443/done/x?token=t0k3n#frag") == "https://hooks.example.com:8443/…"
    assert shown_target("http://[::1]:8080/hook?sig=abc") == "http://[::1]:8080/…"
    assert shown_target("https://hooks.example.com") == "https://hooks.example.com"
    assert shown_target("https://hooks.example.com/") == "https://hooks.example.com/"
    # A chat service's webhook URL holds its secret in the path (/services/T0/B0/XOXSECRET).
    assert shown_target("https://hooks.slack.example/services/T0AAAA/B0BBBB/XOXSECRET") == "https://hooks.slack.example/…"
    assert shown_target("/elsewhere?token=t0k3n") == "/…"
    assert shown_target("kafka:transcode-failures") == "kafka:transcode-failures"
    assert shown_target("http://[::1/x") == "(a URL that cannot be read)"


async def test_healthz_and_the_log_show_a_callback_url_without_its_credentials(caplog: pytest.LogCaptureFixture) -> None:
    url = "https://user:hunter2@hooks.example.com/done?token=t0k3n"
    functions = {"f": SimpleNamespace(destinations=[("callback", url), ("on_failure", "kafka:failures")])}
    deliverer = Deliverer(SimpleNamespace(store=FakeStore(RECENT)), SimpleNamespace(functions=functions))  # type: ignore[arg-type]
    assert deliverer.state()["destinations"] == {"f": {"callback": "https://hooks.example.com/…", "on_failure": "kafka:failures"}}

    outcomes = [DeliveryFailed("HTTP 503 busy"), Undeliverable("HTTP 404 gone"), DeliveryFailed("HTTP 503 busy")]

    async def make(_delivery: Delivery) -> None:
        raise outcomes.pop(0)

    deliverer._make = make  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="eventrun.destinations"):
        await deliverer._attempt(to(url))  # failed, tried again
        await deliverer._attempt(to(url))  # refused
        deliverer._engine.store.ended_at = "2020-01-01T00:00:00.000Z"  # type: ignore[attr-defined]
        await deliverer._attempt(to(url, attempts=200))  # failing for a day
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all(" to https://hooks.example.com/…" in line for line in lines), lines
    assert not any("hunter2" in line or "t0k3n" in line for line in lines), lines


SECRETS = ("alice", "w0rd", "QSECRET", "fr4g")


def credentialed(port: int, password: str = "p'w0rd") -> str:
    """A callback URL with a user, a password, a query and a fragment."""
    return f"http://alice:{password}@127.0.0.1:{port}/ok?token=QSECRET#fr4g"


async def test_a_url_aiohttp_refuses_is_described_without_its_credentials(
    hooks: Hooks, caplog: pytest.LogCaptureFixture
) -> None:
    # aiohttp's InvalidUrlClientError holds the URL whole: it went to the log and to the outbox.
    port = hooks.url.rsplit(":", 1)[1]
    store = FakeStore(RECENT)
    with caplog.at_level(logging.WARNING, logger="eventrun.destinations"):
        async with posting({"f": posting_function()}, store) as deliverer:
            await deliverer._attempt(to(credentialed(int(port), password="p\\w0rd")))
    (outcome,) = store.settled
    assert outcome["error"] == f"InvalidUrlClientError: http://127.0.0.1:{port}/…", outcome
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.endswith(f"to http://127.0.0.1:{port}/… failed (attempt 1; next in 1s): {outcome['error']}"), line


def response_error(url: str) -> aiohttp.ClientResponseError:
    request = aiohttp.RequestInfo(yarl.URL(url), "POST", CIMultiDictProxy(CIMultiDict()), yarl.URL(url))
    return aiohttp.ClientResponseError(request, (), status=400, message="Bad Request")


@pytest.mark.parametrize(
    "error",
    [
        lambda url: aiohttp.InvalidUrlClientError(url),
        lambda url: aiohttp.InvalidUrlClientError(yarl.URL(url), "bad"),
        lambda url: aiohttp.NonHttpUrlClientError(url),
        response_error,  # (its URL as yarl writes it, in quotes)
        lambda url: DeliveryFailed(f"HTTP 500 cannot POST {url} now"),  # (a receiver's answer may echo it)
        lambda url: aiohttp.InvalidUrlClientError(url.replace("p'w0rd", "pw0rd")),  # (a URL found in a text)
    ],
)
async def test_no_failure_is_described_with_the_credentials_of_the_url(error: Any) -> None:
    url = credentialed(9)  # (a quote in the password: a URL found in a text would end there)
    store = FakeStore(RECENT)
    deliverer = Deliverer(SimpleNamespace(store=store), SimpleNamespace(functions={}))  # type: ignore[arg-type]

    async def make(_delivery: Delivery) -> None:
        raise error(url)

    deliverer._make = make  # type: ignore[method-assign]
    await deliverer._attempt(to(url))
    (outcome,) = store.settled
    assert not any(secret in outcome["error"] for secret in SECRETS), outcome
    assert "127.0.0.1:9/…" in outcome["error"], outcome


async def test_a_delivery_owed_for_a_function_gone_from_the_manifest_is_not_sent_unsigned(hooks: Hooks) -> None:
    store = FakeStore(RECENT)
    async with posting({}, store) as deliverer:
        await deliverer._attempt(to(f"{hooks.url}/ok", function="gone"))
        assert hooks.seen == [], "its secret went with it: not sent unsigned"
        assert store.settled == [
            {
                "error": "function 'gone' is no longer in the manifest, so its callback_secret is not known: not sent unsigned",
                "retry_in": 1.0,
            }
        ]
        # A manifest with the function again: the delivery goes, signed with its secret.
        deliverer._manifest = SimpleNamespace(functions={"gone": posting_function("k")})  # type: ignore[assignment]
        await deliverer._attempt(to(f"{hooks.url}/ok", function="gone", attempts=1))
    ((method, _, headers, body),) = hooks.seen
    stamp = dict(part.split("=", 1) for part in headers["X-Eventrun-Signature"].split(","))["t"]
    assert method == "POST" and headers["X-Eventrun-Signature"] == signature("k", body, now=int(stamp))
    assert store.settled[-1] == {} and deliverer.sent == 1


async def test_a_kafka_delivery_owed_for_a_function_gone_from_the_manifest_still_goes() -> None:
    produced: list[str] = []
    async with posting({}) as deliverer:

        async def produce(_delivery: Delivery, topic: str, _body: bytes) -> None:
            produced.append(topic)

        deliverer._produce = produce  # type: ignore[method-assign]
        await deliverer._make(Delivery(1, REQUEST_ID, "gone", "callback", "kafka:failures", 0))
    assert produced == ["failures"], "a topic is not signed: nothing went with the function"


# -- the Kafka producer -----------------------------------------------------------------------


class FakeProducer:
    """An AIOKafkaProducer whose start takes a moment, and fails while `failing` says so."""

    made: list[FakeProducer] = []
    failing = False

    def __init__(self, **_options: Any) -> None:
        self.made.append(self)
        self.stopped = False

    async def start(self) -> None:
        await asyncio.sleep(0.05)
        if self.failing:
            raise ConnectionError("the broker is down")

    async def stop(self) -> None:
        self.stopped = True


async def test_deliveries_that_come_while_the_producer_starts_share_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import aiokafka

    monkeypatch.setattr(FakeProducer, "made", [])
    monkeypatch.setattr(aiokafka, "AIOKafkaProducer", FakeProducer)
    manifest = SimpleNamespace(functions={}, kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9"))
    deliverer = Deliverer(SimpleNamespace(store=None), manifest)  # type: ignore[arg-type]

    producers = await asyncio.gather(*(deliverer._kafka() for _ in range(8)))
    assert len(FakeProducer.made) == 1 and all(p is FakeProducer.made[0] for p in producers), "one producer, stopped at stop()"
    assert await deliverer._kafka() is FakeProducer.made[0]

    # A start that fails fails every delivery waiting for it, and the next makes a new producer.
    deliverer._producer = None
    monkeypatch.setattr(FakeProducer, "failing", True)
    failures = await asyncio.gather(*(deliverer._kafka() for _ in range(4)), return_exceptions=True)
    assert all(isinstance(f, ConnectionError) for f in failures) and len(FakeProducer.made) == 2
    assert FakeProducer.made[1].stopped, "a producer that did not start is stopped"
    monkeypatch.setattr(FakeProducer, "failing", False)
    assert await deliverer._kafka() is FakeProducer.made[2]


async def test_failed_attempts_to_one_target_are_logged_a_line_a_minute_and_their_end_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A receiver down for 30 s, with callbacks of several runs owed to it, made a line an attempt.
    down, other = "https://down.example.com/hook", "https://other.example.com/hook"
    functions = {"f": SimpleNamespace(destinations=[("callback", down)])}
    deliverer = Deliverer(SimpleNamespace(store=FakeStore(RECENT)), SimpleNamespace(functions=functions))  # type: ignore[arg-type]
    outcomes: list[Exception | None] = [DeliveryFailed("HTTP 503 busy")] * 5 + [DeliveryFailed("HTTP 502 bad"), None]

    async def make(_delivery: Delivery) -> None:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    deliverer._make = make  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="eventrun.destinations"):
        for _ in range(5):
            await deliverer._attempt(to(down))
        await deliverer._attempt(to(other))  # another target: a line of its own
        await deliverer._attempt(to(down))  # through again
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].endswith("to https://down.example.com/… failed (attempt 1; next in 1s): HTTP 503 busy"), lines
    assert lines[1].endswith("to https://other.example.com/… failed (attempt 1; next in 1s): HTTP 502 bad"), lines
    assert lines[2] == "deliveries to https://down.example.com/… go through again (4 more attempts there failed since the last such line)"
    assert deliverer.failed == 6, "each attempt is still counted"
