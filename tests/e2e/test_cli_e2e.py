"""The `eventrun` client commands against a real server."""

from __future__ import annotations

import asyncio
import json
import os
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


async def test_cli_invoke_with_an_idempotency_key_makes_one_run(eventrun_server, http, handler):
    server = eventrun_server({"quick": {"handler": handler("quick")}})
    api = server.client(http)
    key = ("--idempotency-key", "upload-7:日本")
    first = ok(await eventrun("invoke", "quick", "--data", '{"n": 1}', *key, url=server.url)).strip()
    again = ok(await eventrun("invoke", "quick", "--data", '{"n": 1}', *key, url=server.url)).strip()
    assert again == first, "sent again with its key, the event answers its first run"
    assert (await api.wait_ended(first))["Status"] == "FINISHED"
    reply = await api.list(function="quick")
    assert [item["RequestId"] for item in reply.json["Invocations"]] == [first], reply.text


async def eventrun_in(folder, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m eventrun.cli ARGS` in `folder`, with no --url and only these EVENTRUN_* variables."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EVENTRUN_")} | (env or {})
    command = [sys.executable, "-m", "eventrun.cli", *args]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        cwd=folder, env=environment,
    )


async def test_the_client_finds_the_server_as_serve_does(eventrun_server, handler, tmp_path):
    """EVENTRUN_SERVER__PORT with no manifest in the folder; a --config that is missing or refused."""
    server = eventrun_server({"quick": {"handler": handler("quick")}})
    empty = tmp_path / "empty"
    empty.mkdir()

    found = await eventrun_in(empty, "functions", env={"EVENTRUN_SERVER__PORT": str(server.port)})
    assert found.returncode == 0 and "quick" in found.stdout, found.stderr
    # The file's port, overridden by the variable, as `serve` would read it.
    (empty / "eventrun.toml").write_text("[server]\nport = 1\n")
    found = await eventrun_in(empty, "functions", env={"EVENTRUN_SERVER__PORT": str(server.port)})
    assert found.returncode == 0 and "quick" in found.stdout, found.stderr
    (empty / "eventrun.toml").unlink()

    (empty / "broken.toml").write_text("[server\nport = ")
    (empty / "unknown.toml").write_text(f"[server]\nprot = {server.port}\n")
    for config in (str(tmp_path / "nope.toml"), "broken.toml", "unknown.toml"):
        env = {"EVENTRUN_SERVER__PORT": str(server.port)}
        refused = await eventrun_in(empty, "functions", "--config", config, env=env)
        serve = await eventrun_in(empty, "serve", "--config", config, env=env)
        assert (refused.returncode, refused.stdout) == (2, ""), refused.stderr
        assert refused.stderr.startswith(f"eventrun: {config}: ") and "cannot reach" not in refused.stderr
        assert (serve.returncode, serve.stderr) == (2, refused.stderr)


async def test_replay_refuses_bad_values_as_usage_errors(eventrun_server, handler):
    server = eventrun_server({"quick": {"handler": handler("quick")}})
    time_or_duration = "expected an RFC 3339 time with its zone (e.g. 2026-12-05T08:00:00Z) or a duration ago"
    for argv, message in (
        (("--limit", "0"), "argument --limit: expected an integer from 1 to 1000, got '0'"),
        (("--limit", "2000"), "argument --limit: expected an integer from 1 to 1000, got '2000'"),
        (("--since", "bogus"), f"argument --since: {time_or_duration}"),
        (("--until", "yesterday"), f"argument --until: {time_or_duration}"),
    ):
        refused = await eventrun("replay", "--function", "quick", *argv, "--dry-run", url=server.url)
        assert (refused.returncode, refused.stdout) == (2, ""), refused.stderr
        assert refused.stderr.splitlines()[-1].startswith(f"eventrun replay: error: {message}"), refused.stderr
    # The bounds themselves, and both forms of a time, are taken.
    taken = await eventrun(
        "replay", "--function", "quick", "--limit", "1000", "--since", "2h", "--until", "2099-01-01T00:00:00Z",
        "--dry-run", url=server.url,
    )
    assert (taken.returncode, taken.stdout, taken.stderr) == (0, "", "0 runs would be replayed\n")
