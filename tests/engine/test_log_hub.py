"""The log hub: stamped lines per run, a size cap that says so, followers that end."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
from pathlib import Path

import pytest

from eventrun.engine.envelope import new_id
from eventrun.engine import logs
from eventrun.engine.errors import InvocationNotFound, StoreError
from eventrun.engine.logs import LeftOut, LogHub, closing_status, end_note


def test_lines_are_stamped_and_appended(tmp_path: Path) -> None:
    hub = LogHub(tmp_path, limit=1024)
    hub.write("r1", ["first", "second"])
    hub.close("r1")
    lines = hub.read("r1").decode().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["first", "second"]
    assert all(line.split(" ", 1)[0].endswith("Z") for line in lines)


def test_the_end_of_a_log_is_read_alone(tmp_path: Path) -> None:
    hub = LogHub(tmp_path, limit=1 << 20)
    hub.write("r1", [f"line {n:04d}" for n in range(1000)])
    whole = hub.read("r1")
    assert hub.read("r1", last=30) == whole[-30:]
    assert hub.read("r1", last=len(whole) + 5) == whole
    assert hub.read("never-written", last=30) == b""


def test_past_the_limit_the_log_says_so_once_and_stops_growing(tmp_path: Path) -> None:
    hub = LogHub(tmp_path, limit=2000)
    for _ in range(100):
        hub.write("r1", ["x" * 100])
    hub.close("r1")
    text = hub.read("r1").decode()
    assert len(text.encode()) <= 2000 + 200
    assert text.count("log limit of 2000 bytes reached") == 1
    assert text.splitlines()[-1].endswith("further output of this run is discarded")


def test_the_lines_of_a_batch_that_fit_under_the_limit_go_in_before_the_notice(tmp_path: Path) -> None:
    # A batch that crossed the limit was dropped whole: a 100 KB limit kept 61 KB of output.
    hub = LogHub(tmp_path, limit=2000)
    hub.write("r1", [f"line {n:02} " + "x" * 60 for n in range(100)])  # (one batch, about 9 KB)
    hub.close("r1")
    data = hub.read("r1")
    lines = [line.split(" ", 1)[1] for line in data.decode().splitlines()]
    assert lines[-1] == "[eventrun] log limit of 2000 bytes reached; further output of this run is discarded"
    kept = lines[:-1]
    assert kept == [f"line {n:02} " + "x" * 60 for n in range(len(kept))] and len(kept) == 2000 // (25 + 69)
    assert len(data) - len(data.splitlines()[-1]) - 1 <= 2000


def test_eventrun_s_own_lines_go_in_past_the_limit(tmp_path: Path) -> None:
    # The notice says the run's output is discarded: how the run ended is still told at the end.
    hub = LogHub(tmp_path, limit=2000)
    for _ in range(100):
        hub.write("r1", ["x" * 100])
    hub.note("r1", "[eventrun] instance 7 was discarded after the failure")
    hub.write("r1", ["more output"])
    hub.note("r1", end_note("FAILED", "ValueError", "boom"))
    hub.close("r1")
    lines = [line.split(" ", 1)[1] for line in hub.read("r1").decode().splitlines()]
    assert lines[-3:] == [
        "[eventrun] log limit of 2000 bytes reached; further output of this run is discarded",
        "[eventrun] instance 7 was discarded after the failure",
        "[eventrun] run ended FAILED: ValueError: boom",
    ]
    assert "more output" not in lines


def test_the_start_line_goes_in_though_the_first_output_is_past_the_limit(tmp_path: Path) -> None:
    hub = LogHub(tmp_path, limit=100)
    hub.hold("r1", "[eventrun] run started on instance 7")
    hub.write("r1", ["x" * 200])
    hub.close("r1")
    assert [line.split(" ", 1)[1] for line in hub.read("r1").decode().splitlines()] == [
        "[eventrun] run started on instance 7",
        "[eventrun] log limit of 100 bytes reached; further output of this run is discarded",
    ]


def test_what_a_function_said_stays_on_eventrun_s_closing_line_escaped(tmp_path: Path) -> None:
    # An exception's message often holds the caller's data: a line break in it made a line that
    # passed for eventrun's own, and an escape sequence reached the terminal of `eventrun logs`.
    hub = LogHub(tmp_path, limit=2000)
    forged = "boom\n2026-12-07T14:56:20.000Z [eventrun] run ended FINISHED\r\x1b[31m\x85é 中\tend"
    hub.note("r1", end_note("FAILED", "Bad\nType", forged))
    hub.close("r1")
    (line,) = hub.read("r1").decode().splitlines()
    assert line.split(" ", 1)[1] == (
        "[eventrun] run ended FAILED: Bad\\nType: boom\\n2026-12-07T14:56:20.000Z [eventrun] run ended FINISHED"
        "\\r\\x1b[31m\\x85é 中\\tend"
    )
    assert closing_status(line) == "FAILED"


def test_a_closing_line_names_the_status_the_run_ended_with() -> None:
    assert closing_status("2026-01-01T00:00:00.000Z " + end_note("TIMED_OUT", "TimedOut", "late: 1: 2")) == "TIMED_OUT"
    assert closing_status("2026-01-01T00:00:00.000Z [eventrun] run ended RUNNING: x: y") is None
    assert closing_status("2026-01-01T00:00:00.000Z output") is None
    assert closing_status("") is None


async def test_a_follower_gets_old_and_new_lines_and_ends_with_the_run(tmp_path: Path) -> None:
    hub = LogHub(tmp_path, limit=10_000)
    hub.write("r1", ["before"])
    ended = False
    seen: list[str] = []

    async def has_ended() -> bool:
        return ended

    async def follow() -> None:
        async for line in hub.follow("r1", has_ended):
            seen.append(line.split(" ", 1)[1])

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.01)
    hub.write("r1", ["after"])
    ended = True
    hub.close("r1")
    await asyncio.wait_for(task, 1)
    assert seen == ["before", "after"]


async def _follow_tail(hub: LogHub, tail: int, then: str) -> list[object]:
    """What a follow of the tail of r1 gives: the lines (their text), after any LeftOut; `then` is
    written once it has begun, and the run ends."""
    ended = False

    async def has_ended() -> bool:
        return ended

    async def follow() -> list[object]:
        return [item if isinstance(item, LeftOut) else item.split(" ", 1)[1] async for item in hub.follow("r1", has_ended, tail=tail)]

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.01)
    hub.write("r1", [then])
    ended = True
    hub.close("r1")
    return await asyncio.wait_for(task, 1)


@pytest.mark.parametrize("tail", [1, 30, 31, 32, 100, 1000])
async def test_a_follow_of_the_tail_gives_the_lines_that_begin_within_it_then_live_ones(tmp_path: Path, tail: int) -> None:
    # A live view of a long run: the log so far may be 64 MB, the page shows its end.
    hub = LogHub(tmp_path, limit=100_000)
    hub.write("r1", [f"line {n:03}" for n in range(100)])
    data = hub.read("r1")
    starts = [0, *(i + 1 for i, byte in enumerate(data) if byte == 0x0A)][:-1]
    first = next((start for start in starts if start >= len(data) - tail), len(data))
    expected_old = [line.split(" ", 1)[1] for line in data[first:].decode().splitlines()]
    seen = await _follow_tail(hub, tail, "live")
    assert seen == [LeftOut(first), *expected_old, "live"], (len(data), seen[:3])


async def test_a_follow_of_a_tail_longer_than_the_log_leaves_nothing_out(tmp_path: Path) -> None:
    hub = LogHub(tmp_path, limit=100_000)
    hub.write("r1", ["one", "two"])
    assert await _follow_tail(hub, 10_000, "three") == ["one", "two", "three"]


async def test_a_follower_that_cannot_open_the_log_now_is_told_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = LogHub(tmp_path, limit=10_000)
    hub.write("r1", ["a line"])
    opened = os.open

    def no_descriptor_left(path: str, flags: int, *args: int) -> int:
        if flags == os.O_RDONLY:
            raise OSError(errno.EMFILE, "Too many open files")
        return opened(path, flags, *args)

    async def running() -> bool:
        return False

    monkeypatch.setattr(logs.os, "open", no_descriptor_left)
    with pytest.raises(StoreError, match=r"^the run's log .*r1\.log cannot be read now \(Too many open files\); try again later$"):
        async for _ in hub.follow("r1", running):
            pass


def test_a_log_folder_removed_while_serving_is_made_again(tmp_path: Path) -> None:
    hub = LogHub(tmp_path / "logs", limit=10_000)
    hub.write("ab-first", ["one"])
    hub.close("ab-first")
    shutil.rmtree(tmp_path / "logs")
    hub.write("ab-second", ["two"])
    hub.close("ab-second")
    assert hub.read("ab-second").decode().endswith(" two\n")


def test_a_run_that_writes_nothing_leaves_no_file_and_reads_empty(tmp_path: Path) -> None:
    hub = LogHub(tmp_path / "logs", limit=10_000)
    hub.open("ab-quiet")
    assert hub.is_open("ab-quiet")
    hub.close("ab-quiet")
    assert not hub.is_open("ab-quiet")
    assert hub.read("ab-quiet") == b""
    assert not hub.path("ab-quiet").exists()


def test_a_continued_log_keeps_its_limit(tmp_path: Path) -> None:
    # After a restart a run's log is continued (the server notes why the run ended): the
    # limit counts what the file already holds.
    first = LogHub(tmp_path, limit=300)
    first.write("ab-run", ["x" * 250])
    first.close("ab-run")
    second = LogHub(tmp_path, limit=300)
    second.write("ab-run", ["y" * 100])
    second.close("ab-run")
    text = second.read("ab-run").decode()
    assert "y" * 100 not in text
    assert text.splitlines()[-1].endswith("further output of this run is discarded")


def test_a_held_line_goes_in_before_the_first_line_or_not_at_all(tmp_path: Path) -> None:
    hub = LogHub(tmp_path, limit=10_000)
    hub.hold("ab-loud", "[eventrun] started")
    hub.write("ab-loud", ["output"])
    hub.hold("ab-loud", "[eventrun] later")  # the file exists now: written at once
    hub.close("ab-loud")
    assert [line.split(" ", 1)[1] for line in hub.read("ab-loud").decode().splitlines()] == [
        "[eventrun] started", "output", "[eventrun] later",
    ]
    hub.hold("ab-quiet", "[eventrun] started")
    hub.close("ab-quiet")
    assert hub.read("ab-quiet") == b""
    assert not hub.path("ab-quiet").exists()


def test_logs_are_kept_in_time_folders_that_stay_small(tmp_path: Path) -> None:
    hub = LogHub(tmp_path, limit=10_000)
    now = new_id()
    if now[6:8] == "ff":  # the last leaf of its 4.7 hours: go one back, so the next is in them too
        now = f"{int(now[:8], 16) - 1:08x}{now[8:]}"
    later = f"{int(now[:8], 16) + 1:08x}{now[8:]}"  # 65.5 s later: the next leaf folder
    for request_id in (now, later):
        hub.write(request_id, ["line"])
        hub.close(request_id)
    assert hub.path(now).parent != hub.path(later).parent
    assert hub.path(now).parent.parent == hub.path(later).parent.parent  # the same 4.7 hours
    assert hub.path(now).relative_to(tmp_path).parts == (now[:6], now[6:8], f"{now}.log")
    assert hub.read(later).decode().endswith(" line\n")


def test_a_log_in_the_old_layout_is_read_and_continued_there(tmp_path: Path) -> None:
    request_id = new_id()
    old = tmp_path / request_id[:2] / f"{request_id}.log"
    old.parent.mkdir()
    old.write_text("2026-01-01T00:00:00.000Z before the upgrade\n")
    hub = LogHub(tmp_path, limit=10_000)
    assert hub.read(request_id).decode().splitlines() == ["2026-01-01T00:00:00.000Z before the upgrade"]
    hub.write(request_id, ["[eventrun] noted after the restart"])
    hub.close(request_id)
    lines = hub.read(request_id).decode().splitlines()
    assert lines[0].endswith("before the upgrade") and lines[1].endswith("noted after the restart")
    assert not hub.path(request_id).exists()


def test_with_a_sink_the_local_file_is_only_a_spool_until_the_run_ends(tmp_path: Path) -> None:
    hub = LogHub(tmp_path, limit=10_000)
    shipped: list[tuple[str, bytes]] = []
    hub.sink = lambda request_id, data: shipped.append((request_id, data))
    request_id = new_id()
    hub.write(request_id, ["one", "two"])
    assert hub.path(request_id).is_file()
    hub.close(request_id)
    assert not hub.path(request_id).exists(), "the shared store keeps the log: no copy stays behind"
    assert [r for r, _ in shipped] == [request_id]
    assert shipped[0][1].decode().splitlines()[1].endswith(" two")


async def test_a_log_file_that_cannot_be_made_costs_the_file_not_the_run(tmp_path: Path, caplog) -> None:
    hub = LogHub(tmp_path, limit=10_000)
    shipped: list[bytes] = []
    hub.sink = lambda request_id, data: shipped.append(data)
    request_id = new_id()
    hub.path(request_id).parent.parent.write_text("a file where the run's folder would go")
    ended = False

    async def has_ended() -> bool:
        return ended

    seen: list[str] = []

    async def follow() -> None:
        async for line in hub.follow(request_id, has_ended):
            seen.append(line.split(" ", 1)[1])

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.01)
    hub.hold(request_id, "[eventrun] run started")
    hub.write(request_id, ["one"])
    hub.write(request_id, ["two"])
    ended = True
    hub.close(request_id)
    await asyncio.wait_for(follower, 5)
    assert seen == ["[eventrun] run started", "one", "two"]  # live followers and the sink still get every line
    assert [line.split(" ", 1)[1] for line in b"".join(shipped).decode().splitlines()] == seen
    errors = [r.getMessage() for r in caplog.records if "cannot write the log" in r.getMessage()]
    assert len(errors) == 1 and request_id in errors[0], errors  # said once, not tried again each line
    assert hub.read(request_id) == b""


def test_a_log_file_that_stops_taking_writes_is_given_up_for_the_run(tmp_path: Path, monkeypatch, caplog) -> None:
    hub = LogHub(tmp_path, limit=10_000)
    request_id = new_id()
    hub.write(request_id, ["kept"])

    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("eventrun.engine.logs.os.write", full)
    hub.write(request_id, ["lost"])
    hub.write(request_id, ["lost too"])
    monkeypatch.undo()
    hub.write(request_id, ["not tried again"])
    hub.close(request_id)
    assert [line.split(" ", 1)[1] for line in hub.read(request_id).decode().splitlines()] == ["kept"]
    assert sum("No space left on device" in r.getMessage() for r in caplog.records) == 1
    hub.write(new_id(), ["another run's log is written as before"])


async def _never_ended() -> bool:
    return False


def _follow(hub: LogHub, request_id: str, ended: list[bool]) -> tuple[asyncio.Task[None], list[str]]:
    """A follower of the run, as a task, and the lines it has seen (without their stamps); it
    lets the loop turn once a line, as one sending each line to a client does."""
    seen: list[str] = []

    async def has_ended() -> bool:
        return ended[0]

    async def follow() -> None:
        async for line in hub.follow(request_id, has_ended):
            seen.append(line.split(" ", 1)[1])
            await asyncio.sleep(0)

    return asyncio.create_task(follow()), seen


async def test_a_follower_that_joins_during_a_run_gets_the_lines_written_before_it_ends(tmp_path: Path) -> None:
    hub = LogHub(tmp_path, limit=1 << 20)
    request_id = new_id()
    hub.write(request_id, [f"early {n}" for n in range(1000)])
    ended = [False]
    follower, seen = _follow(hub, request_id, ended)
    for _ in range(10):
        await asyncio.sleep(0)  # the follower reads what the file holds, and is still sending it ...
    assert 0 < len(seen) < 1000
    hub.write(request_id, ["tail"])  # ... when the run writes its last line and ends
    ended[0] = True
    hub.close(request_id)
    await asyncio.wait_for(follower, 5)
    assert seen == [f"early {n}" for n in range(1000)] + ["tail"]


async def test_a_follower_that_falls_behind_reads_on_from_the_file(tmp_path: Path) -> None:
    hub = LogHub(tmp_path, limit=64 << 20)
    request_id = new_id()
    ended = [False]
    follower, seen = _follow(hub, request_id, ended)
    await asyncio.sleep(0.01)
    written = [f"line {n} " + "x" * 100 for n in range(30_000)]
    for at in range(0, len(written), 500):  # 3 MiB in bursts, faster than the follower takes them
        hub.write(request_id, written[at : at + 500])
        if at % 5000 == 0:
            await asyncio.sleep(0)
    ended[0] = True
    hub.close(request_id)
    await asyncio.wait_for(follower, 10)
    assert seen == written  # every line, in order, none twice, and not cut off


async def test_a_follower_of_a_large_log_reads_it_a_chunk_at_a_time(tmp_path: Path, monkeypatch) -> None:
    hub = LogHub(tmp_path, limit=64 << 20)
    request_id = new_id()
    written = [f"line {n}" for n in range(5000)]
    hub.write(request_id, written)
    hub.close(request_id)
    reads: list[int] = []
    read_lines = logs._read_lines

    def counted(fd: int, offset: int) -> bytes:
        data = read_lines(fd, offset)
        reads.append(len(data))
        return data

    monkeypatch.setattr(logs, "FOLLOW_CHUNK", 1000)
    monkeypatch.setattr(logs, "_read_lines", counted)
    follower, seen = _follow(hub, request_id, [True])
    await asyncio.wait_for(follower, 5)
    assert seen == written
    assert max(reads) <= 1000 and len(reads) > 50  # whole lines, a chunk at a time


async def test_a_line_longer_than_a_chunk_is_read_whole(tmp_path: Path, monkeypatch) -> None:
    hub = LogHub(tmp_path, limit=64 << 20)
    request_id = new_id()
    written = ["short", "y" * 3500, "short again", "z" * 999, "end"]
    hub.write(request_id, written)
    hub.close(request_id)
    monkeypatch.setattr(logs, "FOLLOW_CHUNK", 1000)
    follower, seen = _follow(hub, request_id, [True])
    await asyncio.wait_for(follower, 5)
    assert seen == written


async def test_a_follower_that_stops_reading_holds_a_bounded_share_of_the_run_output(tmp_path: Path) -> None:
    hub = LogHub(tmp_path, limit=64 << 20)
    request_id = new_id()
    hub.write(request_id, ["first"])
    lines = hub.follow(request_id, _never_ended)
    assert (await anext(lines)).endswith(" first")  # it is live now, and reads no further
    for _ in range(2000):  # 2 MB of output in batches of 10 lines
        hub.write(request_id, ["x" * 100] * 10)
    (follower,) = hub._followers[request_id]
    held = sum(item[2] for item in follower.queue._queue if isinstance(item, tuple))  # type: ignore[attr-defined]
    assert follower.behind and held <= logs.FOLLOWER_LAG <= 128 * 1024, held  # (not the 2 MB written)
    hub.close(request_id)
    await lines.aclose()


async def test_a_log_deleted_while_a_follower_reads_it_is_read_to_its_end(tmp_path: Path, monkeypatch) -> None:
    hub = LogHub(tmp_path, limit=64 << 20)
    request_id = new_id()
    written = [f"line {n}" for n in range(5000)]
    hub.write(request_id, written)
    hub.close(request_id)
    monkeypatch.setattr(logs, "FOLLOW_CHUNK", 1000)
    follower, seen = _follow(hub, request_id, [True])
    for _ in range(10):
        await asyncio.sleep(0)
    assert 0 < len(seen) < 5000
    hub.remove(request_id)  # retention, while the follower is reading
    await asyncio.wait_for(follower, 5)
    assert seen == written


async def test_a_follower_of_an_ended_run_deleted_meanwhile_reads_it_and_ends(tmp_path: Path) -> None:
    # Retention deletes the run (and its record) while the follower reads its log: the run had
    # ended, and the follower gets every line and its end, not an error.
    hub = LogHub(tmp_path, limit=1 << 20)
    request_id = new_id()
    written = [f"line {n}" for n in range(5000)]
    hub.write(request_id, written)
    hub.close(request_id)
    deleted = False
    seen: list[str] = []

    async def has_ended() -> bool:
        if deleted:
            raise InvocationNotFound(request_id)
        return True

    async def follow() -> None:
        async for line in hub.follow(request_id, has_ended):
            seen.append(line.split(" ", 1)[1])
            await asyncio.sleep(0)

    follower = asyncio.create_task(follow())
    for _ in range(10):
        await asyncio.sleep(0)
    hub.remove(request_id)
    deleted = True
    await asyncio.wait_for(follower, 5)
    assert seen == written


async def test_a_follower_gets_a_line_holding_a_carriage_return_as_one_line(tmp_path: Path) -> None:
    hub = LogHub(tmp_path, limit=10_000)
    request_id = new_id()
    hub.write(request_id, ["progress 10%\rprogress 50%"])
    ended = [False]
    follower, seen = _follow(hub, request_id, ended)
    await asyncio.sleep(0.01)
    hub.write(request_id, ["done\r"])
    ended[0] = True
    hub.close(request_id)
    await asyncio.wait_for(follower, 5)
    assert seen == ["progress 10%\rprogress 50%", "done\r"]  # as the run wrote them, read or live


async def test_a_follower_of_lines_no_file_holds_is_cut_off_rather_than_held(tmp_path: Path) -> None:
    hub = LogHub(tmp_path, limit=64 << 20)
    request_id = new_id()
    hub.path(request_id).parent.parent.write_text("a file where the run's folder would go")
    ended = [False]
    follower, seen = _follow(hub, request_id, ended)
    await asyncio.sleep(0.01)
    for _ in range(30):
        hub.write(request_id, ["x" * 1000] * 100)  # 3 MB the follower does not take meanwhile
    ended[0] = True
    hub.close(request_id)
    await asyncio.wait_for(follower, 5)
    assert seen[-1] == "[eventrun] follower fell too far behind; read the log again to continue"
    assert 0 < len(seen) - 1 < 3000


def test_a_log_folder_removed_while_its_run_writes_is_made_again_with_what_it_held(tmp_path: Path, caplog) -> None:
    # The open file was removed with its folder and written on: the rest of the run's log went
    # where no one could read it, silently.
    hub = LogHub(tmp_path / "logs", limit=10_000)
    request_id = new_id()
    hub.write(request_id, ["before"])
    shutil.rmtree(tmp_path / "logs")
    hub.write(request_id, ["after"])
    hub.note(request_id, "[eventrun] run ended")
    hub.close(request_id)
    lines = [line.split(" ", 1)[1] for line in hub.read(request_id).decode().splitlines()]
    assert lines == [
        "before",
        "after",
        "[eventrun] run ended",
        "[eventrun] this log's file was removed while the run went on; made again with what it held",
    ]
    assert sum("was removed while the run went on" in r.getMessage() for r in caplog.records) == 1


def test_a_log_file_removed_is_made_again_while_its_run_goes_on(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(logs, "FILE_CHECK_EVERY", 0.0)  # (looked at with every write)
    hub = LogHub(tmp_path, limit=10_000)
    request_id = new_id()
    hub.write(request_id, ["one"])
    hub.path(request_id).unlink()
    hub.write(request_id, ["two"])
    assert [line.split(" ", 1)[1] for line in hub.read(request_id).decode().splitlines()] == [
        "one",
        "[eventrun] this log's file was removed while the run went on; made again with what it held",
        "two",
    ]
    hub.write(request_id, ["three"])
    hub.close(request_id)
    assert hub.read(request_id).decode().endswith(" three\n")


def test_a_removed_log_that_cannot_be_made_again_costs_the_file_not_the_run(tmp_path: Path, caplog) -> None:
    hub = LogHub(tmp_path / "logs", limit=10_000)
    request_id = new_id()
    hub.write(request_id, ["before"])
    shutil.rmtree(tmp_path / "logs")
    (tmp_path / "logs").write_text("a file where the folder was")
    hub.write(request_id, ["after"])
    hub.close(request_id)  # no exception
    assert hub.read(request_id) == b""
    assert sum(f"cannot write the log of run {request_id}" in r.getMessage() for r in caplog.records) == 1


def test_retention_takes_a_logs_time_folders_once_they_are_empty(tmp_path: Path) -> None:
    # They piled up empty: a folder for every minute that saw a log, for as long as the server ran.
    hub = LogHub(tmp_path, limit=1024)
    old, kept = "01a25100-0000-7000-8000-000000000001", "01a25200-0000-7000-8000-000000000002"  # other 4.7 hours
    same_minute = "01a25100-0001-7000-8000-000000000003"
    for request_id in (old, kept, same_minute):
        hub.write(request_id, ["a line"])
        hub.close(request_id)
    minute, period = hub.path(old).parent, hub.path(old).parent.parent
    hub.prune(old)
    assert not hub.path(old).exists() and minute.is_dir(), "a log of that minute is still kept"
    hub.prune(same_minute)
    assert not minute.exists() and not period.exists(), "emptied, the minute's and the period's folders go"
    assert hub.path(kept).is_file()
    hub.write(old, ["written again into a folder pruned away"])  # (a run of that minute ending late)
    hub.close(old)
    assert hub.read(old).decode().endswith(" written again into a folder pruned away\n")
