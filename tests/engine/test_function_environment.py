"""What a function's processes find in their environment."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from eventrun.engine.api import Status
from eventrun.engine.core import Engine
from eventrun.engine.envelope import Envelope

SHOW_ENVIRONMENT = """\
import os

def main_handler(event, context):
    return {name: value for name, value in os.environ.items() if name.upper().startswith(("EVENTRUN", "MY_"))}
"""


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "started"])
async def test_a_function_gets_the_server_s_environment_but_not_eventrun_s_configuration(
    start_engine: Callable[..., Awaitable[Engine]], monkeypatch: pytest.MonkeyPatch, fork: bool
) -> None:
    # The EVENTRUN_* variables configure the server: its ui_token, a store's URL with its
    # password, a Kafka password. Any function could read them (and so the database of every run).
    monkeypatch.setenv("EVENTRUN_SERVER__UI_TOKEN", "s3cret-ui-token")
    monkeypatch.setenv("eventrun_server__kill_grace", "3")
    monkeypatch.setenv("MY_SETTING", "kept")
    engine = await start_engine(
        f'[server]\ndata_dir = "data"\nfork_instances = {str(fork).lower()}\n\n'
        '[functions.show]\nhandler = "show.py:main_handler"\n'
        '[functions.show.environment]\nEVENTRUN_CHOSEN = "the function\'s own"\n',
        {"show.py": SHOW_ENVIRONMENT},
    )
    assert engine.manifest.server.ui_token == "s3cret-ui-token", "the server itself still reads them"
    accepted = await engine.accept(Envelope(id="e1", source="/test", type="t", function="show", trigger="http", data=None))
    run = await engine.wait(accepted.request_id, timeout=30)
    assert run.status is Status.FINISHED, run
    assert run.result == {"MY_SETTING": "kept", "EVENTRUN_CHOSEN": "the function's own"}
