"""eventrun's own processes keep other processes of their user out (PR_SET_DUMPABLE)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_DUMPABLE is Linux's")

ASK = "import ctypes; print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"  # PR_GET_DUMPABLE


def dumpable_after(code: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\n{ASK}"], capture_output=True, text=True, timeout=30, check=True, cwd=cwd
    )
    return done.stdout.strip().splitlines()[-1]


def test_a_process_is_dumpable_until_it_says_otherwise() -> None:
    assert dumpable_after("pass") == "1"
    assert dumpable_after("from eventrun.engine.undumpable import undumpable; undumpable()") == "0"


def test_the_store_writer_makes_itself_undumpable(monkeypatch: pytest.MonkeyPatch) -> None:
    # It is started afresh (exec makes a process dumpable again), so it must say so itself.
    code = (
        "import eventrun.engine.writer as w, sys\n"
        "w.serve = lambda *args: None\n"
        "w.main(['0', '/nonexistent', '1'])"
    )
    assert dumpable_after(code) == "0"


def test_the_server_makes_itself_undumpable(tmp_path: Path) -> None:
    code = "import eventrun.app as app\nasync def run(manifest, stop): pass\napp.run = run\napp.serve(None)"
    assert dumpable_after(code, cwd=tmp_path) == "0"
