"""What another Unix user can read or change of this machine's files, asked of the kernel as
that user: a child process becomes the user and tries (access(2), stat), so that groups,
ownership, ACLs and the sticky bit count as they would for its own processes."""

from __future__ import annotations

import json
import os
import stat
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .users import RunAs

MOST_ENTRIES = 10_000  # entries of a folder's tree looked at for one a user can write to; past them, no more


def as_user(user: RunAs, question: Callable[[], Any]) -> Any:
    """`question()`, asked in a child process that has become `user` (its answer goes back as JSON);
    None should the child fail to become the user or to answer."""
    answer_r, answer_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # (the child answers and leaves: none of the parent's cleanup runs twice)
        code = 1
        try:
            os.close(answer_r)
            os.setgroups(list(user.groups))
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
            with open(answer_w, "wb") as answer:
                answer.write(json.dumps(question()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(answer_w)
    with open(answer_r, "rb") as answer:
        text = answer.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return None
    return json.loads(text)


def readable(path: str) -> bool:
    """Whether this process may read the file, or list and enter the folder, at `path`."""
    return os.access(path, os.R_OK | os.X_OK if os.path.isdir(path) else os.R_OK)


def changeable(path: str) -> str | None:
    """How this process could change what is at `path` ("can write to P", "can rename P (it can
    write to F)"), or None if it cannot: by writing to it or to anything in its tree, or by putting
    something else in its place through a folder above it. The path as given and the one its
    links lead to are both looked at."""
    absolute = os.path.abspath(path)
    for candidate in dict.fromkeys([absolute, os.path.realpath(absolute)]):
        how = _replaceable(candidate) or _writable_within(candidate)
        if how is not None:
            return how
    return None


def _replaceable(path: str) -> str | None:
    """How a folder above `path` lets this process rename what leads to it, if one does. A folder
    with the sticky bit (as /tmp) lets it rename only what it owns there, or anything if it owns
    the folder."""
    me = os.geteuid()
    folder = "/"
    for name in path.strip("/").split("/"):
        entry = os.path.join(folder, name)
        try:
            held = os.stat(folder)
            owner = os.lstat(entry).st_uid
        except OSError:  # not there, or not to be reached: nothing to rename
            return None
        if os.access(folder, os.W_OK | os.X_OK) and (
            not held.st_mode & stat.S_ISVTX or me in (held.st_uid, owner)
        ):
            return f"can rename {entry} (it can write to {folder})"
        folder = entry
    return None


def _writable_within(path: str) -> str | None:
    """The first file or folder at or below `path` this process may write to, as "can write to P"."""
    if os.access(path, os.W_OK):
        return f"can write to {path}"
    if not os.path.isdir(path):
        return None
    seen = 0
    for folder, folders, files in os.walk(path):
        for name in (*folders, *files):
            entry = os.path.join(folder, name)
            if os.access(entry, os.W_OK):
                return f"can write to {entry}"
            seen += 1
            if seen >= MOST_ENTRIES:
                return None
    return None
