"""Reading an instance's output: lines too long to hold are split, never inside a character;
a frame sent in pieces is put together whatever output comes between them."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from eventrun.engine.instances import MAX_LINE, READ_CHUNK, Instance
from eventrun.engine.worker import FRAME_MARK, MAX_FRAME, PIPE_BUF, _frame_pieces

MARK = (FRAME_MARK + "t0").encode()  # an instance's, whose token is t0


def reader() -> tuple[Instance, list[str]]:
    """An Instance without a process, for what reads its output; and the lines it logs."""
    instance = Instance.__new__(Instance)
    instance._mark = MARK
    instance._parts, instance._parts_size = [], 0
    instance._pending, instance._budget, instance._outcome = b"", 1 << 62, None
    logged: list[str] = []
    instance._sink = logged.extend
    return instance, logged


def feed(instance: Instance, data: bytes, chunk: int = READ_CHUNK) -> None:
    for at in range(0, len(data), chunk):
        instance._feed(data[at : at + chunk])


def pieces(result: Any) -> list[bytes]:
    """The lines a worker sends the frame of a run that returned `result` as."""
    return list(_frame_pieces(MARK + b" ", MARK + b' {"ok":true,"result":' + orjson.dumps(result) + b"}\n"))


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


RESULT = {"blob": "z" * 100_000, "text": "é€𝄞" * 5_000}  # (pieces are cut inside characters too)


@pytest.mark.parametrize("chunk", [READ_CHUNK, 1000, 7])
async def test_a_frame_in_pieces_comes_whole_with_output_between_and_before_them(chunk: int) -> None:
    # What a thread of the run writes meanwhile lands between the pieces; one of its writes
    # larger than PIPE_BUF may be split around a piece, which then follows part of its line.
    sent = pieces(RESULT)
    assert len(sent) > 30 and all(len(piece) <= PIPE_BUF for piece in sent)
    stream, said = b"", []
    for n, piece in enumerate(sent):
        if n % 3 == 0:
            stream += b"line %d\n" % n + piece
            said.append(f"line {n}")
        elif n % 3 == 1:
            stream += b"part %d " % n + piece + b"rest %d\n" % n
            said += [f"part {n} ", f"rest {n}"]
        else:
            stream += piece
    instance, logged = reader()
    instance._outcome = asyncio.get_running_loop().create_future()
    feed(instance, stream + b"after\n", chunk)
    assert instance._outcome.result() == {"ok": True, "result": RESULT}
    assert logged == [*said, "after"]
    assert instance._parts == [] and instance._pending == b""


async def test_a_frame_in_pieces_comes_whole_past_the_log_limit() -> None:
    instance, logged = reader()
    instance._outcome = asyncio.get_running_loop().create_future()
    instance._budget = 10
    feed(instance, b"kept line\n" + b"".join(b"dropped %d\n" % n + piece for n, piece in enumerate(pieces(RESULT))))
    assert instance._outcome.result() == {"ok": True, "result": RESULT}
    assert logged == ["kept line"]


async def test_output_marked_with_another_token_is_output() -> None:
    # A handler cannot forge a piece of its run's frame: it does not have the token.
    forged = (FRAME_MARK + "t1").encode()
    sent = pieces(RESULT)
    instance, logged = reader()
    instance._outcome = asyncio.get_running_loop().create_future()
    feed(instance, sent[0] + forged + b'+{"ok":false}\n' + forged + b' {"ok":false}\n' + b"".join(sent[1:]))
    assert instance._outcome.result() == {"ok": True, "result": RESULT}
    assert logged == [forged.decode() + '+{"ok":false}', forged.decode() + ' {"ok":false}']


async def test_a_frame_in_pieces_longer_than_any_frame_is_unreadable() -> None:
    instance, logged = reader()
    instance._outcome = asyncio.get_running_loop().create_future()
    feed(instance, b"".join(pieces("z" * MAX_FRAME)))
    outcome = instance._outcome.result()
    assert outcome["error_type"] == "InternalError", outcome
    assert outcome["error_message"] == f"unreadable outcome: it is longer than {MAX_FRAME} bytes"
    assert instance._parts == [] and instance._parts_size == 0 and logged == []
