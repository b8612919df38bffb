"""The composition root: read the manifest, start the engine and the triggers, stop in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from eventrun.engine.core import Engine
from eventrun.engine.errors import EventrunError
from eventrun.engine.manifest import Manifest, load_manifest
from eventrun.triggers.http import HttpTrigger

logger = logging.getLogger("eventrun")


async def run(manifest: Manifest, stop: asyncio.Event) -> None:
    """Serve until `stop` is set: engine first, intake last; shut down in reverse."""
    async with contextlib.AsyncExitStack() as stack:
        engine = Engine(manifest)
        await engine.start()
        stack.push_async_callback(engine.stop)
        http = HttpTrigger(engine, manifest.server.host, manifest.server.port)
        await http.start()
        stack.push_async_callback(http.stop)
        logger.info(
            "eventrun serving %d functions on http://%s:%s (data in %s)",
            len(manifest.functions),
            manifest.server.host,
            http.port,
            manifest.data_dir,
        )
        await stop.wait()
        logger.info("stopping: no new events; letting running work finish")


def serve(config_path: Path | None) -> int:
    """`eventrun serve`: run until SIGINT or SIGTERM; exit status for the shell."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        manifest = load_manifest(config_path)
    except EventrunError as exc:
        print(f"eventrun: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run(manifest, stop)

    try:
        asyncio.run(main())
    except EventrunError as exc:
        where = f"{config_path}: " if config_path is not None else ""
        print(f"eventrun: {where}{exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"eventrun: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0
