"""The gateway's hold on connections and on its log: an idle connection is closed, a long request
is not, and requests aiohttp cannot parse cost the log a short line once a while."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

from eventrun.engine.core import Engine
from eventrun.engine.manifest import load_manifest
from eventrun.triggers.http import HttpTrigger, sse, trigger
from eventrun.triggers.http.trigger import BadRequestLines
from server_process import handler, to_toml

pytestmark = pytest.mark.e2e

IDLE = 1.0
"""The idle timeout of the gateways started here (IDLE_TIMEOUT is 75 s): a long request runs 3 times it."""

MALFORMED = (
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n",  # LineTooLong
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n",  # a header with no colon
    b"GET /\x00 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # a NUL in the path
    b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",  # a bad chunk size
)

Gateway = Callable[..., Awaitable[HttpTrigger]]


@pytest.fixture
async def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gateway]:
    """Factory: `await gateway(extra_routes=())`: an engine and its gateway in this process,
    idle connections closed after IDLE seconds, with a sync `sleepy` and an async `ticker`."""
    monkeypatch.setattr(trigger, "IDLE_TIMEOUT", IDLE)
    running: list[Callable[[], Awaitable[None]]] = []

    async def make(extra_routes: Iterable[web.AbstractRouteDef] = ()) -> HttpTrigger:
        path = tmp_path / "eventrun.toml"
        functions = {
            "sleepy": {"handler": handler("sleepy"), "async_execution": False, "timeout": "30s"},
            "ticker": {"handler": handler("sleepy"), "timeout": "30s"},
        }
        server = {"data_dir": str(tmp_path / "data"), "shutdown_grace": "2s", "kill_grace": "1s"}
        path.write_text(to_toml({"server": server, "functions": functions}))
        engine = Engine(load_manifest(path))
        await engine.start()
        running.append(engine.stop)
        http = HttpTrigger(engine, "127.0.0.1", 0, extra_routes=extra_routes)
        await http.start()
        running.append(http.stop)
        return http

    yield make
    while running:
        await running.pop()()


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP answer off the connection: (its head, its body as sent)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    if length is not None:
        return head, await reader.readexactly(int(length[1]))
    return head, await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 20)  # chunked, to the last chunk


async def _closed_by_server(reader: asyncio.StreamReader, within: float) -> float:
    """Seconds until the server closed the connection; fail if it stays open `within` seconds."""
    started = time.monotonic()
    try:
        rest = await asyncio.wait_for(reader.read(), within)
    except ConnectionResetError:
        rest = b""
    except TimeoutError:
        pytest.fail(f"the server kept the idle connection open for {within} s")
    assert rest == b"", rest
    return time.monotonic() - started


async def _hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass


@pytest.mark.parametrize("sending", ["nothing", "headers a byte at a time"])
async def test_a_connection_without_a_request_is_closed(gateway: Gateway, sending: str) -> None:
    http = await gateway()
    reader, writer = await _connect(http.port)

    async def drip() -> None:
        request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: " + b"a" * 1000
        try:
            for byte in request:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)
        except ConnectionError:
            pass

    dripping = asyncio.create_task(drip()) if sending != "nothing" else None
    try:
        waited = await _closed_by_server(reader, IDLE + 3)
    finally:
        if dripping is not None:
            dripping.cancel()
        await _hang_up(writer)
    assert waited > IDLE / 2


async def test_a_connection_idle_after_an_answer_is_closed(gateway: Gateway) -> None:
    http = await gateway()
    reader, writer = await _connect(http.port)
    try:
        for _ in range(3):  # each request within the timeout keeps the connection
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head, _ = await _answer(reader)
            assert head.startswith(b"HTTP/1.1 200"), head
            await asyncio.sleep(IDLE / 2)
        waited = await _closed_by_server(reader, IDLE + 3)
    finally:
        await _hang_up(writer)
    assert waited > IDLE / 4


async def test_a_sync_call_longer_than_the_idle_timeout_is_answered(gateway: Gateway) -> None:
    http = await gateway()
    reader, writer = await _connect(http.port)
    body = b'{"seconds": 3, "quiet": true}'
    try:
        started = time.monotonic()
        writer.write(
            b"POST /functions/sleepy/invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        head, answer = await _answer(reader)
        assert time.monotonic() - started >= 3 * IDLE
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b'"Status":"FINISHED"' in answer, answer
        await _closed_by_server(reader, IDLE + 3)  # the timeout was on all along
    finally:
        await _hang_up(writer)


async def test_a_log_follow_longer_than_the_idle_timeout_is_not_cut(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sse, "SSE_KEEPALIVE", IDLE / 3)  # the run prints nothing while it sleeps
    http = await gateway()
    reader, writer = await _connect(http.port)
    body = b'{"seconds": 3, "quiet": true}'
    try:
        writer.write(
            b"POST /functions/ticker/invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        head, answer = await _answer(reader)
        assert head.startswith(b"HTTP/1.1 202"), head
        request_id = re.search(rb'"RequestId":"([^"]+)"', answer)
        assert request_id is not None, answer
        started = time.monotonic()
        writer.write(b"GET /invocations/%s/logs?follow=true HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % request_id[1])
        head, events = await _answer(reader)
        assert time.monotonic() - started >= 2 * IDLE
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b": keepalive" in events and b"event: end" in events and b'"Status":"FINISHED"' in events, events
        await _closed_by_server(reader, IDLE + 3)
    finally:
        await _hang_up(writer)


async def test_malformed_requests_cost_the_log_a_line(eventrun_server, http, handler) -> None:
    server = eventrun_server({"quick": {"handler": handler("quick")}})
    for n in range(200):
        reader, writer = await _connect(server.port)
        try:
            writer.write(MALFORMED[n % len(MALFORMED)])
            head, _ = await _answer(reader)
            assert head.startswith(b"HTTP/1.0 400") or head.startswith(b"HTTP/1.1 400"), head
        finally:
            await _hang_up(writer)
    async with http.get(server.url + "/healthz") as reply:
        assert reply.status == 200
    await asyncio.sleep(0.3)  # what the server logs after its answers
    log = server.stderr_text()
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]
    lines = [line for line in log.splitlines() if "bad request from" in line]
    assert 1 <= len(lines) <= 3, lines
    assert "bad request from 127.0.0.1: LineTooLong: Got more than 8190 bytes" in lines[0], lines
    assert len(lines[0]) < 400, lines


class _Unwritable(web.Response):
    """An answer that fails as aiohttp writes it, after the error middleware: a bug of the gateway's."""

    async def prepare(self, request: web.BaseRequest) -> None:
        raise RuntimeError("a bug in the gateway")


async def _bug(request: web.Request) -> web.Response:
    return _Unwritable()


async def test_a_bug_keeps_its_traceback_while_bad_requests_lose_theirs(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    http = await gateway(extra_routes=[web.get("/bug", _bug)])
    for payload in (b"GET /bug HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", *MALFORMED):
        reader, writer = await _connect(http.port)
        try:
            writer.write(payload)
            await asyncio.wait_for(reader.read(), 5)
        finally:
            await _hang_up(writer)
    (bug,) = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], RuntimeError)]
    assert bug.name == "aiohttp.server" and bug.levelno == logging.ERROR
    assert "Traceback" in caplog.text and "RuntimeError: a bug in the gateway" in caplog.text
    assert not [r for r in caplog.records if r.exc_info and not isinstance(r.exc_info[1], RuntimeError)], caplog.text
    assert len([r for r in caplog.records if "bad request from" in r.getMessage()]) == 1, caplog.text


def test_the_filter_shortens_bad_requests_only() -> None:
    lines = BadRequestLines()

    def record(exc: BaseException, level: int = logging.ERROR) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            info = sys.exc_info()
        return logging.LogRecord("aiohttp.server", level, __file__, 1, "Error handling request from %s", ("10.0.0.9",), info)

    bug = record(KeyError("missing"))
    assert lines.filter(bug) is True and bug.exc_info is not None and bug.exc_info[1] is not None
    debug = record(LineTooLong(b"a" * 10, 8190), logging.DEBUG)
    assert lines.filter(debug) is True  # asked for, at debug level: as aiohttp logs it
    assert lines.filter(record(LineTooLong(b"a" * 10, 8190))) is False
