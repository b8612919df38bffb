"""What a warm sync call costs eventrun beyond the HTTP round trip, in pipe round trips.

    python bench/overhead.py [--calls 2000] [--warmup 200] [--pipe-trips 20000]
                             [--only eventrun|bare|pipe] [--data-dir DIR]

Three measures, one after the other, in one run:

  eventrun  a real `eventrun serve` (temporary data_dir, free port) with one sync no-op
            function (async_execution = false): POST /functions/noop/invocations answers
            200 {"RequestId", "Status", "Result"} once the run has ended. One client
            (aiohttp, one kept-alive connection) calls it one call at a time, so every call
            finds the function's instance warm and idle;
  bare      the same client, the same calls, against a bare aiohttp server whose handler
            reads the body and answers at once (bench/_server.py);
  pipe      a multiprocessing Pipe between this process and a child that echoes: a
            64-byte message there and back, one at a time.

Each call is timed on its own with time.perf_counter(); the first --warmup calls are not
counted. The figures are per call in microseconds (median, and the mean beside it); the
overhead is eventrun's median minus the bare server's, and the ratio that overhead divided
by the pipe's median round trip (target <= 3): what eventrun spends on a call besides HTTP,
counted in the hand-offs between two processes that any isolated run needs at least one of.

Inside eventrun a sync call with a slot free starts at once on the warm instance (a pipe round
trip) and is answered from its outcome; its record (accepted, RUNNING, ended) goes to the
store's writer process behind it, with the other sync calls of the same 50 ms, in one commit
(SQLite, synchronous = FULL). With --data-dir /dev/shm the store is on tmpfs, where the
flushes cost nothing: no difference means no flush is on the call's path. Client, server,
store writer and instance share the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import aiohttp

import _server
from _server import NOOP_HANDLER, bare_argv, free_port, require_eventrun, run_measure

FUNCTION = "noop"
BODY = b'{"bench": true}'
PIPE_MESSAGE = b"x" * 64

MANIFEST = """\
[server]
host = "127.0.0.1"
port = {port}
data_dir = %(data_dir)s

[functions.%(function)s]
handler = "noop.py:main_handler"
async_execution = false
timeout = "30s"
concurrency = 1
qps_limit = 1000000
"""


@dataclass
class Measure:
    """Per-call times of one measure, in seconds."""

    name: str
    times: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def median_us(self) -> float:
        """Median per call, in microseconds."""
        return statistics.median(self.times) * 1e6 if self.times else float("nan")

    @property
    def mean_us(self) -> float:
        """Mean per call, in microseconds."""
        return statistics.fmean(self.times) * 1e6 if self.times else float("nan")

    def percentile_us(self, q: float) -> float:
        """Nearest-rank percentile per call, in microseconds."""
        if not self.times:
            return float("nan")
        ordered = sorted(self.times)
        return ordered[min(len(ordered), max(1, round(q / 100 * len(ordered)))) - 1] * 1e6


async def calls(name: str, base: str, args: argparse.Namespace, expect: int) -> Measure:
    """One client, one connection, one call at a time; times each call."""
    result = Measure(name)
    url = f"{base}/functions/{FUNCTION}/invocations"
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        for i in range(args.warmup + args.calls):
            started = time.perf_counter()
            async with session.post(url, data=BODY, headers=headers) as answer:
                body = await answer.read()
                status = answer.status
            elapsed = time.perf_counter() - started
            if status != expect:
                result.errors += 1
                if result.errors == 1:
                    print(f"  {name}: unexpected answer {status}: {body[:200]!r}")
            elif i >= args.warmup:
                result.times.append(elapsed)
    return result



def bench_eventrun(work: Path, args: argparse.Namespace) -> Measure:
    """Serve the sync no-op function with eventrun; call it one call at a time."""
    require_eventrun()
    folder = work / "eventrun"
    try:
        with _server.data_dir(work, args.data_dir) as data:
            manifest = MANIFEST % {"function": FUNCTION, "data_dir": json.dumps(str(data))}
            with _server.eventrun_server(folder, manifest, {"noop.py": NOOP_HANDLER}) as (base, _):
                print(f"eventrun serve ready at {base} (data_dir {data}); {args.warmup} + {args.calls} sync calls")
                return run_measure(calls("eventrun", base, args, 200))
    except _server.ServerFailed as exc:
        raise SystemExit(str(exc)) from None


def bench_bare(work: Path, args: argparse.Namespace) -> Measure:
    """Serve the bare aiohttp handler; call it one call at a time."""
    port = free_port()
    try:
        with _server.server_process("bare aiohttp", bare_argv(port), port, work, work / "bare.log") as (base, _):
            print(f"bare aiohttp ready at {base}; {args.warmup} + {args.calls} calls")
            return run_measure(calls("bare", base, args, 202))
    except _server.ServerFailed as exc:
        raise SystemExit(str(exc)) from None


def echo(conn: Connection) -> None:
    """The pipe's far end: send back every message until the pipe closes."""
    try:
        while True:
            conn.send_bytes(conn.recv_bytes())
    except (EOFError, KeyboardInterrupt):
        pass


def bench_pipe(args: argparse.Namespace) -> Measure:
    """Round trips of a 64-byte message over a multiprocessing Pipe to a child that echoes."""
    result = Measure("pipe")
    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.Process(target=echo, args=(theirs,), daemon=True)
    child.start()
    theirs.close()
    try:
        warmup = max(args.warmup, args.pipe_trips // 10)
        for i in range(warmup + args.pipe_trips):
            started = time.perf_counter()
            ours.send_bytes(PIPE_MESSAGE)
            ours.recv_bytes()
            if i >= warmup:
                result.times.append(time.perf_counter() - started)
    finally:
        ours.close()
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join()
    print(f"pipe: {args.pipe_trips} round trips of {len(PIPE_MESSAGE)} bytes to child pid {child.pid}")
    return result


def report(results: list[Measure], args: argparse.Namespace) -> None:
    """One line per measure, then the overhead and its ratio to a pipe round trip."""
    print()
    print(f"per call, one at a time ({args.calls} calls after {args.warmup} warm-up; pipe: {args.pipe_trips} round trips)")
    print(f"{'measure':<10} {'median us':>10} {'mean us':>9} {'p99 us':>9} {'errors':>7}")
    for r in results:
        print(f"{r.name:<10} {r.median_us:>10.1f} {r.mean_us:>9.1f} {r.percentile_us(99):>9.1f} {r.errors:>7}")
    by_name = {r.name: r for r in results}
    if "eventrun" in by_name and "bare" in by_name:
        overhead = by_name["eventrun"].median_us - by_name["bare"].median_us
        mean_overhead = by_name["eventrun"].mean_us - by_name["bare"].mean_us
        print(f"eventrun - bare aiohttp: {overhead:.1f} us a call (means: {mean_overhead:.1f} us)")
        if "pipe" in by_name:
            ratio = overhead / by_name["pipe"].median_us
            verdict = "met" if ratio <= 3 else "NOT met"
            print(f"that overhead / pipe round trip: {ratio:.1f}x (target <= 3: {verdict})")


def main() -> None:
    """Parse the arguments and run the measures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="measured HTTP calls per server (2000)")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured calls first (200)")
    parser.add_argument("--pipe-trips", type=int, default=20000, help="measured pipe round trips (20000)")
    parser.add_argument("--only", choices=("eventrun", "bare", "pipe"), help="run just one measure")
    parser.add_argument("--data-dir", metavar="DIR", type=Path,
                        help="put eventrun's data_dir in a fresh folder under DIR, e.g. /dev/shm (no disk flushes)")
    args = parser.parse_args()
    if args.calls < 1 or args.warmup < 0 or args.pipe_trips < 1:
        parser.error("--calls and --pipe-trips must be at least 1, --warmup not negative")

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results: list[Measure] = []
    try:
        with tempfile.TemporaryDirectory(prefix="eventrun-bench-") as tmp:
            work = Path(tmp)
            if args.only in (None, "eventrun"):
                results.append(bench_eventrun(work, args))
            if args.only in (None, "bare"):
                results.append(bench_bare(work, args))
            if args.only in (None, "pipe"):
                results.append(bench_pipe(args))
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
    report(results, args)


if __name__ == "__main__":
    main()
