"""The composition root: read the manifest, start the engine and the triggers, stop in order."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import resource
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from eventrun.destinations import Deliverer
from eventrun.engine.core import Engine
from eventrun.engine.errors import EventrunError, ManifestError
from eventrun.engine.failures import FailureLog
from eventrun.engine.manifest import Manifest, Problem, load_manifest, url_host
from eventrun.engine.text import log_to_stderr
from eventrun.engine.undumpable import undumpable
from eventrun.engine.users import run_as_problems, run_as_warnings
from eventrun.triggers.http import HttpTrigger

logger = logging.getLogger("eventrun")

ACCEPT_LOG_EVERY = 5.0
"""Seconds between two lines of the log while the listener cannot accept connections, at least."""

OUT_OF_RESOURCES = "socket.accept() out of system resource"
"""How asyncio reports a connection it cannot accept for want of a descriptor (EMFILE, ENFILE, ENOBUFS, ENOMEM)."""


class Trigger(Protocol):
    """What the composition root needs of a trigger."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def state(self) -> dict[str, Any]: ...
    def metrics(self) -> str: ...


@dataclass
class Wiring:
    """The triggers the manifest asks for, and what they add to the gateway."""

    triggers: dict[str, Trigger] = field(default_factory=dict)
    routes: list[web.AbstractRouteDef] = field(default_factory=list)
    openapi_paths: dict[str, Any] = field(default_factory=dict)


def _trigger_kinds(manifest: Manifest) -> set[str]:
    return {t.type for f in manifest.functions.values() for t in f.triggers}


def serve_problems(manifest: Manifest) -> list[Problem]:
    """What `eventrun serve` finds wrong in a manifest beyond its values: the users functions run
    as, and what the triggers read."""
    return [*run_as_problems(manifest), *trigger_problems(manifest)]


def trigger_problems(manifest: Manifest) -> list[Problem]:
    """What the triggers the manifest asks for find wrong in it, checked as it is read."""
    kinds = _trigger_kinds(manifest)
    problems: list[Problem] = []
    if "kafka" in kinds:
        from eventrun.triggers.kafka import manifest_problems as kafka_problems

        problems += kafka_problems(manifest)
    if "timer" in kinds:
        from eventrun.triggers.timer import manifest_problems as timer_problems

        problems += timer_problems(manifest)
    return problems


def build_triggers(engine: Engine, manifest: Manifest) -> Wiring:
    """Construct (and so validate) every trigger the manifest asks for."""
    kinds = _trigger_kinds(manifest)
    wiring = Wiring()
    triggers = wiring.triggers
    # Imported only when used, so a manifest without Kafka never loads aiokafka.
    # A configured webhook token alone keeps POST /triggers/s3 up: MinIO's queue would
    # block on 404s while no function has an s3 trigger yet.
    if "s3" in kinds or manifest.s3.sqs_queue_url or manifest.s3.webhook_token:
        from eventrun.triggers.s3 import S3Trigger

        s3 = S3Trigger(engine, manifest)
        wiring.routes += s3.routes()
        wiring.openapi_paths.update(s3.openapi_paths())
        triggers["s3"] = s3
    if "kafka" in kinds:
        from eventrun.triggers.kafka import KafkaTrigger

        triggers["kafka"] = KafkaTrigger(engine, manifest)
    if "timer" in kinds:
        from eventrun.triggers.timer import TimerTrigger

        triggers["timer"] = TimerTrigger(engine, manifest)
    return wiring


async def run(manifest: Manifest, stop: asyncio.Event) -> None:
    """Serve until `stop` is set: engine first, intake last; shut down in reverse."""
    async with contextlib.AsyncExitStack() as stack:
        engine = Engine(manifest)
        wiring = build_triggers(engine, manifest)
        http = HttpTrigger(
            engine,
            manifest.server.host,
            manifest.server.port,
            extra_routes=wiring.routes,
            openapi_paths=wiring.openapi_paths,
        )
        stack.push_async_callback(http.stop)  # (done by the engine's stop already, unless that failed)
        await engine.start()
        stack.push_async_callback(engine.stop)
        # The gateway stops inside the engine's stop, once every run has ended and before the
        # store closes: a sync call in flight is answered with its run's end, which the store
        # can still be read for. Before the deliveries' stop, which may take seconds.
        engine.on_stopping(http.stop)
        # Stopped by the engine once its last run has ended, so what the ends owe goes out too.
        deliveries = Deliverer(engine, manifest)
        await deliveries.start()
        engine.add_reporter("deliveries", deliveries.state)
        engine.add_metrics(deliveries.metrics)
        # Reported from the first /healthz on ("stopped" until each has started), so a probe
        # never sees a server that answers without the triggers its manifest declares.
        for name, trigger in wiring.triggers.items():
            engine.add_reporter(name, trigger.state)
            engine.add_metrics(trigger.metrics)
        await http.start()
        for trigger in wiring.triggers.values():
            await trigger.start()
            stack.push_async_callback(trigger.stop)
        # Closed first (callbacks go last in, first out): the gateway takes no new connection
        # while the triggers stop, which may take seconds (a Kafka group rebalancing), and intake
        # has stopped before the engine's stop begins.
        stack.push_async_callback(http.close)
        logger.info(
            "eventrun serving %d functions on http://%s:%s (data in %s)",
            len(manifest.functions),
            url_host(manifest.server.host),
            http.port,
            manifest.data_dir,
        )
        await stop.wait()
        logger.info("stopping: no new events; letting running work finish")


def tune_collector() -> None:
    """Set Python's garbage collector for a server that allocates in bursts (call once, at start).

    What exists at start (modules, the manifest) lives as long as the server, so it is frozen out
    of every later collection. A Kafka batch or a burst of requests makes tens of thousands of
    short-lived containers; with the default first threshold (700) each burst set off dozens of
    collections that promoted the burst into the older generations, whose collections then
    scanned it again. Fewer, larger young collections cost less and free the same garbage.
    """
    gc.freeze()
    gc.set_threshold(20_000, 20, 10)


M_MMAP_THRESHOLD = -3  # (glibc's malloc.h)


def return_large_blocks() -> None:
    """Have glibc's malloc hand every block of 128 KiB or more back to the system once it is freed
    (call once, at start; elsewhere than glibc, nothing is done).

    By default glibc raises that threshold to the largest block freed so far, so after a few large
    answers (a 5 MB result) the next ones come from the heap, which fragments and is seldom given
    back: 40 clients hanging up on a 5 MB result, five times over, grew the server by 20 MB each
    time, for good; with the threshold held, by about 40 MB the first time, then not at all.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 128 * 1024)


RETURN_FREE_EVERY = 30.0
"""Seconds between two hand-backs of the heap's free memory to the system (see return_free_memory)."""


async def return_free_memory(every: float = RETURN_FREE_EVERY) -> None:
    """Hand the heap's free pages back to the system every `every` seconds, for as long as it
    runs (glibc's malloc_trim; elsewhere than glibc, it ends at once).

    Small blocks (a log follower's waiting lines, a burst's requests) come from the heap, and
    what they free in its middle stays the server's: 300 followers that stopped reading a
    chatty run took the server from 54 to 145 MB, and it kept 123 MB once they were let go;
    with this (every 10 s in that measure), it went back to 66 MB. A call takes about 0.5 ms, 10 ms when it has much to return.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    while True:
        await asyncio.sleep(every)
        trim(0)


def raise_open_files_limit() -> None:
    """Raise the soft limit of open files to the hard one (call once, at start), as servers do:
    every connection, run log and instance pipe takes a descriptor, and the usual soft limit
    (1,024) is soon reached under load. Says nothing unless it fails."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        logger.warning("could not raise the limit of open files from %d to %d (%s); keeping %d", soft, hard, exc, soft)


class LoopErrors:
    """The event loop's exception handler: a listener out of descriptors logs a line at most every
    ACCEPT_LOG_EVERY seconds, counting the failures between; every other report goes to the
    loop's default handler.

    Out of descriptors, asyncio (3.11) tries each pending connection again on every pass of its
    accept loop and reports each failure with its traceback: hundreds of thousands of lines a
    minute, with nothing in them the first did not say.
    """

    def __init__(self) -> None:
        self._accepts_failing = FailureLog(logger, every=ACCEPT_LOG_EVERY)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != OUT_OF_RESOURCES:
            loop.default_exception_handler(context)
            return
        self._accepts_failing.log(
            "%s (%s): new connections wait in the listen queue until descriptors are free",
            OUT_OF_RESOURCES, context.get("exception"),
        )


def serve(config_path: Path | None) -> int:
    """`eventrun serve`: run until SIGINT or SIGTERM; exit status for the shell."""
    log_to_stderr(logging.INFO)
    if config_path is None:
        logger.warning(
            "no eventrun.toml in %s and no --config: serving with no functions "
            "(every [server] key can still be set as EVENTRUN_SERVER__KEY)",
            Path.cwd(),
        )
    try:
        manifest = load_manifest(config_path, check=serve_problems)
    except EventrunError as exc:
        print(f"eventrun: {exc}", file=sys.stderr)
        return 2
    for warning in run_as_warnings(manifest):
        logger.warning("%s", warning)

    tune_collector()
    return_large_blocks()
    raise_open_files_limit()
    undumpable()  # (before the store's writer and the spawner start: they are made so too)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(LoopErrors())
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        returning = asyncio.create_task(return_free_memory())
        try:
            await run(manifest, stop)
        finally:
            returning.cancel()

    try:
        asyncio.run(main())
    except ManifestError as exc:  # what the store holds refuses the manifest (an async_execution flipped)
        where = f"{manifest.path}: " if manifest.path else ""
        print(f"eventrun: cannot start: {where}{exc}", file=sys.stderr)
        return 2
    except EventrunError as exc:
        # The manifest was read; what stops the start now is where it points (the store, the
        # data_dir, the node id), which the message names, whether the file or a variable set it.
        print(f"eventrun: cannot start: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"eventrun: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0
