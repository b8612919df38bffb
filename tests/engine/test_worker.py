"""The worker's encoding of a result: JSON by eventrun's rules, or a ResultNotSerializable that says why."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from eventrun.engine import worker
from eventrun.engine.api import Status
from eventrun.engine.core import Engine
from eventrun.engine.envelope import Envelope, new_id

NAN, INF = float("nan"), float("inf")
NO_NAN = "; JSON has no NaN or Infinity (return such a number as a string, or None)"


class Level(enum.Enum):
    UNKNOWN = NAN


class Ceiling(float, enum.Enum):
    NONE = INF


@dataclasses.dataclass
class Point:
    x: float
    _cache: float = NAN  # orjson leaves out fields named _...


@dataclasses.dataclass(slots=True)
class SlottedPoint:
    x: float
    _cache: float = NAN


@pytest.mark.parametrize(
    ("result", "where"),
    [
        (NAN, "result is NaN"),
        (INF, "result is Infinity"),
        (-INF, "result is -Infinity"),
        ({"x": [1, None, NAN]}, 'result["x"][2] is NaN'),
        ([None, {"a": (1, -INF)}], 'result[1]["a"][1] is -Infinity'),
        ({1: {"deep": [[[INF]]]}}, 'result[1]["deep"][0][0][0] is Infinity'),
        ({NAN: 1}, "result has a key that is NaN"),
        ({"k": {-INF: "v"}}, 'result["k"] has a key that is -Infinity'),
        ({"level": Level.UNKNOWN}, 'result["level"] is NaN'),
        ([Ceiling.NONE], "result[0] is Infinity"),
        ({Level.UNKNOWN: 1}, "result has a key that is NaN"),
        ({"at": Point(NAN)}, 'result["at"].x is NaN'),
        (SlottedPoint(INF), "result.x is Infinity"),
        ({"a" * 100: NAN}, f'result["{"a" * 40}..."] is NaN'),
        ({'say "hi"': NAN}, 'result["say \\"hi\\""] is NaN'),
    ],
)
def test_nan_or_infinity_anywhere_in_a_result_is_refused_with_where_it_is(result: Any, where: str) -> None:
    # orjson writes them as null: the run would end FINISHED with another value than the one returned.
    with pytest.raises(TypeError) as caught:
        worker._result_json(result)
    assert str(caught.value) == where + NO_NAN


@pytest.mark.parametrize(
    "result",
    [
        None,
        [None, 1.5, -0.0, 1e308],
        {"null": "null", "n": None},
        Point(1.0),
        SlottedPoint(2.0),
        {"level": Level.UNKNOWN.name, 1: None},
    ],
)
def test_a_result_with_nulls_but_no_nan_is_written_as_it_was(result: Any) -> None:
    assert worker._result_json(result) == (b"null" if result is None else orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS))


def test_a_result_whose_json_holds_no_null_is_not_walked(monkeypatch: pytest.MonkeyPatch) -> None:
    # The usual result costs one search of its bytes: no null in them, no NaN in it.
    monkeypatch.setattr(worker, "_non_finite", None)
    assert worker._result_json({"rows": [[1, 2.5]] * 100, "text": "nul"}) == orjson.dumps(
        {"rows": [[1, 2.5]] * 100, "text": "nul"}
    )


def test_a_result_over_the_size_limit_is_not_walked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "_non_finite", None)
    big = [None, "x" * worker.MAX_RESULT, NAN]
    assert len(worker._result_json(big)) > worker.MAX_RESULT  # it fails as ResultTooLarge


def test_an_integer_beyond_64_bits_is_still_refused() -> None:
    with pytest.raises(TypeError, match="Integer exceeds 64-bit range"):
        worker._result_json({"n": None, "big": 2**64})


SHAPES = """\
def main_handler(event, context):
    kind = event["data"]
    if kind == "nan":
        return {"x": [1, 2, float("nan")]}
    if kind == "inf":
        return float("-inf")
    return {"a": None, "b": "null", "c": 1.5}
"""


@pytest.mark.parametrize(
    ("kind", "where"), [("nan", 'result["x"][2] is NaN'), ("inf", "result is -Infinity")]
)
async def test_a_run_returning_nan_or_infinity_ends_failed_and_says_where(
    start_engine: Callable[..., Awaitable[Engine]], kind: str, where: str
) -> None:
    engine = await start_engine(
        '[server]\ndata_dir = "data"\n\n[functions.shapes]\nhandler = "shapes.py:main_handler"\nasync_execution = false\n',
        {"shapes.py": SHAPES},
    )
    envelope = Envelope(id=new_id(), source="/http/shapes", type="t", function="shapes", trigger="http", data=kind)
    answer = await engine.call(envelope)
    assert (answer.status, answer.error_type, answer.result) == (Status.FAILED, "ResultNotSerializable", None), answer
    assert answer.error_message == f"the handler's return value is not JSON-serialisable: {where}{NO_NAN}"
    nulls = Envelope(id=new_id(), source="/http/shapes", type="t", function="shapes", trigger="http", data="nulls")
    again = await engine.call(nulls)  # the same instance, still serving
    assert (again.status, again.result) == (Status.FINISHED, {"a": None, "b": "null", "c": 1.5}), again
