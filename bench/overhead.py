"""What a warm sync call costs eventrun beyond the HTTP round trip, in pipe round trips.

    python bench/overhead.py [--calls 2000] [--warmup 200] [--pipe-trips 20000]
                             [--only eventrun|bare|relay|pipe] [--data-dir DIR]

Four measures in one run, their servers all up at once:

  eventrun  a real `eventrun serve` (temporary data_dir, free port) with one sync no-op
            function (async_execution = false): POST /functions/noop/invocations answers
            200 {"RequestId", "Status", "Result"} once the run has ended. One client
            (aiohttp, one kept-alive connection) calls it one call at a time, so every call
            finds the function's instance warm and idle;
  bare      the same client, the same calls, against a bare aiohttp server whose handler
            reads the body and answers at once (bench/_server.py);
  relay     the bare server again, its handler first sending the body to a child process
            over a socket and awaiting it back (asyncio streams): the least a server that
            runs each call in another process does beyond HTTP;
  pipe      a multiprocessing Pipe between this process and a child that echoes: a
            64-byte message there and back, one at a time.

Each measure first makes --warmup calls that are not counted; then they take turns, a block of
100 calls (the pipe: a like share of its round trips) each, round after round, so that the
machine's slow and fast moments fall on all of them alike. Each call is timed on its own with
time.perf_counter(). The figures are per call in microseconds (median, and the mean beside it); the
overhead is eventrun's median minus the bare server's, and the ratio that overhead divided
by the pipe's median round trip (target <= 3): what eventrun spends on a call besides HTTP,
counted in the hand-offs between two processes that any isolated run needs at least one of.
The relay's excess over the bare server is what one such hand-off costs through an event loop,
and eventrun's excess over the relay is eventrun's own work.

Inside eventrun a sync call with a slot free starts at once on the warm instance (a pipe round
trip) and is answered from its outcome; its record (accepted, RUNNING, ended) goes to the
store's writer process behind it, with the other sync calls of the same 50 ms, in one commit
(SQLite, synchronous = FULL). With --data-dir /dev/shm the store is on tmpfs, where the
flushes cost nothing: no difference means no flush is on the call's path. Client, server,
store writer and instance share the machine's cores.
"""

from __future__ import annotations

import argparse
import contextlib
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
BLOCK = 100  # calls to one server before the next one's turn

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


class Caller:
    """One client on one kept-alive connection to one server, calling one call at a time."""

    def __init__(self, name: str, base: str, expect: int) -> None:
        self.measure = Measure(name)
        self._url = f"{base}/functions/{FUNCTION}/invocations"
        self._expect = expect
        self._session: aiohttp.ClientSession | None = None

    async def calls(self, count: int, *, keep: bool) -> None:
        """Make `count` calls; `keep` their times (else they warm up)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=1)
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))
        headers = {"Content-Type": "application/json"}
        result = self.measure
        for _ in range(count):
            started = time.perf_counter()
            async with self._session.post(self._url, data=BODY, headers=headers) as answer:
                body = await answer.read()
                status = answer.status
            elapsed = time.perf_counter() - started
            if status != self._expect:
                result.errors += 1
                if result.errors == 1:
                    print(f"  {result.name}: unexpected answer {status}: {body[:200]!r}")
            elif keep:
                result.times.append(elapsed)

    async def close(self) -> None:
        """Close the connection."""
        if self._session is not None:
            await self._session.close()


class PipeCaller:
    """Round trips of a 64-byte message over a multiprocessing Pipe to a child that echoes."""

    def __init__(self) -> None:
        self.measure = Measure("pipe")
        self._ours, theirs = multiprocessing.Pipe()
        self._child = multiprocessing.Process(target=echo, args=(theirs,), daemon=True)
        self._child.start()
        theirs.close()
        print(f"pipe: round trips of {len(PIPE_MESSAGE)} bytes to child pid {self._child.pid}")

    async def calls(self, count: int, *, keep: bool) -> None:
        """Make `count` round trips (blocking: nothing else runs meanwhile); `keep` their times."""
        ours, times = self._ours, self.measure.times
        for _ in range(count):
            started = time.perf_counter()
            ours.send_bytes(PIPE_MESSAGE)
            ours.recv_bytes()
            if keep:
                times.append(time.perf_counter() - started)

    async def close(self) -> None:
        """Stop the child."""
        self._ours.close()
        self._child.join(5)
        if self._child.is_alive():
            self._child.kill()
            self._child.join()


async def interleaved(callers: list[Caller | PipeCaller], args: argparse.Namespace) -> list[Measure]:
    """Warm every measure up, then give each a block of calls in turn, round after round, so
    that the machine's slow and fast moments fall on all of them alike."""
    rounds = max(1, args.calls // BLOCK)
    pipe_warmup = max(args.warmup, args.pipe_trips // 10)
    warmups = [pipe_warmup if isinstance(c, PipeCaller) else args.warmup for c in callers]
    totals = [args.pipe_trips if isinstance(c, PipeCaller) else args.calls for c in callers]
    per_round = [max(1, round(total / rounds)) for total in totals]
    try:
        for caller, warmup in zip(callers, warmups):
            await caller.calls(warmup, keep=False)
        for _ in range(rounds):
            for caller, count in zip(callers, per_round):
                await caller.calls(count, keep=True)
    finally:
        for caller in callers:
            await caller.close()
    return [caller.measure for caller in callers]


def echo(conn: Connection) -> None:
    """The pipe's far end: send back every message until the pipe closes."""
    try:
        while True:
            conn.send_bytes(conn.recv_bytes())
    except (EOFError, KeyboardInterrupt):
        pass


def start_servers(work: Path, args: argparse.Namespace, stack: contextlib.ExitStack) -> list[Caller | PipeCaller]:
    """Start the servers of the chosen measures, all at once (idle ones cost nothing)."""
    callers: list[Caller | PipeCaller] = []
    try:
        if args.only in (None, "eventrun"):
            require_eventrun()
            data = stack.enter_context(_server.data_dir(work, args.data_dir))
            manifest = MANIFEST % {"function": FUNCTION, "data_dir": json.dumps(str(data))}
            base, _ = stack.enter_context(_server.eventrun_server(work / "eventrun", manifest, {"noop.py": NOOP_HANDLER}))
            print(f"eventrun serve ready at {base} (data_dir {data}): sync calls")
            callers.append(Caller("eventrun", base, 200))
        for name in ("bare", "relay"):
            if args.only in (None, name):
                port = free_port()
                argv = bare_argv(port, relay=name == "relay")
                base, _ = stack.enter_context(_server.server_process(f"{name} aiohttp", argv, port, work, work / f"{name}.log"))
                print(f"{name} aiohttp ready at {base}")
                callers.append(Caller(name, base, 202))
    except _server.ServerFailed as exc:
        raise SystemExit(str(exc)) from None
    if args.only in (None, "pipe"):
        callers.append(PipeCaller())
    return callers


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
    if "relay" in by_name and "bare" in by_name:
        floor = by_name["relay"].median_us - by_name["bare"].median_us
        line = f"relay - bare aiohttp: {floor:.1f} us a call (one hand-off to a process and back, in asyncio)"
        if "pipe" in by_name:
            line += f", {floor / by_name['pipe'].median_us:.1f}x the pipe"
        print(line)
        if "eventrun" in by_name:
            print(f"eventrun - relay: {by_name['eventrun'].median_us - by_name['relay'].median_us:.1f} us a call (eventrun's own work)")


def main() -> None:
    """Parse the arguments and run the measures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="measured HTTP calls per server (2000)")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured calls first (200)")
    parser.add_argument("--pipe-trips", type=int, default=20000, help="measured pipe round trips (20000)")
    parser.add_argument("--only", choices=("eventrun", "bare", "relay", "pipe"), help="run just one measure")
    parser.add_argument("--data-dir", metavar="DIR", type=Path,
                        help="put eventrun's data_dir in a fresh folder under DIR, e.g. /dev/shm (no disk flushes)")
    args = parser.parse_args()
    if args.calls < 1 or args.warmup < 0 or args.pipe_trips < 1:
        parser.error("--calls and --pipe-trips must be at least 1, --warmup not negative")

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with tempfile.TemporaryDirectory(prefix="eventrun-bench-") as tmp, contextlib.ExitStack() as stack:
            callers = start_servers(Path(tmp), args, stack)
            print(f"{args.warmup} calls each to warm up, then blocks of {BLOCK} in turn")
            results = run_measure(interleaved(callers, args))
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
    report(results, args)


if __name__ == "__main__":
    main()
