"""Keep a process's memory, descriptors and environment from other processes of its user."""

from __future__ import annotations

import ctypes
import sys

_PR_SET_DUMPABLE = 4


def undumpable() -> None:
    """Make this process non-dumpable (Linux; elsewhere, nothing).

    Functions run as the server's user. A process of that user may otherwise open another's
    /proc/PID/fd (and write to its pipes), /mem and /environ (and read its secrets, the
    ui_token among them), or ptrace it; of a non-dumpable process only root may. It writes no
    core dump either. (Profilers and debuggers that attach, py-spy or gdb, then need root.)
    """
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass
