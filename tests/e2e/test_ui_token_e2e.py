"""A server with [server] ui_token: the API and the dashboard's data ask for it, the CLI sends it."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
import pytest

from server_process import handler

pytestmark = pytest.mark.e2e

TOKEN = "s3cret-token"


async def cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "eventrun.cli", *args]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, cwd=cwd
    )


async def test_a_token_is_asked_for_everything_but_liveness_the_page_and_the_webhook(eventrun_server, http: aiohttp.ClientSession) -> None:
    server = eventrun_server({"quick": {"handler": handler("quick")}}, server={"ui_token": TOKEN})
    for method, path in [("GET", "/invocations"), ("GET", "/functions"), ("POST", "/functions/quick/invocations"),
                         ("GET", "/counts"), ("GET", "/metrics")]:
        for auth in (None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer{TOKEN}", f"Bearer {TOKEN}x", TOKEN):
            headers = {"Authorization": auth} if auth else {}
            async with http.request(method, server.url + path, headers=headers, json={}) as answer:
                assert answer.status == 401, (method, path, auth)
                assert answer.headers["WWW-Authenticate"].startswith("Bearer")
                body = await answer.json()
                assert body["Error"]["Code"] == "Unauthorized" and "ui_token" in body["Error"]["Message"]
    # The scheme is case-insensitive (RFC 9110), the token is not.
    for good in (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN} "):
        async with http.post(server.url + "/functions/quick/invocations", json={}, headers={"Authorization": good}) as answer:
            assert answer.status == 202, good
    async with http.get(server.url + "/counts", headers={"Authorization": f"Bearer {TOKEN.upper()}"}) as answer:
        assert answer.status == 401
    for path in ("/healthz", "/ui/"):
        async with http.get(server.url + path) as answer:
            assert answer.status == 200, path


async def test_the_cli_sends_the_token_of_the_manifest_or_of_the_flag(eventrun_server) -> None:
    server = eventrun_server({"quick": {"handler": handler("quick")}}, server={"ui_token": TOKEN})
    folder = str(server.manifest_path.parent)
    refused = await cli("functions", "--url", server.url, "--token", "wrong")
    assert (refused.returncode, refused.stderr) == (
        1,
        f"eventrun: Unauthorized: {server.url} refused the token sent: it is not the server's ui_token (HTTP 401)\n",
    )
    none = await cli("functions", "--url", server.url, cwd=str(server.tmp_path.parent))
    assert (none.returncode, none.stderr) == (
        1,
        f"eventrun: Unauthorized: {server.url} asks for its ui_token and none was sent: "
        "pass --token or set EVENTRUN_TOKEN (HTTP 401)\n",
    )
    by_flag = await cli("functions", "--url", server.url, "--token", TOKEN)
    assert by_flag.returncode == 0 and "quick" in by_flag.stdout, by_flag.stderr
    from_manifest = await cli("functions", "--config", str(server.manifest_path), cwd=folder)
    assert from_manifest.returncode == 0 and "quick" in from_manifest.stdout, from_manifest.stderr


@pytest.mark.parametrize(
    ("token", "why"),
    [("p\u00e4sswort", "holds a non-ASCII character"), ("abc ", "ends with whitespace"), ("a b", "holds a space")],
    ids=["latin-1", "trailing-space", "space"],
)
async def test_a_ui_token_no_client_could_send_is_refused_at_start(eventrun_server, token: str, why: str) -> None:
    # Each was once served: curl could send the first (as UTF-8), no browser or CLI could; the
    # second let nobody in (what is sent is stripped, the token was not).
    server = eventrun_server({"quick": {"handler": handler("quick")}}, server={"ui_token": token}, start=False)
    assert await asyncio.to_thread(server.run_to_exit) == 2
    assert "server.ui_token: expected printable ASCII only" in server.stderr_text(), server.log_text()
    assert f"this one {why}" in server.stderr_text() and token not in server.stderr_text()
