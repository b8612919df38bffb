"""[server] cors_origins in a real headless Chromium: a page of another origin (a second local
HTTP server, on another port) calls a real `eventrun serve` with its ui_token."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, expect

from server_process import handler
from test_ui_e2e import browser  # noqa: F401  (the fixture: headless Chromium from the system package)

pytestmark = pytest.mark.e2e

TOKEN = "s3cret-token"
WAIT = 20_000  # ms

# The page invokes with an Idempotency-Key, reads X-Request-Id and the JSON answer, then polls
# the run until it ends; it writes what it found into #out and sets its title to "done".
PAGE = """<!doctype html>
<html><head><title>working</title></head><body><pre id="out"></pre>
<script>
const API = %(api)s, TOKEN = %(token)s;
const auth = {"Authorization": "Bearer " + TOKEN};
(async () => {
  const found = {};
  try {
    const posted = await fetch(API + "/functions/quick/invocations", {
      method: "POST",
      headers: {...auth, "Content-Type": "application/json", "Idempotency-Key": "page-order-1"},
      body: JSON.stringify({from: "the page"}),
    });
    found.status = posted.status;
    found.requestId = posted.headers.get("X-Request-Id");
    found.answer = await posted.json();
    for (let i = 0; i < 100; i++) {
      const read = await fetch(API + "/invocations/" + found.requestId, {headers: auth});
      found.run = await read.json();
      if (["FINISHED", "FAILED", "TIMED_OUT", "ABORTED"].includes(found.run.Status)) break;
      await new Promise(resolve => setTimeout(resolve, 100));
    }
  } catch (error) {
    found.error = error.name + ": " + error.message;
  }
  document.getElementById("out").textContent = JSON.stringify(found);
  document.title = "done";
})();
</script></body></html>
"""


@pytest.fixture
async def page_site() -> AsyncIterator[Any]:
    """A second local HTTP server (another origin: another port) serving PAGE for an API URL:
    page_site.url(api) is the page's address, page_site.origin its origin."""
    async def page(request: web.Request) -> web.Response:
        text = PAGE % {"api": json.dumps(request.query["api"]), "token": json.dumps(TOKEN)}
        return web.Response(text=text, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    async with TestServer(app, host="127.0.0.1") as server:
        server.origin = f"http://127.0.0.1:{server.port}"  # type: ignore[attr-defined]
        server.page_url = lambda api: f"{server.origin}/?api={api}"  # type: ignore[attr-defined]
        yield server


async def _run_page(browser: Browser, url: str) -> dict[str, Any]:  # noqa: F811  (the fixture's name)
    """Open the page, wait for it to finish, and return what it wrote."""
    context = await browser.new_context()
    try:
        page = await context.new_page()
        await page.goto(url)
        await expect(page).to_have_title("done", timeout=WAIT)
        return json.loads(await page.locator("#out").text_content() or "{}")
    finally:
        await context.close()


async def test_a_listed_page_invokes_and_reads_its_run_and_an_unlisted_one_cannot(
    eventrun_server, page_site, http, browser: Browser  # noqa: F811
) -> None:
    functions = {"quick": {"handler": handler("quick")}}
    listing = eventrun_server(functions, server={"ui_token": TOKEN, "cors_origins": [page_site.origin]})
    found = await _run_page(browser, page_site.page_url(listing.url))
    assert "error" not in found, found
    assert found["status"] == 202, found
    request_id = found["requestId"]
    assert request_id and found["answer"] == {"RequestId": request_id}, "X-Request-Id was readable, and the JSON"
    assert found["run"]["Status"] == "FINISHED" and found["run"]["RequestId"] == request_id, found
    assert found["run"]["Result"]["data"] == {"from": "the page"}, found

    # The same page against a server that lists another origin: the browser lets it send nothing.
    other = eventrun_server(functions, server={"ui_token": TOKEN, "cors_origins": ["https://app.example.com"]})
    refused = await _run_page(browser, page_site.page_url(other.url))
    assert refused.get("error", "").startswith("TypeError: Failed to fetch"), refused
    assert "status" not in refused, refused
    listed = await other.client(http).request("GET", "/invocations", headers={"Authorization": f"Bearer {TOKEN}"})
    assert listed.status == 200 and listed.json["Invocations"] == [], "its preflight failed: no POST was sent"
