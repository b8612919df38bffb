"""The code that runs inside an instance: load the handler, run one event at a time.

The parent talks to this process over two pipes. Tasks arrive as JSON lines on a private
copy of stdin; stdout and stderr share one pipe that carries the function's output, and
frames back to the parent are lines marked with a per-instance token on that same pipe, so
output and outcome arrive in the order they happened.

The same file, run with --spawner, is the process instances are forked from (see spawner()).
"""

from __future__ import annotations

# Every instance start pays for what is imported here, so this module imports only what every
# run needs. The rest comes when used: logging with the first use of context.logger, orjson
# with the first result other than None, traceback with the first error, asyncio with the
# first async handler. It runs as a script, outside the eventrun package, so the package (and
# whatever it imports) is not loaded either.
import json
import os
import signal
import sys
import threading
import time

TYPE_CHECKING = False  # typing itself is not imported: it would cost every start a few ms
if TYPE_CHECKING:
    import logging
    from typing import Any, Callable

FRAME_MARK = "\x1eeventrun-frame:"
MAX_RESULT = 6 * 1024 * 1024  # the same bound as an invocation body


def _write_all(data: bytes) -> None:
    """os.write may write part of a large buffer to a pipe; write it all."""
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


class Context:
    """What a handler gets beside the event."""

    __slots__ = ("request_id", "function_name", "deadline", "memory_limit_in_mb", "_logger")

    def __init__(self, request_id: str, function_name: str, deadline: float, logger: Callable[[], logging.Logger]) -> None:
        self.request_id = request_id
        self.function_name = function_name
        self.deadline = deadline  # epoch seconds
        self.memory_limit_in_mb: int | None = None
        self._logger = logger

    def __repr__(self) -> str:
        return (
            f"Context(request_id={self.request_id!r}, function_name={self.function_name!r}, "
            f"deadline={self.deadline!r}, memory_limit_in_mb={self.memory_limit_in_mb!r})"
        )

    @property
    def logger(self) -> logging.Logger:
        """A logger whose lines go to the run's log (INFO and above)."""
        return self._logger()

    def remaining_time(self) -> float:
        """Seconds left before the run is stopped."""
        return max(0.0, self.deadline - time.time())

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left, for code written against other platforms."""
        return int(self.remaining_time() * 1000)


def _frame_json(payload: dict[str, Any]) -> bytes:
    """A frame's JSON: text and flags only, which the standard library writes as well as orjson."""
    # A lone surrogate (it can come with an exception's message) becomes "?": the parent's
    # parser accepts only valid UTF-8.
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")


def _result_json(value: Any) -> bytes:
    """A result's JSON, by eventrun's own rules (orjson, non-string keys allowed); TypeError if it has none."""
    if value is None:
        return b"null"
    import orjson

    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


class _Worker:
    def __init__(self, handler: str, function: str, token: str, tasks: int) -> None:
        self.handler_spec = handler
        self.function = function
        self.mark = (FRAME_MARK + token + " ").encode()
        self.tasks = os.fdopen(tasks, "rb")
        self.handler: Callable[..., Any] | None = None
        self._logger: logging.Logger | None = None

    def logger(self) -> logging.Logger:
        if self._logger is None:
            import logging

            logger = logging.getLogger(f"eventrun.function.{self.function}")
            logger.setLevel(logging.INFO)
            logger.propagate = False
            stream = logging.StreamHandler(sys.stderr)
            stream.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
            logger.addHandler(stream)
            self._logger = logger
        return self._logger

    def frame(self, payload: dict[str, Any]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        _write_all(self.mark + _frame_json(payload) + b"\n")

    def load(self) -> Callable[..., Any]:
        if self.handler is None:
            import importlib.util

            path, _, name = self.handler_spec.rpartition(":")
            sys.path.insert(0, os.path.dirname(path))
            stem = os.path.splitext(os.path.basename(path))[0]
            spec = importlib.util.spec_from_file_location(f"eventrun_handler_{stem}", path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load handler file {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            handler = getattr(module, name, None)
            if not callable(handler):
                raise AttributeError(f"handler file {path} has no callable {name!r}")
            self.handler = handler
        return self.handler

    def run_one(self, task: dict[str, Any]) -> None:
        context = Context(
            request_id=task["request_id"],
            function_name=self.function,
            deadline=task["deadline"],
            logger=self.logger,
        )
        try:
            handler = self.load()
            outcome = handler(task["event"], context)
            if _maybe_awaitable(outcome):
                import asyncio
                import inspect

                if inspect.isawaitable(outcome):
                    outcome = asyncio.run(_awaited(outcome))
        except BaseException as exc:  # SystemExit too: the run failed, the parent decides
            import traceback

            # Skip this frame: the user's traceback starts at their handler.
            traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next if exc.__traceback__ else None)
            self.frame({"ok": False, "error_type": type(exc).__name__, "error_message": str(exc), "recycle": True})
            return
        try:
            encoded = _result_json(outcome)
        except TypeError as exc:
            self.frame(
                {
                    "ok": False,
                    "error_type": "ResultNotSerializable",
                    "error_message": f"the handler's return value is not JSON-serialisable: {exc}",
                    "recycle": False,
                }
            )
            return
        if len(encoded) > MAX_RESULT:
            self.frame(
                {
                    "ok": False,
                    "error_type": "ResultTooLarge",
                    "error_message": f"the handler's result is {len(encoded)} bytes; the limit is {MAX_RESULT}",
                    "recycle": False,
                }
            )
            return
        sys.stdout.flush()
        sys.stderr.flush()
        _write_all(self.mark + b'{"ok":true,"result":' + encoded + b"}\n")

    def serve(self) -> None:
        for line in self.tasks:
            if line.strip():
                self.run_one(json.loads(line))


def _maybe_awaitable(value: Any) -> bool:
    """Cheap and never wrong the other way: everything inspect.isawaitable accepts passes."""
    return hasattr(value, "__await__") or type(value).__name__ == "generator"


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _watch_parent(parent: int) -> None:
    """End this instance and its process group when its parent is gone (e.g. kill -9).

    The parent is the server, or the spawner the server forks instances from (which ends its
    instances when the server is gone). The instance runs in a process group of its own, so
    that death reaches it only through this watch; its runs are recorded FAILED on restart
    and must not go on unseen.
    """
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os.killpg(os.getpgrp(), signal.SIGKILL)


def main() -> None:
    """Entry point of an instance process."""
    handler, function, token = sys.argv[1:4]
    threading.Thread(target=_watch_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
    # Tasks come on a private copy of stdin; the handler sees an empty stdin.
    tasks = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    _Worker(handler, function, token, tasks).serve()


# -- the spawner ----------------------------------------------------------------------------
#
# A fresh interpreter costs every instance 30 ms or more of CPU before it can load its handler.
# The spawner is one interpreter, started once by the server, that has done that already: it
# forks each instance on request and the child becomes the worker above, with the function's
# own process group, standard streams, folder and environment. The server and the spawner
# talk over a SOCK_SEQPACKET socket: one JSON message each way per request, the instance's two
# pipe ends passed along; the spawner also reports each instance's exit status, as only the
# parent of a process can learn it.

_SPAWN_MESSAGE = 1 << 20  # a request's size bound: the environment is most of it


def spawner(control: int) -> None:
    """Fork instances on request until the server closes its end, then end every instance left."""
    import select
    import socket

    sock = socket.socket(fileno=control)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # the wake-up byte is what counts
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # shutdown comes from the server, not a terminal
    children: set[int] = set()

    def send(message: dict[str, Any]) -> None:
        try:
            sock.send(json.dumps(message).encode())
        except OSError:
            pass  # the server is gone; the loop ends at the next read

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            send({"exit": pid, "code": os.waitstatus_to_exitcode(status)})

    control = sock.fileno()
    while True:
        ready, _, _ = select.select([control, wake_r], [], [])
        if wake_r in ready:
            while True:
                try:
                    if not os.read(wake_r, 512):
                        break
                except BlockingIOError:
                    break
            reap()
        if control not in ready:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(sock, _SPAWN_MESSAGE, 2)
        except OSError:
            data, fds = b"", []
        if not data:
            break  # the server is gone (or closed its end to stop us)
        request = json.loads(data)
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            send({"id": request["id"], "error": f"{type(exc).__name__}: {exc}"})
            continue
        if pid == 0:
            # The instance. Leaving by SystemExit (never back into this loop) lets the
            # interpreter shut down as usual: atexit handlers run, streams are flushed.
            signal.set_wakeup_fd(-1)
            sock.close()
            os.close(wake_r)
            os.close(wake_w)
            raise SystemExit(_become_instance(request, fds))
        for fd in fds:
            os.close(fd)
        children.add(pid)
        send({"id": request["id"], "pid": pid})
        reap()
    for pid in children:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def _become_instance(request: dict[str, Any], fds: list[int]) -> int | str | None:
    """In a child of the spawner: take the instance's place, run the worker, give its exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setsid()  # its own process group, as a started instance has
    tasks_in, output = fds
    os.dup2(tasks_in, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    time.tzset()  # TZ may differ from the spawner's
    sys.argv = [__file__, request["handler"], request["function"], request["token"]]
    try:
        main()
    except SystemExit as exc:
        return exc.code
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--spawner"]:
        spawner(int(sys.argv[2]))
    else:
        main()
