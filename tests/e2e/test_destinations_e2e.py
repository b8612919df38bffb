"""Destinations end to end: on_failure records and signed callbacks from the durable outbox."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping

import aiohttp
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer

from server_process import BOTH_STORES, free_port, handler, poll_until
from kafka_service import KafkaService, kafka, unique  # noqa: F401

pytestmark = pytest.mark.e2e

SECRET = "s3cr3t-for-tests"


@dataclass
class Delivered:
    """One request the receiver got."""

    headers: Mapping[str, str]  # (any case, as HTTP has it)
    body: bytes
    method: str = "POST"
    path: str = "/hook"

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]

    @property
    def kind(self) -> str:
        return self.headers.get("X-Eventrun-Delivery", "")


@dataclass
class Receiver:
    """A local HTTP endpoint that records what is POSTed to it, started and stopped at will."""

    port: int = field(default_factory=free_port)
    status: int = 204  # what it answers
    location: str = ""  # with a 3xx status: where it sends the request (/elsewhere takes a GET or a POST)
    retry_after: str = ""  # a Retry-After header to answer with
    hangs: bool = False  # never answers (until stopped)
    got: list[Delivered] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        async def hook(request: web.Request) -> web.Response:
            self.got.append(Delivered(request.headers.copy(), await request.read(), request.method, request.path))
            if self.hangs:
                await self._stopping.wait()
            headers = {"Location": self.location} if self.location else {}
            if self.retry_after:
                headers["Retry-After"] = self.retry_after
            return web.Response(status=self.status, text="no thanks" if self.status >= 400 else "", headers=headers)

        async def elsewhere(request: web.Request) -> web.Response:
            self.got.append(Delivered(request.headers.copy(), await request.read(), request.method, request.path))
            return web.Response(status=200)

        app = web.Application()
        app.router.add_post("/hook", hook)
        app.router.add_route("*", "/elsewhere", elsewhere)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self._stopping.set()  # (a hanging answer ends, so the runner's cleanup does not wait for it)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def of(self, kind: str, request_id: str) -> list[Delivered]:
        return [d for d in self.got if d.kind == kind and d.headers.get("X-Request-Id") == request_id]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A receiver, not yet listening: the test starts it."""
    found = Receiver()
    try:
        yield found
    finally:
        await found.stop()


def verify(delivered: Delivered, secret: str = SECRET) -> None:
    """Check X-Eventrun-Signature the way a receiver would: t=..., v1=HMAC-SHA256("t." + body)."""
    fields = dict(part.split("=", 1) for part in delivered.headers["X-Eventrun-Signature"].split(","))
    expected = hmac.new(secret.encode(), fields["t"].encode() + b"." + delivered.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected), "the signature does not match the body"
    assert abs(time.time() - int(fields["t"])) < 120, "the signed time is not now"


async def deliveries(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    health = await (await http.get(f"{url}/healthz")).json()
    return health["Triggers"]["deliveries"]  # type: ignore[no-any-return]


@BOTH_STORES
async def test_a_failed_run_s_record_goes_to_on_failure_and_every_end_to_the_signed_callback(
    eventrun_server, http, receiver: Receiver
) -> None:
    await receiver.start()
    destinations = {"callback_url": receiver.url, "callback_secret": SECRET, "on_failure": {"url": receiver.url}}
    server = eventrun_server(
        {"boom": {"handler": handler("boom"), **destinations}, "quick": {"handler": handler("quick"), **destinations}}
    )
    api = server.client(http)

    finished = await api.accepted("quick", {"n": 1})
    await poll_until(lambda: receiver.of("callback", finished), 20, "no callback for the finished run")
    failed = await api.accepted("boom", {"n": 2})
    await poll_until(lambda: receiver.of("on_failure", failed), 20, "no on_failure record for the failed run")
    await poll_until(lambda: receiver.of("callback", failed), 20, "no callback for the failed run")
    await poll_until(
        lambda: _settled(http, server.url), 20, "deliveries still pending"
    )

    (record,) = receiver.of("on_failure", failed)
    verify(record)
    body = record.json
    assert (body["RequestId"], body["FunctionName"], body["Status"], body["ErrorType"]) == (
        failed, "boom", "FAILED", "ValueError"
    )
    assert body["ErrorMessage"].startswith("boom from pid")
    assert body["Event"]["data"] == {"n": 2} and body["Event"]["source"] == "/http/boom"
    assert "boom is about to fail" in body["LogTail"]
    assert record.headers["X-Eventrun-Attempt"] == "1"

    (callback,) = receiver.of("callback", finished)
    verify(callback)
    assert callback.json["Status"] == "FINISHED" and callback.json["Result"]["data"] == {"n": 1}
    assert "Event" not in callback.json, "a callback carries the run's state, not its event"
    assert receiver.of("on_failure", finished) == [], "a finished run is no failure"
    assert len(receiver.got) == 3
    figures = await deliveries(http, server.url)
    assert (figures["sent"], figures["pending"], figures["given_up"]) == (3, 0, 0)


async def _settled(http: aiohttp.ClientSession, url: str) -> bool:
    return (await deliveries(http, url))["pending"] == 0


async def test_a_receiver_down_gets_the_record_once_it_is_up(eventrun_server, http, receiver: Receiver) -> None:
    server = eventrun_server({"boom": {"handler": handler("boom"), "on_failure": {"url": receiver.url}}})
    api = server.client(http)
    failed = await api.accepted("boom", {})
    await poll_until(
        lambda: _failed_attempts(http, server.url), 20, "no failed attempt while the receiver was down"
    )
    await receiver.start()
    (record,) = await poll_until(lambda: receiver.of("on_failure", failed), 20, "the record never came")
    assert int(record.headers["X-Eventrun-Attempt"]) >= 2
    assert "X-Eventrun-Signature" not in record.headers, "no callback_secret: not signed"
    assert record.json["RequestId"] == failed


async def _failed_attempts(http: aiohttp.ClientSession, url: str) -> int:
    return (await deliveries(http, url))["failed_attempts"]  # type: ignore[no-any-return]


async def test_a_refused_delivery_is_given_up_not_retried(eventrun_server, http, receiver: Receiver) -> None:
    receiver.status = 400
    await receiver.start()
    server = eventrun_server({"boom": {"handler": handler("boom"), "on_failure": {"url": receiver.url}}})
    api = server.client(http)
    failed = await api.accepted("boom", {})

    async def given_up() -> bool:
        return (await deliveries(http, server.url))["given_up"] == 1

    await poll_until(given_up, 20, "the refused delivery was not given up")
    await asyncio.sleep(1.5)  # a retry would come after 1 s
    assert len(receiver.of("on_failure", failed)) == 1
    assert (await deliveries(http, server.url))["pending"] == 0
    assert "gave up delivering on_failure" in server.stderr_text() and "HTTP 400 no thanks" in server.stderr_text()


async def test_a_redirect_is_given_up_and_no_credential_of_the_url_is_shown(eventrun_server, http, receiver: Receiver) -> None:
    # Followed, the 302 made the POST a GET without its body, answered 200: lost, counted as sent.
    receiver.status, receiver.location = 302, "/elsewhere?sig=s1gn"
    await receiver.start()
    url = f"http://user:hunter2@127.0.0.1:{receiver.port}/hook?token=t0k3n"
    server = eventrun_server({"quick": {"handler": handler("quick"), "callback_url": url}})
    api = server.client(http)
    ended = await api.accepted("quick", {})

    async def given_up() -> bool:
        return (await deliveries(http, server.url))["given_up"] == 1

    await poll_until(given_up, 20, "the redirected callback was not given up")
    assert [(d.method, d.path) for d in receiver.got] == [("POST", "/hook")], "a redirect is not followed"
    figures = await deliveries(http, server.url)
    assert (figures["sent"], figures["pending"]) == (0, 0)
    assert figures["destinations"] == {"quick": {"callback": f"http://127.0.0.1:{receiver.port}/…"}}
    log = server.stderr_text()
    assert f"gave up delivering callback of {ended} to http://127.0.0.1:{receiver.port}/…: HTTP 302 redirect to /…: redirects are not followed" in log, log
    assert not any(secret in log for secret in ("hunter2", "t0k3n", "s1gn")), log


async def test_a_receiver_that_hangs_delays_no_other_function_s_callbacks(eventrun_server, http) -> None:
    # The deliverer's 16 slots were claimed oldest first: callbacks to a receiver that never
    # answers held them all, for 10 s each, and another function's callback waited behind them.
    hanging, answering = Receiver(hangs=True), Receiver()
    await hanging.start()
    await answering.start()
    try:
        server = eventrun_server(
            {
                "f_hang": {"handler": handler("quick"), "callback_url": hanging.url},
                "f_ok": {"handler": handler("quick"), "callback_url": answering.url},
            }
        )
        api = server.client(http)
        for request_id in [await api.accepted("f_hang", {}) for _ in range(24)]:
            await api.wait_ended(request_id)
        ok = await api.accepted("f_ok", {})
        await api.wait_ended(ok)
        await poll_until(lambda: answering.of("callback", ok), 4, "the callback waited behind the hung receiver's")
        assert len(hanging.got) == 8, "the hung receiver holds half the 16 slots, no more"
    finally:
        await hanging.stop()
        await answering.stop()


async def test_a_receiver_asking_to_wait_is_not_tried_again_sooner(eventrun_server, http, receiver: Receiver) -> None:
    receiver.status, receiver.retry_after = 429, "3600"
    await receiver.start()
    server = eventrun_server({"quick": {"handler": handler("quick"), "callback_url": receiver.url}})
    api = server.client(http)
    ended = await api.accepted("quick", {})
    await poll_until(lambda: _failed_attempts(http, server.url), 20, "no attempt was made")
    await asyncio.sleep(2.5)  # backing off alone, it went again after 1 s and 2 s
    assert len(receiver.of("callback", ended)) == 1
    assert "(attempt 1; next in 300s): HTTP 429 no thanks" in server.stderr_text(), "an hour asked: 5 minutes, the most"


@BOTH_STORES
async def test_a_kill_between_failure_and_delivery_delivers_once_after_restart(
    eventrun_server, http, receiver: Receiver
) -> None:
    server = eventrun_server({"boom": {"handler": handler("boom"), "on_failure": {"url": receiver.url}}})
    api = server.client(http)
    failed = await api.accepted("boom", {"n": 3})
    assert (await api.wait_ended(failed))["Status"] == "FAILED"
    await poll_until(lambda: _failed_attempts(http, server.url), 20, "no attempt while the receiver was down")
    server.kill9()

    await receiver.start()
    server.restart()
    await poll_until(lambda: receiver.of("on_failure", failed), 20, "the owed record was lost with the server")
    await poll_until(lambda: _settled(http, server.url), 20, "the delivery stayed pending")
    await asyncio.sleep(1.5)
    (record,) = receiver.of("on_failure", failed)
    assert record.json["Event"]["data"] == {"n": 3}


async def test_a_failed_run_s_record_goes_to_its_kafka_topic(
    eventrun_server, http, kafka: KafkaService  # noqa: F811
) -> None:
    topic = await kafka.create_topic(unique("failures"))
    server = eventrun_server(
        {
            "boom": {"handler": handler("boom"), "on_failure": {"kafka_topic": topic}},
            "quick": {"handler": handler("quick"), "on_failure": {"kafka_topic": topic}},
        },
        extra={"kafka": {"bootstrap_servers": kafka.bootstrap}},
    )
    api = server.client(http)
    await api.wait_ended(await api.accepted("quick", {}))
    failed = await api.accepted("boom", {"n": 4})

    async def sent() -> int:
        return (await deliveries(http, server.url))["sent"]  # type: ignore[no-any-return]

    await poll_until(sent, 30, "the record was not produced")
    await poll_until(lambda: _settled(http, server.url), 10, "a delivery stayed pending")
    assert await sent() == 1, "the finished run owes its topic nothing"

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=10_000)
        records = [r for batch in batches.values() for r in batch]
        assert len(records) == 1, records
        (record,) = records
        assert record.key == failed.encode()
        assert dict(record.headers)["eventrun-delivery"] == b"on_failure"
        body = json.loads(record.value)
        assert (body["RequestId"], body["Status"], body["ErrorType"]) == (failed, "FAILED", "ValueError")
        assert body["Event"]["data"] == {"n": 4} and "boom is about to fail" in body["LogTail"]
    finally:
        await consumer.stop()
