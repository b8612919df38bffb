"""A run that starts after the function's code changed runs the new code, on an instance forked
or started fresh; a run already going finishes on the code it started with. The code is the
handler's file and the modules it imported from its folder."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

HANDLER = '''\
import os
import time

import helper

VERSION = "A"


def main_handler(event, context):
    """Its code's version and its helper's, after sleeping as asked."""
    data = event.get("data") or {}
    result = {"version": VERSION, "helper": helper.VERSION, "pid": os.getpid()}
    if data.get("lazy"):
        import lazy  # (imported by a run, not as the handler is loaded)

        result["lazy"] = lazy.VERSION
    if data.get("started"):
        open(data["started"], "w").close()
    time.sleep(data.get("sleep", 0))
    return result
'''
HELPER = 'VERSION = "a"\n'
LAZY = 'VERSION = "1"\n'
PAST = time.time() - 100  # the files' first mtime: well before any run, so no run sees them change


@pytest.fixture
def code(tmp_path: Path) -> Path:
    """A function's folder: handler.py, which imports helper.py beside it (and lazy.py when asked)."""
    folder = tmp_path / "code"
    folder.mkdir()
    for name, text in (("handler.py", HANDLER), ("helper.py", HELPER), ("lazy.py", LAZY)):
        (folder / name).write_text(text)
        os.utime(folder / name, (PAST, PAST))
    return folder


def edit(path: Path, old: str, new: str, *, how: str = "in place", later: bool = True) -> None:
    """Replace `old` by `new` in a file: written over (same inode), or as `sed -i` does (a new
    file renamed over it). `later`: its mtime is set 10 s after its last (still in the past),
    so that it differs on a file system with coarse times, and for the cached bytecode
    (whose check is in whole seconds)."""
    before = path.stat().st_mtime
    text = path.read_text()
    assert old in text
    if how == "in place":
        with open(path, "r+") as file:
            file.write(text.replace(old, new))
            file.truncate()
    else:
        fresh = path.with_name(path.name + ".sed")
        fresh.write_text(text.replace(old, new))
        os.replace(fresh, path)
    if later:
        os.utime(path, (before + 10, before + 10))


def spawner_children(spawner: int) -> list[int]:
    """The processes the spawner has (its instances), from /proc."""
    found: list[int] = []
    for task in Path(f"/proc/{spawner}/task").iterdir():
        found += map(int, (task / "children").read_text().split())
    return found


async def call(api: Any, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the function to its end; its result."""
    state = await api.wait_ended(await api.accepted("code", data or {}))
    assert state["Status"] == "FINISHED", state
    return state["Result"]  # type: ignore[no-any-return]


def serve(eventrun_server: Any, code: Path, fork: bool = True) -> Any:
    """A server with the function `code` (handler.py of the folder), instances forked or fresh."""
    return eventrun_server(
        {"code": {"handler": f"{code / 'handler.py'}:main_handler", "timeout": "30s"}},
        server={"fork_instances": fork},
    )


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "fresh"])
@pytest.mark.parametrize("how", ["in place", "renamed"])
@pytest.mark.parametrize("changed", ["handler.py", "helper.py"])
async def test_the_run_after_an_edit_runs_the_new_code(eventrun_server, http, code, fork, how, changed):
    server = serve(eventrun_server, code, fork)
    api = server.client(http)
    first = await call(api)
    assert (first["version"], first["helper"]) == ("A", "a")
    assert (await call(api))["pid"] == first["pid"]  # unchanged, the instance is reused
    if changed == "handler.py":
        edit(code / changed, '"A"', '"B"', how=how)
        expected = ("B", "a")
    else:
        edit(code / changed, '"a"', '"b"', how=how)
        expected = ("A", "b")
    second = await call(api)
    assert (second["version"], second["helper"]) == expected
    assert second["pid"] != first["pid"]
    assert (await call(api))["pid"] == second["pid"]  # and the new one is reused in its turn
    assert server.stderr_text().count("the code of function code changed") == 1, server.stderr_text()


async def test_a_run_going_on_finishes_on_its_code_and_the_next_runs_the_new(
    eventrun_server, http, code, tmp_path, poll_until
):
    server = serve(eventrun_server, code)
    api = server.client(http)
    warm = await call(api)
    started = tmp_path / "started"
    long = await api.accepted("code", {"sleep": 3, "started": str(started)})
    await poll_until(started.exists, 10, "the long run did not start")
    edit(code / "handler.py", '"A"', '"B"')
    meanwhile = await call(api)
    assert meanwhile["version"] == "B"  # (on another instance: the warm one is busy)
    state = await api.wait_ended(long)
    assert state["Status"] == "FINISHED", state
    assert state["Result"]["version"] == "A" and state["Result"]["pid"] == warm["pid"]
    for _ in range(3):  # the long run's instance, the latest back, is not reused
        after = await call(api)
        assert after["version"] == "B" and after["pid"] == meanwhile["pid"]


@pytest.mark.parametrize("later", [True, False], ids=["older-mtime", "mtime-now"])
async def test_an_edit_during_an_instances_first_run_is_seen(eventrun_server, http, code, tmp_path, later, poll_until):
    # The first run loads the handler: an edit after that, while it runs, replaces its instance,
    # whether the new file's time is now or any other.
    server = serve(eventrun_server, code)
    api = server.client(http)
    started = tmp_path / "started"
    first = await api.accepted("code", {"sleep": 2, "started": str(started)})
    await poll_until(started.exists, 10, "the long run did not start")
    edit(code / "handler.py", '"A"', '"B"', how="renamed", later=later)
    state = await api.wait_ended(first)
    assert state["Result"]["version"] == "A", state
    after = await call(api)
    assert after["version"] == "B" and after["pid"] != state["Result"]["pid"]


async def test_an_edit_while_a_run_imports_a_module_is_seen(eventrun_server, http, code, tmp_path, poll_until):
    server = serve(eventrun_server, code)
    api = server.client(http)
    warm = await call(api)
    started = tmp_path / "started"
    run = await api.accepted("code", {"lazy": True, "sleep": 2, "started": str(started)})
    await poll_until(started.exists, 10, "the run did not start")
    edit(code / "lazy.py", '"1"', '"2"', later=False)  # (after the run imported it, with the time of the edit)
    state = await api.wait_ended(run)
    assert (state["Result"]["lazy"], state["Result"]["pid"]) == ("1", warm["pid"]), state
    after = await call(api, {"lazy": True})
    assert after["lazy"] == "2" and after["pid"] != warm["pid"]


async def test_stopped_instances_do_not_pile_up(eventrun_server, http, code, poll_until):
    server = serve(eventrun_server, code)
    api = server.client(http)
    spawner = (await call(api))["pid"]
    spawner = int(Path(f"/proc/{spawner}/stat").read_text().rpartition(")")[2].split()[1])
    for version in "BCDEF":
        edit(code / "handler.py", f'"{chr(ord(version) - 1)}"', f'"{version}"')
        for _ in range(2):
            assert (await call(api))["version"] == version
    health = (await api.request("GET", "/healthz")).json
    assert health["Instances"] == 1, health
    await poll_until(lambda: len(spawner_children(spawner)) == 1, 10, "the replaced instances were not stopped")
    assert server.stderr_text().count("the code of function code changed") == 5


async def test_the_change_is_logged_once_for_all_the_functions_instances(eventrun_server, http, code):
    server = serve(eventrun_server, code)
    api = server.client(http)
    runs = [await api.accepted("code", {"sleep": 1}) for _ in range(3)]  # three instances at once
    pids = {(await api.wait_ended(run))["Result"]["pid"] for run in runs}
    assert len(pids) == 3
    edit(code / "helper.py", '"a"', '"b"')
    runs = [await api.accepted("code", {"sleep": 1}) for _ in range(3)]
    results = [(await api.wait_ended(run))["Result"] for run in runs]
    assert {result["helper"] for result in results} == {"b"}
    assert not pids & {result["pid"] for result in results}
    log = server.stderr_text()
    assert log.count("the code of function code changed (helper.py)") == 1, log
