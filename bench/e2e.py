"""No-op jobs from the first enqueue to all finished: eventrun next to arq, in one run.

    python bench/e2e.py [--jobs 5000] [--concurrency 64] [--warmup 200] [--rounds 5]
                        [--instances 32] [--only eventrun|arq] [--data-dir DIR]

eventrun: a real `eventrun serve` (temporary data_dir, free port) with one async no-op
function; --concurrency clients (aiohttp, one connection each) POST
/functions/noop/invocations until --jobs are accepted. The runs go on meanwhile, each in a
worker instance forked from the spawner (`fork_instances`, the default): the function's
`concurrency` and `[server] max_instances` are both --instances (32, the server's default
max_instances), so that many runs go at once. (16 gave about 7 % fewer jobs/s: with half the
runs in each of the store's commits, the writer spends more per run. 100, arq's max_jobs, gave
about 20 % more: the runs keep up with the intake, and the round is bound by the acknowledgements.)

arq: a local `redis-server` (free port, in memory: no RDB snapshot, no AOF) and an arq worker
in its own process, tuned as arq's users tune it for throughput (max_jobs = 100,
poll_delay = 0.01 s; results kept, as arq does by default). --concurrency coroutines of
this process call `enqueue_job("noop")` on one ArqRedis pool until --jobs are enqueued.

The figure is jobs/s: --jobs over the time from the first enqueue until every job has
finished. The two are measured in --rounds rounds, each starting both systems afresh, in
alternating order; the ratio is given for each round and as the median of the rounds (on a
noisy machine one round can be off by a fifth either way). Finished is polled every 20 ms: for eventrun the FINISHED counter of GET /metrics,
for arq the length of its queue (a job leaves arq's queue only once its result is written).
At the end both are checked once more (eventrun: GET /counts; arq: every job's result).
Also printed: drain/s, the jobs still unfinished at the last acknowledgement over the time
they took to finish (the runs alone, with no intake beside them), and the CPU seconds each
process used until all had finished (on a 2-core machine, the cores are the bound).
Before the clock starts, --warmup jobs go through each system unmeasured, so both start warm
(eventrun's instances started, arq's connections open).

The two do not do the same work. eventrun commits every acceptance, every start and every end
to SQLite with synchronous = FULL before it acknowledges or moves on, and runs each job in a
separate process; arq keeps its jobs in Redis's memory and runs each as a coroutine in the
worker's own event loop. Both share the machine's cores with this client. With
--data-dir /dev/shm eventrun's store is on tmpfs, where its commits' flushes cost nothing: the
difference is what they cost. redis-server and arq are not part of eventrun's dependencies:
`apt-get install redis-server`, `pip install arq`; without them, only eventrun can be measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

import _server
from _server import NOOP_HANDLER, free_port, require_eventrun, run_measure, runs_total

FUNCTION = "noop"
BODY = b'{"bench": true}'
POLL_INTERVAL = 0.02
STALL_TIMEOUT = 30.0  # nothing finished for this long: give up waiting
ARQ_MAX_JOBS = 100
ARQ_POLL_DELAY = 0.01
ARQ_QUEUE = "arq:queue"
CORES = os.cpu_count() or 1

MANIFEST = """\
[server]
host = "127.0.0.1"
port = {port}
data_dir = %(data_dir)s
max_instances = %(instances)d

[functions.%(function)s]
handler = "noop.py:main_handler"
async_execution = true
concurrency = %(instances)d
qps_limit = 1000000
"""


@dataclass
class Measure:
    """What one system did with the jobs."""

    name: str
    jobs: int
    enqueue_elapsed: float = 0.0  # first enqueue to last acknowledgement
    finish_elapsed: float | None = None  # first enqueue to every job finished; None: stalled
    finished_at_enqueued: int = 0  # jobs already finished when the last enqueue was acknowledged
    errors: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds while measured
    note: str = ""

    @property
    def enqueued_per_s(self) -> float:
        """Acknowledged enqueues per second."""
        return self.jobs / self.enqueue_elapsed if self.enqueue_elapsed else float("nan")

    @property
    def drain_per_s(self) -> float:
        """Jobs finished per second after the last enqueue: the runs alone, with no intake beside them."""
        if not self.finish_elapsed or self.finish_elapsed <= self.enqueue_elapsed:
            return float("nan")
        return (self.jobs - self.finished_at_enqueued) / (self.finish_elapsed - self.enqueue_elapsed)

    @property
    def jobs_per_s(self) -> float:
        """Finished jobs per second, from the first enqueue to the last finish."""
        return self.jobs / self.finish_elapsed if self.finish_elapsed else float("nan")


async def drive(
    name: str,
    jobs: int,
    concurrency: int,
    enqueue: Callable[[], Awaitable[None]],
    finished: Callable[[], Awaitable[int]],
    base_finished: int,
    cpu: Callable[[], dict[str, float]],
) -> Measure:
    """Enqueue `jobs` from `concurrency` workers while polling how many have finished."""
    result = Measure(name, jobs)
    remaining = iter(range(jobs))
    enqueued = asyncio.Event()

    async def worker() -> None:
        for _ in remaining:
            try:
                await enqueue()
            except Exception as exc:  # counted, and the total is then short: reported below
                key = type(exc).__name__
                result.errors[key] = result.errors.get(key, 0) + 1

    async def load() -> None:
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            result.enqueue_elapsed = time.perf_counter() - started
            enqueued.set()

    async def watch() -> None:
        seen, progress = -1, time.perf_counter()
        drained_from_set = False
        while True:
            done = await finished() - base_finished
            now = time.perf_counter()
            if done != seen:
                seen, progress = done, now
            if enqueued.is_set():
                if not drained_from_set:
                    drained_from_set = True
                    result.finished_at_enqueued = done
                target = jobs - sum(result.errors.values())
                if done >= target:
                    result.finish_elapsed = now - started
                    ended = cpu_now()
                    result.cpu = {key: ended[key] - cpu_started.get(key, 0.0) for key in ended}
                    return
                if now - progress > STALL_TIMEOUT:
                    result.note = f"stalled: {done} of {target} finished"
                    return
            await asyncio.sleep(POLL_INTERVAL)

    def cpu_now() -> dict[str, float]:
        return {**cpu(), "client": time.process_time()}

    cpu_started = cpu_now()
    started = time.perf_counter()
    await asyncio.gather(load(), watch())
    return result


# --- eventrun ------------------------------------------------------------------------------


async def eventrun_load(base: str, server: int, args: argparse.Namespace) -> Measure:
    """Warm up, then measure eventrun."""
    url = f"{base}/functions/{FUNCTION}/invocations"
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def enqueue() -> None:
            async with session.post(url, data=BODY, headers=headers) as answer:
                await answer.read()
                if answer.status != 202:
                    raise RuntimeError(f"HTTP {answer.status}")

        async def finished() -> int:
            async with session.get(f"{base}/metrics") as answer:
                return runs_total(await answer.text(), FUNCTION)["FINISHED"]

        def cpu() -> dict[str, float]:
            return _server.eventrun_cpu(server)

        if args.warmup:
            await drive("warm-up", args.warmup, args.concurrency, enqueue, finished, 0, cpu)
        result = await drive("eventrun", args.jobs, args.concurrency, enqueue, finished, await finished(), cpu)
        async with session.get(f"{base}/counts") as answer:
            counts = (await answer.json())["Functions"][FUNCTION]
        expected = args.jobs + args.warmup
        if counts["FINISHED"] != expected:
            result.note += f" check: GET /counts says {counts} (expected {expected} FINISHED)"
        else:
            print(f"  check: GET /counts has {counts['FINISHED']} FINISHED runs of {FUNCTION} (with the warm-up)")
    return result


def bench_eventrun(work: Path, args: argparse.Namespace) -> Measure:
    """Serve the no-op function with eventrun and measure it."""
    require_eventrun()
    folder = work / "eventrun"
    try:
        with _server.data_dir(work, args.data_dir) as data:
            manifest = MANIFEST % {"instances": args.instances, "function": FUNCTION, "data_dir": json.dumps(str(data))}
            with _server.eventrun_server(folder, manifest, {"noop.py": NOOP_HANDLER}) as (base, proc):
                print(f"eventrun serve ready at {base} (concurrency = max_instances = {args.instances}, data_dir {data})")
                result = run_measure(eventrun_load(base, proc.pid, args))
    except _server.ServerFailed as exc:
        raise SystemExit(str(exc)) from None
    if result.errors or result.note:
        print(f"  eventrun serve's last output:\n{_server.tail(folder / 'eventrun.log')}")
    return result


# --- arq -----------------------------------------------------------------------------------


async def noop(ctx: dict[str, object]) -> None:
    """The arq job: return at once."""
    return None


def run_arq_worker(port: int) -> None:
    """The arq worker process (tuned: max_jobs = 100, poll_delay = 0.01 s)."""
    from arq.connections import RedisSettings
    from arq.worker import Worker

    worker = Worker(
        functions=[noop],
        redis_settings=RedisSettings(host="127.0.0.1", port=port),
        max_jobs=ARQ_MAX_JOBS,
        poll_delay=ARQ_POLL_DELAY,
        handle_signals=True,  # SIGTERM: stop picking jobs, then exit
    )
    worker.run()


def arq_missing() -> str:
    """Why arq cannot be measured here, or "" if it can."""
    missing = []
    if shutil.which("redis-server") is None:
        missing.append("redis-server (apt-get install -y redis-server)")
    if importlib.util.find_spec("arq") is None:
        missing.append("arq (pip install arq)")
    return " and ".join(missing)


@contextlib.contextmanager
def redis_server(work: Path) -> Iterator[tuple[int, int]]:
    """A throwaway redis-server on a free port, in memory only; its port and pid."""
    port = free_port()
    folder = work / "redis"
    folder.mkdir()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
            "--save", "", "--appendonly", "no", "--protected-mode", "no"]
    proc = _server.launch(argv, folder, folder / "redis.log")
    try:
        deadline = time.monotonic() + 10
        while not ping(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"redis-server did not start:\n{_server.tail(folder / 'redis.log')}")
            time.sleep(0.05)
        yield port, proc.pid
    finally:
        _server.stop(proc)


def ping(port: int) -> bool:
    """True once a Redis server answers PING on the port."""
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


async def arq_load(port: int, pids: dict[str, int], args: argparse.Namespace) -> Measure:
    """Warm up, then measure arq."""
    from arq.connections import RedisSettings, create_pool

    pool = await create_pool(RedisSettings(host="127.0.0.1", port=port))
    job_ids: list[str] = []
    try:

        async def enqueue() -> None:
            job = await pool.enqueue_job("noop")
            if job is None:
                raise RuntimeError("enqueue_job returned None")
            job_ids.append(job.job_id)

        async def finished() -> int:
            # A job leaves the queue only in the same transaction that writes its result.
            return len(job_ids) - int(await pool.zcard(ARQ_QUEUE))

        def cpu() -> dict[str, float]:
            return {name: _server.cpu_seconds(pid) for name, pid in pids.items()}

        if args.warmup:
            await drive("warm-up", args.warmup, args.concurrency, enqueue, finished, 0, cpu)
        job_ids.clear()
        result = await drive("arq", args.jobs, args.concurrency, enqueue, finished, 0, cpu)
        keys = [f"arq:result:{job_id}" for job_id in job_ids]
        results = 0
        for i in range(0, len(keys), 1000):
            results += int(await pool.exists(*keys[i : i + 1000]))
        if results != len(job_ids):
            result.note += f" check: {results} results stored for {len(job_ids)} jobs"
        else:
            print(f"  check: Redis holds a result for each of the {results} jobs")
    finally:
        await pool.aclose()
    return result


def bench_arq(work: Path, args: argparse.Namespace) -> Measure:
    """Start redis-server and an arq worker; measure arq."""
    with redis_server(work) as (port, redis_pid):
        log = work / "arq-worker.log"
        argv = [sys.executable, str(Path(__file__).resolve()), "--arq-worker", str(port)]
        worker = _server.launch(argv, work, log)
        try:
            time.sleep(0.5)  # the worker connects; the warm-up absorbs the rest of its start
            if worker.poll() is not None:
                raise SystemExit(f"the arq worker exited:\n{_server.tail(log)}")
            print(f"redis-server on port {port}, arq worker pid {worker.pid} "
                  f"(max_jobs = {ARQ_MAX_JOBS}, poll_delay = {ARQ_POLL_DELAY})")
            return run_measure(arq_load(port, {"redis": redis_pid, "worker": worker.pid}, args))
        finally:
            _server.stop(worker)


# --- main ----------------------------------------------------------------------------------



def report(rounds: list[list[Measure]], args: argparse.Namespace) -> None:
    """One line per system and round, then the ratio of each round and their median against the target."""
    print()
    print(f"{args.jobs} no-op jobs, {args.concurrency} concurrent enqueuers, {args.warmup} warm-up jobs first, "
          f"{len(rounds)} rounds")
    print(f"{'round':<6} {'system':<10} {'jobs':>6} {'enqueued/s':>11} {'jobs/s':>9} {'enqueue s':>10} {'finish s':>9} "
          f"{'drain/s':>8} {'errors':>7}")
    ratios: list[float] = []
    for number, results in enumerate(rounds, 1):
        for r in results:
            finish = f"{r.finish_elapsed:.2f}" if r.finish_elapsed else "-"
            print(f"{number:<6} {r.name:<10} {r.jobs:>6} {r.enqueued_per_s:>11.1f} {r.jobs_per_s:>9.1f} "
                  f"{r.enqueue_elapsed:>10.2f} {finish:>9} {r.drain_per_s:>8.1f} {sum(r.errors.values()):>7}")
            indent = " " * 17
            if r.errors:
                print(f"{indent} errors: {json.dumps(r.errors)}")
            if r.note:
                print(f"{indent} {r.note.strip()}")
            if r.cpu and r.finish_elapsed:
                parts = ", ".join(f"{key} {seconds:.2f}" for key, seconds in r.cpu.items())
                print(f"{indent} CPU s until all finished: {parts}; total {sum(r.cpu.values()):.2f} "
                      f"of {r.finish_elapsed * CORES:.2f} ({CORES} cores)")
        by_name = {r.name: r for r in results}
        if "eventrun" in by_name and "arq" in by_name:
            a, b = by_name["eventrun"].jobs_per_s, by_name["arq"].jobs_per_s
            if a == a and b == b and b > 0:  # not NaN: both finished
                ratios.append(a / b)
    if len(rounds[0]) < 2:
        return
    if len(ratios) < len(rounds):
        print(f"eventrun / arq jobs/s: no figure for {len(rounds) - len(ratios)} of {len(rounds)} rounds (a load did not finish)")
    if ratios:
        median = statistics.median(ratios)
        verdict = "met" if median >= 2 else "NOT met"
        by_round = " / ".join(f"{ratio:.2f}" for ratio in ratios)
        print(f"eventrun / arq jobs/s by round: {by_round}; median {median:.2f} (target >= 2: {verdict})")


def main() -> None:
    """Parse the arguments and run the benchmark (or, with --arq-worker, arq's worker)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000, help="measured jobs per system (5000)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent enqueuers (64)")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured jobs first (200)")
    parser.add_argument("--instances", type=int, default=32,
                        help="eventrun: the function's concurrency and max_instances (32)")
    parser.add_argument("--only", choices=("eventrun", "arq"), help="measure just one of the two")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of both, each started afresh (5)")
    parser.add_argument("--data-dir", metavar="DIR", type=Path,
                        help="put eventrun's data_dir in a fresh folder under DIR, e.g. /dev/shm (no disk flushes)")
    parser.add_argument("--arq-worker", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arq_worker is not None:
        run_arq_worker(args.arq_worker)
        return
    if min(args.jobs, args.concurrency, args.instances, args.rounds) < 1 or args.warmup < 0:
        parser.error("--jobs, --concurrency, --instances and --rounds must be at least 1, --warmup not negative")
    if args.only != "eventrun" and (missing := arq_missing()):
        raise SystemExit(f"arq cannot be measured here: missing {missing}; or pass --only eventrun")

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    benches = [(name, bench) for name, bench in (("eventrun", bench_eventrun), ("arq", bench_arq)) if args.only in (None, name)]
    rounds: list[list[Measure]] = []
    try:
        for number in range(1, args.rounds + 1):
            print(f"-- round {number} of {args.rounds}")
            # Each round starts every system afresh; the order alternates, so neither always goes first.
            ordered = benches if number % 2 else benches[::-1]
            with tempfile.TemporaryDirectory(prefix="eventrun-bench-") as tmp:
                measured = {name: bench(Path(tmp), args) for name, bench in ordered}
            rounds.append([measured[name] for name, _ in benches])
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
    report(rounds, args)


if __name__ == "__main__":
    main()
