"""Reports who it runs as, and what of the server it can reach (tests of run_as).

It imports only what a forked instance has loaded already: a user that cannot read the
Python eventrun runs on (one under /root, say) can import nothing more.
"""

import os
import signal


def _try(action) -> str:
    """"ok", or the name of the error the action raised."""
    try:
        action()
    except OSError as exc:
        return type(exc).__name__
    return "ok"


def _data_limit() -> list[str]:
    """RLIMIT_DATA, soft and hard, as /proc/self/limits writes them (bytes, or "unlimited")."""
    with open("/proc/self/limits") as limits:
        line = next(line for line in limits if line.startswith("Max data size"))
    return line.split()[3:5]


def _no_new_privileges() -> str:
    with open("/proc/self/status") as status:
        return next(line for line in status if line.startswith("NoNewPrivs:")).split()[1]


def main_handler(event, context):
    print(f"guest uid={os.getuid()}")
    data = event.get("data") or {}
    targets = data.get("signal", {})
    files = data.get("read", {})
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
        "saved": [os.getresuid()[2], os.getresgid()[2]],
        "groups": sorted(os.getgroups()),
        "env": {name: os.environ.get(name) for name in ("HOME", "USER", "LOGNAME", "GREETING")},
        "cwd": os.getcwd(),
        "data_limit": _data_limit(),
        "signal": {name: _try(lambda pid=pid: os.kill(pid, signal.SIGCONT)) for name, pid in targets.items()},
        "read": {name: _try(lambda path=path: open(path, "rb").close()) for name, path in files.items()},
        "become_root": _try(lambda: os.setuid(0)),
        "no_new_privileges": _no_new_privileges(),
    }
