"""How fast eventrun acknowledges async invocations, next to a bare aiohttp server.

    python bench/ack.py [--seconds 20] [--concurrency 64] [--warmup 2] [--only eventrun|bare]

Starts a real `eventrun serve` (one async no-op function, a temporary data_dir, a free port),
drives a closed loop of POST /functions/noop/invocations against it, then does the same
against a bare aiohttp server whose handler only answers 202 {"RequestId": uuid4}. The
difference is what durable acceptance costs. Each server runs in its own process and only one
runs at a time; this process is the load generator, so client and server do not share an
event loop (they still share the machine's cores, which the figures include).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

import _server
from _server import NOOP_HANDLER, bare_argv, eventrun_argv, free_port, require_eventrun, tail

FUNCTION = "noop"
BODY = b'{"bench": true}'

MANIFEST = """\
[server]
host = "127.0.0.1"
port = {port}
data_dir = "data"

[functions.{function}]
handler = "noop.py:main_handler"
async_execution = true
# The runs still execute while the load goes on; one instance keeps their share of the
# CPU small, and the QPS cap is lifted so that no request is refused as throttled.
concurrency = 1
qps_limit = 1000000
"""


@dataclass
class Result:
    """What one load run measured."""

    name: str
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, accepted requests only
    errors: Counter[str] = field(default_factory=Counter)  # non-202 status or exception name
    last_request_id: str = ""

    @property
    def requests(self) -> int:
        """Requests completed inside the measured window."""
        return len(self.latencies) + sum(self.errors.values())

    @property
    def accepted_per_s(self) -> float:
        """202 answers per second of wall time."""
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile of accepted-request latency, in milliseconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        rank = max(1, round(q / 100 * len(ordered)))
        return ordered[min(rank, len(ordered)) - 1] * 1000


@contextlib.contextmanager
def server_process(name: str, argv: list[str], port: int, cwd: Path, log: Path) -> Iterator[str]:
    """Run a server subprocess until /healthz answers; stop it (and its children) on exit."""
    try:
        with _server.server_process(name, argv, port, cwd, log) as (base, _):
            yield base
    except _server.ServerFailed as exc:
        raise SystemExit(str(exc)) from None


# --- load ----------------------------------------------------------------------------------


async def load(name: str, base: str, seconds: float, concurrency: int, warmup: float) -> Result:
    """Closed loop: `concurrency` workers each POST, wait for the answer, POST again."""
    url = f"{base}/functions/{FUNCTION}/invocations"
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    result = Result(name)
    measuring = False

    async def worker(until: float) -> None:
        while time.perf_counter() < until:
            started = time.perf_counter()
            try:
                async with session.post(url, data=BODY, headers=headers) as answer:
                    body = await answer.read()
                    status = answer.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if measuring:
                    result.errors[type(exc).__name__] += 1
                continue
            latency = time.perf_counter() - started
            if not measuring:
                continue
            if status == 202:
                result.latencies.append(latency)
                result.last_request_id = json.loads(body)["RequestId"]
            else:
                result.errors[f"HTTP {status}"] += 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if warmup > 0:
            # Warm connections, caches and instances; nothing here is counted.
            await asyncio.gather(*(worker(time.perf_counter() + warmup) for _ in range(concurrency)))
        measuring = True
        started = time.perf_counter()
        await asyncio.gather(*(worker(started + seconds) for _ in range(concurrency)))
        result.elapsed = time.perf_counter() - started
        if result.last_request_id and name == "eventrun":
            await check_recorded(session, base, result.last_request_id)
    return result


async def check_recorded(session: aiohttp.ClientSession, base: str, request_id: str) -> None:
    """Make sure an acknowledged RequestId really is in the store, so the figures are honest."""
    async with session.get(f"{base}/invocations/{request_id}") as answer:
        if answer.status != 200:
            raise SystemExit(f"eventrun acknowledged {request_id} but GET /invocations answers {answer.status}")
        status = (await answer.json()).get("Status")
    print(f"  check: last RequestId {request_id} is recorded ({status})")


# --- report --------------------------------------------------------------------------------


def report(results: list[Result], seconds: float, concurrency: int) -> None:
    """Print one line per server and the eventrun/bare ratio."""
    print()
    print(f"closed loop, {concurrency} concurrent clients, {seconds:g}s measured per server")
    print(f"{'server':<10} {'requests':>9} {'accepted/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for r in results:
        print(
            f"{r.name:<10} {r.requests:>9} {r.accepted_per_s:>11.1f} "
            f"{r.percentile_ms(50):>8.2f} {r.percentile_ms(99):>8.2f} {sum(r.errors.values()):>7}"
        )
        if r.errors:
            print(f"{'':<10} errors: {dict(r.errors)}")
    by_name = {r.name: r for r in results}
    if "eventrun" in by_name and "bare" in by_name and by_name["bare"].accepted_per_s:
        ratio = by_name["eventrun"].accepted_per_s / by_name["bare"].accepted_per_s
        print(f"eventrun / bare accepted/s: {ratio:.2f}")


def run_load(name: str, base: str, args: argparse.Namespace) -> Result:
    """Run one load in its own event loop; SIGTERM or Ctrl-C end it as KeyboardInterrupt."""

    async def measured() -> Result:
        # asyncio.run already turns Ctrl-C into a clean cancel; give SIGTERM the same path.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await load(name, base, args.seconds, args.concurrency, args.warmup)

    try:
        return asyncio.run(measured())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        # Closing the loop reset SIGTERM to its default, which would skip stopping the servers.
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def bench_eventrun(work: Path, args: argparse.Namespace) -> Result:
    """Serve the no-op function with eventrun and load it."""
    require_eventrun()
    port = free_port()
    (work / "noop.py").write_text(NOOP_HANDLER)
    manifest = work / "eventrun.toml"
    manifest.write_text(MANIFEST.format(port=port, function=FUNCTION))
    log = work / "eventrun.log"
    with server_process("eventrun serve", eventrun_argv(manifest), port, work, log) as base:
        print(f"eventrun serve ready at {base}; loading for {args.seconds:g}s")
        result = run_load("eventrun", base, args)
    if result.errors:
        # The temporary folder goes away with the script; show why requests were refused.
        print(f"  eventrun serve's last output:\n{tail(log)}")
    return result


def bench_bare(work: Path, args: argparse.Namespace) -> Result:
    """Serve the bare aiohttp baseline and load it."""
    port = free_port()
    with server_process("bare aiohttp", bare_argv(port), port, work, work / "bare.log") as base:
        print(f"bare aiohttp ready at {base}; loading for {args.seconds:g}s")
        return run_load("bare", base, args)


def main() -> None:
    """Parse the arguments and run the benchmark (or, with --bare-server, the baseline)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per server (20)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent client connections (64)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each run (2)")
    parser.add_argument("--only", choices=("eventrun", "bare"), help="load just one of the two servers")
    args = parser.parse_args()
    if args.seconds <= 0 or args.concurrency < 1:
        parser.error("--seconds must be positive and --concurrency at least 1")

    # SIGTERM ends the benchmark the way Ctrl-C does, so the servers are always stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results: list[Result] = []
    try:
        with tempfile.TemporaryDirectory(prefix="eventrun-bench-") as tmp:
            work = Path(tmp)
            if args.only in (None, "eventrun"):
                results.append(bench_eventrun(work, args))
            if args.only in (None, "bare"):
                results.append(bench_bare(work, args))
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
    report(results, args.seconds, args.concurrency)


if __name__ == "__main__":
    main()
