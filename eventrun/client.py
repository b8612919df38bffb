"""A small blocking client of the eventrun HTTP API, for the command line."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from eventrun.engine.text import printable

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_MANIFEST = "eventrun.toml"
STATUSES = ("QUEUED", "RUNNING", "FINISHED", "FAILED", "TIMED_OUT", "ABORTED")
TERMINAL = frozenset(STATUSES[2:])
# The most runs one page of GET /invocations, or one bulk replay, may hold (the server's
# MAX_LIST_LIMIT, in triggers/http/routes.py, which imports aiohttp: the client does not).
MAX_LIMIT = 1000
# The runs a page of GET /invocations holds when no limit is asked for (the server's default).
LIST_LIMIT = 50
# Seconds to connect to the server, and (unless a request says otherwise) to wait for its answer.
REQUEST_TIMEOUT = 30.0
POLL_FIRST, POLL_MAX = 0.2, 1.0
TERMINATE_WAIT = 30.0
# The server sends a keep-alive comment every 15 s, so this much silence means a dead link.
STREAM_IDLE_TIMEOUT = 120.0


class CliError(Exception):
    """An expected failure: one line on stderr and a non-zero exit status."""

    def __init__(self, message: str, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class NoAnswer(CliError):
    """The server was sent the request, but its answer did not come: the connection dropped or
    timed out. The request may have been acted on; `request_id` is the run's, if it was sent."""

    def __init__(self, message: str, reason: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.request_id = request_id


# --------------------------------------------------------------------------- HTTP client


class Client:
    """The gateway's HTTP API over urllib, with errors turned into one-line `CliError`s."""

    def __init__(self, base_url: str, token: str | None = None) -> None:
        self.base_url = base_url
        # The token was checked as sendable (engine.tokens) where it was read.
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._token = token

    def open(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = REQUEST_TIMEOUT,
    ) -> http.client.HTTPResponse:
        """Send one request and return the open 2xx response. `timeout`: seconds the answer may
        take to begin; None waits as long as the server works on it (connecting still gives up
        after REQUEST_TIMEOUT)."""
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        request = urllib.request.Request(url, data=body, method=method, headers={**self._auth, **(headers or {})})
        # With no timeout, the patient opener: its REQUEST_TIMEOUT bounds connecting only.
        opener = _PATIENT if timeout is None else _OPENER
        seconds = REQUEST_TIMEOUT if timeout is None else timeout
        try:
            response: http.client.HTTPResponse = opener.open(request, timeout=seconds)
            return response
        except urllib.error.HTTPError as exc:
            with exc:
                if 300 <= exc.code < 400:
                    raise CliError(self._redirected(exc, url)) from None
                challenge = (exc.headers.get("WWW-Authenticate") or "") if exc.headers else ""
                if exc.code == 401 and challenge.lower().startswith("bearer"):  # (the ui_token's, not a proxy's)
                    raise CliError(self._unauthorized()) from None
                raise CliError(_describe_http_error(exc)) from None
        except urllib.error.URLError as exc:  # urllib's wrapping of what failed while connecting or sending
            raise self.unreachable(exc) from None
        except (OSError, http.client.HTTPException) as exc:  # the request went out; its answer did not come
            raise self._no_answer(method, path, exc) from None

    def call(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = REQUEST_TIMEOUT,
    ) -> tuple[int, Any]:
        """Send one request and return the status and the decoded JSON answer."""
        response = self.open(method, path, query=query, body=body, headers=headers, timeout=timeout)
        with response:
            raw = self._read(method, path, response)
        try:
            return response.status, json.loads(raw) if raw else None
        except ValueError:
            message = f"{self.base_url} answered {method} {path} with something that is not JSON"
            raise CliError(message) from None

    def text(self, path: str) -> str:
        """GET a text/plain resource."""
        with self.open("GET", path) as response:
            return self._read("GET", path, response).decode("utf-8", errors="replace")

    def lines(self, path: str, query: dict[str, str]) -> Iterator[str]:
        """GET a streamed resource and yield its lines as they arrive, without line ends."""
        headers = {"Accept": "text/event-stream"}
        response = self.open("GET", path, query=query, headers=headers, timeout=STREAM_IDLE_TIMEOUT)
        with response:
            while True:
                try:
                    line = response.readline()
                except (OSError, http.client.HTTPException) as exc:
                    raise CliError(f"lost the connection to {self.base_url} ({describe_os_error(exc)})") from None
                if not line:
                    return
                yield line.decode("utf-8", errors="replace").rstrip("\r\n")

    def _read(self, method: str, path: str, response: http.client.HTTPResponse) -> bytes:
        """The body of an answer whose head has come; NoAnswer (with the X-Request-Id sent, if
        any) should the rest not come."""
        try:
            return response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._no_answer(method, path, exc, response.headers.get("X-Request-Id")) from None

    def _no_answer(self, method: str, path: str, exc: BaseException, request_id: str | None = None) -> NoAnswer:
        reason = describe_os_error(exc)
        message = f"{self.base_url} was sent {method} {path}, but its answer did not come ({reason})"
        return NoAnswer(message, reason, request_id)

    def _unauthorized(self) -> str:
        """The one line for a 401: the server asks for its ui_token, and was sent none or another."""
        if self._auth:
            return f"Unauthorized: {self.base_url} refused the token sent: it is not the server's ui_token (HTTP 401)"
        return (
            f"Unauthorized: {self.base_url} asks for its ui_token and none was sent: "
            "pass --token or set EVENTRUN_TOKEN (HTTP 401)"
        )

    def _redirected(self, exc: urllib.error.HTTPError, url: str) -> str:
        """The one line for a 3xx answer to `url`: its status, and where it pointed."""
        try:
            status = f"{exc.code} {http.HTTPStatus(exc.code).phrase}"
        except ValueError:  # (a code Python has no name for: the server's own words)
            status = f"{exc.code} {printable(str(exc.reason))}".rstrip()
        location = exc.headers.get("Location") if exc.headers else None
        if location:
            status += f", pointing to {self._shown_location(url, location)}"
        return (
            f"{self.base_url} answered {status}; eventrun does not follow redirects "
            "(they would carry the token elsewhere): give --url as the server's own address"
        )

    def _shown_location(self, url: str, location: str) -> str:
        """`location` resolved against `url`, on one line, with any user name, password, query or
        fragment shown as `...` (each may hold a secret), and never the token itself."""
        try:
            parts = urllib.parse.urlsplit(urllib.parse.urljoin(url, location.strip()))
        except ValueError:
            return "an address that is not a valid URL"
        netloc = f"...@{parts.netloc.rpartition('@')[2]}" if "@" in parts.netloc else parts.netloc
        shown = f"{parts.scheme}:" if parts.scheme else ""
        shown += f"//{netloc}{parts.path}" if netloc else parts.path
        shown += "?..." if parts.query else ""
        shown += "#..." if parts.fragment else ""
        if self._token:
            shown = shown.replace(self._token, "...")
        return printable(shown)

    def unreachable(self, exc: BaseException) -> CliError:
        """The one line for a server that cannot be reached."""
        cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return CliError(f"cannot reach {self.base_url} ({describe_os_error(cause)}); is `eventrun serve` running?")


class _Patient(http.client.HTTPConnection):
    """A connection whose timeout bounds connecting (and, over TLS, the handshake) only: then the
    answer may take as long as the server works on it (a sync run, or a queued one waiting its turn first)."""

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(None)


class _PatientHTTPS(_Patient, http.client.HTTPSConnection):
    """_Patient over TLS (its connect() is HTTPSConnection's, then the timeout is lifted)."""


class _PatientHandler(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """Opens http and https URLs over _Patient connections (in build_opener, in place of both defaults)."""

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_Patient, req)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_PatientHTTPS, req)  # (the default TLS context, as urlopen's)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Follows no redirect (in build_opener, in place of the default that follows them): the API
    never redirects, and a redirect followed would carry the request and its ui_token wherever it
    points. The 3xx then reaches Client.open as an HTTPError."""

    def http_error_302(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any) -> None:
        return None

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


_OPENER = urllib.request.build_opener(_NoRedirect)
_PATIENT = urllib.request.build_opener(_PatientHandler, _NoRedirect)


def describe_os_error(exc: object) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _describe_http_error(exc: urllib.error.HTTPError) -> str:
    """Render the server's `{"Error": {"Code", "Message"}}` answer as one line."""
    try:
        error = json.loads(exc.read())["Error"]
        text = f"{printable(str(error['Code']))}: {printable(str(error['Message']))} (HTTP {exc.code}"
    except (ValueError, KeyError, TypeError, OSError, http.client.HTTPException):
        return f"{exc.url} answered HTTP {exc.code} {exc.reason}".rstrip()
    retry_after = exc.headers.get("Retry-After") if exc.headers else None
    if retry_after:
        text += f", retry after {printable(retry_after)}s"
    return text + ")"


# --------------------------------------------------------------------------- finding the server


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, list[str]]]:
    """Server-Sent Events as (event name, data lines), one per blank-line-terminated block."""
    event, data = "message", list[str]()
    for line in lines:
        if not line:
            if data or event != "message":
                yield event, data
            event, data = "message", []
            continue
        if line.startswith(":"):  # a comment, used as keep-alive
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
    if event == "end":  # a stream cut right after its last field still counts as ended
        yield event, data


def describe_stream_error(data: list[str]) -> str:
    """The one line for an `error` event (the server's JSON error shape, sent in-band)."""
    try:
        error = json.loads("\n".join(data))["Error"]
        return f"the log stream failed: {printable(str(error['Code']))}: {printable(str(error['Message']))}"
    except (ValueError, KeyError, TypeError):
        return "the log stream failed: " + printable(" ".join(" ".join(data).split()))


def end_state(data: list[str] | None) -> dict[str, Any] | None:
    """The run's final state if the `end` event carries it (`{"RequestId", "Status"}`)."""
    try:
        value = json.loads("\n".join(data or []))
    except ValueError:
        return None
    return value if isinstance(value, dict) and value.get("Status") in TERMINAL else None
