"""The HTTP gateway: to_envelope, every route, the error table and the server lifecycle."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import gc
import gzip
import json
import logging
import re
import socket
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from eventrun.engine.api import Accepted, Invocation, Status
from eventrun.engine.envelope import Envelope, encode, now_rfc3339, request_ids
from eventrun.engine.logs import LeftOut
from eventrun.engine.errors import (
    FunctionNotFound,
    InvalidParameter,
    InvocationEnded,
    InvocationNotFound,
    ManifestError,
    ShuttingDown,
    StoreError,
    Throttled,
)
from eventrun.engine.manifest import FunctionConfig, Manifest, ServerConfig
from eventrun.engine.store import NewInvocation, SQLiteStore
from eventrun.triggers import http
from eventrun.engine.failures import FailureLog
from eventrun.triggers.http import ENGINE_KEY, HttpTrigger, build_app, responses, routes, sse, to_envelope

MAX_BODY = 1024


def _invocation(request_id: str, status: Status = Status.FINISHED, **fields: Any) -> Invocation:
    return Invocation(
        request_id=request_id,
        function=fields.pop("function", "resize"),
        trigger="http",
        status=status,
        created_at="2024-05-01T10:00:00.000Z",
        **fields,
    )


class FakeEngine:
    """Just enough of eventrun.engine.core.Engine to drive the gateway."""

    def __init__(self) -> None:
        self.manifest = Manifest(
            server=ServerConfig(max_body_size=MAX_BODY, shutdown_grace=10),
            functions={
                "resize": FunctionConfig(handler="functions/resize.py:main_handler", timeout="2h"),
                "echo": FunctionConfig(
                    handler="functions/echo.py:main_handler",
                    async_execution=False,
                    timeout="30s",
                    triggers=({"type": "kafka", "topic": "orders", "group_id": "g1"},),
                ),
            },
        )
        self.shutting_down = False
        self.accepted: list[Envelope] = []
        self._ids: dict[tuple[str, str, str], str] = {}
        self.invocations: dict[str, Invocation] = {}
        self.accept_error: Exception | None = None
        self.wait_calls: list[tuple[str, float | None]] = []
        self.wait_answer: Invocation | None = None
        self.call_unique: list[bool] = []  # whether each sync call came without an Idempotency-Key
        self.links_answer: tuple[str | None, list[str]] = (None, [])
        self.list_calls: list[dict[str, Any]] = []
        self.follow_tails: list[int | None] = []  # the tail each log follow asked for
        self.stored_functions: set[str] = set()  # functions the manifest lacks that the store has runs of
        self.left_out = 0  # bytes a follow with a tail says it leaves out
        self.list_answer: tuple[list[Invocation], str | None] = ([], None)
        self.list_error: Exception | None = None
        self.log_lines: list[str] = []
        self.log_gate: asyncio.Event | None = None  # when set, the log pauses until this is set
        self.log_error: Exception | None = None  # raised by the log after its lines
        self.log_path: Path | None = None  # the log's file, if it has one
        self.health_error: Exception | None = None
        self.accept_repeatable: list[bool] = []  # each accept's `repeatable`

    async def accept(self, envelope: Envelope, *, throttle: bool = True, repeatable: bool = False) -> Accepted:
        self.accept_repeatable.append(repeatable)
        if self.accept_error is not None:
            raise self.accept_error
        key = (envelope.function, envelope.source, envelope.id)
        if key in self._ids:
            return Accepted(self._ids[key], created=False)
        self.accepted.append(envelope)
        request_id = f"rid-{len(self.accepted)}"
        self._ids[key] = request_id
        self.invocations[request_id] = _invocation(request_id, Status.QUEUED, function=envelope.function)
        return Accepted(request_id, created=True)

    async def accept_batch(self, envelopes: Sequence[Envelope]) -> list[Accepted]:
        return [await self.accept(envelope) for envelope in envelopes]

    async def call(self, envelope: Envelope, *, unique: bool = False) -> Invocation:
        self.call_unique.append(unique)
        accepted = await self.accept(envelope)
        return await self.wait(accepted.request_id, timeout=self.function(envelope.function).timeout + 5)

    def function(self, name: str) -> FunctionConfig:
        if name not in self.manifest.functions:
            raise FunctionNotFound(name)
        return self.manifest.functions[name]

    def functions(self) -> dict[str, FunctionConfig]:
        return dict(self.manifest.functions)

    async def get(self, request_id: str) -> Invocation:
        if request_id not in self.invocations:
            raise InvocationNotFound(request_id)
        return self.invocations[request_id]

    async def list(
        self,
        *,
        function: str | None = None,
        status: Status | None = None,
        trigger: str | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int = 50,
        cursor: str | None = None,
        results: bool = True,
    ) -> tuple[list[Invocation], str | None]:
        self.list_calls.append(
            {"function": function, "status": status, "trigger": trigger, "since": since, "until": until,
             "limit": limit, "cursor": cursor, "results": results}
        )
        if self.list_error is not None:
            raise self.list_error
        if function is not None and function not in self.manifest.functions and function not in self.stored_functions:
            raise FunctionNotFound(function)
        return self.list_answer

    async def wait(self, request_id: str, timeout: float | None = None) -> Invocation:
        self.wait_calls.append((request_id, timeout))
        assert self.wait_answer is not None
        return self.wait_answer

    async def terminate(self, request_id: str) -> Invocation:
        invocation = await self.get(request_id)
        if invocation.status.ended:
            raise InvocationEnded(request_id, invocation.status.value)
        aborted = _invocation(request_id, Status.ABORTED, function=invocation.function)
        self.invocations[request_id] = aborted
        return aborted

    async def links(self, request_id: str) -> tuple[str | None, list[str]]:
        await self.get(request_id)
        return self.links_answer

    async def log_pieces(self, request_id: str) -> AsyncIterator[bytes]:
        await self.get(request_id)
        for line in self.log_lines:  # (a line a piece, as a shared store's chunks come)
            yield f"{line}\n".encode()

    async def log_file(self, request_id: str) -> Path | None:
        await self.get(request_id)
        return self.log_path

    async def follow_log(self, request_id: str, *, tail: int | None = None) -> AsyncIterator[str | LeftOut]:
        await self.get(request_id)
        self.follow_tails.append(tail)
        return self._log_lines(tail)

    async def _log_lines(self, tail: int | None) -> AsyncIterator[str | LeftOut]:
        if tail is not None and self.left_out:
            yield LeftOut(self.left_out)
        for line in self.log_lines:
            yield line
        if self.log_error is not None:
            raise self.log_error
        if self.log_gate is not None:
            await self.log_gate.wait()
            yield "after the gate"

    def metrics_text(self) -> str:
        return "# TYPE eventrun_accepted_total counter\neventrun_accepted_total 3\n"

    def health(self) -> dict[str, Any]:
        if self.health_error is not None:
            raise self.health_error
        return {"Status": "ok", "Functions": 2}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def client(engine: FakeEngine) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(build_app(engine))) as test_client:  # type: ignore[arg-type]
        yield test_client


async def _error(response: aiohttp.ClientResponse) -> dict[str, str]:
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"Error"} and set(body["Error"]) == {"Code", "Message"}
    return body["Error"]


# --- to_envelope ---------------------------------------------------------------------------


def test_envelope_carries_json_body_and_http_attributes() -> None:
    envelope = to_envelope("resize", b'{"w": 10, "tags": ["a"]}', "application/json; charset=utf-8", None)
    assert envelope.data == {"w": 10, "tags": ["a"]}
    assert envelope.source == "/http/resize"
    assert envelope.type == "eventrun.http.request"
    assert envelope.function == "resize"
    assert envelope.trigger == "http"
    assert envelope.datacontenttype == "application/json"
    assert str(uuid.UUID(envelope.id)) == envelope.id


def test_envelope_id_is_the_idempotency_key_else_fresh() -> None:
    assert to_envelope("resize", b"{}", "application/json", "order-42").id == "order-42"
    first = to_envelope("resize", b"{}", "application/json", None).id
    second = to_envelope("resize", b"{}", "application/json", "").id
    assert first != second


def test_envelope_refuses_an_overlong_idempotency_key() -> None:
    with pytest.raises(InvalidParameter, match="Idempotency-Key"):
        to_envelope("resize", b"{}", "application/json", "k" * 257)


@pytest.mark.parametrize("content_type", ["application/json", None, "text/plain"])
def test_empty_body_is_null(content_type: str | None) -> None:
    assert to_envelope("resize", b"", content_type, None).data is None


def test_malformed_json_is_invalid_parameter() -> None:
    with pytest.raises(InvalidParameter, match="^request body is not valid JSON: "):
        to_envelope("resize", b'{"w": ', "application/json", None)


@pytest.mark.parametrize(
    ("body", "content_type", "where"),
    [
        ('{"a": "\u00e9"}'.encode("latin-1"), "application/json; charset=iso-8859-1", "at byte 7: invalid continuation byte"),
        ('{"a": 1}'.encode("utf-16"), "application/json; charset=utf-16", "at byte 0: invalid start byte"),
    ],
    ids=["latin-1", "utf-16"],
)
def test_json_not_in_utf8_is_refused_saying_so(body: bytes, content_type: str, where: str) -> None:
    # orjson's words were "str is not valid UTF-8: surrogates not allowed".
    with pytest.raises(InvalidParameter) as caught:
        to_envelope("resize", body, content_type, None)
    assert str(caught.value) == (
        f"request body is not valid JSON: it is not UTF-8 ({where}); send JSON in UTF-8, whatever the charset"
    )


def test_structured_json_types_are_parsed() -> None:
    envelope = to_envelope("resize", b"[1, 2]", "application/cloudevents+json", None)
    assert envelope.data == [1, 2]


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded"])
def test_untyped_or_curl_default_body_is_parsed_when_it_is_json(content_type: str | None) -> None:
    assert to_envelope("resize", b'{"a": 1}', content_type, None).data == {"a": 1}


@pytest.mark.parametrize("content_type", ["application/json", None])
@pytest.mark.parametrize(
    "body",
    [
        b'{"id": 18446744073709551616, "n": [-9223372036854775809, 1], "small": 18446744073709551615}',
        b'123456789012345678901234567890',
        b'{"phone": "1234567890123456789012", "x": 1.5e300}',  # long digits in a string: read as given
    ],
)
def test_integers_beyond_64_bits_keep_every_digit(body: bytes, content_type: str | None) -> None:
    envelope = to_envelope("f", body, content_type, None)
    assert json.loads(encode(envelope))["data"] == json.loads(body)  # (the standard library reads them exactly)


def test_untyped_non_json_body_is_base64() -> None:
    envelope = to_envelope("resize", b"a=1&b=2", None, None)
    assert envelope.data == {"body_base64": base64.b64encode(b"a=1&b=2").decode(), "content_type": None}


@pytest.mark.parametrize("content_type", ["application/octet-stream", "text/plain; charset=utf-8"])
def test_other_content_types_are_base64_even_if_they_parse(content_type: str) -> None:
    body = b'{"looks": "like json"}' if content_type.startswith("text") else b"\x00\xff\xfe raw"
    data = to_envelope("resize", body, content_type, None).data
    assert data["content_type"] == content_type
    assert base64.b64decode(data["body_base64"]) == body


# --- invoking ------------------------------------------------------------------------------


async def test_async_invoke_answers_202_with_request_id(client: TestClient, engine: FakeEngine) -> None:
    response = await client.post("/functions/resize/invocations", json={"w": 10})
    assert response.status == 202
    assert await response.json() == {"RequestId": "rid-1"}
    assert response.headers["X-Request-Id"] == "rid-1"
    assert engine.accepted[0].data == {"w": 10}
    assert engine.accepted[0].source == "/http/resize"
    assert engine.wait_calls == []


async def test_idempotency_key_yields_the_same_request_id(client: TestClient, engine: FakeEngine) -> None:
    ids = []
    for _ in range(2):
        response = await client.post(
            "/functions/resize/invocations", json={}, headers={"Idempotency-Key": "order-7"}
        )
        ids.append((await response.json())["RequestId"])
    assert ids == ["rid-1", "rid-1"]
    assert [e.id for e in engine.accepted] == ["order-7"]


async def test_non_json_body_reaches_the_engine_as_base64(client: TestClient, engine: FakeEngine) -> None:
    response = await client.post(
        "/functions/resize/invocations", data=b"\x89PNG", headers={"Content-Type": "image/png"}
    )
    assert response.status == 202
    assert engine.accepted[0].data == {"body_base64": "iVBORw==", "content_type": "image/png"}


async def test_sync_invoke_waits_and_answers_the_result(client: TestClient, engine: FakeEngine) -> None:
    engine.wait_answer = _invocation("rid-1", Status.FINISHED, function="echo", result={"ok": True})
    response = await client.post("/functions/echo/invocations", json={"x": 1})
    assert response.status == 200
    assert response.headers["X-Request-Id"] == "rid-1"
    assert await response.json() == {"RequestId": "rid-1", "Status": "FINISHED", "Result": {"ok": True}}
    assert engine.wait_calls == [("rid-1", 35.0)]  # timeout 30s + 5s margin
    assert engine.call_unique == [True]
    await client.post("/functions/echo/invocations", json={"x": 2}, headers={"Idempotency-Key": "k"})
    assert engine.call_unique == [True, False], "a call with a key may be a duplicate"


async def test_sync_invoke_reports_a_failure(client: TestClient, engine: FakeEngine) -> None:
    engine.wait_answer = _invocation(
        "rid-1", Status.FAILED, function="echo", error_type="ValueError", error_message="bad x"
    )
    response = await client.post("/functions/echo/invocations", json={})
    assert response.status == 200
    assert await response.json() == {
        "RequestId": "rid-1",
        "Status": "FAILED",
        "Result": None,
        "ErrorType": "ValueError",
        "ErrorMessage": "bad x",
    }


async def test_event_invocation_type_queues_a_sync_function(client: TestClient, engine: FakeEngine) -> None:
    response = await client.post(
        "/functions/echo/invocations", json={}, headers={"X-Invocation-Type": "Event"}
    )
    assert response.status == 202
    assert await response.json() == {"RequestId": "rid-1"}
    assert engine.wait_calls == []


@pytest.mark.parametrize(
    ("path", "header"),
    [
        ("/functions/echo/invocations", "Idempotency-Key"),
        ("/functions/echo/invocations", "X-Invocation-Type"),
        ("/invocations/r1/replay", "Idempotency-Key"),
        ("/functions/echo/replay", "Idempotency-Key"),
    ],
)
async def test_a_header_sent_twice_is_400_naming_it(client: TestClient, engine: FakeEngine, path: str, header: str) -> None:
    # The first one counted, and a proxy may join the two into one ("a, b"): another key.
    headers = CIMultiDict([(header, "Event"), (header, "Event")])
    response = await client.post(path, json={}, headers=headers)
    assert response.status == 400, await response.text()
    assert (await _error(response)) == {"Code": "InvalidParameter", "Message": f"{header} header: given 2 times; give it once"}
    assert engine.accepted == []


async def test_unknown_invocation_type_is_400(client: TestClient, engine: FakeEngine) -> None:
    response = await client.post(
        "/functions/echo/invocations", json={}, headers={"X-Invocation-Type": "Later"}
    )
    assert response.status == 400
    error = await _error(response)
    assert error["Code"] == "InvalidParameter" and error["Message"].endswith("got 'Later'"), error
    assert engine.accepted == []


async def test_unknown_function_is_404(client: TestClient, engine: FakeEngine) -> None:
    response = await client.post("/functions/nope/invocations", json={})
    assert response.status == 404
    error = await _error(response)
    assert error == {"Code": "FunctionNotFound", "Message": "function 'nope' does not exist"}
    assert engine.accepted == []


async def test_malformed_json_is_400(client: TestClient, engine: FakeEngine) -> None:
    response = await client.post(
        "/functions/resize/invocations", data=b"{oops", headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    error = await _error(response)
    assert error["Code"] == "InvalidParameter"
    assert error["Message"].startswith("request body is not valid JSON: ")
    assert engine.accepted == []


@pytest.mark.parametrize(("retry_after", "header"), [(0.2, "1"), (2.1, "3"), (5.0, "5")])
async def test_throttled_is_429_with_retry_after(
    client: TestClient, engine: FakeEngine, retry_after: float, header: str
) -> None:
    engine.accept_error = Throttled("resize", 10, retry_after)
    response = await client.post("/functions/resize/invocations", json={})
    assert response.status == 429
    assert response.headers["Retry-After"] == header
    assert (await _error(response))["Code"] == "Throttled"


async def test_shutting_down_refuses_invocations_with_503(client: TestClient, engine: FakeEngine) -> None:
    engine.shutting_down = True
    response = await client.post("/functions/resize/invocations", json={})
    assert response.status == 503
    assert (await _error(response))["Code"] == "ShuttingDown"
    assert engine.accepted == []


async def test_engine_shutting_down_error_is_503(client: TestClient, engine: FakeEngine) -> None:
    engine.accept_error = ShuttingDown()
    response = await client.post("/functions/resize/invocations", json={})
    assert response.status == 503


async def test_body_over_the_limit_is_413(client: TestClient, engine: FakeEngine) -> None:
    response = await client.post("/functions/resize/invocations", data=b"x" * (MAX_BODY + 1))
    assert response.status == 413
    error = await _error(response)
    assert error["Code"] == "PayloadTooLarge" and str(MAX_BODY) in error["Message"]
    assert engine.accepted == []


async def test_chunked_body_over_the_limit_is_413(client: TestClient, engine: FakeEngine) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * (MAX_BODY // 2)

    response = await client.post("/functions/resize/invocations", data=chunks())
    assert response.status == 413
    assert (await _error(response))["Code"] == "PayloadTooLarge"
    assert engine.accepted == []


async def test_body_at_the_limit_is_accepted(client: TestClient, engine: FakeEngine) -> None:
    response = await client.post("/functions/resize/invocations", data=b"z" * MAX_BODY)
    assert response.status == 202


# --- invocations ---------------------------------------------------------------------------


async def test_get_invocation_has_every_field(client: TestClient, engine: FakeEngine) -> None:
    engine.invocations["r1"] = _invocation(
        "r1",
        Status.FINISHED,
        started_at="2024-05-01T10:00:01.000Z",
        ended_at="2024-05-01T10:00:03.500Z",
        duration_ms=2500,
        result=[1, 2],
    )
    engine.links_answer = ("r0", ["r2", "r3"])
    response = await client.get("/invocations/r1")
    assert response.status == 200
    assert await response.json() == {
        "RequestId": "r1",
        "FunctionName": "resize",
        "Trigger": "http",
        "Status": "FINISHED",
        "CreatedAt": "2024-05-01T10:00:00.000Z",
        "StartedAt": "2024-05-01T10:00:01.000Z",
        "EndedAt": "2024-05-01T10:00:03.500Z",
        "DurationMs": 2500,
        "Result": [1, 2],
        "ErrorType": None,
        "ErrorMessage": None,
        "ReplayOf": "r0",
        "Replays": ["r2", "r3"],
    }


async def test_get_unknown_invocation_is_404(client: TestClient) -> None:
    response = await client.get("/invocations/missing")
    assert response.status == 404
    assert (await _error(response))["Code"] == "InvocationNotFound"


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ("0000AAAA-0000-7000-8000-00000000000A", "0000aaaa-0000-7000-8000-00000000000a"),  # a UUID: in any case, the same
        ("Missing%ZZ", "Missing%ZZ"),  # no UUID: named as it came (it was lower-cased)
    ],
)
async def test_a_404_names_the_request_id_as_a_uuid_or_as_it_came(client: TestClient, given: str, named: str) -> None:
    response = await client.get(f"/invocations/{given}")
    assert response.status == 404
    assert (await _error(response))["Message"] == f"invocation {named!r} does not exist"


async def test_list_passes_filters_and_answers_a_page(client: TestClient, engine: FakeEngine) -> None:
    engine.list_answer = ([_invocation("r2"), _invocation("r1")], "cursor-2")
    response = await client.get(
        "/invocations",
        params={
            "function": "resize", "status": "running", "trigger": "kafka", "since": "2026-12-05T08:00:00Z",
            "until": "2026-12-05T10:00:00+02:00", "limit": "2", "cursor": "c1",
        },
    )
    assert response.status == 200
    body = await response.json()
    assert [inv["RequestId"] for inv in body["Invocations"]] == ["r2", "r1"]
    assert body["Invocations"][0]["Status"] == "FINISHED"
    assert body["NextCursor"] == "cursor-2"
    assert engine.list_calls == [
        {
            "function": "resize", "status": Status.RUNNING, "trigger": "kafka", "since": 1796457600000,
            "until": 1796457600000, "limit": 2, "cursor": "c1", "results": True,
        }
    ]


async def test_list_times_may_be_written_in_lower_case(client: TestClient, engine: FakeEngine) -> None:
    response = await client.get("/invocations", params={"since": "2026-12-05t08:00:00z", "until": "2026-12-05t10:00:00+02:00"})
    assert response.status == 200
    assert (engine.list_calls[0]["since"], engine.list_calls[0]["until"]) == (1796457600000, 1796457600000)


LEAP_END = 1483228800000  # 2017-01-01T00:00:00Z, the second after the leap second 2016-12-31T23:59:60Z


@pytest.mark.parametrize(
    ("given", "millis"),
    [
        ("2016-12-31T23:59:60Z", LEAP_END),  # (the same instant as the next second's start, as Unix time has it)
        ("2016-12-31t23:59:60.250z", LEAP_END + 250),
        ("2016-12-31T18:59:60-05:00", LEAP_END),
        (" 2016-12-31T23:59:60+00:00 ", LEAP_END),
        ("2017-01-01T00:00:00Z", LEAP_END),
        ("9999-12-31T23:59:60Z", 253402300800000),  # (a second past what datetime holds)
    ],
)
async def test_list_times_may_be_in_a_leap_second(client: TestClient, engine: FakeEngine, given: str, millis: int) -> None:
    # RFC 3339 (and eventrun's own check of an envelope's time) allows a second of 60.
    response = await client.get("/invocations", params={"since": given, "until": given})
    assert response.status == 200, await response.text()
    assert (engine.list_calls[0]["since"], engine.list_calls[0]["until"]) == (millis, millis)


@pytest.mark.parametrize("given", ["2016-12-31T23:59:61Z", "2016-12-31T23:59:60", "2016-12-31 23:59:60Z", "2016-12-31T23:60:60Z"])
async def test_a_second_past_60_or_a_leap_second_without_its_zone_is_refused(
    client: TestClient, engine: FakeEngine, given: str
) -> None:
    response = await client.get("/invocations", params={"since": given})
    assert response.status == 400
    assert "since: expected an RFC 3339 time with its zone" in (await _error(response))["Message"]
    assert engine.list_calls == []


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"limit": "12abc"}, "limit: expected an integer from 1 to 1000, got '12abc'"),
        ({"limit": "\u0661\u0662"}, "limit: expected an integer from 1 to 1000"),
        ({"trigger": "ftp"}, "trigger: expected one of http, kafka, s3, timer, got 'ftp'"),
        ({"since": "yesterday"}, "since: expected an RFC 3339 time with its zone"),
        ({"until": "2026-12-05T08:00:00"}, "until: expected an RFC 3339 time with its zone"),
    ],
)
async def test_bad_list_filters_are_named(client: TestClient, engine: FakeEngine, query: dict[str, str], message: str) -> None:
    response = await client.get("/invocations", params=query)
    assert response.status == 400
    assert message in (await response.json())["Error"]["Message"]
    assert engine.list_calls == []


async def test_list_defaults(client: TestClient, engine: FakeEngine) -> None:
    response = await client.get("/invocations")
    assert await response.json() == {"Invocations": [], "NextCursor": None}
    assert engine.list_calls == [
        {
            "function": None, "status": None, "trigger": None, "since": None, "until": None, "limit": 50, "cursor": None,
            "results": True,
        }
    ]


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"status": "DONE"}, "status"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "5.0"}, "limit"),
        ({"limit": "-3"}, "limit"),
        ({"results": "yes"}, "results"),
        ({"results": "1"}, "results"),
        ({"results": "0"}, "results"),
        ({"results": "no"}, "results"),
        ({"results": "truee"}, "results"),
        ({"results": " false"}, "results"),
    ],
)
async def test_list_bad_parameter_is_400_naming_it(
    client: TestClient, engine: FakeEngine, params: dict[str, str], name: str
) -> None:
    response = await client.get("/invocations", params=params)
    assert response.status == 400
    error = await _error(response)
    assert error["Code"] == "InvalidParameter" and error["Message"].startswith(f"{name}: ")
    assert engine.list_calls == []


@pytest.mark.parametrize(
    ("method", "path", "query", "message"),
    [
        # A typo was passed over: every function's runs listed, a plain log answered, a sync call waited on.
        ("GET", "/invocations", "functon=noop", "unknown query parameter 'functon': did you mean 'function'?"),
        ("GET", "/invocations/r1/logs", "follw=true", "unknown query parameter 'follw': did you mean 'follow'?"),
        (
            "GET", "/invocations", "zzz=1",
            "unknown query parameter 'zzz': this route takes cursor, function, limit, results, since, status, trigger, until",
        ),
        ("POST", "/functions/echo/invocations", "InvocationType=Event", "unknown query parameter 'InvocationType': this route takes none"),
        ("GET", "/counts", "a%0Ab=1", "unknown query parameter 'a\\nb': this route takes none"),
        ("GET", "/invocations", "status=FAILED&status=FINISHED", "status: given 2 times; give it once"),
    ],
)
async def test_an_unknown_or_repeated_query_parameter_is_400_naming_it(
    client: TestClient, engine: FakeEngine, method: str, path: str, query: str, message: str
) -> None:
    response = await client.request(method, f"{path}?{query}", json={})
    assert response.status == 400, await response.text()
    assert (await _error(response)) == {"Code": "InvalidParameter", "Message": message}
    assert engine.list_calls == []


async def test_monitoring_routes_take_any_query(client: TestClient) -> None:
    for path in ("/healthz?probe=1", "/metrics?probe=1"):
        response = await client.get(path)
        assert response.status == 200, (path, await response.text())


async def test_list_unknown_function_is_404(client: TestClient, engine: FakeEngine) -> None:
    response = await client.get("/invocations", params={"function": "nope"})
    assert response.status == 404
    assert (await _error(response))["Code"] == "FunctionNotFound"


async def test_the_runs_of_a_function_the_manifest_lacks_are_listed_when_the_store_has_some(
    client: TestClient, engine: FakeEngine
) -> None:
    # Another node's function, or one dropped since: the route refused it before the engine looked.
    engine.stored_functions = {"theirs"}
    engine.list_answer = ([_invocation("r1", function="theirs")], None)
    response = await client.get("/invocations", params={"function": "theirs"})
    assert response.status == 200, await response.text()
    assert [run["FunctionName"] for run in (await response.json())["Invocations"]] == ["theirs"]


async def test_list_bad_cursor_from_engine_is_400(client: TestClient, engine: FakeEngine) -> None:
    engine.list_error = InvalidParameter("cursor: not a cursor this server issued")
    response = await client.get("/invocations", params={"cursor": "garbage"})
    assert response.status == 400
    assert (await _error(response))["Message"] == "cursor: not a cursor this server issued"


async def test_a_list_of_large_results_comes_in_bounded_pages_that_lose_no_run(
    client: TestClient, stored_runs: list[str]
) -> None:
    # The store's own paging behind the route: each answer holds at most the budget (or one run).
    seen: list[str] = []
    sizes: list[int] = []
    params = {"limit": "1000"}
    while True:
        response = await client.get("/invocations", params=params)
        assert response.status == 200
        body = await response.read()
        assert len(body) < 8000 + 1000  # (two results of 3002 bytes, and the runs' other fields)
        page = json.loads(body)
        assert {len(run["Result"]) for run in page["Invocations"] if run["Status"] == "FINISHED"} <= {3000}
        seen += [run["RequestId"] for run in page["Invocations"]]
        sizes.append(len(page["Invocations"]))
        if page["NextCursor"] is None:
            break
        params["cursor"] = page["NextCursor"]
    # Fewer than asked: the budget ended each page (the failed run holds no result, then two of 3,000 bytes).
    assert (sizes, seen) == ([3, 2, 1], stored_runs[::-1])


@pytest.fixture
async def stored_runs(engine: FakeEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[str]]:
    """Behind the route, a real store of six runs (newest last) with 3,000-byte results, whose
    pages may hold 8,000 bytes; the last run failed instead, with an error message of its own."""
    store = SQLiteStore(tmp_path / "eventrun.db")
    store.open()
    try:
        seq, ids = request_ids(6)
        await store.accept(
            [NewInvocation(rid, "f", "/http/f", rid, "http", now_rfc3339(), b"{}", seq + i) for i, rid in enumerate(ids)]
        )
        for i, rid in enumerate(ids[:-1]):
            await store.finish(rid, Status.FINISHED, now_rfc3339(), result=f"{i}" * 3000)
        await store.finish(ids[-1], Status.FAILED, now_rfc3339(), error_type="ValueError", error_message="bad input")
        monkeypatch.setattr(store, "page_bytes", 8000)
        monkeypatch.setattr(engine, "list", store.list)
        yield ids
    finally:
        store.close()


@pytest.mark.parametrize("value", ["false", "FALSE", "False"])
async def test_a_list_without_results_has_no_result_key_and_holds_limit_runs(
    client: TestClient, stored_runs: list[str], value: str
) -> None:
    # With results, the 8,000-byte budget holds two of these runs a page; without, results count nothing.
    response = await client.get("/invocations", params={"limit": "1000", "results": value})
    assert response.status == 200
    page = await response.json()
    assert [run["RequestId"] for run in page["Invocations"]] == stored_runs[::-1] and page["NextCursor"] is None
    assert all("Result" not in run for run in page["Invocations"])
    failed = page["Invocations"][0]
    assert (failed["Status"], failed["ErrorType"], failed["ErrorMessage"]) == ("FAILED", "ValueError", "bad input")
    assert set(page["Invocations"][1]) == set(http.invocation_json(_invocation("x"))) - {"Result"}


async def test_a_list_without_results_pages_with_its_cursor(client: TestClient, stored_runs: list[str]) -> None:
    seen: list[str] = []
    sizes: list[int] = []
    params = {"limit": "4", "results": "false"}
    while True:
        response = await client.get("/invocations", params=params)
        assert response.status == 200
        page = await response.json()
        assert all("Result" not in run for run in page["Invocations"])
        sizes.append(len(page["Invocations"]))
        seen += [run["RequestId"] for run in page["Invocations"]]
        if page["NextCursor"] is None:
            break
        params["cursor"] = page["NextCursor"]
    assert (sizes, seen) == ([4, 2], stored_runs[::-1])


@pytest.mark.parametrize("value", ["true", "TRUE", "tRuE", ""])
async def test_a_list_with_results_is_as_before(client: TestClient, stored_runs: list[str], value: str) -> None:
    response = await client.get("/invocations", params={"limit": "1000", "results": value})
    assert response.status == 200
    page = await response.json()
    # The budget ends the page: the failed run (no result) and two of 3,000 bytes, then the third would pass it.
    assert [run["RequestId"] for run in page["Invocations"]] == stored_runs[::-1][:3] and page["NextCursor"]
    assert [run["Result"] for run in page["Invocations"]] == [None, "4" * 3000, "3" * 3000]


async def test_terminate_answers_the_aborted_invocation(client: TestClient, engine: FakeEngine) -> None:
    engine.invocations["r1"] = _invocation("r1", Status.RUNNING)
    response = await client.post("/invocations/r1/terminate")
    assert response.status == 200
    body = await response.json()
    assert body["RequestId"] == "r1" and body["Status"] == "ABORTED"


async def test_terminate_answers_the_fields_get_gives_for_the_run(client: TestClient, engine: FakeEngine) -> None:
    engine.invocations["r1"] = _invocation("r1", Status.RUNNING)
    engine.links_answer = ("r0", ["r2", "r3"])
    response = await client.post("/invocations/r1/terminate")
    assert response.status == 200
    terminated = await response.json()
    assert terminated["ReplayOf"] == "r0" and terminated["Replays"] == ["r2", "r3"], terminated
    assert terminated == await (await client.get("/invocations/r1")).json()


async def test_terminate_an_ended_run_is_409(client: TestClient, engine: FakeEngine) -> None:
    engine.invocations["r1"] = _invocation("r1", Status.FINISHED)
    response = await client.post("/invocations/r1/terminate")
    assert response.status == 409
    error = await _error(response)
    assert error["Code"] == "InvocationEnded" and "FINISHED" in error["Message"]


async def test_terminate_unknown_is_404(client: TestClient) -> None:
    response = await client.post("/invocations/missing/terminate")
    assert response.status == 404
    assert (await _error(response))["Code"] == "InvocationNotFound"


# --- logs ----------------------------------------------------------------------------------


async def test_logs_as_plain_text(client: TestClient, engine: FakeEngine) -> None:
    engine.invocations["r1"] = _invocation("r1")
    engine.log_lines = ["2024-05-01T10:00:01Z hello", "2024-05-01T10:00:02Z bye"]
    response = await client.get("/invocations/r1/logs")
    assert response.status == 200
    assert response.content_type == "text/plain"
    assert await response.text() == "2024-05-01T10:00:01Z hello\n2024-05-01T10:00:02Z bye\n"


async def test_a_log_read_in_pieces_is_sent_a_piece_at_a_time(
    client: TestClient, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.invocations["r1"] = _invocation("r1")
    engine.log_lines = [f"2024-05-01T10:00:01Z line {n}" for n in range(50)]
    sent: list[bytes] = []
    write = web.StreamResponse.write

    async def counted(self: web.StreamResponse, data: bytes) -> None:
        sent.append(data)
        await write(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", counted)
    response = await client.get("/invocations/r1/logs")
    assert response.status == 200 and response.content_type == "text/plain"
    assert await response.text() == "".join(f"{line}\n" for line in engine.log_lines)
    assert sent == [f"{line}\n".encode() for line in engine.log_lines]  # as read, never joined in memory


async def test_a_log_file_is_sent_as_it_is_not_read_into_memory(
    client: TestClient, engine: FakeEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.invocations["r1"] = _invocation("r1")
    engine.log_path = tmp_path / "r1.log"
    engine.log_path.write_bytes(b"2024-05-01T10:00:01Z from the file\n" * 1000)
    engine.log_lines = ["not read: the file is sent"]
    monkeypatch.setattr(http.routes, "LOG_CHUNK", 1000)
    sent: list[int] = []
    write = web.StreamResponse.write

    async def counted(self: web.StreamResponse, data: bytes) -> None:
        sent.append(len(data))
        await write(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", counted)
    response = await client.get("/invocations/r1/logs", headers={"Range": "bytes=0-19"})  # (no ranges: the whole log)
    assert response.status == 200
    assert response.content_type == "text/plain" and response.charset == "utf-8"
    assert response.content_length == engine.log_path.stat().st_size
    assert await response.read() == engine.log_path.read_bytes()
    assert max(sent) == 1000 and len(sent) == -(-engine.log_path.stat().st_size // 1000)  # a chunk at a time


async def test_a_client_that_goes_away_while_a_log_file_is_sent_is_let_go_quietly(
    client: TestClient, engine: FakeEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine.invocations["r1"] = _invocation("r1")
    engine.log_path = tmp_path / "r1.log"
    engine.log_path.write_bytes(b"2024-05-01T10:00:01Z a line of a long log\n" * 200_000)  # 8 MB
    monkeypatch.setattr(http.routes, "LOG_CHUNK", 4096)
    write = web.StreamResponse.write
    written: list[int] = []

    async def gone_after_a_few(self: web.StreamResponse, data: bytes) -> None:
        written.append(len(data))
        if len(written) > 3:  # what aiohttp raises once the client has gone (`eventrun logs r1 | head`)
            raise ConnectionResetError("Cannot write to closing transport")
        await write(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", gone_after_a_few)
    with caplog.at_level(logging.WARNING):
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with asyncio.timeout(5):
                await (await client.get("/invocations/r1/logs")).read()
    monkeypatch.setattr(web.StreamResponse, "write", write)
    assert len(written) == 4  # it stopped sending at once
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert (await client.get("/healthz")).status == 200


@pytest.mark.parametrize("follow", ["true", "false"])
async def test_logs_unknown_invocation_is_404(client: TestClient, follow: str) -> None:
    response = await client.get("/invocations/missing/logs", params={"follow": follow})
    assert response.status == 404
    assert (await _error(response))["Code"] == "InvocationNotFound"


async def test_logs_bad_follow_is_400(client: TestClient, engine: FakeEngine) -> None:
    engine.invocations["r1"] = _invocation("r1")
    response = await client.get("/invocations/r1/logs", params={"follow": "maybe"})
    assert response.status == 400
    assert (await _error(response))["Message"].startswith("follow: ")


async def test_follow_streams_lines_then_an_end_event(client: TestClient, engine: FakeEngine) -> None:
    engine.invocations["r1"] = _invocation("r1", Status.FAILED)
    engine.log_lines = ["t1 first", "t2 two\nlines", "t3 10%\r50%\r\n"]
    response = await client.get("/invocations/r1/logs", params={"follow": "true"})
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-store"
    assert await response.text() == (
        "data: t1 first\n\n"
        "data: t2 two\ndata: lines\n\n"
        "data: t3 10%\ndata: 50%\ndata: \n\n"  # a carriage return ends a field too: none is sent raw
        'event: end\ndata: {"RequestId":"r1","Status":"FAILED"}\n\n'
    )


async def test_a_follow_of_the_tail_says_first_how_much_it_leaves_out(client: TestClient, engine: FakeEngine) -> None:
    engine.invocations["r1"] = _invocation("r1", Status.FINISHED)
    engine.log_lines, engine.left_out = ["t9 last"], 123_456
    response = await client.get("/invocations/r1/logs", params={"follow": "true", "tail": "2097152"})
    assert response.status == 200
    assert await response.text() == (
        'event: skipped\ndata: {"Bytes":123456}\n\n'
        "data: t9 last\n\n"
        'event: end\ndata: {"RequestId":"r1","Status":"FINISHED"}\n\n'
    )
    assert engine.follow_tails == [2097152]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"follow": "true", "tail": "0"}, "tail: expected a number of bytes from 1 to 1099511627776, got '0'"),
        ({"follow": "true", "tail": "-5"}, "tail: expected a number of bytes from 1 to 1099511627776, got '-5'"),
        ({"follow": "true", "tail": "1e6"}, "tail: expected a number of bytes from 1 to 1099511627776, got '1e6'"),
        ({"tail": "1000"}, "tail: only with follow=true (a plain read gives the whole log)"),
    ],
)
async def test_a_bad_tail_is_named(client: TestClient, engine: FakeEngine, query: dict[str, str], message: str) -> None:
    engine.invocations["r1"] = _invocation("r1", Status.FINISHED)
    response = await client.get("/invocations/r1/logs", params=query)
    assert response.status == 400
    assert (await _error(response)) == {"Code": "InvalidParameter", "Message": message}


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (StoreError("the PostgreSQL store cannot serve this now (connection refused)"),
         {"Code": "StoreUnavailable", "Message": "the PostgreSQL store cannot serve this now (connection refused)"}),
        (RuntimeError("a bug"), {"Code": "InternalError", "Message": "internal error; see the server log"}),
    ],
)
async def test_a_follow_that_fails_says_why_in_band(client: TestClient, engine: FakeEngine, error: Exception, expected: dict) -> None:
    engine.invocations["r1"] = _invocation("r1", Status.RUNNING)
    engine.log_lines = ["t1 first"]
    engine.log_error = error
    response = await client.get("/invocations/r1/logs", params={"follow": "true"})
    text = await response.text()
    assert text.startswith("data: t1 first\n\nevent: error\ndata: "), text
    assert json.loads(text.split("event: error\ndata: ", 1)[1]) == {"Error": expected}


async def test_followers_that_fail_alike_cost_the_log_one_line(
    client: TestClient, engine: FakeEngine, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 411 followers that found no descriptor left wrote 411 lines, each with a traceback.
    monkeypatch.setattr(sse, "_ENDED_SO", FailureLog(sse.logger, every=60.0, level=logging.WARNING))  # (none logged lately)
    engine.invocations["r1"] = _invocation("r1", Status.RUNNING)
    engine.log_error = StoreError("the run's log /data/logs/r1.log cannot be read now (Too many open files); try again later")
    for _ in range(3):
        text = await (await client.get("/invocations/r1/logs", params={"follow": "true"})).text()
        assert "Too many open files" in text.split("event: error\ndata: ", 1)[1], text
    lines = [r.getMessage() for r in caplog.records if "log stream of" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("log stream of r1 ended: the run's log"), lines


async def test_a_log_file_that_cannot_be_opened_now_is_503_saying_so(
    client: TestClient, engine: FakeEngine, tmp_path: Path
) -> None:
    engine.invocations["r1"] = _invocation("r1", Status.FINISHED)
    engine.log_path = tmp_path  # (a folder: it cannot be opened as a file, as with no descriptor left)
    response = await client.get("/invocations/r1/logs")
    assert response.status == 503
    error = await _error(response)
    assert error["Code"] == "StoreUnavailable" and error["Message"].startswith(f"the run's log {tmp_path} cannot be read now ("), error


async def test_follow_sends_live_lines_and_keepalives(
    client: TestClient, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http.sse, "SSE_KEEPALIVE", 0.02)
    engine.invocations["r1"] = _invocation("r1", Status.RUNNING)
    engine.log_lines = ["t1 before"]
    engine.log_gate = asyncio.Event()
    response = await client.get("/invocations/r1/logs", params={"follow": "1"})
    assert await response.content.readuntil(b"\n\n") == b"data: t1 before\n\n"
    assert await response.content.readuntil(b"\n\n") == b": keepalive\n\n"
    engine.invocations["r1"] = _invocation("r1", Status.FINISHED)
    engine.log_gate.set()
    rest = (await response.content.read()).decode()
    assert "data: after the gate\n\n" in rest
    assert rest.endswith('event: end\ndata: {"RequestId":"r1","Status":"FINISHED"}\n\n')


async def test_a_follower_that_stops_reading_is_let_go(
    client: TestClient, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its writes wait on it, holding a batch and what the log has for it; after SSE_STALL
    seconds of that its connection is closed, so what it holds is freed."""
    monkeypatch.setattr(http.sse, "SSE_STALL", 0.3)
    caplog.set_level(logging.INFO, logger=http.sse.__name__)
    engine.invocations["r1"] = _invocation("r1", Status.RUNNING)
    engine.log_lines = ["x" * 1000] * 20_000  # 20 MB, far more than the socket buffers hold
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", client.server.port))  # type: ignore[arg-type]
    await loop.sock_sendall(sock, b"GET /invocations/r1/logs?follow=true HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    for _ in range(200):
        if "read nothing for 0.3 s" in caplog.text:
            break
        await asyncio.sleep(0.05)
    assert "log follower of r1 read nothing for 0.3 s: its connection is closed" in caplog.text
    received = 0
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 5):
            received += len(chunk)
    sock.close()
    assert 0 < received < 5_000_000, received


async def _ask_without_reading(port: int, path: str) -> socket.socket:
    """A connection that has sent GET `path` and reads nothing (its buffer is small, so that a
    large answer cannot all be sent)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock


async def test_a_large_answer_a_client_hangs_up_on_is_let_go_without_a_collection(engine: FakeEngine) -> None:
    # aiohttp's failed send leaves the answer in a reference cycle (the error's traceback holds the
    # frames that hold it, and a frame the future that holds the error): with the server's rare
    # full collections, each client that timed out on a 5 MB result kept it, and its copies, for good.
    request_id = "0190b7a4-8d5e-7000-8000-00000000000b"
    engine.invocations[request_id] = _invocation(request_id, result="x" * 5_000_000)
    gc.disable()
    tracemalloc.start()
    try:
        async with HttpTrigger(engine, "127.0.0.1", 0) as gateway:  # type: ignore[arg-type]
            sockets = [await _ask_without_reading(gateway.port, f"/invocations/{request_id}") for _ in range(5)]
            await asyncio.sleep(0.5)  # the answers wait for clients that read nothing
            for sock in sockets:
                sock.close()
            await asyncio.sleep(0.5)
            held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()
    assert held < 5_000_000, f"{held:,} bytes still held"


async def test_a_client_that_reads_a_large_answer_too_slowly_is_cut_off_and_its_answer_let_go(
    engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It held its answer (and the connection) for as long as it stayed: 40 of them, 375 MB.
    monkeypatch.setattr(responses, "SEND_TIME", 0.3)
    monkeypatch.setattr(responses, "SEND_RATE", 1 << 40)  # (the size adds nothing to the time)
    request_id = "0190b7a4-8d5e-7000-8000-00000000000c"
    engine.invocations[request_id] = _invocation(request_id, result="x" * 5_000_000)
    loop = asyncio.get_running_loop()
    gc.disable()
    tracemalloc.start()
    try:
        async with HttpTrigger(engine, "127.0.0.1", 0) as gateway:  # type: ignore[arg-type]
            sock = await _ask_without_reading(gateway.port, f"/invocations/{request_id}")
            await asyncio.sleep(1.0)  # reads nothing meanwhile
            held, _ = tracemalloc.get_traced_memory()
            assert held < 5_000_000, f"{held:,} bytes still held"
            received = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 5):
                    received += len(chunk)
            sock.close()
    finally:
        tracemalloc.stop()
        gc.enable()
    assert received < 5_000_000, "cut off before the whole answer"


async def test_out_of_descriptors_a_listener_is_tried_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    # asyncio retried once per failed accept of each pass, and its retries multiplied: 9,000
    # failed accepts a second after three minutes, and 10 % of a core.
    from eventrun.triggers.http import trigger as http_trigger

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda loop, context: None)  # (the server's says it in a line a while)
    (sock,) = await http_trigger.listeners("127.0.0.1", 0)
    tries = 0

    def out_of_descriptors(self: socket.socket) -> Any:
        nonlocal tries
        tries += 1
        raise OSError(errno.EMFILE, "Too many open files")

    server = await loop.create_server(asyncio.Protocol, sock=sock, backlog=100)
    waiting = [socket.create_connection(sock.getsockname()[:2]) for _ in range(50)]  # in the listen queue
    monkeypatch.setattr(socket.socket, "accept", out_of_descriptors)
    try:
        await asyncio.sleep(2.5)
    finally:
        monkeypatch.undo()
        server.close()
        for client in waiting:
            client.close()
        loop.set_exception_handler(None)
    assert 2 <= tries <= 4, f"{tries} accepts in 2.5 s (with a plain socket, some hundreds)"


# --- other sites ---------------------------------------------------------------------------


async def test_a_browser_s_request_from_another_site_is_refused(client: TestClient, engine: FakeEngine) -> None:
    # A "simple" POST (a form's content type) goes without a CORS preflight: any page the user
    # opens could invoke, terminate and replay on a server on the user's machine.
    response = await client.post(
        "/functions/resize/invocations", data=b'{"cmd": "theirs"}',
        headers={"Origin": "http://evil.test:18711", "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 403
    error = await _error(response)
    assert error["Code"] == "CrossSiteRequest" and "'http://evil.test:18711'" in error["Message"], error
    assert engine.accepted == [], "nothing was accepted"
    own = f"http://127.0.0.1:{client.server.port}"
    mine = await client.post("/functions/resize/invocations", json={}, headers={"Origin": own})
    assert mine.status == 202, "the dashboard's own requests go through"
    assert (await client.post("/functions/resize/invocations", json={})).status == 202, "so do a client's, with no Origin"
    assert (await client.get("/healthz", headers={"Origin": "null"})).status == 403, "a sandboxed frame or a file is no site of ours"


@pytest.mark.parametrize(("host", "status"), [
    ("evil.test:8080", 403),  # a name pointed at 127.0.0.1 by its owner (DNS rebinding)
    ("127.0.0.1:8080", 200), ("localhost:8080", 200), ("[::1]:8080", 200), ("app.localhost", 200),
])
async def test_a_server_on_a_loopback_address_answers_only_names_of_this_machine(
    client: TestClient, host: str, status: int
) -> None:
    response = await client.get("/invocations", headers={"Host": host})
    assert response.status == status, await response.text()
    if status == 403:
        assert "Host 'evil.test:8080' is none of them" in (await _error(response))["Message"]


async def test_the_name_in_server_url_is_the_server_s_own(engine: FakeEngine) -> None:
    # Behind a proxy, the browser's origin and the Host it sends are the proxy's.
    engine.manifest = Manifest(
        server=ServerConfig(url="https://eventrun.example.com"), functions=engine.manifest.functions
    )
    async with TestClient(TestServer(build_app(engine))) as proxied:  # type: ignore[arg-type]
        headers = {"Origin": "https://eventrun.example.com", "Host": "eventrun.example.com"}
        assert (await proxied.post("/functions/resize/invocations", json={}, headers=headers)).status == 202
        assert (await proxied.post("/functions/resize/invocations", json={}, headers={"Origin": "https://other.example.com"})).status == 403


def _listening_everywhere(engine: FakeEngine, url: str = "") -> TestClient[web.Request, web.Application]:
    """A client of a server that listens on 0.0.0.0, as in a container."""
    engine.manifest = Manifest(server=ServerConfig(host="0.0.0.0", url=url), functions=engine.manifest.functions)
    return TestClient(TestServer(build_app(engine)))  # type: ignore[arg-type]


_REBOUND = "rebind.attacker.example:8080"  # a name pointed at the server by its owner (DNS rebinding)


@pytest.mark.parametrize(("method", "path", "browser"), [
    ("GET", "/invocations", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}),
    ("POST", "/functions/resize/invocations", {"Origin": f"http://{_REBOUND}", "Content-Type": "text/plain"}),
    # To a plain-http name a browser sends no Sec-Fetch-*: a same-origin GET has only these.
    ("GET", "/invocations", {"Accept-Language": "en-US,en;q=0.9", "User-Agent": "Mozilla/5.0"}),
    ("GET", "/invocations", {"Accept-Language": ""}),  # (a page may empty it; it is still sent)
])
async def test_a_server_on_every_address_refuses_a_browser_s_request_to_a_name_not_its_own(
    engine: FakeEngine, method: str, path: str, browser: dict[str, str]
) -> None:
    async with _listening_everywhere(engine) as anywhere:
        response = await anywhere.request(method, path, data=b"{}", headers={"Host": _REBOUND, **browser})
        assert response.status == 403, await response.text()
        error = await _error(response)
        assert error["Code"] == "CrossSiteRequest", error
        assert f"Host {_REBOUND!r} is none of them" in error["Message"], error
        assert "needs that name in [server] url, or set a [server] ui_token" in error["Message"], error
    assert engine.accepted == [], "nothing was accepted"


async def test_a_server_on_every_address_answers_a_client_that_is_not_a_browser_by_any_name(engine: FakeEngine) -> None:
    # Other containers reach it by a service name (http://eventrun:8080), curl or MinIO by any other.
    async with _listening_everywhere(engine) as anywhere:
        for host in (_REBOUND, "eventrun:8080"):
            listed = await anywhere.get("/invocations", headers={"Host": host})
            assert listed.status == 200, await listed.text()
            invoked = await anywhere.post("/functions/resize/invocations", data=b"{}", headers={"Host": host})
            assert invoked.status == 202, await invoked.text()


@pytest.mark.parametrize("host", [
    "10.0.0.5:8080", "127.0.0.1:8080", "[::1]:8080", "localhost:8080", "app.localhost",
    f"{socket.gethostname()}:8080", f"{socket.gethostname().upper()}:8080", "eventrun.example.com",
])
async def test_a_server_on_every_address_answers_a_browser_by_an_address_or_a_name_of_its_own(
    engine: FakeEngine, host: str
) -> None:
    async with _listening_everywhere(engine, url="https://eventrun.example.com") as anywhere:
        browser = {"Host": host, "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors", "Accept-Language": "en"}
        listed = await anywhere.get("/invocations", headers=browser)
        assert listed.status == 200, await listed.text()
        scheme = "https" if host == "eventrun.example.com" else "http"
        posted = {**browser, "Origin": f"{scheme}://{host}", "Content-Type": "text/plain"}
        invoked = await anywhere.post("/functions/resize/invocations", data=b"{}", headers=posted)
        assert invoked.status == 202, await invoked.text()


async def test_a_server_on_every_address_looks_its_own_names_up_once(
    engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up: list[str] = []
    monkeypatch.setattr(socket, "gethostname", lambda: looked_up.append("hostname") or "Build-Box")
    monkeypatch.setattr(socket, "getfqdn", lambda name="": looked_up.append("fqdn") or "Build-Box.Lan")
    async with _listening_everywhere(engine) as anywhere:
        for host in ("build-box:8080", "build-box.lan", "BUILD-BOX.lan:8080"):
            response = await anywhere.get("/invocations", headers={"Host": host, "Sec-Fetch-Site": "none"})
            assert response.status == 200, await response.text()
        refused = await anywhere.get("/invocations", headers={"Host": "other-box.lan", "Sec-Fetch-Site": "none"})
        assert refused.status == 403
    assert sorted(looked_up) == ["fqdn", "hostname"], "once, when the app was built"


async def test_with_a_ui_token_no_other_site_can_send_it_and_the_origin_is_not_looked_at(engine: FakeEngine) -> None:
    engine.manifest = Manifest(server=ServerConfig(ui_token="s3cret-token"), functions=engine.manifest.functions)
    async with TestClient(TestServer(build_app(engine))) as guarded:  # type: ignore[arg-type]
        refused = await guarded.post("/functions/resize/invocations", json={}, headers={"Origin": "http://evil.test"})
        assert refused.status == 401
        token = {"Authorization": "Bearer s3cret-token", "Host": "eventrun.internal:8080"}
        assert (await guarded.post("/functions/resize/invocations", json={}, headers=token)).status == 202


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "/functions/resize/invocations", 202),
    ("GET", "/invocations/not-a-run", 404),
    ("GET", "/no/such/route", 404),
    ("GET", "/invocations/0190b7a4-8d5e-7000-8000-000000000001/logs", 200),
    ("GET", "/metrics", 200),
    ("GET", "/openapi.json", 200),
])
async def test_no_answer_is_kept_by_a_cache_or_read_as_another_type(
    client: TestClient, engine: FakeEngine, method: str, path: str, status: int
) -> None:
    # A result or a log line holding HTML is still JSON or text to a browser, and no shared or
    # browser cache keeps a run's data or an outdated state.
    engine.invocations["0190b7a4-8d5e-7000-8000-000000000001"] = _invocation("0190b7a4-8d5e-7000-8000-000000000001")
    response = await client.request(method, path, json={} if method == "POST" else None)
    assert response.status == status, await response.text()
    assert response.headers.get("Cache-Control") == "no-store", dict(response.headers)
    assert response.headers.get("X-Content-Type-Options") == "nosniff", dict(response.headers)


async def test_the_dashboard_s_files_keep_their_own_cache_rule(client: TestClient) -> None:
    response = await client.get("/ui/app.js")
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-cache" and response.headers["X-Content-Type-Options"] == "nosniff"


# --- registry, health, metrics, openapi ----------------------------------------------------


async def test_functions_lists_the_registry(client: TestClient) -> None:
    response = await client.get("/functions")
    assert response.status == 200
    functions = {f["FunctionName"]: f for f in (await response.json())["Functions"]}
    assert functions["resize"] == {
        "FunctionName": "resize",
        "AsyncExecution": True,
        "Timeout": 7200.0,
        "Concurrency": 4,
        "QpsLimit": 1000,
        "Handler": "functions/resize.py:main_handler",
        "Triggers": [],
    }
    assert functions["echo"]["AsyncExecution"] is False
    assert functions["echo"]["Triggers"] == [
        {"Type": "kafka", "Topic": "orders", "GroupId": "g1", "StartingPosition": "latest"}
    ]


async def test_get_function_and_unknown(client: TestClient) -> None:
    response = await client.get("/functions/echo")
    assert (await response.json())["Timeout"] == 30.0
    missing = await client.get("/functions/nope")
    assert missing.status == 404
    assert (await _error(missing))["Code"] == "FunctionNotFound"


async def test_healthz_and_metrics(client: TestClient) -> None:
    health = await client.get("/healthz")
    assert health.status == 200 and await health.json() == {"Status": "ok", "Functions": 2}
    metrics = await client.get("/metrics")
    assert metrics.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "eventrun_accepted_total 3" in await metrics.text()


async def test_openapi_describes_every_route(client: TestClient) -> None:
    response = await client.get("/openapi.json")
    document = await response.json()
    assert document["openapi"].startswith("3.1")
    served = set()
    for route in client.app.router.routes():  # type: ignore[union-attr]
        if route.method == "HEAD":
            continue
        path = route.resource.canonical.replace("{request_id}", "{RequestId}")  # type: ignore[union-attr]
        served.add((path, route.method.lower()))
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert served == documented
    schemas = document["components"]["schemas"]
    responses = document["components"]["responses"]

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for value in node.values() for r in refs(value)]
        if isinstance(node, list):
            return [r for value in node for r in refs(value)]
        return []

    for ref in refs(document):
        kind, name = ref.removeprefix("#/components/").split("/")
        assert name in (schemas if kind == "schemas" else responses), ref
    # (GET /invocations/{RequestId} and terminate answer with the runs' links; a list, without)
    assert set(schemas["Invocation"]["required"]) == {*http.invocation_json(_invocation("x")), "ReplayOf", "Replays"}
    assert set(schemas["ListedInvocation"]["required"]) == set(http.invocation_json(_invocation("x"))) - {"Result"}
    function = http.function_json("resize", FakeEngine().function("resize"))
    assert set(schemas["Function"]["required"]) == set(function)
    assert set(schemas["Status"]["enum"]) == {status.value for status in Status}


async def test_openapi_names_every_error_code_of_the_readme_and_the_token(client: TestClient) -> None:
    # A generated client knew of no token, and of 10 of the 16 codes an answer can carry.
    document = await (await client.get("/openapi.json")).json()
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme.split("### HTTP error codes", 1)[1].split("\n\n", 2)[1]
    codes = {code for row in table.splitlines() if row.startswith("| 4") or row.startswith("| 5") for code in re.findall(r"`(\w+)`", row.split("|")[2])}
    examples = document["components"]["schemas"]["Error"]["properties"]["Error"]["properties"]["Code"]["examples"]
    assert codes and codes <= set(examples), codes - set(examples)
    assert document["components"]["securitySchemes"]["uiToken"] == {
        "type": "http", "scheme": "bearer", "description": document["components"]["securitySchemes"]["uiToken"]["description"],
    }
    assert document["security"] == [{}, {"uiToken": []}], "optional: asked for only when the server has a ui_token"
    assert document["components"]["securitySchemes"]["metricsToken"]["scheme"] == "bearer"
    assert document["paths"]["/metrics"]["get"]["security"] == [{}, {"uiToken": []}, {"metricsToken": []}]


async def test_openapi_lists_the_idempotency_key_of_a_bulk_replay_as_of_a_single_one(client: TestClient) -> None:
    paths = (await (await client.get("/openapi.json")).json())["paths"]

    def key_header(path: str) -> dict[str, Any]:
        (header,) = [p for p in paths[path]["post"]["parameters"] if p["name"] == "Idempotency-Key"]
        return header  # type: ignore[no-any-return]

    single, bulk = key_header("/invocations/{RequestId}/replay"), key_header("/functions/{name}/replay")
    assert bulk["in"] == single["in"] == "header" and bulk["schema"] == single["schema"] == {"type": "string", "maxLength": 256}


# --- errors everywhere ---------------------------------------------------------------------


async def test_unknown_route_is_json_404(client: TestClient) -> None:
    response = await client.get("/nowhere")
    assert response.status == 404
    error = await _error(response)
    assert error == {"Code": "NotFound", "Message": "no route for GET /nowhere"}


async def test_wrong_method_is_json_405(client: TestClient) -> None:
    response = await client.delete("/healthz")
    assert response.status == 405
    assert "GET" in response.headers["Allow"]
    error = await _error(response)
    assert error["Code"] == "MethodNotAllowed" and "DELETE" in error["Message"]


@pytest.mark.parametrize("failure", [RuntimeError("secret detail"), ManifestError("secret detail")])
async def test_unexpected_exception_is_a_bare_500(
    client: TestClient, engine: FakeEngine, caplog: pytest.LogCaptureFixture, failure: Exception
) -> None:
    engine.health_error = failure
    with caplog.at_level(logging.ERROR, logger="eventrun.triggers.http"):
        response = await client.get("/healthz")
    assert response.status == 500
    text = await response.text()
    assert "secret detail" not in text and "Traceback" not in text
    assert await _error(response) == {"Code": "InternalError", "Message": "internal error; see the server log"}
    assert any(record.exc_info and record.exc_info[1] is failure for record in caplog.records)


async def test_extra_routes_share_the_engine_and_the_error_table(engine: FakeEngine) -> None:
    async def s3_hook(request: web.Request) -> web.Response:
        await request.app[ENGINE_KEY].get("not-there")
        return web.Response()

    async def secret(request: web.Request) -> web.Response:
        raise web.HTTPUnauthorized(text="bad token")

    app = build_app(
        engine,
        extra_routes=[web.post("/triggers/s3", s3_hook), web.get("/secret", secret)],
        openapi_paths={"/triggers/s3": {"post": {"summary": "MinIO webhook"}}},
    )
    async with TestClient(TestServer(app)) as test_client:
        response = await test_client.post("/triggers/s3")
        assert response.status == 404
        assert (await _error(response))["Code"] == "InvocationNotFound"
        unauthorized = await test_client.get("/secret")
        assert unauthorized.status == 401
        assert await _error(unauthorized) == {"Code": "Unauthorized", "Message": "bad token"}
        document = await (await test_client.get("/openapi.json")).json()
        assert document["paths"]["/triggers/s3"]["post"]["summary"] == "MinIO webhook"


@pytest.mark.parametrize(
    ("authorization", "why"),
    [
        (None, "no token was sent"),
        ("", "no token was sent"),
        ("Bearer", "no token was sent"),
        ("Bearer   ", "no token was sent"),
        ("Basic dXNlcjpwYXNz", "no token was sent"),
        ("Bearer wrong-token", "the token does not match"),
        ("bearer s3cret-token-", "the token does not match"),
    ],
)
async def test_a_401_says_whether_no_token_was_sent_or_it_does_not_match(
    engine: FakeEngine, authorization: str | None, why: str
) -> None:
    engine.manifest = Manifest(server=ServerConfig(ui_token="s3cret-token"), functions=engine.manifest.functions)
    headers = {} if authorization is None else {"Authorization": authorization}
    async with TestClient(TestServer(build_app(engine))) as test_client:  # type: ignore[arg-type]
        refused = await test_client.get("/functions", headers=headers)
        assert refused.status == 401
        assert refused.headers["WWW-Authenticate"] == 'Bearer realm="eventrun"'
        assert await _error(refused) == {
            "Code": "Unauthorized",
            "Message": f"this server asks for its ui_token and {why}: send the header Authorization: Bearer <ui_token>",
        }
        assert "wrong-token" not in await refused.text()
        allowed = await test_client.get("/functions", headers={"Authorization": "BEARER s3cret-token"})
        assert allowed.status == 200


@pytest.mark.parametrize("ui_token", ["s3cret-token", ""], ids=["with-ui-token", "without"])
async def test_a_metrics_token_opens_the_metrics_and_nothing_else(engine: FakeEngine, ui_token: str) -> None:
    # A scraper's token: before it, Prometheus had to hold the ui_token, which runs and ends runs.
    server = ServerConfig(ui_token=ui_token, metrics_token="scrape-only")
    engine.manifest = Manifest(server=server, functions=engine.manifest.functions)
    asked = "its metrics_token or its ui_token" if ui_token else "its metrics_token"
    async with TestClient(TestServer(build_app(engine))) as test_client:  # type: ignore[arg-type]
        scraped = await test_client.get("/metrics", headers={"Authorization": "Bearer scrape-only"})
        assert scraped.status == 200 and "eventrun_" in await scraped.text()
        for authorization, why in [(None, "no token was sent"), ("Bearer scrape-only-", "the token does not match")]:
            headers = {} if authorization is None else {"Authorization": authorization}
            refused = await test_client.get("/metrics", headers=headers)
            assert refused.status == 401
            assert await _error(refused) == {
                "Code": "Unauthorized",
                "Message": f"this server asks for {asked} and {why}: send the header Authorization: Bearer <metrics_token>",
            }
        if ui_token:
            by_ui_token = await test_client.get("/metrics", headers={"Authorization": f"Bearer {ui_token}"})
            assert by_ui_token.status == 200
            elsewhere = await test_client.get("/functions", headers={"Authorization": "Bearer scrape-only"})
            assert elsewhere.status == 401
            assert await _error(elsewhere) == {
                "Code": "Unauthorized",
                "Message": "this server asks for its ui_token and the token sent is the metrics_token, which opens "
                "only GET /metrics: send the header Authorization: Bearer <ui_token>",
            }
        else:  # the rest of the API is as open as it was
            assert (await test_client.get("/functions")).status == 200
        assert (await test_client.get("/healthz")).status == 200


def test_a_metrics_token_that_is_the_ui_token_is_refused() -> None:
    with pytest.raises(ValueError, match="metrics_token is the same as ui_token: give the scraper a token of its own"):
        ServerConfig(ui_token="s3cret-token", metrics_token="s3cret-token")
    with pytest.raises(ValueError, match="metrics_token\n.*expected printable ASCII only"):
        ServerConfig(metrics_token="scrape only")


# --- the server lifecycle ------------------------------------------------------------------


async def test_trigger_serves_on_a_free_port_and_stops(engine: FakeEngine) -> None:
    trigger = HttpTrigger(engine, "127.0.0.1", 0)
    async with trigger:
        assert trigger.port != 0
        assert trigger.state() == {"Listening": True, "Port": trigger.port}
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{trigger.port}/healthz") as response:
                assert response.status == 200
                assert (await response.json())["Status"] == "ok"
    await trigger.stop()  # idempotent
    assert trigger.state()["Listening"] is False
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"http://127.0.0.1:{trigger.port}/healthz")


async def test_stop_ends_open_log_streams_promptly(engine: FakeEngine) -> None:
    engine.invocations["r1"] = _invocation("r1", Status.RUNNING)
    engine.log_lines = ["t1 running"]
    engine.log_gate = asyncio.Event()  # never set: the run goes on
    trigger = HttpTrigger(engine, "127.0.0.1", 0)
    await trigger.start()
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{trigger.port}/invocations/r1/logs?follow=true"
        async with session.get(url) as response:
            assert await response.content.readuntil(b"\n\n") == b"data: t1 running\n\n"
            started = time.monotonic()
            await trigger.stop()
            assert time.monotonic() - started < 5  # well under shutdown_grace (10 s)
            rest = await response.content.read()
    assert b"event: end" not in rest  # the run did not end; the client may reconnect


async def test_declared_oversize_body_is_refused_before_it_is_sent(engine: FakeEngine) -> None:
    async with HttpTrigger(engine, "127.0.0.1", 0) as trigger:
        reader, writer = await asyncio.open_connection("127.0.0.1", trigger.port)
        try:
            # Only the headers go out: an answer proves the server did not wait for the body.
            writer.write(
                b"POST /functions/resize/invocations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 10485760\r\n\r\n"
            )
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), timeout=5)
            # aiohttp keeps reading (and dropping) the body so the client sees the answer rather
            # than a reset; send it and one more request, so the server is idle when it stops.
            writer.write(b" " * 10485760 + b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            await asyncio.wait_for(reader.readuntil(b"HTTP/1.1 200"), timeout=5)
        finally:
            writer.close()
    assert status_line.startswith(b"HTTP/1.1 413")
    assert engine.accepted == []


@pytest.mark.parametrize("size", [1, 40])
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
async def test_a_body_that_cannot_be_decompressed_is_400(
    client: TestClient, engine: FakeEngine, encoding: str, size: int
) -> None:
    response = await client.post(
        "/functions/resize/invocations", data=b'{"not": "compressed"}' * size, headers={"Content-Encoding": encoding}
    )
    assert response.status == 400
    if response.content_type == "application/json":  # (aiohttp refuses some before any handler sees them)
        error = await _error(response)
        assert error["Code"] == "InvalidParameter" and encoding in error["Message"], error
    assert engine.accepted == []
    assert (await client.get("/healthz")).status == 200


async def test_a_compressed_body_is_read_decompressed(client: TestClient, engine: FakeEngine) -> None:
    body = gzip.compress(b'{"width": 640}')
    response = await client.post(
        "/functions/resize/invocations", data=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )
    assert response.status == 202
    assert [envelope.data for envelope in engine.accepted] == [{"width": 640}]


async def _raw_exchange(port: int, request: bytes, *, then_wait: float = 5) -> tuple[bytes, bool]:
    """Send `request` on a connection of its own; the answer, and whether the server closed the
    connection after it (within `then_wait` seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        answer = head + await asyncio.wait_for(reader.readexactly(length), timeout=5)
        try:
            closed = await asyncio.wait_for(reader.read(1), timeout=then_wait) == b""
        except (asyncio.TimeoutError, ConnectionResetError):
            closed = False
        return answer, closed
    finally:
        writer.close()


async def test_a_compression_bomb_is_not_inflated_past_its_413(engine: FakeEngine) -> None:
    # aiohttp read the rest of a refused body for 10 s so the client could finish sending: it
    # inflated 4 MB of gzip into 4 GB (4 s of CPU) after the answer, and kept the connection.
    bomb = gzip.compress(b"\0" * (256 * MAX_BODY), compresslevel=9)
    async with HttpTrigger(engine, "127.0.0.1", 0) as trigger:
        started = time.monotonic()
        answer, closed = await _raw_exchange(
            trigger.port,
            b"POST /functions/resize/invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Encoding: gzip\r\n"
            + f"Content-Length: {len(bomb)}\r\n\r\n".encode() + bomb,
        )
        assert answer.startswith(b"HTTP/1.1 413") and b"PayloadTooLarge" in answer, answer
        assert b"Connection: close" in answer and closed, "the connection closes after the answer"
        assert time.monotonic() - started < 3
    assert engine.accepted == []


@pytest.mark.parametrize("encoding", ["x-gzip", "compress", "gzip, gzip", "foo"])
async def test_a_body_in_an_encoding_it_is_not_read_in_is_415(client: TestClient, engine: FakeEngine, encoding: str) -> None:
    # aiohttp passes such a body on as it came: the function got compressed bytes as body_base64.
    response = await client.post("/functions/resize/invocations", data=b"\x1f\x8b...", headers={"Content-Encoding": encoding})
    assert response.status == 415
    error = await _error(response)
    assert error["Code"] == "UnsupportedMediaType" and repr(encoding) in error["Message"], error
    assert engine.accepted == []


@pytest.mark.parametrize("encoding", ["identity", "IDENTITY", "GZIP"])
async def test_identity_and_any_case_are_read(client: TestClient, engine: FakeEngine, encoding: str) -> None:
    body = gzip.compress(b'{"width": 640}') if encoding == "GZIP" else b'{"width": 640}'
    headers = {"Content-Encoding": encoding, "Content-Type": "application/json"}
    assert (await client.post("/functions/resize/invocations", data=body, headers=headers)).status == 202
    assert [envelope.data for envelope in engine.accepted] == [{"width": 640}]


async def test_a_body_that_does_not_arrive_in_time_is_408(engine: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes, "BODY_WAIT", 0.5)  # (120 s)
    async with HttpTrigger(engine, "127.0.0.1", 0) as trigger:
        answer, closed = await _raw_exchange(
            trigger.port,
            b"POST /functions/resize/invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{\"drip",
        )
    assert answer.startswith(b"HTTP/1.1 408") and b"RequestTimeout" in answer and b"0 s" in answer, answer
    assert closed
    assert engine.accepted == []


@pytest.mark.parametrize("hang_up", ["close", "reset"])
async def test_a_client_that_hangs_up_mid_upload_is_no_error_in_the_log(
    engine: FakeEngine, caplog: pytest.LogCaptureFixture, hang_up: str
) -> None:
    # Each one was an ERROR with a 19-line traceback ("ConnectionResetError: Connection lost").
    async with HttpTrigger(engine, "127.0.0.1", 0) as trigger:
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", trigger.port)
            writer.write(b"POST /functions/resize/invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"a\": 1, ")
            await writer.drain()
            await asyncio.sleep(0.002)
            writer.close() if hang_up == "close" else writer.transport.abort()  # mid-body
        await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{trigger.port}/healthz") as response:
                assert response.status == 200
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert engine.accepted == []


async def test_a_compressed_body_over_the_limit_once_decompressed_is_413(client: TestClient, engine: FakeEngine) -> None:
    body = gzip.compress(b" " * (MAX_BODY * 4))  # small on the wire
    assert len(body) < MAX_BODY
    response = await client.post("/functions/resize/invocations", data=body, headers={"Content-Encoding": "gzip"})
    assert response.status == 413
    assert engine.accepted == []
