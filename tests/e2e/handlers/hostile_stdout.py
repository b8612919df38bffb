"""Closes or steals its standard output, then ends well (or, having closed everything, never)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """data["how"]: "os" closes fds 1 and 2; "sys" closes sys.stdout and sys.stderr;
    "steal" closes fd 1 and opens data["file"] in its place, so fd 1 is that file; "all"
    closes every fd but stdin, whatever eventrun's worker holds, then sleeps for an hour."""
    data = event.get("data") or {}
    print(f"hostile_stdout {data['how']} pid={os.getpid()}", flush=True)
    if data["how"] == "os":
        os.close(1)
        os.close(2)
    elif data["how"] == "sys":
        sys.stdout.close()
        sys.stderr.close()
    elif data["how"] == "steal":
        os.close(1)
        fd = os.open(data["file"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        assert fd == 1, fd
    elif data["how"] == "all":
        os.closerange(1, 1024)
        time.sleep(3600)
    return {"pid": os.getpid(), "how": data["how"]}
