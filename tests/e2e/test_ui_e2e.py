"""The dashboard at /ui/ in a real headless Chromium: live tables, a followed log, terminate,
filters and paging, a server's ui_token, and untrusted text shown as text.

Screenshots go to $EVENTRUN_TEST_ARTIFACTS (default test-artifacts/); with
EVENTRUN_UPDATE_SCREENSHOTS=1 the overview also rewrites the README's docs/dashboard.png."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # the browser fixture says what is missing
    async_playwright = None

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; CI installs it (.ci/run)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
REPO = Path(__file__).resolve().parents[2]
UI = REPO / "triggers" / "http" / "ui"
VIEWPORT = {"width": 1280, "height": 860}
WAIT = 10_000  # ms: the page polls every 1-2 s, so anything it should show is there well before

XSS_SCRIPT = "<script>window.__pwned = 1</script>"
XSS_IMG = '<img src=x onerror="window.__pwned=1">'

# A handler written next to the manifest: prints data["line"], fails with data["fail"] if
# given, else returns the data, so a test controls the log line, the error and the result.
ECHO_HANDLER = '''
def main_handler(event, context):
    data = event.get("data") or {}
    print(data.get("line", ""), flush=True)
    if data.get("fail"):
        raise ValueError(data["fail"])
    return data
'''


def _missing(reason: str) -> NoReturn:
    # CI sets EVENTRUN_REQUIRE_SERVICES=1: there a missing browser fails the run instead of
    # quietly skipping the dashboard's tests.
    if os.environ.get("EVENTRUN_REQUIRE_SERVICES") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def artifacts() -> Path:
    """Where screenshots go: $EVENTRUN_TEST_ARTIFACTS, else test-artifacts/ at the repo root."""
    folder = Path(os.environ.get("EVENTRUN_TEST_ARTIFACTS") or REPO / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium from the system package (no browser download)."""
    if async_playwright is None:
        _missing("the playwright package is not installed (pip install -e '.[test]')")
    if not CHROMIUM.is_file():
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


class Dashboard:
    """One browser page on the dashboard, and what the page reported while it ran."""

    def __init__(self, page: Page, url: str) -> None:
        self.page = page
        self.url = url
        self.errors: list[str] = []  # uncaught exceptions and CSP refusals: the page is broken
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on("console", self._console)

    def _console(self, message: Any) -> None:
        if "Content Security Policy" in message.text:
            self.errors.append(f"CSP: {message.text}")

    async def open(self, fragment: str = "#/", *, ready: bool = True) -> Page:
        """Load the page and (ready) wait for its first look at the server."""
        await self.page.goto(f"{self.url}/ui/{fragment}")
        if ready and fragment == "#/":
            await expect(self.page.locator('[data-testid="functions-table"] tbody tr[data-function]').first).to_be_visible()
        return self.page

    def testid(self, name: str) -> Any:
        """The element with this data-testid."""
        return self.page.get_by_test_id(name)

    def row(self, request_id: str) -> Any:
        """A run's row in the runs table."""
        return self.page.locator(f'[data-testid="runs-table"] tr[data-request-id="{request_id}"]')

    def row_status(self, request_id: str) -> Any:
        """The status badge of a run's row."""
        return self.row(request_id).get_by_test_id("run-row-status")

    def function_row(self, name: str) -> Any:
        """A function's row in the functions table."""
        return self.page.locator(f'[data-testid="functions-table"] tr[data-function="{name}"]')

    async def shown_ids(self) -> list[str]:
        """The RequestIds of the runs table, top to bottom."""
        return await self.page.locator('[data-testid="runs-table"] tbody tr').evaluate_all(
            "rows => rows.map(row => row.dataset.requestId)"
        )

    async def invoke(self, function: str, body: str) -> str:
        """Invoke from the form; the RequestId the page shows."""
        await self.testid("invoke-function").select_option(function)
        await self.testid("invoke-body").fill(body)
        await self.testid("invoke-submit").click()
        link = self.testid("invoke-request-id")
        await expect(link).to_be_visible(timeout=WAIT)
        return (await link.text_content()) or ""

    async def screenshot(self, name: str) -> Path:
        """A full-page screenshot in the artifacts folder."""
        path = artifacts() / name
        await self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
async def dashboard(browser: Browser) -> AsyncIterator[Callable[..., Any]]:
    """Factory: dashboard(server, bypass_csp=False) -> a Dashboard on that server's /ui/."""
    contexts = []
    pages: list[Dashboard] = []

    async def make(server: Any, *, bypass_csp: bool = False) -> Dashboard:
        context = await browser.new_context(viewport=VIEWPORT, timezone_id="UTC", bypass_csp=bypass_csp)
        contexts.append(context)
        page = Dashboard(await context.new_page(), server.url)
        pages.append(page)
        return page

    yield make
    for context in contexts:
        await context.close()
    problems = [error for page in pages for error in page.errors]
    assert not problems, "the page reported problems:\n" + "\n".join(problems)


def echo_handler(tmp_path: Path) -> str:
    """The manifest handler value of ECHO_HANDLER, written into the test's folder."""
    path = tmp_path / "echo.py"
    path.write_text(ECHO_HANDLER)
    return f"{path}:main_handler"


async def statuses_seen(page: Page, request_id: str) -> list[str]:
    """The statuses a run's row has shown since watch_row(), in order."""
    return await page.evaluate("id => window.__seen[id] || []", request_id)


async def watch_row(page: Page, request_id: str) -> None:
    """Record every status the run's row shows from now on, however briefly."""
    await page.evaluate(
        """id => {
            window.__seen = window.__seen || {};
            const seen = (window.__seen[id] = []);
            const record = () => {
                const row = document.querySelector(`tr[data-request-id="${CSS.escape(id)}"]`);
                const status = row && row.querySelector('[data-testid="run-row-status"]').textContent;
                if (status && seen[seen.length - 1] !== status) seen.push(status);
            };
            const body = document.querySelector('[data-testid="runs-table"] tbody');
            new MutationObserver(record).observe(body, { subtree: true, childList: true, characterData: true });
            record();
        }""",
        request_id,
    )


# --------------------------------------------------------------------------- tests


async def test_overview_lists_functions_counts_and_trigger_health(eventrun_server, http, handler, dashboard):
    server = eventrun_server(
        {
            "thumbnail": {"handler": handler("sleepy"), "concurrency": 1, "timeout": "2h"},
            "nightly-report": {
                "handler": handler("quick"),
                "triggers": [{"type": "timer", "name": "every-2s", "cron": "*/2 * * * * * *", "payload": {"kind": "nightly"}}],
            },
            "checkout": {"handler": handler("sync_echo"), "async_execution": False, "timeout": "30s"},
            "import-csv": {"handler": handler("boom"), "timeout": "90s"},
            "transcode": {"handler": handler("sleepy"), "timeout": "1s"},
        }
    )
    api = server.client(http)
    running = await api.accepted("thumbnail", {"seconds": 20})
    queued = await api.accepted("thumbnail", {"seconds": 20})
    aborted = await api.accepted("thumbnail", {"seconds": 20})
    assert (await api.terminate(aborted)).status == 200
    await api.accepted("import-csv", {"file": "orders.csv"})
    await api.accepted("transcode", {"seconds": 5, "quiet": True})
    assert (await api.invoke("checkout", {"cart": 42})).status == 200
    await api.wait_for(running, {"RUNNING"}, timeout=10)
    health = (await api.request("GET", "/healthz")).json

    ui = await dashboard(server)
    page = await ui.open()
    await expect(ui.testid("node")).to_have_text(health["Node"])
    table = ui.testid("functions-table")
    for name in ("thumbnail", "nightly-report", "checkout", "import-csv", "transcode"):
        await expect(ui.function_row(name)).to_be_visible()
    cells = ui.function_row("thumbnail").locator("td")
    await expect(cells.nth(0)).to_have_text("thumbnail")
    await expect(cells.nth(1)).to_have_text("async")
    await expect(cells.nth(2)).to_have_text("2h")
    await expect(cells.nth(3)).to_have_text("1")
    await expect(ui.function_row("checkout").locator("td").nth(1)).to_have_text("sync")
    await expect(ui.function_row("checkout").locator("td").nth(2)).to_have_text("30s")
    await expect(ui.function_row("import-csv").locator("td").nth(2)).to_have_text("1m 30s")
    await expect(ui.function_row("nightly-report").locator(".tag")).to_have_text(["http", "timer"])

    # Counts by status, from /counts, updated by the page's own refresh.
    thumbnail = ui.function_row("thumbnail")
    await expect(thumbnail.locator('[data-status="RUNNING"]')).to_have_text("running 1", timeout=WAIT)
    await expect(thumbnail.locator('[data-status="QUEUED"]')).to_have_text("queued 1")
    await expect(thumbnail.locator('[data-status="ABORTED"]')).to_have_text("aborted 1")
    failed = ui.function_row("import-csv").locator('[data-status="FAILED"]')
    await expect(failed).to_have_text("failed 1", timeout=WAIT)
    timed_out = ui.function_row("transcode").locator('[data-status="TIMED_OUT"]')
    await expect(timed_out).to_have_text("timed out 1", timeout=WAIT)
    timer_runs = ui.function_row("nightly-report").locator('[data-status="FINISHED"]')
    await expect(timer_runs).not_to_have_text("finished 0", timeout=WAIT)

    # Each trigger kind's report, as text.
    timer = ui.testid("trigger-health").locator('[data-trigger="timer"]')
    await expect(timer).to_contain_text("running")
    await expect(timer).to_contain_text("Function=nightly-report")
    await expect(timer).to_contain_text("Trigger=every-2s")

    # The runs table shows them all, newest first, with the running and queued ones.
    await expect(ui.row_status(running)).to_have_text("RUNNING")
    await expect(ui.row_status(queued)).to_have_text("QUEUED")
    await expect(ui.row_status(aborted)).to_have_text("ABORTED")
    assert await table.is_visible()
    await ui.screenshot("dashboard.png")
    if os.environ.get("EVENTRUN_UPDATE_SCREENSHOTS") == "1":
        # The README's picture; a plain test run leaves the tracked file alone.
        await page.screenshot(path=str(REPO / "docs" / "dashboard.png"), full_page=True)


async def test_invoke_from_the_page_and_watch_a_run_queue_start_and_finish(eventrun_server, http, handler, dashboard):
    server = eventrun_server({"sleepy": {"handler": handler("sleepy"), "concurrency": 1}})
    api = server.client(http)
    ui = await dashboard(server)
    page = await ui.open()
    await page.evaluate("window.__sameDocument = true")

    # The first run holds the only slot, so the second one waits QUEUED.
    started = time.monotonic()
    first = await ui.invoke("sleepy", '{"seconds": 2.5}')
    assert time.monotonic() - started < 3.0, "the RequestId must be shown at once, not after the run"
    assert (await api.status(first))["FunctionName"] == "sleepy"
    await expect(ui.testid("invoke-request-id")).to_have_attribute("href", f"#/runs/{first}")
    await api.wait_for(first, {"RUNNING"}, timeout=10)

    second = await ui.invoke("sleepy", '{"seconds": 2.5}')
    assert second != first
    await watch_row(page, second)
    await expect(ui.row_status(second)).to_have_text("FINISHED", timeout=20_000)
    assert await statuses_seen(page, second) == ["QUEUED", "RUNNING", "FINISHED"]
    await expect(ui.row_status(first)).to_have_text("FINISHED")
    assert await ui.shown_ids() == [second, first], "newest first"
    assert await page.evaluate("window.__sameDocument") is True, "the page was reloaded"

    # Invalid JSON is refused on the page, and the server's refusals are shown as they come.
    await ui.testid("invoke-body").fill("{not json")
    await ui.testid("invoke-submit").click()
    await expect(ui.testid("invoke-error")).to_contain_text("Invalid JSON")
    assert await ui.shown_ids() == [second, first], "nothing was sent"


async def test_the_run_view_follows_the_log_live(eventrun_server, http, handler, dashboard):
    server = eventrun_server({"sleepy": {"handler": handler("sleepy")}})
    api = server.client(http)
    ui = await dashboard(server)
    page = await ui.open()
    request_id = await ui.invoke("sleepy", '{"seconds": 3}')
    await ui.testid("invoke-request-id").click()
    await expect(page).to_have_url(f"{server.url}/ui/#/runs/{request_id}")
    await expect(ui.testid("run-id")).to_have_text(request_id)

    log = ui.testid("run-log")
    await expect(log).to_contain_text("tick 2 at", timeout=WAIT)
    await expect(ui.testid("run-status")).to_have_text("RUNNING")
    early = (await log.text_content() or "").count("tick ")
    await expect(ui.testid("run-log-state")).to_have_text("following live")
    await ui.screenshot("run-live.png")
    # More lines arrive while the run goes on, without a reload.
    await expect(log).to_contain_text(f"tick {early + 3} at", timeout=WAIT)
    assert (await api.status(request_id))["Status"] == "RUNNING", "the lines must show before the run ends"

    await expect(ui.testid("run-log-state")).to_contain_text("ended (FINISHED)", timeout=WAIT)
    await expect(ui.testid("run-status")).to_have_text("FINISHED")
    await expect(log).to_contain_text("sleepy done")
    text = await log.text_content() or ""
    assert text.count("tick 0 at") == 1, f"lines repeated: {text}"
    assert text.strip() == (await api.logs(request_id)).strip(), "the followed log is the whole log, in order"
    state = await api.status(request_id)
    result = json.loads(await ui.testid("run-result").text_content() or "null")
    assert result == state["Result"]
    envelope = json.loads(await ui.testid("run-envelope").text_content() or "null")
    assert envelope["data"] == {"seconds": 3} and envelope["eventrunfunction"] == "sleepy", envelope
    await expect(ui.testid("run-terminate")).to_be_disabled()
    await ui.screenshot("run-finished.png")

    await ui.testid("run-back").click()
    await expect(ui.row_status(request_id)).to_have_text("FINISHED")


async def test_terminate_from_the_run_view(eventrun_server, http, handler, dashboard):
    server = eventrun_server({"sleepy": {"handler": handler("sleepy")}})
    api = server.client(http)
    request_id = await api.accepted("sleepy", {"seconds": 30})
    ui = await dashboard(server)
    page = await ui.open(f"#/runs/{request_id}")
    await expect(ui.testid("run-status")).to_have_text("RUNNING", timeout=WAIT)
    await expect(ui.testid("run-log")).to_contain_text("tick 1 at", timeout=WAIT)
    button = ui.testid("run-terminate")
    await expect(button).to_be_enabled()
    await button.click()
    await expect(ui.testid("run-terminate-result")).to_have_text("Terminated: ABORTED", timeout=WAIT)
    await expect(ui.testid("run-status")).to_have_text("ABORTED")
    await expect(button).to_be_disabled()
    await expect(ui.testid("run-log-state")).to_contain_text("ended (ABORTED)", timeout=WAIT)
    await expect(ui.testid("run-error")).to_be_visible()
    assert (await api.status(request_id))["Status"] == "ABORTED"
    await ui.testid("run-back").click()  # the page was opened on the run: Back leads home
    await expect(page).to_have_url(f"{server.url}/ui/#/")
    await expect(ui.row_status(request_id)).to_have_text("ABORTED", timeout=WAIT)


async def test_replay_from_the_run_view_links_both_runs(eventrun_server, http, handler, dashboard):
    server = eventrun_server({"pid": {"handler": handler("pid")}})
    api = server.client(http)
    original = await api.accepted("pid", {"fail": True})
    assert (await api.wait_ended(original))["Status"] == "FAILED"
    ui = await dashboard(server)
    await ui.open(f"#/runs/{original}")
    button = ui.testid("run-replay")
    await expect(button).to_be_enabled(timeout=WAIT)
    await button.click()
    link = ui.testid("run-replay-link")
    await expect(link).to_be_visible(timeout=WAIT)
    again = (await link.text_content() or "").strip()
    assert (await api.status(again))["ReplayOf"] == original
    await expect(ui.testid("run-replays")).to_have_text(again, timeout=WAIT)
    await link.click()
    await expect(ui.testid("run-id")).to_have_text(again, timeout=WAIT)
    await expect(ui.testid("run-replay-of")).to_have_text(original, timeout=WAIT)
    await expect(ui.testid("run-status")).to_have_text("FAILED", timeout=WAIT)


async def test_filters_narrow_the_runs_table(eventrun_server, http, handler, dashboard):
    server = eventrun_server(
        {
            "fine": {"handler": handler("quick")},
            "broken": {"handler": handler("boom")},
            "ticker": {
                "handler": handler("quick"),
                "triggers": [{"type": "timer", "name": "every", "cron": "* * * * * * *"}],
            },
        }
    )
    api = server.client(http)
    fine = [await api.accepted("fine", {"n": n}) for n in range(2)]
    broken = await api.accepted("broken")
    for request_id in [*fine, broken]:
        await api.wait_ended(request_id)
    ui = await dashboard(server)
    page = await ui.open()
    await expect(ui.row(broken)).to_be_visible()

    async def only(expected: Callable[[dict[str, Any]], bool], what: str) -> None:
        # Every row shown matches, and the page has settled on the filtered answer.
        async def check() -> bool:
            shown = await ui.shown_ids()
            if not shown:
                return False
            states = [await api.status(request_id) for request_id in shown]
            return all(expected(state) for state in states)

        deadline = time.monotonic() + WAIT / 1000
        while not await check():
            assert time.monotonic() < deadline, f"the table never showed only {what}: {await ui.shown_ids()}"
            await page.wait_for_timeout(100)

    await ui.testid("filter-status").select_option("FAILED")
    await only(lambda s: s["Status"] == "FAILED", "failed runs")
    assert await ui.shown_ids() == [broken]

    await ui.testid("filter-status").select_option("")
    await ui.testid("filter-function").select_option("fine")
    await only(lambda s: s["FunctionName"] == "fine", "runs of fine")
    assert sorted(await ui.shown_ids()) == sorted(fine)

    await ui.testid("filter-function").select_option("")
    await ui.testid("filter-trigger").select_option("timer")
    await only(lambda s: s["Trigger"] == "timer", "timer runs")
    await ui.testid("filter-trigger").select_option("http")
    await only(lambda s: s["Trigger"] == "http", "http runs")
    assert sorted(await ui.shown_ids()) == sorted([*fine, broken])

    # Since a time to come: nothing yet. Until the first run: nothing before it.
    later = (datetime.now(timezone.utc) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
    await ui.testid("filter-since").fill(later)
    await expect(ui.testid("runs-empty")).to_be_visible(timeout=WAIT)
    await expect(page.locator('[data-testid="runs-table"] tbody tr')).to_have_count(0)
    await ui.testid("filter-since").fill("")
    first = datetime.fromisoformat((await api.status(fine[0]))["CreatedAt"]).astimezone(timezone.utc)
    await ui.testid("filter-until").fill(first.strftime("%Y-%m-%dT%H:%M:%S"))  # whole seconds: before it
    await expect(ui.testid("runs-empty")).to_be_visible(timeout=WAIT)
    await ui.testid("filter-until").fill((first + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S"))
    await expect(ui.row(fine[0])).to_be_visible(timeout=WAIT)

    # The filters hold across a visit to a run and back.
    await ui.row(fine[0]).get_by_role("link").click()
    await expect(ui.testid("run-status")).to_have_text("FINISHED", timeout=WAIT)
    await ui.testid("run-back").click()
    await expect(ui.testid("filter-trigger")).to_have_value("http")
    await expect(ui.row(fine[0])).to_be_visible(timeout=WAIT)

    await ui.testid("filter-clear").click()
    await expect(ui.testid("filter-trigger")).to_have_value("")
    await expect(ui.row(broken)).to_be_visible(timeout=WAIT)


async def test_runs_of_a_function_removed_from_the_manifest_can_be_filtered(eventrun_server, http, handler, dashboard):
    kept = {"fine": {"handler": handler("quick")}}
    server = eventrun_server({**kept, "old_fn": {"handler": handler("quick")}})
    api = server.client(http)
    old = [await api.accepted("old_fn", {"n": n}) for n in range(2)]
    fine = await api.accepted("fine", {"n": 0})
    for request_id in [*old, fine]:
        await api.wait_ended(request_id)
    server.stop()
    server.write_manifest(kept)  # old_fn is gone; its runs stay in the store (GET /counts lists them)
    server.restart()
    assert "old_fn" in (await api.request("GET", "/counts")).json["Functions"]

    ui = await dashboard(server)
    page = await ui.open()
    await expect(ui.function_row("old_fn")).to_have_count(0)
    choices = ui.testid("filter-function").locator("option")
    await expect(choices).to_have_text(["any", "fine", "old_fn (removed)"], timeout=WAIT)
    assert await choices.evaluate_all("options => options.map(option => option.value)") == ["", "fine", "old_fn"]
    await expect(ui.testid("invoke-function").locator("option")).to_have_text(["fine"])  # nothing to invoke

    await expect(ui.row(fine)).to_be_visible(timeout=WAIT)
    await ui.testid("filter-function").select_option("old_fn")
    await expect(page.locator('[data-testid="runs-table"] tbody tr')).to_have_count(len(old), timeout=WAIT)
    assert await ui.shown_ids() == list(reversed(old))
    # The page's own refreshes keep the choice (the options are rebuilt only when they change).
    await page.wait_for_timeout(2500)
    await expect(ui.testid("filter-function")).to_have_value("old_fn")
    assert await ui.shown_ids() == list(reversed(old))


async def test_paging_older_and_newest(eventrun_server, http, handler, dashboard):
    server = eventrun_server({"fine": {"handler": handler("quick"), "concurrency": 8}})
    api = server.client(http)
    ids = [await api.accepted("fine", {"n": n}) for n in range(57)]
    await api.wait_ended(ids[-1])
    ui = await dashboard(server)
    listed: list[str] = []  # the URLs of the page's GET /invocations
    ui.page.on("request", lambda request: listed.append(request.url) if "/invocations?" in request.url else None)
    page = await ui.open()
    rows = page.locator('[data-testid="runs-table"] tbody tr')
    await expect(rows).to_have_count(50, timeout=WAIT)
    newest = list(reversed(ids))
    assert await ui.shown_ids() == newest[:50]
    await expect(ui.testid("newest")).to_be_disabled()

    await ui.testid("older").click()
    await expect(rows).to_have_count(7, timeout=WAIT)
    assert await ui.shown_ids() == newest[50:]
    await expect(ui.testid("older")).to_be_disabled()
    await expect(ui.testid("runs-page")).to_have_text("page 2")

    # An older page holds still while new runs arrive; the newest page shows them.
    latest = await api.accepted("fine", {"n": "latest"})
    await page.wait_for_timeout(1500)
    assert await ui.shown_ids() == newest[50:]
    await ui.testid("newest").click()
    await expect(ui.row(latest)).to_be_visible(timeout=WAIT)
    assert (await ui.shown_ids())[:2] == [latest, newest[0]]
    # The table shows no results, so no page of it asks for them.
    assert listed and all(parse_qs(urlsplit(url).query).get("results") == ["false"] for url in listed)


async def test_untrusted_text_is_shown_as_text(eventrun_server, http, handler, dashboard, tmp_path):
    server = eventrun_server({"echo": {"handler": echo_handler(tmp_path)}})
    api = server.client(http)
    # Without the page's CSP, so only the page's own code keeps markup from becoming markup.
    ui = await dashboard(server, bypass_csp=True)
    page = await ui.open()
    hostile = f"{XSS_SCRIPT} {XSS_IMG}"
    body = json.dumps({"line": hostile, "fail": XSS_IMG, "note": XSS_SCRIPT})
    request_id = await ui.invoke("echo", body)
    await ui.testid("invoke-request-id").click()

    await expect(ui.testid("run-status")).to_have_text("FAILED", timeout=WAIT)
    await expect(ui.testid("run-log")).to_contain_text(hostile, timeout=WAIT)
    await expect(ui.testid("run-error")).to_contain_text(XSS_IMG)
    envelope = ui.testid("run-envelope")
    await expect(envelope).to_contain_text(XSS_SCRIPT)
    await expect(envelope).to_contain_text(json.dumps(XSS_IMG))  # as JSON shows a string
    await expect(ui.testid("run-log-state")).to_contain_text("ended (FAILED)", timeout=WAIT)
    assert json.loads(await envelope.text_content() or "null")["data"]["note"] == XSS_SCRIPT
    await ui.screenshot("run-untrusted.png")

    for area in ("run-log", "run-error", "run-envelope", "run-result", "invoke-result", "runs-table"):
        injected = ui.testid(area).locator("script, img")
        assert await injected.count() == 0, f"markup from the server became elements in {area}"
    await page.wait_for_timeout(300)  # an image's onerror would have fired by now
    assert await page.evaluate("typeof window.__pwned") == "undefined"
    assert (await api.status(request_id))["ErrorMessage"].endswith(XSS_IMG)


async def test_text_that_turns_around_is_shown_escaped(eventrun_server, http, handler, dashboard, tmp_path):
    # "pay 1234 \u202e9876" reads "pay 1234 6789" when its right-to-left override works.
    server = eventrun_server({"echo": {"handler": echo_handler(tmp_path)}})
    ui = await dashboard(server)
    await ui.open()
    turned = "pay 1234 \u202e9876"
    await ui.invoke("echo", json.dumps({"line": turned, "fail": turned}))
    await ui.testid("invoke-request-id").click()
    await expect(ui.testid("run-status")).to_have_text("FAILED", timeout=WAIT)
    escaped = "pay 1234 \\u202e9876"
    await expect(ui.testid("run-log")).to_contain_text(escaped, timeout=WAIT)
    await expect(ui.testid("run-error")).to_contain_text(escaped)
    await expect(ui.testid("run-envelope")).to_contain_text(escaped)
    for area in ("run-log", "run-error", "run-envelope"):
        assert "\u202e" not in (await ui.testid(area).text_content() or ""), area


async def test_a_large_log_and_result_are_shown_in_part_and_say_so(eventrun_server, http, handler, dashboard, tmp_path):
    # A 60 MB log (500,000 lines) took the page 40 s and 3.8 GB to show; a 5 MB result, 12 s.
    (tmp_path / "big.py").write_text(
        "def main_handler(event, context):\n"
        "    for n in range(30000):\n"
        "        print(f'line {n}')\n"
        "    return {'items': ['x' * 20] * 20000}\n"
    )
    server = eventrun_server({"big": {"handler": str(tmp_path / "big.py") + ":main_handler"}})
    api = server.client(http)
    request_id = await api.accepted("big", {})
    assert (await api.wait_ended(request_id))["Status"] == "FINISHED"
    ui = await dashboard(server)
    page = await ui.open(f"#/runs/{request_id}")
    await expect(ui.testid("run-log-state")).to_contain_text("ended (FINISHED)", timeout=WAIT)
    total = int(re.search(r"(\d+) lines", await ui.testid("run-log-state").text_content() or "")[1])
    assert total >= 30000, total
    log = await ui.testid("run-log").text_content() or ""
    assert " line 29999\n" in log[-200:] and " line 9999\n" not in log, log[:300]
    shown = log.count("\n") - 1  # (the first line says how many are not shown)
    assert 20000 <= shown <= 21000, shown  # the last 20,000 lines and the batch that passed them
    cut = await ui.testid("run-log-cut").text_content() or ""
    assert cut.startswith(f"[{total - shown:,} earlier lines are not shown here: GET /invocations/{request_id}/logs"), cut
    result = await ui.testid("run-result").text_content() or ""
    assert result.endswith("characters in all; the first 100,000 shown)") and len(result) < 100_200, result[-200:]
    assert page.url.endswith(request_id)


async def test_a_running_run_s_long_log_is_followed_from_its_tail_and_says_so(eventrun_server, http, dashboard, tmp_path):
    # A live view sent the whole log so far (up to log_limit, 64 MB) before the new lines.
    (tmp_path / "long.py").write_text(
        "import time\n"
        "def main_handler(event, context):\n"
        "    for n in range(200000):\n"
        "        print(f'line {n:06} of a long transcoding run')\n"
        "    time.sleep(60)\n"
    )
    server = eventrun_server({"long": {"handler": str(tmp_path / "long.py") + ":main_handler"}})
    api = server.client(http)
    request_id = await api.accepted("long", {})
    async with asyncio.timeout(WAIT / 1000):
        while "line 199999" not in (await api.logs(request_id))[-100:]:
            await asyncio.sleep(0.2)
    ui = await dashboard(server)
    await ui.open(f"#/runs/{request_id}")
    log = ui.testid("run-log")
    await expect(log).to_contain_text("line 199999 of a long transcoding run", timeout=WAIT)
    await expect(ui.testid("run-log-state")).to_have_text("following live")
    cut = await ui.testid("run-log-cut").text_content() or ""
    # (2 MB of these lines are more than the 20,000 the page keeps: it says so too)
    pattern = rf"\[the log's first \d+\.\d MB( and the [\d,]+ lines after them)? are not shown here: GET /invocations/{request_id}/logs has the whole log\]\n"
    assert re.fullmatch(pattern, cut), cut
    text = await log.text_content() or ""
    assert " line 100000 " not in text and text.count("\n") < 60_000, "about the last 2 MB of lines"
    assert (await api.request("POST", f"/invocations/{request_id}/terminate")).status == 200
    await expect(ui.testid("run-log-state")).to_contain_text("ended (ABORTED) · ", timeout=WAIT)
    assert re.search(r"lines after the first \d+\.\d MB$", await ui.testid("run-log-state").text_content() or "")


async def test_a_server_with_a_token_gets_it_from_the_page(eventrun_server, handler, dashboard):
    token = "dashboard-token"
    server = eventrun_server({"sleepy": {"handler": handler("sleepy")}}, server={"ui_token": token})
    ui = await dashboard(server)
    page = await ui.open(ready=False)
    form = ui.testid("token-form")
    await expect(form).to_be_visible(timeout=WAIT)
    await expect(page.locator('[data-testid="functions-table"] tr[data-function]')).to_have_count(0)

    await ui.testid("token-input").fill("wrong")
    await ui.testid("token-submit").click()
    await expect(ui.testid("token-message")).to_contain_text("refused", timeout=WAIT)
    await ui.screenshot("token.png")
    await ui.testid("token-input").fill(token)
    await ui.testid("token-submit").click()
    await expect(ui.function_row("sleepy")).to_be_visible(timeout=WAIT)
    await expect(form).to_be_hidden()

    # The log follows live with the token too (EventSource cannot send it: a fetch stream does).
    request_id = await ui.invoke("sleepy", '{"seconds": 2}')
    await ui.testid("invoke-request-id").click()
    log = ui.testid("run-log")
    await expect(log).to_contain_text("tick 2 at", timeout=WAIT)
    await expect(ui.testid("run-status")).to_have_text("RUNNING")
    await expect(ui.testid("run-log-state")).to_contain_text("ended (FINISHED)", timeout=WAIT)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        api = server.client(session)
        assert (await api.status(request_id))["Status"] == "FINISHED"
        assert (await log.text_content() or "").strip() == (await api.logs(request_id)).strip()

    # The tab keeps the token across a reload.
    await page.reload()
    await expect(ui.testid("run-status")).to_have_text("FINISHED", timeout=WAIT)
    await expect(form).to_be_hidden()


async def test_a_refused_token_stays_said_until_another_is_given(eventrun_server, handler, dashboard):
    server = eventrun_server({"quick": {"handler": handler("quick")}}, server={"ui_token": "dashboard-token"})
    ui = await dashboard(server)
    page = await ui.open(ready=False)
    await expect(ui.testid("token-message")).to_have_text("This server asks for its ui_token.", timeout=WAIT)
    await ui.testid("token-input").fill("wrong")
    await ui.testid("token-submit").click()
    message = ui.testid("token-message")
    await expect(message).to_have_text("That token was refused; enter the server's ui_token.", timeout=WAIT)
    # The polls that follow go without a token, and are answered 401 in turn: the refusal stays.
    unanswered: list[str] = []
    page.on("response", lambda response: response.status == 401 and unanswered.append(response.url))
    for _ in range(50):
        if len(unanswered) >= 3:
            break
        await page.wait_for_timeout(200)
    assert len(unanswered) >= 3, unanswered
    await expect(message).to_have_text("That token was refused; enter the server's ui_token.")
    await ui.testid("token-input").fill("dashboard-token")
    await ui.testid("token-submit").click()
    await expect(ui.function_row("quick")).to_be_visible(timeout=WAIT)
    await expect(ui.testid("token-form")).to_be_hidden()


@pytest.mark.parametrize("typed", ["\u5bc6\u7801", "p\u00e4sswort", "two words"], ids=["chinese", "latin-1", "space"])
async def test_a_token_the_page_cannot_send_is_refused_on_the_form(eventrun_server, handler, dashboard, typed):
    server = eventrun_server({"quick": {"handler": handler("quick")}}, server={"ui_token": "dashboard-token"})
    ui = await dashboard(server)
    page = await ui.open(ready=False)
    await expect(ui.testid("token-form")).to_be_visible(timeout=WAIT)
    carried: list[str] = []
    page.on("request", lambda request: "authorization" in request.headers and carried.append(request.url))
    await ui.testid("token-input").fill(typed)
    await ui.testid("token-submit").click()
    message = ui.testid("token-message")
    await expect(message).to_contain_text("That token cannot be sent", timeout=WAIT)
    await expect(message).to_contain_text("printable ASCII")
    await page.wait_for_timeout(2500)  # polls come and go, answered 401: the form and its message stay
    await expect(ui.testid("token-form")).to_be_visible()
    await expect(message).to_contain_text("That token cannot be sent")
    await expect(ui.testid("connection")).to_have_text("live")
    assert carried == [], "the token was sent"
    assert await page.evaluate("sessionStorage.getItem('eventrun.token')") is None


async def test_a_stored_token_the_page_cannot_send_is_dropped(eventrun_server, handler, dashboard):
    # (kept by a page that took such a token: reloading it must not leave the tab stuck)
    server = eventrun_server({"quick": {"handler": handler("quick")}}, server={"ui_token": "dashboard-token"})
    ui = await dashboard(server)
    page = await ui.open(ready=False)
    await expect(ui.testid("token-form")).to_be_visible(timeout=WAIT)
    await page.evaluate("sessionStorage.setItem('eventrun.token', '\u5bc6\u7801')")
    await page.reload()
    await expect(ui.testid("token-form")).to_be_visible(timeout=WAIT)
    await expect(ui.testid("token-message")).to_have_text("This server asks for its ui_token.")
    await expect(ui.testid("connection")).to_have_text("live", timeout=WAIT)
    assert await page.evaluate("sessionStorage.getItem('eventrun.token')") is None
    await ui.testid("token-input").fill("dashboard-token")
    await ui.testid("token-submit").click()
    await expect(ui.function_row("quick")).to_be_visible(timeout=WAIT)


def test_the_page_never_turns_strings_into_markup():
    """No HTML parsing of strings in the script, nothing inline in the page (the CSP forbids it)."""
    script = (UI / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", ".style."):
        assert sink not in script, f"app.js uses {sink}"
    page = (UI / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", page) == ['<script src="app.js" defer>'], "only app.js, no inline script"
    assert "<style" not in page and not re.search(r"\sstyle\s*=", page), "styles belong in app.css"
    assert not re.search(r"\son[a-z]+\s*=", page), "no inline event handlers"
