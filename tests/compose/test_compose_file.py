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
from urllib.parse import urlsplit

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
# The node that builds the image and that MinIO's webhook names; the others run its image.
FIRST_NODE = "eventrun"
NODES = {FIRST_NODE, "eventrun-2"}
POSTGRES_DATA = "/var/lib/postgresql/data"  # PGDATA of the official image up to version 17
_VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")
_DEFAULT = re.compile(r"(?<!\$)\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict) and isinstance(document.get("services"), dict), document
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def nodes(services: dict[str, Any]) -> dict[str, Any]:
    """Every eventrun node: the services that run the image the first node builds."""
    image = services[FIRST_NODE]["image"]
    found = {name: service for name, service in services.items() if service.get("image") == image}
    assert set(found) == NODES, sorted(found)
    return found


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


def with_defaults(text: str) -> str:
    """`text` as compose reads it without a .env file: each ${NAME:-default} is its default."""
    return _DEFAULT.sub(lambda match: match.group(1), text)


def published(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of each port a service publishes, defaults applied."""
    found = []
    for entry in service.get("ports", []):
        address, host_port, container_port = with_defaults(str(entry)).split(":")
        found.append((address, host_port, container_port))
    return found


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's volumes as {path in the container: volume name or host path}."""
    return {str(v).split(":")[1]: str(v).split(":")[0] for v in service.get("volumes", [])}


def option(args: list[str], *names: str) -> str:
    """The value after the first of `names` found in a command's arguments."""
    for name in names:
        if name in args:
            return args[args.index(name) + 1]
    raise AssertionError(f"none of {names} in {args}")


def triggers(manifest: Manifest, kind: type) -> list[tuple[str, Any]]:
    return [(name, t) for name, f in manifest.functions.items() for t in f.triggers if isinstance(t, kind)]


# --------------------------------------------------------------------------- the services


def test_every_service_is_there(services: dict[str, Any]) -> None:
    expected = {"postgres", "kafka", "kafka-setup", "minio", "minio-setup", *NODES}
    assert set(services) >= expected, sorted(services)


def test_long_running_services_have_healthchecks(services: dict[str, Any]) -> None:
    for name in ("postgres", "kafka", "minio", *sorted(NODES)):
        check = services[name].get("healthcheck")
        assert isinstance(check, dict) and check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), name


def test_every_node_comes_up_last(services: dict[str, Any], nodes: dict[str, Any]) -> None:
    for name, node in nodes.items():
        depends = node["depends_on"]
        assert isinstance(depends, dict), f"{name}'s depends_on needs conditions, not a bare list"
        assert depends == {
            "postgres": {"condition": "service_healthy"},
            "kafka": {"condition": "service_healthy"},
            "kafka-setup": {"condition": "service_completed_successfully"},
            "minio": {"condition": "service_healthy"},
            "minio-setup": {"condition": "service_completed_successfully"},
        }, name
    for job, server in (("kafka-setup", "kafka"), ("minio-setup", "minio")):
        assert services[job]["depends_on"] == {server: {"condition": "service_healthy"}}, job
        assert services[job].get("restart", "no") == "no", f"{job} is a one-shot job"


def test_eventrun_is_built_from_the_dockerfile(services: dict[str, Any], nodes: dict[str, Any]) -> None:
    build = services[FIRST_NODE]["build"]
    context = (COMPOSE / build["context"]).resolve()
    assert context == ROOT
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    # Two services building one tag collide under compose's parallel builds: one builds it.
    builders = [name for name, node in nodes.items() if "build" in node]
    assert builders == [FIRST_NODE], builders


# --------------------------------------------------------------------------- PostgreSQL and the nodes


def test_postgres_is_the_official_image_on_a_named_volume(compose: dict[str, Any], services: dict[str, Any]) -> None:
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:17"
    settings = env(postgres)
    assert settings["POSTGRES_USER"] == "eventrun"
    assert settings["POSTGRES_DB"] == "eventrun"
    assert with_defaults(settings["POSTGRES_PASSWORD"]) == "eventrun"
    volume = mounts(postgres)[POSTGRES_DATA]
    assert volume in (compose.get("volumes") or {}), f"{volume} is not a named volume"
    assert not postgres.get("ports"), "only the eventrun nodes need PostgreSQL: it publishes no port"
    assert postgres.get("restart") == "unless-stopped"


def test_postgres_is_healthy_once_pg_isready_answers_over_tcp(services: dict[str, Any]) -> None:
    postgres = services["postgres"]
    check = postgres["healthcheck"]
    args = shlex.split(script({"command": check["test"]}))
    assert args[0] in ("CMD", "CMD-SHELL") and "pg_isready" in args, args
    settings = env(postgres)
    assert option(args, "--username", "-U") == settings["POSTGRES_USER"]
    assert option(args, "--dbname", "-d") == settings["POSTGRES_DB"]
    # The image's first-start server listens on the Unix socket only: TCP means the real one.
    assert option(args, "--host", "-h") == "127.0.0.1"
    assert int(check.get("retries", 3)) >= 3


def test_every_node_stores_in_postgres(services: dict[str, Any], nodes: dict[str, Any]) -> None:
    postgres = env(services["postgres"])
    urls = {name: env(node)["EVENTRUN_STORE__URL"] for name, node in nodes.items()}
    assert len(set(urls.values())) == 1, f"the nodes must share one store: {urls}"
    for name, raw in urls.items():
        url = urlsplit(raw)
        assert url.scheme == "postgresql", (name, raw)
        assert url.hostname == "postgres", (name, raw)
        assert url.port == 5432, (name, raw)
        assert url.username == postgres["POSTGRES_USER"], (name, raw)
        # The same text, so .env sets both sides at once.
        assert url.password == postgres["POSTGRES_PASSWORD"], (name, raw)
        assert url.path == "/" + postgres["POSTGRES_DB"], (name, raw)


def test_every_node_has_its_own_node_id(nodes: dict[str, Any]) -> None:
    ids = {name: env(node).get("EVENTRUN_CLUSTER__NODE_ID", "") for name, node in nodes.items()}
    assert all(ids.values()), f"every node needs an explicit EVENTRUN_CLUSTER__NODE_ID: {ids}"
    assert len(set(ids.values())) == len(ids), ids


def test_every_node_has_its_own_host_port(services: dict[str, Any], nodes: dict[str, Any], manifest: Manifest) -> None:
    for name, node in nodes.items():
        ((address, _, container_port),) = published(node)
        assert address == "127.0.0.1", f"{name}: the API has no authentication"
        assert container_port == str(manifest.server.port), name
        (variable,) = _VARIABLE.findall(str(node["ports"][0]))
        assert variable.endswith("_HOST_PORT"), (name, variable)
    variables = [_VARIABLE.findall(str(node["ports"][0]))[0] for node in nodes.values()]
    assert len(set(variables)) == len(variables), f"one .env variable per node: {variables}"
    host_ports = [host for service in services.values() for _, host, _ in published(service)]
    assert len(set(host_ports)) == len(host_ports), f"two services publish one host port: {sorted(host_ports)}"


def test_nodes_differ_only_in_name_port_and_data_volume(
    compose: dict[str, Any], nodes: dict[str, Any], manifest: Manifest
) -> None:
    def shared(node: dict[str, Any]) -> dict[str, Any]:
        rest = {k: v for k, v in node.items() if k not in ("build", "ports", "environment", "volumes")}
        settings = {k: v for k, v in env(node).items() if k != "EVENTRUN_CLUSTER__NODE_ID"}
        volumes = {path: source for path, source in mounts(node).items() if path != str(manifest.server.data_dir)}
        return {**rest, "environment": settings, "volumes": volumes}

    first = shared(nodes[FIRST_NODE])
    for name, node in nodes.items():
        assert shared(node) == first, name
    data = {name: mounts(node)[str(manifest.server.data_dir)] for name, node in nodes.items()}
    assert data[FIRST_NODE] == "eventrun-data", "the first node keeps the volume it always had"
    assert len(set(data.values())) == len(data), f"each node has its own data_dir volume: {data}"
    assert set(data.values()) <= set(compose.get("volumes") or {}), data


# --------------------------------------------------------------------------- MinIO -> eventrun


def test_minio_webhook_points_at_eventrun_with_a_queue_dir(services: dict[str, Any], manifest: Manifest) -> None:
    minio = env(services["minio"])
    prefix = "MINIO_NOTIFY_WEBHOOK_"
    assert minio[f"{prefix}ENABLE_{WEBHOOK_ID}"] == "on"
    # One node is enough: any node accepts a notification into the shared store.
    assert minio[f"{prefix}ENDPOINT_{WEBHOOK_ID}"] == f"http://{FIRST_NODE}:{manifest.server.port}/triggers/s3"
    queue_dir = minio[f"{prefix}QUEUE_DIR_{WEBHOOK_ID}"]
    assert queue_dir.startswith("/"), f"MinIO rejects a relative queue_dir: {queue_dir!r}"
    # The queue must outlive the MinIO container: it sits on a mounted volume.
    mounts = [str(v).split(":")[1] for v in services["minio"].get("volumes", [])]
    assert any(queue_dir == m or queue_dir.startswith(m.rstrip("/") + "/") for m in mounts), (queue_dir, mounts)


def test_both_sides_read_the_same_token_from_the_env_file(services: dict[str, Any], nodes: dict[str, Any]) -> None:
    minio_token = env(services["minio"])[f"MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_{WEBHOOK_ID}"]
    for name, node in nodes.items():
        assert env(node)["EVENTRUN_S3__WEBHOOK_TOKEN"] == minio_token, name
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


def test_eventrun_reaches_minio_and_kafka_by_service_name(services: dict[str, Any], nodes: dict[str, Any]) -> None:
    minio = env(services["minio"])
    for name, node in nodes.items():
        eventrun = env(node)
        assert eventrun["EVENTRUN_S3__ENDPOINT_URL"] == "http://minio:9000", name
        assert eventrun["EVENTRUN_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092", name
        assert eventrun["EVENTRUN_S3__ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"], name
        assert eventrun["EVENTRUN_S3__SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"], name


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


def test_manifest_port_is_the_published_and_healthchecked_one(nodes: dict[str, Any], manifest: Manifest) -> None:
    port = manifest.server.port
    for name, node in nodes.items():
        assert any(str(p).endswith(f":{port}") for p in node["ports"]), (name, node["ports"])
        assert f"127.0.0.1:{port}/healthz" in script({"command": node["healthcheck"]["test"]}), name


def test_compose_mounts_what_the_dockerfile_copies(nodes: dict[str, Any], manifest: Manifest) -> None:
    dockerfile = DOCKERFILE.read_text()
    assert f"COPY compose/eventrun.toml {IMAGE_MANIFEST}" in dockerfile
    assert "COPY functions/ /app/functions/" in dockerfile
    for name, node in nodes.items():
        found = mounts(node)
        assert (COMPOSE / found[IMAGE_MANIFEST]).resolve() == MANIFEST, name
        assert (COMPOSE / found["/app/functions"]).resolve() == ROOT / "functions", name
        assert str(manifest.server.data_dir) in found, f"{name}: data_dir must be on a volume"


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
