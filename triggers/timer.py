"""The timer trigger: cron schedules (APScheduler 3 arithmetic) fire envelopes into the engine."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import re
import zoneinfo
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, Sequence

from apscheduler.triggers.cron import CronTrigger

from eventrun.engine.api import Accepted
from eventrun.engine.envelope import Envelope
from eventrun.engine.errors import ManifestError, ShuttingDown
from eventrun.engine.manifest import Manifest
from eventrun.engine.manifest import TimerTrigger as TimerConfig

logger = logging.getLogger(__name__)

UTC = timezone.utc
EVENT_TYPE = "eventrun.timer.fired"
TRIGGER = "timer"

MISFIRE_GRACE = 10.0
"""Seconds a slot may be late (event loop stalled, host suspended) and still fire."""

STOP_TIMEOUT = 5.0
"""Seconds stop() waits for a slot being handed to the engine before cancelling it."""

_MAX_NAP = 60.0  # re-read the wall clock at least this often, so a clock step is noticed
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,59}$")  # SCF's rule for timer names

# Cron fields in the order each form writes them, as CronTrigger calls them.
_SCF_FIELDS = ("second", "minute", "hour", "day", "month", "day_of_week", "year")
_CRONTAB_FIELDS = ("minute", "hour", "day", "month", "day_of_week")
_LABELS = {"day": "day-of-month", "day_of_week": "day-of-week"}

# Crontab and SCF number weekdays from Sunday = 0 (7 is Sunday too); APScheduler 3 from
# Monday = 0. Weekdays are therefore handed to CronTrigger by name, never by number.
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_APS_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DOW_ITEM = re.compile(r"^(?:(\*)|([0-9a-z]+)(?:-([0-9a-z]+))?)(?:/(\d+))?$", re.IGNORECASE)


class TimerEngine(Protocol):
    """What the timer trigger needs of the engine."""

    async def accept_batch(self, envelopes: Sequence[Envelope]) -> list[Accepted]:
        """Record envelopes durably; never throttled; idempotent on (function, source, id)."""
        ...

    def active(self, function: str, source: str) -> int:
        """QUEUED or RUNNING runs of the function from this source."""
        ...

    def get_state(self, key: str) -> str | None:
        """A remembered value."""
        ...

    async def put_state(self, key: str, value: str) -> None:
        """Remember a value durably."""
        ...


# --------------------------------------------------------------------------- pure parts


def parse_timezone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA time zone `name`; ValueError naming it (and a likely fix) otherwise."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        pass
    known = zoneinfo.available_timezones()
    folded = {zone.lower(): zone for zone in known}
    close = [folded[name.strip().lower()]] if name.strip().lower() in folded else []
    close = close or difflib.get_close_matches(name, sorted(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(
        f"unknown time zone {name!r}{hint}; expected an IANA name such as 'Asia/Shanghai' or 'UTC'"
    )


def parse_cron(expr: str, tz: str = "UTC") -> CronTrigger:
    """A CronTrigger from SCF's 7-field or crontab's 5-field form; ValueError says what is wrong.

    7 fields: second minute hour day month day-of-week year. 5 fields: minute hour day month
    day-of-week (second 0, any year). `?` means `*`; day-of-week counts 0 (or 7) = Sunday.
    """
    zone = parse_timezone(tz)
    parts = expr.split()
    if len(parts) == len(_SCF_FIELDS):
        names = _SCF_FIELDS
    elif len(parts) == len(_CRONTAB_FIELDS):
        names = _CRONTAB_FIELDS
    else:
        raise ValueError(
            f"expected 7 fields (second minute hour day month day-of-week year) or 5 "
            f"(minute hour day month day-of-week), got {len(parts)}"
        )
    values = {"second": "0", "year": "*"}
    for name, raw in zip(names, parts):
        value = "*" if raw == "?" else raw
        try:
            if name == "day_of_week":
                value = _day_of_week(value)
            CronTrigger(timezone=UTC, **{name: value})  # validates this field alone, to name it
        except ValueError as exc:
            raise ValueError(f"{_LABELS.get(name, name)} field {raw!r}: {exc}") from None
        values[name] = value
    schedule = CronTrigger(timezone=zone, **values)
    if schedule.get_next_fire_time(None, datetime(1970, 1, 1, tzinfo=UTC)) is None:
        raise ValueError("no date ever matches every field (such as 30 February)")
    return schedule


def _day_of_week(value: str) -> str:
    """A crontab/SCF day-of-week field as APScheduler weekday names."""
    days: set[int] = set()
    for item in value.split(","):
        days |= _day_of_week_item(item.strip())
    if len(days) == 7:
        return "*"
    return ",".join(name for name in _APS_DAYS if _CRON_DAYS.index(name) in days)


def _day_of_week_item(item: str) -> set[int]:
    match = _DOW_ITEM.match(item)
    if not match:
        raise ValueError(f"cannot read {item!r}; use 0-7 or SUN-SAT, ranges a-b, steps /n and lists a,b")
    star, first, last, step = match.groups()
    if star:
        low, high = 0, 6
    else:
        low = _weekday(first)
        if last:
            high = _weekday(last)
            if high == 0 < low:  # "FRI-SUN": Sunday closes the week as 7 does
                high = 7
            if high < low:
                raise ValueError(f"the range {item!r} runs backwards")
        else:
            high = max(low, 6) if step else low
    stride = int(step) if step else 1
    if stride < 1:
        raise ValueError("a step must be at least 1")
    return {day % 7 for day in range(low, high + 1, stride)}


def _weekday(token: str) -> int:
    if token.isdigit():
        number = int(token)
        if number > 7:
            raise ValueError(f"{number} is out of range 0-7 (0 and 7 are Sunday)")
        return number
    try:
        return _CRON_DAYS.index(token.lower())
    except ValueError:
        raise ValueError(f"unknown weekday {token!r}; expected SUN, MON, TUE, WED, THU, FRI or SAT") from None


def slot_id(fire_time: datetime) -> str:
    """The canonical text of a slot: UTC, whole seconds, RFC 3339 with "Z"."""
    if fire_time.tzinfo is None:
        raise ValueError("a fire time must carry its time zone")
    return fire_time.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_slot(text: str) -> datetime:
    """A slot back from its canonical text."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def to_envelope(function: str, trigger_name: str, fire_time: datetime, payload: Any) -> Envelope:
    """The envelope of one fired slot: id and time are the scheduled fire time, data the payload."""
    stamp = slot_id(fire_time)
    return Envelope(
        id=stamp,
        source=f"timer://{function}/{trigger_name}",
        type=EVENT_TYPE,
        function=function,
        trigger=TRIGGER,
        data=payload,
        time=stamp,
    )


def next_slot(schedule: CronTrigger, after: datetime) -> datetime | None:
    """The first slot strictly after `after`, in UTC; None once the schedule has ended."""
    # No previous fire time is passed: APScheduler then starts from `now`, rounded up to the
    # second, which with the microsecond makes "strictly after". Arithmetic stays in UTC.
    fire = schedule.get_next_fire_time(None, after.astimezone(UTC) + timedelta(microseconds=1))
    return fire.astimezone(UTC) if fire is not None else None


def last_slot(schedule: CronTrigger, after: datetime, until: datetime) -> datetime | None:
    """The latest slot in (after, until], or None; bisects, so a year-long gap costs ~25 steps."""
    low = next_slot(schedule, after)
    if low is None or low > until:
        return None
    high = until  # invariant: `low` is a slot <= until, and no slot lies in (high, until]
    while True:
        following = next_slot(schedule, low)
        if following is None or following > until:
            return low
        middle = low + (high - low) / 2
        probe = next_slot(schedule, middle)
        if probe is not None and probe <= until:
            low = probe
        else:
            high = middle


# --------------------------------------------------------------------------- the trigger


@dataclass(slots=True, eq=False)
class _Job:
    """One timer trigger of one function, and what it has done."""

    function: str
    config: TimerConfig
    schedule: CronTrigger
    last: datetime | None = None  # the latest slot handled (fired or deliberately skipped)
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


class TimerTrigger:
    """Fires every `type = "timer"` trigger of the manifest on its cron schedule.

    APScheduler's CronTrigger does the calendar arithmetic (fields, time zones, DST); the
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
        self._jobs = _jobs(manifest)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        """Catch up where asked, then start one schedule task per trigger."""
        if self._tasks:
            return
        self._stopping = asyncio.Event()
        now = _utcnow()
        for job in self._jobs:
            job.last = self._remembered(job)
            if job.config.catch_up and job.last is not None:
                missed = last_slot(job.schedule, job.last, now)
                if missed is not None:
                    logger.info("timer %s: catching up %s, the last slot missed while down", job.label, slot_id(missed))
                    await self._fire(job, missed)
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
        """For GET /healthz: each schedule with its next and last slot and counters."""
        return {
            "Status": "running" if self._tasks else "stopped",
            "Schedules": [
                {
                    "Function": job.function,
                    "Trigger": job.name,
                    "Cron": job.config.cron,
                    "Timezone": job.config.timezone,
                    "CatchUp": job.config.catch_up,
                    "Overlap": job.config.overlap,
                    "NextFire": slot_id(job.next) if job.next and self._tasks else None,
                    "LastFire": slot_id(job.last) if job.last else None,
                    "Fired": job.fired,
                    "Duplicates": job.duplicates,
                    "Skipped": job.skipped,
                    "Errors": job.errors,
                    "Failure": job.failure,
                }
                for job in self._jobs
            ],
        }

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
        """Hand one slot to the engine; False once the engine is shutting down."""
        if not job.config.overlap and self._engine.active(job.function, job.source) > 0:
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
        except Exception:
            logger.exception("timer %s: slot %s could not be accepted", job.label, envelope.id)
            job.errors += 1
            return True
        if accepted.created:
            job.fired += 1
            logger.info("timer %s: slot %s accepted as %s", job.label, envelope.id, accepted.request_id)
        else:  # another server (or a previous life) accepted this slot already
            job.duplicates += 1
        await self._remember(job, slot)
        return True

    def _remembered(self, job: _Job) -> datetime | None:
        text = self._engine.get_state(job.key)
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
        except Exception:
            logger.exception("timer %s: could not remember slot %s", job.label, slot_id(slot))


def _jobs(manifest: Manifest) -> list[_Job]:
    """One job per timer trigger; ManifestError listing every bad one."""
    jobs: list[_Job] = []
    problems: list[str] = []
    for function, config in manifest.functions.items():
        for index, trigger in enumerate(config.triggers):
            if not isinstance(trigger, TimerConfig):
                continue
            where = f"functions.{function}.triggers[{index}] (timer {trigger.name!r})"
            if not _NAME.match(trigger.name):
                problems.append(
                    f"{where}: name: must start with a letter and hold only letters, digits, "
                    "'_' or '-' (at most 60)"
                )
                continue
            try:
                parse_timezone(trigger.timezone)
            except ValueError as exc:
                problems.append(f"{where}: timezone: {exc}")
                continue
            try:
                schedule = parse_cron(trigger.cron, trigger.timezone)
            except ValueError as exc:
                problems.append(f"{where}: cron {trigger.cron!r}: {exc}")
                continue
            jobs.append(_Job(function=function, config=trigger, schedule=schedule))
    if problems:
        raise ManifestError("\n".join(problems))
    return jobs


def _utcnow() -> datetime:
    return datetime.now(UTC)
