"""The engine: durable acceptance, runs on worker instances, and what the gateway reads."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import operator
import os
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Sequence

from .api import SERVER_STOPPED, Accepted, Invocation, Status
from .dispatcher import Dispatcher
from .envelope import (
    AnyEnvelope, Envelope, Templated, TemplatedBatch, dumps, loads, now_rfc3339, request_ids, rfc3339_at, stored_many,
)
from .errors import (
    FunctionNotFound, InvalidParameter, InvocationActive, InvocationEnded, InvocationNotFound, ShuttingDown, StoreError,
    Throttled,
)
from .failures import FailureLog
from .instances import Instance, InstancePool, Outcome, Spec
from .logs import LOGS_FOLDER, LeftOut, LogHub, end_note
from .manifest import FunctionConfig, Manifest, format_duration, functions_environment
from .metrics import Metrics
from .recount import Recount
from .store import STORE_FILE, Batch, NewInvocation, SQLiteStore, replay_event_id
from .text import printable
from .users import UnknownUser, function_user
from .worker import HANDLER_LOAD_FAILED
from .writes import PRUNE_AT_ONCE, Ending

if TYPE_CHECKING:
    from .cluster import Cluster
    from .postgres import PostgresStore

logger = logging.getLogger(__name__)


Listener = Callable[[Invocation], None]


WRITE_BEHIND = 0.05
"""Seconds between sends of sync calls' records to the store, each send one commit (see Engine.call)."""

END_GRACE = 10.0
"""Seconds a stop waits, past killing the instances it stops, for runs to record their ends;
an end the store still refuses then is left to the next start (the run ends ServerStopped)."""

TERMINATE_WAIT = 10.0
"""Seconds a terminate waits, past kill_grace, for the run to end before answering with it as it is."""

WAIT_RECHECK = 1.0
"""With a shared store, a wait for a run's end also reads the store this often (the notice of
an end recorded on another node may be lost with a dropped connection), and so does any wait
once a read of the run has failed."""

REFUSED_RETRY = (0.1, 5.0)
"""While the store refuses writes (a full disk, its writer restarting), a run's start or end is
tried again after the first of these seconds, then twice as long each time, up to the second."""


REFUSAL_LOG_EVERY = 5.0
"""While the store refuses runs' ends, the server's log names one refusal at most this often,
with how many there were since the last line, rather than every run's every try."""


PRUNE_LOG_EVERY = 60.0
"""While the store cannot serve (an outage), the server's log says pruning failed at most this often."""


def _refused_delay(refusals: int) -> float:
    """Seconds to wait before trying a write again that the store refused this many times in a row before."""
    first, most = REFUSED_RETRY
    return min(first * 2 ** min(refusals, 32), most)


class _Behind:
    """A sync call whose record the store does not hold all of yet: its state meanwhile, its
    envelope, and its start and its end until they are sent (and again, should the store
    refuse them: `accepted` and `ended` are kept for that)."""

    __slots__ = ("invocation", "envelope", "rows", "ending", "accepted", "ended")

    def __init__(self, invocation: Invocation, rows: Batch) -> None:
        self.invocation = invocation
        self.envelope: bytes = rows.envelopes[0]
        self.rows: Batch | None = rows
        self.ending: Ending | None = None
        self.accepted = rows
        self.ended: Ending | None = None


class _Run:
    """A run going on: its instance, once it has one, whether it was asked to stop, and whether
    its end was recorded elsewhere (this node was taken for dead meanwhile: see _stop_lost_runs)."""

    __slots__ = ("instance", "abort", "lost")

    def __init__(self) -> None:
        self.instance: Instance | None = None
        self.abort = False
        self.lost = False


ENDS_AT_ONCE = 200
"""Runs ended together at a start (their log files are open meanwhile), see _end_queued_of_removed."""


def _rows(envelopes: Sequence[AnyEnvelope]) -> Batch | list[NewInvocation]:
    """The store rows of envelopes being accepted, each with a fresh RequestId.

    A batch of one function, source and trigger (a Kafka batch, an HTTP event) goes as a Batch,
    by column; others as plain tuples in NewInvocation's field order: the store takes either,
    and a plain tuple is made without a call (and pickled to the writer without one).
    """
    first, ids = request_ids(len(envelopes))
    now = rfc3339_at(first >> 12)  # (the RequestId's millisecond, which list's since/until go by)
    if envelopes.__class__ is TemplatedBatch:  # the columns as they are
        batch: TemplatedBatch = envelopes  # type: ignore[assignment]
        return Batch(batch.function, batch.source, batch.trigger, now, first, ids, batch.ids, batch.stored)
    stored = stored_many(envelopes)
    shared = set(map(_SHARED, envelopes))
    if len(shared) == 1:
        ((function, source, trigger),) = shared
        return Batch(function, source, trigger, now, first, ids, list(map(_EVENT_ID, envelopes)), stored)
    rows = [
        (request_id, e.function, e.source, e.id, e.trigger, now, raw, seq)
        for request_id, e, raw, seq in zip(ids, envelopes, stored, itertools.count(first))
    ]
    return rows  # type: ignore[return-value]


_SHARED = operator.attrgetter("function", "source", "trigger")  # of an Envelope or a Templated one
_EVENT_ID = operator.attrgetter("id")


def _ms_between(start: str | None, end: str) -> int | None:
    """Milliseconds from one RFC 3339 time to another (as the store computes a run's duration)."""
    if start is None:
        return None
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() * 1000)


def _request_ids(rows: Batch | list[NewInvocation]) -> list[str]:
    return rows.request_ids if rows.__class__ is Batch else list(map(_request_id, rows))  # type: ignore[union-attr]


_created = operator.itemgetter(1)  # Accepted.created
_request_id = operator.itemgetter(0)  # the RequestId of an Accepted or of a row


class Engine:
    """Ack first, run later: every trigger and the gateway go through this facade."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        server = manifest.server
        data_dir = manifest.data_dir
        self.store: SQLiteStore | PostgresStore
        if manifest.store.shared:
            from .cluster import default_node_id
            from .postgres import PostgresStore

            self.node_id = manifest.cluster.node_id or default_node_id()
            self.store = PostgresStore(manifest.store.url, self.node_id, pool_size=manifest.store.pool_size)
        else:
            self.node_id = manifest.cluster.node_id or "local"
            self.store = SQLiteStore(data_dir / STORE_FILE)
        self.logs = LogHub(data_dir / LOGS_FOLDER, server.log_limit)
        self.metrics = Metrics()
        self.pool = InstancePool(
            max_instances=server.max_instances,
            idle_timeout=server.instance_idle_timeout,
            kill_grace=server.kill_grace,
            base_env={**functions_environment(os.environ), **manifest.s3.aws_environment()},
            fork=server.fork_instances,
        )
        self.dispatcher = Dispatcher(
            concurrency={n: f.concurrency for n, f in manifest.functions.items()},
            qps_limits={n: f.qps_limit for n, f in manifest.functions.items()},
            max_running=server.max_instances,
            execute=self._execute,
        )
        self.shutting_down = False
        self._runs: dict[str, _Run] = {}
        self._stopping_lost: set[asyncio.Task[None]] = set()  # instances of lost runs being killed (see _stop_lost_runs)
        self._recount = Recount(lambda: self.store.counts())
        self._behind: dict[str, _Behind] = {}  # sync calls whose record is not yet committed (see call)
        self._starts_refused = 0  # starts the store refused in a row (see _start_refused)
        self._unloadable: dict[str, str] = {}  # per function, why its handler could not be loaded, as logged (see _note_loading)
        self._start_tried: dict[str, str] = {}  # the time of a run's refused start, to try again with
        self._behind_refused = 0  # sends of sync calls' records the store refused in a row (see _written_behind)
        # What the server's log says of refused writes, by kind (see FailureLog).
        self._refused_starts = FailureLog(logger, every=REFUSAL_LOG_EVERY, counted="refused")
        self._refused_ends = FailureLog(logger, every=REFUSAL_LOG_EVERY, counted="refused")
        self._refused_records = FailureLog(logger, every=REFUSAL_LOG_EVERY, counted="refused")
        self._sends = 0  # sends of sync calls' records so far
        self._refused_send = -1  # the last of those the store refused a record of
        self._unsent: dict[str, _Behind] = {}  # those with a start or an end not yet sent to the store
        self._sending: asyncio.TimerHandle | None = None
        self._specs: dict[str, Spec] = {}  # how to start an instance, per function
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._listeners: list[Listener] = []
        self._stopping: list[Callable[[], Awaitable[None]]] = []
        self._reporters: dict[str, Callable[[], dict[str, Any]]] = {}
        self._metric_sources: list[Callable[[], str]] = []
        self._started = False
        self._pruning: asyncio.Task[None] | None = None
        self.pruned = 0  # runs deleted by retention since the start
        self.cluster: Cluster | None = None  # with a shared store: this engine is one node of several
        if manifest.store.shared:
            from .cluster import Cluster

            self.cluster = Cluster(
                self.store,  # type: ignore[arg-type]
                data_dir=data_dir,
                url=server.base_url,
                lease=manifest.cluster.lease,
                concurrency={n: f.concurrency for n, f in manifest.functions.items()},
                qps_limits={n: f.qps_limit for n, f in manifest.functions.items()},
                dispatcher=self.dispatcher,
                ended_elsewhere=self._wake_waiters,
                failed_here=self._ended_by_the_store,
                terminate_here=self.terminate,
                lost_here=self._stop_lost_runs,
            )
            self.logs.sink = self.cluster.shipper.add

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, lock async modes, recover from a previous stop, start queued runs."""
        await self.store.start()
        try:
            await self.store.register_functions(
                {n: f.async_execution for n, f in self.manifest.functions.items()}, now_rfc3339()
            )
            await self.store.set_destinations({n: f.destinations for n, f in self.manifest.functions.items()})
            if self.cluster is not None:
                await self.pool.start()
                await self.cluster.start()  # ends what this node left running; claims queued runs
                self._started = True
                self._start_pruning()
                return
            assert isinstance(self.store, SQLiteStore)  # (a shared store's nodes end what a dead one left: Cluster)
            interrupted = await self.store.recover(now_rfc3339(), SERVER_STOPPED)
        except BaseException:
            if self.cluster is not None:
                await self.cluster.stop()
                await self.pool.stop()
            await self.store.stop()
            raise
        for request_id in interrupted:
            self._note(request_id, end_note(Status.FAILED.value, "ServerStopped", SERVER_STOPPED))  # (as a stop's own ends say)
            self.logs.close(request_id)
            invocation = await self.get(request_id)
            self.metrics.observe_end(invocation.function, Status.FAILED, None)  # (its time includes the downtime)
            self._notify(invocation)
        await self.pool.start()
        self._started = True
        resumed = 0
        removed: dict[str, list[str]] = {}
        for request_id, function in await self.store.queued():
            if function in self.manifest.functions:
                self.dispatcher.submit(function, request_id)
                resumed += 1
            else:
                removed.setdefault(function, []).append(request_id)
        if interrupted or resumed:
            logger.info("recovered: %d interrupted runs ended FAILED, %d queued runs resumed", len(interrupted), resumed)
        for function, request_ids in removed.items():
            await self._end_queued_of_removed(function, request_ids)
        self._start_pruning()

    async def _end_queued_of_removed(self, function: str, request_ids: list[str]) -> None:
        """End FAILED (FunctionNotFound) the queued runs of a function no longer in the manifest.

        Many at a time, so that their ends share commits (one a run took about 1.5 ms: 28 s for
        19,000 queued runs before the server answered).
        """
        outcome = Outcome(
            status=Status.FAILED,
            error_type="FunctionNotFound",
            error_message=f"function {function!r} is no longer in the manifest",
        )
        for first in range(0, len(request_ids), ENDS_AT_ONCE):
            await asyncio.gather(
                *(self._end(request_id, function, outcome, started=None) for request_id in request_ids[first : first + ENDS_AT_ONCE])
            )
        logger.warning(
            "%d queued runs of function %r, which is no longer in the manifest, ended FAILED (FunctionNotFound)",
            len(request_ids), function,
        )

    def _start_pruning(self) -> None:
        if self.manifest.server.retention > 0:
            self._pruning = asyncio.create_task(self._prune_forever(), name="retention")

    async def _prune_forever(self) -> None:
        """Delete ended runs (and their logs) older than [server] retention, every little while."""
        retention = self.manifest.server.retention
        every = min(60.0, max(1.0, retention / 4))
        failing = FailureLog(logger, every=PRUNE_LOG_EVERY, level=logging.WARNING)
        while True:
            try:
                await self.prune(int((time.time() - retention) * 1000))
            except StoreError as exc:  # the store cannot serve now (an outage): the next round tries again
                failing.log("pruning runs past their retention failed (%s); trying again every %gs", exc, every)
            except Exception:  # eventrun's own failure: its traceback, each time
                logger.exception("pruning runs past their retention failed")
            else:
                failing.recovered("runs past their retention are pruned again")
            await asyncio.sleep(every)

    async def prune(self, ended_before_ms: int) -> int:
        """Delete the runs that ended before this time (Unix ms), with their logs; how many."""
        total = 0
        while True:
            pruned = await self.store.prune(ended_before_ms)
            for request_id in pruned:
                self.logs.prune(request_id)
            total += len(pruned)
            if len(pruned) < PRUNE_AT_ONCE:
                break
        if total:
            self.pruned += total
            logger.info("deleted %d runs that ended more than %s ago", total, format_duration(self.manifest.server.retention))
        return total

    async def stop(self) -> None:
        """Take nothing new, let running work finish within the grace, then record the rest."""
        if not self._started or self.shutting_down:
            return
        self.shutting_down = True
        if self._pruning is not None:
            self._pruning.cancel()
        self.dispatcher.pause()
        if self.cluster is not None:
            self.cluster.pause()
        grace = self.manifest.server.shutdown_grace
        still = await self.dispatcher.drain(grace)
        if still:
            logger.warning("stopping %d runs still going after %ss", len(still), grace)
            await self.dispatcher.cancel_all(self.manifest.server.kill_grace + END_GRACE)
        await asyncio.gather(*self._stopping_lost, return_exceptions=True)  # (their runs ended: their kills end too)
        # Every run here has ended; a caller still waiting (a sync call whose run stays queued
        # for the next start, or runs on another node) is answered with its run as it is now,
        # by the hooks' time (the gateway answers its requests in flight in one of them).
        for request_id in list(self._waiters):
            self._wake_waiters(request_id)
        await self.pool.stop()
        self.logs.close_all()
        if self._unsent:
            self._send_behind()  # (the store commits what it was sent before it stops)
        for hook in self._stopping:
            try:
                await hook()
            except Exception:
                logger.exception("a stop hook failed; stopping goes on")
        if self.cluster is not None:
            await self.cluster.stop()  # hands back claimed runs not started, ships the last lines
        await self.store.stop()
        self._started = False

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(invocation)` whenever a run's end is recorded (and with it what the end
        owes, e.g. its deliveries in the outbox): a sync call's once its record, written behind it, is."""
        self._listeners.append(listener)

    def on_stopping(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Await `hook()` when stopping, once every run has ended and before the store closes."""
        self._stopping.append(hook)

    def add_reporter(self, name: str, report: Callable[[], dict[str, Any]]) -> None:
        """Show `report()` (e.g. a trigger's connection state) under `Triggers` in health()."""
        self._reporters[name] = report

    def add_metrics(self, render: Callable[[], str]) -> None:
        """Add `render()` (Prometheus text, e.g. a trigger's figures) to metrics_text()."""
        self._metric_sources.append(render)

    def backlog(self, function: str) -> int:
        """Runs of the function accepted but not yet started (across the cluster, with a shared store)."""
        self.function(function)
        return self._queued(function)

    def _queued(self, function: str) -> int:
        return self.cluster.queued(function) if self.cluster is not None else self.dispatcher.queued(function)

    async def active(self, function: str, source: str) -> int:
        """Runs of the function from this source that are QUEUED or RUNNING."""
        return await self.store.count_active(function, source)

    async def get_state(self, key: str) -> str | None:
        """A small value a trigger remembered across restarts (e.g. its last timer slot)."""
        return await self.store.get_state(key)

    async def put_state(self, key: str, value: str) -> None:
        """Remember a small value durably."""
        await self.store.put_state(key, value)

    # -- acceptance ------------------------------------------------------------------------

    async def accept(self, envelope: Envelope, *, throttle: bool = True, repeatable: bool = False) -> Accepted:
        """Record one envelope durably and queue its run.

        `repeatable`: the envelope's id may name an event accepted before (an Idempotency-Key):
        a repeat gets its RequestId and is not counted against qps_limit.
        """
        if self.shutting_down:
            raise ShuttingDown()
        function = envelope.function
        self.function(function)
        if throttle:
            if repeatable and (earlier := await self._repeat_of(envelope)) is not None:
                return Accepted(earlier, False)
            self._throttle(function)
        accepted = (await self._record([envelope], {function}))[0]
        if throttle and not accepted.created:
            self.dispatcher.give_back(function)  # a repeat found by its commit takes no token either
        return accepted

    async def _repeat_of(self, envelope: Envelope) -> str | None:
        """The RequestId the envelope's event was accepted under before: a repeat, which takes
        nothing of qps_limit (looked up before a token is taken, so none is held meanwhile)."""
        earlier = await self.accepted_before(envelope)
        if earlier is not None:
            self.metrics.duplicates[envelope.function] += 1
        return earlier

    def _throttle(self, function: str) -> None:
        """Take a qps_limit token for a new event, or Throttled."""
        try:
            self.dispatcher.throttle(function)
        except Throttled:
            self.metrics.throttled[function] += 1
            raise

    async def accept_batch(self, envelopes: Sequence[AnyEnvelope]) -> list[Accepted]:
        """Record many envelopes in one durable commit (a Templated one as its fields); never throttled."""
        if self.shutting_down:
            raise ShuttingDown()
        if envelopes.__class__ is TemplatedBatch:
            functions = {envelopes.function}  # type: ignore[attr-defined]
        else:
            functions = {envelope.function for envelope in envelopes}
        for function in functions:
            self.function(function)
        return await self._record(envelopes, functions)

    async def _record(self, envelopes: Sequence[AnyEnvelope], functions: set[str]) -> list[Accepted]:
        rows = _rows(envelopes)
        if envelopes.__class__ is TemplatedBatch:
            templates = {envelopes.template}  # type: ignore[attr-defined]
        else:
            templates = {e.template for e in envelopes if e.__class__ is Templated}  # type: ignore[union-attr]
        if templates:
            await self.store.keep_templates(templates)
        accepted = await self.store.accept(rows)
        if len(functions) == 1 and all(map(_created, accepted)):
            # The usual batch (one function, every event new), without a step per event in Python.
            (function,) = functions
            self.metrics.accepted[function] += len(rows)
            self._queue(function, _request_ids(rows))
            return accepted
        created: dict[str, list[str]] = {}
        for envelope, answer in zip(envelopes, accepted):
            if answer.created:
                created.setdefault(envelope.function, []).append(answer.request_id)
            else:
                self.metrics.duplicates[envelope.function] += 1
        for function, ids in created.items():
            self.metrics.accepted[function] += len(ids)
            self._queue(function, ids)
        return accepted

    def _queue(self, function: str, request_ids: list[str]) -> None:
        """New runs wait for a slot: here, or with a shared store, on whichever node claims them."""
        if self.cluster is not None:
            self.cluster.accepted(function, len(request_ids))
        else:
            self.dispatcher.submit(function, *request_ids)

    # -- sync calls ------------------------------------------------------------------------

    async def call(self, envelope: Envelope, *, unique: bool = False) -> Invocation:
        """A sync call: its run, once ended (or as it is when the timeout and a margin have passed).

        `unique`: the envelope's id was made for this call (no Idempotency-Key), so it cannot be
        a duplicate. Then, on a node with its own store and a slot free, the run starts at once
        and its record is written behind it instead of before each step: every WRITE_BEHIND
        seconds the starts and ends of the sync calls since the last send go to the store in one
        commit. The caller, waiting on the answer, holds the outcome, and this engine answers
        for the run until the store has it. Otherwise the durable path of an async event:
        accept, queue, wait for the end.
        """
        function = envelope.function
        config = self.function(function)
        if self.shutting_down:
            raise ShuttingDown()
        if not unique and (earlier := await self._repeat_of(envelope)) is not None:
            return await self._answer(earlier, config)
        self._throttle(function)
        if unique and self.cluster is None and self.dispatcher.can_start(function):
            request_id = self._start_behind(envelope)
        else:
            accepted = (await self._record([envelope], {function}))[0]
            if not accepted.created:
                self.dispatcher.give_back(function)  # a repeat takes no token
            request_id = accepted.request_id
        return await self._answer(request_id, config)

    async def _answer(self, request_id: str, config: FunctionConfig) -> Invocation:
        """A sync call's answer: its run, once ended. A queued run waits its turn however long;
        one started ends by its timeout and kill_grace, so past those and a margin (its end
        lost: a bug, or a store gone) the answer is the run as it is."""
        margin = config.timeout + self.manifest.server.kill_grace + 5
        running_since: float | None = None
        unread_since: float | None = None
        while True:
            try:
                invocation = await self.wait(request_id, timeout=margin)
            except StoreError as exc:
                # The event is recorded and its run goes on: an answer without it would have the
                # client send it again (a second run). The store is read again, up to the margin.
                unread_since = unread_since or time.monotonic()
                if time.monotonic() - unread_since >= margin or self.shutting_down:
                    raise StoreError(
                        f"run {request_id} was accepted, but the store cannot say how it ended now ({exc}): "
                        f"GET /invocations/{request_id} once it can; do not send the event again"
                    ) from None
                await asyncio.sleep(WAIT_RECHECK)
                continue
            unread_since = None
            if invocation.status.ended or self.shutting_down:  # (a stop answers the waiting as they are)
                return invocation
            if invocation.status is Status.RUNNING:
                if running_since is not None and time.monotonic() - running_since >= margin:
                    return invocation
                running_since = running_since or time.monotonic()

    def _start_behind(self, envelope: Envelope) -> str:
        """Start a sync call's run now; its record (accepted, RUNNING) is sent with the next batch."""
        rows: Batch = _rows([envelope])  # type: ignore[assignment]  # (one envelope: a Batch)
        request_id = rows.request_ids[0]
        invocation = Invocation(
            request_id=request_id, function=envelope.function, trigger=envelope.trigger,
            status=Status.RUNNING, created_at=rows.created_at, started_at=rows.created_at,
        )
        self._behind[request_id] = self._unsent[request_id] = _Behind(invocation, rows)
        self._send_soon()
        self.metrics.accepted[envelope.function] += 1
        self.dispatcher.start_now(envelope.function, request_id)
        return request_id

    def _end_behind(self, behind: _Behind, outcome: Outcome) -> bool:
        """Record a sync call's end with the next batch (see call); False if it had ended."""
        started = behind.invocation
        if started.status.ended:
            return False
        ended_at = now_rfc3339()
        behind.invocation = dataclasses.replace(
            started, status=outcome.status, ended_at=ended_at, duration_ms=_ms_between(started.started_at, ended_at),
            result=outcome.result, error_type=outcome.error_type, error_message=outcome.error_message,
        )
        behind.ending = behind.ended = Ending(
            started.request_id, outcome.status.value, ended_at,
            dumps(outcome.result) if outcome.result is not None else None, outcome.error_type, outcome.error_message,
        )
        self._unsent[started.request_id] = behind
        self._send_soon()
        return True

    def _send_soon(self, after: float = WRITE_BEHIND) -> None:
        if self._sending is None:
            self._sending = asyncio.get_running_loop().call_later(after, self._send_behind)

    def _send_behind(self) -> None:
        """Send the starts and ends of sync calls not yet sent, in one turn of the loop: one commit."""
        if self._sending is not None:
            self._sending.cancel()
            self._sending = None
        unsent, self._unsent = self._unsent, {}
        self._sends += 1
        store: SQLiteStore = self.store  # type: ignore[assignment]  # (only a store of its own writes behind)
        starts = [(request_id, behind.rows) for request_id, behind in unsent.items() if behind.rows is not None]
        for request_id, rows in starts:  # the accepts first, so they become one statement, then the starts
            self._write_behind(request_id, "acceptance", functools.partial(store.accept_behind, rows))
        for request_id, rows in starts:
            unsent[request_id].rows = None
            self._write_behind(request_id, "start", functools.partial(store.start_behind, request_id, rows.created_at))
        for request_id, behind in unsent.items():
            if behind.ending is not None:
                ending, behind.ending = behind.ending, None
                self._write_behind(request_id, "end", functools.partial(store.finish_behind, ending))

    def _write_behind(self, request_id: str, step: str, write: Callable[[], asyncio.Future[Any]]) -> None:
        done = functools.partial(self._written_behind, self._sends, request_id, step)
        try:
            written = write()
        except Exception as exc:  # the store closed or its writer gone: the record is lost, say so
            done(exc)
        else:
            written.add_done_callback(done)

    def _written_behind(self, send: int, request_id: str, step: str, written: asyncio.Future[Any] | Exception) -> None:
        """A sync call's record was committed (or failed to be): from its end on, the store answers for it.

        A step the store refused (StoreError: a full disk, its writer restarting) is sent again
        with the steps after it, with the back-off of a run's end (REFUSED_RETRY): its
        acceptance and start (each harmless twice), then its end once it has ended. The back-off
        counts sends, not records (one send refused is one commit refused), and so does the
        server's log (see FailureLog). Any other failure (the store closed) loses the record, and the log
        says so.
        """
        if isinstance(written, Exception):
            error: BaseException | None = written
        else:
            error = None if written.cancelled() else written.exception()
        behind = self._behind.get(request_id)
        if isinstance(error, StoreError) and behind is not None:
            if step != "end":
                behind.rows = behind.accepted
            behind.ending = behind.ended
            self._unsent[request_id] = behind
            if send != self._refused_send:  # the first record of its send refused
                self._refused_send = send
                delay = _refused_delay(self._behind_refused)
                self._behind_refused += 1
                self._refused_records.log(
                    "the store refused the %s of sync call %s (%s); sending it, and what else of that send it"
                    " refuses, again in %gs", step, request_id, error, delay,
                )
                self._send_soon(delay)
            return
        if error is None:
            if self._behind_refused:
                self._refused_records.recovered("the store records sync calls' records again")
                self._behind_refused = 0
            if step == "end" and request_id not in self._unsent:  # (not sent again meanwhile: written)
                written_behind = self._behind.pop(request_id, None)
                if written_behind is not None and self._listeners:
                    self._notify(written_behind.invocation)  # its deliveries are in the outbox now
            return
        if step == "end":
            self._behind.pop(request_id, None)
        logger.error("the record of sync call %s (its %s) was not written: %s", request_id, step, error)

    # -- replay ----------------------------------------------------------------------------

    async def replay(self, request_id: str, *, key: str | None = None) -> Accepted:
        """A new run of an ended run's envelope, with a new RequestId, linked to it both ways.

        Async execution never retries on its own; this is how a user does, when they choose to.
        `key` (an Idempotency-Key): the replay of this run made with the same key before, if
        there is one (created False), rather than another.
        """
        if self.shutting_down:
            raise ShuttingDown()
        original = await self.get(request_id)
        if not original.status.ended:
            raise InvocationActive(request_id, original.status.value)
        self.function(original.function)  # (a function no longer in the manifest cannot run)
        envelope = await self.envelope(request_id)
        source = loads(envelope)["source"]
        # Its own dedupe key: the envelope (and the id in it) stays the event it was.
        event_id = replay_event_id(request_id, key) if key else None
        if event_id is not None and (earlier := await self.store.find_event(original.function, source, event_id)):
            return Accepted(earlier, False)
        first, (new_id,) = request_ids(1)
        row = NewInvocation(
            new_id, original.function, source, event_id or f"replay:{new_id}", original.trigger,
            rfc3339_at(first >> 12), envelope, first,
        )
        if request_id in self._unsent:
            self._send_behind()  # the original's record goes first
        recorded = await self.store.replay(row, request_id)
        if recorded != new_id:  # the same key's replay, made at the same moment
            return Accepted(recorded, False)
        self.metrics.accepted[original.function] += 1
        self._queue(original.function, [new_id])
        return Accepted(new_id, True)

    async def replay_many(
        self,
        function: str,
        *,
        status: Status | None = None,
        trigger: str | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int = 100,
        dry_run: bool = False,
        key: str | None = None,
        cursor: str | None = None,
    ) -> tuple[list[tuple[str, str | None]], str | None]:
        """Replay the ended runs of a function that match, newest first, each once, at most `limit`;
        (original, new RequestId) pairs, the new one None in a dry run, and the cursor where the
        runs that match go on after them (a list's: None when none are left to look at).

        `key` (an Idempotency-Key): each run is replayed with it (see `replay`), so the same
        request sent again answers the same replays and makes no others; and the replays made
        with it are not picked (a resend for FAILED runs would replay the failed replays). A dry
        run with a key shows the replay a run has under it already, else None.
        """
        if status is not None and not status.ended:
            raise InvalidParameter(f"Status: only ended runs can be replayed, not {status.value} ones")
        picked, cursor = await self._replay_picks(function, status, trigger, since, until, limit, key, cursor)
        if dry_run:
            return [(request_id, await self._replay_under(request_id, key)) for request_id in picked], cursor
        pairs: list[tuple[str, str | None]] = []
        for request_id in picked:
            try:
                pairs.append((request_id, (await self.replay(request_id, key=key)).request_id))
            except InvocationNotFound:
                continue  # deleted since it was picked (retention): there is nothing left to replay
        return pairs, cursor

    async def _replay_picks(
        self, function: str, status: Status | None, trigger: str | None, since: int | None, until: int | None,
        limit: int, key: str | None, cursor: str | None,
    ) -> tuple[list[str], str | None]:
        """The runs replay_many replays: the ended ones that match, newest first from `cursor`, at
        most `limit`, less the replays made with `key`; and the cursor after the last run looked at.

        Each page asked for is at most what is still wanted, and taken whole: so the cursor
        after it is right after the last run picked, and the next request takes up from there.
        """
        picked: list[str] = []
        while len(picked) < limit:
            page, cursor = await self.list(
                function=function, status=status, trigger=trigger, since=since, until=until,
                limit=min(200, limit - len(picked)), cursor=cursor,
            )
            ended = [i.request_id for i in page if i.status.ended]
            if key and ended:
                made_with_key = await self.store.replays_under(key, ended)
                ended = [request_id for request_id in ended if request_id not in made_with_key]
            picked += ended
            if cursor is None:
                break
        return picked, cursor

    async def _replay_under(self, request_id: str, key: str | None) -> str | None:
        """The replay of a run made with `key` already, if there is one (None without a key)."""
        if not key:
            return None
        _, replays = await self.links(request_id)
        return next(iter(await self.store.replays_under(key, replays)), None)

    async def links(self, request_id: str) -> tuple[str | None, list[str]]:
        """The run a run replays, and the runs that replay it."""
        return await self.store.links(request_id)

    async def accepted_before(self, envelope: Envelope) -> str | None:
        """The RequestId the envelope's event was accepted under already (a retry), or None."""
        return await self.store.find_event(envelope.function, envelope.source, envelope.id)

    # -- reading ---------------------------------------------------------------------------

    def function(self, name: str) -> FunctionConfig:
        """A function's configuration."""
        try:
            return self.manifest.functions[name]
        except KeyError:
            raise FunctionNotFound(name) from None

    def functions(self) -> dict[str, FunctionConfig]:
        """Every function of the manifest."""
        return dict(self.manifest.functions)

    async def get(self, request_id: str) -> Invocation:
        """One invocation."""
        behind = self._behind.get(request_id)
        if behind is not None:
            return behind.invocation
        invocation = await self.store.get(request_id)
        if invocation is None:
            raise InvocationNotFound(request_id)
        return invocation

    async def list(
        self,
        *,
        function: str | None = None,
        status: Status | None = None,
        trigger: str | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int = 50,
        cursor: str | None = None,
        results: bool = True,
    ) -> tuple[list[Invocation], str | None]:
        """Invocations newest first (accepted from `since` until before `until`, Unix ms), and the next page's cursor.

        Without `results`, each run's result is left unread (None). A function the manifest lacks
        is listed if the store has runs of it (dropped since, or another node's); else FunctionNotFound.
        """
        page = await self.store.list(
            function=function, status=status, trigger=trigger, since=since, until=until, limit=limit, cursor=cursor,
            results=results,
        )
        if function is not None and function not in self.manifest.functions and not page[0]:
            if not (await self.store.list(function=function, limit=1, results=False))[0]:
                self.function(function)  # (raises: most likely a typo)
        return page

    async def counts(self) -> dict[str, dict[str, int]]:
        """Runs of each function by status (see Recount: shared, and at most 10% of the time): every
        function of the manifest, then any other the store has runs of (dropped since, or another
        node's: nodes may have different manifests), as `list` lists them."""
        found = await self._recount.result()
        empty = {s.value: 0 for s in Status}
        counts = {name: found.get(name, dict(empty)) for name in self.manifest.functions}
        return counts | {name: found[name] for name in sorted(found) if name not in counts}

    async def envelope(self, request_id: str) -> bytes:
        """The envelope a run was given, as JSON."""
        envelope = await self.store.envelope(request_id)
        if envelope is None:
            behind = self._behind.get(request_id)
            if behind is None:
                raise InvocationNotFound(request_id)
            return behind.envelope
        return envelope

    async def wait(self, request_id: str, timeout: float | None = None) -> Invocation:
        """The invocation once it has ended (or as it is when `timeout` passes)."""
        # Waiting before looking: an end recorded (on any node) while the store is read still wakes it.
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(request_id, []).append(future)
        try:
            looked = True
            try:
                invocation = await self.get(request_id)
            except StoreError:
                looked = False  # (it may have ended already: the store is read again as the wait goes)
            else:
                if invocation.status.ended:
                    return invocation
            async with asyncio.timeout(timeout):
                if self.cluster is None and looked:
                    await future
                else:
                    await self._wait_reading(request_id, future)
        except TimeoutError:
            pass
        finally:
            waiting = self._waiters.get(request_id)
            if waiting and future in waiting:
                waiting.remove(future)
        return await self.get(request_id)

    async def _wait_reading(self, request_id: str, future: asyncio.Future[None]) -> None:
        """Until the run's end is heard of, or found in the store (read every WAIT_RECHECK seconds:
        with a shared store, whose notice of an end may be lost with a dropped connection, or
        once a look at the run has failed)."""
        while not future.done():
            await asyncio.wait({future}, timeout=WAIT_RECHECK)
            if future.done():
                return
            try:
                if (await self.get(request_id)).status.ended:
                    return
            except StoreError:  # the store cannot serve now: the notice, or the next look, tells
                pass

    async def read_log(self, request_id: str, *, last: int | None = None) -> bytes:
        """The run's log so far; with `last`, at least its last `last` bytes (with a shared store,
        the whole lines that hold them), not the whole of a log that may be large."""
        await self.get(request_id)
        if self.cluster is not None:
            return await self.cluster.read_log(request_id, last=last)
        return self.logs.read(request_id, last=last)

    async def log_pieces(self, request_id: str) -> AsyncIterator[bytes]:
        """The run's log so far a piece at a time, where there is no file to send (see log_file)."""
        await self.get(request_id)
        if self.cluster is not None:
            async for piece in self.cluster.log_pieces(request_id):
                yield piece
        elif log := self.logs.read(request_id):  # (its file was just made, or removed)
            yield log

    async def log_file(self, request_id: str) -> Path | None:
        """The file holding the run's log so far, to be sent as it is; None where there is no
        such file (nothing written yet, or a shared store, where read_log reads it)."""
        await self.get(request_id)
        return None if self.cluster is not None else self.logs.file(request_id)

    async def follow_log(self, request_id: str, *, tail: int | None = None) -> AsyncIterator[str | LeftOut]:
        """Log lines so far, then live ones, ending when the run ends; with `tail`, of the lines so
        far only those in about the last `tail` bytes, after a LeftOut if earlier ones are left out."""
        await self.get(request_id)

        async def state() -> Invocation:
            return await self.get(request_id)

        async def ended() -> bool:
            return (await state()).status.ended

        if self.cluster is not None:
            return self.cluster.follow_log(request_id, state, tail=tail)
        return self.logs.follow(request_id, ended, tail=tail)

    def metrics_text(self) -> str:
        """Prometheus text of the engine's counters, then of each added source."""
        parts = [
            self.metrics.render(
                self.manifest.functions,
                lambda f: (self._queued(f), self.dispatcher.running(f)),
            ),
            self.store.writes.render(),
        ]
        if self.cluster is not None:
            parts.append(self.cluster.metrics_text())
        for render in self._metric_sources:
            try:
                parts.append(render())
            except Exception:  # one broken source must not take the others down
                logger.exception("a metrics source failed; /metrics goes on without it")
        return "".join(parts)

    def health(self) -> dict[str, Any]:
        """Liveness and a few figures."""
        health = {
            "Status": "shutting-down" if self.shutting_down else "ok",
            "Node": self.node_id,
            "Functions": len(self.manifest.functions),
            "Running": self.dispatcher.total_running,
            "Instances": self.pool.size,
            "Triggers": {name: report() for name, report in self._reporters.items()},
        }
        if self.cluster is not None:
            health["Cluster"] = self.cluster.view()  # (its Store: whether the heartbeats reach the store)
        else:
            # Status stays "ok" while writes are refused (a restart would not help), as with Cluster.Store.
            health["Store"] = self.store.writes.view()
        return health

    # -- terminate -------------------------------------------------------------------------

    async def terminate(self, request_id: str) -> Invocation:
        """Stop a QUEUED or RUNNING run; it ends ABORTED."""
        invocation = await self.get(request_id)
        if invocation.status.ended:
            raise InvocationEnded(request_id, invocation.status.value)
        if self.cluster is not None and request_id not in self._runs:
            return await self._terminate_in_cluster(invocation)
        return await self._terminate_here(invocation)

    async def _terminate_here(self, invocation: Invocation) -> Invocation:
        """Stop a run this engine holds, whatever step it is at: queued, starting, or running."""
        request_id = invocation.request_id
        if self._unqueue(invocation.function, request_id):
            outcome = Outcome(status=Status.ABORTED, error_type="Aborted", error_message="the run was terminated before it started")
            await self._end(request_id, invocation.function, outcome, started=None)
            return await self.get(request_id)
        task = self.dispatcher.task(request_id)
        if task is not None and request_id not in self._runs:
            # Taken off its queue a moment ago: its task makes its _Run at its first step, which
            # was scheduled before this one (or the run is over and only recording its end).
            await asyncio.sleep(0)
        run = self._runs.get(request_id)
        if run is not None:
            run.abort = True  # (seen by _execute before the run goes to an instance, if it has not yet)
            if run.instance is not None:
                await run.instance.abort(Status.ABORTED, self.manifest.server.kill_grace)
        if task is not None:
            await asyncio.shield(asyncio.wait({task}))
            return await self.get(request_id)
        # Neither queued nor under way here: a terminate at the same time is recording its end.
        return await self.wait(request_id, timeout=self.manifest.server.kill_grace + TERMINATE_WAIT)

    def _unqueue(self, function: str, request_id: str) -> bool:
        """Take a run that has not started out of its queue (with the time of a refused start it
        waited to try again); False if it is no longer queued."""
        if not self.dispatcher.remove(function, request_id):
            return False
        self._start_tried.pop(request_id, None)
        return True

    async def _terminate_in_cluster(self, invocation: Invocation) -> Invocation:
        """Terminate a run this node is not running: not started yet, it ends here, whichever node
        claimed it; started here meanwhile, it is stopped here; else its node is asked."""
        request_id = invocation.request_id
        if invocation.status is Status.QUEUED:
            outcome = Outcome(status=Status.ABORTED, error_type="Aborted", error_message="the run was terminated before it started")
            if await self._end(request_id, invocation.function, outcome, started=None, queued_only=True):
                self._unqueue(invocation.function, request_id)  # (claimed here: its node finds it ended otherwise)
                return await self.get(request_id)
        # It has started (or ended) since: RUNNING, its node does not change until it ends.
        owner = await self.store.owner(request_id)  # type: ignore[union-attr]
        if owner is None:  # it ended meanwhile
            invocation = await self.get(request_id)
            if invocation.status.ended:
                return invocation
            raise InvocationEnded(request_id, invocation.status.value)
        if owner == self.node_id:
            return await self._terminate_here(invocation)
        assert self.cluster is not None
        if await self.cluster.terminate_elsewhere(request_id) is None:  # it ended meanwhile
            return await self.get(request_id)
        waited = self.manifest.server.kill_grace + TERMINATE_WAIT
        invocation = await self.wait(request_id, timeout=waited)
        if invocation.status.ended:
            return invocation
        # Never answered RUNNING: NodeNotAnswering, unless its node's lease ran out and it ended NodeLost here.
        await self.cluster.not_stopped(owner, request_id, waited)
        return await self.get(request_id)

    # -- running ---------------------------------------------------------------------------

    async def _execute(self, function: str, request_id: str) -> None:
        config = self.manifest.functions[function]
        run = self._runs[request_id] = _Run()
        started = time.monotonic()
        try:
            behind = self._behind.get(request_id)
            # A start tried again goes with the first try's time: the store takes a start it
            # already recorded at that time as this one (a commit whose answer was lost).
            started_at = self._start_tried.pop(request_id, None) or now_rfc3339()
            try:
                envelope = behind.envelope if behind is not None else await self.store.begin(request_id, started_at)
            except StoreError as exc:
                self._start_tried[request_id] = started_at
                self._start_refused(function, request_id, exc)
                return
            if envelope is None:
                return  # ended (terminated) in the meantime
            if self._starts_refused:
                self._refused_starts.recovered("the store records runs' starts again")
                self._starts_refused = 0
            self.logs.open(request_id)
            if run.abort:
                outcome = Outcome(status=Status.ABORTED, error_type="Aborted", error_message="the run was terminated on request")
            else:
                try:
                    outcome = await self._run_on_instance(run, function, config, request_id, envelope)
                except Exception as exc:  # eventrun's own failure: the run still ends, and says so
                    logger.exception("run %s of %s failed inside eventrun", request_id, function)
                    outcome = Outcome(
                        status=Status.FAILED, error_type="InternalError",
                        error_message=f"eventrun failed while running it ({type(exc).__name__}: {exc}); see the server log",
                    )
            self.dispatcher.release(function, request_id)  # its instance is free: the next run may start
        except asyncio.CancelledError:
            outcome = Outcome(status=Status.FAILED, error_type="ServerStopped", error_message=SERVER_STOPPED)
            if run.instance is not None:
                await asyncio.shield(run.instance.kill(self.manifest.server.kill_grace))
            await asyncio.shield(self._end(request_id, function, outcome, started=started))
            raise
        finally:
            self._runs.pop(request_id, None)
        if run.lost:  # its end (NodeLost) was recorded, and its closing line written, by another node
            self.logs.close(request_id)
            return
        # Released above, the run is only recording its end now: a stop does not cancel that
        # (see Dispatcher.cancel_all), so it is awaited here rather than shielded in a task of its own.
        await self._end(request_id, function, outcome, started=started)

    def _start_refused(self, function: str, request_id: str, exc: StoreError) -> None:
        """The store did not record a run's start: the run waits at the head of its queue, and
        no run starts until the store is tried again (see REFUSED_RETRY)."""
        delay = _refused_delay(self._starts_refused)
        self._starts_refused += 1
        self._refused_starts.log("the store refused the start of run %s (%s); starts are tried again in %gs", request_id, exc, delay)
        self.dispatcher.retry_later(function, request_id, delay)

    def _spec(self, function: str, config: FunctionConfig) -> Spec:
        """How to start the function's instances, kept for its runs to come."""
        spec = self._specs[function] = Spec(
            function=function,
            handler=f"{self.manifest.handler_path(function)}:{config.handler_name}",
            cwd=self.manifest.base_dir,
            environment=dict(config.environment),
            memory_limit=self.manifest.server.memory_limit if config.memory_limit is None else config.memory_limit,
            run_as=function_user(self.manifest, config),
        )
        return spec

    async def _run_on_instance(
        self, run: _Run, function: str, config: FunctionConfig, request_id: str, envelope: bytes
    ) -> Outcome:
        spec = self._specs.get(function) or self._spec(function, config)
        try:
            instance = run.instance = await self.pool.acquire(spec)
        except (OSError, UnknownUser) as exc:  # no process, pipe or fd to be had (EAGAIN, EMFILE, ENOMEM); no user
            logger.error("cannot start an instance of %s for run %s: %s", function, request_id, exc)
            return Outcome(
                status=Status.FAILED, error_type="InstanceStartFailed", error_message=f"no instance could be started: {exc}"
            )
        if run.abort:
            await instance.abort(Status.ABORTED, self.manifest.server.kill_grace)
        self.logs.hold(request_id, f"[eventrun] run started on instance {instance.pid}")  # with its first line
        outcome = Outcome(status=Status.FAILED, error_type="InternalError", error_message="run did not report")
        try:
            outcome = await instance.run(
                request_id,
                envelope,
                config.timeout,
                lambda lines: self.logs.write(request_id, lines),
                self.manifest.server.kill_grace,
                log_limit=self.manifest.server.log_limit,
            )
        finally:
            if not self.pool.keep_warm(instance, keep=outcome.keep_instance and not run.abort):
                await asyncio.shield(instance.kill(self.manifest.server.kill_grace))
        if not outcome.keep_instance and outcome.status is Status.FAILED:
            self._note(request_id, f"[eventrun] instance {instance.pid} was discarded after the failure")
        self._note_loading(function, outcome)
        return outcome

    def _note_loading(self, function: str, outcome: Outcome) -> None:
        """Say in the server's log that a function's handler cannot be loaded: once a reason, as
        each of its runs fails alike until its code is fixed (the run's log has the traceback);
        and that it can again, once a run finishes."""
        if outcome.error_type == HANDLER_LOAD_FAILED:
            reason = outcome.error_message or ""
            if self._unloadable.get(function) != reason:
                self._unloadable[function] = reason
                logger.error("function %s: %s; its runs fail until its code is fixed", function, printable(reason))
        elif outcome.status is Status.FINISHED and self._unloadable.pop(function, None) is not None:
            logger.info("function %s: its handler is loaded again", function)

    async def _end(
        self, request_id: str, function: str, outcome: Outcome, *, started: float | None, queued_only: bool = False
    ) -> bool:
        """Record the final state (once), close the log, wake waiters and listeners; False if it had ended.

        `queued_only` (a shared store): record it only if no node has started the run yet.
        """
        note = end_note(outcome.status.value, outcome.error_type, outcome.error_message)
        if outcome.status is not Status.FINISHED and not queued_only:
            self._note(request_id, note)
        behind = self._behind.get(request_id)
        if behind is not None:
            recorded = self._end_behind(behind, outcome)
        else:
            recorded = await self._finish(request_id, outcome, queued_only=queued_only)
        self.logs.close(request_id)  # (queued_only: the store wrote the closing line with the end)
        if recorded:
            seconds = time.monotonic() - started if started is not None else None
            self.metrics.observe_end(function, outcome.status, seconds)
        self._wake_waiters(request_id)
        if recorded and self._listeners and behind is None:  # (one behind: once its end is written)
            self._notify(await self.get(request_id))
        return recorded

    async def _finish(self, request_id: str, outcome: Outcome, *, queued_only: bool) -> bool:
        """Record a run's end, tried again for as long as the store refuses it: an outcome is kept
        until the store has it (or the server stops, and the run then ends ServerStopped).

        `queued_only` (terminating a run no node has claimed) is tried once: its caller is told.
        The end's time is when it came, however long the store took to take it.
        """
        ended_at = now_rfc3339()
        refusals = 0
        while True:
            try:
                if self.cluster is not None:
                    await self.cluster.shipper.flush()  # every line is in the store before the end is
                recorded = await self.store.finish(
                    request_id,
                    outcome.status,
                    ended_at,
                    result=outcome.result,
                    error_type=outcome.error_type,
                    error_message=outcome.error_message,
                    **({"queued_only": True} if queued_only else {}),
                )
                if refusals:
                    self._refused_ends.recovered("the store records runs' ends again")
                return recorded
            except StoreError as exc:
                if queued_only:
                    raise
                delay = _refused_delay(refusals)
                self._refused_ends.log("the store refused the end of run %s (%s); trying again in %gs", request_id, exc, delay)
                await asyncio.sleep(delay)
                refusals += 1

    def _wake_waiters(self, request_id: str) -> None:
        for future in self._waiters.pop(request_id, ()):
            if not future.done():
                future.set_result(None)

    async def _ended_by_the_store(self, ended: Sequence[tuple[str, str]]) -> None:
        """Runs the store ended FAILED (their node died, or this one before a restart), their
        closing lines written with their ends: wake, tell."""
        invocations = [await self.get(request_id) for request_id, _function in ended]
        for invocation in invocations:
            self.metrics.observe_end(invocation.function, Status.FAILED, None)  # (ended by the store, not by a run here)
            self.logs.close(invocation.request_id)
            self._wake_waiters(invocation.request_id)
            self._notify(invocation)

    async def _stop_lost_runs(self) -> None:
        """This node was taken for dead (cut off from the store, or paused, past its lease): the
        others ended its RUNNING runs FAILED (NodeLost) and gave their slots away. Stop those still
        going here; their ends stand as recorded (runs started here since go on)."""
        grace = self.manifest.server.kill_grace
        for request_id, run in list(self._runs.items()):
            invocation = await self.get(request_id)
            if run.lost or not invocation.status.ended:
                continue
            run.lost = run.abort = True  # (an instance not acquired yet is stopped as it comes: _run_on_instance)
            if run.instance is not None:
                logger.warning(
                    "stopping run %s: this node was taken for dead, and the run ended %s (%s) meanwhile",
                    request_id, invocation.status.value, invocation.error_type,
                )
                task = asyncio.create_task(run.instance.abort(Status.ABORTED, grace), name=f"stop-lost-{request_id}")
                self._stopping_lost.add(task)
                task.add_done_callback(self._stopping_lost.discard)

    def _notify(self, invocation: Invocation) -> None:
        for listener in self._listeners:
            try:
                listener(invocation)
            except Exception:
                logger.exception("listener failed for %s", invocation.request_id)

    def _note(self, request_id: str, line: str) -> None:
        """A line from eventrun itself in the run's log."""
        self.logs.note(request_id, line)
