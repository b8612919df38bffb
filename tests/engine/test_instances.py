"""Reading an instance's output: lines too long to hold are split, never inside a character;
a line's start that waits for its line feed is logged as it is; a frame sent in pieces is put
together whatever output comes between them."""

from __future__ import annotations

import asyncio
import errno
import os
import time
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventrun.engine import instances
from eventrun.engine.instances import (
    MAX_LINE,
    PARTIAL_LINE_WAIT,
    READ_CHUNK,
    CodeFile,
    Instance,
    InstancePool,
    PartialLine,
    Spec,
    code_changes,
    code_files,
)
from eventrun.engine.worker import FRAME_MARK, MAX_FRAME, PIPE_BUF, _frame_pieces

MARK = (FRAME_MARK + "t0").encode()  # an instance's, whose token is t0
RUN = ("r1", "n1")  # the request_id and nonce of the task it was given last


def reader() -> tuple[Instance, list[str]]:
    """An Instance without a process, for what reads its output; and the lines it logs."""
    instance = Instance.__new__(Instance)
    instance._mark = MARK
    instance._parts, instance._parts_size = [], 0
    instance._pending, instance._budget, instance._outcome = b"", 1 << 62, None
    instance._run, instance.foreign, instance._stopping_foreign = RUN, None, None
    instance._partial = PartialLine(instance._log_waiting)
    logged: list[str] = []
    instance._sink = logged.extend
    return instance, logged


def feed(instance: Instance, data: bytes, chunk: int = READ_CHUNK) -> None:
    for at in range(0, len(data), chunk):
        instance._feed(data[at : at + chunk])


def pieces(result: Any, run: tuple[str, str] = RUN) -> list[bytes]:
    """The lines a worker sends the frame of a run (`run`: its request_id and nonce) that returned `result` as."""
    named = b'{"request_id":"%s","run":"%s",' % (run[0].encode(), run[1].encode())
    return list(_frame_pieces(MARK + b" ", MARK + b" " + named + b'"ok":true,"result":' + orjson.dumps(result) + b"}\n"))


OK = {"request_id": RUN[0], "run": RUN[1], "ok": True}  # what a frame of RUN that ended well holds, but its result


# After 0 to 3 ASCII bytes, each character straddles the first cut at each of its inner boundaries (or at none).
@pytest.mark.parametrize("lead", [0, 1, 2, 3])
@pytest.mark.parametrize("character", ["é", "€", "𝄞"], ids=["2-byte", "3-byte", "4-byte"])
async def test_a_long_line_is_split_between_characters(character: str, lead: int) -> None:
    text = "a" * lead + character * (3 * MAX_LINE // len(character.encode()))
    instance, logged = reader()
    feed(instance, text.encode() + b"\n")
    assert len(logged) >= 3
    assert "".join(logged) == text
    assert all(len(piece.encode()) <= MAX_LINE for piece in logged[:-1])


async def test_a_long_line_of_mixed_characters_comes_back_whole() -> None:
    text = "y€é𝄞" * (MAX_LINE // 3)
    instance, logged = reader()
    feed(instance, text.encode() + b"\nafter\n")
    assert "".join(logged[:-1]) == text and logged[-1] == "after"


async def test_bytes_that_are_not_utf8_are_split_and_replaced_as_before() -> None:
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
    assert instance._outcome.result() == {**OK, "result": RESULT}
    assert logged == [*said, "after"]
    assert instance._parts == [] and instance._pending == b""


async def test_a_frame_in_pieces_comes_whole_past_the_log_limit() -> None:
    instance, logged = reader()
    instance._outcome = asyncio.get_running_loop().create_future()
    instance._budget = 10
    feed(instance, b"kept line\n" + b"".join(b"dropped %d\n" % n + piece for n, piece in enumerate(pieces(RESULT))))
    assert instance._outcome.result() == {**OK, "result": RESULT}
    assert logged == ["kept line"]


async def test_output_marked_with_another_token_is_output() -> None:
    # A handler cannot forge a piece of its run's frame: it does not have the token.
    forged = (FRAME_MARK + "t1").encode()
    sent = pieces(RESULT)
    instance, logged = reader()
    instance._outcome = asyncio.get_running_loop().create_future()
    feed(instance, sent[0] + forged + b'+{"ok":false}\n' + forged + b' {"ok":false}\n' + b"".join(sent[1:]))
    assert instance._outcome.result() == {**OK, "result": RESULT}
    assert logged == [forged.decode() + '+{"ok":false}', forged.decode() + ' {"ok":false}']


async def test_a_frame_in_pieces_longer_than_any_frame_is_unreadable() -> None:
    instance, logged = reader()
    instance._outcome = asyncio.get_running_loop().create_future()
    feed(instance, b"".join(pieces("z" * MAX_FRAME)))
    outcome = instance._outcome.result()
    assert outcome["error_type"] == "InternalError", outcome
    assert outcome["error_message"] == f"unreadable outcome: it is longer than {MAX_FRAME} bytes"
    assert instance._parts == [] and instance._parts_size == 0 and logged == []


class Clock:
    """time.monotonic as the tests set it (instances reads nothing else of time here)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(instances, "time", clock)
    return clock


def waited(instance: Instance, clock: Clock, seconds: float = PARTIAL_LINE_WAIT) -> None:
    """`seconds` pass, and the timer set for the output waiting fires (if one is set)."""
    clock.now += seconds
    partial = instance._partial
    if partial._timer is not None:
        partial._timer.cancel()
        partial._due()


async def test_output_without_its_line_feed_is_logged_once_it_has_waited(clock: Clock) -> None:
    instance, logged = reader()
    feed(instance, b"a\nno line feed")
    assert logged == ["a"]
    waited(instance, clock)
    assert logged == ["a", "no line feed"]  # while the run goes on, not at its end
    feed(instance, b" and the rest\n")
    feed(instance, b"waits")
    waited(instance, clock)
    feed(instance, b"\n")  # (the line feed of a line logged before it: no empty line)
    feed(instance, b"\nb\n")  # (an empty line of the run's own is one)
    assert logged == ["a", "no line feed", " and the rest", "waits", "", "b"]
    assert instance._pending == b""


async def test_a_progress_bar_is_logged_as_it_is_drawn(clock: Clock) -> None:
    instance, logged = reader()
    for percent in (10, 20, 30):
        feed(instance, b"\r%3d%%|%s|" % (percent, b"#" * (percent // 10)))
        waited(instance, clock)
    feed(instance, b"\n")
    assert logged == ["\r 10%|#|", "\r 20%|##|", "\r 30%|###|"]  # (a carriage return ends no line)


async def test_a_line_is_cut_only_once_its_start_has_waited(clock: Clock) -> None:
    instance, logged = reader()
    feed(instance, b"ab")
    clock.now += 0.6 * PARTIAL_LINE_WAIT
    feed(instance, b"c\nde")  # a line ends, and another begins to wait
    waited(instance, clock, 0.6 * PARTIAL_LINE_WAIT)  # (the timer set for "ab")
    assert logged == ["abc"]
    waited(instance, clock, 0.4 * PARTIAL_LINE_WAIT)
    assert logged == ["abc", "de"]


async def test_output_that_waits_is_logged_up_to_a_frame_or_a_character_not_all_come(clock: Clock) -> None:
    instance, logged = reader()
    instance._outcome = asyncio.get_running_loop().create_future()
    feed(instance, "abc é".encode()[:-1])
    waited(instance, clock)
    feed(instance, "é".encode()[1:] + b"\nout" + MARK[:5])
    waited(instance, clock)
    assert logged == ["abc ", "é", "out"]
    feed(instance, MARK[5:] + b" " + orjson.dumps({**OK, "result": 1}) + b"\n")
    assert instance._outcome.result() == {**OK, "result": 1}
    assert logged == ["abc ", "é", "out"] and instance._pending == b""


async def test_output_waiting_past_the_log_limit_is_not_logged(clock: Clock) -> None:
    instance, logged = reader()
    instance._budget = 4
    feed(instance, b"kept\ndropped")
    waited(instance, clock)
    assert logged == ["kept"]


async def test_a_kill_reaches_an_instance_that_has_not_made_its_process_group_yet(tmp_path) -> None:
    """The spawner tells an instance's pid as it forks it, a moment before the instance calls
    setsid(): a terminate then finds no group of that id, and must signal the process itself."""
    process = await asyncio.create_subprocess_exec(
        "sleep", "30", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE  # (in this process's group)
    )
    instance = Instance(Spec(function="f", handler="f.py:main", cwd=tmp_path, environment={}), process, "t0")
    await asyncio.wait_for(instance.kill(30), 5)  # SIGTERM ends it: no kill_grace waited out
    assert process.returncode == -signal.SIGTERM


class _Idle:
    """An idle instance in the pool, as far as making room goes."""

    def __init__(self, function: str, last_used: float) -> None:
        self.spec = Spec(function=function, handler="f.py:main", cwd=Path("."), environment={})
        self.alive = True
        self.last_used = last_used
        self.pid = 0
        self.killed = False
        self.code: tuple[CodeFile, ...] = ()

    async def kill(self, grace: float) -> None:
        self.killed = True


async def test_instances_starting_together_each_make_room(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = InstancePool(max_instances=3, idle_timeout=300, kill_grace=1, base_env={})
    idle = [_Idle("a", n) for n in range(3)]
    pool._idle["a"] = list(idle)  # type: ignore[list-item]
    started = asyncio.Event()

    async def spawn(spec: Spec) -> Any:
        await started.wait()  # (starting takes a while: every acquire is in before one ends)
        return _Idle(spec.function, 10)

    monkeypatch.setattr(pool, "_spawn", spawn)
    spec = Spec(function="b", handler="f.py:main", cwd=Path("."), environment={})
    acquiring = [asyncio.create_task(pool.acquire(spec)) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert pool.size == 3, "the three being started count"
    started.set()
    await asyncio.gather(*acquiring)
    await asyncio.sleep(0)
    assert [i.killed for i in idle] == [True, True, True], "each start made room: 3 alive at most, not 6"
    assert pool.size == 3


class _Slow(_Idle):
    """An idle instance that takes its time to go (its handler ignores SIGTERM: kill_grace)."""

    def __init__(self, function: str, last_used: float, gone: asyncio.Event) -> None:
        super().__init__(function, last_used)
        self.gone = gone

    async def kill(self, grace: float) -> None:
        self.killed = True
        await self.gone.wait()


async def test_instances_being_stopped_count_against_max_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    # 40 functions taking turns at max_instances = 4, each stopped instance ignoring SIGTERM:
    # 40 processes were alive for kill_grace while /healthz said 4. One more than the limit, while
    # an instance goes, is all there may be.
    pool = InstancePool(max_instances=2, idle_timeout=300, kill_grace=8, base_env={})
    gone = asyncio.Event()
    older, newer = _Slow("a", 1, gone), _Slow("b", 2, gone)
    pool._idle = {"a": [older], "b": [newer]}  # type: ignore[dict-item]
    spawned: list[str] = []

    async def spawn(spec: Spec) -> Any:
        spawned.append(spec.function)
        return _Idle(spec.function, 10)

    monkeypatch.setattr(pool, "_spawn", spawn)
    first = await asyncio.wait_for(pool.acquire(Spec(function="c", handler="f.py:main", cwd=Path("."), environment={})), 1)
    assert older.killed and not newer.killed, "the one used longest ago makes room"
    assert first.spec.function == "c" and pool.size == 3, "the run does not wait for it: one process more, for that moment"
    starting = asyncio.create_task(pool.acquire(Spec(function="d", handler="f.py:main", cwd=Path("."), environment={})))
    await asyncio.sleep(0.05)
    assert newer.killed, "room made again"
    assert not starting.done() and spawned == ["c"] and pool.size == 3, "never two more: it waits"
    gone.set()
    started = await asyncio.wait_for(starting, 5)
    assert started.spec.function == "d" and spawned == ["c", "d"] and pool.size == 2


async def test_the_reaper_stops_idle_instances_together(monkeypatch: pytest.MonkeyPatch) -> None:
    # One after the other, 20 instances that took kill_grace (5 s) each to go took 100 s.
    pool = InstancePool(max_instances=8, idle_timeout=4, kill_grace=5, base_env={})
    gone = asyncio.Event()
    stale = [_Slow(f"f{n}", 0, gone) for n in range(3)]
    pool._idle = {i.spec.function: [i] for i in stale}  # type: ignore[misc]
    await asyncio.wait_for(pool._reap_once(time.monotonic()), 1)
    assert all(i.killed for i in stale) and pool.size == 3, "all being stopped at once, and counted meanwhile"
    gone.set()
    await asyncio.gather(*pool._evicted)
    assert pool.size == 0


async def test_out_of_processes_or_descriptors_the_idle_instances_go_and_the_start_is_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Warm instances of other functions held the process slots (RLIMIT_NPROC) or descriptors for
    # instance_idle_timeout: every other function's run failed InstanceStartFailed meanwhile.
    pool = InstancePool(max_instances=32, idle_timeout=300, kill_grace=1, base_env={})
    idle = [_Idle("a", n) for n in range(3)]
    pool._idle["a"] = list(idle)  # type: ignore[list-item]
    tries: list[str] = []
    short = True  # of processes, until the idle instances have gone

    async def spawn(spec: Spec) -> Any:
        tries.append(spec.function)
        if short and not all(i.killed for i in idle):
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return _Idle(spec.function, 10)

    monkeypatch.setattr(pool, "_spawn", spawn)
    spec = Spec(function="b", handler="f.py:main", cwd=Path("."), environment={})
    started = await pool.acquire(spec)
    assert started.spec.function == "b" and tries == ["b", "b"]
    assert [i.killed for i in idle] == [True, True, True] and pool._idle == {}
    idle.append(_Idle("a", 20))  # (short again, and nothing idle in the pool to stop)
    with pytest.raises(BlockingIOError):
        await pool.acquire(spec)
    assert tries[2:] == ["b"], "tried once: nothing could be freed"
    assert pool.size == 1, "the instance started; the one that failed is not counted"


def signature(path: Path) -> CodeFile:
    """A file as an instance reports it."""
    st = path.stat()
    return (str(path), st.st_mtime_ns, st.st_size, st.st_ino)


def test_code_changes_are_an_edit_a_file_renamed_over_and_a_file_gone(tmp_path: Path) -> None:
    same, edited, renamed, gone = (tmp_path / f"{name}.py" for name in ("same", "edited", "renamed", "gone"))
    for path in (same, edited, renamed, gone):
        path.write_text("VERSION = 'A'\n")
    code = tuple(map(signature, (same, edited, renamed, gone)))
    assert code_changes(code) == {}
    edited.write_text("VERSION = 'B'\n")  # the same size: its time says it
    os.utime(edited, ns=(code[1][1] + 1, code[1][1] + 1))
    fresh = tmp_path / "renamed.py.sed"
    fresh.write_text("VERSION = 'B'\n")
    os.utime(fresh, ns=(code[2][1], code[2][1]))  # the same time and size: its inode says it (as `cp -p` and a rename)
    os.replace(fresh, renamed)
    gone.unlink()
    assert code_changes(code) == {str(edited): signature(edited), str(renamed): signature(renamed), str(gone): None}


def test_code_files_keeps_what_a_worker_writes_and_drops_the_rest() -> None:
    good = ["/f/handler.py", 1, 2, 3]
    assert code_files([good, ["/f/x.py", "1", 2, 3], ["/f/y.py", 1, 2], [None, 1, 2, 3], "no", ["/f/z.py", 1.5, 2, 3]]) == (
        ("/f/handler.py", 1, 2, 3),
    )
    assert code_files({"not": "a list"}) == ()


def _reported(path: Path) -> tuple[CodeFile, ...]:
    return (signature(path),)


async def test_an_outdated_idle_instance_is_stopped_and_the_run_gets_a_fresh_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    handler = tmp_path / "handler.py"
    handler.write_text("VERSION = 'A'\n")
    pool = InstancePool(max_instances=8, idle_timeout=300, kill_grace=1, base_env={})
    idle = [_Idle("f", n) for n in range(3)]
    for instance in idle:
        instance.code = _reported(handler)
    pool._idle["f"] = list(idle)  # type: ignore[list-item]
    fresh = _Idle("f", 10)
    spawns: list[str] = []

    async def spawn(spec: Spec) -> Any:
        spawns.append(spec.function)
        return fresh

    monkeypatch.setattr(pool, "_spawn", spawn)
    spec = Spec(function="f", handler=f"{handler}:main", cwd=tmp_path, environment={})
    assert await pool.acquire(spec) is idle[2] and spawns == [], "unchanged: reused"
    pool.keep_warm(idle[2], keep=True)  # type: ignore[arg-type]
    handler.write_text("VERSION = 'B'\n")
    os.utime(handler, ns=(idle[0].code[0][1] + 10**9, idle[0].code[0][1] + 10**9))
    with caplog.at_level("INFO", logger="eventrun.engine.instances"):
        assert await pool.acquire(spec) is fresh and spawns == ["f"], "each outdated one is passed over"
        fresh.code = _reported(handler)
        pool.keep_warm(fresh, keep=True)  # type: ignore[arg-type]
        assert await pool.acquire(spec) is fresh, "the fresh one is current"
        pool.keep_warm(fresh, keep=True)  # type: ignore[arg-type]
        late = _Idle("f", 20)  # busy with a run as the code changed: back only now
        late.code = idle[0].code
        pool.keep_warm(late, keep=True)  # type: ignore[arg-type]
        assert await pool.acquire(spec) is fresh
    await asyncio.gather(*pool._evicted)
    assert [i.killed for i in (*idle, late)] == [True, True, True, True] and not fresh.killed
    said = [r.getMessage() for r in caplog.records if "changed" in r.getMessage()]
    assert said == ["the code of function f changed (handler.py): its instances are started afresh"]


async def test_the_reaper_stops_outdated_idle_instances_without_waiting_for_a_run(tmp_path: Path) -> None:
    # Before, an instance holding old code stayed until a run would reuse it, or idle_timeout.
    handler = tmp_path / "handler.py"
    handler.write_text("VERSION = 'A'\n")
    pool = InstancePool(max_instances=8, idle_timeout=300, kill_grace=1, base_env={})
    current, outdated, other = _Idle("f", 1), _Idle("f", 2), _Idle("g", 3)
    for instance in (current, outdated):
        instance.code = _reported(handler)
        instance.last_used = time.monotonic()
    other.last_used = time.monotonic() - 301  # unused for idle_timeout
    handler.write_text("VERSION = 'B'\n")
    os.utime(handler, ns=(current.code[0][1] + 10**9, current.code[0][1] + 10**9))
    current.code = _reported(handler)
    pool._idle = {"f": [current, outdated], "g": [other]}  # type: ignore[dict-item]
    await pool._reap_once(time.monotonic())
    await asyncio.gather(*pool._evicted)
    assert pool._idle == {"f": [current], "g": []}
    assert (current.killed, outdated.killed, other.killed) == (False, True, True)
