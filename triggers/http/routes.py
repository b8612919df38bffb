"""The gateway's routes: the error middleware, the API's handlers, and build_app to serve them."""

from __future__ import annotations

import asyncio
import difflib
import hmac
import logging
import os
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import hdrs, web

from eventrun.engine.api import Invocation, Status
from eventrun.engine.envelope import dumps, is_rfc3339, loads
from eventrun.engine.errors import EventrunError, InvalidParameter, ShuttingDown
from eventrun.engine.logs import unreadable_log

from ..openapi import openapi_document
from .cors import cors_headers, preflight_middleware
from .origins import origin_middleware
from .parser import checked_key, to_envelope
from .responses import Answer, error_response, forgotten, function_json, invocation_json, json_response, map_error
from .sse import stream_logs
from .ui import ui_routes

if TYPE_CHECKING:
    from eventrun.engine.core import Engine

logger = logging.getLogger(__name__)

ENGINE_KEY: web.AppKey[Engine] = web.AppKey("engine")
"""Where the engine lives in the app, for routes registered from other modules."""

_CLOSING_KEY: web.AppKey[asyncio.Event] = web.AppKey("closing")

MAX_LIST_LIMIT = 1000
LOG_CHUNK = 256 * 1024  # bytes of a log file sent at a time: a log of up to log_limit is never all in memory
_LIMIT = re.compile(r"[0-9]{1,4}")
_TAIL = re.compile(r"[0-9]{1,13}")
MAX_TAIL = 1 << 40
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no", "")


def _map_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    headers = {str(k): v for k, v in exc.headers.items() if k not in (hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH)}
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[ENGINE_KEY].manifest.server.max_body_size
        response = error_response(413, "PayloadTooLarge", f"request body exceeds the limit of {limit} bytes", headers)
        if _decoded(request):
            # aiohttp reads the rest of a refused body for up to 10 s before closing, so that the
            # client, still sending, gets the answer; here that means inflating it (4 MB of gzip
            # can be 4 GB, seconds of CPU). The connection closes after the answer instead.
            _read_no_more(request, response)
        return response
    if isinstance(exc, web.HTTPRequestTimeout):
        _read_no_more(request, response := error_response(408, "RequestTimeout", exc.text or exc.reason, headers))
        return response
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = f"method {request.method} is not allowed on {request.path}; allowed: {allowed}"
        return error_response(405, "MethodNotAllowed", message, headers)
    if request.match_info.http_exception is exc:  # the router found no route
        return error_response(404, "NotFound", f"no route for {request.method} {request.path}", headers)
    return error_response(exc.status, exc.reason.replace(" ", ""), exc.text or exc.reason, headers)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn every failure into the JSON error shape; never leak a traceback."""
    try:
        return await handler(request)
    except EventrunError as exc:
        response = map_error(exc)
        if response is not None:
            return response
        logger.exception("unmapped error on %s %s", request.method, request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _map_http_exception(request, exc)
    except web.RequestPayloadError as exc:  # e.g. a body its Content-Encoding does not decode
        reason = " ".join(str(exc.__cause__ or exc).split()).removeprefix("400, message: ")
        response = error_response(400, "InvalidParameter", f"the request body could not be read: {reason}")
        # Nothing more of the body can be read: aiohttp is not to try (it would fail again and drop
        # the connection before the answer).
        _read_no_more(request, response)
        return response
    except ConnectionResetError:  # the client went away, mid-upload say: routine, not the server's fault
        logger.debug("%s %s: the client closed the connection", request.method, request.path)
        response = error_response(400, "InvalidParameter", "the client closed the connection before the request was read")
        _read_no_more(request, response)  # (an answer nobody reads: the connection is gone)
        return response
    except Exception:
        logger.exception("unexpected error on %s %s", request.method, request.path)
    return error_response(500, "InternalError", "internal error; see the server log")


def _read_no_more(request: web.Request, response: web.Response) -> None:
    """Read nothing more of the request's body, and close the connection after the answer."""
    request.content.feed_eof()
    response.force_close()


def _engine(request: web.Request) -> Engine:
    return request.app[ENGINE_KEY]


def _request_id(request: web.Request) -> str:
    """The RequestId in the path. RequestIds are UUIDs, written in lower case, and a UUID is the
    same in any case (RFC 9562), so an upper-case one names the same run (other text is no
    RequestId: it is left as it came, for the 404 to name)."""
    given = request.match_info["request_id"]
    lowered = given.lower()
    return lowered if _UUID_TEXT.fullmatch(lowered) else given


_UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _one_header(request: web.Request, name: str) -> str | None:
    """A header's value (None without it); sent twice, it is a 400: which one counts is
    unclear, and a proxy may join the two into one ("a, b")."""
    values = request.headers.getall(name, [])
    if len(values) > 1:
        raise InvalidParameter(f"{name} header: given {len(values)} times; give it once")
    return values[0] if values else None


def _json_text(value: Any) -> str:
    """A value from a JSON body as JSON writes it (true, not True), for a message."""
    return dumps(value).decode()


BODY_WAIT = 120.0
"""Seconds a request's body may take to arrive: a client dripping it holds its connection no longer."""

_DECODED = frozenset({"gzip", "deflate", "br", "zstd"})
"""The Content-Encodings aiohttp decodes a body from, as it reads the header (br and zstd only
with their libraries installed: without, aiohttp refuses them itself, before any route)."""


def _decoded(request: web.Request) -> bool:
    """Whether aiohttp decodes this request's body (its Content-Encoding is one it knows)."""
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "")
    return encoding.isascii() and encoding.lower() in _DECODED


async def _read_body(request: web.Request) -> bytes:
    limit = _engine(request).manifest.server.max_body_size
    # Refuse by the declared length first, so a huge upload is not read at all.
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "")
    if encoding.strip().lower() not in ("", "identity") and not _decoded(request):
        # aiohttp would pass the body on as it came: the function would get bytes it cannot read.
        raise web.HTTPUnsupportedMediaType(
            text=f"Content-Encoding {encoding!r} is not one the body can be sent in: send it as it is, or in gzip or deflate"
        )
    if request.content.is_eof():  # all of it came with the headers (the usual small event): no wait to bound
        return await request.read()
    try:
        async with asyncio.timeout(BODY_WAIT):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text=f"the request's body did not arrive within {BODY_WAIT:.0f} s") from None


async def invoke(request: web.Request) -> web.Response:
    """POST /functions/{name}/invocations."""
    engine = _engine(request)
    name = request.match_info["name"]
    config = engine.function(name)
    if engine.shutting_down:
        raise ShuttingDown()
    given = (_one_header(request, "X-Invocation-Type") or "").strip()
    mode = given.lower()
    if mode not in ("", "event", "requestresponse"):
        raise InvalidParameter(f"X-Invocation-Type header: expected 'Event' or 'RequestResponse', got {given!r}")
    body = await _read_body(request)
    key = _one_header(request, "Idempotency-Key")
    keyed = bool((key or "").strip())
    envelope = to_envelope(name, body, request.headers.get(hdrs.CONTENT_TYPE), key)
    if config.async_execution or mode == "event":
        accepted = await engine.accept(envelope, repeatable=keyed)
        return json_response({"RequestId": accepted.request_id}, status=202, headers={"X-Request-Id": accepted.request_id})
    invocation = await engine.call(envelope, unique=not keyed)
    headers = {"X-Request-Id": invocation.request_id}
    answer: dict[str, Any] = {
        "RequestId": invocation.request_id, "Status": invocation.status.value, "Result": invocation.result
    }
    if invocation.status is not Status.FINISHED:
        answer.update(ErrorType=invocation.error_type, ErrorMessage=invocation.error_message)
    return json_response(answer, headers=headers)


async def get_invocation(request: web.Request) -> web.Response:
    """GET /invocations/{request_id}, with the runs it is linked to by replays."""
    engine = _engine(request)
    return json_response(await _invocation_answer(engine, await engine.get(_request_id(request))))


async def _invocation_answer(engine: Engine, invocation: Invocation) -> dict[str, Any]:
    """One invocation as GET /invocations/{request_id} answers it (and terminate, for the same
    run): its fields, and the runs it is linked to by replays."""
    answer = invocation_json(invocation)
    answer["ReplayOf"], answer["Replays"] = await engine.links(invocation.request_id)
    return answer


async def replay(request: web.Request) -> web.Response:
    """POST /invocations/{request_id}/replay: a new run of the same envelope."""
    original = _request_id(request)
    key = checked_key(_one_header(request, "Idempotency-Key")) or None
    accepted = await _engine(request).replay(original, key=key)
    return json_response(
        {"RequestId": accepted.request_id, "ReplayOf": original}, status=202, headers={"X-Request-Id": accepted.request_id}
    )


_REPLAY_FIELDS = {"Status", "Trigger", "Since", "Until", "Limit", "DryRun", "Cursor"}


async def replay_function(request: web.Request) -> web.Response:
    """POST /functions/{name}/replay with a filter: replay the ended runs that match, each once
    (with an Idempotency-Key, each once for that key: Engine.replay_many)."""
    engine = _engine(request)
    name = request.match_info["name"]
    engine.function(name)
    key = checked_key(_one_header(request, "Idempotency-Key")) or None
    raw = await _read_body(request)
    try:
        body = loads(raw) if raw.strip() else {}
    except ValueError:
        raise InvalidParameter("the body is not JSON; expected e.g. {\"Status\": \"FAILED\", \"Limit\": 100}") from None
    if not isinstance(body, dict):
        raise InvalidParameter("the body must be a JSON object, e.g. {\"Status\": \"FAILED\"}")
    unknown = sorted(set(body) - _REPLAY_FIELDS)
    if unknown:
        raise InvalidParameter(f"unknown field {unknown[0]!r}; expected some of {', '.join(sorted(_REPLAY_FIELDS))}")
    limit = body.get("Limit", 100)
    if isinstance(limit, float) and limit.is_integer():
        limit = int(limit)  # 100.0 is an integer to JSON Schema, and so to the API's own schema
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidParameter(f"Limit: expected an integer from 1 to {MAX_LIST_LIMIT}, got {_json_text(limit)}")
    dry_run = body.get("DryRun", False)
    if not isinstance(dry_run, bool):
        raise InvalidParameter(f"DryRun: expected true or false, got {_json_text(dry_run)}")
    text = {field: body.get(field) for field in ("Status", "Trigger", "Since", "Until", "Cursor")}
    for field, value in text.items():
        if value is not None and not isinstance(value, str):
            raise InvalidParameter(f"{field}: expected a string, got {_json_text(value)}")
    pairs, cursor = await engine.replay_many(
        name,
        status=_parse_status("Status", text["Status"] or ""),
        trigger=_parse_trigger("Trigger", text["Trigger"] or ""),
        since=_parse_time("Since", text["Since"] or ""),
        until=_parse_time("Until", text["Until"] or ""),
        limit=limit,
        dry_run=dry_run,
        key=key,
        cursor=text["Cursor"] or None,
    )
    replayed = [{"ReplayOf": old, "RequestId": new} for old, new in pairs]
    return json_response({"DryRun": dry_run, "Replayed": replayed, "Cursor": cursor})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_LIST_PARAMETERS = ("function", "status", "trigger", "since", "until", "limit", "cursor", "results")


def taking_query(handler: Handler, parameters: Iterable[str] = ()) -> Handler:
    """`handler`, refusing (400 InvalidParameter) a query parameter it does not take, or one
    given twice: a typo (`?functon=`, `?follw=true`) would otherwise be passed over, and a list
    of every function's runs, or a plain log, answered as if it were what was asked."""
    takes = frozenset(parameters)

    async def checked(request: web.Request) -> web.StreamResponse:
        if request.query_string:
            _check_query(request.query, takes)
        return await handler(request)

    return checked


def _check_query(query: Mapping[str, str], takes: frozenset[str]) -> None:
    for name in query:  # (each name as often as it is given)
        if name not in takes:
            close = difflib.get_close_matches(name, takes, n=1)
            if close:
                hint = f"did you mean {close[0]!r}?"
            else:
                hint = f"this route takes {', '.join(sorted(takes))}" if takes else "this route takes none"
            raise InvalidParameter(f"unknown query parameter {name!r}: {hint}")
        given = len(query.getall(name))  # type: ignore[attr-defined]
        if given > 1:
            raise InvalidParameter(f"{name}: given {given} times; give it once")


async def list_invocations(request: web.Request) -> web.Response:
    """GET /invocations?function=&status=&trigger=&since=&until=&limit=&cursor=&results=."""
    engine = _engine(request)
    query = request.query
    function = query.get("function") or None  # (a name neither the manifest nor the store has is a 404: Engine.list)
    results = _parse_results(query.get("results", ""))
    invocations, cursor = await engine.list(
        function=function,
        status=_parse_status("status", query.get("status", "")),
        trigger=_parse_trigger("trigger", query.get("trigger", "")),
        since=_parse_time("since", query.get("since", "")),
        until=_parse_time("until", query.get("until", "")),
        limit=_parse_limit(query.get("limit", "")),
        cursor=query.get("cursor") or None,
        results=results,
    )
    items = [invocation_json(inv, result=results) for inv in invocations]
    return json_response({"Invocations": items, "NextCursor": cursor})


async def counts(request: web.Request) -> web.Response:
    """GET /counts: each function's runs by status."""
    return json_response({"Functions": await _engine(request).counts()})


async def get_event(request: web.Request) -> web.Response:
    """GET /invocations/{request_id}/event: the envelope the run was given."""
    body = await _engine(request).envelope(_request_id(request))
    return Answer(body=body, content_type="application/json")


TRIGGERS = ("http", "kafka", "s3", "timer")


def _parse_trigger(name: str, raw: str) -> str | None:
    if not raw:
        return None
    if raw not in TRIGGERS:
        raise InvalidParameter(f"{name}: expected one of {', '.join(TRIGGERS)}, got {raw!r}")
    return raw


def _parse_time(name: str, raw: str) -> int | None:
    """An RFC 3339 time (with a zone; Z for UTC) as Unix milliseconds."""
    if not raw:
        return None
    text = raw.strip().upper()  # (RFC 3339 allows a lower-case t and z)
    # A leap second (23:59:60Z), which RFC 3339 and is_rfc3339 allow and datetime refuses, is the
    # same instant as the next second's start (plus its fraction), as Unix time counts it.
    # (is_rfc3339 fixes where the second is: YYYY-MM-DDTHH:MM:SS.)
    leap = is_rfc3339(text) and text[17:19] == "60"
    try:
        when = datetime.fromisoformat(f"{text[:17]}59{text[19:]}" if leap else text)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise InvalidParameter(f"{name}: expected an RFC 3339 time with its zone, e.g. 2026-12-05T08:00:00Z, got {raw!r}")
    return max(0, int(when.timestamp() * 1000) + (1000 if leap else 0))  # (before 1970: from the start)


def _parse_status(name: str, raw: str) -> Status | None:
    if not raw:
        return None
    try:
        return Status(raw.strip().upper())
    except ValueError:
        allowed = ", ".join(s.value for s in Status)
        raise InvalidParameter(f"{name}: expected one of {allowed}, got {raw!r}") from None


def _parse_results(raw: str) -> bool:
    """results=true or false, in any case; true when absent."""
    if not raw:
        return True
    if raw.lower() not in ("true", "false"):
        raise InvalidParameter(f"results: expected true or false, got {raw!r}")
    return raw.lower() == "true"


def _parse_tail(raw: str) -> int | None:
    """tail=BYTES of a log follow (1 to 2**40), or None."""
    if not raw:
        return None
    if not _TAIL.fullmatch(raw) or not 1 <= int(raw) <= MAX_TAIL:
        raise InvalidParameter(f"tail: expected a number of bytes from 1 to {MAX_TAIL}, got {raw[:40]!r}")
    return int(raw)


def _parse_limit(raw: str) -> int:
    if not raw:
        return 50
    if not _LIMIT.fullmatch(raw) or not 1 <= int(raw) <= MAX_LIST_LIMIT:
        raise InvalidParameter(f"limit: expected an integer from 1 to {MAX_LIST_LIMIT}, got {raw!r}")
    return int(raw)


async def get_logs(request: web.Request) -> web.StreamResponse:
    """GET /invocations/{request_id}/logs, plain or (?follow=true) as Server-Sent Events."""
    engine = _engine(request)
    request_id = _request_id(request)
    follow = request.query.get("follow", "").strip().lower()
    if follow not in _TRUE + _FALSE:
        raise InvalidParameter(f"follow: expected true or false, got {follow!r}")
    tail = _parse_tail(request.query.get("tail", ""))
    if tail is not None and follow not in _TRUE:
        raise InvalidParameter("tail: only with follow=true (a plain read gives the whole log)")
    invocation = await engine.get(request_id)  # a 404 must be sent before a stream's headers are
    if follow in _TRUE:
        return await stream_logs(request, engine, invocation, request.app[_CLOSING_KEY], tail=tail)
    headers = {hdrs.CONTENT_TYPE: "text/plain; charset=utf-8"}
    file = await engine.log_file(request_id)
    if file is not None:
        try:
            return await _send_file(request, file, headers)
        except FileNotFoundError:  # deleted meanwhile (retention): as a log never written
            pass
    return await _send_pieces(request, engine.log_pieces(request_id), headers)


async def _send_file(request: web.Request, path: Path, headers: dict[str, str]) -> web.StreamResponse:
    """A file as it is now, a chunk at a time (reads of a local file, as its writes are)."""
    try:
        opened = open(path, "rb")
    except FileNotFoundError:
        raise
    except OSError as exc:  # (no descriptor left: EMFILE)
        raise unreadable_log(path, exc) from None
    with opened as file:
        left = os.fstat(file.fileno()).st_size
        response = web.StreamResponse(headers=headers)
        response.content_length = left
        await response.prepare(request)
        try:
            while left > 0 and (chunk := file.read(min(LOG_CHUNK, left))):
                left -= len(chunk)
                await response.write(chunk)
        except ConnectionResetError as exc:  # the client went away (`eventrun logs ID | head`)
            forgotten(exc)  # (its frames hold the chunk in a cycle: see responses.Answer)
            response.force_close()
            return response
    await response.write_eof()
    return response


async def _send_pieces(request: web.Request, pieces: AsyncIterator[bytes], headers: dict[str, str]) -> web.StreamResponse:
    """A log read a piece at a time (from a shared store), sent as it is read. The first piece
    is read before the answer starts, so a store that cannot serve gets its error answer."""
    first = await anext(pieces, b"")
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    try:
        if first:
            await response.write(first)
            async for piece in pieces:
                await response.write(piece)
    except ConnectionResetError as exc:  # the client went away
        forgotten(exc)  # (its frames hold the piece in a cycle: see responses.Answer)
        response.force_close()
        return response
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]
    await response.write_eof()
    return response


async def terminate(request: web.Request) -> web.Response:
    """POST /invocations/{request_id}/terminate."""
    engine = _engine(request)
    return json_response(await _invocation_answer(engine, await engine.terminate(_request_id(request))))


async def list_functions(request: web.Request) -> web.Response:
    """GET /functions."""
    functions = _engine(request).functions()
    return json_response({"Functions": [function_json(name, config) for name, config in functions.items()]})


async def get_function(request: web.Request) -> web.Response:
    """GET /functions/{name}."""
    name = request.match_info["name"]
    return json_response(function_json(name, _engine(request).function(name)))


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz."""
    return json_response(_engine(request).health())


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics in the Prometheus text format."""
    return web.Response(
        body=_engine(request).metrics_text().encode(),
        headers={hdrs.CONTENT_TYPE: "text/plain; version=0.0.4; charset=utf-8"},
    )


# What a server with a ui_token serves to anyone: liveness, the dashboard's files (they hold no
# data; the page asks for the token), and the MinIO webhook (it has a token of its own).
_OPEN_PATHS = ("/healthz", "/ui", "/ui/", "/triggers/s3")


_METRICS_PATH = "/metrics"


def token_middleware(ui_token: str, metrics_token: str = "") -> Any:
    """Ask for `Authorization: Bearer <token>` (the scheme in any case): the ui_token, if set,
    of every request but _OPEN_PATHS; the metrics_token, if set, opens GET /metrics as well."""
    expected = ui_token.encode()
    for_metrics = metrics_token.encode()

    @web.middleware
    async def ask_for_token(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = request.path
        metrics = path == _METRICS_PATH
        if path in _OPEN_PATHS or path.startswith("/ui/") or not (expected or (metrics and for_metrics)):
            return await handler(request)  # (no token asked for here)
        # surrogateescape: aiohttp keeps header bytes that are not UTF-8 as lone surrogates.
        scheme, _, given = request.headers.get(hdrs.AUTHORIZATION, "").strip().partition(" ")
        sent = given.strip().encode("utf-8", "surrogateescape") if scheme.lower() == "bearer" else b""
        if expected and sent and hmac.compare_digest(sent, expected):
            return await handler(request)
        if for_metrics and sent and hmac.compare_digest(sent, for_metrics):
            if metrics:
                return await handler(request)
            why = "the token sent is the metrics_token, which opens only GET /metrics"
        elif not sent:
            why = "no token was sent"
        else:
            why = "the token does not match"  # (never echoed: it may be a secret of another server)
        if metrics and for_metrics:
            asked = "its metrics_token or its ui_token" if expected else "its metrics_token"
            header = "metrics_token"
        else:
            asked, header = "its ui_token", "ui_token"
        return error_response(
            401,
            "Unauthorized",
            f"this server asks for {asked} and {why}: send the header Authorization: Bearer <{header}>",
            {hdrs.WWW_AUTHENTICATE: 'Bearer realm="eventrun"'},
        )

    return ask_for_token


async def _private(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer: no cache is to keep it (runs' results and logs are the users' data, and a
    run's state changes), and no browser is to read it as anything but its Content-Type says (a
    result or a log line holding HTML is not a page). The dashboard's files say how they are cached."""
    response.headers.setdefault(hdrs.CACHE_CONTROL, "no-store")
    response.headers.setdefault(hdrs.X_CONTENT_TYPE_OPTIONS, "nosniff")


def build_app(
    engine: Engine,
    *,
    extra_routes: Iterable[web.AbstractRouteDef] = (),
    openapi_paths: Mapping[str, Any] | None = None,
) -> web.Application:
    """The gateway application; extra_routes (e.g. POST /triggers/s3) get the same error handling."""
    server = engine.manifest.server
    middlewares = [error_middleware]
    if server.cors_origins:  # (a preflight carries no token, and is for no route: answered first)
        middlewares.append(preflight_middleware(server.cors_origins))
    if server.ui_token or server.metrics_token:
        middlewares.append(token_middleware(server.ui_token, server.metrics_token))
    if not server.ui_token:  # (the token is a header no other site can send: it keeps them out as well)
        middlewares.append(origin_middleware(engine.manifest.server))
    app = web.Application(middlewares=middlewares, client_max_size=engine.manifest.server.max_body_size)
    app[ENGINE_KEY] = engine
    app[_CLOSING_KEY] = asyncio.Event()
    document = dumps(openapi_document(openapi_paths))

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    async def on_shutdown(app: web.Application) -> None:
        # Log streams can last a whole run; end them so shutdown does not wait its full grace.
        app[_CLOSING_KEY].set()

    app.on_shutdown.append(on_shutdown)
    app.on_response_prepare.append(_private)
    if server.cors_origins:  # (a hook, so that answers prepared early, a log stream's, have the headers too)
        app.on_response_prepare.append(cors_headers(server.cors_origins))
    app.add_routes(
        [
            web.post("/functions/{name}/invocations", taking_query(invoke)),
            web.get("/functions", taking_query(list_functions)),
            web.get("/functions/{name}", taking_query(get_function)),
            web.get("/invocations", taking_query(list_invocations, _LIST_PARAMETERS)),
            web.get("/invocations/{request_id}", taking_query(get_invocation)),
            web.get("/invocations/{request_id}/logs", taking_query(get_logs, ("follow", "tail"))),
            web.get("/invocations/{request_id}/event", taking_query(get_event)),
            web.get("/counts", taking_query(counts)),
            web.post("/invocations/{request_id}/terminate", taking_query(terminate)),
            web.post("/invocations/{request_id}/replay", taking_query(replay)),
            web.post("/functions/{name}/replay", taking_query(replay_function)),
            # (Monitoring, the dashboard's files and the triggers' own routes take any query.)
            web.get("/healthz", healthz),
            web.get("/metrics", metrics),
            web.get("/openapi.json", openapi),
            *ui_routes(),
            *extra_routes,
        ]
    )
    return app
