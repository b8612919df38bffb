"""Parts of a node that need no database: shipping log lines, the message of a lost node."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

import pytest

from eventrun.engine import cluster
from eventrun.engine.cluster import LogShipper, node_lost


class FakeStore:
    """append_logs() recorded; it fails while `down` is set."""

    def __init__(self) -> None:
        self.shipped: list[list[tuple[str, bytes]]] = []
        self.down = False

    async def append_logs(self, chunks: Sequence[tuple[str, bytes]]) -> None:
        if self.down:
            raise OSError("connection refused")
        self.shipped.append(list(chunks))


async def test_lines_are_shipped_one_row_per_run_in_the_order_written() -> None:
    store = FakeStore()
    shipper = LogShipper(store)  # type: ignore[arg-type]
    for request_id, data in [("r1", b"a\n"), ("r2", b"x\n"), ("r1", b"b\n"), ("r1", b"c\n")]:
        shipper.add(request_id, data)
    await shipper.flush()
    assert store.shipped == [[("r1", b"a\nb\nc\n"), ("r2", b"x\n")]]
    await shipper.flush()
    assert len(store.shipped) == 1, "nothing new, nothing sent"


async def test_lines_that_could_not_be_shipped_go_with_the_next_try() -> None:
    store = FakeStore()
    shipper = LogShipper(store)  # type: ignore[arg-type]
    shipper.add("r1", b"a\n")
    store.down = True
    with pytest.raises(OSError):
        await shipper.flush()
    shipper.add("r1", b"b\n")
    store.down = False
    await shipper.flush()
    assert store.shipped == [[("r1", b"a\nb\n")]]


async def test_lines_a_stop_cannot_ship_during_an_outage_are_counted_in_a_line_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FakeStore()
    shipper = LogShipper(store)  # type: ignore[arg-type]
    shipper.add("r1", b"a\nb\n")
    shipper.add("r2", b"c\n")
    store.down = True
    await shipper.stop()
    (record,) = [r for r in caplog.records if "could not be shipped" in r.getMessage()]
    assert record.getMessage() == (
        "the last 3 log lines of this node's runs could not be shipped to the store (connection refused); they are lost"
    )
    assert record.exc_info is None


async def test_a_store_that_is_down_is_tried_less_and_less_often_and_logged_once_a_while(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # An outage used to write a warning every 0.1 s, and try as often.
    monkeypatch.setattr(cluster, "SHIP_MOST", 0.08)
    monkeypatch.setattr(cluster, "SHIP_LOG_EVERY", 0.3)
    store = FakeStore()
    tries = 0
    real = store.append_logs

    async def counted(chunks: Sequence[tuple[str, bytes]]) -> None:
        nonlocal tries
        tries += 1
        await real(chunks)

    store.append_logs = counted  # type: ignore[method-assign]
    shipper = LogShipper(store, interval=0.01)  # type: ignore[arg-type]
    shipper.add("r1", b"a\n")
    store.down = True
    with caplog.at_level(logging.WARNING, logger="eventrun.engine.cluster"):
        shipper.start()
        await asyncio.sleep(0.7)
        down_tries = tries
        store.down = False
        await asyncio.sleep(0.2)
        await shipper.stop()
    # Every 0.01 s that would be 70 tries; doubling from 0.01 s up to 0.08 s, about a dozen.
    assert 3 <= down_tries <= 15, down_tries
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("shipping log lines to the store failed")]
    assert 1 <= len(failed) <= 3, failed  # 0.7 s of failures, a line at most every 0.3 s
    assert any(r.getMessage().startswith("log lines are shipped to the store again") for r in caplog.records)
    assert store.shipped == [[("r1", b"a\n")]]


async def test_a_store_that_fails_and_recovers_over_and_over_is_logged_once_a_while(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A connection that drops and comes back used to cost two lines each time (every 0.3-0.9 s).
    monkeypatch.setattr(cluster, "SHIP_LOG_EVERY", 0.3)
    store = FakeStore()
    real = store.append_logs

    async def flapping(chunks: Sequence[tuple[str, bytes]]) -> None:
        store.down = not store.down  # every other try fails
        await real(chunks)

    store.append_logs = flapping  # type: ignore[method-assign]
    shipper = LogShipper(store, interval=0.01)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="eventrun.engine.cluster"):
        shipper.start()
        for _ in range(70):  # 0.7 s, a line to ship at every try
            shipper.add("r1", b"a\n")
            await asyncio.sleep(0.01)
        await shipper.stop()
    lines = [r.getMessage() for r in caplog.records]
    failed = [line for line in lines if line.startswith("shipping log lines to the store failed")]
    again = [line for line in lines if line.startswith("log lines are shipped to the store again")]
    assert 1 <= len(failed) <= 3 and 1 <= len(again) <= 3, lines  # about 25 failures in 0.7 s, a line at most every 0.3 s
    assert "more failed tries since the last such line" in " ".join(failed[1:] + again), lines


def test_a_lost_node_s_runs_say_which_node_and_that_nothing_was_retried() -> None:
    message: Any = node_lost("node-7")
    assert "node node-7" in message and "not retried" in message
