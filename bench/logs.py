"""How soon a line a function prints reaches a client that follows the run's log.

    python bench/logs.py [--seconds 5] [--every 0.01] [--followers 1] [--only eventrun|pipe]

eventrun: a real `eventrun serve` (temporary data_dir, free port) with one async function
that sleeps 0.3 s (so the followers are connected before its first line), then prints
`tick N TIME` every --every seconds for --seconds, TIME being time.time() when it prints.
--followers clients (aiohttp) each follow GET /invocations/{id}/logs?follow=true (Server-Sent
Events) and, for every line, take time.time() when the line arrives minus TIME: the latency
from print() in the function's process to the client, through the instance's output pipe,
the server's log file and the SSE stream.

pipe: for reference, the same function as a plain child process (python -u) whose stdout
this process reads line by line: the floor a line's trip from one process to another has
on this machine at the same moment.

Printed: lines received, p50, p99 and max latency in milliseconds (target: eventrun's p99
under 100 ms). Every process involved runs on this machine, so both clocks are the same
clock.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

import _server
from _server import require_eventrun, run_measure

FUNCTION = "ticker"
DELAY = 0.3  # seconds the function waits before its first line

HANDLER = f'''\
"""Prints `tick N TIME` at a steady pace, TIME being time.time() as it prints."""

import time


def main_handler(event, context):
    """Print ticks every `every` seconds for `seconds` seconds; return how many."""
    data = event["data"] or {{}}
    time.sleep({DELAY})
    every, end = data["every"], time.time() + data["seconds"]
    n, due = 0, time.time()
    while due < end:
        print(f"tick {{n}} {{time.time():.6f}}")
        n += 1
        due += every
        time.sleep(max(0.0, due - time.time()))
    return {{"lines": n}}


if __name__ == "__main__":  # the pipe baseline runs this file as a script
    import sys

    main_handler({{"data": {{"seconds": float(sys.argv[1]), "every": float(sys.argv[2])}}}}, None)
'''

MANIFEST = """\
[server]
host = "127.0.0.1"
port = {port}
data_dir = "data"

[functions.%s]
handler = "ticker.py:main_handler"
async_execution = true
timeout = "10m"
""" % FUNCTION


@dataclass
class Measure:
    """Latencies of the lines one reader got, in seconds."""

    name: str
    latencies: list[float] = field(default_factory=list)
    expected: int | None = None  # lines the function printed, when known
    note: str = ""

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile, in milliseconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered), max(1, round(q / 100 * len(ordered)))) - 1] * 1000


def latency(text: str) -> float | None:
    """Now minus the TIME of a `... tick N TIME` line; None for other lines."""
    arrived = time.time()
    parts = text.rsplit(" ", 3)
    if len(parts) < 3 or parts[-3] != "tick":
        return None
    return arrived - float(parts[-1])


async def follow(session: aiohttp.ClientSession, base: str, request_id: str, result: Measure) -> str:
    """Read the run's log as Server-Sent Events until its end event; the end event's data."""
    url = f"{base}/invocations/{request_id}/logs"
    async with session.get(url, params={"follow": "true"}) as answer:
        answer.raise_for_status()
        event = ""
        async for raw in answer.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                data = line[len("data: ") :]
                if event == "end":
                    return data
                if (seconds := latency(data)) is not None:
                    result.latencies.append(seconds)
            elif not line:
                event = ""
    return ""


async def eventrun_load(base: str, args: argparse.Namespace) -> list[Measure]:
    """Invoke the ticker, follow its log with --followers clients, collect latencies."""
    timeout = aiohttp.ClientTimeout(total=args.seconds + 60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        body = {"seconds": args.seconds, "every": args.every}
        async with session.post(f"{base}/functions/{FUNCTION}/invocations", json=body) as answer:
            answer.raise_for_status()
            request_id = (await answer.json())["RequestId"]
        results = [Measure(f"eventrun #{i + 1}" if args.followers > 1 else "eventrun") for i in range(args.followers)]
        ends = await asyncio.gather(*(follow(session, base, request_id, r) for r in results))
        async with session.get(f"{base}/invocations/{request_id}") as answer:
            invocation = await answer.json()
    lines = (invocation.get("Result") or {}).get("lines")
    for result, end in zip(results, ends):
        result.expected = lines
        if invocation["Status"] != "FINISHED":
            result.note = f"the run ended {invocation['Status']}: {invocation.get('ErrorMessage')}"
        elif not end:
            result.note = "the stream closed without its end event"
    return results


def bench_eventrun(work: Path, args: argparse.Namespace) -> list[Measure]:
    """Serve the ticker with eventrun and follow one run's log."""
    require_eventrun()
    folder = work / "eventrun"
    try:
        with _server.eventrun_server(folder, MANIFEST, {"ticker.py": HANDLER}) as (base, _):
            print(f"eventrun serve ready at {base}; a run printing every {args.every * 1000:g} ms for {args.seconds:g}s, "
                  f"{args.followers} follower(s)")
            return run_measure(eventrun_load(base, args))
    except _server.ServerFailed as exc:
        raise SystemExit(str(exc)) from None


def pipe_load(script: Path, args: argparse.Namespace) -> Measure:
    """The ticker as a plain child process; read its stdout line by line as it comes."""
    result = Measure("pipe")
    argv = [sys.executable, "-u", str(script), str(args.seconds), str(args.every)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                if (seconds := latency(raw.decode().rstrip("\n"))) is not None:
                    result.latencies.append(seconds)
        finally:
            if proc.poll() is None:
                proc.kill()
    result.expected = len(result.latencies)  # every line the child printed came through
    return result


def bench_pipe(work: Path, args: argparse.Namespace) -> Measure:
    """The floor: the same lines over a plain pipe from a child process."""
    script = work / "ticker.py"
    script.write_text(HANDLER)
    print("pipe: the same function as a child process, its stdout read by this one")
    return pipe_load(script, args)



def report(results: list[Measure], args: argparse.Namespace) -> None:
    """One line per reader, then eventrun's p99 against the target."""
    print()
    print(f"print() to the reader, a line every {args.every * 1000:g} ms for {args.seconds:g}s")
    print(f"{'reader':<12} {'lines':>11} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8}")
    for r in results:
        lines = f"{len(r.latencies)}/{r.expected if r.expected is not None else '?'}"
        mean = statistics.fmean(r.latencies) * 1000 if r.latencies else float("nan")
        print(f"{r.name:<12} {lines:>11} {r.percentile_ms(50):>8.2f} {r.percentile_ms(99):>8.2f} "
              f"{r.percentile_ms(100):>8.2f} {mean:>8.2f}")
        if r.note:
            print(f"{'':<12} {r.note}")
    followers = [r for r in results if r.name.startswith("eventrun")]
    if followers:
        worst = max(r.percentile_ms(99) for r in followers)
        verdict = "met" if worst < 100 else "NOT met"
        print(f"eventrun p99: {worst:.2f} ms (target < 100 ms: {verdict})")
        pipe = next((r for r in results if r.name == "pipe"), None)
        if pipe is not None and pipe.latencies:
            print(f"eventrun p50 - pipe p50: {followers[0].percentile_ms(50) - pipe.percentile_ms(50):.2f} ms")


def main() -> None:
    """Parse the arguments and run the measures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="how long the function prints (5)")
    parser.add_argument("--every", type=float, default=0.01, help="seconds between its lines (0.01)")
    parser.add_argument("--followers", type=int, default=1, help="clients following the same log (1)")
    parser.add_argument("--only", choices=("eventrun", "pipe"), help="run just one measure")
    args = parser.parse_args()
    if args.seconds <= 0 or args.every <= 0 or args.followers < 1:
        parser.error("--seconds and --every must be positive, --followers at least 1")

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results: list[Measure] = []
    try:
        with tempfile.TemporaryDirectory(prefix="eventrun-bench-") as tmp:
            work = Path(tmp)
            if args.only in (None, "eventrun"):
                results += bench_eventrun(work, args)
            if args.only in (None, "pipe"):
                results.append(bench_pipe(work, args))
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
    report(results, args)


if __name__ == "__main__":
    main()
