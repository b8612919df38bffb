"""This node among several on one PostgreSQL store: claims, leases, notices and shared logs.

Any node accepts events; the runs wait in the store as QUEUED until a node with a free slot
claims them (eventrun_claim: oldest first, the function's concurrency held across the cluster).
A node hears of new runs and freed slots by NOTIFY, and also looks once per heartbeat, so a
notice missed while its listening connection was down costs a heartbeat, not the run.

Each node renews its lease (a heartbeat) every third of the lease. A node not heard from
within its lease is taken for dead: the first survivor to notice ends its RUNNING runs FAILED
(async execution never retries) and takes it off the registry; its QUEUED runs were never
its own, so any node runs them. A node judges others only from the store's answers to its
own renewals: once its renewals failed (or came late), it gives each other node its whole
lease again from the moment the store answers, for an outage of the store silences every
node alike. A node that finds it was taken for dead stops the runs that were ended for it.

A terminate of a run on another node is kept with the run (abort_requested) as well as told by
NOTIFY: the node running it also looks for such requests at each heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Sequence

import asyncpg

from .api import SERVER_STOPPED, Invocation, Status
from .dispatcher import Dispatcher
from .envelope import now_rfc3339
from .errors import InvocationEnded, InvocationNotFound, NodeNotAnswering, StoreError
from .failures import FailureLog
from .logs import LeftOut, log_lines
from .metrics import family, labels
from .postgres import ENDED, LOGGED, QUEUED, TERMINATE, Node, PostgresStore
from .store import HeldLock, hold_lock

logger = logging.getLogger(__name__)

NODE_LOST = "NodeLost"
_LAST_START = "eventrun.node"  # in data_dir: "{node_id} {incarnation}" of this node's last start
ANNOUNCE_EVERY = 0.02  # seconds between notices of new runs from one node
SHIP_INTERVAL = 0.1  # seconds a log line may wait before it is shipped to the store
SHIP_MOST = 5.0  # seconds between tries at most while shipping log lines fails (from SHIP_INTERVAL, doubling)
SHIP_LOG_EVERY = 5.0  # seconds between the log's lines about shipments that fail, at least
FOLLOW_RECHECK = 1.0  # a follower looks at the store at least this often, notices or not
FOLLOW_CHUNK = 1 << 20  # bytes of a log a follower reads from the store at a time
RENEWAL_LATE = 1.0  # seconds past its time (a third of its lease) a node's renewal is taken as missed
HEARTBEAT_LOG_EVERY = 60.0  # seconds between the log's lines about heartbeats that fail, at least


def default_node_id() -> str:
    """The host name and the process id: unique among live nodes without configuration."""
    return f"{socket.gethostname()}-{os.getpid()}"


def node_lost(owner: str) -> str:
    """The error message of a run whose node stopped answering."""
    return (
        f"node {owner} running this run stopped answering (its lease expired); "
        "the run was not retried (async execution never retries)"
    )


class Cluster:
    """What makes one engine a node: it claims runs, keeps its lease, hears the others."""

    def __init__(
        self,
        store: PostgresStore,
        *,
        data_dir: Path,
        url: str,
        lease: float,
        concurrency: Mapping[str, int],
        qps_limits: Mapping[str, int],
        dispatcher: Dispatcher,
        ended_elsewhere: Callable[[str], None],
        failed_here: Callable[[Sequence[tuple[str, str]]], Awaitable[None]],
        terminate_here: Callable[[str], Awaitable[Any]],
        lost_here: Callable[[], Awaitable[None]],
    ) -> None:
        self.store = store
        self.node_id = store.node_id
        self._data_dir = data_dir
        self._lock: HeldLock | None = None
        self.url = url
        self.lease = lease
        self._concurrency = dict(concurrency)
        self._qps_limits = dict(qps_limits)
        self._dispatcher = dispatcher
        self._ended_elsewhere = ended_elsewhere
        self._failed_here = failed_here
        self._terminate_here = terminate_here
        self._lost_here = lost_here
        self._wanted: set[str] = set()  # functions to claim for
        self._wake = asyncio.Event()
        self._unannounced: set[str] = set()  # functions with runs accepted here the others were not told of
        self._announce = asyncio.Event()
        self._log_readers: dict[str, set[asyncio.Event]] = {}
        self._listener: asyncpg.Connection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._joined = False
        self.shipper = LogShipper(store)
        self.nodes: list[Node] = []
        self.backlog: dict[str, int] = {}
        self._accepted_since: dict[str, int] = {}  # accepted here since the last backlog count
        self._claims_in_doubt = False  # a claim failed: the store may hold claims of ours we never heard of
        self._aborting: dict[str, asyncio.Task[None]] = {}  # runs of this node being stopped on request
        self._renewals_failed = False  # a renewal of this node's lease failed since the last that went through
        self._answered_since = -math.inf  # (monotonic) the store has renewed this node's lease in time since
        self._beats_failing = FailureLog(logger, every=HEARTBEAT_LOG_EVERY, level=logging.WARNING)
        self._beaten_at = time.monotonic()  # this node's last heartbeat that reached the store
        self._beat_failure: str | None = None  # why the last one did not, if it did not

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Join the cluster, end what this node id left RUNNING, listen, and start claiming."""
        # The data_dir is this node's: held, it tells a restart (its last start is dead) from a twin.
        self._lock = hold_lock(self._data_dir / "eventrun.node.lock", f"the data_dir {self._data_dir}")
        await self.store.join(self.url, self.lease, self._last_start())
        self._joined = True
        # Just started, it may come as the store comes back from an outage (a node that could not
        # start meanwhile, restarted): the others, cut off as well, are given their whole lease
        # again from now before they are judged, as after this node's own failed renewals.
        self._answered_since = time.monotonic()
        self._remember_start()
        # A node that comes back under its own id (a restart) ends what it left running at once.
        left = await self.store.fail_runs_of(
            [self.node_id], now_rfc3339(), "ServerStopped", lambda _: SERVER_STOPPED
        )
        if left:
            logger.info("ended %d runs this node left RUNNING as FAILED", len(left))
            await self._failed_here(left)
        await self._listen()
        await self._look()
        self.shipper.start()
        self._tasks = [
            asyncio.create_task(self._claiming(), name="cluster-claims"),
            asyncio.create_task(self._heartbeats(), name="cluster-heartbeats"),
            asyncio.create_task(self._announcing(), name="cluster-announcements"),
        ]
        self.want(*self._concurrency)

    def pause(self) -> None:
        """Claim nothing more (shutdown)."""
        self._stopping = True
        self._wake.set()

    async def stop(self) -> None:
        """Stop claiming and heartbeats, ship the last log lines, leave the cluster."""
        self.pause()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        aborting = list(self._aborting.values())
        for task in aborting:
            task.cancel()
        await asyncio.gather(*aborting, return_exceptions=True)
        left = self._dispatcher.take_queued()
        if left:
            try:
                await self.store.unclaim(left)
            except Exception:  # they stay RUNNING under this node: ended FAILED once its lease expires
                logger.exception("could not hand %d claimed runs back to the queue", len(left))
        await self.shipper.stop()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None
        if self._joined:  # (a node refused its id must not take the holder's entry away)
            self._joined = False
            await self._leave()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    async def _leave(self) -> None:
        """Leave the registry, ending first the runs this node leaves RUNNING: those whose ends
        the store refused as it stopped (an outage), FAILED (ServerStopped), as its next start
        would; but no next start may come. Should the store refuse that too, the node stays
        registered: once its lease has run out, the others end them FAILED (NodeLost)."""
        try:
            left = await self.store.fail_runs_of(
                [self.node_id], now_rfc3339(), "ServerStopped", lambda _: SERVER_STOPPED
            )
        except Exception as exc:
            logger.warning(
                "could not record the ends of the runs this node leaves (%s): it stays in the cluster's registry, "
                "and the other nodes end its runs FAILED (NodeLost) once its lease has run out", exc
            )
            return
        if left:
            logger.warning("ended %d runs whose ends the store had refused as FAILED (ServerStopped)", len(left))
            with contextlib.suppress(Exception):
                await self._failed_here(left)
        with contextlib.suppress(Exception):
            await self.store.leave()

    def _last_start(self) -> str | None:
        """The incarnation this node id had at its last start from this data_dir."""
        try:
            node_id, incarnation = (self._data_dir / _LAST_START).read_text().split()
        except (OSError, ValueError):
            return None
        return incarnation if node_id == self.node_id else None

    def _remember_start(self) -> None:
        path = self._data_dir / _LAST_START
        partial = path.with_name(f"{path.name}.partial")
        partial.write_text(f"{self.node_id} {self.store.incarnation}\n")
        os.replace(partial, path)

    # -- claims ----------------------------------------------------------------------------

    def want(self, *functions: str) -> None:
        """Look for QUEUED runs of these functions as soon as a slot is free."""
        self._wanted.update(f for f in functions if f in self._concurrency)
        self._wake.set()

    def accepted(self, function: str, n: int) -> None:
        """n new runs of a function were accepted here: claim, tell the others, count them in the backlog."""
        self._accepted_since[function] = self._accepted_since.get(function, 0) + n
        self.want(function)
        self._unannounced.add(function)
        self._announce.set()

    async def _announcing(self) -> None:
        """Tell the other nodes of new runs: one notice per function at most every ANNOUNCE_EVERY.

        (Not one per accept: a notice takes a lock of the whole database at its commit.)
        """
        while True:
            await self._announce.wait()
            self._announce.clear()
            functions, self._unannounced = self._unannounced, set()
            try:
                await self.store.announce(functions)
            except Exception as exc:  # the others find the runs at their next heartbeat
                logger.warning("telling the other nodes of new runs failed (%s)", exc)
            await asyncio.sleep(ANNOUNCE_EVERY)

    def queued(self, function: str) -> int:
        """The function's QUEUED runs across the cluster (as of the last heartbeat, plus ours since)."""
        return self.backlog.get(function, 0) + self._accepted_since.get(function, 0)

    async def _claiming(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            wanted, self._wanted = self._wanted, set()
            for function in sorted(wanted):
                if self._stopping:
                    return
                free = self._dispatcher.free(function)
                if free <= 0:
                    continue
                try:
                    claimed = await self.store.claim(function, free, self._concurrency[function])
                except Exception as exc:  # (the store unreachable, say): the claims go on without it
                    logger.warning("claiming runs of %s failed (%s); trying again at the next heartbeat", function, exc)
                    self._claims_in_doubt = True  # it may have been committed, its answer lost
                    continue
                if claimed and self._stopping:  # shutting down: they go back for another node
                    try:
                        await self.store.unclaim(claimed)
                    except Exception:
                        logger.exception("could not hand %d claimed runs back; they end FAILED with the lease", len(claimed))
                    return
                if claimed:
                    self._dispatcher.submit(function, *claimed)
                    if len(claimed) == free:
                        self._wanted.add(function)  # there may be more; look again when a slot frees
                if self._stopping:
                    return

    # -- leases ----------------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self._beat()
            except Exception as exc:  # a heartbeat must go on whatever one of them met
                self._beat_failure = str(exc) or type(exc).__name__
                self._beats_failing.log("heartbeat failed (%s); trying again every %gs", exc, self.lease / 3)
            else:
                self._beaten_at, self._beat_failure = time.monotonic(), None
                self._beats_failing.recovered("heartbeats reach the store again")

    async def _beat(self) -> None:
        if not await self._renew():
            # Taken for dead (paused or cut off past the lease while the others reached the store):
            # its RUNNING runs were ended FAILED (NodeLost), and their slots went to other nodes.
            logger.error(
                "node %s lost its lease and was taken for dead; stopping the runs that were ended for it, and joining again",
                self.node_id,
            )
            await self._lost_here()
            await self.store.join(self.url, self.lease, self.store.incarnation)
        dead = [n.node_id for n in await self.store.nodes() if n.node_id != self.node_id and self._past_lease(n)]
        if dead:
            await self._take_for_dead(dead)
        if self._claims_in_doubt:
            await self._hand_back_unknown_claims()
        if self._listener is None or self._listener.is_closed():
            await self._listen()
        # (after listening again: a request made meanwhile is either heard or found here)
        for request_id in await self.store.aborts_requested():
            self._abort(request_id)  # its notice may have been lost with a connection
        await self._look()
        self.want(*self._concurrency)  # a notice lost on the way costs one heartbeat, not the run

    async def _renew(self) -> bool:
        """Renew this node's lease (False: it was taken for dead meanwhile). After renewals that
        failed, or one that took longer than a third of the lease, the others were as likely cut
        off as this node: each is given its whole lease again from now before it is judged."""
        asked = time.monotonic()
        try:
            renewed = await self.store.heartbeat()
        except BaseException:
            self._renewals_failed = True
            raise
        answered = time.monotonic()
        if self._renewals_failed or answered - asked > self.lease / 3:
            self._renewals_failed = False
            self._answered_since = answered
        return renewed

    def _past_lease(self, node: Node) -> bool:
        """Whether another node is to be taken for dead: silent past its own lease, while this node
        has reached the store for that long (see _renew)."""
        lease = node.lease or self.lease
        return node.heartbeat_age >= lease and time.monotonic() - self._answered_since >= lease

    async def _take_for_dead(self, dead: Sequence[str]) -> None:
        """End the RUNNING runs of nodes silent past their lease FAILED (NodeLost), and drop the nodes."""
        ended = await self.store.fail_runs_of(dead, now_rfc3339(), NODE_LOST, node_lost, lease=self.lease)
        logger.warning("nodes %s stopped answering: %d of their runs ended FAILED", ", ".join(dead), len(ended))
        if ended:
            await self._failed_here(ended)

    async def _hand_back_unknown_claims(self) -> None:
        """After a failed claim: hand back to the queue the runs the store holds CLAIMED by this
        node that it does not know of (the claim was committed, its answer lost); left CLAIMED,
        they would wait for this node's death, each holding a slot of its function."""
        unknown = [rid for rid in await self.store.claimed_here() if not self._dispatcher.knows(rid)]
        if unknown:
            await self.store.unclaim(unknown)
            logger.warning("handed %d runs back to the queue that a failed claim had taken for this node", len(unknown))
        self._claims_in_doubt = False

    async def _look(self) -> None:
        """Refresh the cluster's view: nodes alive, backlog, this node's share of each QPS limit."""
        self.nodes = [n for n in await self.store.nodes() if not self._past_lease(n)]
        self.backlog = await self.store.backlog()
        self._accepted_since = {}
        alive = max(1, len(self.nodes))
        self._dispatcher.share_qps({f: max(1, math.floor(limit / alive)) for f, limit in self._qps_limits.items()})

    # -- notices ---------------------------------------------------------------------------

    async def _listen(self) -> None:
        try:
            self._listener = await self.store.listen(self._notice, self._lost)
        except (OSError, asyncpg.PostgresError) as exc:
            logger.warning("cannot listen for notices (%s); looking for work at each heartbeat meanwhile", exc)
            self._listener = None

    def _lost(self) -> None:
        if self._stopping:  # (closed on purpose)
            return
        logger.warning("the connection listening for notices was lost; listening again at the next heartbeat")
        self._listener = None

    def _notice(self, channel: str, payload: str) -> None:
        if channel == QUEUED:
            self.want(payload)
        elif channel == ENDED:
            function, _, request_id = payload.partition(" ")
            self.want(function)  # a slot of the function is free somewhere: maybe ours to take
            self._ended_elsewhere(request_id)
            self._wake_readers(request_id)
        elif channel == LOGGED:
            self._wake_readers(payload)
        elif channel == TERMINATE:
            owner, _, request_id = payload.partition(" ")
            if owner == self.node_id:
                self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        """Stop a run of this node on another's request (once, however often it is asked)."""
        if request_id in self._aborting:
            return
        task = asyncio.get_running_loop().create_task(self._terminate(request_id), name=f"abort-{request_id}")
        self._aborting[request_id] = task
        task.add_done_callback(lambda _: self._aborting.pop(request_id, None))

    async def _terminate(self, request_id: str) -> None:
        try:
            await self._terminate_here(request_id)
        except (InvocationEnded, InvocationNotFound):
            pass  # it ended (or was pruned) before it could be stopped
        except Exception:
            logger.exception("terminating %s on request of another node failed", request_id)

    async def terminate_elsewhere(self, request_id: str) -> str | None:
        """Ask the node running a run to terminate it (the request is kept until the run ends);
        the node asked, None if the run had ended."""
        return await self.store.request_abort(request_id)

    async def not_stopped(self, node_id: str, request_id: str, waited: float) -> None:
        """A terminate sent to `node_id` was not acted on within `waited` seconds. A node silent
        past its lease is taken for dead here, as at a heartbeat: the run ends FAILED (NodeLost)
        now. Should the run still not have ended, raise NodeNotAnswering, whatever the node's
        last heartbeat: no other node can stop the run (and the request is kept for it)."""
        node = next((n for n in await self.store.nodes() if n.node_id == node_id), None)
        if node is not None and self._past_lease(node):
            await self._take_for_dead([node_id])
        if await self.store.owner(request_id) is None:  # it has ended
            return
        if node is None:
            raise NodeNotAnswering(request_id, node_id, None, self.lease)
        lease = node.lease or self.lease
        renewing = node.heartbeat_age <= lease / 3 + RENEWAL_LATE  # it has not missed a renewal
        raise NodeNotAnswering(request_id, node_id, node.heartbeat_age, lease, waited=waited if renewing else None)

    async def abort_queued(self, request_id: str, message: str) -> bool:
        """End a run no node has started yet as ABORTED; False if one started it meanwhile."""
        return await self.store.finish(
            request_id, Status.ABORTED, now_rfc3339(), error_type="Aborted", error_message=message, queued_only=True
        )

    # -- logs ------------------------------------------------------------------------------

    def _wake_readers(self, request_id: str) -> None:
        for event in self._log_readers.get(request_id, ()):
            event.set()

    async def read_log(self, request_id: str, *, last: int | None = None) -> bytes:
        """The run's log as shipped to the store so far; with `last`, the chunks that hold its
        last `last` bytes (whole lines, so a little more)."""
        if last is not None:
            return await self.store.read_log_end(request_id, last)
        data, _ = await self.store.read_log(request_id)
        return data

    async def log_pieces(self, request_id: str) -> AsyncIterator[bytes]:
        """The run's log as shipped to the store so far, about FOLLOW_CHUNK bytes (whole lines) at a time."""
        last = 0
        while True:
            data, last = await self.store.read_log(request_id, last, most=FOLLOW_CHUNK)
            if not data:
                return
            yield data

    async def follow_log(
        self, request_id: str, state: Callable[[], Awaitable[Invocation]], *, tail: int | None = None
    ) -> AsyncIterator[str | LeftOut]:
        """The run's log so far, then new lines as any node ships them, until the run ends. With
        `tail`, of the log so far only the lines that begin within its last `tail` bytes, after a
        LeftOut saying how many bytes come before them (if any do).

        What a run writes is shipped before its end is recorded, and a closing line the store
        writes for a node (fail_runs_of, finish queued_only) goes with the end: the log read
        after an end was seen is whole.
        """
        event = asyncio.Event()
        self._log_readers.setdefault(request_id, set()).add(event)
        last = 0
        more = False
        run: Invocation | None = None
        try:
            while True:
                event.clear()
                try:
                    if not more:  # (read before the log: what a run wrote is shipped before it ends)
                        run = await state()
                    if tail is not None:
                        data, last, left_out = await self.store.read_log_tail(request_id, tail)
                        tail = None
                        if left_out:
                            yield LeftOut(left_out)
                    else:
                        data, last = await self.store.read_log(request_id, last, most=FOLLOW_CHUNK)
                except StoreError as exc:
                    # The store cannot serve now (an outage); the run goes on, and so does the
                    # follower, reading on once it can (the stream's keepalives hold it open).
                    logger.debug("following the log of %s: %s; reading again in %gs", request_id, exc, FOLLOW_RECHECK)
                    await asyncio.sleep(FOLLOW_RECHECK)
                    continue
                for line in log_lines(data):
                    yield line
                more = len(data) >= FOLLOW_CHUNK  # a whole piece: the log may go on past it
                if more:
                    continue
                if run is not None and run.status.ended:
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FOLLOW_RECHECK):
                        await event.wait()
        finally:
            readers = self._log_readers.get(request_id)
            if readers is not None:
                readers.discard(event)
                if not readers:
                    del self._log_readers[request_id]

    # -- figures ---------------------------------------------------------------------------

    def metrics_text(self) -> str:
        """Prometheus text of this node and the cluster it sees."""
        lines = [
            *family("eventrun_node_info", "gauge", "This node (its id as a label)."),
            f"eventrun_node_info{labels(node=self.node_id)} 1",
            *family("eventrun_cluster_nodes", "gauge", "Nodes alive on the shared store, as of the last heartbeat."),
            f"eventrun_cluster_nodes {len(self.nodes)}",
            *family("eventrun_cluster_backlog", "gauge", "QUEUED runs across the cluster, per function."),
        ]
        lines += [f"eventrun_cluster_backlog{labels(function=f)} {self.queued(f)}" for f in sorted(self._concurrency)]
        return "\n".join(lines) + "\n"

    def view(self) -> dict[str, Any]:
        """The cluster as this node sees it, for /healthz."""
        failure = self._beat_failure
        return {
            # (how this node's own heartbeats fare: the rest is as of the last that went through)
            "Store": "reachable" if failure is None else f"unreachable: {failure}",
            "LastHeartbeatSecondsAgo": round(time.monotonic() - self._beaten_at, 1),
            "Nodes": [{"NodeId": n.node_id, "Url": n.url, "HeartbeatAgeSeconds": round(n.heartbeat_age, 1)} for n in self.nodes],
            "Backlog": sum(self.backlog.values()) + sum(self._accepted_since.values()),
            "LeaseSeconds": self.lease,
        }


class LogShipper:
    """Copies the lines a run writes into the store, a tenth of a second at a time."""

    def __init__(self, store: PostgresStore, interval: float = SHIP_INTERVAL) -> None:
        self._store = store
        self._interval = interval
        self._pending: list[tuple[str, bytes]] = []
        self._flushed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def start(self) -> None:
        """Ship in the background from now on."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="log-shipper")

    def add(self, request_id: str, data: bytes) -> None:
        """A run wrote these bytes (whole lines) to its log."""
        self._pending.append((request_id, data))

    async def flush(self) -> None:
        """Ship everything written so far (before a run's end is recorded)."""
        async with self._lock:
            if not self._pending:
                return
            chunks, self._pending = self._pending, []
            try:
                await self._store.append_logs(_merged(chunks))
            except BaseException:
                self._pending[:0] = chunks  # kept for the next try
                raise

    async def _run(self) -> None:
        failures = 0  # shipments failed in a row: each waits twice as long as the last, up to SHIP_MOST
        failing = FailureLog(logger, every=SHIP_LOG_EVERY, level=logging.WARNING, counted="failed tries")
        while True:
            started = time.monotonic()
            try:
                await self.flush()
            except (StoreError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                failures += 1
                failing.log("shipping log lines to the store failed (%s); trying again (%d tries in a row so far)", exc, failures)
            else:
                failing.recovered("log lines are shipped to the store again")
                failures = 0
            wait = min(self._interval * 2**failures, SHIP_MOST) if failures else self._interval
            await asyncio.sleep(max(0.0, wait - (time.monotonic() - started)))

    async def stop(self) -> None:
        """Ship what is left and stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush()
        except (StoreError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:  # (an outage: said in a line)
            lines = sum(chunk.count(b"\n") for _, chunk in self._pending)
            logger.error("the last %d log lines of this node's runs could not be shipped to the store (%s); they are lost", lines, exc)
        except Exception:
            logger.exception("the last log lines could not be shipped to the store")


def _merged(chunks: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The chunks of each run joined in order: one row per run and shipment."""
    runs: dict[str, list[bytes]] = {}
    for request_id, data in chunks:
        runs.setdefault(request_id, []).append(data)
    return [(request_id, b"".join(parts)) for request_id, parts in runs.items()]
