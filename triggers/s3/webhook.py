"""POST /triggers/s3: the MinIO webhook target (and HEAD for older MinIO liveness probes)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import hdrs, web

from eventrun.engine.api import Accepted
from eventrun.engine.envelope import Envelope, dumps

from .parser import parse_body

logger = logging.getLogger(__name__)

PATH = "/triggers/s3"

Ingest = Callable[[Sequence[dict[str, Any]]], Awaitable[list[tuple[Envelope, Accepted]]]]
"""Route records to functions and accept them durably; the (envelope, answer) pairs."""

TOKEN_NOT_SET = (
    "the MinIO webhook is disabled because no token is configured: set webhook_token in the "
    "[s3] table (or EVENTRUN_S3__WEBHOOK_TOKEN) and the same one-word auth_token in MinIO"
)


def check_authorization(header: str | None, token: str) -> str | None:
    """Why an Authorization header is refused (None when it is `Bearer <token>`); constant time."""
    if not header:
        return "missing Authorization header; expected 'Bearer <webhook_token>'"
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return "Authorization header: expected 'Bearer <webhook_token>'"
    # surrogateescape: aiohttp keeps header bytes that are not UTF-8 as lone surrogates.
    if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode()):
        return "Authorization header: wrong webhook token"
    return None


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    # The gateway's error shape; built here because triggers do not import each other.
    body = dumps({"Error": {"Code": code, "Message": message}})
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


class Webhook:
    """The two routes MinIO talks to. Answers 2xx only once every matching record is durable."""

    def __init__(self, token: str, ingest: Ingest) -> None:
        self._token = token
        self._ingest = ingest
        self._refusing: str | None = None

    @property
    def enabled(self) -> bool:
        """False when no webhook_token is configured (every POST is then refused)."""
        return bool(self._token)

    def routes(self) -> list[web.RouteDef]:
        """POST and HEAD /triggers/s3, for the gateway's extra_routes."""
        return [web.post(PATH, self.post), web.head(PATH, self.head)]

    async def head(self, request: web.Request) -> web.Response:
        """Older MinIO releases probe the target with HEAD before sending; any answer means up."""
        return web.Response(status=200)

    async def post(self, request: web.Request) -> web.Response:
        """One MinIO event: {"EventName", "Key", "Records": [...]} -> {"Accepted": [...]}."""
        refusal = self._authorize(request)
        if refusal is not None:
            return refusal
        # A non-JSON or non-notification body raises BadNotification: the gateway answers 400.
        records = parse_body(await request.read())
        accepted = await self._ingest(records)
        return web.Response(
            body=dumps(
                {
                    "Accepted": [
                        {"FunctionName": envelope.function, "RequestId": answer.request_id}
                        for envelope, answer in accepted
                    ]
                }
            ),
            content_type="application/json",
        )

    def _authorize(self, request: web.Request) -> web.Response | None:
        if not self._token:
            self._note_refusal(TOKEN_NOT_SET)
            # 403: MinIO logs "please check if your auth token is correctly set" for it.
            return _error(403, "WebhookTokenNotSet", TOKEN_NOT_SET)
        reason = check_authorization(request.headers.get(hdrs.AUTHORIZATION), self._token)
        if reason is not None:
            self._note_refusal(reason)
            return _error(401, "Unauthorized", reason, {hdrs.WWW_AUTHENTICATE: 'Bearer realm="eventrun"'})
        if self._refusing is not None:
            logger.info("S3 webhook: requests are authorized again")
            self._refusing = None
        return None

    def _note_refusal(self, reason: str) -> None:
        # MinIO with a queue_dir retries every 3 s forever: log each change, not each retry.
        if reason != self._refusing:
            logger.warning("S3 webhook: refusing requests: %s", reason)
            self._refusing = reason


def _error_doc(description: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


OPENAPI_PATHS: dict[str, Any] = {
    PATH: {
        "post": {
            "summary": "MinIO webhook target: bucket notifications",
            "operationId": "s3Webhook",
            "description": "Each record goes to every function whose s3 trigger matches bucket, "
            "event and prefix/suffix. 200 once every matching record is durably accepted "
            "(records matching no function are answered 200 too).",
            "parameters": [
                {
                    "name": "Authorization",
                    "in": "header",
                    "required": True,
                    "description": "Bearer <webhook_token>",
                    "schema": {"type": "string"},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["Records"],
                            "properties": {"Records": {"type": "array", "items": {"type": "object"}}},
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "Accepted (one RequestId per matching function)",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["Accepted"],
                                "properties": {
                                    "Accepted": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "required": ["FunctionName", "RequestId"],
                                            "properties": {
                                                "FunctionName": {"type": "string"},
                                                "RequestId": {"type": "string"},
                                            },
                                        },
                                    }
                                },
                            }
                        }
                    },
                },
                "400": {"$ref": "#/components/responses/BadRequest"},
                "401": _error_doc("Missing or wrong token (code Unauthorized)"),
                "403": _error_doc("No webhook_token is configured (code WebhookTokenNotSet)"),
                "413": {"$ref": "#/components/responses/PayloadTooLarge"},
                "503": {"$ref": "#/components/responses/ShuttingDown"},
            },
        },
        "head": {
            "summary": "Liveness probe of older MinIO releases",
            "operationId": "s3WebhookProbe",
            "responses": {"200": {"description": "Up"}},
        },
    }
}
