"""What both stores share: an invocation from its row, list pages and cursors, the async-flag refusal."""

from __future__ import annotations

import base64
from typing import Any, Iterable, Sequence

from .api import Invocation, Status
from .envelope import loads
from .errors import InvalidParameter, ManifestError

COLUMNS = (
    "request_id, function, trigger, status, created_at, started_at, ended_at, "
    "duration_ms, result, error_type, error_message"
)
"""The columns invocation() reads, in its order (a store may add more after them)."""

COLUMNS_WITHOUT_RESULT = COLUMNS.replace(" result,", " NULL,")
"""COLUMNS with NULL in the result's place: what a list without results reads (never the result)."""

PAGE_BYTES = 8 * 1024 * 1024
"""What the results and error messages of one page of a list may hold together: a page ends
before the run that would take it past this (its first run always goes in), so a page costs at
most this, or its one run, whatever `limit` asks for; the cursor goes on from there."""


def invocation(row: Any) -> Invocation:
    """An Invocation from a row of COLUMNS (a tuple, or a record indexed the same way)."""
    return Invocation(
        request_id=row[0],
        function=row[1],
        trigger=row[2],
        status=Status(row[3]),
        created_at=row[4],
        started_at=row[5],
        ended_at=row[6],
        duration_ms=row[7],
        result=loads(bytes(row[8])) if row[8] is not None else None,
        error_type=row[9],
        error_message=row[10],
    )


def counts(rows: Any) -> dict[str, dict[str, int]]:
    """{function: {status: n}} from (function, status, n) rows, every status present."""
    out: dict[str, dict[str, int]] = {}
    for function, status, n in rows:
        out.setdefault(function, dict.fromkeys((s.value for s in Status), 0))[status] += int(n)
    return out


def page_length(sizes: Iterable[int], limit: int, budget: int) -> int:
    """How many runs of a list's page go in, given their sizes newest first (see PAGE_BYTES)."""
    held = taken = 0
    for size in sizes:
        held += size
        if taken == limit or (taken and held > budget):
            break
        taken += 1
    return taken


def first_id_of(millis: int) -> str:
    """The smallest RequestId of a Unix millisecond (a UUID version 7 begins with it)."""
    head = f"{millis:012x}"
    return f"{head[:8]}-{head[8:]}-0000-0000-000000000000"


def encode_cursor(kind: str, value: object) -> str:
    """An opaque cursor: where the next page starts, and which kind of store gave it out."""
    return base64.urlsafe_b64encode(f"{kind}:{value}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str, kind: str) -> str:
    """The value of a cursor of this kind; InvalidParameter for anything else."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        text = ""
    found, _, value = text.partition(":")
    if found != kind or not value:
        raise InvalidParameter(f"cursor {cursor!r} is not a cursor this server gave out")
    return value


def async_flag_flipped(flipped: Sequence[tuple[str, bool]]) -> ManifestError:
    """The refusal of a manifest that flips recorded functions' async_execution."""
    return ManifestError(
        "\n".join(
            f"functions.{name}.async_execution: function {name!r} was created with "
            f"async_execution = {str(was).lower()} and that can never change; "
            f"deploy it under a new name (e.g. '{name}-{'sync' if was else 'async'}') instead"
            for name, was in flipped
        )
    )
