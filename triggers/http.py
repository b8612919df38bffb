"""The HTTP gateway: the invocation API over aiohttp, one error table, SSE log streaming."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import hdrs, web

from eventrun.engine.api import Invocation, Status
from eventrun.engine.envelope import Envelope, JSONDecodeError, dumps, loads, new_id
from eventrun.engine.errors import (
    EventrunError, FunctionNotFound, InvalidParameter, InvocationEnded, InvocationNotFound, ShuttingDown, StoreError,
    Throttled,
)
from eventrun.engine.manifest import FunctionConfig

from .openapi import openapi_document

if TYPE_CHECKING:
    from eventrun.engine.core import Engine

logger = logging.getLogger(__name__)

ENGINE_KEY: web.AppKey[Engine] = web.AppKey("engine")
"""Where the engine lives in the app, for routes registered from other modules."""

_CLOSING_KEY: web.AppKey[asyncio.Event] = web.AppKey("closing")

# The one place HTTP status codes are chosen for engine errors (looked up along the MRO).
ERROR_STATUS: dict[type[EventrunError], int] = {
    InvalidParameter: 400,
    FunctionNotFound: 404,
    InvocationNotFound: 404,
    InvocationEnded: 409,
    Throttled: 429,
    ShuttingDown: 503,
    StoreError: 503,
}

SSE_KEEPALIVE = 15.0
"""Seconds of silence after which a log stream sends a comment line, so proxies keep it open."""

MAX_IDEMPOTENCY_KEY = 256
MAX_LIST_LIMIT = 1000
_LIMIT = re.compile(r"^\d{1,4}$")
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no", "")
_JSON_TYPE = re.compile(r"^application/([\w.+-]+\+)?json$")
# curl -d sends JSON with this type unless told otherwise; accept the body if it parses.
_MAYBE_JSON_TYPES = ("", "application/x-www-form-urlencoded")


def to_envelope(function: str, body: bytes, content_type: str | None, idempotency_key: str | None) -> Envelope:
    """The envelope for one HTTP invocation; raises InvalidParameter for a malformed JSON body."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    data: Any = None
    if _JSON_TYPE.match(media_type):
        if body.strip():
            try:
                data = loads(body)
            except JSONDecodeError as exc:
                raise InvalidParameter(f"request body is not valid JSON: {exc}") from None
    elif body:
        data = _parse_or_wrap(body, media_type, content_type)
    key = (idempotency_key or "").strip()
    if len(key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidParameter(f"Idempotency-Key header: at most {MAX_IDEMPOTENCY_KEY} characters, got {len(key)}")
    return Envelope(
        id=key or new_id(), source=f"/http/{function}", type="eventrun.http.request",
        function=function, trigger="http", data=data,
    )


def _parse_or_wrap(body: bytes, media_type: str, content_type: str | None) -> Any:
    if media_type in _MAYBE_JSON_TYPES:
        try:
            return loads(body)
        except JSONDecodeError:
            pass
    return {"body_base64": base64.b64encode(body).decode("ascii"), "content_type": content_type}


def json_response(value: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON answer encoded with eventrun's one JSON encoder."""
    return web.Response(body=dumps(value), status=status, content_type="application/json", headers=headers)


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """The one error shape: {"Error": {"Code", "Message"}}."""
    return json_response({"Error": {"Code": code, "Message": message}}, status=status, headers=headers)


def invocation_json(invocation: Invocation) -> dict[str, Any]:
    """An invocation in the API's PascalCase shape."""
    return {
        "RequestId": invocation.request_id,
        "FunctionName": invocation.function,
        "Trigger": invocation.trigger,
        "Status": invocation.status.value,
        "CreatedAt": invocation.created_at,
        "StartedAt": invocation.started_at,
        "EndedAt": invocation.ended_at,
        "DurationMs": invocation.duration_ms,
        "Result": invocation.result,
        "ErrorType": invocation.error_type,
        "ErrorMessage": invocation.error_message,
    }


def function_json(name: str, config: FunctionConfig) -> dict[str, Any]:
    """A registry entry in the API's PascalCase shape (environment and callback stay private)."""
    triggers = []
    for trigger in config.triggers:
        # A timer's payload can be large and is the event data, not the trigger's shape.
        fields = trigger.model_dump(mode="json", exclude={"payload"})
        triggers.append({_pascal(key): value for key, value in fields.items()})
    return {
        "FunctionName": name,
        "AsyncExecution": config.async_execution,
        "Timeout": config.timeout,
        "Concurrency": config.concurrency,
        "QpsLimit": config.qps_limit,
        "Handler": config.handler,
        "Triggers": triggers,
    }


def _pascal(snake: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in snake.split("_"))


def _map_error(exc: EventrunError) -> web.Response | None:
    status = next((ERROR_STATUS[cls] for cls in type(exc).__mro__ if cls in ERROR_STATUS), None)
    if status is None:
        return None
    headers: dict[str, str] = {}
    if isinstance(exc, Throttled):
        headers[hdrs.RETRY_AFTER] = str(max(1, math.ceil(exc.retry_after)))
    return error_response(status, exc.code, str(exc), headers)


def _map_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    headers = {str(k): v for k, v in exc.headers.items() if k not in (hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH)}
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[ENGINE_KEY].manifest.server.max_body_size
        return error_response(413, "PayloadTooLarge", f"request body exceeds the limit of {limit} bytes", headers)
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
        response = _map_error(exc)
        if response is not None:
            return response
        logger.exception("unmapped error on %s %s", request.method, request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _map_http_exception(request, exc)
    except Exception:
        logger.exception("unexpected error on %s %s", request.method, request.path)
    return error_response(500, "InternalError", "internal error; see the server log")


def _engine(request: web.Request) -> Engine:
    return request.app[ENGINE_KEY]


async def _read_body(request: web.Request) -> bytes:
    limit = _engine(request).manifest.server.max_body_size
    # Refuse by the declared length first, so a huge upload is not read at all.
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    return await request.read()


async def invoke(request: web.Request) -> web.Response:
    """POST /functions/{name}/invocations."""
    engine = _engine(request)
    name = request.match_info["name"]
    config = engine.function(name)
    if engine.shutting_down:
        raise ShuttingDown()
    mode = request.headers.get("X-Invocation-Type", "").strip().lower()
    if mode not in ("", "event", "requestresponse"):
        raise InvalidParameter(f"X-Invocation-Type header: expected 'Event' or 'RequestResponse', got {mode!r}")
    body = await _read_body(request)
    envelope = to_envelope(name, body, request.headers.get(hdrs.CONTENT_TYPE), request.headers.get("Idempotency-Key"))
    accepted = await engine.accept(envelope)
    headers = {"X-Request-Id": accepted.request_id}
    if config.async_execution or mode == "event":
        return json_response({"RequestId": accepted.request_id}, status=202, headers=headers)
    # The engine ends a sync run at its timeout; the margin covers the kill and the final write.
    invocation = await engine.wait(accepted.request_id, timeout=config.timeout + 5)
    answer: dict[str, Any] = {
        "RequestId": invocation.request_id, "Status": invocation.status.value, "Result": invocation.result
    }
    if invocation.status is not Status.FINISHED:
        answer.update(ErrorType=invocation.error_type, ErrorMessage=invocation.error_message)
    return json_response(answer, headers=headers)


async def get_invocation(request: web.Request) -> web.Response:
    """GET /invocations/{request_id}."""
    return json_response(invocation_json(_engine(request).get(request.match_info["request_id"])))


async def list_invocations(request: web.Request) -> web.Response:
    """GET /invocations?function=&status=&limit=&cursor=."""
    engine = _engine(request)
    query = request.query
    function = query.get("function") or None
    if function is not None:
        engine.function(function)  # an unknown name is a 404, not an empty list
    status = _parse_status(query.get("status", ""))
    limit = _parse_limit(query.get("limit", ""))
    invocations, cursor = engine.list(function=function, status=status, limit=limit, cursor=query.get("cursor") or None)
    return json_response({"Invocations": [invocation_json(inv) for inv in invocations], "NextCursor": cursor})


def _parse_status(raw: str) -> Status | None:
    if not raw:
        return None
    try:
        return Status(raw.strip().upper())
    except ValueError:
        allowed = ", ".join(s.value for s in Status)
        raise InvalidParameter(f"status: expected one of {allowed}, got {raw!r}") from None


def _parse_limit(raw: str) -> int:
    if not raw:
        return 50
    if not _LIMIT.match(raw) or not 1 <= int(raw) <= MAX_LIST_LIMIT:
        raise InvalidParameter(f"limit: expected an integer from 1 to {MAX_LIST_LIMIT}, got {raw!r}")
    return int(raw)


async def get_logs(request: web.Request) -> web.StreamResponse:
    """GET /invocations/{request_id}/logs, plain or (?follow=true) as Server-Sent Events."""
    engine = _engine(request)
    request_id = request.match_info["request_id"]
    follow = request.query.get("follow", "").strip().lower()
    if follow not in _TRUE + _FALSE:
        raise InvalidParameter(f"follow: expected true or false, got {follow!r}")
    engine.get(request_id)  # a 404 must be sent before a stream's headers are
    if follow in _TRUE:
        return await _stream_logs(request, engine, request_id)
    return web.Response(body=engine.read_log(request_id), headers={hdrs.CONTENT_TYPE: "text/plain; charset=utf-8"})


async def _stream_logs(request: web.Request, engine: Engine, request_id: str) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            hdrs.CONTENT_TYPE: "text/event-stream",
            hdrs.CACHE_CONTROL: "no-cache",
            "X-Accel-Buffering": "no",  # nginx would otherwise hold events back
        }
    )
    await response.prepare(request)
    lines = engine.follow_log(request_id)
    closing = asyncio.ensure_future(request.app[_CLOSING_KEY].wait())
    try:
        ended = await _pump(response, lines, closing)
        if ended:
            status = engine.get(request_id).status.value
            end = dumps({"RequestId": request_id, "Status": status}).decode()
            await response.write(f"event: end\ndata: {end}\n\n".encode())
        await response.write_eof()
    except ConnectionResetError:
        logger.debug("log follower of %s went away", request_id)
    except Exception:
        # Headers are out, so the middleware cannot answer any more; tell the client in-band.
        logger.exception("log stream of %s failed", request_id)
        error = dumps({"Error": {"Code": "InternalError", "Message": "internal error; see the server log"}})
        with contextlib.suppress(ConnectionResetError):
            await response.write(b"event: error\ndata: " + error + b"\n\n")
    finally:
        closing.cancel()
        aclose = getattr(lines, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:
                logger.exception("closing the log iterator of %s failed", request_id)
    return response


async def _pump(response: web.StreamResponse, lines: AsyncIterator[str], closing: asyncio.Future[Any]) -> bool:
    """Copy log lines to the stream; True once they ran out, False when the server is closing."""
    iterator = aiter(lines)
    pending: asyncio.Future[str] | None = None
    try:
        while True:
            # Waiting on a task rather than wait_for(anext()) keeps a keepalive from
            # cancelling (and so finalising) the log iterator.
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({pending, closing}, timeout=SSE_KEEPALIVE, return_when=asyncio.FIRST_COMPLETED)
            if pending in done:
                try:
                    line = pending.result()
                except StopAsyncIteration:
                    pending = None
                    return True
                pending = None
                # A field may not hold a newline; SSE joins consecutive data fields with one.
                fields = "".join(f"data: {part}\n" for part in line.split("\n"))
                await response.write(f"{fields}\n".encode())
            elif closing in done:
                return False
            else:
                await response.write(b": keepalive\n\n")
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending


async def terminate(request: web.Request) -> web.Response:
    """POST /invocations/{request_id}/terminate."""
    invocation = await _engine(request).terminate(request.match_info["request_id"])
    return json_response(invocation_json(invocation))


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


def build_app(
    engine: Engine,
    *,
    extra_routes: Iterable[web.AbstractRouteDef] = (),
    openapi_paths: Mapping[str, Any] | None = None,
) -> web.Application:
    """The gateway application; extra_routes (e.g. POST /triggers/s3) get the same error handling."""
    app = web.Application(middlewares=[error_middleware], client_max_size=engine.manifest.server.max_body_size)
    app[ENGINE_KEY] = engine
    app[_CLOSING_KEY] = asyncio.Event()
    document = dumps(openapi_document(openapi_paths))

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    async def on_shutdown(app: web.Application) -> None:
        # Log streams can last a whole run; end them so shutdown does not wait its full grace.
        app[_CLOSING_KEY].set()

    app.on_shutdown.append(on_shutdown)
    app.add_routes(
        [
            web.post("/functions/{name}/invocations", invoke),
            web.get("/functions", list_functions),
            web.get("/functions/{name}", get_function),
            web.get("/invocations", list_invocations),
            web.get("/invocations/{request_id}", get_invocation),
            web.get("/invocations/{request_id}/logs", get_logs),
            web.post("/invocations/{request_id}/terminate", terminate),
            web.get("/healthz", healthz),
            web.get("/metrics", metrics),
            web.get("/openapi.json", openapi),
            *extra_routes,
        ]
    )
    return app


class HttpTrigger:
    """The gateway as a trigger: serves build_app(engine) on host:port until stopped."""

    def __init__(
        self,
        engine: Engine,
        host: str | None = None,
        port: int | None = None,
        *,
        extra_routes: Iterable[web.AbstractRouteDef] = (),
        openapi_paths: Mapping[str, Any] | None = None,
    ) -> None:
        self._engine = engine
        self._host = host if host is not None else engine.manifest.server.host
        self._port = port if port is not None else engine.manifest.server.port
        self._extra_routes = list(extra_routes)
        self._openapi_paths = openapi_paths
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the configured one before)."""
        return self._port

    async def start(self) -> None:
        """Bind and serve; a port of 0 picks a free one."""
        if self._runner is not None:
            return
        app = build_app(self._engine, extra_routes=self._extra_routes, openapi_paths=self._openapi_paths)
        # No per-request access log: it costs more than accepting the event; /metrics counts instead.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self._engine.manifest.server.shutdown_grace)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = runner.addresses[0][1]
        logger.info("HTTP gateway listening on %s:%s", self._host, self._port)

    def state(self) -> dict[str, Any]:
        """What /healthz may report about the gateway."""
        return {"Listening": self._runner is not None, "Port": self._port}

    async def stop(self) -> None:
        """Stop listening, end log streams, and let in-flight requests finish within the grace."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            logger.info("HTTP gateway stopped")

    async def __aenter__(self) -> HttpTrigger:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
