"""The Unix user a function's instances run as: `run_as`, in `[server]` and per function.

A server started as root can run each function as a user of its own. Its instances then
cannot signal the server, the store's writer, the spawner or the instances of a function
that runs as another user, nor read the `data_dir` (mode 700, the server's): the kernel
keeps users apart, where the server's own user can only make its processes undumpable.
"""

from __future__ import annotations

import functools
import os
import pwd
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .manifest import FunctionConfig, Manifest, Problem


@dataclass(frozen=True, slots=True)
class RunAs:
    """A user to run instances as, and what a login as that user would set."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # its supplementary groups, its own group among them
    home: str

    def environment(self) -> dict[str, str]:
        """HOME, USER and LOGNAME for that user (the server's own would name another)."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}


class UnknownUser(Exception):
    """A run_as user that no longer exists (deleted since the server started)."""


def instance_user(name: str) -> RunAs | None:
    """The user to start an instance as, looked up afresh (one deleted meanwhile is not started
    as, nor is whoever took its uid since); UnknownUser if there is none of that name."""
    try:
        return run_as(name)
    except KeyError:
        raise UnknownUser(f"no user named {name!r} on this machine") from None


def run_as(name: str) -> RunAs | None:
    """The user named `name`; None for "" or the server's own user (nothing to change).

    KeyError if there is no such user.
    """
    if not name:
        return None
    entry = pwd.getpwnam(name)
    if entry.pw_uid == os.geteuid():
        return None
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return RunAs(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups, home=entry.pw_dir)


def function_user(manifest: Manifest, function: FunctionConfig) -> str:
    """The name a function's `run_as` resolves to: its own, else `[server] run_as` ("": the server's user)."""
    return manifest.server.run_as if function.run_as is None else function.run_as


def run_as_problems(manifest: Manifest) -> list[Problem]:
    """Users that do not exist, users a server that is not root cannot become, and handler files
    the user their function runs as cannot read."""
    problems: list[Problem] = []
    places: list[tuple[list[str], str]] = [(["server", "run_as"], manifest.server.run_as)]
    places += [(["functions", name, "run_as"], f.run_as) for name, f in manifest.functions.items() if f.run_as]
    users: dict[str, RunAs] = {}
    for where, name in places:
        if not name:
            continue
        try:
            user = run_as(name)
        except KeyError:
            problems.append((where, f"no user named {name!r} on this machine"))
            continue
        if user is not None and os.geteuid() != 0:
            problems.append((where, f"running as {name!r} needs a server started as root; it runs as {_me()}"))
        elif user is not None:
            users[name] = user
    for function_name, function in manifest.functions.items():
        user = users.get(function_user(manifest, function))
        if user is None:
            continue
        handler = str(manifest.handler_path(function_name))
        if unreadable(user, [handler]):
            problems.append(
                (
                    ["functions", function_name, "handler"],
                    f"user {user.name!r} (its run_as) cannot read {handler}: give that user read access to the"
                    " file, and to the folders above it",
                )
            )
    if not manifest.server.fork_instances:  # every instance is a fresh interpreter, started as the user
        for name, user in users.items():
            if python_unreadable(user):
                problems.append((["server", "fork_instances"], _python_message(user) + " (or fork_instances = true)"))
    return problems


def run_as_warnings(manifest: Manifest) -> list[str]:
    """What works only in part: functions whose user cannot read the Python eventrun runs on
    (forked instances run, with only the modules the spawner has loaded)."""
    users = {function_user(manifest, f) for f in manifest.functions.values()}
    warnings = []
    for name in sorted(users):
        user = run_as(name) if name else None
        if user is not None and manifest.server.fork_instances and python_unreadable(user):
            warnings.append(
                _python_message(user) + ": until then its functions' instances, forked, import only the modules"
                " eventrun's spawner has loaded, and none starts where a fresh interpreter is needed (while the"
                " spawner is down, or for a function whose environment sets PYTHON*, LANG or LC_* variables)"
            )
    return warnings


def _python_message(user: RunAs) -> str:
    missing = ", ".join(python_unreadable(user))
    return (
        f"user {user.name!r} cannot read the Python eventrun runs on ({missing}): install eventrun, and the"
        " Python it runs on, where that user can read them (e.g. under /opt or /usr/local)"
    )


@functools.cache
def python_unreadable(user: RunAs) -> tuple[str, ...]:
    """What of the Python eventrun runs on `user` cannot read: its interpreter, its standard
    library, orjson (which instances write results with)."""
    import orjson

    return tuple(unreadable(user, [os.path.realpath(sys.executable), os.path.dirname(os.__file__), os.path.dirname(orjson.__file__)]))


def unreadable(user: RunAs, paths: list[str]) -> list[str]:
    """The paths `user` cannot read (a file) or list and enter (a folder); a file that does not
    exist counts as unreadable. Asked of the kernel by a child process that becomes the user."""
    answer_r, answer_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # (nothing but system calls here, then out: no Python state of the parent's is used)
        code = 1
        try:
            os.close(answer_r)
            os.setgroups(list(user.groups))
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
            wanted = [os.R_OK | os.X_OK if os.path.isdir(path) else os.R_OK for path in paths]
            refused = [str(i) for i, (path, mode) in enumerate(zip(paths, wanted)) if not os.access(path, mode)]
            os.write(answer_w, " ".join(refused).encode() or b"-")
            code = 0
        finally:
            os._exit(code)
    os.close(answer_w)
    with open(answer_r, "rb") as answer:
        text = answer.read().decode()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not text:
        return list(paths)  # the child could not become the user: nothing of this is readable to it
    return [paths[int(i)] for i in text.split() if i != "-"]


def _me() -> str:
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except KeyError:
        return f"uid {uid}"

