"""compose/: the docker-compose.yml, its manifest, the Dockerfile and the env file agree.

No Docker engine is needed: the files are read and cross-checked. (`.ci/run` also runs
`docker compose config` when a compose client is installed.)
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eventrun.engine.manifest import KafkaTrigger, Manifest, S3Trigger, TimerTrigger, load_manifest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read compose/docker-compose.yml")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
COMPOSE_FILE = COMPOSE / "docker-compose.yml"
MANIFEST = COMPOSE / "eventrun.toml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = COMPOSE / ".env.example"

WEBHOOK_ID = "EVENTRUN"
ARN = f"arn:minio:sqs::{WEBHOOK_ID}:webhook"
# Where the image puts the manifest (and compose mounts it); the Dockerfile's CMD reads it.
IMAGE_MANIFEST = "/app/compose/eventrun.toml"
_VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict) and isinstance(document.get("services"), dict), document
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def manifest() -> Iterator[Manifest]:
    # Checked as written: no EVENTRUN_* variable of the caller may override the file.
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("EVENTRUN_")]:
            patch.delenv(name)
        yield load_manifest(MANIFEST)


def env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping (compose allows a list of NAME=value too)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {str(k): str(v) for k, v in raw.items()}


def script(service: dict[str, Any]) -> str:
    """A service's entrypoint and command as one shell text."""
    parts: list[str] = []
    for key in ("entrypoint", "command"):
        value = service.get(key) or []
        parts.extend([value] if isinstance(value, str) else [str(v) for v in value])
    return "\n".join(parts)


def triggers(manifest: Manifest, kind: type) -> list[tuple[str, Any]]:
    return [(name, t) for name, f in manifest.functions.items() for t in f.triggers if isinstance(t, kind)]


# --------------------------------------------------------------------------- the services


def test_every_service_is_there(services: dict[str, Any]) -> None:
    assert set(services) >= {"kafka", "kafka-setup", "minio", "minio-setup", "eventrun"}, sorted(services)


def test_long_running_services_have_healthchecks(services: dict[str, Any]) -> None:
    for name in ("kafka", "minio", "eventrun"):
        check = services[name].get("healthcheck")
        assert isinstance(check, dict) and check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), name


def test_eventrun_comes_up_last(services: dict[str, Any]) -> None:
    depends = services["eventrun"]["depends_on"]
    assert isinstance(depends, dict), "eventrun's depends_on needs conditions, not a bare list"
    assert depends == {
        "kafka": {"condition": "service_healthy"},
        "kafka-setup": {"condition": "service_completed_successfully"},
        "minio": {"condition": "service_healthy"},
        "minio-setup": {"condition": "service_completed_successfully"},
    }
    for job, server in (("kafka-setup", "kafka"), ("minio-setup", "minio")):
        assert services[job]["depends_on"] == {server: {"condition": "service_healthy"}}, job
        assert services[job].get("restart", "no") == "no", f"{job} is a one-shot job"


def test_eventrun_is_built_from_the_dockerfile(services: dict[str, Any]) -> None:
    build = services["eventrun"]["build"]
    context = (COMPOSE / build["context"]).resolve()
    assert context == ROOT
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE


# --------------------------------------------------------------------------- MinIO -> eventrun


def test_minio_webhook_points_at_eventrun_with_a_queue_dir(services: dict[str, Any], manifest: Manifest) -> None:
    minio = env(services["minio"])
    prefix = "MINIO_NOTIFY_WEBHOOK_"
    assert minio[f"{prefix}ENABLE_{WEBHOOK_ID}"] == "on"
    assert minio[f"{prefix}ENDPOINT_{WEBHOOK_ID}"] == f"http://eventrun:{manifest.server.port}/triggers/s3"
    queue_dir = minio[f"{prefix}QUEUE_DIR_{WEBHOOK_ID}"]
    assert queue_dir.startswith("/"), f"MinIO rejects a relative queue_dir: {queue_dir!r}"
    # The queue must outlive the MinIO container: it sits on a mounted volume.
    mounts = [str(v).split(":")[1] for v in services["minio"].get("volumes", [])]
    assert any(queue_dir == m or queue_dir.startswith(m.rstrip("/") + "/") for m in mounts), (queue_dir, mounts)


def test_both_sides_read_the_same_token_from_the_env_file(services: dict[str, Any]) -> None:
    minio_token = env(services["minio"])[f"MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_{WEBHOOK_ID}"]
    eventrun_token = env(services["eventrun"])["EVENTRUN_S3__WEBHOOK_TOKEN"]
    assert minio_token == eventrun_token
    (variable,) = _VARIABLE.findall(minio_token)
    assert f"\n{variable}=" in "\n" + ENV_EXAMPLE.read_text(), f"{variable} is not in compose/.env.example"


def test_minio_setup_creates_the_bucket_and_the_event_rule(services: dict[str, Any], manifest: Manifest) -> None:
    text = script(services["minio-setup"])
    ((function, trigger),) = triggers(manifest, S3Trigger)
    assert function == "csv_summary"
    commands = [shlex.split(line) for line in text.splitlines() if line.startswith("mc ")]
    by_verb = {" ".join(args[1:3]): args for args in commands}
    assert by_verb["alias set"][:4] == ["mc", "alias", "set", "local"]
    assert by_verb["mb --ignore-existing"] == ["mc", "mb", "--ignore-existing", f"local/{trigger.bucket}"]
    add = by_verb["event add"]
    assert add[:5] == ["mc", "event", "add", f"local/{trigger.bucket}", ARN]
    assert "--ignore-existing" in add, "re-running the job must not fail on the existing rule"
    # mc only ignores an existing rule that has a filter; the rule's filters are the manifest's.
    assert add[add.index("--prefix") + 1] == trigger.prefix
    assert add[add.index("--suffix") + 1] == trigger.suffix
    assert add[add.index("--event") + 1] == "put"
    assert trigger.events == ("s3:ObjectCreated:*",)


def test_eventrun_reaches_minio_and_kafka_by_service_name(services: dict[str, Any]) -> None:
    eventrun = env(services["eventrun"])
    assert eventrun["EVENTRUN_S3__ENDPOINT_URL"] == "http://minio:9000"
    assert eventrun["EVENTRUN_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    minio = env(services["minio"])
    assert eventrun["EVENTRUN_S3__ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert eventrun["EVENTRUN_S3__SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]


# --------------------------------------------------------------------------- Kafka


def test_kafka_is_a_single_kraft_node_reachable_from_containers_and_host(services: dict[str, Any]) -> None:
    kafka = env(services["kafka"])
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{kafka['KAFKA_NODE_ID']}@kafka:")
    advertised = dict(item.split("://", 1) for item in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised["PLAINTEXT"] == env(services["eventrun"])["EVENTRUN_KAFKA__BOOTSTRAP_SERVERS"]
    assert advertised["PLAINTEXT_HOST"].startswith("localhost:")
    listeners = dict(item.split("://", 1) for item in kafka["KAFKA_LISTENERS"].split(","))
    assert set(listeners) == set(advertised) | {kafka["KAFKA_CONTROLLER_LISTENER_NAMES"]}
    protocols = dict(item.split(":") for item in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(protocols) == set(listeners)
    assert kafka["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1", "a single node cannot hold 3 replicas"


def test_kafka_setup_creates_the_topic_the_manifest_consumes(services: dict[str, Any], manifest: Manifest) -> None:
    args = shlex.split(script(services["kafka-setup"]))
    assert "--create" in args and "--if-not-exists" in args
    assert args[args.index("--bootstrap-server") + 1] == "kafka:9092"
    ((function, trigger),) = triggers(manifest, KafkaTrigger)
    assert function == "orders"
    assert args[args.index("--topic") + 1] == trigger.topic


# --------------------------------------------------------------------------- the manifest


def test_manifest_wires_one_function_to_each_trigger(manifest: Manifest) -> None:
    # load_manifest has already checked that every handler file exists.
    assert manifest.server.host == "0.0.0.0"
    assert str(manifest.server.data_dir).startswith("/"), "data_dir must be the volume, not a folder in /app"
    kinds = {kind: triggers(manifest, kind) for kind in (KafkaTrigger, S3Trigger, TimerTrigger)}
    assert {kind.__name__: len(found) for kind, found in kinds.items()} == {
        "KafkaTrigger": 1,
        "S3Trigger": 1,
        "TimerTrigger": 1,
    }
    http_only = [name for name, f in manifest.functions.items() if not f.triggers]
    assert http_only == ["hello"]
    for name in manifest.functions:
        handler = manifest.handler_path(name)
        assert handler.parent == ROOT / "functions", f"{name}: the image only holds functions/"


def test_manifest_port_is_the_published_and_healthchecked_one(services: dict[str, Any], manifest: Manifest) -> None:
    eventrun = services["eventrun"]
    port = manifest.server.port
    assert any(str(p).endswith(f":{port}") for p in eventrun["ports"]), eventrun["ports"]
    assert f"127.0.0.1:{port}/healthz" in script({"command": eventrun["healthcheck"]["test"]})


def test_compose_mounts_what_the_dockerfile_copies(services: dict[str, Any], manifest: Manifest) -> None:
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in services["eventrun"]["volumes"]}
    assert (COMPOSE / mounts[IMAGE_MANIFEST]).resolve() == MANIFEST
    assert (COMPOSE / mounts["/app/functions"]).resolve() == ROOT / "functions"
    dockerfile = DOCKERFILE.read_text()
    assert f"COPY compose/eventrun.toml {IMAGE_MANIFEST}" in dockerfile
    assert "COPY functions/ /app/functions/" in dockerfile
    assert mounts[str(manifest.server.data_dir)] == "eventrun-data"


# --------------------------------------------------------------------------- Dockerfile and env file


def test_dockerfile_runs_as_non_root_with_a_healthcheck() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), users
    assert any(line.startswith("HEALTHCHECK ") for line in lines)
    assert any("/healthz" in line for line in lines)
    assert any(line.startswith("FROM python:") and "-slim" in line for line in lines)
    assert f'CMD ["eventrun", "serve", "--config", "{IMAGE_MANIFEST}"]' in lines


def test_dockerignore_keeps_secrets_out_of_the_build() -> None:
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [rule for rule in rules if rule and not rule.startswith("#")]
    assert rules[0] == "*", "an allowlist: everything is left out unless named"
    assert "!compose/.env" not in rules and "!compose/" not in rules and "!compose" not in rules


def test_every_variable_compose_reads_is_in_the_env_example() -> None:
    used = set(_VARIABLE.findall(COMPOSE_FILE.read_text()))
    example = ENV_EXAMPLE.read_text()
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example, re.MULTILINE))
    assert used <= documented, f"not in compose/.env.example: {sorted(used - documented)}"
    assert (COMPOSE / ".gitignore").read_text().splitlines().count(".env") == 1
