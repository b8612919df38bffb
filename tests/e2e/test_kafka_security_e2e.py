"""The kafka trigger over TLS and SASL, end to end: records through `eventrun serve` into runs.

Clients reach the broker (Tansu) through a relay that terminates TLS with a real certificate and
can answer the SASL login, PLAIN or SCRAM (see kafka_relay.py for why Tansu cannot do either
here). The certificates come from a test CA made for each test.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from kafka_relay import Relay
from kafka_service import ENV, TansuBroker, free_port, unique, wait_until_answering

pytestmark = pytest.mark.e2e

USERS = {"alice": "wonderland"}
HANDLERS = Path(__file__).parent / "handlers"
ENDED = {"FINISHED", "FAILED", "TIMED_OUT", "ABORTED"}


@dataclass
class SecuredBroker:
    """A Tansu broker that clients reach only through a TLS relay, and the files a client needs."""

    relay: Relay
    folder: Path
    ca: trustme.CA
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.relay.port}"

    def client_options(self) -> dict[str, Any]:
        """aiokafka keywords for the test's own clients (producer, admin)."""
        context = ssl.create_default_context(cafile=str(self.files["ca"]))
        context.load_cert_chain(self.files["client_cert"], self.files["client_key"])
        options: dict[str, Any] = {"bootstrap_servers": self.bootstrap, "ssl_context": context}
        if self.relay.users is None:
            return {**options, "security_protocol": "SSL"}
        user, password = next(iter(USERS.items()))
        return {
            **options, "security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN",
            "sasl_plain_username": user, "sasl_plain_password": password,
        }

    async def ready(self, broker: TansuBroker) -> None:
        """Wait until the broker answers a metadata request through the relay."""
        await wait_until_answering(broker, **self.client_options())

    async def produce_json(self, topic: str, values: list[Any]) -> None:
        admin = AIOKafkaAdminClient(**self.client_options())
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(**self.client_options(), acks="all")
        await producer.start()
        try:
            for i, value in enumerate(values):
                await producer.send_and_wait(topic, json.dumps(value).encode(), key=f"k{i}".encode())
        finally:
            await producer.stop()


async def secured(tmp_path: Path, *, client_certificate: bool, users: dict[str, str] | None) -> SecuredBroker:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("eventrun-client", common_name="eventrun-client")
    stranger = trustme.CA()  # signed nothing of this broker's
    folder = tmp_path / "tls"
    folder.mkdir()
    files = {
        "ca": folder / "ca.pem",
        "other_ca": folder / "other-ca.pem",
        "client_cert": folder / "client.pem",
        "client_key": folder / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    stranger.cert_pem.write_to_path(str(files["other_ca"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.configure_cert(context)
    if client_certificate:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    relay = Relay(free_port(), free_port(), tls=context, users=users)
    return SecuredBroker(relay, folder, ca, files)


@pytest.fixture
async def broker_behind(tmp_path: Path) -> AsyncIterator[Any]:
    """Factory: `await broker_behind(client_certificate=..., users=...)` -> a started SecuredBroker."""
    if os.environ.get(ENV, "").strip():
        pytest.skip(f"needs a Tansu broker started by the test (it advertises the relay's port), not {ENV}")
    made: list[tuple[TansuBroker, Relay]] = []

    async def make(*, client_certificate: bool = False, users: dict[str, str] | None = None) -> SecuredBroker:
        setup = await secured(tmp_path, client_certificate=client_certificate, users=users)
        broker = TansuBroker(setup.relay.target, tmp_path, advertised_port=setup.relay.port)
        broker.spawn()
        made.append((broker, setup.relay))
        await setup.relay.start()
        await setup.ready(broker)
        return setup

    yield make
    for broker, relay in made:
        await relay.stop()
        broker.stop()


def kafka_function(topic: str) -> dict[str, Any]:
    return {
        "handler": f"{HANDLERS / 'kafka_echo.py'}:main_handler",
        "triggers": [{"type": "kafka", "topic": topic, "starting_position": "earliest"}],
    }


async def finished_values(api: Any, count: int, log: Any, poll_until: Any) -> list[Any]:
    """The record values of `count` ended runs of "fn", once there are that many, all FINISHED."""

    async def ended() -> list[dict[str, Any]] | None:
        runs = (await api.list(function="fn", limit=100)).json["Invocations"]
        return runs if len(runs) >= count and all(run["Status"] in ENDED for run in runs) else None

    runs = await poll_until(ended, 40, f"{count} ended runs of fn\n{log()}")
    assert [run["Status"] for run in runs] == ["FINISHED"] * count, runs
    return sorted((run["Result"]["event"]["data"]["value"] for run in runs), key=json.dumps)


async def test_records_arrive_over_mutual_tls(
    broker_behind: Any, eventrun_server: Any, http: aiohttp.ClientSession, poll_until: Any
) -> None:
    kafka = await broker_behind(client_certificate=True)
    topic = unique("tls")
    await kafka.produce_json(topic, [{"order": i} for i in range(3)])
    shown_before = len(kafka.relay.client_subjects)  # by the test's own clients so far
    tls = {
        "bootstrap_servers": kafka.bootstrap,
        "security_protocol": "SSL",
        "ssl_cafile": str(kafka.files["ca"]),
        # Relative to the manifest's folder, as handler paths are.
        "ssl_certfile": os.path.relpath(kafka.files["client_cert"], kafka.folder.parent / "server0"),
        "ssl_keyfile": os.path.relpath(kafka.files["client_key"], kafka.folder.parent / "server0"),
    }
    server = eventrun_server({"fn": kafka_function(topic)}, extra={"kafka": tls})
    api = server.client(http)
    assert await finished_values(api, 3, server.log_text, poll_until) == [{"order": 0}, {"order": 1}, {"order": 2}]
    # The relay requires a client certificate: eventrun's connections showed the one configured.
    eventrun_shown = kafka.relay.client_subjects[shown_before:]
    assert eventrun_shown and set(eventrun_shown) == {"eventrun-client"}, kafka.relay.client_subjects


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "scram-sha-512"])
async def test_records_arrive_over_sasl_ssl(
    broker_behind: Any, eventrun_server: Any, http: aiohttp.ClientSession, poll_until: Any, mechanism: str
) -> None:
    kafka = await broker_behind(users=USERS)
    topic = unique("sasl")
    await kafka.produce_json(topic, [{"order": i} for i in range(3)])
    logins_before = len(kafka.relay.logins)
    sasl = {
        "bootstrap_servers": kafka.bootstrap,
        "security_protocol": "sasl_ssl",  # any case
        "ssl_cafile": str(kafka.files["ca"]),
        "sasl_mechanism": mechanism,
        "sasl_username": "alice",
        "sasl_password": USERS["alice"],
    }
    server = eventrun_server({"fn": kafka_function(topic)}, extra={"kafka": sasl})
    api = server.client(http)
    assert await finished_values(api, 3, server.log_text, poll_until) == [{"order": 0}, {"order": 1}, {"order": 2}]
    assert kafka.relay.refused == []
    assert len(kafka.relay.logins) > logins_before, "eventrun's connections did not log in"
    assert USERS["alice"] not in server.log_text()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("untrusted broker", "CERTIFICATE_VERIFY_FAILED"),
        ("wrong password", "Authentication failed for user alice"),
        ("wrong SCRAM password", "Authentication failed for user alice"),
    ],
)
async def test_a_refused_connection_says_why_and_the_server_keeps_serving(
    broker_behind: Any,
    eventrun_server: Any,
    http: aiohttp.ClientSession,
    handler: Any,
    poll_until: Any,
    case: str,
    expected: str,
) -> None:
    kafka = await broker_behind(users=USERS)
    topic = unique("refused")
    await kafka.produce_json(topic, [{"order": 1}])
    settings: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap,
        "security_protocol": "SASL_SSL",
        "ssl_cafile": str(kafka.files["ca"]),
        "sasl_username": "alice",
        "sasl_password": USERS["alice"],
    }
    if case == "untrusted broker":
        settings["ssl_cafile"] = str(kafka.files["other_ca"])
    else:
        settings["sasl_password"] = "not-the-password"
        if "SCRAM" in case:
            settings["sasl_mechanism"] = "SCRAM-SHA-512"
    functions = {"fn": kafka_function(topic), "echo": {"handler": handler("quick")}}
    server = eventrun_server(functions, extra={"kafka": settings})
    api = server.client(http)

    async def state() -> str | None:
        health = (await api.request("GET", "/healthz")).json
        text = health["Triggers"]["kafka"][f"fn:{topic}"]["State"]
        return text if text.startswith("broker unreachable") and expected in text else None

    shown = await poll_until(state, 20, f"a /healthz state naming {expected!r}\n{server.log_text()}")
    assert kafka.bootstrap in shown, shown
    assert expected in server.log_text(), server.log_text()  # the log line says the same
    # Nothing got in, and the rest of the server is unaffected.
    assert (await api.list(function="fn")).json["Invocations"] == []
    request_id = await api.accepted("echo", {"still": "serving"})
    assert (await api.wait_ended(request_id))["Status"] == "FINISHED"
