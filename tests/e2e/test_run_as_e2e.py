"""run_as: a server started as root runs a function's instances as another Unix user, which
can then neither signal eventrun's processes nor read its data_dir.

Forked instances work whoever can read the Python eventrun runs on. Fresh interpreters need
that user to be able to read it: where it cannot (a Python under /root, as pyenv installs it),
the tests check that eventrun says so instead.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventrun.engine.users import python_unreadable, run_as
from server_process import HANDLERS

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="only a server started as root can run functions as another user"),
]

GUEST = "nobody"
MB = 1024 * 1024


@pytest.fixture
def guest() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(GUEST)
    except KeyError:
        pytest.skip(f"this machine has no user {GUEST!r} to run a function as")


def python_readable() -> bool:
    """Whether the guest user can read the interpreter, standard library and orjson used here."""
    user = run_as(GUEST)
    assert user is not None
    return not python_unreadable(user)


@pytest.fixture
def public_handler() -> Iterator[str]:
    """The guest handler in a folder any user may read (the tests' own tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="eventrun-run-as-"))
    try:
        folder.chmod(0o755)
        shutil.copy(HANDLERS / "guest.py", folder / "guest.py")
        (folder / "guest.py").chmod(0o644)
        yield f"{folder / 'guest.py'}:main_handler"
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("fork_instances", [True, False], ids=["forked", "fresh"])
async def test_a_function_run_as_another_user_cannot_reach_the_server_its_store_or_other_functions(
    eventrun_server, http, handler, guest, public_handler, fork_instances
):
    functions = {
        "guest": {
            "handler": public_handler,
            "run_as": GUEST,
            "memory_limit": "256MB",
            "environment": {"GREETING": "hallo"},
        },
        "host": {"handler": handler("family")},  # the server's own user (root)
    }
    server = eventrun_server(functions, server={"fork_instances": fork_instances}, start=False)
    unreadable = "user 'nobody' cannot read the Python eventrun runs on"
    if not fork_instances and not python_readable():
        assert server.run_to_exit() == 2, server.log_text()
        assert f"server.fork_instances: {unreadable}" in server.stderr_text()
        return
    server.start()
    assert (unreadable in server.stderr_text()) is not python_readable(), server.stderr_text()
    api = server.client(http)
    host = await api.wait_ended(await api.accepted("host", {}))
    assert host["Status"] == "FINISHED", host
    spawner = host["Result"]["ppid"]
    store = server.data_dir / "eventrun.db"
    assert store.is_file()

    request_id = await api.accepted(
        "guest",
        {
            "signal": {"server": server.pid, "spawner": spawner, "host instance": host["Result"]["pid"]},
            "read": {"store": str(store), "manifest": str(server.manifest_path)},
        },
    )
    state = await api.wait_ended(request_id)
    if state["Status"] != "FINISHED":
        pytest.fail(f"{state}\n{await api.logs(request_id)}")
    me = state["Result"]
    assert me["ids"] == [guest.pw_uid, guest.pw_uid, guest.pw_gid, guest.pw_gid], me
    assert me["saved"] == [guest.pw_uid, guest.pw_gid], me  # no way back to root
    assert me["groups"] == sorted(os.getgrouplist(GUEST, guest.pw_gid)), me
    assert me["env"] == {"HOME": guest.pw_dir, "USER": GUEST, "LOGNAME": GUEST, "GREETING": "hallo"}, me
    assert me["cwd"] == str(server.manifest_path.parent)
    assert me["data_limit"] == [str(256 * MB)] * 2, me  # the memory_limit holds as that user too
    assert me["signal"] == {"server": "PermissionError", "spawner": "PermissionError", "host instance": "PermissionError"}
    assert me["read"] == {"store": "PermissionError", "manifest": "PermissionError"}, me
    assert me["become_root"] == "PermissionError"
    assert me["no_new_privileges"] == "1", me  # nor through a set-user-ID program (su, sudo)
    assert f"guest uid={guest.pw_uid}" in await api.logs(request_id)
    assert f"started instance {me['pid']} of guest as {GUEST}" in server.stderr_text()

    # The instance stays warm as that user, and the host function still runs as the server's.
    again = await api.wait_ended(await api.accepted("guest", {}))
    assert again["Status"] == "FINISHED" and again["Result"]["pid"] == me["pid"], again
    host = await api.wait_ended(await api.accepted("host", {}))
    assert host["Status"] == "FINISHED", host
    assert Path(f"/proc/{host['Result']['pid']}/status").read_text().count("\t0\t0\t0\t0") == 2  # Uid and Gid root


async def test_without_the_spawner_an_instance_started_by_the_server_runs_as_the_user_too(
    eventrun_server, http, handler, guest, public_handler, poll_until, pid_alive
):
    server = eventrun_server({"guest": {"handler": public_handler, "run_as": GUEST}})
    api = server.client(http)
    first = await api.wait_ended(await api.accepted("guest", {}))
    assert first["Status"] == "FINISHED", first
    os.kill(first["Result"]["ppid"], signal.SIGKILL)  # the spawner
    await poll_until(lambda: not pid_alive(first["Result"]["pid"]), 10, "the spawner's instance outlived it")
    second = await api.wait_ended(await api.accepted("guest", {"signal": {"server": server.pid}}))
    if not python_readable():  # as the warning at start said
        assert second["Status"] == "FAILED" and second["ErrorType"] == "InstanceStartFailed", second
        assert "Permission denied" in second["ErrorMessage"], second
        return
    assert second["Status"] == "FINISHED", second
    assert second["Result"]["ppid"] == server.pid  # started by the server itself
    assert second["Result"]["ids"] == [guest.pw_uid, guest.pw_uid, guest.pw_gid, guest.pw_gid], second
    assert second["Result"]["signal"] == {"server": "PermissionError"}
    assert second["Result"]["env"]["HOME"] == guest.pw_dir
    assert second["Result"]["no_new_privileges"] == "1", second


async def test_a_run_as_user_that_does_not_exist_is_refused_at_start_naming_its_line(eventrun_server, handler):
    server = eventrun_server(
        {"f": {"handler": handler("quick"), "run_as": "no-such-user-here"}}, start=False
    )
    assert server.run_to_exit() == 2
    assert "functions.f.run_as: no user named 'no-such-user-here' on this machine" in server.stderr_text()
