"""The s3 trigger: MinIO webhook routes plus an optional S3 -> SQS poller, one routing table."""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from eventrun.engine.api import Accepted, Acceptor
from eventrun.engine.envelope import Envelope
from eventrun.engine.manifest import Manifest
from eventrun.engine.metrics import family

from .parser import parse_record, to_envelopes
from .sqs import SqsPoller
from .webhook import OPENAPI_PATHS, Webhook

logger = logging.getLogger(__name__)


class S3Trigger:
    """Bucket notifications in, envelopes out: POST /triggers/s3 and, if configured, an SQS queue."""

    def __init__(
        self,
        engine: Acceptor,
        manifest: Manifest,
        *,
        wait_time_seconds: int = 20,
        backoff: tuple[float, float] = (1.0, 30.0),
    ) -> None:
        self._engine = engine
        self._functions = dict(manifest.functions)
        self.counters: collections.Counter[str] = collections.Counter()
        config = manifest.s3
        self._webhook = Webhook(config.webhook_token, self._ingest)
        self._poller = (
            SqsPoller(
                config.sqs_queue_url,
                self._ingest,
                self.counters,
                region=config.region,
                access_key_id=config.access_key_id,
                secret_access_key=config.secret_access_key,
                wait_time_seconds=wait_time_seconds,
                backoff=backoff,
                stop_grace=manifest.server.shutdown_grace,
            )
            if config.sqs_queue_url
            else None
        )

    def routes(self) -> list[web.RouteDef]:
        """POST and HEAD /triggers/s3, to hand to the gateway as extra_routes."""
        return self._webhook.routes()

    def openapi_paths(self) -> dict[str, Any]:
        """The OpenAPI description of routes(), to hand to the gateway as openapi_paths."""
        return OPENAPI_PATHS

    async def start(self) -> None:
        """Start the SQS poller when [s3] sqs_queue_url is set (the webhook needs no start)."""
        if self._poller is not None:
            await self._poller.start()

    async def stop(self) -> None:
        """Stop polling, finish the batch in hand, close the SQS client. Idempotent."""
        if self._poller is not None:
            await self._poller.stop()

    async def __aenter__(self) -> S3Trigger:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def state(self) -> dict[str, Any]:
        """For /healthz: the SQS poller's state, whether the webhook is on, and counters."""
        return {
            "sqs": self._poller.state if self._poller is not None else "off",
            "webhook": "on" if self._webhook.enabled else "off (webhook_token not set)",
            **{name: self.counters[name] for name in _COUNTERS},
        }

    def metrics(self) -> str:
        """The counters, and whether the SQS poller is polling, as Prometheus text."""
        polling = self._poller is not None and self._poller.state == "polling"
        out = family("eventrun_s3_sqs_polling", "gauge", "1 while the SQS poller polls its queue, 0 otherwise (or off).")
        out.append(f"eventrun_s3_sqs_polling {int(polling)}")
        for name, help_text in _COUNTER_HELP.items():
            out += family(f"eventrun_s3_{name}_total", "counter", help_text)
            out.append(f"eventrun_s3_{name}_total {self.counters[name]}")
        return "\n".join(out) + "\n"

    async def _ingest(self, records: Sequence[dict[str, Any]]) -> list[tuple[Envelope, Accepted]]:
        """Route records to functions and accept them in one durable commit."""
        envelopes: list[Envelope] = []
        for record in records:
            found = to_envelopes(record, self._functions)
            if not found:
                self.counters["unmatched"] += 1
                if logger.isEnabledFor(logging.DEBUG):
                    event = parse_record(record)
                    logger.debug("%s s3://%s/%s matches no function", event.event_name, event.bucket, event.key)
            envelopes.extend(found)
        self.counters["records"] += len(records)
        if not envelopes:
            return []
        # Never throttled: a 429 would block MinIO's queue, and SQS would only redeliver.
        answers = await self._engine.accept_batch(envelopes)
        for answer in answers:
            self.counters["accepted" if answer.created else "duplicates"] += 1
        return list(zip(envelopes, answers))


_COUNTER_HELP = {
    "records": "Bucket notification records received, by webhook or SQS.",
    "accepted": "Events accepted from them (new RequestIds; a record may match several functions).",
    "duplicates": "Events from them already accepted before (redeliveries).",
    "unmatched": "Records that matched no function's s3 trigger.",
    "skipped": "SQS test events, skipped.",
    "bad": "SQS messages that were not bucket notifications, and records of a message that were not.",
}
_COUNTERS = tuple(_COUNTER_HELP)
