"""S3 -> SQS: long-poll one queue with aiobotocore, delete messages only once accepted."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from eventrun.engine.errors import ShuttingDown

from .parser import BadNotification, parse_body
from .webhook import Ingest

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_MESSAGES = 10  # the most SQS hands out per receive (and deletes per batch)
ANSWER_GRACE = 5.0  # seconds past its long poll a receive may take to answer before the queue shows as unreachable
_NETWORK_ERRORS = (BotoCoreError, ClientError, aiohttp.ClientError, OSError, asyncio.TimeoutError)


class _Stopped(Exception):
    """stop() was called while waiting."""


class SqsPoller:
    """Receives S3 notifications from one SQS queue until stopped; survives the queue being away."""

    def __init__(
        self,
        queue_url: str,
        ingest: Ingest,
        counters: collections.Counter[str],
        *,
        region: str,
        access_key_id: str = "",
        secret_access_key: str = "",
        wait_time_seconds: int = 20,
        backoff: tuple[float, float] = (1.0, 30.0),
        stop_grace: float = 10.0,
    ) -> None:
        self._queue_url = queue_url
        # SQS lives wherever the queue URL points (AWS, moto, LocalStack), never at [s3]
        # endpoint_url, which may well be a MinIO that has no SQS.
        parts = urlsplit(queue_url)
        self._endpoint = f"{parts.scheme}://{parts.netloc}"
        self._region = region
        self._access_key_id = access_key_id or None
        self._secret_access_key = secret_access_key or None
        self._wait = wait_time_seconds
        self._backoff_first, self._backoff_max = backoff
        self._stop_grace = stop_grace
        self._ingest = ingest
        self._counters = counters
        self._client: Any = None
        self._client_stack: contextlib.AsyncExitStack | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.state = "off"

    async def start(self) -> None:
        """Start polling in the background; returns at once."""
        if self._task is not None:
            return
        self._stopping.clear()
        self._set_state("starting")
        self._task = asyncio.create_task(self._run(), name="eventrun-s3-sqs")

    async def stop(self) -> None:
        """Stop receiving, finish the batch in hand (accept, then delete), close the client."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=self._stop_grace)
            if not done:
                logger.warning("SQS poller did not finish its batch within %ss; cancelling it", self._stop_grace)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._close_client()
        if self.state != "off":
            self._set_state("off")

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self._backoff_first
        try:
            while not self._stopping.is_set():
                try:
                    await self._poll_once()
                except _Stopped:
                    break
                except ShuttingDown:
                    break  # what was received stays in the queue and comes back after restart
                except ClientError as exc:
                    self._set_state(_answered_with(exc))
                except _NETWORK_ERRORS as exc:
                    self._set_state(f"unreachable: {_describe(exc)}")
                except Exception as exc:
                    logger.exception("SQS poller: handling a batch failed; its messages stay in the queue")
                    self._set_state(f"failing: {_describe(exc)}")
                else:
                    delay = self._backoff_first
                    continue
                # Start over with a fresh client after a pause; undeleted messages come back
                # after the queue's visibility timeout and are deduplicated on their envelope id.
                await self._close_client()
                try:
                    await self._until_stopped(asyncio.sleep(delay))
                except _Stopped:
                    break
                delay = min(delay * 2, self._backoff_max)
        finally:
            await self._close_client()

    async def _poll_once(self) -> None:
        client = await self._connect()
        response = await self._until_stopped(self._receive(client))
        self._set_state("polling")
        messages = response.get("Messages") or []
        if messages:
            # Not interruptible by stop(): a received batch is accepted and deleted as a whole.
            await self._handle(client, messages)

    async def _receive(self, client: Any) -> dict[str, Any]:
        """One long poll. A queue that does not answer it in time shows as unreachable while it
        is still waited for: the client gives up only after its read timeout, twice."""
        receive = asyncio.ensure_future(
            client.receive_message(QueueUrl=self._queue_url, WaitTimeSeconds=self._wait, MaxNumberOfMessages=MAX_MESSAGES)
        )
        try:
            late = self._wait + ANSWER_GRACE
            done, _ = await asyncio.wait({receive}, timeout=late)
            if not done:
                why = f"no answer to a receive in {late:g}s (its long poll is {self._wait}s)"
                self._set_state(f"unreachable: {why}", retrying=False)
            return await receive  # type: ignore[no-any-return]
        finally:
            if not receive.done():
                receive.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await receive

    async def _handle(self, client: Any, messages: list[dict[str, Any]]) -> None:
        records: list[dict[str, Any]] = []
        for message in messages:
            body = message.get("Body") or ""
            passed_over: list[str] = []
            try:
                found = parse_body(body, passed_over=passed_over)
            except BadNotification as exc:
                # Deleted rather than left for a redrive policy: it can never become a valid
                # notification, and without a dead-letter queue it would come back forever.
                self._counters["bad"] += 1
                logger.warning(
                    "SQS message %s is not an S3 notification (%s); deleting it. Body: %.300s",
                    message.get("MessageId"),
                    exc,
                    body,
                )
                continue
            if passed_over:  # (the message's good records are taken all the same)
                self._counters["bad"] += len(passed_over)
                logger.warning(
                    "SQS message %s: %d of its records are not S3 notification records (%s); the others are taken",
                    message.get("MessageId"), len(passed_over), "; ".join(passed_over)[:300],
                )
            if not found and not passed_over:
                self._counters["skipped"] += 1
                logger.info("SQS message %s holds no records (s3:TestEvent); deleting it", message.get("MessageId"))
            records.extend(found)
        if records:
            await self._ingest(records)  # raises -> nothing is deleted
        await self._delete(client, messages)

    async def _delete(self, client: Any, messages: list[dict[str, Any]]) -> None:
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
        response = await client.delete_message_batch(QueueUrl=self._queue_url, Entries=entries)
        for failed in response.get("Failed") or []:
            # Harmless: the message comes back and its envelopes are known already.
            logger.warning("SQS: could not delete message %s: %s", failed.get("Id"), failed.get("Message"))

    # -- helpers ---------------------------------------------------------------------------

    async def _until_stopped(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable` unless stop() comes first; then cancel it and raise _Stopped."""
        work = asyncio.ensure_future(awaitable)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
        if work.cancelled():
            raise _Stopped()
        return work.result()

    async def _connect(self) -> Any:
        if self._client is None:
            stack = contextlib.AsyncExitStack()
            config = AioConfig(
                connect_timeout=10,
                read_timeout=self._wait + 10,  # above the long poll
                retries={"mode": "standard", "max_attempts": 2},  # the loop does the backing off
            )
            self._client = await stack.enter_async_context(
                get_session().create_client(
                    "sqs",
                    region_name=self._region,
                    endpoint_url=self._endpoint,
                    aws_access_key_id=self._access_key_id,
                    aws_secret_access_key=self._secret_access_key,
                    config=config,
                )
            )
            self._client_stack = stack
        return self._client

    async def _close_client(self) -> None:
        stack, self._client_stack, self._client = self._client_stack, None, None
        if stack is not None:
            try:
                await stack.aclose()
            except Exception:
                logger.debug("closing the SQS client failed", exc_info=True)

    def _set_state(self, state: str, *, retrying: bool = True) -> None:
        if state == self.state:
            return
        if state.startswith(("unreachable", "refused", "failing")):
            then = "retrying with backoff" if retrying else "still waiting for it"
            logger.warning("SQS %s: %s; %s", self._queue_url, state, then)
        else:
            logger.info("SQS %s: %s", self._queue_url, state)
        self.state = state


def _answered_with(exc: ClientError) -> str:
    """The state for a queue that answered a request with an error: `refused` when the request
    was (4xx: wrong credentials, no such queue, no permission), else `unreachable`."""
    error = exc.response.get("Error") or {}
    status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if not isinstance(status, int) or not 400 <= status < 500:
        return f"unreachable: {_describe(exc)}"
    code, message = error.get("Code") or "", " ".join(str(error.get("Message") or "").split())
    return f"refused: {code or 'HTTP ' + str(status)}" + (f": {message[:200]}" if message else "") + f" (HTTP {status})"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
