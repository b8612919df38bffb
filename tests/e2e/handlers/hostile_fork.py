"""Leaves processes behind: a plain child, and a daemon double-forked into a session of its own
that lets go of every file it inherited (the instance's pipes included), as daemons do."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


def _sleep_forever() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # it means to outlive the run
    while True:
        time.sleep(60)


def _child() -> int:
    pid = os.fork()
    if pid == 0:
        _sleep_forever()
    return pid


def _let_go_of_files() -> None:
    """Standard streams on /dev/null, every other descriptor closed: nothing ties it to the instance."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))


def _daemon() -> int:
    """The classic double fork: the daemon ends up in a new session, its parent gone."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.setsid()
        grandchild = os.fork()
        if grandchild == 0:
            _let_go_of_files()
            _sleep_forever()
        os.write(write, str(grandchild).encode())
        os._exit(0)
    os.close(write)
    daemon = int(os.read(read, 64))
    os.close(read)
    os.waitpid(pid, 0)
    return daemon


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Start both, write their pids to data["pidfile"], then end as data["then"] says (with
    data["subreaper_off"], after turning off the instance's PR_SET_CHILD_SUBREAPER; with
    data["daemon_only"], the daemon alone).

    "return" (the default), "raise", "sleep" (until killed at the timeout) or "abort".
    """
    data = event.get("data") or {}
    if data.get("subreaper_off"):  # the instance no longer inherits what this run leaves behind
        import ctypes

        ctypes.CDLL(None).prctl(36, 0, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    pids = [_daemon()] if data.get("daemon_only") else [_child(), _daemon()]
    with open(data["pidfile"], "w") as file:
        file.write(" ".join(map(str, pids)))
    print(f"hostile_fork left {pids} behind", flush=True)
    then = data.get("then", "return")
    if then == "raise":
        raise RuntimeError("hostile_fork fails on purpose")
    if then == "sleep":
        time.sleep(3600)
    if then == "abort":
        os.abort()
    return {"pids": pids, "pid": os.getpid()}
