"""[server] cors_origins: a listed origin's pages call the API from a browser (CORS)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from eventrun.engine.api import Status
from eventrun.engine.errors import ManifestError, Throttled
from eventrun.engine.manifest import Manifest, ServerConfig, load_manifest
from eventrun.triggers.http import build_app

from test_http import FakeEngine, _error, _invocation

APP = "https://app.example.com"
TOKEN = "s3cret-token"
EXPOSED = "X-Request-Id, Retry-After, WWW-Authenticate"
PREFLIGHT = {"Origin": APP, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type,idempotency-key"}


def _serving(engine: FakeEngine, **server: Any) -> TestClient[web.Request, web.Application]:
    engine.manifest = Manifest(server=ServerConfig(**server), functions=engine.manifest.functions)
    return TestClient(TestServer(build_app(engine)))  # type: ignore[arg-type]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(params=["", TOKEN], ids=["no-token", "ui_token"])
async def listed(request: pytest.FixtureRequest, engine: FakeEngine) -> AsyncIterator[TestClient]:
    """A server that lists APP, with and without a ui_token."""
    async with _serving(engine, cors_origins=[APP, "http://localhost:5173"], ui_token=request.param) as client:
        client.token = request.param  # type: ignore[attr-defined]
        yield client


def _auth(client: TestClient) -> dict[str, str]:
    token = client.token  # type: ignore[attr-defined]
    return {"Authorization": f"Bearer {token}"} if token else {}


def _assert_allowed(response: aiohttp.ClientResponse, origin: str = APP) -> None:
    assert response.headers.get("Access-Control-Allow-Origin") == origin, dict(response.headers)
    assert response.headers.get("Vary") == "Origin", dict(response.headers)
    assert response.headers.get("Access-Control-Expose-Headers") == EXPOSED, dict(response.headers)
    assert "Access-Control-Allow-Credentials" not in response.headers, "no cookie is involved"


def _assert_no_cors(response: aiohttp.ClientResponse) -> None:
    found = [name for name in response.headers if name.lower().startswith("access-control-")]
    assert found == [], dict(response.headers)


# --- preflights ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/functions/resize/invocations", "/invocations/r1", "/no/such/route"])
async def test_a_listed_origin_s_preflight_is_answered_before_the_token_and_the_router(
    listed: TestClient, engine: FakeEngine, path: str
) -> None:
    # A preflight never carries Authorization: with a ui_token it was a 401, the page could not send.
    response = await listed.options(path, headers=PREFLIGHT)
    assert response.status == 204, await response.text()
    assert response.headers["Access-Control-Allow-Methods"] == "GET, HEAD, POST"
    assert response.headers["Access-Control-Allow-Headers"] == (
        "Authorization, Content-Type, Idempotency-Key, X-Invocation-Type"
    )
    assert response.headers["Access-Control-Max-Age"] == "600"
    _assert_allowed(response)
    assert await response.read() == b""
    assert engine.accepted == []


async def test_an_unlisted_origin_s_preflight_is_answered_as_before_without_cors_headers(listed: TestClient) -> None:
    response = await listed.options(
        "/functions/resize/invocations", headers={**PREFLIGHT, "Origin": "https://evil.example"}
    )
    token = listed.token  # type: ignore[attr-defined]
    assert response.status == (401 if token else 403)
    assert (await _error(response))["Code"] == ("Unauthorized" if token else "CrossSiteRequest")
    _assert_no_cors(response)
    assert response.headers["Vary"] == "Origin", "a cache must not give it a listed origin's answer"


async def test_an_options_request_that_is_no_preflight_is_not_answered_as_one(listed: TestClient) -> None:
    response = await listed.options("/functions/resize/invocations", headers={"Origin": APP, **_auth(listed)})
    assert response.status == 405
    _assert_allowed(response)


# --- actual requests -----------------------------------------------------------------------


async def test_a_listed_origin_s_post_and_get_carry_the_headers(listed: TestClient, engine: FakeEngine) -> None:
    headers = {"Origin": APP, "Idempotency-Key": "order-1", **_auth(listed)}
    posted = await listed.post("/functions/resize/invocations", json={"w": 1}, headers=headers)
    assert posted.status == 202, await posted.text()
    _assert_allowed(posted)
    request_id = posted.headers["X-Request-Id"]
    assert await posted.json() == {"RequestId": request_id}
    assert engine.accepted[0].id == "order-1"
    read = await listed.get(f"/invocations/{request_id}", headers={"Origin": APP, **_auth(listed)})
    assert read.status == 200 and (await read.json())["Status"] == "QUEUED"
    _assert_allowed(read)
    # The dashboard's own headers stay: no cache keeps an answer, nothing is sniffed.
    assert read.headers["Cache-Control"] == "no-store" and read.headers["X-Content-Type-Options"] == "nosniff"


async def test_a_listed_origin_is_matched_as_browsers_write_it(engine: FakeEngine) -> None:
    # The manifest's entry is normalised; a browser never writes the default port or capitals.
    async with _serving(engine, cors_origins=["HTTPS://App.Example.com:443"]) as client:
        response = await client.get("/functions", headers={"Origin": APP})
        assert response.status == 200
        _assert_allowed(response)


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/invocations/not-a-run", 404, "InvocationNotFound"),
    ("GET", "/no/such/route", 404, "NotFound"),
    ("POST", "/functions/resize/invocations?x=1", 400, "InvalidParameter"),
    ("GET", "/functions/resize/invocations", 405, "MethodNotAllowed"),
])
async def test_a_listed_origin_can_read_error_answers(
    listed: TestClient, method: str, path: str, status: int, code: str
) -> None:
    response = await listed.request(method, path, json={}, headers={"Origin": APP, **_auth(listed)})
    assert response.status == status
    assert (await _error(response))["Code"] == code
    _assert_allowed(response)


async def test_a_listed_origin_can_read_a_429_and_its_retry_after(listed: TestClient, engine: FakeEngine) -> None:
    engine.accept_error = Throttled("resize", 10, 1.5)
    response = await listed.post("/functions/resize/invocations", json={}, headers={"Origin": APP, **_auth(listed)})
    assert response.status == 429 and response.headers["Retry-After"] == "2"
    _assert_allowed(response)


async def test_with_a_ui_token_a_listed_origin_still_needs_it(engine: FakeEngine) -> None:
    async with _serving(engine, cors_origins=[APP], ui_token=TOKEN) as client:
        for auth in ({}, {"Authorization": "Bearer wrong"}):
            refused = await client.post("/functions/resize/invocations", json={}, headers={"Origin": APP, **auth})
            assert refused.status == 401
            _assert_allowed(refused)  # (the page can read why)
            assert refused.headers["WWW-Authenticate"] == 'Bearer realm="eventrun"'
    assert engine.accepted == []


async def test_a_listed_origin_s_log_stream_and_plain_log_carry_the_headers(
    listed: TestClient, engine: FakeEngine, tmp_path: Path
) -> None:
    engine.invocations["r1"] = _invocation("r1", Status.RUNNING)
    engine.log_lines = ["t1 before"]
    engine.log_gate = asyncio.Event()
    headers = {"Origin": APP, **_auth(listed)}
    stream = await listed.get("/invocations/r1/logs", params={"follow": "true"}, headers=headers)
    assert stream.headers["Content-Type"] == "text/event-stream"
    _assert_allowed(stream)  # (its headers went out before the first line)
    assert await stream.content.readuntil(b"\n\n") == b"data: t1 before\n\n"
    engine.log_gate.set()
    await stream.read()
    plain = await listed.get("/invocations/r1/logs", headers=headers)
    assert plain.status == 200 and await plain.text() == "t1 before\n"
    _assert_allowed(plain)
    engine.log_path = tmp_path / "r1.log"
    engine.log_path.write_text("from a file\n")
    from_file = await listed.get("/invocations/r1/logs", headers=headers)
    assert await from_file.text() == "from a file\n"
    _assert_allowed(from_file)


# --- unlisted origins and unchanged behaviour ----------------------------------------------


async def test_an_unlisted_origin_is_refused_as_before(listed: TestClient, engine: FakeEngine) -> None:
    headers = {"Origin": "https://evil.example", "Content-Type": "text/plain", **_auth(listed)}
    response = await listed.post("/functions/resize/invocations", data=b"{}", headers=headers)
    if listed.token:  # type: ignore[attr-defined]
        assert response.status == 202, "with the token, as before: the token is the guard"
    else:
        assert response.status == 403 and (await _error(response))["Code"] == "CrossSiteRequest"
        assert engine.accepted == []
    _assert_no_cors(response)


async def test_a_listed_origin_still_needs_a_host_of_this_machine(engine: FakeEngine) -> None:
    # DNS rebinding: a name pointed at 127.0.0.1 is refused whoever's page sent the request ...
    async with _serving(engine, cors_origins=[APP]) as client:
        rebound = await client.get("/functions", headers={"Origin": APP, "Host": "rebind.attacker.example"})
        assert rebound.status == 403 and (await _error(rebound))["Code"] == "CrossSiteRequest"
        _assert_allowed(rebound)  # (the page can read why)
    # ... and the API's own name is [server] url's.
    async with _serving(engine, cors_origins=[APP], url="https://eventrun.example.com") as client:
        named = await client.get("/functions", headers={"Origin": APP, "Host": "eventrun.example.com"})
        assert named.status == 200
        _assert_allowed(named)


async def test_without_cors_origins_no_answer_has_cors_headers(engine: FakeEngine) -> None:
    async with _serving(engine) as client:
        preflight = await client.options("/functions/resize/invocations", headers=PREFLIGHT)
        assert preflight.status == 403
        own = f"http://127.0.0.1:{client.server.port}"
        for headers in ({}, {"Origin": own}):
            response = await client.get("/functions", headers=headers)
            assert response.status == 200
            _assert_no_cors(response)
            assert "Vary" not in response.headers


async def test_the_dashboard_is_served_as_before(listed: TestClient) -> None:
    own = f"http://127.0.0.1:{listed.server.port}"
    page = await listed.get("/ui/")
    assert page.status == 200 and page.headers["Vary"] == "Origin"
    _assert_no_cors(page)
    mine = await listed.get("/functions", headers={"Origin": own, **_auth(listed)})
    assert mine.status == 200
    _assert_no_cors(mine)


# --- the manifest --------------------------------------------------------------------------


@pytest.fixture
def manifest_file(tmp_path: Path, no_eventrun_environment: None):
    """write(server_keys) -> the path of an eventrun.toml with those [server] keys and a function."""
    (tmp_path / "ok.py").write_text("def main_handler(event, context):\n    return 1\n")

    def write(server: str) -> Path:
        path = tmp_path / "eventrun.toml"
        path.write_text(f"[server]\n{server}\n[functions.f]\nhandler = \"ok.py:main_handler\"\n")
        return path

    return write


def test_cors_origins_are_normalised_as_browsers_write_them(manifest_file) -> None:
    path = manifest_file('cors_origins = ["HTTPS://App.Example.com:443", "http://localhost:5173", '
                         '"http://[0:0::1]:80", "https://bücher.example", "https://app.example.com"]')
    assert load_manifest(path).server.cors_origins == (
        APP, "http://localhost:5173", "http://[::1]", "https://xn--bcher-kva.example"
    )
    assert ServerConfig().cors_origins == ()


def test_an_ipv4_origin_is_written_as_browsers_send_it(manifest_file) -> None:
    # A browser sends http://127.1 as http://127.0.0.1: listed as written, it never matched.
    path = manifest_file('cors_origins = ["http://127.1:5173", "http://0x7f.0.0.1", "http://010.0.0.1."]')
    assert load_manifest(path).server.cors_origins == ("http://127.0.0.1:5173", "http://127.0.0.1", "http://8.0.0.1")
    with pytest.raises(ManifestError, match="'http://1.2.3.4.5': not an origin: its host is no IPv4 address a browser"):
        load_manifest(manifest_file('cors_origins = ["http://1.2.3.4.5"]'))


@pytest.mark.parametrize(("toml", "expected"), [
    ('["*"]', "'*' is refused: it would let every site the user visits call the API and read its answers; "
              'list the origins instead, e.g. ["https://app.example.com"]'),
    ('"https://app.example.com"', 'expected an array of origins, e.g. ["https://app.example.com"], got '
                                  "'https://app.example.com'"),
    ('["null"]', "'null' is refused: it is the origin of sandboxed frames and local files, which any site can "
                 'make; list the origins instead, e.g. ["https://app.example.com"]'),
    ('["https://app.example.com/"]', "'https://app.example.com/': an origin is scheme://host or scheme://host:port, "
                                     "nothing else (no path, not even a trailing '/', no query, no user)"),
    ('["https://app.example.com/api"]', "'https://app.example.com/api': an origin is scheme://host or "
                                        "scheme://host:port, nothing else"),
    ('["https://app.example.com?a=1"]', "'https://app.example.com?a=1': an origin is scheme://host"),
    ('["https://me@app.example.com"]', "'https://me@app.example.com': an origin is scheme://host"),
    ('["app.example.com"]', "'app.example.com': expected an http:// or https:// origin, such as 'https://app.example.com'"),
    ('["ftp://app.example.com"]', "'ftp://app.example.com': expected an http:// or https:// origin"),
    ('["https://"]', "'https://': not an origin: it names no host"),
    ('["https://app.example.com:0"]', "'https://app.example.com:0': not an origin: port 0"),
    ('["https://app.example.com:70000"]', "'https://app.example.com:70000': not an origin: "),
    ("[8080]", "expected an origin such as 'https://app.example.com', got 8080"),
], ids=["star", "string", "null", "slash", "path", "query", "userinfo", "no-scheme", "ftp", "no-host", "port-0",
        "port-range", "number"])
def test_anything_but_an_origin_is_refused_at_start(manifest_file, toml: str, expected: str) -> None:
    path = manifest_file(f"cors_origins = {toml}")
    with pytest.raises(ManifestError) as refused:
        load_manifest(path)
    assert str(refused.value).startswith(f"{path}: server.cors_origins: {expected}"), str(refused.value)


def test_cors_origins_from_the_environment_are_a_json_array(manifest_file, monkeypatch: pytest.MonkeyPatch) -> None:
    path = manifest_file("")
    monkeypatch.setenv("EVENTRUN_SERVER__CORS_ORIGINS", '["https://App.example.com", "http://127.0.0.1:9000"]')
    assert load_manifest(path).server.cors_origins == (APP, "http://127.0.0.1:9000")
    monkeypatch.setenv("EVENTRUN_SERVER__CORS_ORIGINS", '["*"]')
    with pytest.raises(ManifestError, match=r"^the environment: EVENTRUN_SERVER__CORS_ORIGINS: '\*' is refused"):
        load_manifest(path)
