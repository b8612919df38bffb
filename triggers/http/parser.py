"""Pure conversion of one HTTP invocation request into an envelope: no I/O, no aiohttp."""

from __future__ import annotations

import base64
import re
from typing import Any

from eventrun.engine.envelope import JSON_DEPTH, Envelope, JSONDecodeError, loads, loads_exact, nests_deeper, new_id
from eventrun.engine.errors import InvalidParameter

MAX_IDEMPOTENCY_KEY = 256
_JSON_TYPE = re.compile(r"^application/([\w.+-]+\+)?json$")
# curl -d sends JSON with this type unless told otherwise; accept the body if it parses.
_MAYBE_JSON_TYPES = ("", "application/x-www-form-urlencoded")
# orjson writes at most JSON_DEPTH levels of nesting and the envelope is one of them: data nested
# deeper parses (orjson reads 1024) but could never be stored.
MAX_NESTING = JSON_DEPTH - 1


def to_envelope(function: str, body: bytes, content_type: str | None, idempotency_key: str | None) -> Envelope:
    """The envelope for one HTTP invocation; raises InvalidParameter for a malformed JSON body or header."""
    _check_utf8("Content-Type", content_type)
    key = checked_key(idempotency_key)
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    data: Any = None
    if _JSON_TYPE.match(media_type):
        if body.strip():
            try:
                data = loads_exact(body, loads(body))  # (an integer beyond 64 bits keeps every digit)
            except JSONDecodeError as exc:
                raise InvalidParameter(f"request body is not valid JSON: {_not_utf8(body) or exc}") from None
            if nests_deeper(data, MAX_NESTING, body):
                raise InvalidParameter(f"request body nests deeper than {MAX_NESTING} levels")
    elif body:
        data = _parse_or_wrap(body, media_type, content_type)
    return Envelope(
        id=key or new_id(), source=f"/http/{function}", type="eventrun.http.request",
        function=function, trigger="http", data=data,
    )


def checked_key(idempotency_key: str | None) -> str:
    """An Idempotency-Key header's key ("" for none); raises InvalidParameter for one no event id can be."""
    _check_utf8("Idempotency-Key", idempotency_key)
    key = (idempotency_key or "").strip()
    if len(key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidParameter(f"Idempotency-Key header: at most {MAX_IDEMPOTENCY_KEY} characters, got {len(key)}")
    return key


def _check_utf8(name: str, value: str | None) -> None:
    # aiohttp keeps header bytes that are not UTF-8 as lone surrogates, which no JSON can hold.
    try:
        (value or "").encode()
    except UnicodeEncodeError:
        raise InvalidParameter(f"{name} header: not valid UTF-8") from None


def _not_utf8(body: bytes) -> str | None:
    """Why a body is not UTF-8, which JSON is read in whatever charset its Content-Type names
    (orjson says "surrogates not allowed" of a Latin-1 or UTF-16 body); None if it is."""
    try:
        body.decode()
    except UnicodeDecodeError as exc:
        return f"it is not UTF-8 (at byte {exc.start}: {exc.reason}); send JSON in UTF-8, whatever the charset"
    return None


def _parse_or_wrap(body: bytes, media_type: str, content_type: str | None) -> Any:
    if media_type in _MAYBE_JSON_TYPES:
        try:
            data = loads_exact(body, loads(body))
        except JSONDecodeError:
            pass
        else:
            if not nests_deeper(data, MAX_NESTING, body):
                return data
    return {"body_base64": base64.b64encode(body).decode("ascii"), "content_type": content_type}
