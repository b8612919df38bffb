"""A service the tests start as a local process: its log file, and a stop that always ends it."""

from __future__ import annotations

import subprocess
from pathlib import Path


class LocalProcess:
    """One child process whose output goes to a log file in the test's folder."""

    def __init__(self, log: Path) -> None:
        self._log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self, argv: list[str], *, append: bool = False) -> None:
        """Start the process with stdout and stderr in the log."""
        with open(self._log, "ab" if append else "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        """Terminate the process this object started (kill it if it does not go)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_text(self) -> str:
        """What the process printed."""
        return self._log.read_text(errors="replace") if self._log.exists() else ""
