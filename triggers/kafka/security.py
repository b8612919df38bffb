"""The `[kafka]` security settings as aiokafka's connection keywords, and why a broker refused us.

TLS (`SSL`), SASL over plaintext (`SASL_PLAINTEXT`) or both (`SASL_SSL`); SASL as PLAIN or SCRAM.
The client retries a connection that fails and in the end says only "Unable to bootstrap" (or
"Unable to get cluster metadata"), the reason (a refused connection, a certificate not trusted,
a password refused) going to a logger the trigger keeps quiet. So when a consumer cannot reach
the brokers, `refusal` connects once by itself to learn the reason, which /healthz and the log
then show.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Mapping

from aiokafka.conn import create_conn
from aiokafka.helpers import create_ssl_context

from eventrun.engine.errors import ManifestError
from eventrun.engine.manifest import Manifest


def connection_options(manifest: Manifest) -> dict[str, Any]:
    """The keywords every aiokafka client of this server gets for its connections."""
    config = manifest.kafka
    options: dict[str, Any] = {"security_protocol": config.security_protocol}
    if config.tls:
        options["ssl_context"] = _ssl_context(manifest)
    if config.sasl:
        options["sasl_mechanism"] = config.sasl_mechanism
        options["sasl_plain_username"] = config.sasl_username
        options["sasl_plain_password"] = config.sasl_password.get_secret_value()
    return options


def _ssl_context(manifest: Manifest) -> ssl.SSLContext:
    config = manifest.kafka
    path = {key: str(manifest.kafka_file(name)) for key, name in config.files().items()}
    try:
        context = create_ssl_context(cafile=path.get("ssl_cafile"))
    except (OSError, ssl.SSLError) as exc:
        raise ManifestError(f"kafka.ssl_cafile: cannot load CA certificates from {path['ssl_cafile']}: {exc}") from None
    if "ssl_certfile" in path:
        # Always a password, if only an empty one: without it OpenSSL would prompt for one on the
        # terminal and hold up the start; this way an encrypted key fails with an error instead.
        password = config.ssl_keyfile_password.get_secret_value()
        try:
            context.load_cert_chain(path["ssl_certfile"], path.get("ssl_keyfile"), password=password.encode())
        except (OSError, ssl.SSLError) as exc:
            files = " and ".join(path[key] for key in ("ssl_certfile", "ssl_keyfile") if key in path)
            hint = ""
            if _encrypted(path.get("ssl_keyfile", path["ssl_certfile"])):
                given = "does not open it" if password else "is not set"
                hint = f" (the private key is encrypted and kafka.ssl_keyfile_password {given})"
            raise ManifestError(
                f"kafka.ssl_certfile: cannot load the client certificate and its key from {files}: {exc}{hint}"
            ) from None
    context.check_hostname = config.ssl_check_hostname
    return context


def _encrypted(pem: str) -> bool:
    try:
        with open(pem, "rb") as file:
            return b"ENCRYPTED" in file.read()
    except OSError:
        return False


def bootstrap_addresses(servers: str) -> list[tuple[str, int]]:
    """(host, port) of each server in a bootstrap list such as "a:9092,b:9093" (port 9092 if left out)."""
    out = []
    for server in servers.split(","):
        server = server.strip()
        if not server:
            continue
        host, colon, port = server.rpartition(":")
        if not colon or not port.isdigit():
            host, port = server, "9092"
        out.append((host.strip("[]"), int(port)))
    return out


async def refusal(servers: str, connection: Mapping[str, Any], timeout: float) -> str | None:
    """Why connecting to the bootstrap servers fails, as the client would connect; None if one answers.

    The servers are tried at once, so a list of unreachable ones costs `timeout` at most.
    """
    addresses = bootstrap_addresses(servers)
    reasons = await asyncio.gather(*(_try(host, port, connection, timeout) for host, port in addresses))
    if not addresses or None in reasons:
        return None
    return "; ".join(f"{host}:{port}: {reason}" for (host, port), reason in zip(addresses, reasons))


async def _try(host: str, port: int, connection: Mapping[str, Any], timeout: float) -> str | None:
    try:
        conn = await asyncio.wait_for(
            create_conn(host, port, client_id="eventrun-probe", request_timeout_ms=int(timeout * 1000), **connection),
            timeout,
        )
    except asyncio.TimeoutError:
        return f"no answer within {timeout:g}s"
    except Exception as exc:  # what the connection raised is the answer sought
        return describe(exc)
    conn.close()
    return None


def describe(exc: BaseException) -> str:
    """An exception as one line: its type, and its message unless that already starts with it."""
    text, name = str(exc), type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name
