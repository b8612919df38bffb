"""The HTTP API fuzzed from its own /openapi.json (schemathesis), and raw garbage at its edges.

Every answer must keep the API's promises: no 5xx, every 4xx in the one error shape, answers as
the document describes them, and a server still healthy afterwards. Runs are reproducible
(derandomize) and bounded: a few thousand requests in all.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import schemathesis
from server_process import ServerProcess
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.e2e

# When a test fails, hypothesis's pytest plugin imports its patch writer (libcst) in a report
# hook, where warnings are errors; libcst's import warns (mypy_extensions.TypedDict is
# deprecated), which turns the failure report into an INTERNALERROR. Imported here instead.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "mypy_extensions.TypedDict is deprecated", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

TOKEN = "fuzz-webhook-token"
REQUEST_TIMEOUT = 15.0  # the longest legitimate wait is a sync run of `echo`: its 2 s timeout + 5 s
EXAMPLES = 200  # generated cases per operation, besides schemathesis's own coverage cases
MIN_CALLS = 2000  # what the schema-driven run sends at least, so a quietly empty run cannot pass
GARBAGE_EXAMPLES = 1000

# Deliberately not checked: negative_data_rejection and positive_data_acceptance. The server
# treats an empty query value as absent and refuses cursors it did not give out, neither of
# which a schema can say; what it answers instead is checked here (a 4xx in the error shape).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]

# One server serves every case, so the function-scoped fixtures are meant; and schemathesis's
# generation of whole requests is slow by hypothesis's measure.
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Target:
    """The server under fuzzing, what it already holds, and what was sent to it."""

    server: ServerProcess
    session: requests.Session
    request_ids: list[str] = field(default_factory=list)
    calls: int = 0

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.get(self.server.url + path, timeout=REQUEST_TIMEOUT, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        self.calls += 1
        return self.session.post(self.server.url + path, timeout=REQUEST_TIMEOUT, **kwargs)


@contextlib.contextmanager
def _serve(eventrun_server: Any, handler: Any, *, min_calls: int) -> Iterator[Target]:
    server = eventrun_server(
        {
            "quick": {"handler": handler("quick"), "triggers": [{"type": "s3", "bucket": "fuzz"}]},
            # Sync, with a short timeout: a sync invocation waits for its run, at most 2 s + 5 s.
            "echo": {"handler": handler("sync_echo"), "async_execution": False, "timeout": "2s"},
            # Never invoked; see _aim.
            "idle": {"handler": handler("quick")},
        },
        extra={"s3": {"webhook_token": TOKEN}},
    )
    with requests.Session() as session:
        target = Target(server, session)
        yield target
        # After everything it was sent: still alive, still healthy, and nothing went unhandled.
        assert target.calls >= min_calls, f"only {target.calls} requests were sent"
        health = target.get("/healthz")
        assert health.status_code == 200 and health.json()["Status"] == "ok", health.text
        log = server.stderr_text()
        for sign in ("unexpected error", "unmapped error", "Traceback"):
            assert sign not in log, log


@pytest.fixture
def target(eventrun_server: Any, handler: Any) -> Iterator[Target]:
    """A server with two functions (async `quick`, sync `echo`) and runs of each, ended."""
    with _serve(eventrun_server, handler, min_calls=MIN_CALLS) as target:
        quick = target.post("/functions/quick/invocations", json={"n": 1})
        echo = target.post("/functions/echo/invocations", json={"n": 2})
        assert quick.status_code == 202 and echo.status_code == 200, (quick.text, echo.text)
        target.request_ids += [quick.json()["RequestId"], echo.json()["RequestId"]]
        ended = target.get(f"/invocations/{target.request_ids[0]}/logs", params={"follow": "true"})
        assert "event: end" in ended.text, ended.text  # so following it later answers at once
        yield target


@pytest.fixture
def api_schema(target: Target) -> schemathesis.BaseSchema:
    """The live server's own /openapi.json."""
    return schemathesis.openapi.from_url(target.server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def _aim(case: schemathesis.Case, data: st.DataObject, target: Target) -> None:
    """Now and then point a case at things that exist, so it gets past the 404 into the handler."""

    def maybe(generated: Any, known: list[str]) -> Any:
        return data.draw(st.sampled_from([generated, *known]))

    path, params = case.operation.path, case.path_parameters
    if "RequestId" in params:
        # Ended runs only: following the log of one that runs would wait for its end.
        params["RequestId"] = maybe(params["RequestId"], target.request_ids)
    if "name" in params:
        if path == "/functions/{name}/replay":
            # Replaying a function that has runs starts up to 1000 more each time; one with
            # none still takes the whole filter through parsing and the store's query.
            params["name"] = maybe(params["name"], ["idle"])
        elif path.startswith("/ui/"):
            params["name"] = maybe(params["name"], ["", "index.html", "app.js", "app.css"])
        else:
            params["name"] = maybe(params["name"], ["quick", "echo"])
    if path == "/invocations" and "function" in case.query:
        case.query["function"] = maybe(case.query["function"], ["quick", "echo"])
    if path == "/triggers/s3" and data.draw(st.booleans()):
        case.headers["Authorization"] = f"Bearer {TOKEN}"


def assert_error_shape(status: int, content_type: str, body: bytes) -> None:
    """A 4xx answer is {"Error": {"Code", "Message"}} as JSON, with no traceback."""
    assert 400 <= status < 500, status
    assert content_type.startswith("application/json"), content_type
    error = json.loads(body)
    assert isinstance(error, dict) and set(error) == {"Error"}, error
    assert set(error["Error"]) == {"Code", "Message"}, error
    assert isinstance(error["Error"]["Code"], str) and error["Error"]["Code"], error
    assert isinstance(error["Error"]["Message"], str) and error["Error"]["Message"], error
    assert b"Traceback" not in body, body


def error_shape(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """The schemathesis check for assert_error_shape (a HEAD answer has no body to check)."""
    if 400 <= response.status_code < 500 and case.method.upper() != "HEAD":
        assert_error_shape(response.status_code, response.headers.get("content-type", [""])[0], response.content)


@schema.parametrize()
@schema.given(data=st.data())
@FUZZ_SETTINGS
def test_every_operation_keeps_the_documented_contract(case: schemathesis.Case, data: st.DataObject, target: Target):
    _aim(case, data, target)
    target.calls += 1
    response = case.call(session=target.session, timeout=REQUEST_TIMEOUT)
    case.validate_response(response, checks=[*CHECKS, error_shape])


# -- garbage below the schema: raw bodies and header bytes no schema-driven client sends

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _or_junk(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return strategy | _JSON


def _deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def _record(extra: bytes) -> bytes:
    # A record of bucket "fuzz" that `quick` wants, with `extra` beside the object's key.
    obj = b'{"key": "k", "x": %b}' % extra
    return b'{"eventName": "s3:ObjectCreated:Put", "s3": {"bucket": {"name": "fuzz"}, "object": %b}}' % obj


# A bucket notification of bucket "fuzz" (which `quick` wants), its other parts right or wrong.
_RECORD = st.builds(
    lambda name, time, key, extra: {
        "eventName": name, "eventTime": time, "s3": {"bucket": {"name": "fuzz"}, "object": {"key": key, "x": extra}}
    },
    name=_or_junk(st.sampled_from(["s3:ObjectCreated:Put", "ObjectRemoved:Delete"])),
    time=_or_junk(st.sampled_from(["2026-12-05T08:00:00.000Z", "yesterday"])),
    key=_or_junk(st.sampled_from(["a.csv", "in%2Fsales+2024.csv", "%ZZ"]) | st.text(max_size=10)),
    extra=_JSON,
)
_NOTIFICATION = st.fixed_dictionaries(
    {"Records": st.lists(_or_junk(_RECORD), max_size=3)}, optional={"EventName": _JSON, "Key": _JSON}
)
_BODY = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(
        [b"", b"{", b"null", b'{"Records": null}', _deep(300), b'{"Records": [' + _deep(300) + b"]}"]
        + [b'{"Records": [%b]}' % _record(extra) for extra in (b"1", b"1e400", b'"\\ud800"', _deep(250), _deep(300))]
    ),
    _NOTIFICATION.map(lambda value: json.dumps(value).encode()),
    _JSON.map(lambda value: json.dumps(value).encode()),
)
# Header values as bytes on the wire (requests sends a str header as latin-1, and refuses one
# that starts with white space), so most are not UTF-8.
_HEADER = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40
).map(str.lstrip)


@pytest.fixture
def bare_target(eventrun_server: Any, handler: Any) -> Iterator[Target]:
    """A server like `target`'s, without runs."""
    with _serve(eventrun_server, handler, min_calls=GARBAGE_EXAMPLES) as target:
        yield target


_AUTHORIZATION = st.just(f"Bearer {TOKEN}") | st.sampled_from(["", "Bearer "]).flatmap(lambda s: _HEADER.map(s.__add__))


@given(body=_BODY, token=_AUTHORIZATION)
@settings(FUZZ_SETTINGS, max_examples=GARBAGE_EXAMPLES)
def test_garbage_at_the_webhook_is_a_4xx_in_the_error_shape(bare_target: Target, body: bytes, token: str):
    # Spelled out: schemathesis, once imported, blanks hypothesis's own "Falsifying example".
    note(f"POST /triggers/s3 Authorization={token!r} body={body!r}")
    answer = bare_target.post("/triggers/s3", data=body, headers={"Authorization": token})
    if answer.status_code != 200:
        assert_error_shape(answer.status_code, answer.headers.get("Content-Type", ""), answer.content)
    else:
        assert token == f"Bearer {TOKEN}", answer.text
        assert set(answer.json()) == {"Accepted"}, answer.text


@given(
    body=_BODY,
    content_type=_HEADER | st.sampled_from(["application/json", "application/x-www-form-urlencoded", "text/plain"]),
    idempotency_key=_HEADER,
    invocation_type=_HEADER | st.sampled_from(["Event", "RequestResponse"]),
)
@settings(FUZZ_SETTINGS, max_examples=GARBAGE_EXAMPLES)
def test_garbage_in_an_invocation_is_a_4xx_in_the_error_shape(
    bare_target: Target, body: bytes, content_type: str, idempotency_key: str, invocation_type: str
):
    headers = {"Content-Type": content_type, "Idempotency-Key": idempotency_key, "X-Invocation-Type": invocation_type}
    note(f"POST /functions/quick/invocations headers={headers!r} body={body!r}")
    answer = bare_target.post("/functions/quick/invocations", data=body, headers=headers)
    if answer.status_code != 202:
        assert_error_shape(answer.status_code, answer.headers.get("Content-Type", ""), answer.content)
