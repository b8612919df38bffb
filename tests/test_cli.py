"""The `eventrun` command against a stand-in of the gateway's HTTP boundary."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from eventrun import cli, client

EVENTRUN = Path(sys.executable).with_name("eventrun")


def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response({"Error": {"Code": code, "Message": message}}, status=status, headers=headers)


def _invocation(request_id: str, status: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "RequestId": request_id,
        "FunctionName": "thumbnail",
        "Trigger": "http",
        "Status": status,
        "CreatedAt": "2024-05-01T10:00:00Z",
        "StartedAt": None,
        "EndedAt": None,
        "DurationMs": None,
        "Result": None,
        "ErrorType": None,
        "ErrorMessage": None,
    }
    return base | fields


@dataclass
class Recorded:
    """One request the stand-in received."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: bytes
    authorization: str | None = None
    idempotency_key: str | None = None


@dataclass
class StandIn:
    """A fake gateway: the DESIGN.md routes with canned answers, run on its own loop and thread."""

    requests: list[Recorded] = field(default_factory=list)
    # Successive answers of GET /invocations/{id}; the last one repeats.
    invocations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    # SSE chunks written one by one; None means "then stay silent forever".
    streams: dict[str, list[str | None]] = field(default_factory=dict)
    listing: dict[str, Any] = field(default_factory=lambda: {"Invocations": [], "NextCursor": None})
    # Successive answers of GET /invocations, when given (then `listing`).
    listings: list[dict[str, Any]] = field(default_factory=list)
    functions: Any = field(default_factory=lambda: {"Functions": []})
    terminated: dict[str, Any] = field(default_factory=dict)
    # When set, every request must carry `Authorization: Bearer <token>`, as with a ui_token.
    token: str | None = None
    # When set, (status, Location): the answer to every request, as from a server that redirects.
    redirect: tuple[int, str | None] | None = None
    url: str = ""

    def app(self) -> web.Application:
        """The aiohttp application with the routes the CLI uses."""
        app = web.Application(middlewares=[self._record])
        app.router.add_post("/functions/{name}/invocations", self._invoke)
        app.router.add_get("/invocations", self._list)
        app.router.add_get("/invocations/{id}", self._status)
        app.router.add_get("/invocations/{id}/logs", self._logs)
        app.router.add_post("/invocations/{id}/terminate", self._terminate)
        app.router.add_get("/functions", self._functions)
        app.router.add_post("/functions/{name}/replay", self._replay)
        app.router.add_post("/invocations/{id}/replay", self._replay_one)
        return app

    @web.middleware
    async def _record(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        body = await request.read()
        authorization = request.headers.get("Authorization")
        self.requests.append(
            Recorded(
                request.method, request.path, dict(request.query), request.content_type, body, authorization,
                request.headers.get("Idempotency-Key"),
            )
        )
        if self.redirect is not None:
            status, location = self.redirect
            return web.Response(status=status, headers={"Location": location} if location else None)
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            message = "this server asks for its ui_token: send the header Authorization: Bearer <ui_token>"
            return _error(401, "Unauthorized", message, **{"WWW-Authenticate": 'Bearer realm="eventrun"'})
        return await handler(request)

    async def _invoke(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "missing":
            return _error(404, "FunctionNotFound", "function 'missing' does not exist")
        if name == "busy":
            message = "function 'busy' accepts at most 1 events per second; retry later"
            return _error(429, "Throttled", message, **{"Retry-After": "1"})
        if name == "broken":
            return web.Response(status=502, text="<html>bad gateway</html>", content_type="text/html")
        if name == "garish":
            return _error(400, "Invalid\x1b[5m", "\x1b]0;owned\x07red \x1b[31mtext\r\nand a line")
        if name == "syncfn":
            data = json.loads(await request.read())
            return web.json_response({"RequestId": "sync-1", "Status": "FINISHED", "Result": {"echo": data}})
        if name == "syncfail":
            failure = {"ErrorType": "RuntimeError", "ErrorMessage": "nope"}
            return web.json_response({"RequestId": "sync-2", "Status": "FAILED", "Result": None} | failure)
        if name == "syncslow":  # a sync run that outlasts every timeout the client has (see short_timeouts)
            await asyncio.sleep(1.0)
            return web.json_response({"RequestId": "sync-3", "Status": "FINISHED", "Result": "late"})
        if name == "syncstopped":  # the server stopped before the run started
            unended = {"ErrorType": None, "ErrorMessage": None}
            return web.json_response({"RequestId": "sync-4", "Status": "QUEUED", "Result": None} | unended)
        request_id = f"req-{name}"
        return web.json_response({"RequestId": request_id}, status=202, headers={"X-Request-Id": request_id})

    async def _status(self, request: web.Request) -> web.StreamResponse:
        request_id = request.match_info["id"]
        answers = self.invocations.get(request_id)
        if not answers:
            return _error(404, "InvocationNotFound", f"invocation {request_id!r} does not exist")
        return web.json_response(answers.pop(0) if len(answers) > 1 else answers[0])

    async def _list(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.listings.pop(0) if self.listings else self.listing)

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        request_id = request.match_info["id"]
        if request.query.get("follow") != "true":
            return web.Response(text=self.logs[request_id], content_type="text/plain")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in self.streams[request_id]:
            if chunk is None:
                await asyncio.Event().wait()
            else:
                await response.write(chunk.encode())
                await asyncio.sleep(0.01)
        return response

    async def _terminate(self, request: web.Request) -> web.StreamResponse:
        request_id = request.match_info["id"]
        if request_id == "ended":
            return _error(409, "InvocationEnded", "invocation 'ended' already ended with status FINISHED")
        aborted = {"RequestId": request_id, "Status": "ABORTED"}
        return web.json_response(self.terminated.get(request_id, aborted))

    async def _functions(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.functions)

    async def _replay(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        dry_run = body.get("DryRun", False)
        pair = {"ReplayOf": "old-1", "RequestId": None if dry_run else "new-1"}
        cursor = "next-page" if body.get("Limit") == 1 and "Cursor" not in body else None
        return web.json_response({"DryRun": dry_run, "Replayed": [pair], "Cursor": cursor})

    async def _replay_one(self, request: web.Request) -> web.StreamResponse:
        request_id = request.match_info["id"]
        return web.json_response({"RequestId": f"new-{request_id}", "ReplayOf": request_id}, status=202)

    def calls(self, method: str, path: str) -> list[Recorded]:
        """The recorded requests to one route."""
        return [r for r in self.requests if (r.method, r.path) == (method, path)]


@contextlib.contextmanager
def serving(server: StandIn) -> Iterator[StandIn]:
    """`server` served on a free port from a background thread, stopped afterwards."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(server.app(), shutdown_timeout=0.5)

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def stop() -> None:
        await runner.cleanup()
        # A handler whose client already went away (the Ctrl-C test) is no longer tracked by
        # the runner; end it here so no task outlives the loop.
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    """A StandIn served on a free port from a background thread, stopped afterwards."""
    with serving(StandIn()) as server:
        yield server


@pytest.fixture
def redirector() -> Iterator[StandIn]:
    """A second StandIn, on a port of its own, for a test to set a `redirect` on."""
    with serving(StandIn()) as server:
        yield server


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test in an empty folder, with no EVENTRUN_* variables and fast polling."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("EVENTRUN_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(cli, "POLL_FIRST", 0.01)
    monkeypatch.setattr(cli, "POLL_MAX", 0.02)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main(argv) in-process: exit status, stdout, stderr."""
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- invoke


def test_invoke_prints_the_request_id_and_sends_an_empty_object(stand_in: StandIn, capsys: Any) -> None:
    assert run(capsys, "invoke", "thumbnail", "--url", stand_in.url) == (0, "req-thumbnail\n", "")
    [call] = stand_in.calls("POST", "/functions/thumbnail/invocations")
    assert (call.content_type, call.body) == ("application/json", b"{}")


@pytest.mark.parametrize("key", ["order-17:retry", "日本"])
def test_invoke_sends_its_idempotency_key(stand_in: StandIn, capsys: Any, key: str) -> None:
    assert run(capsys, "invoke", "thumbnail", "--idempotency-key", key, "--url", stand_in.url) == (0, "req-thumbnail\n", "")
    assert run(capsys, "invoke", "thumbnail", "--url", stand_in.url)[0] == 0
    calls = stand_in.calls("POST", "/functions/thumbnail/invocations")
    assert [call.idempotency_key for call in calls] == [key, None], "as UTF-8, which the server reads; none unless given"


def test_invoke_sends_data_exactly_as_given(stand_in: StandIn, capsys: Any) -> None:
    data = '{"b": 2,  "a": [1, "ü"]}'
    assert run(capsys, "invoke", "thumbnail", "--data", data, "--url", stand_in.url)[0] == 0
    [call] = stand_in.calls("POST", "/functions/thumbnail/invocations")
    assert (call.content_type, call.body) == ("application/json", data.encode())


def test_invoke_refuses_bad_json_data_before_sending(stand_in: StandIn, capsys: Any) -> None:
    assert run(capsys, "invoke", "thumbnail", "--data", "{nope", "--url", stand_in.url) == (
        2,
        "",
        "eventrun: --data is not valid JSON: unexpected character, expected a string key: line 1 column 2 (char 1)\n",
    )
    assert stand_in.requests == []


@pytest.mark.parametrize(
    ("content", "content_type"),
    [(b'{"k": "v"}\n', "application/json"), (b"\x89PNG\r\n\x1a\n\x00", "application/octet-stream")],
)
def test_invoke_sends_file_bytes_typed_by_content(
    stand_in: StandIn, capsys: Any, tmp_path: Path, content: bytes, content_type: str
) -> None:
    (tmp_path / "event.bin").write_bytes(content)
    assert run(capsys, "invoke", "thumbnail", "--file", "event.bin", "--url", stand_in.url) == (
        0,
        "req-thumbnail\n",
        "",
    )
    [call] = stand_in.calls("POST", "/functions/thumbnail/invocations")
    assert (call.content_type, call.body) == (content_type, content)


def test_invoke_reports_an_unreadable_file(stand_in: StandIn, capsys: Any) -> None:
    assert run(capsys, "invoke", "thumbnail", "--file", "nope.json", "--url", stand_in.url) == (
        2,
        "",
        "eventrun: cannot read nope.json: no such file or directory\n",
    )


def test_invoke_takes_data_or_file_not_both(capsys: Any) -> None:
    status, out, err = run(capsys, "invoke", "f", "--data", "{}", "--file", "x")
    assert (status, out) == (2, "")
    assert err.endswith("error: argument --file: not allowed with argument --data\n")


def test_invoke_wait_polls_until_finished_and_prints_the_result(stand_in: StandIn, capsys: Any) -> None:
    stand_in.invocations["req-thumbnail"] = [
        _invocation("req-thumbnail", "QUEUED"),
        _invocation("req-thumbnail", "RUNNING"),
        _invocation("req-thumbnail", "FINISHED", Result={"size": [64, 64], "name": "ü"}),
    ]
    assert run(capsys, "invoke", "thumbnail", "--wait", "--url", stand_in.url) == (
        0,
        '{\n  "size": [\n    64,\n    64\n  ],\n  "name": "ü"\n}\n',
        "",
    )
    assert len(stand_in.calls("GET", "/invocations/req-thumbnail")) == 3


@pytest.mark.parametrize(
    ("status", "fields", "line"),
    [
        (
            "FAILED",
            {"ErrorType": "ValueError", "ErrorMessage": "bad size\n  in resize()"},
            "eventrun: req-thumbnail FAILED: ValueError: bad size in resize()\n",
        ),
        ("TIMED_OUT", {}, "eventrun: req-thumbnail TIMED_OUT\n"),
    ],
)
def test_invoke_wait_reports_a_run_that_did_not_finish(
    stand_in: StandIn, capsys: Any, status: str, fields: dict[str, Any], line: str
) -> None:
    stand_in.invocations["req-thumbnail"] = [_invocation("req-thumbnail", status, **fields)]
    assert run(capsys, "invoke", "thumbnail", "--wait", "--url", stand_in.url) == (1, "", line)


def test_invoke_sync_function_prints_the_result_with_wait(stand_in: StandIn, capsys: Any) -> None:
    assert run(capsys, "invoke", "syncfn", "--data", "[1]", "--wait", "--url", stand_in.url) == (
        0,
        '{\n  "echo": [\n    1\n  ]\n}\n',
        "",
    )
    assert stand_in.calls("GET", "/invocations/sync-1") == []


def test_invoke_sync_function_prints_the_request_id_without_wait(stand_in: StandIn, capsys: Any) -> None:
    assert run(capsys, "invoke", "syncfn", "--url", stand_in.url) == (0, "sync-1\n", "")


@pytest.mark.parametrize(("wait", "out"), [((), "sync-2\n"), (("--wait",), "")])
def test_invoke_sync_failure_is_reported_with_its_error(
    stand_in: StandIn, capsys: Any, wait: tuple[str, ...], out: str
) -> None:
    assert run(capsys, "invoke", "syncfail", *wait, "--url", stand_in.url) == (
        1,
        out,
        "eventrun: sync-2 FAILED: RuntimeError: nope\n",
    )
    assert stand_in.calls("GET", "/invocations/sync-2") == []


@pytest.fixture
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every timeout the client has, whatever its name, at 0.2 s."""
    for module in (cli, client):
        for name in dir(module):
            if name.endswith("_TIMEOUT"):
                monkeypatch.setattr(module, name, 0.2)


@pytest.mark.parametrize(("wait", "out"), [((), "sync-3\n"), (("--wait",), '"late"\n')], ids=["no-wait", "wait"])
def test_invoke_of_a_sync_function_waits_for_its_answer_however_long(
    stand_in: StandIn, capsys: Any, short_timeouts: None, wait: tuple[str, ...], out: str
) -> None:
    assert run(capsys, "invoke", "syncslow", *wait, "--url", stand_in.url) == (0, out, "")


@contextlib.contextmanager
def hanging_up(reply: bytes) -> Iterator[str]:
    """The URL of a server that reads one request, writes `reply` (perhaps nothing) and hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        try:
            connection, _ = listener.accept()
        except OSError:  # (closed: the test ended without connecting)
            return
        with connection:
            head = b""
            while b"\r\n\r\n" not in head:
                head += connection.recv(4096)
            length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
            body = head.partition(b"\r\n\r\n")[2]
            while len(body) < length:
                body += connection.recv(4096)
            connection.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        thread.join(10)


def test_invoke_cut_off_before_the_answer_says_the_run_may_be_going_on(capsys: Any) -> None:
    # A sync call's answer (and its X-Request-Id) comes only when its run ends.
    with hanging_up(b"") as url:
        assert run(capsys, "invoke", "syncfn", "--url", url) == (
            1,
            "",
            f"eventrun: sent the event for syncfn to {url}, but no answer came (the server closed the connection); "
            "if the server accepted it, the run may still be going on: `eventrun list --function syncfn` shows it\n",
        )


def test_invoke_with_a_key_cut_off_before_the_answer_says_to_send_it_again(capsys: Any) -> None:
    with hanging_up(b"") as url:
        assert run(capsys, "invoke", "syncfn", "--idempotency-key", "k1", "--url", url) == (
            1,
            "",
            f"eventrun: sent the event for syncfn to {url}, but no answer came (the server closed the connection); "
            "send it again with the same --idempotency-key: if the server accepted it, that answers its run rather "
            "than making another\n",
        )


def test_invoke_cut_off_within_the_answer_names_the_run(capsys: Any) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-Id: sync-5\r\nContent-Length: 99\r\n\r\n"
    with hanging_up(head + b'{"RequestId": "sy') as url:
        status, out, err = run(capsys, "invoke", "syncfn", "--url", url)
    assert (status, out) == (1, "")
    assert err.startswith(f"eventrun: sent the event for syncfn to {url}, but the answer was cut off ("), err
    assert err.endswith("); the run sync-5 may still be going on: `eventrun status sync-5` shows it\n"), err


@pytest.mark.parametrize(("wait", "out"), [((), "sync-4\n"), (("--wait",), "")], ids=["no-wait", "wait"])
def test_invoke_of_a_sync_run_the_server_stopped_before_says_it_runs_later(
    stand_in: StandIn, capsys: Any, wait: tuple[str, ...], out: str
) -> None:
    assert run(capsys, "invoke", "syncstopped", *wait, "--url", stand_in.url) == (
        1,
        out,
        "eventrun: sync-4 QUEUED: the server stopped before the run started; the run stays queued and runs "
        "once a server is running again (`eventrun status sync-4` then gives its outcome)\n",
    )


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("missing", "eventrun: FunctionNotFound: function 'missing' does not exist (HTTP 404)\n"),
        (
            "busy",
            "eventrun: Throttled: function 'busy' accepts at most 1 events per second; retry later "
            "(HTTP 429, retry after 1s)\n",
        ),
    ],
)
def test_api_errors_are_one_line(stand_in: StandIn, capsys: Any, name: str, line: str) -> None:
    assert run(capsys, "invoke", name, "--url", stand_in.url) == (1, "", line)


def test_a_non_json_error_names_the_url_and_status(stand_in: StandIn, capsys: Any) -> None:
    assert run(capsys, "invoke", "broken", "--url", stand_in.url) == (
        1,
        "",
        f"eventrun: {stand_in.url}/functions/broken/invocations answered HTTP 502 Bad Gateway\n",
    )


TOKEN = "MY-UI-TOKEN-SECRET"
NOT_FOLLOWED = (
    "; eventrun does not follow redirects (they would carry the token elsewhere): "
    "give --url as the server's own address\n"
)


@pytest.mark.parametrize(("status", "phrase"), [(302, "Found"), (307, "Temporary Redirect")])
@pytest.mark.parametrize(
    ("argv", "path"),
    [(("list",), "/invocations"), (("invoke", "thumbnail"), "/functions/thumbnail/invocations")],
    ids=["list", "invoke"],
)
def test_a_redirect_is_not_followed_and_the_token_stays_home(
    stand_in: StandIn, redirector: StandIn, capsys: Any, argv: tuple[str, ...], path: str, status: int, phrase: str
) -> None:
    elsewhere = stand_in.url.replace("127.0.0.1", "localhost") + path
    redirector.redirect = (status, elsewhere)
    exit_status, out, err = run(capsys, *argv, "--url", redirector.url, "--token", TOKEN)
    assert (exit_status, out, err) == (
        1,
        "",
        f"eventrun: {redirector.url} answered {status} {phrase}, pointing to {elsewhere}{NOT_FOLLOWED}",
    )
    assert TOKEN not in err
    assert stand_in.requests == []
    [call] = redirector.requests
    assert (call.path, call.authorization) == (path, f"Bearer {TOKEN}")


@pytest.mark.parametrize(
    ("location", "shown"),
    [
        # A user name, password, query or fragment may hold a secret: only their place is shown.
        ("http://me:pa55@elsewhere.test:8080/api?key=pa55#pa55", "http://...@elsewhere.test:8080/api?...#..."),
        # Said against the address it answered; never the token, even where the server echoes it.
        (f"/v2/{TOKEN}/invocations", "{url}/v2/.../invocations"),
    ],
    ids=["credentials", "relative"],
)
def test_where_a_redirect_points_is_shown_without_secrets(
    stand_in: StandIn, redirector: StandIn, capsys: Any, location: str, shown: str
) -> None:
    redirector.redirect = (301, location)
    status, out, err = run(capsys, "invoke", "thumbnail", "--url", redirector.url, "--token", TOKEN)
    pointing = shown.format(url=redirector.url)
    assert (status, out, err) == (
        1,
        "",
        f"eventrun: {redirector.url} answered 301 Moved Permanently, pointing to {pointing}{NOT_FOLLOWED}",
    )
    assert TOKEN not in err and "pa55" not in err
    assert stand_in.requests == []


def test_a_3xx_without_a_location_is_said_as_it_is(redirector: StandIn, capsys: Any) -> None:
    redirector.redirect = (300, None)
    assert run(capsys, "functions", "--url", redirector.url, "--token", TOKEN) == (
        1,
        "",
        f"eventrun: {redirector.url} answered 300 Multiple Choices{NOT_FOLLOWED}",
    )


def test_an_unreachable_server_is_one_line(capsys: Any) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert run(capsys, "status", "req-1", "--url", url) == (
        1,
        "",
        f"eventrun: cannot reach {url} (connection refused); is `eventrun serve` running?\n",
    )


@pytest.mark.parametrize("url", ["127.0.0.1:8080", "http://[::1", "http://127.0.0.1:99999", "http://h:port"])
def test_a_bad_url_is_refused(capsys: Any, url: str) -> None:
    assert run(capsys, "functions", "--url", url) == (
        2,
        "",
        f"eventrun: not an http(s) URL: {url!r} (expected e.g. http://127.0.0.1:8080)\n",
    )


LONG_LABEL = "a" * 64


@pytest.mark.parametrize(
    ("url", "line"),
    [
        ("http://a..b:1", "not a valid host name in 'http://a..b:1': label empty or too long"),
        (f"http://{LONG_LABEL}:1", f"not a valid host name in 'http://{LONG_LABEL}:1': label too long"),
        ("http://127.0.0.1:9/\u00fc", "not a valid URL path in 'http://127.0.0.1:9/\u00fc': '\u00fc' cannot be sent as it is (percent-encode it)"),
        ("http://127.0.0.1:9/a b", "not a valid URL path in 'http://127.0.0.1:9/a b': ' ' cannot be sent as it is (percent-encode it)"),
        ("http://127.0.0.1:9?x=\u00fc", "not a server URL: 'http://127.0.0.1:9?...' holds a query; give the server's address alone, e.g. http://127.0.0.1:8080"),
        ("http://127.0.0.1:9/?", "not a server URL: 'http://127.0.0.1:9/?...' holds a query; give the server's address alone, e.g. http://127.0.0.1:8080"),
        ("http://127.0.0.1:9#frag", "not a server URL: 'http://127.0.0.1:9#...' holds a fragment; give the server's address alone, e.g. http://127.0.0.1:8080"),
        ("http://user:pw@127.0.0.1:9", "not a server URL: 'http://...@127.0.0.1:9' holds a user name or password (a server's ui_token goes in --token)"),
        # A line break or a tab urllib would have dropped as it read the URL, to send it as a header.
        ("http://127.0.0.1:9\n", "not a server URL: it holds '\\n', a control character"),
        ("http://127.0.0.1:9/a\tb", "not a server URL: it holds '\\t', a control character"),
        ("http://127.0.0.1 :9", "not a valid host name in 'http://127.0.0.1 :9': it holds a space"),
    ],
    ids=["empty-label", "long-label", "non-ascii-path", "space", "query", "empty-query", "fragment", "userinfo", "line-break", "tab", "space-in-host"],
)
def test_a_url_that_names_no_server_is_a_usage_error(capsys: Any, url: str, line: str) -> None:
    assert run(capsys, "functions", "--url", url) == (2, "", f"eventrun: {line}\n")


def test_a_url_with_a_password_is_never_echoed(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTRUN_URL", "https://admin:hunter2@eventrun.example.com")
    status, out, err = run(capsys, "status", "req-1")
    assert (status, out) == (2, "") and "hunter2" not in err and "holds a user name or password" in err, err


UNSENDABLE_TOKENS = {
    "non-ascii": ("p\u00e4sswort-x", "holds a non-ASCII character"),
    "chinese": ("\u5bc6\u7801", "holds a non-ASCII character"),
    "trailing-space": ("sesame ", "ends with whitespace"),
    "leading-space": (" sesame", "begins with whitespace"),
    "inner-space": ("ses ame", "holds a space"),
    "tab": ("ses\tame", "holds a control character"),
    "escape": ("ses\x1bame", "holds a control character"),
    "blank": ("   ", "holds only whitespace"),
}


@pytest.mark.parametrize("source", ["--token", "EVENTRUN_TOKEN"])
@pytest.mark.parametrize(("token", "why"), UNSENDABLE_TOKENS.values(), ids=UNSENDABLE_TOKENS.keys())
def test_a_token_no_request_could_carry_is_a_usage_error(
    stand_in: StandIn, capsys: Any, monkeypatch: pytest.MonkeyPatch, source: str, token: str, why: str
) -> None:
    argv = ["functions", "--url", stand_in.url]
    if source == "--token":
        argv += ["--token", token]
    else:
        monkeypatch.setenv("EVENTRUN_TOKEN", token)
    assert run(capsys, *argv) == (
        2,
        "",
        f"eventrun: {source}: expected printable ASCII only (the characters ! to ~: no spaces, control or "
        f"non-ASCII characters), as a token travels in an HTTP Authorization header; this one {why}\n",
    )
    assert stand_in.requests == []


def test_a_401_says_whether_a_token_was_sent(stand_in: StandIn, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in.token = "sesame"
    assert run(capsys, "functions", "--url", stand_in.url) == (
        1,
        "",
        f"eventrun: Unauthorized: {stand_in.url} asks for its ui_token and none was sent: "
        "pass --token or set EVENTRUN_TOKEN (HTTP 401)\n",
    )
    refused = f"eventrun: Unauthorized: {stand_in.url} refused the token sent: it is not the server's ui_token (HTTP 401)\n"
    assert run(capsys, "functions", "--url", stand_in.url, "--token", "open") == (1, "", refused)
    monkeypatch.setenv("EVENTRUN_TOKEN", "open")
    assert run(capsys, "functions", "--url", stand_in.url) == (1, "", refused)
    assert run(capsys, "functions", "--url", stand_in.url, "--token", "sesame")[0] == 0


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("status", "\udcff"), "eventrun: request-id: not valid UTF-8: b'\\xff'\n"),
        (("invoke", "h\udcffllo"), "eventrun: name: not valid UTF-8: b'h\\xffllo'\n"),
        (("invoke", "echo", "--data", '"\udcff"'), "eventrun: data: not valid UTF-8: b'\"\\xff\"'\n"),
        (("list", "--function", "h\udcff"), "eventrun: function: not valid UTF-8: b'h\\xff'\n"),
    ],
    ids=["status", "invoke", "data", "list"],
)
def test_an_argument_that_is_not_utf8_is_a_usage_error(capsys: Any, argv: tuple[str, ...], expected: str) -> None:
    # (the shell's bytes, as Python hands them over: undecodable ones as lone surrogates)
    assert run(capsys, *argv, "--url", "http://127.0.0.1:9") == (2, "", expected)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("status", ""), "argument REQUEST_ID: expected a RequestId, got ''"),
        (("logs", " "), "argument REQUEST_ID: expected a RequestId, got ' '"),
        (("terminate", "\t"), "argument REQUEST_ID: expected a RequestId, got '\\t'"),
        (("replay", ""), "argument REQUEST_ID: expected a RequestId, got ''"),
        (("invoke", ""), "argument NAME: expected a function's name, got ''"),
        (("invoke", "thumbnail", "--idempotency-key", ""), "argument --idempotency-key: expected an Idempotency-Key, got ''"),
        (("list", "--function", " "), "argument --function: expected a function's name, got ' '"),
        (("replay", "--function", ""), "argument --function: expected a function's name, got ''"),
        (("replay", "old-1", "--idempotency-key", " "), "argument --idempotency-key: expected an Idempotency-Key, got ' '"),
    ],
    ids=["status", "logs", "terminate", "replay", "invoke", "invoke-key", "list", "replay-function", "replay-key"],
)
def test_an_empty_name_or_request_id_is_a_usage_error(stand_in: StandIn, capsys: Any, argv: tuple[str, ...], expected: str) -> None:
    # Sent, it made the path of another route: `status ""` answered "no route for GET /invocations/".
    status, out, err = run(capsys, *argv, "--url", stand_in.url)
    assert (status, out) == (2, "") and err.rstrip().endswith(expected), err
    assert stand_in.requests == []


@pytest.mark.parametrize("data", ["NaN", '{"a": Infinity}', "[-Infinity]"])
def test_data_the_server_would_not_read_as_json_is_a_usage_error(capsys: Any, data: str) -> None:
    status, out, err = run(capsys, "invoke", "echo", "--data", data, "--url", "http://127.0.0.1:9")
    assert (status, out) == (2, "") and err.startswith("eventrun: --data is not valid JSON: "), err


# --------------------------------------------------------------------------- status, logs, terminate


def test_status_prints_the_invocation_indented(stand_in: StandIn, capsys: Any) -> None:
    invocation = _invocation("req-1", "RUNNING", StartedAt="2024-05-01T10:00:01Z")
    stand_in.invocations["req-1"] = [invocation]
    assert run(capsys, "status", "req-1", "--url", stand_in.url) == (
        0,
        json.dumps(invocation, indent=2) + "\n",
        "",
    )


def test_status_of_an_unknown_request(stand_in: StandIn, capsys: Any) -> None:
    assert run(capsys, "status", "a/b", "--url", stand_in.url) == (
        1,
        "",
        "eventrun: InvocationNotFound: invocation 'a/b' does not exist (HTTP 404)\n",
    )


@pytest.mark.parametrize(("text", "out"), [("one\ntwo\n", "one\ntwo\n"), ("no end", "no end\n"), ("", "")])
def test_logs_prints_the_text(stand_in: StandIn, capsys: Any, text: str, out: str) -> None:
    stand_in.logs["req-1"] = text
    assert run(capsys, "logs", "req-1", "--url", stand_in.url) == (0, out, "")


def test_logs_follow_prints_data_lines_until_end(stand_in: StandIn, capsys: Any) -> None:
    stand_in.streams["req-1"] = [
        ": keep-alive\n\n",
        "data: starting\n\n",
        "data: line one\r\ndata:line two\n\n",
        'event: end\ndata: {"RequestId": "req-1", "Status": "FINISHED"}\n\n',
        "data: never printed\n\n",
    ]
    assert run(capsys, "logs", "req-1", "--follow", "--url", stand_in.url) == (
        0,
        "starting\nline one\nline two\n",
        "",
    )
    [call] = stand_in.calls("GET", "/invocations/req-1/logs")
    assert call.query == {"follow": "true"}
    assert stand_in.calls("GET", "/invocations/req-1") == []


@pytest.mark.parametrize("end", ['data: {"RequestId": "req-1", "Status": "FAILED"}\n', "data:\n", ""])
def test_logs_follow_reports_a_failed_run_with_its_error(stand_in: StandIn, capsys: Any, end: str) -> None:
    stand_in.streams["req-1"] = ["data: oops\n\n", f"event: end\n{end}\n"]
    stand_in.invocations["req-1"] = [
        _invocation("req-1", "FAILED", ErrorType="KeyError", ErrorMessage="'x'")
    ]
    assert run(capsys, "logs", "req-1", "-f", "--url", stand_in.url) == (
        1,
        "oops\n",
        "eventrun: req-1 FAILED: KeyError: 'x'\n",
    )


def test_logs_follow_reports_a_stream_that_closed_early(stand_in: StandIn, capsys: Any) -> None:
    stand_in.streams["req-1"] = ["data: half\n\n"]
    stand_in.invocations["req-1"] = [_invocation("req-1", "RUNNING")]
    assert run(capsys, "logs", "req-1", "--follow", "--url", stand_in.url) == (
        1,
        "half\n",
        "eventrun: the log stream closed before req-1 ended (now RUNNING)\n",
    )


def test_logs_follow_reports_an_in_band_error(stand_in: StandIn, capsys: Any) -> None:
    error = {"Error": {"Code": "InternalError", "Message": "internal error; see the server log"}}
    stand_in.streams["req-1"] = ["data: a\n\n", f"event: error\ndata: {json.dumps(error)}\n\n"]
    assert run(capsys, "logs", "req-1", "--follow", "--url", stand_in.url) == (
        1,
        "a\n",
        "eventrun: the log stream failed: InternalError: internal error; see the server log\n",
    )


GARISH = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\x9b1m\r\n  and a line"  # retitle, clear, colour, C1 CSI


def test_what_a_failed_run_says_cannot_drive_the_terminal(stand_in: StandIn, capsys: Any) -> None:
    stand_in.invocations["req-thumbnail"] = [
        _invocation("req-thumbnail", "FAILED", ErrorType="Evil\x1b[8m", ErrorMessage=GARISH)
    ]
    assert run(capsys, "invoke", "thumbnail", "--wait", "--url", stand_in.url) == (
        1,
        "",
        "eventrun: req-thumbnail FAILED: Evil\\x1b[8m: "
        "\\x1b]0;owned\\x07\\x1b[2J\\x1b[31mred\\x9b1m and a line\n",
    )


def test_what_a_server_says_cannot_drive_the_terminal(stand_in: StandIn, capsys: Any) -> None:
    assert run(capsys, "invoke", "garish", "--url", stand_in.url) == (
        1,
        "",
        "eventrun: Invalid\\x1b[5m: \\x1b]0;owned\\x07red \\x1b[31mtext\\r\\nand a line (HTTP 400)\n",
    )
    error = {"Error": {"Code": "InternalError", "Message": "\x1b[2Jgone\x07"}}
    stand_in.streams["req-1"] = ["data: \x1b[1mbold\x1b[0m\n\n", f"event: error\ndata: {json.dumps(error)}\n\n"]
    assert run(capsys, "logs", "req-1", "--follow", "--url", stand_in.url) == (
        1,
        "\x1b[1mbold\x1b[0m\n",  # the function's own output: as it is
        "eventrun: the log stream failed: InternalError: \\x1b[2Jgone\\x07\n",
    )


def test_logs_print_the_functions_output_as_it_is(stand_in: StandIn, capsys: Any) -> None:
    stand_in.logs["req-1"] = "\x1b[32mgreen\x1b[0m\tand a tab\n"
    assert run(capsys, "logs", "req-1", "--url", stand_in.url) == (0, "\x1b[32mgreen\x1b[0m\tand a tab\n", "")


@pytest.mark.parametrize(
    "environment", [{"PYTHONIOENCODING": "ascii"}, {"LC_ALL": "C", "PYTHONUTF8": "0"}], ids=["ascii", "c-locale"]
)
def test_output_the_terminal_cannot_encode_is_escaped(
    stand_in: StandIn, tmp_path: Path, environment: dict[str, str]
) -> None:
    stand_in.logs["req-1"] = "caf\u00e9 \u4f60\u597d\n"
    stand_in.invocations["req-1"] = [
        _invocation(
            "req-1", "FAILED", ErrorType="ValueError", ErrorMessage="caf\u00e9 \u4f60\u597d",
            Result={"face": "\U0001f600"},
        )
    ]
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("EVENTRUN_", "LC_", "LANG")) and k not in ("PYTHONIOENCODING", "PYTHONUTF8")
    }

    def eventrun(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(EVENTRUN), *argv, "--url", stand_in.url], cwd=tmp_path, env={**env, **environment},
            capture_output=True, text=True, encoding="utf-8", timeout=30,
        )

    logs = eventrun("logs", "req-1")
    assert (logs.returncode, logs.stdout, logs.stderr) == (0, "caf\\xe9 \\u4f60\\u597d\n", "")
    # JSON stays JSON: its escapes (\\u00e9, \\ud83d\\ude00), not the terminal's (\\xe9, \\U0001f600).
    status = eventrun("status", "req-1")
    assert (status.returncode, status.stderr) == (0, "")
    assert status.stdout.isascii() and json.loads(status.stdout) == stand_in.invocations["req-1"][0], status.stdout
    waited = eventrun("invoke", "syncfn", "--wait", "--data", '{"face": "\\ud83d\\ude00", "caf\\u00e9": 1}')
    assert (waited.returncode, waited.stderr) == (0, "")
    assert json.loads(waited.stdout) == {"echo": {"face": "\U0001f600", "caf\u00e9": 1}}, waited.stdout


def test_status_json_escapes_characters_that_turn_or_hide_text(stand_in: StandIn, capsys: Any) -> None:
    # "pay 1234 \u202e9876" reads "pay 1234 6789" on a terminal; the CLI's other output escapes it.
    message = "pay 1234 \u202e9876 \u200b\u2028\u2066x\ufeff"
    invocation = _invocation("req-1", "FAILED", ErrorMessage=message, Result={"\u202ekey": ["\u061c"]})
    stand_in.invocations["req-1"] = [invocation]
    status, out, err = run(capsys, "status", "req-1", "--url", stand_in.url)
    assert (status, err) == (0, "")
    assert "pay 1234 \\u202e9876 \\u200b\\u2028\\u2066x\\ufeff" in out and '"\\u202ekey": [' in out, out
    assert not re.search("[\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]", out), repr(out)
    assert json.loads(out) == invocation


def test_json_output_keeps_the_characters_a_utf8_stdout_has(stand_in: StandIn, capsys: Any) -> None:
    stand_in.invocations["req-1"] = [_invocation("req-1", "FINISHED", Result={"face": "\U0001f600", "caf\u00e9": 1})]
    status, out, _ = run(capsys, "status", "req-1", "--url", stand_in.url)
    assert status == 0 and '"face": "\U0001f600"' in out and '"caf\u00e9": 1' in out, out


def test_status_json_escapes_every_control_character(stand_in: StandIn, capsys: Any) -> None:
    # json escapes C0 itself; DEL and C1 (a terminal may read \x9b as CSI) it leaves as they are.
    message = "\x1b[2Jred\x7f\x80\x85\x9b31m\x9f caf\u00e9 \u00a0"
    invocation = _invocation("req-1", "FAILED", ErrorMessage=message, Result={"\x9bkey": ["\x7f"]})
    stand_in.invocations["req-1"] = [invocation]
    status, out, err = run(capsys, "status", "req-1", "--url", stand_in.url)
    assert (status, err) == (0, "")
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", out), repr(out)
    assert "\\u001b[2Jred\\u007f\\u0080\\u0085\\u009b31m\\u009f caf\u00e9 \u00a0" in out, out
    assert '"\\u009bkey": [' in out and '"\\u007f"' in out, out
    assert json.loads(out) == invocation


def test_terminate_prints_the_final_status(stand_in: StandIn, capsys: Any) -> None:
    assert run(capsys, "terminate", "req-1", "--url", stand_in.url) == (0, "ABORTED\n", "")
    assert len(stand_in.calls("POST", "/invocations/req-1/terminate")) == 1


def test_terminate_waits_for_a_kill_under_way(stand_in: StandIn, capsys: Any) -> None:
    stand_in.terminated["req-1"] = _invocation("req-1", "RUNNING")
    stand_in.invocations["req-1"] = [_invocation("req-1", "RUNNING"), _invocation("req-1", "ABORTED")]
    assert run(capsys, "terminate", "req-1", "--url", stand_in.url) == (0, "ABORTED\n", "")
    assert len(stand_in.calls("GET", "/invocations/req-1")) == 2


def test_a_terminate_answer_cannot_drive_the_terminal(stand_in: StandIn, capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(cli, "TERMINATE_WAIT", 0.2)  # (a status that is no end is waited on a while)
    stand_in.terminated["req-1"] = {"RequestId": "req-1", "Status": "\x1b[2JABORTED\u202e"}
    stand_in.invocations["req-1"] = [{"RequestId": "req-1", "Status": "\x1b[2JABORTED\u202e"}]
    assert run(capsys, "terminate", "req-1", "--url", stand_in.url) == (0, "\\x1b[2JABORTED\\u202e\n", "")


def test_printable_shows_invisible_and_turning_characters_escaped() -> None:
    # U+202E turns the rest of the line around; U+2028 ends a line on some terminals; U+200B is unseen.
    assert client.printable("a\u202eb\u2028c\u200bd\u00e9 \u00a0") == "a\\u202eb\\u2028c\\u200bd\u00e9 \u00a0"


def test_terminate_an_ended_run(stand_in: StandIn, capsys: Any) -> None:
    assert run(capsys, "terminate", "ended", "--url", stand_in.url) == (
        1,
        "",
        "eventrun: InvocationEnded: invocation 'ended' already ended with status FINISHED (HTTP 409)\n",
    )


# --------------------------------------------------------------------------- list, functions


def test_list_prints_a_table_and_passes_the_filters(stand_in: StandIn, capsys: Any) -> None:
    stand_in.listing = {
        "Invocations": [
            _invocation("req-2", "RUNNING", CreatedAt="2024-05-01T10:00:02Z"),
            _invocation("req-1", "FINISHED", FunctionName="orders", DurationMs=1234),
        ],
        "NextCursor": None,
    }
    argv = ("list", "--function", "thumbnail", "--status", "running", "--limit", "5", "--url", stand_in.url)
    assert run(capsys, *argv) == (
        0,
        "RequestId  FunctionName  Status    CreatedAt             DurationMs\n"
        "req-2      thumbnail     RUNNING   2024-05-01T10:00:02Z  -\n"
        "req-1      orders        FINISHED  2024-05-01T10:00:00Z  1234\n",
        "",
    )
    [call] = stand_in.calls("GET", "/invocations")
    # The table shows no results, so none are asked for.
    assert call.query == {"function": "thumbnail", "status": "RUNNING", "limit": "5", "results": "false"}


GARBLING = "\x1b[2J\x1b]0;owned\x07bad\r\nreq-0  fake  FINISHED\x7f\x9b1m"  # clear, retitle, a made-up row, DEL, C1 CSI
GARBLING_SHOWN = "\\x1b[2J\\x1b]0;owned\\x07bad\\r\\nreq-0  fake  FINISHED\\x7f\\x9b1m"


def test_list_cells_show_control_characters_escaped(stand_in: StandIn, capsys: Any) -> None:
    stand_in.listing = {
        "Invocations": [_invocation("req-1", "FAILED", FunctionName=GARBLING, ErrorMessage="boom\nline 2")],
        "NextCursor": None,
    }
    status, out, err = run(capsys, "list", "--url", stand_in.url)
    assert (status, err) == (0, "")
    assert out == (
        "RequestId  FunctionName" + " " * (len(GARBLING_SHOWN) - 10) + "Status  CreatedAt             DurationMs\n"
        f"req-1      {GARBLING_SHOWN}  FAILED  2024-05-01T10:00:00Z  -\n"
    ), out


def test_list_columns_line_up_with_wide_and_combining_characters(stand_in: StandIn, capsys: Any) -> None:
    stand_in.listing = {
        "Invocations": [
            _invocation("req-1", "FINISHED", FunctionName="缩略图"),  # three characters, six columns
            _invocation("req-2", "FINISHED", FunctionName="cafe\u0301s"),  # an accent written apart: five columns
            _invocation("req-3", "FINISHED", FunctionName="thumbnail"),
        ],
        "NextCursor": None,
    }
    status, out, err = run(capsys, "list", "--url", stand_in.url)
    assert (status, err) == (0, "")
    assert out.splitlines()[1:] == [
        "req-1      缩略图        FINISHED  2024-05-01T10:00:00Z  -",
        "req-2      cafe\u0301s         FINISHED  2024-05-01T10:00:00Z  -",
        "req-3      thumbnail     FINISHED  2024-05-01T10:00:00Z  -",
    ]


def test_list_points_at_the_next_page(stand_in: StandIn, capsys: Any) -> None:
    stand_in.listing = {"Invocations": [], "NextCursor": "abc"}
    assert run(capsys, "list", "--url", stand_in.url) == (
        0,
        "RequestId  FunctionName  Status  CreatedAt  DurationMs\n",
        "more invocations follow: add --cursor abc\n",
    )
    assert stand_in.calls("GET", "/invocations")[0].query == {"results": "false"}


def test_list_asks_for_more_pages_until_it_has_the_limit(stand_in: StandIn, capsys: Any) -> None:
    # A page of runs with large error messages holds fewer than asked; the table still gets --limit runs.
    big = "m" * 100_000
    stand_in.listings = [
        {
            "Invocations": [
                _invocation("req-5", "FAILED", ErrorMessage=big), _invocation("req-4", "FAILED", ErrorMessage=big)
            ],
            "NextCursor": "c1",
        },
        {"Invocations": [_invocation("req-3", "FAILED", ErrorMessage=big)], "NextCursor": "c2"},
        {"Invocations": [_invocation("req-2", "FAILED", ErrorMessage=big)], "NextCursor": "c3"},
    ]
    status, out, err = run(capsys, "list", "--function", "thumbnail", "--limit", "4", "--url", stand_in.url)
    assert (status, err) == (0, "more invocations follow: add --cursor c3\n")
    assert [line.split()[0] for line in out.splitlines()] == ["RequestId", "req-5", "req-4", "req-3", "req-2"]
    assert big not in out
    assert [call.query for call in stand_in.calls("GET", "/invocations")] == [
        {"function": "thumbnail", "limit": "4", "results": "false"},
        {"function": "thumbnail", "limit": "2", "cursor": "c1", "results": "false"},
        {"function": "thumbnail", "limit": "1", "cursor": "c2", "results": "false"},
    ]
    # Without --limit, the server's default page (50) is what it fills; the last page ends it.
    stand_in.listings = [
        {"Invocations": [_invocation("req-9", "QUEUED")], "NextCursor": "c9"},
        {"Invocations": [_invocation("req-8", "QUEUED")], "NextCursor": None},
    ]
    status, out, err = run(capsys, "list", "--url", stand_in.url)
    assert (status, err, len(out.splitlines())) == (0, "", 3)
    assert [call.query for call in stand_in.calls("GET", "/invocations")[3:]] == [
        {"results": "false"}, {"limit": "49", "cursor": "c9", "results": "false"}
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--limit", "0"), "argument --limit: expected an integer from 1 to 1000, got '0'"),
        (("--limit", "1001"), "argument --limit: expected an integer from 1 to 1000, got '1001'"),
        (("--limit", "ten"), "argument --limit: expected an integer from 1 to 1000, got 'ten'"),
        (("--status", "done"), "argument --status: expected one of QUEUED, RUNNING, FINISHED, FAILED, TIMED_OUT, ABORTED, got 'done'"),
    ],
)
def test_list_refuses_bad_filters(capsys: Any, argv: tuple[str, ...], message: str) -> None:
    status, out, err = run(capsys, "list", *argv)
    assert (status, out) == (2, "")
    assert message in err.splitlines()[-1]


# --------------------------------------------------------------------------- replay

TIME_OR_DURATION = (
    "expected an RFC 3339 time with its zone (e.g. 2026-12-05T08:00:00Z) or a duration ago (e.g. 90m, 1h, 2d)"
)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--limit", "0"), "argument --limit: expected an integer from 1 to 1000, got '0'"),
        (("--limit", "2000"), "argument --limit: expected an integer from 1 to 1000, got '2000'"),
        (("--limit", "-1"), "argument --limit: expected an integer from 1 to 1000, got '-1'"),
        (("--since", "bogus"), f"argument --since: {TIME_OR_DURATION}, got 'bogus'"),
        (("--since", "0"), f"argument --since: {TIME_OR_DURATION}, got '0'"),
        (("--until", "2026-12-05T08:00:00"), f"argument --until: {TIME_OR_DURATION}, got '2026-12-05T08:00:00'"),
        (("--status", "RUNNIN"), "argument --status: expected one of QUEUED, RUNNING, FINISHED, FAILED, TIMED_OUT, ABORTED, got 'RUNNIN'"),
    ],
)
def test_replay_refuses_bad_values_before_sending(
    stand_in: StandIn, capsys: Any, argv: tuple[str, ...], message: str
) -> None:
    status, out, err = run(capsys, "replay", "--function", "thumbnail", *argv, "--dry-run", "--url", stand_in.url)
    assert (status, out) == (2, "")
    assert err.splitlines()[-1].startswith(f"eventrun replay: error: {message}")
    assert stand_in.requests == []


def test_replay_sends_the_filter_with_times_as_rfc_3339(stand_in: StandIn, capsys: Any) -> None:
    from datetime import datetime, timedelta, timezone

    argv = ("--since", "90m", "--until", "2026-12-05T08:00:00+01:00", "--limit", "1000", "--status", "failed")
    before = datetime.now(timezone.utc)
    assert run(capsys, "replay", "--function", "thumbnail", *argv, "--url", stand_in.url) == (
        0,
        "old-1 -> new-1\n",
        "1 run replayed\n",
    )
    body = json.loads(stand_in.calls("POST", "/functions/thumbnail/replay")[0].body)
    since = datetime.fromisoformat(body.pop("Since"))
    assert before - timedelta(minutes=90, seconds=5) <= since <= datetime.now(timezone.utc) - timedelta(minutes=90)
    assert body == {"Until": "2026-12-05T08:00:00+01:00", "Limit": 1000, "Status": "FAILED", "DryRun": False}


def test_replay_takes_a_leap_second(stand_in: StandIn, capsys: Any) -> None:
    argv = ("--since", "2016-12-31T23:59:60Z", "--until", "2016-12-31t23:59:60.5z", "--url", stand_in.url)
    assert run(capsys, "replay", "--function", "thumbnail", *argv) == (0, "old-1 -> new-1\n", "1 run replayed\n")
    body = json.loads(stand_in.calls("POST", "/functions/thumbnail/replay")[0].body)
    assert (body["Since"], body["Until"]) == ("2016-12-31T23:59:60Z", "2016-12-31t23:59:60.5z")


def test_replay_of_one_run_prints_the_new_request_id(stand_in: StandIn, capsys: Any) -> None:
    assert run(capsys, "replay", "old-1", "--url", stand_in.url) == (0, "new-old-1\n", "")
    assert len(stand_in.calls("POST", "/invocations/old-1/replay")) == 1


@pytest.mark.parametrize("key", ["nightly:2024-05-01", "日本:1"])
def test_replay_sends_its_idempotency_key_for_one_run_and_in_bulk(stand_in: StandIn, capsys: Any, key: str) -> None:
    assert run(capsys, "replay", "old-1", "--idempotency-key", key, "--url", stand_in.url) == (0, "new-old-1\n", "")
    argv = ("--function", "thumbnail", "--status", "FAILED", "--idempotency-key", key, "--url", stand_in.url)
    assert run(capsys, "replay", *argv) == (0, "old-1 -> new-1\n", "1 run replayed\n")
    sent = [*stand_in.calls("POST", "/invocations/old-1/replay"), *stand_in.calls("POST", "/functions/thumbnail/replay")]
    assert [call.idempotency_key for call in sent] == [key, key], "as UTF-8, which the server reads"
    assert run(capsys, "replay", "old-1", "--url", stand_in.url)[0] == 0
    assert stand_in.calls("POST", "/invocations/old-1/replay")[-1].idempotency_key is None, "no key unless given"


def test_a_dry_run_of_one_run_prints_it_and_replays_nothing(stand_in: StandIn, capsys: Any) -> None:
    stand_in.invocations["old-1"] = [_invocation("old-1", "FAILED")]
    stand_in.functions = {"Functions": [{"FunctionName": "thumbnail"}]}
    assert run(capsys, "replay", "old-1", "--dry-run", "--url", stand_in.url) == (
        0,
        "old-1\n",
        "1 run would be replayed: thumbnail, FAILED\n",
    )
    assert [r.method for r in stand_in.requests] == ["GET", "GET"]  # the run, then the functions


@pytest.mark.parametrize(
    ("status", "functions", "line"),
    [
        ("RUNNING", ["thumbnail"], "eventrun: invocation 'old-1' is still RUNNING; replay it once it has ended\n"),
        ("FAILED", ["other"], "eventrun: old-1 is a run of function 'thumbnail', which the server no longer has, "
         "so it cannot be replayed\n"),
    ],
    ids=["not-ended", "function-gone"],
)
def test_a_dry_run_of_one_run_says_why_the_server_would_refuse_it(
    stand_in: StandIn, capsys: Any, status: str, functions: list[str], line: str
) -> None:
    stand_in.invocations["old-1"] = [_invocation("old-1", status)]
    stand_in.functions = {"Functions": [{"FunctionName": name} for name in functions]}
    assert run(capsys, "replay", "old-1", "--dry-run", "--url", stand_in.url) == (1, "", line)
    assert [r.method for r in stand_in.requests if r.method != "GET"] == []


def test_a_dry_run_of_an_unknown_run_is_one_line(stand_in: StandIn, capsys: Any) -> None:
    assert run(capsys, "replay", "nope", "--dry-run", "--url", stand_in.url) == (
        1, "", "eventrun: InvocationNotFound: invocation 'nope' does not exist (HTTP 404)\n"
    )


@pytest.mark.parametrize(
    ("argv", "options"),
    [
        (("--status", "FAILED"), "--status"),
        (("--trigger", "http"), "--trigger"),
        (("--since", "1h", "--until", "2026-12-05T08:00:00Z"), "--since and --until"),
        (("--limit", "100"), "--limit"),  # (its default, given: still a filter one run cannot take)
    ],
)
def test_filters_with_one_run_are_a_usage_error(
    stand_in: StandIn, capsys: Any, argv: tuple[str, ...], options: str
) -> None:
    for dry_run in ((), ("--dry-run",)):
        assert run(capsys, "replay", "old-1", *argv, *dry_run, "--url", stand_in.url) == (
            2, "", f"eventrun: {options} choose which of a function's runs to replay (with --function F), "
            "not one REQUEST_ID\n",
        )
    assert stand_in.requests == []


def test_a_bulk_replay_says_how_to_go_on_when_more_runs_may_match(stand_in: StandIn, capsys: Any) -> None:
    assert run(capsys, "replay", "--function", "thumbnail", "--limit", "1", "--url", stand_in.url) == (
        0,
        "old-1 -> new-1\n",
        "1 run replayed\nmore runs may match: add --cursor next-page\n",
    )
    assert run(capsys, "replay", "--function", "thumbnail", "--limit", "1", "--cursor", "next-page", "--url", stand_in.url) == (
        0,
        "old-1 -> new-1\n",
        "1 run replayed\n",
    )
    assert json.loads(stand_in.requests[-1].body) == {"Limit": 1, "DryRun": False, "Cursor": "next-page"}


def test_a_bulk_replay_asks_for_100_runs_unless_told(stand_in: StandIn, capsys: Any) -> None:
    assert run(capsys, "replay", "--function", "thumbnail", "--url", stand_in.url)[0] == 0
    assert json.loads(stand_in.requests[0].body) == {"Limit": 100, "DryRun": False}


def test_replay_of_a_time_before_1970_is_from_the_start(stand_in: StandIn, capsys: Any) -> None:
    assert run(capsys, "replay", "--function", "f", "--since", "999999999d", "--dry-run", "--url", stand_in.url)[0] == 0
    assert json.loads(stand_in.requests[0].body)["Since"] == "1970-01-01T00:00:00.000Z"


def test_client_checks_match_the_servers() -> None:
    """--limit and --since/--until take exactly what the server's list and replay take."""
    from eventrun.client import MAX_LIMIT
    from eventrun.engine.errors import InvalidParameter
    from eventrun.triggers.http.routes import MAX_LIST_LIMIT, _parse_time

    assert MAX_LIMIT == MAX_LIST_LIMIT
    for text in (
        "2026-12-05T08:00:00Z", "2026-12-05T08:00:00.123+05:30", " 2026-12-05T08:00:00-00:00 ", "2026-12-05",
        "2026-12-05T08:00:00", "yesterday", "2026-13-05T08:00:00Z", "2026-12-05 08:00:00Z",
        # A leap second: RFC 3339's, with its zone (as is_rfc3339 takes it), and nothing else.
        "2016-12-31T23:59:60Z", "2016-12-31t23:59:60.5z", " 2016-12-31T18:59:60-05:00 ", "2016-12-31T23:59:61Z",
        "2016-12-31T23:59:60", "2016-12-31 23:59:60Z", "2016-12-31T23:60:60Z",
    ):
        try:
            _parse_time("since", text)
            server = True
        except InvalidParameter:
            server = False
        try:
            client = cli._time_or_ago(text) == text.strip()
        except argparse.ArgumentTypeError:
            client = False
        assert client == server, text


def test_functions_prints_a_table(stand_in: StandIn, capsys: Any) -> None:
    stand_in.functions = {
        "Functions": [
            {
                "FunctionName": "thumbnail",
                "AsyncExecution": True,
                "Timeout": 7200.0,
                "Concurrency": 4,
                "QpsLimit": 1000,
                "Handler": "functions/thumbnail.py:main_handler",
                "Triggers": [
                    {"Type": "s3", "Bucket": "uploads", "Events": ["s3:ObjectCreated:*"], "Prefix": ""},
                    {"Type": "timer", "Name": "nightly", "Cron": "0 0 2 * * * *"},
                ],
            },
            {
                "FunctionName": "echo",
                "AsyncExecution": False,
                "Timeout": 90.5,
                "Concurrency": 1,
                "Triggers": [],
            },
            {
                "FunctionName": "orders",
                "AsyncExecution": True,
                "Timeout": 900.0,
                "Concurrency": 10,
                "QpsLimit": 50,
                "Triggers": [{"Type": "kafka", "Topic": "orders", "GroupId": "g"}],
            },
        ]
    }
    assert run(capsys, "functions", "--url", stand_in.url) == (
        0,
        "FunctionName  Async  Timeout  Concurrency  QpsLimit  Triggers\n"
        "thumbnail     yes    2h       4            1000      s3:uploads,timer:nightly\n"
        "echo          no     90.5s    1            -         -\n"
        "orders        yes    15m      10           50        kafka:orders\n",
        "",
    )


def test_functions_cells_show_control_characters_escaped(stand_in: StandIn, capsys: Any) -> None:
    stand_in.functions = {
        "Functions": [
            {
                "FunctionName": GARBLING,
                "AsyncExecution": True,
                "Timeout": "\x1b[5m",
                "Concurrency": 1,
                "Triggers": [{"Type": "s3", "Bucket": "up\nloads"}, {"Type": "timer", "Name": "\x9b2J"}],
            }
        ]
    }
    status, out, err = run(capsys, "functions", "--url", stand_in.url)
    assert (status, err) == (0, "")
    assert out == (
        "FunctionName" + " " * (len(GARBLING_SHOWN) - 10) + "Async  Timeout  Concurrency  QpsLimit  Triggers\n"
        f"{GARBLING_SHOWN}  yes    \\x1b[5m  1            -         s3:up\\nloads,timer:\\x9b2J\n"
    )


# --------------------------------------------------------------------------- finding the server


def _manifest(path: Path, port: int) -> Path:
    path.write_text(f"[server]\nport = {port}\n")
    return path


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_the_url_comes_from_the_manifest_in_the_current_folder(
    stand_in: StandIn, capsys: Any, tmp_path: Path
) -> None:
    _manifest(tmp_path / "eventrun.toml", _port(stand_in.url))
    assert run(capsys, "functions") == (0, "FunctionName  Async  Timeout  Concurrency  QpsLimit  Triggers\n", "")


def test_the_url_comes_from_config(stand_in: StandIn, capsys: Any, tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    _manifest(tmp_path / "conf" / "prod.toml", _port(stand_in.url))
    assert run(capsys, "functions", "--config", "conf/prod.toml")[0] == 0


def test_the_url_comes_from_server_variables_without_a_manifest(
    stand_in: StandIn, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVENTRUN_SERVER__PORT", str(_port(stand_in.url)))
    assert run(capsys, "functions") == (0, "FunctionName  Async  Timeout  Concurrency  QpsLimit  Triggers\n", "")
    monkeypatch.delenv("EVENTRUN_SERVER__PORT")
    monkeypatch.setenv("EVENTRUN_SERVER__URL", stand_in.url + "/")
    assert run(capsys, "functions") == (0, "FunctionName  Async  Timeout  Concurrency  QpsLimit  Triggers\n", "")


def test_server_variables_override_the_manifest(
    stand_in: StandIn, capsys: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _manifest(tmp_path / "eventrun.toml", free_port())
    monkeypatch.setenv("EVENTRUN_SERVER__PORT", str(_port(stand_in.url)))
    assert run(capsys, "functions")[0] == 0
    (tmp_path / "conf").mkdir()
    _manifest(tmp_path / "conf" / "prod.toml", free_port())
    assert run(capsys, "functions", "--config", "conf/prod.toml")[0] == 0


# The manifest's own messages (engine/manifest.py) are pinned in its tests; here, a fragment
# of each, the file's name first, and the exit status.


def _missing(tmp_path: Path) -> tuple[str, str]:
    return str(tmp_path / "nope.toml"), "no such"


def _syntax(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "syntax.toml").write_text("[server\nport = ")
    return "syntax.toml", "TOML"


def _unknown_key(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "unknown.toml").write_text("[server]\nprot = 9000\n")
    return "unknown.toml", "prot"


def _bad_value(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "value.toml").write_text('[server]\nport = "high"\n')
    return "value.toml", "port"


BAD_MANIFESTS = [_missing, _syntax, _unknown_key, _bad_value]


@pytest.mark.parametrize("bad", BAD_MANIFESTS)
@pytest.mark.parametrize("extra", [(), ("--url", "URL"), ("--url", "URL", "--token", "t")])
def test_a_config_that_is_missing_or_refused_is_a_usage_error(
    stand_in: StandIn, capsys: Any, tmp_path: Path, bad: Callable[[Path], tuple[str, str]], extra: tuple[str, ...]
) -> None:
    config, what = bad(tmp_path)
    extra = tuple(stand_in.url if arg == "URL" else arg for arg in extra)
    status, out, err = run(capsys, "functions", "--config", config, *extra)
    assert (status, out) == (2, ""), err
    assert err.startswith(f"eventrun: {config}: ") and what in err and "cannot reach" not in err, err
    assert stand_in.requests == []


@pytest.mark.parametrize("bad", BAD_MANIFESTS)
def test_a_refused_config_reads_as_serve_reports_it(
    capsys: Any, tmp_path: Path, bad: Callable[[Path], tuple[str, str]]
) -> None:
    config, _ = bad(tmp_path)
    assert run(capsys, "list", "--config", config) == run(capsys, "serve", "--config", config)


def test_a_broken_manifest_in_the_current_folder_is_a_usage_error(
    stand_in: StandIn, capsys: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "eventrun.toml").write_text("[server]\nprot = 9000\n")
    monkeypatch.setenv("EVENTRUN_URL", stand_in.url)  # not a way around it: the file comes first
    status, out, err = run(capsys, "functions")
    assert (status, out) == (2, "") and err.startswith("eventrun: eventrun.toml: ") and "prot" in err, err
    assert run(capsys, "functions") == run(capsys, "serve")
    # Still read with --url alone, for its ui_token.
    assert run(capsys, "functions", "--url", stand_in.url) == (status, out, err)
    assert stand_in.requests == []
    # Given --url and --token, there is nothing to read it for.
    assert run(capsys, "functions", "--url", stand_in.url, "--token", "t")[0] == 0


def test_a_bad_server_variable_is_a_usage_error(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTRUN_SERVER__PORT", "high")
    status, out, err = run(capsys, "functions")
    assert (status, out) == (2, "") and "port" in err.lower() and "cannot reach" not in err, err


def test_url_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def resolve(url: str | None = None, config: str | None = None) -> str:
        return cli.resolve_url(argparse.Namespace(url=url, config=config))

    assert resolve() == "http://127.0.0.1:8080"
    monkeypatch.setenv("EVENTRUN_URL", "http://env:1")
    assert resolve() == "http://env:1"
    monkeypatch.setenv("EVENTRUN_SERVER__UI_TOKEN", "t")  # a [server] variable that names no address
    assert resolve() == "http://env:1"
    monkeypatch.setenv("EVENTRUN_SERVER__PORT", "9002")  # one that does: the manifest's [server], before $EVENTRUN_URL
    assert resolve() == "http://127.0.0.1:9002"
    monkeypatch.setenv("EVENTRUN_SERVER__HOST", "0.0.0.0")
    assert resolve() == "http://127.0.0.1:9002"
    monkeypatch.setenv("EVENTRUN_SERVER__HOST", "box")
    assert resolve() == "http://box:9002"
    monkeypatch.setenv("EVENTRUN_SERVER__URL", "https://proxy/eventrun/")
    assert resolve() == "https://proxy/eventrun"
    for name in ("EVENTRUN_SERVER__PORT", "EVENTRUN_SERVER__HOST", "EVENTRUN_SERVER__URL"):
        monkeypatch.delenv(name)
    with pytest.raises(cli.CliError) as refused:
        resolve(config="absent.toml")
    assert refused.value.exit_status == 2 and str(refused.value).startswith("absent.toml: ")
    _manifest(tmp_path / "eventrun.toml", 9001)
    assert resolve() == "http://127.0.0.1:9001"
    monkeypatch.setenv("EVENTRUN_SERVER__PORT", "9003")
    assert resolve() == "http://127.0.0.1:9003"
    assert resolve(url="https://flag:2/") == "https://flag:2"


def test_the_token_comes_from_the_server_variable_without_a_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    def resolve(token: str | None = None) -> str | None:
        return cli.resolve_token(argparse.Namespace(url=None, config=None, token=token))

    assert resolve() is None
    monkeypatch.setenv("EVENTRUN_TOKEN", "env")
    assert resolve() == "env"
    monkeypatch.setenv("EVENTRUN_SERVER__UI_TOKEN", "server")
    assert resolve() == "server"
    assert resolve("flag") == "flag"


# --------------------------------------------------------------------------- serve


@pytest.fixture
def fake_app(monkeypatch: pytest.MonkeyPatch) -> list[Path | None]:
    """Stand in for eventrun.app: record the config path serve() receives."""
    seen: list[Path | None] = []

    def serve(config_path: Path | None) -> int:
        if config_path is not None and config_path.name == "bad.toml":
            from eventrun.engine.errors import ManifestError

            raise ManifestError("bad.toml: functions.f.timeout: expected a duration")
        seen.append(config_path)
        return 0

    monkeypatch.setitem(sys.modules, "eventrun.app", types.SimpleNamespace(serve=serve))
    return seen


def test_serve_passes_the_manifest(fake_app: list[Path | None], capsys: Any, tmp_path: Path) -> None:
    assert run(capsys, "serve") == (0, "", "")
    (tmp_path / "eventrun.toml").write_text("")
    assert run(capsys, "serve") == (0, "", "")
    assert run(capsys, "serve", "--config", "other.toml") == (0, "", "")
    assert fake_app == [None, Path("eventrun.toml"), Path("other.toml")]


def test_serve_reports_a_bad_manifest_in_one_line(fake_app: list[Path | None], capsys: Any) -> None:
    assert run(capsys, "serve", "--config", "bad.toml") == (
        1,
        "",
        "eventrun: bad.toml: functions.f.timeout: expected a duration\n",
    )


# --------------------------------------------------------------------------- the console script


def interruptible(folder: Path, *argv: str) -> subprocess.Popen[str]:
    """The console script with these arguments, started as in a terminal, where Ctrl-C reaches it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTRUN_")}
    return subprocess.Popen(
        [str(EVENTRUN), *argv],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A runner started in the background (`cmd &` in a script) hands its children SIGINT
        # ignored, and Python then leaves it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_ctrl_c_exits_130_quietly(stand_in: StandIn, tmp_path: Path) -> None:
    stand_in.streams["req-1"] = ["data: working\n\n", None]
    with interruptible(tmp_path, "logs", "req-1", "--follow", "--url", stand_in.url) as process:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline() == "working\n"
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 130
        assert process.stdout.read() == ""
        assert process.stderr.read() == ""


def test_ctrl_c_on_invoke_wait_names_the_run_that_goes_on(stand_in: StandIn, tmp_path: Path) -> None:
    # The RequestId of an async run is printed only with its result: Ctrl-C lost it.
    stand_in.invocations["req-thumbnail"] = [_invocation("req-thumbnail", "RUNNING")]
    with interruptible(tmp_path, "invoke", "thumbnail", "--wait", "--url", stand_in.url) as process:
        deadline = time.monotonic() + 10
        while not stand_in.calls("GET", "/invocations/req-thumbnail") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stand_in.calls("GET", "/invocations/req-thumbnail"), "the command never waited"
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 130
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.read() == ""
        assert process.stderr.read() == (
            "eventrun: stopped waiting; the run req-thumbnail goes on: `eventrun status req-thumbnail` shows it\n"
        )


@pytest.mark.parametrize("follow", [False, True], ids=["logs", "logs-follow"])
def test_a_reader_that_goes_away_ends_logs_quietly_with_0(stand_in: StandIn, tmp_path: Path, follow: bool) -> None:
    # `eventrun logs [-f] ID | head -1`: the reader has what it wanted, and the command did its part.
    lines = [f"line {n} " + "x" * 100 for n in range(10_000)]
    stand_in.logs["req-1"] = "".join(f"{line}\n" for line in lines)
    stand_in.streams["req-1"] = [*(f"data: {line}\n\n" for line in lines[:500]), None]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTRUN_")}
    argv = [str(EVENTRUN), "logs", "req-1", "--url", stand_in.url] + (["--follow"] if follow else [])
    with subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline() == b"line 0 " + b"x" * 100 + b"\n"
        process.stdout.close()
        assert process.wait(10) == 0
        assert process.stderr.read() == b""


@pytest.mark.parametrize(
    ("argv", "usage", "error"),
    [
        (("logs", "--follw", "req-1"), "usage: eventrun logs ", "eventrun logs: error: unrecognized arguments: --follw"),
        (("functions", "extra"), "usage: eventrun functions ", "eventrun functions: error: unrecognized arguments: extra"),
    ],
)
def test_an_unknown_argument_shows_its_commands_usage(capsys: Any, argv: tuple[str, ...], usage: str, error: str) -> None:
    # eventrun's own usage (`eventrun [-h] COMMAND ...`) named none of the command's options.
    status, out, err = run(capsys, *argv)
    assert (status, out) == (2, "")
    assert err.startswith(usage) and err.endswith(f"\n{error}\n"), err


def test_help_exits_0(capsys: Any) -> None:
    status, out, err = run(capsys, "--help")
    assert (status, err) == (0, "")
    assert out.startswith("usage: eventrun ")


# --------------------------------------------------------------------------- against the real server

HANDLER = '''
import time


def main_handler(event, context):
    data = event["data"] or {}
    print("working on", data, flush=True)
    time.sleep(data.get("sleep", 0))
    if data.get("fail"):
        raise ValueError("asked to fail")
    return {"got": data}
'''


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """A real `eventrun serve` on a free port, with ./eventrun.toml naming it; stopped afterwards."""
    import urllib.request

    (tmp_path / "functions").mkdir()
    (tmp_path / "functions" / "work.py").write_text(HANDLER)
    port = free_port()
    (tmp_path / "eventrun.toml").write_text(
        f'[server]\nport = {port}\n\n'
        '[functions.work]\nhandler = "functions/work.py:main_handler"\ntimeout = "60s"\n\n'
        '[functions.now]\nhandler = "functions/work.py:main_handler"\nasync_execution = false\n'
        'timeout = "30s"\nqps_limit = 20\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTRUN_")}
    url = f"http://127.0.0.1:{port}"
    with subprocess.Popen(
        [str(EVENTRUN), "serve"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as process:
        try:
            for _ in range(200):
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                try:
                    urllib.request.urlopen(url + "/healthz", timeout=1).close()
                    break
                except OSError:
                    threading.Event().wait(0.05)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.mark.e2e
def test_against_the_real_server(served: str, capsys: Any) -> None:
    assert run(capsys, "functions") == (
        0,
        "FunctionName  Async  Timeout  Concurrency  QpsLimit  Triggers\n"
        "work          yes    1m       4            1000      -\n"
        "now           no     30s      4            20        -\n",
        "",
    )
    for name in ("work", "now"):  # async, then sync
        result = '{\n  "got": {\n    "n": 1\n  }\n}\n'
        assert run(capsys, "invoke", name, "--data", '{"n": 1}', "--wait") == (0, result, "")

    status, request_id, err = run(capsys, "invoke", "work", "--data", '{"fail": true}')
    request_id = request_id.strip()
    assert (status, err) == (0, "")
    status, out, err = run(capsys, "logs", request_id, "--follow")
    assert status == 1
    assert any(line.endswith("working on {'fail': True}") for line in out.splitlines())
    assert err == f"eventrun: {request_id} FAILED: ValueError: asked to fail\n"

    status, request_id, _ = run(capsys, "invoke", "work", "--data", '{"sleep": 30}')
    request_id = request_id.strip()
    assert run(capsys, "terminate", request_id) == (0, "ABORTED\n", "")
    assert json.loads(run(capsys, "status", request_id)[1])["Status"] == "ABORTED"

    status, out, err = run(capsys, "list", "--function", "work", "--limit", "1")
    assert status == 0
    assert err.startswith("more invocations follow: add --cursor ")
    header, row = out.splitlines()
    assert header.split() == ["RequestId", "FunctionName", "Status", "CreatedAt", "DurationMs"]
    assert row.split()[:3] == [request_id, "work", "ABORTED"]

    assert run(capsys, "invoke", "nope") == (
        1,
        "",
        "eventrun: FunctionNotFound: function 'nope' does not exist (HTTP 404)\n",
    )
