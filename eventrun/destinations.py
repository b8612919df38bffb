"""Destinations: what a run's end owes the outside world, delivered at least once from the store's outbox.

A function's `callback_url` gets every ended run (the GET /invocations/{id} document); its
`on_failure` destination (a URL or a Kafka topic) gets the record of each FAILED or TIMED_OUT
run: that document, the envelope the run was given, and the tail of its log.

The store writes what is owed in the same commit as the run's end (its outbox), so a crash
between the end and the delivery loses nothing: whichever server (or node) comes next claims
the delivery and makes it. A claim is a lease: one not settled in time is claimed again, which
is why a receiver may see a delivery twice and gets `X-Eventrun-Delivery` to tell.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import functools
import hashlib
import hmac
import logging
import re
import time
import urllib.parse
from datetime import datetime, timezone
from typing import Any

import aiohttp
import orjson
import yarl

from eventrun.engine.api import Delivery, Invocation
from eventrun.engine.core import Engine
from eventrun.engine.errors import InvocationNotFound, StoreError
from eventrun.engine.failures import FailureLog
from eventrun.engine.text import printable
from eventrun.engine.manifest import Manifest
from eventrun.engine.recount import Recount
from eventrun.triggers.http import invocation_json
from eventrun.triggers.http.responses import document_json

logger = logging.getLogger(__name__)

LOG_TAIL = 4096  # bytes of a failed run's log sent with its record (cut to whole lines)
GIVE_UP_AFTER = 24 * 3600.0  # seconds after the run's end; a delivery failing that long is given up
RETRYABLE_STATUSES = frozenset({408, 425, 429})  # 4xx answers that may go the next time
WAIT_ASKING_STATUSES = frozenset({429, 503})  # answers whose Retry-After sets the next attempt's time
TARGET_SHARE = 2  # one target's attempts at once are at most half the slots (at least one), unless it is the only one
ANSWER_PREFIX = 256  # bytes of a refusing receiver's answer read for the log (the rest is not read)
SETTLE_LOG_EVERY = 60.0  # seconds between the log's lines about attempts the store cannot record (an outage), at least
FAILED_LOG_EVERY = 60.0  # seconds between the log's lines about failed attempts to one target, at least


class Undeliverable(Exception):
    """This delivery cannot go, however often it is tried (the receiver refused it)."""


class DeliveryFailed(Exception):
    """The receiver did not take it this time."""

    def __init__(self, problem: str, *, retry_after: float | None = None) -> None:
        super().__init__(problem)
        self.retry_after = retry_after  # seconds the receiver asked to wait (Retry-After), if it did


class Deliverer:
    """Claims due deliveries from the store's outbox, makes them, and records each attempt."""

    def __init__(
        self,
        engine: Engine,
        manifest: Manifest,
        *,
        backoff: float = 1.0,
        max_backoff: float = 300.0,
        lease: float = 60.0,
        in_flight: int = 16,
        poll: float = 1.0,
        timeout: float = 10.0,
    ) -> None:
        self._engine = engine
        self._manifest = manifest
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._lease = lease  # how long a claim holds; longer than an attempt takes (timeout)
        self._in_flight = in_flight  # attempts at once, at most
        # A receiver that hangs holds no more than these slots, so the others' deliveries go on;
        # the manifest's only target, when it has one, has them all (a stray, see claim_deliveries,
        # for another target still gets no more than its share).
        self._per_target = max(1, in_flight // TARGET_SHARE)  # attempts at once to one target, at most
        targets = {target for f in manifest.functions.values() for _, target in f.destinations}
        self._sole_target = targets.pop() if len(targets) == 1 else None
        self._under_way: collections.Counter[str] = collections.Counter()  # attempts in flight, by target
        self._poll = poll  # the longest wait between looks at the outbox (others' ends, clock)
        self._timeout = timeout
        self._wake = asyncio.Event()
        self._owing = {name for name, f in manifest.functions.items() if f.destinations}  # their ends wake the loop
        self._loop: asyncio.Task[None] | None = None
        self._attempts: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._producer: Any = None  # an AIOKafkaProducer, made at the first Kafka delivery
        self._starting: asyncio.Task[Any] | None = None  # its start, shared by the deliveries waiting for it
        self.sent = 0
        self.failed = 0  # attempts that failed (and will be tried again)
        self.given_up = 0
        # How many wait in the outbox: a pass over it, so counted in the background, and
        # again once the last count is poll seconds old (or ten times as old as it took).
        self._pending = Recount(self._count_pending, at_least=poll)
        self._settles_failing = FailureLog(logger, every=SETTLE_LOG_EVERY, level=logging.WARNING)
        self._targets_failing: dict[str, FailureLog] = {}  # failed attempts, per target (see _failing_to)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Take back what this server was delivering when it stopped, then deliver until stopped."""
        await self._engine.store.release_deliveries()
        if self._owing:  # (a listener costs every run's end a read of its record)
            self._engine.add_listener(self._on_end)
        self._engine.on_stopping(self.stop)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        self._loop = asyncio.create_task(self._deliver_forever(), name="deliveries")

    async def stop(self) -> None:
        """Stop claiming; give attempts under way a moment, then cut them off (their claims
        are released, so the next start makes them)."""
        if self._loop is None:
            return
        loop, self._loop = self._loop, None
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        self._pending.cancel()
        if self._attempts:
            await asyncio.wait(self._attempts, timeout=5)
        for task in self._attempts:
            task.cancel()
        await asyncio.gather(*self._attempts, return_exceptions=True)
        try:
            await self._engine.store.release_deliveries()
        except Exception:  # the store gone: the claims run out by themselves
            logger.warning("could not hand back the deliveries under way; they go again when their claim runs out")
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._starting is not None:
            starting, self._starting = self._starting, None
            starting.cancel()  # (a producer it made is stopped by it)
            await asyncio.gather(starting, return_exceptions=True)
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    @property
    def pending(self) -> int:
        """Deliveries in the outbox, as last counted."""
        return self._pending.latest or 0

    async def _count_pending(self) -> int:
        return (await self._engine.store.outbox()).pending

    def state(self) -> dict[str, Any]:
        """Figures for /healthz."""
        destinations = {
            name: {kind: shown_target(target) for kind, target in f.destinations}
            for name, f in self._manifest.functions.items()
            if f.destinations
        }
        return {
            "destinations": destinations,
            "pending": self.pending,
            "sent": self.sent,
            "failed_attempts": self.failed,
            "given_up": self.given_up,
        }

    def metrics(self) -> str:
        """Prometheus text of the deliveries."""
        return (
            "# HELP eventrun_deliveries_sent_total Deliveries made (callbacks and on-failure records).\n"
            "# TYPE eventrun_deliveries_sent_total counter\n"
            f"eventrun_deliveries_sent_total {self.sent}\n"
            "# HELP eventrun_delivery_failures_total Delivery attempts that failed and are tried again.\n"
            "# TYPE eventrun_delivery_failures_total counter\n"
            f"eventrun_delivery_failures_total {self.failed}\n"
            "# HELP eventrun_deliveries_given_up_total Deliveries given up (refused, or failing past 24h).\n"
            "# TYPE eventrun_deliveries_given_up_total counter\n"
            f"eventrun_deliveries_given_up_total {self.given_up}\n"
            "# HELP eventrun_outbox_pending Deliveries waiting in the outbox.\n"
            "# TYPE eventrun_outbox_pending gauge\n"
            f"eventrun_outbox_pending {self.pending}\n"
        )

    # -- the loop --------------------------------------------------------------------------

    def _on_end(self, invocation: Invocation) -> None:
        if invocation.function in self._owing:
            self._wake.set()  # its deliveries, if any, are in the outbox already

    async def _deliver_forever(self) -> None:
        failures = 0  # rounds failed in a row
        while True:
            try:
                wait = await self._round()
            except StoreError as exc:  # the store cannot serve now: look again in a while, and say so once
                if not failures:
                    logger.warning("reading the outbox failed (%s); trying again every %gs", exc, self._poll)
                failures += 1
                wait = self._poll
            except Exception:  # eventrun's own failure: its traceback, each time
                logger.exception("reading the outbox failed")
                wait = self._poll
            else:
                if failures:
                    logger.warning("the outbox is read again, after %d failed rounds", failures)
                failures = 0
            if wait > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            self._wake.clear()

    async def _round(self) -> float:
        """Start what is due (as many as there are free slots); how long to wait before the next look.

        The outbox is read first (when its next delivery is due, from its index), and claimed
        from (a write) only when something is due.
        """
        self._pending.refresh()
        next_in = await self._engine.store.next_delivery()
        due = next_in is not None and next_in <= 0
        room, busy = self._room()
        if due and room:
            claimed = await self._engine.store.claim_deliveries(
                room, self._lease, self._manifest.functions, busy=busy
            )
            for delivery in claimed:
                self._start(delivery)
            if claimed:
                return 0.0  # more may be due: look again at once
        if due or next_in is None:
            return self._poll  # (an attempt ending, or a run of a function with destinations ending, wakes the loop)
        return min(self._poll, next_in)

    def _room(self) -> tuple[int, list[str]]:
        """How many deliveries to claim now, and the targets to claim none for (at their cap).

        No more than the least room a target under way has left: whichever targets the claimed
        deliveries are for, none goes past its cap.
        """
        free = self._in_flight - len(self._attempts)
        rooms = {target: self._cap(target) - count for target, count in self._under_way.items()}
        busy = sorted(target for target, room in rooms.items() if room <= 0)
        open_rooms = [room for room in rooms.values() if room > 0]
        return min([free, self._per_target, *open_rooms]), busy

    def _cap(self, target: str) -> int:
        """Attempts at once to this target, at most."""
        return self._in_flight if target == self._sole_target else self._per_target

    def _start(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._attempt(delivery), name=f"delivery {delivery.id}")
        self._attempts.add(task)
        self._under_way[delivery.target] += 1
        task.add_done_callback(functools.partial(self._ended, delivery.target))

    def _ended(self, target: str, task: asyncio.Task[None]) -> None:
        self._attempts.discard(task)
        self._under_way[target] -= 1
        if not self._under_way[target]:
            del self._under_way[target]

    async def _attempt(self, delivery: Delivery) -> None:
        target = shown_target(delivery.target)
        try:
            await self._make(delivery)
        except Undeliverable as exc:
            self.given_up += 1
            problem = _describe(exc, delivery.target)
            logger.error("gave up delivering %s of %s to %s: %s", delivery.kind, delivery.request_id, target, problem)
            await self._settle(delivery, error=problem, give_up=True)
        except Exception as exc:
            if isinstance(exc, asyncio.TimeoutError) and not str(exc):  # (aiohttp's ClientTimeout says nothing more)
                problem = f"no answer within {self._timeout:g} s"
            else:
                problem = _describe(exc, delivery.target)
            if await self._too_old(delivery):
                self.given_up += 1
                logger.error(
                    "gave up delivering %s of %s to %s after %d attempts over %s: %s",
                    delivery.kind, delivery.request_id, target, delivery.attempts + 1, "24h", problem,
                )
                await self._settle(delivery, error=problem, give_up=True)
            else:
                self.failed += 1
                retry_in = self._retry_in(delivery, exc)
                self._failing_to(delivery.target).log(
                    "delivering %s of %s to %s failed (attempt %d; next in %.0fs): %s",
                    delivery.kind, delivery.request_id, target, delivery.attempts + 1, retry_in, problem,
                )
                await self._settle(delivery, error=problem, retry_in=retry_in)
        else:
            self.sent += 1
            if (failing := self._targets_failing.get(delivery.target)) is not None:
                failing.recovered(f"deliveries to {target} go through again")
            await self._settle(delivery)
        finally:
            self._wake.set()  # a slot is free

    def _failing_to(self, target: str) -> FailureLog:
        """What the log says of failed attempts to one target: a line a minute at most, counting
        the others (a receiver down for a while, many runs' callbacks owed to it, made a line
        an attempt), and one when they go through again."""
        failing = self._targets_failing.get(target)
        if failing is None:
            failing = self._targets_failing[target] = FailureLog(
                logger, every=FAILED_LOG_EVERY, level=logging.WARNING, counted="attempts there failed"
            )
        return failing

    def _retry_in(self, delivery: Delivery, exc: Exception) -> float:
        """Seconds to the next attempt: backing off, and not before a Retry-After asks (at most max_backoff)."""
        backoff = self._backoff * 2**delivery.attempts
        asked = exc.retry_after if isinstance(exc, DeliveryFailed) else None
        return min(self._max_backoff, max(backoff, asked or 0.0))

    async def _too_old(self, delivery: Delivery) -> bool:
        """Whether the run ended more than GIVE_UP_AFTER ago (if the store cannot say: not yet)."""
        try:
            invocation = await self._engine.store.get(delivery.request_id)
        except Exception:
            return False
        return invocation is not None and _age(invocation) > GIVE_UP_AFTER

    async def _settle(self, delivery: Delivery, **outcome: Any) -> None:
        # Unrecorded, its claim runs out and it is tried again: at least once, maybe twice.
        try:
            await self._engine.store.settle_delivery(delivery.id, **outcome)
        except StoreError as exc:  # the store cannot serve now (an outage)
            self._settles_failing.log(
                "could not record the attempt to deliver %s of %s (%s); it goes again once its claim runs out",
                delivery.kind, delivery.request_id, exc,
            )
        except Exception:  # eventrun's own failure: its traceback, each time
            logger.exception("could not record the attempt to deliver %s of %s", delivery.kind, delivery.request_id)
        else:
            self._settles_failing.recovered("attempts to deliver are recorded again")

    # -- one delivery ----------------------------------------------------------------------

    async def _make(self, delivery: Delivery) -> None:
        try:
            invocation = await self._engine.get(delivery.request_id)
        except InvocationNotFound:
            raise Undeliverable("the run is no longer in the store") from None
        document = invocation_json(invocation)
        if delivery.kind == "on_failure":
            document["Event"] = orjson.Fragment(await self._engine.envelope(delivery.request_id))
            # (A byte more than the tail: log_tail then sees that the log goes on before it.)
            log_end = await self._engine.read_log(delivery.request_id, last=LOG_TAIL + 1)
            document["LogTail"] = log_tail(log_end)
        body = document_json(document)  # (a result stored too deep to write in it is replaced, as in the API)
        if delivery.target.startswith("kafka:"):
            await self._produce(delivery, delivery.target.removeprefix("kafka:"), body)
        else:
            await self._post(delivery, body)

    def _secret(self, delivery: Delivery) -> str:
        """What signs a delivery to a URL: its function's callback_secret, as the manifest has it now.

        The outbox keeps no secrets, so a function gone from the manifest took its secret with
        it: rather than go unsigned, its delivery fails like an attempt the receiver did not
        take, and goes (signed) once a manifest has the function again, or is given up a day
        after the run's end.
        """
        function = self._manifest.functions.get(delivery.function)
        if function is None:
            raise DeliveryFailed(
                f"function {delivery.function!r} is no longer in the manifest, so its callback_secret"
                " is not known: not sent unsigned"
            )
        return function.callback_secret.get_secret_value()

    async def _post(self, delivery: Delivery, body: bytes) -> None:
        assert self._session is not None
        secret = self._secret(delivery)
        headers = {
            "Content-Type": "application/json",
            "X-Request-Id": delivery.request_id,
            "X-Eventrun-Delivery": delivery.kind,
            "X-Eventrun-Attempt": str(delivery.attempts + 1),
        }
        if secret:
            headers["X-Eventrun-Signature"] = signature(secret, body)
        # A redirect is not followed: 301 to 303 would turn the POST into a GET without its
        # body (answered 200, so counted as delivered), and any would carry it, signed, elsewhere.
        async with self._session.post(delivery.target, data=body, headers=headers, allow_redirects=False) as response:
            if 200 <= response.status < 300:
                return
            if response.status < 200:  # (e.g. a 101: the receiver switched protocols instead of taking it)
                raise DeliveryFailed(f"HTTP {response.status}: an interim answer, not a 2xx")
            if response.status < 400:
                location = response.headers.get("Location", "")
                to = f" to {shown_target(location)}" if location else ""
                raise Undeliverable(
                    f"HTTP {response.status} redirect{to}: redirects are not followed;"
                    " set the URL that takes the POST itself"
                )
            text = await _answer_prefix(response)
            problem = f"HTTP {response.status} {text}".strip()
            if 400 <= response.status < 500 and response.status not in RETRYABLE_STATUSES:
                raise Undeliverable(problem)
            raise DeliveryFailed(problem, retry_after=_asked_to_wait(response))

    async def _produce(self, delivery: Delivery, topic: str, body: bytes) -> None:
        producer = await self._kafka()
        headers = [("eventrun-delivery", delivery.kind.encode()), ("eventrun-request-id", delivery.request_id.encode())]
        try:
            await asyncio.wait_for(
                producer.send_and_wait(topic, body, key=delivery.request_id.encode(), headers=headers), self._timeout
            )
        except Exception:
            # A producer that failed may be stuck on a broker gone away: the next attempt starts
            # afresh (the first of the attempts failing on it stops it).
            if self._producer is producer:
                self._producer = None
                await asyncio.shield(producer.stop())
            raise

    async def _kafka(self) -> Any:
        """The producer, started at the first Kafka delivery; deliveries that come while it
        starts wait for that start rather than make producers of their own."""
        if self._producer is not None:
            return self._producer
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._start_producer(), name="deliveries' kafka producer")
        # Shielded: a delivery cut off while waiting leaves the start to the others.
        return await asyncio.shield(self._starting)

    async def _start_producer(self) -> Any:
        from aiokafka import AIOKafkaProducer

        from eventrun.triggers.kafka.security import connection_options

        producer = AIOKafkaProducer(
            bootstrap_servers=self._manifest.kafka.bootstrap_servers,
            **connection_options(self._manifest),
            client_id="eventrun-destinations",
            acks="all",
            request_timeout_ms=int(self._timeout * 1000),
        )
        try:
            await asyncio.wait_for(producer.start(), self._timeout)
        except BaseException:
            await asyncio.shield(producer.stop())
            raise
        self._producer = producer
        return producer


def signature(secret: str, body: bytes, now: float | None = None) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>`: what X-Eventrun-Signature holds.

    The time is signed with the body, so a receiver can refuse an old delivery played again.
    """
    stamp = str(int(now if now is not None else time.time()))
    digest = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


def shown_target(target: str) -> str:
    """A destination as /healthz and the log show it: a URL as scheme://host[:port], its path as
    "/…" (a chat service's webhook URL is its path: the path is the secret), without the userinfo,
    query and fragment, which may hold a receiver's credentials too; a Kafka topic as is."""
    if target.startswith("kafka:"):
        return target
    try:
        parts = urllib.parse.urlsplit(target)
        host, port = parts.hostname or "", parts.port
    except ValueError:  # (the manifest refuses such a URL; a Location header may be anything)
        return "(a URL that cannot be read)"
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    path = "/…" if parts.path.strip("/") else parts.path
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, "", ""))


def retry_after(value: str, now: float | None = None) -> float | None:
    """The seconds a Retry-After header asks to wait, from its seconds or its HTTP-date; None
    if it cannot be read."""
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except ValueError:
        return None
    if when.tzinfo is None:  # (an HTTP-date is in GMT)
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def log_tail(log: bytes, limit: int = LOG_TAIL) -> str:
    """The end of a log, at most `limit` bytes, starting at a line; when its last line alone is
    longer, that line's end, starting at a character."""
    if len(log) > limit:
        log = log[-limit:]
        cut = log.find(b"\n")
        if 0 <= cut < len(log) - 1:
            log = log[cut + 1 :]
        else:  # (its last line is longer: from the first character that begins within the limit)
            start = 0
            while start < 3 and 0x80 <= log[start] < 0xC0:  # the rest of a UTF-8 character begun before
                start += 1
            log = log[start:]
    return log.decode("utf-8", errors="replace")


async def _answer_prefix(response: aiohttp.ClientResponse, limit: int = ANSWER_PREFIX) -> str:
    """The start of a receiver's answer, at most `limit` bytes, on one line, its control
    characters escaped (what is left unread is dropped with the connection when the response is
    released)."""
    prefix = b""
    while len(prefix) < limit:
        chunk = await response.content.read(limit - len(prefix))
        if not chunk:
            break
        prefix += chunk
    return printable(" ".join(prefix.decode("utf-8", errors="replace").split()))


def _age(invocation: Invocation) -> float:
    if not invocation.ended_at:
        return 0.0
    ended = datetime.fromisoformat(invocation.ended_at.replace("Z", "+00:00"))
    return time.time() - ended.timestamp()


def _asked_to_wait(response: aiohttp.ClientResponse) -> float | None:
    """The wait a 429 or 503 answer's Retry-After asks for, if any."""
    value = response.headers.get("Retry-After")
    if response.status not in WAIT_ASKING_STATUSES or value is None:
        return None
    return retry_after(value)


def _describe(exc: BaseException, target: str) -> str:
    """What went wrong, for the log and the outbox, with the target shown as shown_target shows it:
    aiohttp's errors may hold the URL whole (InvalidURL, NonHttpUrlClientError, ClientResponseError)."""
    text = _without_credentials(str(exc), target)
    if isinstance(exc, (DeliveryFailed, Undeliverable)):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")  # a URL in a text, up to a space, quote or bracket


def _without_credentials(text: str, target: str) -> str:
    """The text with the target, as given or as yarl writes it, and then any URL left in it,
    shown as shown_target shows them: no userinfo, query or fragment."""
    for spelling in _spellings(target):
        text = text.replace(spelling, shown_target(target))
    return _URL.sub(lambda found: shown_target(found.group()), text)


def _spellings(target: str) -> list[str]:
    """The ways an error may write a target: as given, and as the yarl.URL aiohttp made of it
    (quoted); longest first, so none is left half replaced."""
    spellings = {target}
    try:
        url = yarl.URL(target)
    except ValueError:
        pass
    else:
        spellings |= {str(url), url.human_repr()}
    return sorted(spellings, key=len, reverse=True)
