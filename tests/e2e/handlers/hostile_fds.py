"""Closes or replaces file descriptors it did not open (eventrun's worker holds some), then ends well."""

from __future__ import annotations

import os
import sys
from typing import Any

TOP = 4096


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """data["how"]:

    "close": close every fd from 3 up (stdin, stdout and stderr stay as they are);
    "null": put /dev/null in place of every open fd from 3 up;
    "reuse": close them, then open data["file"] for writing until it holds the lowest ones;
    "everything": close every fd but stdin, so that nothing can carry its outcome (and print nothing);
    "stdin-sys": close sys.stdin; "stdin-os": close fd 0;
    "read": read stdin (the next run's check that it is still usable);
    anything else: nothing.
    """
    data = event.get("data") or {}
    how = data.get("how")
    print(f"hostile_fds {how} pid={os.getpid()}", flush=True)
    if how == "close":
        os.closerange(3, TOP)
    elif how == "null":
        null = os.open(os.devnull, os.O_RDWR)
        for fd in map(int, os.listdir("/proc/self/fd")):
            if fd >= 3 and fd != null:
                try:
                    os.dup2(null, fd)
                except OSError:  # the listing's own fd, closed since
                    pass
    elif how == "reuse":
        os.closerange(3, TOP)
        for _ in range(8):
            os.open(data["file"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    elif how == "everything":
        os.closerange(1, TOP)
    elif how == "stdin-sys":
        sys.stdin.close()
    elif how == "stdin-os":
        os.close(0)
    if how != "everything":
        print("x")
    read = sys.stdin.read() if how == "read" else None
    return {"pid": os.getpid(), "how": how, "read": read}
