"""How deep a result may nest: room for every document that holds it, and a way out for one
stored deeper before the limit (see tests/e2e/test_result_nesting_e2e.py for the whole path)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from eventrun.destinations import Deliverer
from eventrun.engine import instances
from eventrun.engine.api import Delivery, Invocation, Status
from eventrun.engine.envelope import dumps
from eventrun.engine.manifest import FunctionConfig, Manifest, ServerConfig
from eventrun.engine.worker import JSON_DEPTH, MAX_RESULT_NESTING, PIPE_BUF, RESULT_TOO_DEEP, _frame_pieces
from eventrun.triggers.http import build_app, invocation_json
from eventrun.triggers.http.responses import UNSERVABLE_RESULT, document_json, json_response

RID = "01a2461d-5009-7000-b391-852c8a6cf159"


def nested(levels: int) -> Any:
    return orjson.loads(b"[" * levels + b"]" * levels)


def run(request_id: str, result: Any) -> Invocation:
    return Invocation(
        request_id=request_id, function="f", trigger="http", status=Status.FINISHED,
        created_at="2026-01-01T00:00:00.000Z", result=result,
    )


def documents(result: Any) -> dict[str, Any]:
    """Every document the API or a destination writes a result in."""
    single = invocation_json(run(RID, result))
    return {
        "list": {"Invocations": [single], "NextCursor": None},
        "get": {**single, "ReplayOf": None, "Replays": []},
        "sync": {"RequestId": RID, "Status": "FINISHED", "Result": result},
        "callback": single,
        "on_failure": {**single, "Event": orjson.Fragment(b'{"data":1}'), "LogTail": ""},
    }


def test_the_limit_leaves_room_for_the_deepest_document_and_no_more() -> None:
    # JSON_DEPTH is orjson's own limit (a change of orjson's shows here first).
    dumps(nested(JSON_DEPTH))
    with pytest.raises(TypeError, match="Recursion limit reached"):
        dumps(nested(JSON_DEPTH + 1))
    for name, document in documents(nested(MAX_RESULT_NESTING)).items():
        assert orjson.loads(dumps(document))["Invocations" if name == "list" else "Result"], name
    with pytest.raises(TypeError):  # one level more and the list cannot be written: the limit is tight
        dumps(documents(nested(MAX_RESULT_NESTING + 1))["list"])


@pytest.mark.parametrize(("levels", "too_deep"), [(MAX_RESULT_NESTING, False), (MAX_RESULT_NESTING + 1, True), (254, True)])
def test_the_server_checks_a_result_as_it_arrives(levels: int, too_deep: bool) -> None:
    result = nested(levels)
    text = b'{"ok":true,"result":' + dumps(result) + b"}"
    assert instances._nests_too_deep(text, result) is too_deep


def test_a_shallow_result_is_not_written_twice_to_be_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    # A result with no more brackets than the limit passes on the count alone.
    monkeypatch.setattr(instances, "dumps", None)
    result = {"rows": [[1, 2]] * 100, "text": "[" * 10}
    assert not instances._nests_too_deep(orjson.dumps({"ok": True, "result": result}), result)


def test_a_frame_too_deep_becomes_the_run_s_failure() -> None:
    frame = instances._too_deep({"ok": True, "result": nested(252)})
    assert frame == {
        "ok": False, "error_type": "ResultNotSerializable", "error_message": RESULT_TOO_DEEP, "recycle": False,
    }
    assert f"nests deeper than {MAX_RESULT_NESTING} levels" in RESULT_TOO_DEEP
    assert instances._too_deep({"recycle": True})["recycle"] is True


@pytest.mark.parametrize("levels", [252, 253, 254])
def test_a_result_stored_too_deep_is_replaced_in_an_answer_that_cannot_hold_it(levels: int) -> None:
    deep = invocation_json(run(RID, nested(levels)))
    fine = invocation_json(run("01a2461d-5009-7001-b391-852c8a6cf159", {"ok": [1]}))
    answer = orjson.loads(document_json({"Invocations": [fine, deep], "NextCursor": "c"}))
    assert answer["NextCursor"] == "c"
    assert answer["Invocations"][0] == fine
    assert answer["Invocations"][1] == {**deep, **UNSERVABLE_RESULT}
    assert answer["Invocations"][1]["Status"] == "FINISHED"
    assert f"nests deeper than {MAX_RESULT_NESTING} levels" in UNSERVABLE_RESULT["ErrorMessage"]


def test_an_answer_that_fits_is_written_as_it_is() -> None:
    document = documents(nested(253))["get"]  # 254 levels in all: orjson writes it
    assert document_json(document) == dumps(document)
    response = json_response({"a": [1, {"b": None}]})
    assert response.body == dumps({"a": [1, {"b": None}]})


def test_what_is_not_a_result_too_deep_still_fails() -> None:
    with pytest.raises(TypeError):
        document_json({"Other": nested(300)})


class FakeEngine:
    def __init__(self, invocations: list[Invocation]) -> None:
        self.manifest = Manifest(
            server=ServerConfig(),
            functions={
                "f": FunctionConfig(handler="f.py:main_handler"),
                "s": FunctionConfig(handler="f.py:main_handler", async_execution=False, timeout="30s"),
            },
        )
        self.shutting_down = False
        self.invocations = {inv.request_id: inv for inv in invocations}

    def function(self, name: str) -> FunctionConfig:
        return self.manifest.functions[name]

    async def get(self, request_id: str) -> Invocation:
        return self.invocations[request_id]

    async def links(self, request_id: str) -> tuple[str | None, list[str]]:
        return None, []

    async def list(self, **_filters: Any) -> tuple[list[Invocation], str | None]:
        return list(self.invocations.values()), None

    async def call(self, envelope: Any, *, unique: bool = False) -> Invocation:
        return self.invocations[RID]

    async def envelope(self, request_id: str) -> bytes:
        return b'{"data":1}'

    async def read_log(self, request_id: str, *, last: int | None = None) -> bytes:
        return b"a line\n"


async def test_no_answer_holding_a_result_stored_too_deep_is_a_500() -> None:
    other = "01a2461d-5009-7001-b391-852c8a6cf159"
    engine = FakeEngine([run(RID, nested(254)), run(other, [1])])
    async with TestClient(TestServer(build_app(engine))) as client:  # type: ignore[arg-type]
        listed = await client.get("/invocations")
        assert listed.status == 200, await listed.text()
        items = (await listed.json())["Invocations"]
        assert items[0]["Result"] is None and items[0]["ErrorType"] == "ResultNotSerializable"
        assert items[1]["Result"] == [1] and items[1]["ErrorType"] is None
        single = await client.get(f"/invocations/{RID}")
        assert single.status == 200, await single.text()
        assert (await single.json())["ErrorMessage"] == UNSERVABLE_RESULT["ErrorMessage"]
        answer = await client.post("/functions/s/invocations", json={})
        assert answer.status == 200, await answer.text()
        assert await answer.json() == {"RequestId": RID, "Status": "FINISHED", **UNSERVABLE_RESULT}


@pytest.mark.parametrize("kind", ["callback", "on_failure"])
async def test_a_delivery_of_a_run_stored_too_deep_goes_with_the_result_replaced(kind: str) -> None:
    engine = FakeEngine([run(RID, nested(254))])
    deliverer = Deliverer(engine, SimpleNamespace(functions={}))  # type: ignore[arg-type]
    sent: list[bytes] = []

    async def post(_delivery: Delivery, body: bytes) -> None:
        sent.append(body)

    deliverer._post = post  # type: ignore[method-assign]
    await deliverer._make(Delivery(1, RID, "f", kind, "http://x", 0))
    (body,) = sent
    document = orjson.loads(body)
    assert document["Result"] is None and document["ErrorType"] == "ResultNotSerializable", document
    if kind == "on_failure":
        assert document["Event"] == {"data": 1} and document["LogTail"] == "a line\n"



@pytest.mark.parametrize(
    ("result", "outcome"),
    [
        (dumps(nested(MAX_RESULT_NESTING)), {"ok": True, "result": nested(MAX_RESULT_NESTING)}),
        (dumps(nested(252)), instances._too_deep({})),
        (b"[" * 1100 + b"]" * 1100, instances._too_deep({"recycle": True})),  # past what orjson reads
    ],
)
@pytest.mark.parametrize("pieces", [False, True], ids=["one-line", "in-pieces"])
async def test_an_instance_s_frame_is_checked_as_it_is_read(result: bytes, outcome: dict[str, Any], pieces: bool) -> None:
    instance = instances.Instance.__new__(instances.Instance)
    instance._mark = b"\x1eeventrun-frame:t0"
    instance._parts, instance._parts_size, instance._budget = [], 0, 1 << 62
    lines: list[str] = []
    instance._sink = lines.extend
    instance._outcome = asyncio.get_running_loop().create_future()
    instance._run = ("r1", "n1")  # (the run the frame must name)
    padding = b" " * 3 * PIPE_BUF if pieces else b""  # (JSON's whitespace: a frame the worker sends in pieces)
    frame = instance._mark + b' {"request_id":"r1","run":"n1","ok":true,' + padding + b'"result":' + result + b"}\n"
    sent = list(_frame_pieces(instance._mark + b" ", frame))
    assert (len(sent) > 1) is pieces
    instance._route([b"before", b"said " + sent[0][:-1], *(piece[:-1] for piece in sent[1:]), b"after"])
    read = instance._outcome.result()
    assert {key: value for key, value in read.items() if key not in ("request_id", "run")} == outcome
    assert lines == ["before", "said ", "after"]
