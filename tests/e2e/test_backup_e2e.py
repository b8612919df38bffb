"""`eventrun backup`: a copy of a serving node's store and logs, and a server started on it."""

from __future__ import annotations

import asyncio
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from server_process import handler

pytestmark = pytest.mark.e2e


def backup(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "eventrun.cli", "backup", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=cwd)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_backup_taken_while_serving_restores_what_it_held(eventrun_server, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    functions = {"chatty": {"handler": handler("chatty")}, "sleepy": {"handler": handler("sleepy")}}
    server = eventrun_server(functions)
    api = server.client(http)
    ended = await api.accepted("chatty", {"lines": 3})
    assert (await api.wait_ended(ended))["Status"] == "FINISHED"
    running = await api.accepted("sleepy", {"seconds": 60})
    await api.wait_for(running, {"RUNNING"}, timeout=20)

    folder = tmp_path / "backups" / "monday"
    taken = await asyncio.to_thread(backup, str(folder), "--config", str(server.manifest_path))
    assert taken.returncode == 0, taken.stderr
    assert taken.stdout.startswith("backed up 2 runs (") and f" to {folder}\n" in taken.stdout, taken.stdout
    assert (mode(folder), mode(folder / "eventrun.db")) == (0o700, 0o600)
    logs = sorted((folder / "logs").rglob("*.log"))
    assert [log.name for log in logs] == sorted([f"{ended}.log", f"{running}.log"])
    assert {mode(log) for log in logs} == {0o600}
    later = await api.accepted("chatty", {"lines": 1})  # after the backup: not in it
    await api.wait_ended(later)
    server.stop()

    restored = eventrun_server(functions, start=False)
    shutil.copytree(folder, restored.data_dir)
    restored.start()
    api = restored.client(http)
    run = await api.status(ended)
    assert (run["Status"], run["Result"]) == ("FINISHED", 3)
    assert (await api.logs(ended)).count("z" * 99) == 3
    cut_short = await api.wait_ended(running)
    assert (cut_short["Status"], cut_short["ErrorType"]) == ("FAILED", "ServerStopped")
    assert "sleepy start" in await api.logs(running)
    assert (await api.request("GET", f"/invocations/{later}")).status == 404


def test_a_backup_is_refused_where_it_would_mix_or_has_nothing_to_copy(tmp_path: Path) -> None:
    manifest = tmp_path / "eventrun.toml"
    manifest.write_text('[server]\ndata_dir = "data"\n')
    missing = backup(str(tmp_path / "copy"), "--config", str(manifest))
    assert (missing.returncode, missing.stderr) == (
        1,
        f"eventrun: no store to back up: {tmp_path / 'data' / 'eventrun.db'} does not exist (is data_dir right?)\n",
    )
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "eventrun.db").touch()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "other.db").touch()
    full = backup(str(tmp_path / "full"), "--config", str(manifest))
    assert (full.returncode, full.stderr) == (1, f"eventrun: {tmp_path / 'full'} is not empty: name a new or empty folder\n")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["other.db"]

    manifest.write_text('[store]\nurl = "postgresql://eventrun@127.0.0.1:1/runs"\n')
    shared = backup(str(tmp_path / "copy"), cwd=tmp_path)  # (./eventrun.toml)
    assert shared.returncode == 2
    assert "the store is PostgreSQL ([store] url)" in shared.stderr and "pg_dump" in shared.stderr
    assert not (tmp_path / "copy").exists()
