"""The server's order of start: what a probe sees while the triggers are still starting."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from eventrun import app
from eventrun.engine.manifest import FunctionConfig, KafkaConfig, Manifest, ServerConfig
from eventrun.triggers.kafka import KafkaTrigger
from kafka_service import free_port


async def test_healthz_reports_every_trigger_of_the_manifest_while_they_are_still_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A trigger's start may wait on the store (the Kafka consumers load their marks); the
    # listener is open by then, and its first answer must already name the trigger.
    started = asyncio.Event()
    release = asyncio.Event()
    real_start = KafkaTrigger.start

    async def slow_start(self: KafkaTrigger) -> None:
        started.set()
        await release.wait()
        await real_start(self)

    monkeypatch.setattr(KafkaTrigger, "start", slow_start)
    port = free_port()
    manifest = Manifest(
        server=ServerConfig(port=port, data_dir=tmp_path / "data"),
        kafka=KafkaConfig(bootstrap_servers=f"127.0.0.1:{free_port()}"),
        functions={
            "fn": FunctionConfig(handler="f.py:main", triggers=({"type": "kafka", "topic": "orders"},)),
        },
    )
    stop = asyncio.Event()
    serving = asyncio.create_task(app.run(manifest, stop))
    try:
        await asyncio.wait_for(started.wait(), 30)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as reply:
                assert reply.status == 200
                health = await reply.json()
        assert health["Triggers"]["kafka"] == {
            "fn:orders": {
                "State": "stopped",
                "Function": "fn",
                "Topic": "orders",
                "GroupId": "eventrun-fn",
                "Partitions": [],
                "Accepted": 0,
            }
        }
    finally:
        release.set()
        stop.set()
        await asyncio.wait_for(serving, 60)
