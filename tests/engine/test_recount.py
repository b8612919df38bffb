"""Recount: a costly count is shared by those who ask at once, reused a while, and refreshed in the background."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from eventrun.engine.errors import StoreError
from eventrun.engine.recount import Recount


async def test_counts_are_shared_and_reused_for_ten_times_as_long_as_they_took() -> None:
    counted = []

    async def count() -> dict[str, dict[str, int]]:
        counted.append(len(counted))
        await asyncio.sleep(0.05)
        return {"f": {"FINISHED": len(counted)}}

    recount = Recount(count)
    together = await asyncio.gather(*(recount.result() for _ in range(5)))
    assert counted == [0] and all(r == {"f": {"FINISHED": 1}} for r in together), "one count for requests at once"
    assert await recount.result() == {"f": {"FINISHED": 1}} and counted == [0], "reused right after"
    await asyncio.sleep(0.05 * Recount.REUSE + 0.1)
    assert await recount.result() == {"f": {"FINISHED": 2}}, "counted again once it has aged"


async def test_a_failed_count_is_not_kept() -> None:
    attempts = []

    async def count() -> dict[str, dict[str, int]]:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("database is locked")
        return {}

    recount = Recount(count)
    with pytest.raises(RuntimeError):
        await recount.result()
    assert await recount.result() == {} and len(attempts) == 2


async def test_a_refresh_counts_in_the_background_once_the_count_has_aged() -> None:
    counted: list[int] = []

    async def count() -> int:
        counted.append(len(counted))
        await asyncio.sleep(0.01)
        return len(counted)

    recount = Recount(count, at_least=0.2)
    recount.refresh()
    assert recount.latest is None, "the caller does not wait for it"
    await asyncio.sleep(0.05)
    assert recount.latest == 1
    recount.refresh()
    recount.refresh()
    await asyncio.sleep(0.05)
    assert counted == [0], "fresh for at least 0.2 s, although it took 0.01 s"
    await asyncio.sleep(0.2)
    recount.refresh()
    await asyncio.sleep(0.05)
    assert recount.latest == 2 and counted == [0, 1]


def answering(answers: list[int | Exception]) -> Callable[[], Awaitable[int]]:
    """A count giving these answers in turn (an exception is raised)."""

    async def count() -> int:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return count


async def test_a_background_count_that_fails_keeps_the_last_figure(caplog: pytest.LogCaptureFixture) -> None:
    recount = Recount(answering([5, RuntimeError("database is locked"), 7]))
    assert await recount.result() == 5
    await asyncio.sleep(0.01)  # aged (it took no time)
    with caplog.at_level(logging.WARNING):
        recount.refresh()
        await asyncio.sleep(0.01)
    assert recount.latest == 5
    assert any("database is locked" in r.getMessage() for r in caplog.records)
    assert await recount.result() == 7


async def test_counts_failing_in_a_row_are_logged_once_and_their_end_once(caplog: pytest.LogCaptureFixture) -> None:
    recount = Recount(answering([5, *(StoreError("the store cannot serve this now") for _ in range(20)), 7]))
    assert await recount.result() == 5
    with caplog.at_level(logging.WARNING):
        for _ in range(20):  # e.g. the dashboard asking every second through an outage
            await asyncio.sleep(0.001)
            recount.refresh()
        await asyncio.sleep(0.01)
        assert await recount.result() == 7
    messages = [r.getMessage() for r in caplog.records]
    assert recount.latest == 7 and len(messages) == 2, messages
    assert "the store cannot serve this now" in messages[0] and "after 20 failed" in messages[1]
