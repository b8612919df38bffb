"""A long-running stand-in for video transcoding: works for N seconds, logging progress."""

from __future__ import annotations

import os
import time
from pathlib import PurePosixPath
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Pretend to transcode data["file"] for data["seconds"] seconds (default 30)."""
    data = event.get("data")
    data = data if isinstance(data, dict) else {}
    file = str(data.get("file", "video.mp4"))
    seconds = int(data.get("seconds", 30))
    if seconds < 0:
        # A clear exception ends the run FAILED with this message as its ErrorMessage.
        raise ValueError(f"seconds must be 0 or more, got {seconds}")

    # MODE comes from the manifest: [functions.transcode] environment = { MODE = "fast" }.
    mode = os.environ.get("MODE", "default")
    log = context.logger
    log.info("transcoding %s in %s mode for %d s (%.0f s left before the timeout)",
             file, mode, seconds, context.remaining_time())

    for done in range(1, seconds + 1):
        time.sleep(1)  # the real work would go here; one progress line per second
        # Lines appear in `eventrun logs ID --follow` while the run is still going.
        log.info("transcoding %s: %d/%d s (%d%%)", file, done, seconds, done * 100 // seconds)

    output = str(PurePosixPath("transcoded") / f"{PurePosixPath(file).stem}-{mode}.mp4")
    log.info("done: %s", output)
    return {"file": file, "seconds": seconds, "output": output}
