"""The dispatcher: a FIFO per function, per-function concurrency, a global cap, a QPS window per function."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from typing import Awaitable, Callable, Mapping

from .errors import Throttled

logger = logging.getLogger(__name__)

Execute = Callable[[str, str], Awaitable[None]]


class QpsWindow:
    """At most `rate` events in any one second: the times of those of the last second are kept
    (at most `rate` of them), and an event is let in while fewer than `rate` are. A token bucket
    refilled at `rate` a second with a burst of `rate` would let in up to twice that in one second."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._taken: collections.deque[float] = collections.deque()  # monotonic times, oldest first

    def take(self) -> float:
        """0.0 if the event may go in (it is counted), else the seconds until one may."""
        now = time.monotonic()
        taken = self._taken
        while taken and now - taken[0] >= 1.0:
            taken.popleft()
        if len(taken) < self.rate:
            taken.append(now)
            return 0.0
        return taken[len(taken) - self.rate] + 1.0 - now

    def give_back(self) -> None:
        """Count the last event let in as never taken (it was a repeat)."""
        if self._taken:
            self._taken.pop()


class Dispatcher:
    """Decides which queued run starts next; `execute` does the running."""

    def __init__(
        self,
        *,
        concurrency: Mapping[str, int],
        qps_limits: Mapping[str, int],
        max_running: int,
        execute: Execute,
    ) -> None:
        self._concurrency = dict(concurrency)
        self._windows = {name: QpsWindow(limit) for name, limit in qps_limits.items()}
        self._limits = dict(qps_limits)
        self._max_running = max_running
        self._execute = execute
        self._queues: dict[str, collections.deque[str]] = {name: collections.deque() for name in concurrency}
        self._running: dict[str, int] = {name: 0 for name in concurrency}
        self._holding: set[str] = set()  # runs that hold a slot (see release)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._turn = 0
        self._paused = False
        self._held: asyncio.TimerHandle | None = None  # start nothing until it fires (see retry_later)

    # -- intake ----------------------------------------------------------------------------

    def throttle(self, function: str) -> None:
        """Take one QPS token for the function or raise Throttled."""
        window = self._windows[function]
        wait = window.take()
        if wait:
            share = window.rate if window.rate != self._limits[function] else None
            raise Throttled(function, self._limits[function], max(1.0, math.ceil(wait)), share=share)

    def give_back(self, function: str) -> None:
        """Return the QPS token an event took that turned out to be a repeat of one accepted before."""
        self._windows[function].give_back()

    def share_qps(self, shares: Mapping[str, int]) -> None:
        """Allow each function only this node's share of its qps_limit (several nodes on one store)."""
        for function, share in shares.items():
            self._windows[function].rate = share

    def free(self, function: str) -> int:
        """How many more runs of the function could start here now."""
        if self._paused or self._held is not None:
            return 0
        waiting = sum(map(len, self._queues.values()))
        here = self._concurrency[function] - self._running[function] - len(self._queues[function])
        return max(0, min(here, self._max_running - len(self._holding) - waiting))

    def submit(self, function: str, *request_ids: str) -> None:
        """Queue runs (FIFO per function) and start what can start."""
        self._queues[function].extend(request_ids)
        self._pump()

    def can_start(self, function: str) -> bool:
        """Whether a run of the function would start at once: a slot is free and none of its runs waits."""
        return (
            not self._paused
            and not self._queues[function]
            and len(self._holding) < self._max_running
            and self._running[function] < self._concurrency[function]
        )

    def start_now(self, function: str, request_id: str) -> None:
        """Start a run that was never queued; only right after can_start() said it would."""
        if not self.can_start(function):
            raise RuntimeError(f"start_now({function!r}) without a free slot, or past a run that waits")
        self._start(function, request_id)

    def take_queued(self) -> list[str]:
        """Every run waiting for a slot, taken out of the queues (to hand back at shutdown)."""
        taken = [request_id for queue in self._queues.values() for request_id in queue]
        for queue in self._queues.values():
            queue.clear()
        return taken

    def retry_later(self, function: str, request_id: str, after: float) -> None:
        """Put a run that could not start back at the head of its queue, and start no run for
        `after` seconds (the store refused its start: the next would fare no better)."""
        self._queues[function].appendleft(request_id)
        if self._held is not None:
            self._held.cancel()
        self._held = asyncio.get_running_loop().call_later(after, self._unhold)

    def _unhold(self) -> None:
        self._held = None
        self._pump()

    def remove(self, function: str, request_id: str) -> bool:
        """Drop a run that has not started yet; False if it is no longer queued (or, with a shared
        store, its function is not in this node's manifest: it was never queued here)."""
        queue = self._queues.get(function)
        if queue is None:
            return False
        try:
            queue.remove(request_id)
        except ValueError:
            return False
        return True

    def knows(self, request_id: str) -> bool:
        """Whether the run waits in a queue here or is going on (a pass over the queues: rarely asked)."""
        return request_id in self._tasks or any(request_id in queue for queue in self._queues.values())

    # -- counters --------------------------------------------------------------------------

    def queued(self, function: str) -> int:
        """Runs of the function waiting for a slot (none of a function this node does not serve)."""
        return len(self._queues.get(function, ()))

    def running(self, function: str) -> int:
        """Runs of the function going on (none of a function this node does not serve)."""
        return self._running.get(function, 0)

    @property
    def total_running(self) -> int:
        """Runs going on across functions."""
        return len(self._holding)

    def release(self, function: str, request_id: str) -> None:
        """The run is over but for recording its end: its slot goes to the next run now.

        Recording the end waits for a commit; the next run's start waits for one too. Released
        here, both go in the same commit instead of one after the other.
        """
        if request_id in self._holding:
            self._holding.discard(request_id)
            self._running[function] -= 1
            self._pump()

    # -- lifecycle -------------------------------------------------------------------------

    def pause(self) -> None:
        """Start nothing new (shutdown)."""
        self._paused = True

    async def drain(self, grace: float) -> set[str]:
        """Wait up to `grace` seconds for running runs; return the RequestIds still running."""
        tasks = set(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        return {rid for rid, task in self._tasks.items() if not task.done()}

    async def cancel_all(self, grace: float) -> None:
        """Cancel the runs still going, and wait for every run to record its end.

        A run that has released its slot is only recording its end: it is not cancelled, unless
        that takes longer than `grace` seconds (the store refusing it).
        """
        tasks = list(self._tasks.values())
        for request_id, task in self._tasks.items():
            if request_id in self._holding:
                task.cancel()
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=grace)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def task(self, request_id: str) -> asyncio.Task[None] | None:
        """The task running a run, if it runs."""
        return self._tasks.get(request_id)

    # -- scheduling ------------------------------------------------------------------------

    def _pump(self) -> None:
        if self._paused or self._held is not None:
            return
        names = list(self._queues)
        while len(self._holding) < self._max_running:
            started = False
            for offset in range(len(names)):
                name = names[(self._turn + offset) % len(names)]
                queue = self._queues[name]
                if queue and self._running[name] < self._concurrency[name]:
                    self._turn = (self._turn + offset + 1) % len(names)
                    self._start(name, queue.popleft())
                    started = True
                    break
            if not started:
                return

    def _start(self, function: str, request_id: str) -> None:
        self._running[function] += 1
        self._holding.add(request_id)
        task = asyncio.create_task(self._run(function, request_id), name=f"run-{request_id}")
        self._tasks[request_id] = task

    async def _run(self, function: str, request_id: str) -> None:
        try:
            await self._execute(function, request_id)
        except asyncio.CancelledError:
            self._paused = True  # cancelled means shutting down: start nothing in its place
            raise
        except Exception:
            logger.exception("run %s of %s crashed inside eventrun", request_id, function)
        finally:
            del self._tasks[request_id]
            self.release(function, request_id)  # if _execute has not already
