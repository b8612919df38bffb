"""The shared invocation store: PostgreSQL, for several nodes on one database (asyncpg).

It keeps what the SQLite store keeps, under the same interface, and what nodes need of each
other besides: who is alive (a heartbeat each), who runs what (a run's `owner`), the runs'
logs, and notifications (LISTEN/NOTIFY) when runs are queued, end, or are to be terminated.

A run's key is its RequestId as a `uuid`. RequestIds are UUID version 7 (envelope.request_ids):
ordered by time, so `ORDER BY request_id` is the order runs were accepted in, across nodes.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
from datetime import datetime, timezone
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Collection, Mapping, Sequence, TypeVar

import asyncpg

from ..api import Accepted, Delivery, Invocation, Outbox, Status
from ..envelope import dumps, expand, stored_template, template_key
from ..errors import InvalidParameter, StoreError
from ..logs import closing_line, tail_start
from ..metrics import StoreWrites
from ..rows import (
    COLUMNS, COLUMNS_WITHOUT_RESULT, PAGE_BYTES, async_flag_flipped, counts as _counts, decode_cursor, encode_cursor,
    first_id_of, invocation,
)
from ..store import replay_event_id
from ..writes import PRUNE_AT_ONCE, Batch, NewInvocation
from .intake import Intake, event_key
from .schema import CHANNELS, ENDED, LOGGED, QUEUED, TERMINATE, migrate

logger = logging.getLogger(__name__)

_Method = TypeVar("_Method", bound=Callable[..., Awaitable[Any]])


def _as_read(columns: str) -> str:
    """The RequestId as text (not a uuid.UUID); a claimed run not yet started reads as QUEUED."""
    return columns.replace("request_id", "request_id::text", 1).replace(
        "status", "CASE status WHEN 'CLAIMED' THEN 'QUEUED' ELSE status END", 1
    )


_COLUMNS = _as_read(COLUMNS)
_COLUMNS_WITHOUT_RESULT = _as_read(COLUMNS_WITHOUT_RESULT)

# A run's duration from two RFC 3339 texts, in whole milliseconds.
_DURATION = "round(extract(epoch FROM ({end}::text::timestamptz - {start}::timestamptz)) * 1000)::bigint"

_ENDED_RUN = (
    "WITH ended AS ("
    " UPDATE invocations SET status = $2, ended_at = $3, result = $4, error_type = $5, error_message = $6,"
    f" duration_ms = CASE WHEN started_at IS NULL THEN NULL ELSE {_DURATION.format(end='$3', start='started_at')} END"
    " WHERE request_id = $1::uuid AND status IN ({statuses})"
    " RETURNING function, request_id)"
)
_FINISH = (
    _ENDED_RUN.format(statuses="'QUEUED', 'CLAIMED', 'RUNNING'")
    + " SELECT pg_notify('" + ENDED + "', function || ' ' || request_id::text) FROM ended"
)
# A run no node holds (terminated before it started): its closing line ($7) goes to its log in
# the same commit, and followers are told of both.
_FINISH_QUEUED = (
    _ENDED_RUN.format(statuses="'QUEUED', 'CLAIMED'")
    + ", closed AS (INSERT INTO logs (request_id, data) SELECT request_id, $7 FROM ended)"
    " SELECT pg_notify('" + ENDED + "', function || ' ' || request_id::text),"
    " pg_notify('" + LOGGED + "', request_id::text) FROM ended"
)


# A state value's fencing token (see put_state): the same pattern in SQL and here.
_FENCE = r'^[{]"fence":(-?[0-9]{1,18})[,}]'
_PUT_STATE = (
    "INSERT INTO state (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    f" WHERE coalesce(substring(state.value FROM '{_FENCE}')::bigint <= substring(excluded.value FROM '{_FENCE}')::bigint, true)"
    " RETURNING true"
)


def _fence(value: str | None) -> int | None:
    """The fencing token a state value begins with, if any."""
    found = re.match(_FENCE, value or "")
    return int(found.group(1)) if found else None


STRAYS_AFTER = 60.0
"""Seconds a delivery of a function missing from a node's manifest must be overdue before that
node claims it: a node that has the function takes it at once. Claimed, it fails for want of
the function's callback_secret, and is tried again until it is given up."""


# What says the database cannot serve a query now, rather than that the query is wrong: the
# connection lost or refused, the server shutting down or starting, out of disk or
# connections, or read-only (a failover under way). asyncpg raises InternalClientError on a
# connection whose session the server ended in the middle of a query (it is not used again).
_UNAVAILABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
)


# What says the server cannot be reached at all (at open: the other errors are its answers).
_UNREACHABLE = (OSError, asyncpg.PostgresConnectionError, asyncpg.InternalClientError)


def _refusal_as_store_error(method: _Method) -> _Method:
    """A method raising StoreError for a database that cannot serve it now (see _UNAVAILABLE):
    the API answers 503 rather than 500, and a run's start and end are tried again, as with
    the SQLite store."""

    write = method.__name__ in _WRITES

    @functools.wraps(method)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            result = await method(*args, **kwargs)
        except _UNAVAILABLE as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if write:
                args[0].writes.refused(reason)
            raise StoreError(f"the PostgreSQL store cannot serve this now ({reason})") from None
        if write:
            args[0].writes.went_through()
        return result

    return guarded  # type: ignore[return-value]


# The writes whose refusals PostgresStore.writes counts (for /metrics). Not the heartbeat's
# (join, heartbeat, leave): /healthz has those as Cluster.Store.
_WRITES = frozenset({
    "keep_templates", "accept", "mark_running", "begin", "unclaim", "claim", "finish", "replay", "prune",
    "set_destinations", "claim_deliveries", "settle_delivery", "release_deliveries", "register_functions",
    "put_state", "fail_runs_of", "request_abort", "append_logs",
})


@dataclass(frozen=True, slots=True)
class Node:
    """A node as the cluster sees it."""

    node_id: str
    url: str
    heartbeat_age: float  # seconds since its last heartbeat
    lease: float | None = None  # its own [cluster] lease (None: a node of an eventrun that did not record it)


class NodeIdInUse(StoreError):
    """Another live node holds this node's id."""


class PostgresStore:
    """Durable invocations in PostgreSQL; every write is committed before its await returns."""

    page_bytes = PAGE_BYTES  # what the results of one page of list() may hold (rows.PAGE_BYTES)

    def __init__(self, url: str, node_id: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.node_id = node_id  # the owner of the runs this node claims
        self.incarnation = secrets.token_hex(8)  # this start of the node: a restart is another
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._intake: Intake | None = None
        self._templates: dict[bytes, bytes] = {}
        self.writes = StoreWrites()  # whether writes go through now, and those refused (for /metrics)

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, and create or migrate the schema (one node at a time); StoreError naming
        what stood in the way (the server unreachable, a wrong password, a user without rights)."""
        try:
            # No reset when a connection goes back to the pool (a round trip after every query):
            # nothing here leaves session state behind (LISTEN has a connection of its own).
            # No floor of connections (min_size 0): asyncpg restores a floor in the background and
            # logs each try that fails with its traceback while the database is down; here a query
            # connects what it needs, and its caller says (once in a while) that it failed.
            self._pool = await asyncpg.create_pool(self.url, min_size=0, max_size=self._pool_size, reset=_keep)
            async with self._pool.acquire() as conn:
                await migrate(conn)
        except BaseException as exc:
            await self.close()
            if isinstance(exc, _UNREACHABLE):
                raise StoreError(f"cannot reach the PostgreSQL store at {_safe(self.url)}: {exc}") from None
            if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError)):  # (a wrong password, no rights, ...)
                raise StoreError(f"cannot use the PostgreSQL store at {_safe(self.url)}: {_cause(exc)}") from None
            raise  # (a newer schema: its StoreError says so)
        self._intake = Intake(self._pool)

    async def close(self) -> None:
        """Close every connection."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    start = open
    stop = close

    @property
    def pool(self) -> asyncpg.Pool:
        """The connection pool, while the store is open."""
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    async def listen(self, on_notice: Callable[[str, str], None], on_lost: Callable[[], None]) -> asyncpg.Connection:
        """A connection of its own that LISTENs on every channel; `on_notice(channel, payload)`.

        (Its OSError or asyncpg error is left as it is: Cluster takes either as a reason to look
        for work at each heartbeat until it can listen again, at its start too.)
        """
        conn: asyncpg.Connection = await asyncpg.connect(self.url)
        try:
            for channel in CHANNELS:
                await conn.add_listener(channel, lambda _c, _pid, ch, payload: on_notice(ch, payload))
        except BaseException:
            conn.terminate()  # (half listening is of no use: the next try makes another)
            raise
        conn.add_termination_listener(lambda _c: on_lost())
        return conn

    # -- writes ----------------------------------------------------------------------------

    @_refusal_as_store_error
    async def keep_templates(self, templates: Collection[bytes]) -> None:
        """Record the templates of Templated envelopes about to be accepted (each once)."""
        new = {key: template for template in templates if (key := template_key(template)) not in self._templates}
        if not new:
            return
        async with self.pool.acquire() as conn:
            await conn.executemany(
                "INSERT INTO templates (key, template) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING", list(new.items())
            )
            rows = await conn.fetch("SELECT key, template FROM templates WHERE key = any($1::bytea[])", list(new))
        kept = {bytes(r["key"]): bytes(r["template"]) for r in rows}
        for key, template in new.items():
            if kept.get(key) != template:
                raise StoreError(f"the store holds another template under the key {key.hex()}")
        self._templates.update(new)

    @_refusal_as_store_error
    async def accept(self, rows: Sequence[NewInvocation] | Batch) -> list[Accepted]:
        """Record new invocations; a known (function, source, id) gives back its RequestId.

        Accepts that wait while one is committed go together in the next statement (Intake).
        """
        if not rows:
            return []
        if self._intake is None:
            raise RuntimeError("store is not open")
        return await self._intake.accept(rows)

    @_refusal_as_store_error
    async def mark_running(self, request_id: str, started_at: str) -> bool:
        """QUEUED, or CLAIMED by this node, -> RUNNING here, once; False if it ended (terminated) or started
        (but for a start at the same `started_at` by this node: the same start, tried again)."""
        return await self._start(request_id, started_at, "1") is not None

    @_refusal_as_store_error
    async def begin(self, request_id: str, started_at: str) -> bytes | None:
        """mark_running, and the run's envelope if it started (in one round trip)."""
        stored = await self._start(request_id, started_at, "envelope")
        return None if stored is None else await self._whole(bytes(stored))

    async def _start(self, request_id: str, started_at: str, returning: str) -> Any:
        return await self.pool.fetchval(
            "UPDATE invocations SET status = 'RUNNING', owner = $3, started_at = $2 WHERE request_id = $1::uuid"
            " AND (status = 'QUEUED' OR (status = 'CLAIMED' AND owner = $3)"
            # (this very start, recorded by a commit whose answer was lost: see Engine._execute)
            " OR (status = 'RUNNING' AND owner = $3 AND started_at = $2))"
            f" RETURNING {returning}",
            request_id, started_at, self.node_id,
        )

    @_refusal_as_store_error
    async def unclaim(self, request_ids: Sequence[str]) -> None:
        """Hand runs this node claimed but did not start back to the queue (a shutdown)."""
        await self.pool.execute(
            "WITH back AS (UPDATE invocations SET status = 'QUEUED', owner = NULL"
            " WHERE request_id = any($1::uuid[]) AND status = 'CLAIMED' AND owner = $2 RETURNING function)"
            " SELECT count(pg_notify('" + QUEUED + "', f)) FROM (SELECT DISTINCT function AS f FROM back) d",
            list(request_ids), self.node_id,
        )

    @_refusal_as_store_error
    async def claimed_here(self) -> list[str]:
        """The runs this node holds CLAIMED in the store."""
        rows = await self.pool.fetch(
            "SELECT request_id::text FROM invocations WHERE status = 'CLAIMED' AND owner = $1", self.node_id
        )
        return sorted(r[0] for r in rows)

    @_refusal_as_store_error
    async def claim(self, function: str, want: int, cap: int) -> list[str]:
        """QUEUED -> CLAIMED by this node for up to `want` runs of a function, oldest first, keeping
        the function's claimed and running runs across the cluster at `cap` or below."""
        rows = await self.pool.fetch("SELECT eventrun_claim($1, $2, $3, $4)", function, want, cap, self.node_id)
        return sorted(r[0] for r in rows)

    @_refusal_as_store_error
    async def finish(
        self,
        request_id: str,
        status: Status,
        ended_at: str,
        *,
        result: Any = None,
        error_type: str | None = None,
        error_message: str | None = None,
        queued_only: bool = False,
    ) -> bool:
        """Record a terminal state once; False if the run had already ended (or, queued_only, started).

        `queued_only`: only a run not started yet, QUEUED or CLAIMED by any node (a terminate):
        the node holding a claim finds it ended when it tries to start it (mark_running). No
        node writes that run's log: eventrun's closing line goes to it with the end, in one commit.
        """
        blob = dumps(result) if result is not None else None
        args = (request_id, status.value, ended_at, blob, _text(error_type), _text(error_message))
        if queued_only:
            rows = await self.pool.fetch(_FINISH_QUEUED, *args, closing_line(ended_at, status.value, error_type, error_message))
        else:
            rows = await self.pool.fetch(_FINISH, *args)
        return bool(rows)

    @_refusal_as_store_error
    async def replay(self, row: NewInvocation, replay_of: str) -> str:
        """Record a new run replaying another (its row, and the link between the two) in one commit;
        the RequestId of the run its event id names (another's, if that replay was recorded first)."""
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetchval(
                "INSERT INTO invocations (request_id, function, source, event_id, trigger, status, created_at, envelope)"
                " VALUES ($1::uuid, $2, $3, $4, $5, 'QUEUED', $6, $7)"
                " ON CONFLICT (function, source, event_id) DO NOTHING RETURNING request_id",
                row.request_id, row.function, row.source, event_key(row.event_id), row.trigger, row.created_at,
                bytes(row.envelope),
            )
            if inserted is None:
                earlier = await conn.fetchval(
                    "SELECT request_id::text FROM invocations WHERE function = $1 AND source = $2 AND event_id = $3",
                    row.function, row.source, event_key(row.event_id),
                )
                return earlier  # type: ignore[no-any-return]
            await conn.execute("INSERT INTO replays (request_id, replay_of) VALUES ($1::uuid, $2::uuid)", row.request_id, replay_of)
        return row.request_id

    @_refusal_as_store_error
    async def prune(self, ended_before_ms: int, at_once: int = PRUNE_AT_ONCE) -> list[str]:
        """Delete up to `at_once` runs that ended before this time (Unix ms), their logs, links and
        given-up deliveries (a run with a delivery still owed stays); their RequestIds.
        (Any node may prune: deleting what another deleted is no error.)"""
        ended_before = datetime.fromtimestamp(ended_before_ms / 1000, timezone.utc).isoformat(timespec="milliseconds")
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "DELETE FROM invocations WHERE request_id IN (SELECT request_id FROM invocations"
                " WHERE request_id < $1::uuid AND status NOT IN ('QUEUED', 'CLAIMED', 'RUNNING') AND ended_at < $2"
                " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.request_id = invocations.request_id AND NOT o.gave_up)"
                " ORDER BY request_id LIMIT $3) RETURNING request_id",
                first_id_of(ended_before_ms + 1), ended_before.replace("+00:00", "Z"), at_once,
            )
            ids = [r[0] for r in rows]
            await conn.execute("DELETE FROM logs WHERE request_id = any($1::uuid[])", ids)
            await conn.execute("DELETE FROM replays WHERE request_id = any($1::uuid[]) OR replay_of = any($1::uuid[])", ids)
            await conn.execute("DELETE FROM outbox WHERE request_id = any($1::uuid[])", ids)
        return [str(i) for i in ids]

    # -- the outbox: deliveries owed for ended runs (written by the end's own commit) ------

    @_refusal_as_store_error
    async def set_destinations(self, destinations: Mapping[str, Sequence[tuple[str, str]]]) -> None:
        """Where each function's runs go when they end, from now on: {function: [(kind, target)]}.

        Only the functions given (this node's manifest, each with its destinations, or none) are
        set: a function the manifest lacks keeps what another node's manifest set for it, as
        nodes may run with different manifests. (One dropped from every manifest keeps its last:
        what its runs' ends owe is held until a manifest has it again, or given up after a day.)
        """
        rows = [(function, kind, target) for function, pairs in destinations.items() for kind, target in pairs]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM destinations WHERE function = any($1::text[])", list(destinations))
            await conn.executemany(
                "INSERT INTO destinations (function, kind, target) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING", rows
            )

    @_refusal_as_store_error
    async def claim_deliveries(
        self,
        limit: int,
        lease: float,
        functions: Collection[str],
        *,
        strays_after: float = STRAYS_AFTER,
        busy: Collection[str] = (),
    ) -> list[Delivery]:
        """Up to `limit` due deliveries of these functions (this node's), oldest first, held for
        this node for `lease` seconds (another node takes them if it does not settle them by
        then); a delivery of any other function only once it is `strays_after` seconds overdue:
        no node that has its function took it (see STRAYS_AFTER). None to a `busy` target (one
        this node has as many attempts under way to as it allows)."""
        rows = await self.pool.fetch(
            "UPDATE outbox o SET owner = $1, due_at = now() + make_interval(secs => $2)"
            " FROM (SELECT id FROM outbox WHERE NOT gave_up AND due_at <= now()"
            " AND (function = ANY($4::text[]) OR due_at <= now() - make_interval(secs => $5))"
            " AND target <> ALL($6::text[])"
            " ORDER BY due_at, id LIMIT $3 FOR UPDATE SKIP LOCKED) due"
            " WHERE o.id = due.id RETURNING o.id, o.request_id::text, o.function, o.kind, o.target, o.attempts",
            self.node_id, lease, limit, sorted(functions), strays_after, sorted(busy),
        )
        return sorted(Delivery(*r) for r in rows)

    @_refusal_as_store_error
    async def settle_delivery(
        self, delivery_id: int, *, retry_in: float | None = None, error: str | None = None, give_up: bool = False
    ) -> None:
        """Record an attempt: delivered (no retry_in, no give_up), to try again in `retry_in` s, or given up."""
        if retry_in is None and not give_up:
            await self.pool.execute("DELETE FROM outbox WHERE id = $1", delivery_id)
            return
        await self.pool.execute(
            "UPDATE outbox SET attempts = attempts + 1, due_at = now() + make_interval(secs => $2), owner = NULL,"
            " last_error = $3, gave_up = $4 WHERE id = $1",
            delivery_id, retry_in or 0.0, _text(error), give_up,
        )

    @_refusal_as_store_error
    async def release_deliveries(self) -> None:
        """Make the deliveries this node claimed before a stop (cut off mid-attempt) due at once."""
        await self.pool.execute(
            "UPDATE outbox SET owner = NULL, due_at = now() WHERE owner = $1 AND NOT gave_up", self.node_id
        )

    @_refusal_as_store_error
    async def outbox(self) -> Outbox:
        """How many deliveries are pending and given up (a pass over the outbox; when the next is
        due comes from next_delivery())."""
        row = await self.pool.fetchrow(
            "SELECT count(*) FILTER (WHERE NOT gave_up), count(*) FILTER (WHERE gave_up) FROM outbox"
        )
        assert row is not None  # (an aggregate always has its one row)
        return Outbox(row[0], row[1])

    @_refusal_as_store_error
    async def next_delivery(self) -> float | None:
        """Seconds until the next pending delivery is due (<= 0: due now), None if none is pending
        (the index of pending deliveries by due time: no pass over the outbox)."""
        return await self.pool.fetchval(  # type: ignore[no-any-return]
            "SELECT extract(epoch FROM min(due_at) - now())::float8 FROM outbox WHERE NOT gave_up"
        )

    @_refusal_as_store_error
    async def links(self, request_id: str) -> tuple[str | None, list[str]]:
        """The run a run replays (or None), and the runs that replay it, oldest first."""
        if not _is_uuid(request_id):
            return None, []
        async with self.pool.acquire() as conn:
            replay_of = await conn.fetchval("SELECT replay_of::text FROM replays WHERE request_id = $1::uuid", request_id)
            rows = await conn.fetch(
                "SELECT request_id::text FROM replays WHERE replay_of = $1::uuid ORDER BY request_id", request_id
            )
        return replay_of, [r[0] for r in rows]

    @_refusal_as_store_error
    async def replays_under(self, key: str, request_ids: Collection[str]) -> set[str]:
        """Those of these runs that are replays made with Idempotency-Key `key` (see replay_event_id)."""
        rows = await self.pool.fetch(
            "SELECT r.request_id::text, r.replay_of::text, i.event_id FROM replays r JOIN invocations i USING (request_id)"
            " WHERE r.request_id = any($1::uuid[])",
            [request_id for request_id in request_ids if _is_uuid(request_id)],
        )
        return {
            request_id for request_id, replay_of, event_id in rows
            if bytes(event_id) == event_key(replay_event_id(replay_of, key))
        }

    @_refusal_as_store_error
    async def register_functions(self, functions: Mapping[str, bool], now: str) -> None:
        """Record new functions' async flag; refuse a manifest that flips a recorded one."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("LOCK TABLE functions IN SHARE ROW EXCLUSIVE MODE")
            recorded = {r["name"]: r["async_execution"] for r in await conn.fetch("SELECT name, async_execution FROM functions")}
            flipped = [(n, recorded[n]) for n, a in functions.items() if n in recorded and recorded[n] != a]
            if not flipped:
                await conn.executemany(
                    "INSERT INTO functions (name, async_execution, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    [(n, a, now) for n, a in functions.items()],
                )
        if flipped:
            raise async_flag_flipped(flipped)

    @_refusal_as_store_error
    async def put_state(self, key: str, value: str) -> None:
        """Remember a small value (e.g. a trigger's last position), unless the one remembered has a greater fence.

        A value may begin with a fencing token, `{"fence":N` (a JSON object whose first member
        is the integer `fence`): then it replaces a value with no fence, or with a fence at most
        N, and is dropped (with a warning) otherwise. So a writer that lost its right to the key
        (a Kafka partition another node holds now) cannot write over its newer holder's value.
        A value without a fence is always written.
        """
        if await self.pool.fetchval(_PUT_STATE, key, value) is None:
            held = await self.pool.fetchval("SELECT value FROM state WHERE key = $1", key)
            logger.warning(
                "state %s not written: it was written under fence %s since, and this write's fence %s is older"
                " (its writer no longer holds it)",
                key, _fence(held), _fence(value),
            )

    # -- nodes -----------------------------------------------------------------------------

    @_refusal_as_store_error
    async def join(self, url: str, lease: float, previous: str | None = None) -> None:
        """Register this start of the node; a node id held by a live node (heard from within the
        lease) is refused, unless that is `previous`, this node's own start before (now dead)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT incarnation, extract(epoch FROM now() - heartbeat_at)::float8 AS age, coalesce(lease, $2) AS lease"
                " FROM nodes WHERE node_id = $1 FOR UPDATE",
                self.node_id, lease,
            )
            if row is not None and row["age"] < row["lease"] and row["incarnation"] != previous:
                age = row["age"]
                raise NodeIdInUse(
                    f"node id {self.node_id!r} is held by a live node (its last heartbeat {age:.1f}s ago); "
                    "give this node its own [cluster] node_id, or stop the other"
                )
            await conn.execute(
                "INSERT INTO nodes (node_id, incarnation, url, lease) VALUES ($1, $2, $3, $4) ON CONFLICT (node_id) DO UPDATE"
                " SET incarnation = excluded.incarnation, url = excluded.url, lease = excluded.lease,"
                " started_at = now(), heartbeat_at = now()",
                self.node_id, self.incarnation, url, lease,
            )

    @_refusal_as_store_error
    async def heartbeat(self) -> bool:
        """Renew this node's lease; False if the node was taken for dead meanwhile (and must join again)."""
        row = await self.pool.fetchval(
            "UPDATE nodes SET heartbeat_at = now() WHERE node_id = $1 AND incarnation = $2 RETURNING 1",
            self.node_id, self.incarnation,
        )
        return row is not None

    @_refusal_as_store_error
    async def leave(self) -> None:
        """Take this node out of the cluster (a clean stop)."""
        await self.pool.execute("DELETE FROM nodes WHERE node_id = $1 AND incarnation = $2", self.node_id, self.incarnation)

    @_refusal_as_store_error
    async def nodes(self) -> list[Node]:
        """Every registered node."""
        rows = await self.pool.fetch(
            "SELECT node_id, url, extract(epoch FROM now() - heartbeat_at)::float8 AS age, lease FROM nodes ORDER BY node_id"
        )
        return [Node(r["node_id"], r["url"], r["age"], r["lease"]) for r in rows]

    @_refusal_as_store_error
    async def fail_runs_of(
        self, owners: Collection[str], now: str, error_type: str, message: Callable[[str], str], *, lease: float | None = None
    ) -> list[tuple[str, str]]:
        """End the RUNNING runs of these nodes as FAILED, and queue what they claimed again;
        (request_id, function) of each run ended. Each run's log gets eventrun's closing line in
        the same commit (its node, gone, cannot write it), so a follower that sees the end has it.

        `lease`: the owners were taken for dead. Each is taken off the registry, and its runs
        ended, only if it is still silent past its lease then (it did not start again meanwhile,
        and no other survivor got there first); a node that did not record its own lease is
        judged by this one.
        """
        ended: list[tuple[str, str]] = []
        async with self.pool.acquire() as conn, conn.transaction():
            for owner in owners:
                if lease is not None and not await conn.fetchval(
                    "DELETE FROM nodes WHERE node_id = $1"
                    " AND heartbeat_at < now() - make_interval(secs => coalesce(lease, $2)) RETURNING 1",
                    owner, lease,
                ):
                    continue
                await conn.execute(
                    "UPDATE invocations SET status = 'QUEUED', owner = NULL WHERE status = 'CLAIMED' AND owner = $1", owner
                )
                said = message(owner)
                rows = await conn.fetch(
                    "WITH ended AS ("
                    " UPDATE invocations SET status = 'FAILED', ended_at = $2, error_type = $3, error_message = $4,"
                    f" duration_ms = {_DURATION.format(end='$2', start='started_at')}"
                    " WHERE status = 'RUNNING' AND owner = $1"
                    " RETURNING request_id, function),"
                    " closed AS (INSERT INTO logs (request_id, data) SELECT request_id, $5 FROM ended ORDER BY request_id)"
                    " SELECT request_id::text AS request_id, function,"
                    " pg_notify('" + ENDED + "', function || ' ' || request_id::text),"
                    " pg_notify('" + LOGGED + "', request_id::text) FROM ended",
                    owner, now, error_type, said, closing_line(now, "FAILED", error_type, said),
                )
                ended += [(r["request_id"], r["function"]) for r in rows]
        return ended

    @_refusal_as_store_error
    async def request_abort(self, request_id: str) -> str | None:
        """Ask the node running a run to stop it: kept with the run until it ends, and told by a
        notice; the node asked (None if the run is not claimed or running)."""
        if not _is_uuid(request_id):
            return None
        row = await self.pool.fetchrow(
            "WITH asked AS (UPDATE invocations SET abort_requested = true"
            " WHERE request_id = $1::uuid AND status IN ('CLAIMED', 'RUNNING') RETURNING owner, request_id::text AS r)"
            " SELECT owner, pg_notify('" + TERMINATE + "', owner || ' ' || r) FROM asked",
            request_id,
        )
        return None if row is None else row["owner"]  # type: ignore[no-any-return]

    @_refusal_as_store_error
    async def aborts_requested(self) -> list[str]:
        """The runs of this node that were asked to stop (a notice of it may have been lost)."""
        rows = await self.pool.fetch(
            "SELECT request_id::text FROM invocations"
            " WHERE owner = $1 AND abort_requested AND status IN ('CLAIMED', 'RUNNING')",
            self.node_id,
        )
        return sorted(r[0] for r in rows)

    @_refusal_as_store_error
    async def notify(self, channel: str, payload: str) -> None:
        """Send a notification to every node (this one too)."""
        await self.pool.execute("SELECT pg_notify($1, $2)", channel, payload)

    @_refusal_as_store_error
    async def announce(self, functions: Collection[str]) -> None:
        """Tell every node these functions have new QUEUED runs."""
        await self.pool.execute(
            "SELECT count(pg_notify('" + QUEUED + "', f)) FROM unnest($1::text[]) AS f", list(functions)
        )

    @_refusal_as_store_error
    async def backlog(self) -> dict[str, int]:
        """QUEUED runs per function, across the cluster."""
        rows = await self.pool.fetch(
            "SELECT function, count(*) FROM invocations WHERE status IN ('QUEUED', 'CLAIMED') GROUP BY function"
        )
        return {r[0]: r[1] for r in rows}

    # -- logs ------------------------------------------------------------------------------

    @_refusal_as_store_error
    async def append_logs(self, chunks: Sequence[tuple[str, bytes]]) -> None:
        """Append (request_id, data) log chunks, in order, and tell followers on every node."""
        await self.pool.execute(
            "WITH added AS (INSERT INTO logs (request_id, data)"
            " SELECT r::uuid, d FROM unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS u(r, d, o) ORDER BY o"
            " RETURNING request_id)"
            " SELECT count(pg_notify('" + LOGGED + "', r)) FROM (SELECT DISTINCT request_id::text AS r FROM added) d",
            [r for r, _ in chunks], [d for _, d in chunks],
        )

    @_refusal_as_store_error
    async def read_log(self, request_id: str, after: int = 0, most: int | None = None) -> tuple[bytes, int]:
        """The run's log after chunk `after`, and the number of the last chunk read; with `most`,
        only the chunks that begin within that many bytes (at least one; each whole lines)."""
        if not _is_uuid(request_id):
            return b"", after
        if most is None:
            row = await self.pool.fetchrow(
                "SELECT string_agg(data, ''::bytea ORDER BY n), max(n) FROM logs WHERE request_id = $1::uuid AND n > $2",
                request_id, after,
            )
        else:  # (octet_length reads a chunk's size, not the chunk: those past `most` are not read)
            row = await self.pool.fetchrow(
                "SELECT string_agg(data, ''::bytea ORDER BY n), max(n) FROM logs WHERE request_id = $1::uuid AND n IN ("
                " SELECT n FROM (SELECT n, sum(octet_length(data)) OVER (ORDER BY n) - octet_length(data) AS before"
                " FROM logs WHERE request_id = $1::uuid AND n > $2) sized WHERE before < $3)",
                request_id, after, most,
            )
        if row is None or row[1] is None:
            return b"", after
        return bytes(row[0]), row[1]

    @_refusal_as_store_error
    async def read_log_tail(self, request_id: str, most: int) -> tuple[bytes, int, int]:
        """The lines of the run's log that begin within its last `most` bytes, the number of the
        last chunk read, and how many bytes come before those lines."""
        if not _is_uuid(request_id):
            return b"", 0, 0
        row = await self.pool.fetchrow(  # (octet_length reads a chunk's size, not the chunk)
            "WITH sized AS (SELECT n, octet_length(data) AS size,"
            " sum(octet_length(data)) OVER (ORDER BY n DESC) - octet_length(data) AS after"
            " FROM logs WHERE request_id = $1::uuid)"
            " SELECT (SELECT string_agg(data, ''::bytea ORDER BY n) FROM logs WHERE request_id = $1::uuid"
            " AND n IN (SELECT n FROM sized WHERE after < $2)),"
            " (SELECT max(n) FROM sized), (SELECT coalesce(sum(size), 0) FROM sized WHERE after >= $2)",
            request_id, most,
        )
        data = bytes(row[0]) if row[0] is not None else b""
        cut = tail_start(data, most)  # (the chunks hold whole lines, up to a shipment's worth more)
        return data[cut:], row[1] or 0, int(row[2]) + cut

    @_refusal_as_store_error
    async def read_log_end(self, request_id: str, most: int) -> bytes:
        """The chunks of the run's log that hold its last `most` bytes (at least one; whole lines)."""
        if not _is_uuid(request_id):
            return b""
        data = await self.pool.fetchval(  # (octet_length reads a chunk's size, not the chunk)
            "SELECT string_agg(data, ''::bytea ORDER BY n) FROM logs WHERE request_id = $1::uuid AND n IN ("
            " SELECT n FROM (SELECT n, sum(octet_length(data)) OVER (ORDER BY n DESC) - octet_length(data) AS after"
            " FROM logs WHERE request_id = $1::uuid) sized WHERE after < $2)",
            request_id, most,
        )
        return bytes(data) if data is not None else b""

    # -- reads -----------------------------------------------------------------------------

    @_refusal_as_store_error
    async def get_state(self, key: str) -> str | None:
        """A remembered value, or None."""
        return await self.pool.fetchval("SELECT value FROM state WHERE key = $1", key)  # type: ignore[no-any-return]

    @_refusal_as_store_error
    async def get(self, request_id: str) -> Invocation | None:
        """One invocation, or None."""
        if not _is_uuid(request_id):
            return None
        row = await self.pool.fetchrow(f"SELECT {_COLUMNS} FROM invocations WHERE request_id = $1::uuid", request_id)
        return invocation(row) if row else None

    @_refusal_as_store_error
    async def owner(self, request_id: str) -> str | None:
        """The node a run is claimed by or running on (None once it ended, or while it is QUEUED)."""
        if not _is_uuid(request_id):
            return None
        return await self.pool.fetchval(  # type: ignore[no-any-return]
            "SELECT owner FROM invocations WHERE request_id = $1::uuid AND status IN ('CLAIMED', 'RUNNING')", request_id
        )

    @_refusal_as_store_error
    async def envelope(self, request_id: str) -> bytes | None:
        """The recorded envelope JSON of one invocation."""
        if not _is_uuid(request_id):
            return None
        stored = await self.pool.fetchval("SELECT envelope FROM invocations WHERE request_id = $1::uuid", request_id)
        return None if stored is None else await self._whole(bytes(stored))

    async def _whole(self, stored: bytes) -> bytes:
        """The envelope JSON of a stored one (a Templated envelope's fields put in its template)."""
        key = stored_template(stored)
        return stored if key is None else expand(stored, await self._template(key))

    async def _template(self, key: bytes) -> bytes:
        template = self._templates.get(key)
        if template is None:
            found = await self.pool.fetchval("SELECT template FROM templates WHERE key = $1", key)
            if found is None:
                raise StoreError(f"a stored envelope refers to a template the store does not hold ({key.hex()})")
            template = self._templates[key] = bytes(found)
        return template

    @_refusal_as_store_error
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
        """Invocations newest first, and the cursor of the next page (None at the end).

        `since` and `until` (Unix milliseconds) bound when they were accepted, found through
        their RequestIds, which begin with that millisecond: the key itself, no other index.
        A page holds fewer than `limit` runs when their results would pass `page_bytes`.
        Without `results`, no result is read (each is None) nor counted against `page_bytes`.
        """
        where: list[str] = []
        args: list[Any] = []
        if function is not None:
            args.append(function)
            where.append(f"function = ${len(args)}")
        if status is not None:  # (QUEUED: claimed ones too, which read as QUEUED)
            args.append([status.value, "CLAIMED"] if status is Status.QUEUED else [status.value])
            where.append(f"status = any(${len(args)}::text[])")
        if trigger is not None:
            args.append(trigger)
            where.append(f"trigger = ${len(args)}")
        if since is not None:
            args.append(first_id_of(since))
            where.append(f"request_id >= ${len(args)}::uuid")
        if until is not None:
            args.append(first_id_of(until))
            where.append(f"request_id < ${len(args)}::uuid")
        if cursor:
            args.append(_uuid_cursor(cursor))
            where.append(f"request_id < ${len(args)}::uuid")
        # One statement, one snapshot: each matching run's size (octet_length() reads a stored
        # value's length, not the value, TOASTed or not), the sum of the sizes up to each run,
        # and then only the runs that go in (rows.page_length's rule), read whole.
        weight = "coalesce(octet_length(error_message), 0)"
        if results:
            weight = f"coalesce(octet_length(result), 0) + {weight}"
        filtered = f"SELECT request_id, {weight} AS size FROM invocations"
        if where:
            filtered += " WHERE " + " AND ".join(where)
        args += [limit + 1, limit, self.page_bytes]
        n = len(args)
        sql = (
            "WITH page AS (SELECT request_id, row_number() OVER w AS n, sum(size) OVER w AS held,"
            f" count(*) OVER () AS found FROM ({filtered} ORDER BY request_id DESC LIMIT ${n - 2}) AS filtered"
            " WINDOW w AS (ORDER BY request_id DESC ROWS UNBOUNDED PRECEDING))"
            f" SELECT {_COLUMNS if results else _COLUMNS_WITHOUT_RESULT}, (SELECT max(found) FROM page)"
            " FROM invocations WHERE request_id IN"
            f" (SELECT request_id FROM page WHERE n <= ${n - 1} AND (n = 1 OR held <= ${n}))"
            " ORDER BY invocations.request_id DESC"
        )
        rows = await self.pool.fetch(sql, *args)
        page = [invocation(row) for row in rows]
        found = rows[-1][-1] if rows else 0
        return page, encode_cursor("id", page[-1].request_id) if found > len(page) else None

    @_refusal_as_store_error
    async def counts(self) -> dict[str, dict[str, int]]:
        """How many runs each function has in each status (a claimed run counts as QUEUED)."""
        return _counts(
            await self.pool.fetch(
                "SELECT function, CASE status WHEN 'CLAIMED' THEN 'QUEUED' ELSE status END, count(*)"
                " FROM invocations GROUP BY 1, 2"
            )
        )

    @_refusal_as_store_error
    async def count_active(self, function: str, source: str) -> int:
        """How many runs of this function from this source are QUEUED or RUNNING (replays of its
        runs not counted: they are not the source's)."""
        n = await self.pool.fetchval(
            "SELECT count(*) FROM invocations i WHERE function = $1 AND source = $2"
            " AND status IN ('QUEUED', 'CLAIMED', 'RUNNING')"
            " AND NOT EXISTS (SELECT 1 FROM replays r WHERE r.request_id = i.request_id)",
            function, source,
        )
        return int(n)

    @_refusal_as_store_error
    async def find_event(self, function: str, source: str, event_id: str) -> str | None:
        """The RequestId the event (function, source, id) was accepted under, or None."""
        found = await self.pool.fetchval(
            "SELECT request_id::text FROM invocations WHERE function = $1 AND source = $2 AND event_id = $3",
            function, source, event_key(event_id),
        )
        return found  # type: ignore[no-any-return]


def _is_uuid(text: str) -> bool:
    return len(text) == 36 and _UUID_CHARS.issuperset(text) and text.count("-") == 4 and text[8] == text[13] == text[18] == text[23] == "-"


_UUID_CHARS = frozenset("0123456789abcdef-")



def _uuid_cursor(cursor: str) -> str:
    request_id = decode_cursor(cursor, "id")
    if not _is_uuid(request_id):
        raise InvalidParameter(f"cursor {cursor!r} is not a cursor this server gave out")
    return request_id


async def _keep(conn: asyncpg.Connection) -> None:
    """A pooled connection is handed on as it is."""


def _text(value: str | None) -> str | None:
    """A message as PostgreSQL text can hold it (no NUL characters)."""
    return value.replace("\x00", "\ufffd") if value and "\x00" in value else value


def _cause(exc: BaseException) -> str:
    """What the server (or the driver) said, and the kind of error; with a hint where one helps."""
    cause = f"{exc} ({type(exc).__name__})"
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        cause += "; its user must be allowed to read and write the schema's tables, and the first start to create them"
    return cause


def _safe(url: str) -> str:
    """The URL without its passwords, for messages: the user's, and one given as a parameter
    (`?password=`, `?sslpassword=`)."""
    url = _PASSWORD_PARAMETER.sub(r"\1***", url)
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{host}" if ":" in userinfo else url


_PASSWORD_PARAMETER = re.compile(r"(?i)([?&](?:ssl)?password=)[^&#]*")

