"""Reading an instance's output: lines too long to hold are split, never inside a character."""

from __future__ import annotations

import pytest

from eventrun.engine.instances import MAX_LINE, READ_CHUNK, Instance
from eventrun.engine.worker import FRAME_MARK


def reader() -> tuple[Instance, list[str]]:
    """An Instance without a process, for what reads its output; and the lines it logs."""
    instance = Instance.__new__(Instance)
    instance._mark = FRAME_MARK + "t0 "
    instance._mark_bytes = instance._mark.encode()
    instance._pending, instance._budget, instance._outcome = b"", 1 << 62, None
    logged: list[str] = []
    instance._sink = logged.extend
    return instance, logged


def feed(instance: Instance, data: bytes) -> None:
    for at in range(0, len(data), READ_CHUNK):
        instance._feed(data[at : at + READ_CHUNK])


# After 0 to 3 ASCII bytes, each character straddles the first cut at each of its inner boundaries (or at none).
@pytest.mark.parametrize("lead", [0, 1, 2, 3])
@pytest.mark.parametrize("character", ["é", "€", "𝄞"], ids=["2-byte", "3-byte", "4-byte"])
def test_a_long_line_is_split_between_characters(character: str, lead: int) -> None:
    text = "a" * lead + character * (3 * MAX_LINE // len(character.encode()))
    instance, logged = reader()
    feed(instance, text.encode() + b"\n")
    assert len(logged) >= 3
    assert "".join(logged) == text
    assert all(len(piece.encode()) <= MAX_LINE for piece in logged[:-1])


def test_a_long_line_of_mixed_characters_comes_back_whole() -> None:
    text = "y€é𝄞" * (MAX_LINE // 3)
    instance, logged = reader()
    feed(instance, text.encode() + b"\nafter\n")
    assert "".join(logged[:-1]) == text and logged[-1] == "after"


def test_bytes_that_are_not_utf8_are_split_and_replaced_as_before() -> None:
    instance, logged = reader()
    feed(instance, b"\x80" * (3 * MAX_LINE) + b"\n")  # continuation bytes, and nothing they continue
    assert len(logged[0]) == MAX_LINE  # cut where it would have been
    assert "".join(logged) == "\ufffd" * (3 * MAX_LINE)
