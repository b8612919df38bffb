"""Counters and run-duration histograms, written out as Prometheus text."""

from __future__ import annotations

import bisect
import collections
import itertools
import time
from typing import Any, Callable, Iterable

from .api import Status
from .envelope import now_rfc3339

BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0)


def family(name: str, kind: str, help_text: str) -> list[str]:
    """The HELP and TYPE lines that open a metric family."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def labels(**values: str) -> str:
    """`{a="x",b="y"}`, each value escaped as the Prometheus text format wants."""
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in values.items()) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """What the engine counts, per function."""

    def __init__(self) -> None:
        self.accepted: collections.Counter[str] = collections.Counter()
        self.duplicates: collections.Counter[str] = collections.Counter()
        self.throttled: collections.Counter[str] = collections.Counter()
        self.ended: collections.Counter[tuple[str, str]] = collections.Counter()
        self._buckets: dict[str, list[int]] = {}
        self._sums: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.started = time.time()  # the counters count from here (process_start_time_seconds)

    def observe_end(self, function: str, status: Status, seconds: float | None) -> None:
        """Count one ended run and its duration."""
        self.ended[(function, status.value)] += 1
        if seconds is None:
            return
        counts = self._buckets.setdefault(function, [0] * (len(BUCKETS) + 1))
        counts[bisect.bisect_left(BUCKETS, seconds)] += 1  # its own bucket: render() adds them up
        self._sums[function] += seconds

    def render(self, functions: Iterable[str], gauges: Callable[[str], tuple[int, int]]) -> str:
        """Prometheus text exposition; `gauges(fn)` gives (queued, running)."""
        names = sorted(functions)
        out: list[str] = []
        out += family("eventrun_accepted_total", "counter", "Events accepted (new RequestIds).")
        out += [f'eventrun_accepted_total{{function="{f}"}} {self.accepted[f]}' for f in names]
        out += family("eventrun_duplicates_total", "counter", "Events handed in again and answered with the known RequestId.")
        out += [f'eventrun_duplicates_total{{function="{f}"}} {self.duplicates[f]}' for f in names]
        out += family("eventrun_throttled_total", "counter", "Events refused by qps_limit.")
        out += [f'eventrun_throttled_total{{function="{f}"}} {self.throttled[f]}' for f in names]
        out += family("eventrun_runs_total", "counter", "Runs ended, by final status.")
        # (with the functions no longer in the manifest whose queued runs a start ended)
        for f in sorted({*names, *(function for function, _ in self.ended)}):
            for status in Status:
                if status.ended:
                    out.append(f'eventrun_runs_total{{function="{f}",status="{status.value}"}} {self.ended[(f, status.value)]}')
        # Each family's samples follow its own TYPE line, as the text format requires.
        now = {f: gauges(f) for f in names}
        out += family("eventrun_queued", "gauge", "Runs waiting for a slot.")
        out += [f'eventrun_queued{{function="{f}"}} {now[f][0]}' for f in names]
        out += family("eventrun_running", "gauge", "Runs going on.")
        out += [f'eventrun_running{{function="{f}"}} {now[f][1]}' for f in names]
        out += family("eventrun_run_duration_seconds", "histogram", "Duration of ended runs.")
        for f in names:
            counts = list(itertools.accumulate(self._buckets.get(f, [0] * (len(BUCKETS) + 1))))
            for bound, count in zip(BUCKETS, counts):
                out.append(f'eventrun_run_duration_seconds_bucket{{function="{f}",le="{bound:g}"}} {count}')
            out.append(f'eventrun_run_duration_seconds_bucket{{function="{f}",le="+Inf"}} {counts[-1]}')
            out.append(f'eventrun_run_duration_seconds_sum{{function="{f}"}} {self._sums[f]:.6f}')
            out.append(f'eventrun_run_duration_seconds_count{{function="{f}"}} {counts[-1]}')
        out += family("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.")
        out.append(f"process_start_time_seconds {self.started:.3f}")
        return "\n".join(out) + "\n"


class StoreWrites:
    """Whether the store takes writes now, and the writes it refused since the start.

    A write is refused when the store cannot take it (SQLite: a full disk, an I/O error, a
    read-only file; PostgreSQL: the database unreachable, full or read-only), and nothing of it
    is recorded; the store is writable again at the next commit that goes through.
    """

    def __init__(self) -> None:
        self.refused_total = 0
        self.unanswered_total = 0  # writes a SQLite store's writer process died (or stalled) holding
        self.reason: str | None = None  # why the latest write was refused, while they are
        self.refused_since: str | None = None  # when the first of the ongoing refusals came (RFC 3339)

    @property
    def writable(self) -> bool:
        """False from a refused write until the next commit that goes through."""
        return self.reason is None

    def refused(self, reason: str, writes: int = 1) -> None:
        """The store refused `writes` writes (one commit's, or one call's) for `reason`."""
        self.refused_total += writes
        self._not_writable(reason)

    def unanswered(self, reason: str, writes: int) -> None:
        """The writer process went (it died, or was killed for answering nothing) holding `writes`
        writes, which may or may not have been committed; no write goes through until a new one
        commits."""
        self.unanswered_total += writes
        self._not_writable(reason)

    def _not_writable(self, reason: str) -> None:
        if self.reason is None:
            self.refused_since = now_rfc3339()
        self.reason = reason

    def went_through(self) -> None:
        """A commit went through: the store takes writes (again)."""
        if self.reason is not None:
            self.reason = self.refused_since = None

    def view(self) -> dict[str, Any]:
        """The store's writes, for /healthz."""
        return {
            "Writes": "ok" if self.reason is None else f"refused: {self.reason}",
            "RefusedSince": self.refused_since,
            "WritesRefused": self.refused_total,
            "WritesUnanswered": self.unanswered_total,
        }

    def render(self) -> str:
        """Prometheus text of the store's writes."""
        out = family("eventrun_store_writes_refused_total", "counter", "Writes the store refused (nothing of them recorded).")
        out.append(f"eventrun_store_writes_refused_total {self.refused_total}")
        out += family(
            "eventrun_store_writes_unanswered_total", "counter",
            "Writes the store's writer process died or stalled holding (SQLite; each may or may not be recorded).",
        )
        out.append(f"eventrun_store_writes_unanswered_total {self.unanswered_total}")
        out += family("eventrun_store_writable", "gauge", "1 while the store takes writes, 0 from a refused write until the next commit.")
        out.append(f"eventrun_store_writable {int(self.writable)}")
        return "\n".join(out) + "\n"
