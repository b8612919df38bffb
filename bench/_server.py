"""Server start-up shared by the benchmarks: `eventrun serve` and a bare aiohttp baseline.

Each server runs in a subprocess of its own session, so Ctrl-C reaches only the benchmark
(which then stops the server in order) and killpg() reaches whatever the server started.
Run as a script, `python bench/_server.py --bare PORT` is the bare aiohttp server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0  # longer than eventrun's default shutdown_grace (10s)

NOOP_HANDLER = '''\
"""Does nothing: the benchmark measures what eventrun spends around a run."""


def main_handler(event, context):
    """Return at once."""
    return None
'''

RUNS_TOTAL = re.compile(r'^eventrun_runs_total\{function="([^"]+)",status="([A-Z_]+)"\} (\d+)$', re.MULTILINE)


class ServerFailed(Exception):
    """A server exited or did not answer in time (its last output is in the message)."""


def run_measure(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a measure in its own event loop; SIGTERM or Ctrl-C end it as KeyboardInterrupt
    (so the caller's `finally` stops the servers in order)."""

    async def measured() -> T:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await coroutine

    try:
        return asyncio.run(measured())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        # Closing the loop reset SIGTERM to its default, which would skip stopping the servers.
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(log: Path, lines: int = 30) -> str:
    """The last lines a server wrote."""
    text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
    return textwrap.indent("\n".join(text) or "(no output)", "    ")


def eventrun_argv(manifest: Path) -> list[str]:
    """The command that starts `eventrun serve` with this interpreter."""
    # Calling main() works whether or not eventrun/cli.py has a __main__ guard.
    code = "import sys; from eventrun.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, "serve", "--config", str(manifest)]


def bare_argv(port: int, *, relay: bool = False) -> list[str]:
    """The command that starts the bare aiohttp server of run_bare_server()."""
    return [sys.executable, str(Path(__file__).resolve()), "--relay" if relay else "--bare", str(port)]


def launch(argv: list[str], cwd: Path, log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a server in a session of its own, its output in `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def wait_ready(name: str, proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = READY_TIMEOUT) -> None:
    """Poll `url` until it answers 200; ServerFailed with the server's output if it dies or hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerFailed(f"{name} exited with status {proc.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise ServerFailed(f"{name} did not answer {url} within {timeout:.0f}s:\n{tail(log)}")


def stop(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM for an ordered shutdown; SIGKILL the whole group if it does not end in time."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    # Leftovers (eventrun's worker instances) share the group even after the server ended.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def server_process(
    name: str,
    argv: list[str],
    port: int,
    cwd: Path,
    log: Path,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = READY_TIMEOUT,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run a server until /healthz answers; yield its base URL and process; stop it on exit."""
    proc = launch(argv, cwd, log, env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(name, proc, f"{base}/healthz", log, ready_timeout)
        yield base, proc
    finally:
        stop(proc)


@contextlib.contextmanager
def eventrun_server(
    folder: Path, manifest: str, handlers: Mapping[str, str], env: Mapping[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`eventrun serve` in `folder`: the handler files written, `manifest` formatted with {port}."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    for filename, source in handlers.items():
        (folder / filename).write_text(source)
    path = folder / "eventrun.toml"
    path.write_text(manifest.format(port=port))
    with server_process("eventrun serve", eventrun_argv(path), port, folder, folder / "eventrun.log", env) as served:
        yield served


@contextlib.contextmanager
def data_dir(work: Path, parent: Path | None) -> Iterator[Path]:
    """A data_dir for a server: in the work folder, or a fresh folder under `parent` removed on exit.

    A parent on tmpfs (/dev/shm) takes the disk's flushes out of the figures, to see what they cost.
    """
    if parent is None:
        yield work / "eventrun-data"
        return
    folder = Path(tempfile.mkdtemp(prefix="eventrun-bench-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def runs_total(metrics: str, function: str) -> Counter[str]:
    """Ended runs of a function by final status, from a /metrics text."""
    return Counter({status: int(n) for name, status, n in RUNS_TOTAL.findall(metrics) if name == function})


# --- what a process costs ----------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # the fields after the command name


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a live process has used (0.0 once it is gone)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / _TICK if fields else 0.0


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and int(fields[1]) == pid:
                found.append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`."""
    found, todo = [], [pid]
    while todo:
        below = children(todo.pop())
        found += below
        todo += below
    return found


def cmdline(pid: int) -> str:
    """A process's command line, spaces between the arguments ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def eventrun_cpu(server: int) -> dict[str, float]:
    """CPU seconds of an `eventrun serve` process, its store writer, and its instances (with the spawner)."""
    parts = {"server": cpu_seconds(server), "writer": 0.0, "instances": 0.0}
    for pid in descendants(server):
        key = "writer" if "eventrun.engine.writer" in cmdline(pid) else "instances"
        parts[key] += cpu_seconds(pid)
    return parts


def require_eventrun() -> None:
    """Exit with a clear message when eventrun cannot be imported by this interpreter."""
    import importlib.util

    if importlib.util.find_spec("eventrun.cli") is None:
        raise SystemExit("eventrun is not importable here; run with the Python eventrun is installed in")


# --- the bare baseline ---------------------------------------------------------------------


ECHO_CHILD = """\
import socket, sys
peer = socket.socket(fileno=int(sys.argv[1]))
while data := peer.recv(65536):
    peer.sendall(data)
"""


def run_bare_server(port: int, *, relay: bool = False) -> None:
    """The baseline: aiohttp answering 202 with a fresh RequestId, nothing stored.

    `relay`: the handler first sends the body to a child process over a socket and awaits it
    back (asyncio streams), one request at a time: the least a server that runs each call in
    another process does beyond HTTP.
    """
    from aiohttp import web

    async def invoke(request: web.Request) -> web.Response:
        body = await request.read()  # take the body off the wire, as any real server must
        if relay:
            async with hand_off:
                child_writer.write(body)
                await child_reader.readexactly(len(body))
        request_id = str(uuid.uuid4())
        return web.json_response({"RequestId": request_id}, status=202, headers={"X-Request-Id": request_id})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"Status": "ok"})

    async def serve() -> None:
        nonlocal child_reader, child_writer
        if relay:
            ours, theirs = socket.socketpair()
            child = subprocess.Popen([sys.executable, "-c", ECHO_CHILD, str(theirs.fileno())], pass_fds=[theirs.fileno()])
            theirs.close()
            child_reader, child_writer = await asyncio.open_unix_connection(sock=ours)
        app = web.Application()
        app.router.add_post("/functions/{name}/invocations", invoke)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopped.set)
        try:
            await stopped.wait()
        finally:
            await runner.cleanup()
            if relay:
                child_writer.close()
                child.wait(5)

    child_reader: asyncio.StreamReader
    child_writer: asyncio.StreamWriter
    hand_off = asyncio.Lock()
    asyncio.run(serve())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the bare aiohttp server of the benchmarks")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--bare", type=int, metavar="PORT")
    which.add_argument("--relay", type=int, metavar="PORT", help="the bare server, each call relayed through a child process")
    args = parser.parse_args()
    run_bare_server(args.bare if args.bare is not None else args.relay, relay=args.relay is not None)
