"""A handler that cannot be loaded (a syntax error, an exception or a missing package at import,
no such callable) fails each run with HandlerLoadFailed, which names the cause; the run's log
has the traceback from the function's own code on; the server's log says so once; and once the
code is fixed, the next run finishes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

GOOD = "def main_handler(event, context):\n    return 'loaded'\n"


@pytest.mark.parametrize(
    ("source", "callable_name", "cause", "in_log"),
    [
        ("def main_handler(event, context):\n    return 1 +\n", "main_handler", "SyntaxError: invalid syntax (broken.py, line 2)", "    return 1 +"),
        ("import helper_that_is_not_there\n", "main_handler", "ModuleNotFoundError: No module named 'helper_that_is_not_there'", 'broken.py", line 1, in <module>'),
        ("raise RuntimeError('no config')\n", "main_handler", "RuntimeError: no config", 'broken.py", line 1, in <module>'),
        (GOOD, "nosuch", "AttributeError: handler file {path} has no callable 'nosuch'", "AttributeError: handler file"),
    ],
    ids=["syntax", "missing-package", "raises-at-import", "no-such-callable"],
)
async def test_a_handler_that_cannot_be_loaded_fails_its_runs_saying_why(
    eventrun_server, http, tmp_path: Path, source: str, callable_name: str, cause: str, in_log: str
) -> None:
    path = tmp_path / "fn" / "broken.py"
    path.parent.mkdir()
    path.write_text(source)
    server = eventrun_server({"broken": {"handler": f"{path}:{callable_name}"}})
    api = server.client(http)
    states = [await api.wait_ended(await api.accepted("broken", {})) for _ in range(2)]
    expected = f"the handler {path}:{callable_name} could not be loaded: {cause.format(path=path)}"
    for state in states:
        assert (state["Status"], state["ErrorType"], state["ErrorMessage"]) == ("FAILED", "HandlerLoadFailed", expected), state
    log = await api.logs(states[0]["RequestId"])
    assert in_log in log, log
    assert "worker.py" not in log and "<frozen importlib" not in log, "the traceback starts in the function's code"
    said = f"function broken: {expected}; its runs fail until its code is fixed"
    assert server.stderr_text().count(said) == 1, server.stderr_text()

    path.write_text(GOOD.replace("main_handler", callable_name))
    later = time.time() + 10  # (the cached bytecode is checked by the second)
    os.utime(path, (later, later))
    fixed = await api.wait_ended(await api.accepted("broken", {}))
    assert (fixed["Status"], fixed["Result"]) == ("FINISHED", "loaded"), fixed
    assert "function broken: its handler is loaded again" in server.stderr_text()
