"""Parts of a node that need no database: shipping log lines, the message of a lost node."""

from __future__ import annotations

from typing import Any, Sequence

import pytest

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


def test_a_lost_node_s_runs_say_which_node_and_that_nothing_was_retried() -> None:
    message: Any = node_lost("node-7")
    assert "node node-7" in message and "not retried" in message
