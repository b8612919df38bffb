"""The shared store's schema: its tables, the claim function, the notice channels, and migrations.

The schema is versioned (`eventrun_schema`): each entry of MIGRATIONS brings it one version
further, in a transaction, while nodes starting together wait on an advisory lock.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import StoreError

logger = logging.getLogger(__name__)

QUEUED = "eventrun_queued"  # payload: a function with new QUEUED runs, or a freed slot
ENDED = "eventrun_ended"  # payload: "{function} {request_id}" of a run that ended
TERMINATE = "eventrun_terminate"  # payload: "{owner} {request_id}": the owner is to stop it (see abort_requested)
LOGGED = "eventrun_logged"  # payload: a RequestId whose log grew
CHANNELS = (QUEUED, ENDED, TERMINATE, LOGGED)

_MIGRATION_LOCK = 0x6576656E  # one key for pg_advisory_lock: nodes starting together migrate one at a time

MIGRATIONS: list[str] = [
    # 1: the first shared schema
    """
    CREATE TABLE functions (
        name text PRIMARY KEY,
        async_execution boolean NOT NULL,
        created_at text NOT NULL
    );
    CREATE TABLE invocations (
        request_id uuid PRIMARY KEY,
        function text NOT NULL,
        source text NOT NULL,
        event_id bytea NOT NULL,  -- (text cannot hold a NUL; an S3 key may)
        trigger text NOT NULL,
        status text NOT NULL,  -- a Status, or CLAIMED: taken by a node, not yet started (read as QUEUED)
        created_at text NOT NULL,
        started_at text,
        ended_at text,
        duration_ms bigint,
        result bytea,
        error_type text,
        error_message text,
        envelope bytea NOT NULL,
        owner text,  -- the node that claimed it (CLAIMED and RUNNING runs)
        UNIQUE (function, source, event_id)
    );
    CREATE INDEX invocations_by_function ON invocations (function, request_id);
    CREATE INDEX invocations_by_status ON invocations (status, request_id);
    CREATE INDEX invocations_queued ON invocations (function, request_id) WHERE status = 'QUEUED';
    CREATE INDEX invocations_taken ON invocations (function, owner) WHERE status IN ('CLAIMED', 'RUNNING');
    CREATE TABLE state (key text PRIMARY KEY, value text NOT NULL);
    CREATE TABLE templates (key bytea PRIMARY KEY, template bytea NOT NULL);
    CREATE TABLE nodes (
        node_id text PRIMARY KEY,
        incarnation text NOT NULL,  -- one per start of the node
        url text NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE logs (
        n bigserial PRIMARY KEY,
        request_id uuid NOT NULL,
        data bytea NOT NULL
    );
    CREATE INDEX logs_by_run ON logs (request_id, n);

    -- Claim up to `want` QUEUED runs of a function, oldest first, for `node`, keeping the
    -- function's CLAIMED and RUNNING runs across all nodes at `cap` or below. Claims of one function
    -- take turns (an advisory lock), so two nodes cannot both see the last free slot.
    CREATE FUNCTION eventrun_claim(fn text, want int, cap int, node text)
    RETURNS SETOF text LANGUAGE plpgsql AS $$
    DECLARE
        running int;
    BEGIN
        PERFORM pg_advisory_xact_lock(1702258030, hashtext(fn));
        SELECT count(*) INTO running FROM invocations WHERE function = fn AND status IN ('CLAIMED', 'RUNNING');
        RETURN QUERY
        UPDATE invocations i SET status = 'CLAIMED', owner = node
        FROM (
            SELECT request_id FROM invocations
            WHERE function = fn AND status = 'QUEUED'
            ORDER BY request_id
            LIMIT greatest(0, least(want, cap - running))
            FOR UPDATE SKIP LOCKED
        ) picked
        WHERE i.request_id = picked.request_id
        RETURNING i.request_id::text;
    END
    $$;
    """,
    # 2: replays, linked both ways
    """
    CREATE TABLE replays (
        request_id uuid PRIMARY KEY,
        replay_of uuid NOT NULL
    );
    CREATE INDEX replays_of ON replays (replay_of, request_id);
    """,
    # 3: destinations, and the outbox of deliveries owed, filled by the end of a run itself
    """
    CREATE TABLE destinations (
        function text NOT NULL,
        kind text NOT NULL,  -- 'callback': every end; 'on_failure': FAILED and TIMED_OUT
        target text NOT NULL,  -- an http(s) URL, or kafka:TOPIC
        PRIMARY KEY (function, kind, target)
    );
    CREATE TABLE outbox (
        id bigserial PRIMARY KEY,
        request_id uuid NOT NULL,
        function text NOT NULL,
        kind text NOT NULL,
        target text NOT NULL,
        attempts int NOT NULL DEFAULT 0,
        due_at timestamptz NOT NULL DEFAULT now(),  -- of the next attempt (or when a claim runs out)
        owner text,  -- the node trying it now
        last_error text,
        gave_up boolean NOT NULL DEFAULT false
    );
    CREATE INDEX outbox_due ON outbox (due_at) WHERE NOT gave_up;
    CREATE INDEX outbox_by_run ON outbox (request_id);

    -- Every way a run ends (finish, a node found dead, terminate) goes through this: what is owed
    -- for the end is committed with it, or neither is.
    CREATE FUNCTION eventrun_outbox_on_end() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO outbox (request_id, function, kind, target)
        SELECT NEW.request_id, NEW.function, d.kind, d.target FROM destinations d
        WHERE d.function = NEW.function AND (d.kind = 'callback' OR NEW.status IN ('FAILED', 'TIMED_OUT'));
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER outbox_on_end AFTER UPDATE OF status ON invocations FOR EACH ROW
    WHEN (OLD.status IN ('QUEUED', 'CLAIMED', 'RUNNING') AND NEW.status NOT IN ('QUEUED', 'CLAIMED', 'RUNNING'))
    EXECUTE FUNCTION eventrun_outbox_on_end();
    """,
    # 4: terminations kept until the run's node acts on them; each node judged by its own lease
    """
    ALTER TABLE invocations ADD COLUMN abort_requested boolean NOT NULL DEFAULT false;
    CREATE INDEX invocations_to_abort ON invocations (owner) WHERE abort_requested AND status IN ('CLAIMED', 'RUNNING');
    ALTER TABLE nodes ADD COLUMN lease float8;  -- seconds; NULL: a node of an eventrun before this (judged by the observer's)
    """,
]


async def migrate(conn: Any) -> int:
    """Bring the schema to the newest version (one node at a time); the version it is at."""
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        # (Asked first: CREATE TABLE IF NOT EXISTS needs the right to create tables even when the
        # table is there, and a node's user need not have it once the schema is made.)
        if await conn.fetchval("SELECT to_regclass('eventrun_schema')") is None:
            await conn.execute("CREATE TABLE IF NOT EXISTS eventrun_schema (version int NOT NULL)")
        version = await conn.fetchval("SELECT max(version) FROM eventrun_schema") or 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"the PostgreSQL store is at schema version {version}, newer than this eventrun knows "
                f"({len(MIGRATIONS)}); run a newer eventrun"
            )
        for number, sql in enumerate(MIGRATIONS[version:], start=version + 1):
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO eventrun_schema (version) VALUES ($1)", number)
            logger.info("PostgreSQL store: schema at version %d", number)
        return len(MIGRATIONS)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
