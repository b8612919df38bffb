"""The code that runs inside an instance: load the handler, run one event at a time.

The parent talks to this process over two pipes. Tasks arrive as JSON lines on a private
copy of stdin; stdout and stderr share one pipe that carries the function's output, and
frames back to the parent are lines marked with a per-instance token on that same pipe, so
output and outcome arrive in the order they happened.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from .envelope import dumps, loads

FRAME_MARK = "\x1eeventrun-frame:"
MAX_RESULT = 6 * 1024 * 1024  # the same bound as an invocation body


def _write_all(data: bytes) -> None:
    """os.write may write part of a large buffer to a pipe; write it all."""
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


@dataclass
class Context:
    """What a handler gets beside the event."""

    request_id: str
    function_name: str
    deadline: float  # epoch seconds
    logger: logging.Logger = field(repr=False)
    memory_limit_in_mb: int | None = None

    def remaining_time(self) -> float:
        """Seconds left before the run is stopped."""
        return max(0.0, self.deadline - time.time())

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left, for code written against other platforms."""
        return int(self.remaining_time() * 1000)


class _Worker:
    def __init__(self, handler: str, function: str, token: str, tasks: int) -> None:
        self.handler_spec = handler
        self.function = function
        self.mark = (FRAME_MARK + token + " ").encode()
        self.tasks = os.fdopen(tasks, "rb")
        self.handler: Callable[..., Any] | None = None
        self.logger = logging.getLogger(f"eventrun.function.{function}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        self.logger.addHandler(stream)

    def frame(self, payload: dict[str, Any]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        _write_all(self.mark + dumps(payload) + b"\n")

    def load(self) -> Callable[..., Any]:
        if self.handler is None:
            path_text, _, name = self.handler_spec.rpartition(":")
            path = Path(path_text)
            sys.path.insert(0, str(path.parent))
            spec = importlib.util.spec_from_file_location(f"eventrun_handler_{path.stem}", path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load handler file {path}")
            module: ModuleType = importlib.util.module_from_spec(spec)
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
            if inspect.isawaitable(outcome):
                import asyncio  # here, not at the top: it would add a third to every instance's start

                outcome = asyncio.run(_awaited(outcome))
        except BaseException as exc:  # SystemExit too: the run failed, the parent decides
            # Skip this frame: the user's traceback starts at their handler.
            traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next if exc.__traceback__ else None)
            self.frame({"ok": False, "error_type": type(exc).__name__, "error_message": str(exc), "recycle": True})
            return
        try:
            encoded = dumps(outcome)
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
                self.run_one(loads(line))


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _watch_parent(parent: int) -> None:
    """End this instance and its process group when the server is gone (e.g. kill -9).

    The instance runs in a process group of its own, so the server's death reaches it only
    through this watch; its runs are recorded FAILED on restart and must not go on unseen.
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


if __name__ == "__main__":
    main()
