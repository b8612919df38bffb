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

from .manifest_errors import dotted
from .reach import as_user, changeable, readable

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
    """Users that do not exist or that a server not root cannot become; and what would let a
    function's user past the separation: a handler it cannot read, a manifest it can read (the
    ui_token, every function's environment) or change, another function's code it can change."""
    problems: list[Problem] = []
    places: list[tuple[list[str], str]] = [(["server", "run_as"], manifest.server.run_as)]
    places += [(["functions", name, "run_as"], f.run_as) for name, f in manifest.functions.items() if f.run_as]
    users: dict[str, tuple[list[str], RunAs]] = {}  # each user to switch to, and where it is first named
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
        elif user is not None and name in {function_user(manifest, f) for f in manifest.functions.values()}:
            users.setdefault(name, (where, user))
    for name, (where, user) in users.items():
        problems += _reach_problems(manifest, name, where, user)
        if not manifest.server.fork_instances and python_unreadable(user):  # every instance a fresh interpreter
            problems.append((["server", "fork_instances"], _python_message(user) + " (or fork_instances = true)"))
    return problems


def _reach_problems(manifest: Manifest, name: str, where: list[str], user: RunAs) -> list[Problem]:
    """What of the files eventrun and its functions depend on `user` (run_as `name`) can reach and
    must not (read the manifest; change it, the data_dir, another function's code, eventrun's
    Python), or cannot and must (read its own handler)."""
    own = [f for f, config in manifest.functions.items() if function_user(manifest, config) == name]
    others = [f for f in manifest.functions if f not in own]
    named = f"user {name!r} ({dotted(where)})"
    reads: list[tuple[list[str], str, bool, str]] = []  # where, path, whether it must be readable, the problem
    changes: list[tuple[list[str], str, str]] = []  # where, path, the problem (after "how" it could change it)
    for function in own:
        handler = str(manifest.handler_path(function))
        reads.append((["functions", function, "handler"], handler, True, (
            f"user {name!r} (its run_as) cannot read {handler}: give that user read access to the file, and to"
            " the folders above it"
        )))
    if manifest.path is not None:
        reads.append((where, str(manifest.path), False, (
            f"user {name!r} can read the manifest {manifest.path}, which holds the server's secrets (the ui_token,"
            f" every function's environment): make it readable by the server's user alone (chmod 600 {manifest.path})"
        )))
        changes.append((where, str(manifest.path), (
            f"and so change the manifest {manifest.path} (its own run_as among it) for the server's next start:"
            " keep it, and the folders above it, writable by the server's user alone"
        )))
    changes.append((["server", "data_dir"], str(manifest.data_dir), (
        f"and so put a store of its own in place of the data_dir {manifest.data_dir}, which the server would write"
        " every run to: keep the data_dir, and the folders above it, writable by the server's user alone"
    )))
    for function in others:
        runs_as = _runs_as(manifest, function)
        handler = manifest.handler_path(function)
        for path in (handler.parent, handler):
            changes.append((["functions", function, "handler"], str(path), (
                f"in this function's code (its handler's folder is first on its sys.path): code put there would run"
                f" as {runs_as!r}; let no user but {runs_as!r} and the server's write to that folder, to what it holds"
                " or to the folders above it"
            )))
        for entry in manifest.functions[function].environment.get("PYTHONPATH", "").split(os.pathsep):
            if entry:
                changes.append((["functions", function, "environment"], entry, (
                    f"on this function's PYTHONPATH: code put there would run as {runs_as!r}; let no user but"
                    f" {runs_as!r} and the server's write to it"
                )))
    for entry in sys.path:  # where the server, the spawner and every forked instance import from
        if entry and os.path.isdir(entry):
            changes.append((where, entry, (
                "where eventrun's Python imports from: code put there would run as the server's user, and every"
                " function's; keep it writable by the server's user alone"
            )))
    answers = as_user(user, lambda: (
        [readable(path) for _, path, _, _ in reads],
        [changeable(path) for _, path, _ in changes],
    ))
    if answers is None:  # (it could not become the user: run_as_problems has said why)
        return []
    can_read, how = answers
    problems = [(at, message) for (at, _, wanted, message), yes in zip(reads, can_read) if yes != wanted]
    problems += [(at, f"{named} {done}, {message}") for (at, _, message), done in zip(changes, how) if done]
    unique: dict[tuple[tuple[str, ...], str], Problem] = {}  # (the handler and its folder may say the same)
    for at, message in problems:
        unique.setdefault((tuple(at), message), (at, message))
    return list(unique.values())


def run_as_warnings(manifest: Manifest) -> list[str]:
    """What leaves a function's user less apart than it could be (an API without a ui_token), or
    works only in part (a Python that user cannot read: forked instances run, with only the
    modules the spawner has loaded). For a manifest run_as_problems found nothing wrong in."""
    names = sorted({function_user(manifest, f) for f in manifest.functions.values()} - {""})
    users = {name: user for name in names if (user := run_as(name)) is not None}
    warnings = []
    if users and not manifest.server.ui_token:
        warnings.append(
            f"functions run as {', '.join(map(repr, users))} can call this server's API, which takes no ui_token:"
            " every run's event, result and log, and invoking any function, are open to them; set [server] ui_token"
        )
    for user in users.values():
        if manifest.server.fork_instances and python_unreadable(user):
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
    """The paths `user` cannot read (a file) or list and enter (a folder); all of them should it
    not be possible to ask."""
    answer = as_user(user, lambda: [path for path in paths if not readable(path)])
    return list(paths) if answer is None else answer


def _runs_as(manifest: Manifest, function: str) -> str:
    """The name of the user a function runs as."""
    return function_user(manifest, manifest.functions[function]) or _server_user() or str(os.geteuid())


def _me() -> str:
    """The server's user, for a message: its name and uid."""
    name = _server_user()
    return f"{name!r} (uid {os.geteuid()})" if name else f"uid {os.geteuid()}"


def _server_user() -> str:
    """The name of the user the server runs as ("" if its uid has none)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return ""

