"""The `eventrun` client commands against a real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


async def eventrun(*args: str, url: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run `python -m eventrun.cli ARGS --url URL` without blocking the event loop."""
    command = [sys.executable, "-m", "eventrun.cli", *args, "--url", url]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """Assert exit status 0; the stdout."""
    assert result.returncode == 0, f"{result.args} exited {result.returncode}: {result.stderr}"
    return result.stdout


async def test_cli_round_trip(eventrun_server, http, handler):
    server = eventrun_server(
        {"quick": {"handler": handler("quick")}, "sleepy": {"handler": handler("sleepy")}}
    )
    api = server.client(http)
    url = server.url

    out = ok(await eventrun("invoke", "quick", "--data", '{"marker": "cli-123"}', url=url))
    request_id = out.strip()
    assert request_id and len(out.splitlines()) == 1 and " " not in request_id, out
    assert (await api.wait_ended(request_id))["Status"] == "FINISHED"

    shown = ok(await eventrun("status", request_id, url=url))
    assert request_id in shown and "FINISHED" in shown and "cli-123" in shown, shown

    waited = ok(await eventrun("invoke", "quick", "--data", '{"marker": "cli-wait"}', "--wait", url=url))
    assert json.loads(waited)["data"] == {"marker": "cli-wait"}, waited

    sleepy = ok(await eventrun("invoke", "sleepy", "--data", '{"seconds": 1}', url=url)).strip()
    followed = ok(await eventrun("logs", sleepy, "--follow", url=url))
    assert "sleepy start" in followed and "sleepy done" in followed, followed
    assert (await api.status(sleepy))["Status"] == "FINISHED"
    log = ok(await eventrun("logs", sleepy, url=url))
    assert log == await api.logs(sleepy) or log == (await api.logs(sleepy)) + "\n", log
    assert "tick 0 at" in log and "sleepy done" in log, log

    listed = ok(await eventrun("list", "--function", "quick", url=url))
    assert request_id in listed and sleepy not in listed, listed
    assert "quick" in ok(await eventrun("functions", url=url))

    refused = await eventrun("terminate", request_id, url=url)
    assert refused.returncode != 0, refused
    assert refused.stdout == "", refused.stdout
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr: {refused.stderr!r}"
    assert "Traceback" not in refused.stderr
    assert (await api.status(request_id))["Status"] == "FINISHED"

    missing = await eventrun("status", "no-such-request", url=url)
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1, missing
