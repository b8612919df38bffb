"""The timer trigger: one asyncio task per schedule, firing each slot once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
import re
from datetime import datetime, timedelta
from typing import Any, Protocol, Sequence

from apscheduler.triggers.cron import CronTrigger

from eventrun.engine.api import Accepted
from eventrun.engine.envelope import Envelope
from eventrun.engine.errors import ManifestError, ShuttingDown, StoreError
from eventrun.engine.manifest import Manifest, Problem, problems_text
from eventrun.engine.manifest import TimerTrigger as TimerConfig
from eventrun.engine.metrics import family, labels

from .parser import (
    UTC,
    last_slot,
    next_slot,
    parse_cron,
    parse_slot,
    parse_timezone,
    slot_id,
    to_envelope,
)

logger = logging.getLogger(__name__)

MISFIRE_GRACE = 10.0
"""Seconds a slot may be late (event loop stalled, host suspended) and still fire."""

STOP_TIMEOUT = 5.0
"""Seconds stop() waits for a slot being handed to the engine before cancelling it."""

STORE_RETRY = (0.5, 5.0)
"""While the store cannot take a slot: seconds before the first try again, and at most between tries."""

_MAX_NAP = 60.0  # re-read the wall clock at least this often, so a clock step is noticed
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,59}")  # (fullmatch) SCF's rule for timer names


class TimerEngine(Protocol):
    """What the timer trigger needs of the engine."""

    async def accept_batch(self, envelopes: Sequence[Envelope]) -> list[Accepted]:
        """Record envelopes durably; never throttled; idempotent on (function, source, id)."""
        ...

    async def active(self, function: str, source: str) -> int:
        """QUEUED or RUNNING runs of the function from this source."""
        ...

    async def get_state(self, key: str) -> str | None:
        """A remembered value."""
        ...

    async def put_state(self, key: str, value: str) -> None:
        """Remember a value durably."""
        ...


@dataclass(slots=True, eq=False)
class _Job:
    """One timer trigger of one function, and what it has done."""

    function: str
    config: TimerConfig
    schedule: CronTrigger
    last: datetime | None = None  # the latest slot handled (fired or deliberately skipped)
    last_fired: datetime | None = None  # the latest slot fired since the start (here, or by another server)
    next: datetime | None = None
    fired: int = 0
    duplicates: int = 0
    skipped: int = 0
    errors: int = 0
    failure: str | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def source(self) -> str:
        return f"timer://{self.function}/{self.config.name}"

    @property
    def key(self) -> str:
        return f"timer:{self.function}/{self.config.name}"

    @property
    def label(self) -> str:
        return f"{self.function}/{self.config.name}"


_COUNTERS = (
    ("eventrun_timer_fired_total", "fired", "Slots that started a run."),
    ("eventrun_timer_duplicates_total", "duplicates", "Slots found already accepted (after a restart, or on another server)."),
    ("eventrun_timer_skipped_total", "skipped", "Slots skipped: too late (catch_up = false) or the run before still going (overlap = false)."),
    ("eventrun_timer_errors_total", "errors", "Slots that could not be accepted."),
)


class TimerTrigger:
    """Fires every `type = "timer"` trigger of the manifest on its cron schedule.

    APScheduler's CronTrigger matches the fields, and next_slot puts them in the zone (DST); the
    waiting is one asyncio task per trigger rather than AsyncIOScheduler, because APScheduler
    3 does not tell a job which slot it runs for, and the envelope's id must be exactly that
    slot. Slots are computed and slept for in UTC. Missed slots coalesce into the latest one;
    acceptance is idempotent on the slot, so restarts and twin servers never run a slot twice.
    """

    def __init__(
        self, engine: TimerEngine, manifest: Manifest, *, misfire_grace: float = MISFIRE_GRACE
    ) -> None:
        self._engine = engine
        self._grace = timedelta(seconds=misfire_grace)
        self._jobs, problems = _jobs(manifest)
        if problems:
            raise ManifestError(problems_text(problems))
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        """Catch up where asked, then start one schedule task per trigger."""
        if self._tasks:
            return
        self._stopping = asyncio.Event()
        now = _utcnow()
        for job in self._jobs:
            job.failure = None
            job.last = await self._remembered(job)
            if job.config.catch_up and job.last is not None:
                missed = last_slot(job.schedule, job.last, now)
                if missed is not None:
                    logger.info("timer %s: catching up %s, the last slot missed while down", job.label, slot_id(missed))
                    try:
                        await self._fire_once(job, missed)  # (once: the start does not wait for the store)
                    except StoreError as exc:
                        logger.error("timer %s: slot %s could not be caught up: %s", job.label, slot_id(missed), exc)
                        job.errors += 1
        for job in self._jobs:
            self._tasks.append(asyncio.create_task(self._run(job, now), name=f"timer {job.label}"))
        if self._jobs:
            logger.info("timer trigger started: %d schedules", len(self._jobs))

    async def stop(self) -> None:
        """Stop scheduling: a slot being handed over finishes (briefly), sleeping ones end now."""
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        self._stopping.set()
        _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        logger.info("timer trigger stopped")

    async def __aenter__(self) -> TimerTrigger:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def state(self) -> dict[str, Any]:
        """For GET /healthz: each schedule with its next and last slot and counters; "failed"
        once an error stopped a schedule (its Failure says which), which fires no more."""
        if not self._tasks:
            status = "stopped"
        else:
            status = "failed" if any(job.failure for job in self._jobs) else "running"
        return {
            "Status": status,
            "Schedules": [
                {
                    "Function": job.function,
                    "Trigger": job.name,
                    "Cron": job.config.cron,
                    "Timezone": job.config.timezone,
                    "CatchUp": job.config.catch_up,
                    "Overlap": job.config.overlap,
                    "NextFire": slot_id(job.next) if job.next and self._tasks else None,
                    "LastFire": slot_id(job.last_fired) if job.last_fired else None,
                    "LastSlot": slot_id(job.last) if job.last else None,
                    "Fired": job.fired,
                    "Duplicates": job.duplicates,
                    "Skipped": job.skipped,
                    "Errors": job.errors,
                    "Failure": job.failure,
                }
                for job in self._jobs
            ],
        }

    def metrics(self) -> str:
        """Each schedule's counters as Prometheus text, labelled by function and trigger name."""
        out: list[str] = []
        for name, attribute, help_text in _COUNTERS:
            out += family(name, "counter", help_text)
            out += [
                f"{name}{labels(function=job.function, trigger=job.name)} {getattr(job, attribute)}" for job in self._jobs
            ]
        return "\n".join(out) + "\n"

    # -- the schedule loop ------------------------------------------------------------------

    async def _run(self, job: _Job, started: datetime) -> None:
        # Slots up to `started` were missed while down: skipped, or caught up by start().
        cursor = max(started, job.last) if job.last else started
        try:
            while True:
                slot = job.next = next_slot(job.schedule, cursor)
                if slot is None:
                    logger.warning("timer %s: the schedule %r has no further slots", job.label, job.config.cron)
                    return
                if await self._sleep_until(slot):
                    return
                now = _utcnow()
                # Woken late past further slots (a stalled loop, a suspended host): coalesce.
                due = last_slot(job.schedule, cursor, now) or slot
                if due != slot:
                    logger.warning(
                        "timer %s: slots %s to %s passed unnoticed; only the latest fires",
                        job.label,
                        slot_id(slot),
                        slot_id(due),
                    )
                cursor = due
                if now - due > self._grace and not job.config.catch_up:
                    late = (now - due).total_seconds()
                    logger.warning("timer %s: slot %s skipped, %.1fs late", job.label, slot_id(due), late)
                    job.skipped += 1
                    await self._remember(job, due)
                    continue
                if not await self._fire(job, due):
                    return
        except Exception as exc:  # a bug must not pass silently, nor stop the other schedules
            logger.exception("timer %s stopped by an unexpected error", job.label)
            job.failure = f"{type(exc).__name__}: {exc}"
        finally:
            job.next = None  # (no slot of it is to come: /healthz must not show one)

    async def _sleep_until(self, when: datetime) -> bool:
        """Wait for the wall clock to reach `when`; True if stop() was called meanwhile."""
        while not self._stopping.is_set():
            delay = (when - _utcnow()).total_seconds()
            if delay <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(delay, _MAX_NAP)):
                    await self._stopping.wait()
        return True

    async def _fire(self, job: _Job, slot: datetime) -> bool:
        """Hand one slot to the engine; False once the engine is shutting down. While the store
        cannot serve (an outage, a full disk), the slot is tried again until it can, or until the
        schedule's next slot is due (which then fires in its place)."""
        retry = STORE_RETRY[0]
        while True:
            try:
                fired = await self._fire_once(job, slot)
            except StoreError as exc:
                following = next_slot(job.schedule, slot)
                now = _utcnow()
                if following is None or following <= now + timedelta(seconds=retry):
                    logger.error(
                        "timer %s: slot %s could not be accepted before the next one was due: %s", job.label, slot_id(slot), exc
                    )
                    job.errors += 1
                    return True
                if retry == STORE_RETRY[0]:
                    logger.warning(
                        "timer %s: the store cannot take slot %s now (%s); trying again until it can, up to the next slot",
                        job.label, slot_id(slot), exc,
                    )
                if await self._sleep_until(now + timedelta(seconds=retry)):
                    return False
                retry = min(retry * 2, STORE_RETRY[1])
                continue
            if retry != STORE_RETRY[0] and fired:
                logger.warning("timer %s: slot %s accepted once the store could take it", job.label, slot_id(slot))
            return fired

    async def _fire_once(self, job: _Job, slot: datetime) -> bool:
        if not job.config.overlap and await self._engine.active(job.function, job.source) > 0:
            logger.info(
                "timer %s: slot %s skipped: the previous run is still queued or running (overlap = false)",
                job.label,
                slot_id(slot),
            )
            job.skipped += 1
            await self._remember(job, slot)
            return True
        envelope = to_envelope(job.function, job.name, slot, job.config.payload)
        try:
            [accepted] = await self._engine.accept_batch([envelope])
        except ShuttingDown:
            return False
        except StoreError:
            raise  # (tried again by _fire)
        except Exception:
            logger.exception("timer %s: slot %s could not be accepted", job.label, envelope.id)
            job.errors += 1
            return True
        if accepted.created:
            job.fired += 1
            logger.debug("timer %s: slot %s accepted as %s", job.label, envelope.id, accepted.request_id)
        else:  # another server (or a previous life) accepted this slot already
            job.duplicates += 1
        job.last_fired = max(slot, job.last_fired or slot)
        await self._remember(job, slot)
        return True

    async def _remembered(self, job: _Job) -> datetime | None:
        text = await self._engine.get_state(job.key)
        if text is None:
            return None
        try:
            return parse_slot(text)
        except ValueError:
            logger.warning("timer %s: ignoring unreadable remembered slot %r", job.label, text)
            return None

    async def _remember(self, job: _Job, slot: datetime) -> None:
        if job.last is not None and slot <= job.last:
            return
        job.last = slot
        try:
            await self._engine.put_state(job.key, slot_id(slot))
        except StoreError as exc:  # (the store cannot serve now: a catch-up may offer the slot again, a duplicate)
            logger.warning("timer %s: could not remember slot %s: %s", job.label, slot_id(slot), exc)
        except Exception:
            logger.exception("timer %s: could not remember slot %s", job.label, slot_id(slot))


def manifest_problems(manifest: Manifest) -> list[Problem]:
    """What is wrong with the manifest's timer triggers: every bad name, zone and cron."""
    return _jobs(manifest)[1]


def _jobs(manifest: Manifest) -> tuple[list[_Job], list[Problem]]:
    """One job per good timer trigger, and the problems of the others."""
    jobs: list[_Job] = []
    problems: list[Problem] = []
    for function, config in manifest.functions.items():
        for index, trigger in enumerate(config.triggers):
            if not isinstance(trigger, TimerConfig):
                continue
            where = ["functions", function, "triggers", str(index)]
            if not _NAME.fullmatch(trigger.name):
                problems.append(
                    ([*where, "name"], f"{trigger.name!r}: must start with an ASCII letter and hold only ASCII letters, digits, '_' or '-' (at most 60)")
                )
                continue
            try:
                parse_timezone(trigger.timezone)
            except ValueError as exc:
                problems.append(([*where, "timezone"], f"{exc} (timer {trigger.name!r})"))
                continue
            try:
                schedule = parse_cron(trigger.cron, trigger.timezone)
            except ValueError as exc:
                problems.append(([*where, "cron"], f"{trigger.cron!r} (timer {trigger.name!r}): {exc}"))
                continue
            jobs.append(_Job(function=function, config=trigger, schedule=schedule))
            if trigger.timezone in _SUMMERLESS:
                offset, local = _SUMMERLESS[trigger.timezone]
                logger.warning(
                    "timer %s/%s: timezone %r is UTC%s all year, without daylight saving time; for the time in %s use %r",
                    function, trigger.name, trigger.timezone, offset, local.split("/")[1].replace("_", " "), local,
                )
    return jobs, problems


_SUMMERLESS = {"EST": ("-05:00", "America/New_York"), "MST": ("-07:00", "America/Denver")}
"""IANA zones named like the time of a region that keeps summer time, which they do not keep."""


def _utcnow() -> datetime:
    return datetime.now(UTC)
