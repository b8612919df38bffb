"""Text from runs and servers as eventrun shows it: on one line, nothing in it that acts."""

from __future__ import annotations

import unicodedata

_UNSHOWN = frozenset({"Cc", "Cf", "Zl", "Zp"})
"""Unicode categories shown escaped: controls, invisible formats (bidi overrides, zero widths),
line and paragraph separators."""


def printable(text: str) -> str:
    """`text` on one line, its control characters (ESC, BEL, CR, line ends, C1 codes, ...) and
    invisible ones (U+202E, which turns the rest of a line around; U+2028) shown escaped, as
    `\\x1b` or `\\u202e`, so that text from a run or a server can neither add lines that pass for
    others nor drive or disguise the terminal it is printed on."""
    if text.isprintable():
        return text
    return "".join(
        char.encode("unicode_escape").decode("ascii") if unicodedata.category(char) in _UNSHOWN else char
        for char in text
    )


def log_to_stderr(level: int, source: str = "%(name)s") -> None:
    """Send this process's log to stderr, a line each: the time in UTC, as the runs' logs and the
    API give it (`2026-12-07T18:04:05.123Z`), the level, the source, the message."""
    import logging
    import time

    formatter = logging.Formatter(f"%(asctime)s.%(msecs)03dZ %(levelname)s {source}: %(message)s", "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler])
