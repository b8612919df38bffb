"""The worker: a result's encoding (JSON by eventrun's rules, or a ResultNotSerializable that says
why), and what a run may leave on its instance for the next."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import os
import sys
import threading
import time
import types
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_instances import OK, feed, reader

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


Serve = Callable[..., Awaitable[Engine]]


async def _call(engine: Engine, data: Any, function: str = "f") -> Any:
    """Call `function` over HTTP (as the gateway would) with `data`: its answer."""
    envelope = Envelope(id=new_id(), source=f"/http/{function}", type="t", function=function, trigger="http", data=data)
    return await engine.call(envelope)


async def _log(engine: Engine, run: Any) -> str:
    """The log of a run `_call` answered."""
    return (await engine.read_log(run.request_id)).decode()


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


@pytest.mark.parametrize(
    ("result", "where"),
    [
        ({"tags": {1, 2}}, 'result["tags"] is of type set, which JSON cannot hold (return a list)'),
        (b"png", "result is of type bytes, which JSON cannot hold (return text: decoded, or in base64)"),
        ([1, {"d": Decimal("1.5")}], 'result[1]["d"] is of type Decimal, which JSON cannot hold (return a string, or a float)'),
        ({"at": Point(object())}, 'result["at"].x is of type object, which JSON cannot hold'),
        ({(1, 2): 3}, "result has a key (1, 2) of type tuple, which JSON cannot write as text"),
        ({"n": 1, "k": {frozenset(): 1}}, 'result["k"] has a key frozenset() of type frozenset, which JSON cannot write as text'),
    ],
)
def test_a_value_or_key_json_cannot_hold_is_refused_with_where_it_is(result: Any, where: str) -> None:
    # orjson's words named the type alone, and of a key said "Dict key must a type serializable with OPT_NON_STR_KEYS".
    with pytest.raises(TypeError) as caught:
        worker._result_json(result)
    assert str(caught.value) == where


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
    answer = await _call(engine, kind, "shapes")
    assert (answer.status, answer.error_type, answer.result) == (Status.FAILED, "ResultNotSerializable", None), answer
    assert answer.error_message == f"the handler's return value is not JSON-serialisable: {where}{NO_NAN}"
    again = await _call(engine, "nulls", "shapes")  # the same instance, still serving
    assert (again.status, again.result) == (Status.FINISHED, {"a": None, "b": "null", "c": 1.5}), again


# -- keys that JSON would make one --------------------------------------------------------------

KEYS_APART = "; JSON keys are strings, so one value would be lost (give each a key of its own)"


@pytest.mark.parametrize(
    ("result", "where"),
    [
        ({1: "a", "1": "b"}, 'result has keys 1 and "1", both written "1"'),
        ({True: 1, "true": 2}, 'result has keys True and "true", both written "true"'),
        ({"x": [{None: 0, "null": 1}]}, 'result["x"][0] has keys None and "null", both written "null"'),
        ({"k": {1.5: 0, "1.5": 1}}, 'result["k"] has keys 1.5 and "1.5", both written "1.5"'),
        ({"at": Point({2: 0, "2": 1})}, 'result["at"].x has keys 2 and "2", both written "2"'),  # type: ignore[arg-type]
    ],
)
def test_keys_written_as_the_same_string_are_refused_with_where_they_are(result: Any, where: str) -> None:
    # orjson writes both: a client reading the JSON keeps only the last one.
    with pytest.raises(TypeError) as caught:
        worker._result_json(result)
    assert str(caught.value) == where + KEYS_APART


def test_distinct_non_string_keys_are_written_as_before() -> None:
    result = {1: "a", "2": "b", None: [{True: 0, 3.5: 1}], "n": {"null": None}}
    assert worker._result_json(result) == orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS)


def test_a_result_with_only_string_keys_is_not_walked_for_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "_key_collision", None)
    assert worker._result_json({"a": {"b": [1, {"c": 2}]}}) == b'{"a":{"b":[1,{"c":2}]}}'


# -- what a run leaves on its instance ----------------------------------------------------------

FORKER = """\
import os, sys, time

def main_handler(event, context):
    how = event["data"]
    if how == "pid":
        return {"pid": os.getpid()}
    pid = os.fork()
    if pid == 0:
        print("child working", flush=True)
        if how == "exit":
            sys.exit(0)
        if how == "exit3":
            sys.exit(3)
        if how == "raise":
            raise ValueError("the child fails")
        time.sleep(0.2)  # so that a child reporting would report first
        return {"who": "child"}
    _, status = os.waitpid(pid, 0)
    return {"child_exit": os.waitstatus_to_exitcode(status), "pid": os.getpid()}
"""


def _manifest(fork_instances: bool, extra: str = "") -> str:
    return (
        f'[server]\ndata_dir = "data"\nfork_instances = {str(fork_instances).lower()}\n\n'
        f'[functions.f]\nhandler = "f.py:main_handler"\nasync_execution = false\nconcurrency = 1\n{extra}'
    )


@pytest.fixture(params=[True, False], ids=["forked", "fresh"])
def serve(request: pytest.FixtureRequest, start_engine: Callable[..., Awaitable[Engine]]) -> Serve:
    """Factory: serve(source, extra="") -> a started engine whose function f is the handler in
    `source` (`extra`: more of its manifest keys), on instances forked, or started fresh."""

    async def start(source: str, extra: str = "") -> Engine:
        return await start_engine(_manifest(request.param, extra), {"f.py": source})

    return start


@pytest.mark.parametrize(("how", "code"), [("exit", 0), ("exit3", 3), ("return", 0), ("raise", 1)])
async def test_a_process_the_handler_forks_ends_where_it_comes_back_and_reports_nothing(
    serve: Serve, how: str, code: int
) -> None:
    engine = await serve(FORKER)
    first = await _call(engine, how)
    assert first.status == Status.FINISHED, first
    pid = first.result["pid"]
    assert first.result == {"child_exit": code, "pid": pid}, first
    log = await _log(engine, first)
    assert "child working" in log, log
    assert ("ValueError: the child fails" in log) == (how == "raise"), log
    # The child read no event: the next one is the instance's, and its outcome is its own.
    for _ in range(2):
        again = await _call(engine, "pid")
        assert (again.status, again.result) == (Status.FINISHED, {"pid": pid}), again


THREADS = """\
import os, subprocess, sys, threading, time

def started_at_import():
    while True:
        time.sleep(60)

threading.Thread(target=started_at_import, name="module-thread", daemon=True).start()

def main_handler(event, context):
    how = event["data"]
    if how == "ticker":
        def tick():
            while True:
                print("tick from", context.request_id, flush=True)
                time.sleep(0.05)
        threading.Thread(target=tick, daemon=True).start()
        time.sleep(0.1)
    elif how == "exit":
        def later():
            time.sleep(0.5)
            os._exit(7)
        threading.Thread(target=later, daemon=True).start()
    elif how == "joined":
        thread = threading.Thread(target=time.sleep, args=(0.05,))
        thread.start()
        thread.join()
    elif how == "finishing":  # its work done and handed over, the thread is still on its way out
        done = threading.Event()
        def work():
            done.set()
            time.sleep(0.01)
        threading.Thread(target=work).start()
        done.wait()
    elif how == "subprocess":
        def later():
            time.sleep(0.3)
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        threading.Thread(target=later, daemon=True).start()
    elif how == "nap":
        time.sleep(0.8)
    print("ran", how, flush=True)
    return {"pid": os.getpid()}
"""
LEFT_THREADS = "[eventrun] the run left 1 threads running; this instance is not reused"


@pytest.mark.parametrize("how", ["ticker", "exit", "subprocess"])
async def test_an_instance_a_run_left_threads_on_is_not_reused(serve: Serve, how: str) -> None:
    engine = await serve(THREADS)
    # Threads its module started as it was imported are the instance's own, joined ones are gone,
    # and one that has just done its work is given a moment to end.
    warm = [await _call(engine, how) for how in ("joined", "finishing", "joined")]
    assert [run.status for run in warm] == [Status.FINISHED] * 3, warm
    assert warm[0].result == warm[1].result == warm[2].result, warm
    for run in warm:
        assert "threads running" not in await _log(engine, run)
    left = await _call(engine, how)
    assert (left.status, left.result) == (Status.FINISHED, warm[0].result), left
    assert LEFT_THREADS in await _log(engine, left)
    # A run long enough for the thread to end the instance, or start its process, were it kept.
    after = await _call(engine, "nap")
    assert after.status == Status.FINISHED and after.result != warm[0].result, after
    log = await _log(engine, after)
    assert "tick" not in log and "threads running" not in log and "processes running" not in log, log


LOGGER = """\
import contextlib, io, os, sys

def main_handler(event, context):
    if event["data"] == "quiet":
        with contextlib.redirect_stderr(io.StringIO()):  # silence a noisy library for one call
            context.logger.info("inside the redirect")
    context.logger.info("logger line from %s", context.request_id)
    return os.getpid()
"""


async def test_context_logger_writes_to_the_runs_log_whatever_sys_stderr_is(serve: Serve) -> None:
    engine = await serve(LOGGER)
    first = await _call(engine, "quiet")
    log = await _log(engine, first)
    assert "INFO inside the redirect" in log and f"INFO logger line from {first.request_id}" in log, log
    second = await _call(engine, "plain")
    assert second.result == first.result, second
    assert f"INFO logger line from {second.request_id}" in await _log(engine, second)


STREAMS = """\
import io, os, sys

def main_handler(event, context):
    print("printed by", context.request_id)
    if event["data"] == "replace":
        sys.stdout = sys.stderr = io.StringIO()
    elif event["data"] == "replace stdin":
        sys.stdin = io.StringIO("x")  # what the next runs would read, were the instance kept
    return os.getpid()
"""


@pytest.mark.parametrize(
    ("how", "said"),
    [("replace", "closed or replaced its stdout or stderr"), ("replace stdin", "closed or replaced its stdin")],
    ids=["stdout", "stdin"],
)
async def test_an_instance_whose_standard_stream_objects_a_run_replaced_is_not_reused(
    serve: Serve, how: str, said: str
) -> None:
    engine = await serve(STREAMS)
    replaced = await _call(engine, how)
    assert replaced.status == Status.FINISHED, replaced
    assert said in await _log(engine, replaced)
    after = await _call(engine, "print")
    assert after.status == Status.FINISHED and after.result != replaced.result, after
    assert f"printed by {after.request_id}" in await _log(engine, after)


MEMORY = """\
import mmap, threading, time

def main_handler(event, context):
    if event["data"] == "threads":
        threads = [threading.Thread(target=time.sleep, args=(0.5,)) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    elif event["data"] == "mmap":
        mmap.mmap(-1, 300 * 1024 * 1024, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return "fits"
"""


@pytest.mark.parametrize(("how", "traceback"), [("threads", "can't start new thread"), ("mmap", "[Errno 12]")])
async def test_memory_past_the_limit_by_a_thread_or_a_mapping_is_memory_limit_exceeded(
    serve: Serve, how: str, traceback: str
) -> None:
    engine = await serve(MEMORY, 'memory_limit = "100MB"\n')
    answer = await _call(engine, how)
    assert (answer.status, answer.error_type) == (Status.FAILED, "MemoryLimitExceeded"), answer
    assert answer.error_message.startswith("the function ran out of memory: its memory_limit is 100 MB"), answer
    assert traceback in await _log(engine, answer)
    again = await _call(engine, "none")
    assert (again.status, again.result) == (Status.FINISHED, "fits"), again


KEYS = """\
def main_handler(event, context):
    return {1: "a", "1": "b"} if event["data"] == "clash" else {1: "a", "2": "b"}
"""


async def test_a_run_returning_keys_json_would_merge_ends_failed_and_says_where(
    start_engine: Callable[..., Awaitable[Engine]],
) -> None:
    engine = await start_engine(_manifest(True), {"f.py": KEYS})
    answer = await _call(engine, "clash")
    assert (answer.status, answer.error_type, answer.result) == (Status.FAILED, "ResultNotSerializable", None), answer
    assert answer.error_message == (
        f'the handler\'s return value is not JSON-serialisable: result has keys 1 and "1", both written "1"{KEYS_APART}'
    )
    again = await _call(engine, "apart")
    assert (again.status, again.result) == (Status.FINISHED, {"1": "a", "2": "b"}), again


def test_a_short_frame_goes_as_one_line_a_long_one_in_pieces_of_at_most_pipe_buf() -> None:
    mark = (worker.FRAME_MARK + "t0 ").encode()
    short = mark + b'{"ok":true,"result":1}\n'
    assert list(worker._frame_pieces(mark, short)) == [short]
    body = orjson.dumps({"ok": True, "result": "é€𝄞" * 10_000})
    sent = list(worker._frame_pieces(mark, mark + body + b"\n"))
    more = (worker.FRAME_MARK + "t0" + worker.FRAME_MORE).encode()
    assert len(sent) > 20 and all(len(piece) <= worker.PIPE_BUF and piece.endswith(b"\n") for piece in sent)
    assert all(piece.startswith(more) for piece in sent[:-1]) and sent[-1].startswith(mark)
    assert b"".join(piece[len(mark) : -1] for piece in sent) == body


async def test_a_frame_goes_whole_through_a_pipe_another_thread_floods() -> None:
    """A thread the run left writes lines longer than PIPE_BUF (not written at once) while the
    worker reports a large result on the same pipe: the parent still reads it whole."""
    read_end, write_end = os.pipe()
    tasks_read, tasks_write = os.pipe()
    received = bytearray()

    def drain() -> None:
        while chunk := os.read(read_end, 1 << 16):
            received.extend(chunk)

    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            os.write(write_end, b"y" * 20_000 + b"\n")

    threads = [threading.Thread(target=drain), threading.Thread(target=flood)]
    for thread in threads:
        thread.start()
    result = {"blob": "z" * 2 * 1024 * 1024}
    try:
        os.write(tasks_write, b"t0 k0 {}\n")  # its token and key, the first line it reads
        instance_side = worker._Worker("h.py:main_handler", "f", tasks_read, write_end, 0)
        report = orjson.dumps({**OK, "result": result})
        assert instance_side.send_frame(report, checked=True)  # as _Worker.end reports a result
    finally:
        stop.set()
        threads[1].join()
        for fd in (write_end, tasks_read, tasks_write):
            os.close(fd)
        threads[0].join()
        os.close(read_end)
    instance, logged = reader()
    instance._outcome = asyncio.get_running_loop().create_future()
    feed(instance, bytes(received))  # (in the loop, as the instance's output is read)
    assert instance._outcome.result() == {**OK, "result": result}
    assert logged and all(set(line) <= {"y"} for line in logged)


def _module(monkeypatch: pytest.MonkeyPatch, name: str, path: Path) -> None:
    """A module of the instance's, loaded from `path`, as far as its file goes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("VERSION = 1\n")
    os.utime(path, (1_000_000, 1_000_000))  # long before any run
    module = types.ModuleType(name)
    module.__file__ = str(path)
    monkeypatch.setitem(sys.modules, name, module)


def test_the_code_is_the_modules_from_the_handlers_folder_and_below(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = tmp_path / "fn"
    for name, path in {
        "handler": folder / "handler.py",
        "helper": folder / "helper.py",
        "pkg.inner": folder / "pkg" / "inner.py",
        "vendored": folder / ".venv" / "lib" / "site-packages" / "vendored.py",
        "neighbour": tmp_path / "fn2" / "neighbour.py",  # (a folder whose name starts alike)
        "elsewhere": tmp_path / "other.py",
    }.items():
        _module(monkeypatch, f"code_test_{name}", path)
    monkeypatch.setitem(sys.modules, "code_test_odd", _Odd())
    code = worker._CodeFiles(str(folder / "handler.py"))
    code.look(time.time_ns())
    reported = code.report()
    assert reported is not None
    assert [path for path, *_ in reported] == [str(folder / "handler.py"), str(folder / "helper.py"), str(folder / "pkg" / "inner.py")]
    st = (folder / "helper.py").stat()
    assert reported[1] == [str(folder / "helper.py"), st.st_mtime_ns, st.st_size, st.st_ino]
    assert code.report() is None, "reported once"


class _Odd:
    """Something a handler put in sys.modules that no file can be had of."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("no attributes here")


def test_a_file_is_statted_once_and_one_changed_as_its_run_went_is_marked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = tmp_path / "fn"
    _module(monkeypatch, "code_test_handler", folder / "handler.py")
    code = worker._CodeFiles(str(folder / "handler.py"))
    code.look(time.time_ns())
    first = code.report()
    (folder / "handler.py").write_text("VERSION = 2\n")  # after it was read: its signature stays as it was
    began = time.time_ns()
    _module(monkeypatch, "code_test_lazy", folder / "lazy.py")  # imported by a run...
    (folder / "lazy.py").write_text("VERSION = 2\n")  # ... and changed as it went on
    code.look(began)
    reported = code.report()
    assert reported is not None and first is not None
    assert reported[0] == first[0]
    assert reported[1][0] == str(folder / "lazy.py") and reported[1][1] == worker.CHANGED_WHILE_LOADING
    code.look(time.time_ns())
    assert code.report() is None, "no module came since: nothing to report"


def test_past_max_code_files_the_rest_are_not_watched(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = tmp_path / "fn"
    for n in range(worker.MAX_CODE_FILES + 3):
        _module(monkeypatch, f"code_test_m{n}", folder / f"m{n}.py")
    code = worker._CodeFiles(str(folder / "m0.py"))
    code.look(time.time_ns())
    reported = code.report()
    assert reported is not None and len(reported) == worker.MAX_CODE_FILES and code.left_out


async def test_a_result_that_cannot_be_written_for_want_of_descriptors_fails_the_run_saying_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should writing the result open a file (an import) when the run holds every descriptor, the
    run ends FAILED with the reason, and the worker goes on to report it."""

    def no_descriptor(value: Any) -> bytes:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(worker, "_result_json", no_descriptor)
    monkeypatch.setattr(worker, "_end_leftovers", lambda wait: [])  # (this process's own children are not the run's)
    read_end, write_end = os.pipe()
    tasks_read, tasks_write = os.pipe()
    try:
        os.write(tasks_write, b"t0 k0 {}\n")
        instance_side = worker._Worker("h.py:main_handler", "f", tasks_read, write_end, 0)
        instance_side.handler = lambda event, context: {"x": 1}
        instance_side.run_one({"request_id": "r1", "run": "n1", "deadline": time.time() + 60, "event": {}})
        received = os.read(read_end, 1 << 16)
    finally:
        for fd in (read_end, write_end, tasks_read, tasks_write):
            os.close(fd)
    instance, logged = reader()
    instance._outcome = asyncio.get_running_loop().create_future()
    feed(instance, received)
    assert instance._outcome.result() == {
        **{key: OK[key] for key in ("request_id", "run")},
        "ok": False,
        "error_type": "OSError",
        "error_message": "the handler's result could not be written: [Errno 24] Too many open files",
        "recycle": True,
    }
