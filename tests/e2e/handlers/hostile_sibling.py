"""Makes a process its instance's sibling, not its child (clone with CLONE_PARENT): the new
process's parent is the instance's parent, the spawner, so the instance never sees it."""

from __future__ import annotations

import ctypes
import os
from typing import Any

_CLONE = 56  # the clone system call's number on x86_64
_CLONE_PARENT = 0x00008000
_SIGCHLD = 17


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Start `sleep 120` as a sibling of this instance, in a session of its own; return its pid."""
    pid = ctypes.CDLL(None, use_errno=True).syscall(_CLONE, _CLONE_PARENT | _SIGCHLD, 0, 0, 0, 0)
    if pid == 0:
        os.setsid()
        os.execv("/bin/sleep", ["sleep", "120"])
    return {"sibling": pid, "pid": os.getpid(), "ppid": os.getppid()}
