"""[kafka] security as the client's keywords, and the reason a refused connection gives."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import pytest
import trustme

from eventrun.engine.errors import ManifestError
from eventrun.engine.manifest import load_manifest
from eventrun.triggers.kafka import KafkaTrigger, Settings
from eventrun.triggers.kafka.security import bootstrap_addresses, connection_options, refusal


pytestmark = pytest.mark.usefixtures("no_eventrun_environment")


@pytest.fixture
def ca(tmp_path: Path) -> trustme.CA:
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client = authority.issue_cert("eventrun-client")
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    client.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    return authority


def manifest(tmp_path: Path, kafka: str):
    path = tmp_path / "eventrun.toml"
    path.write_text("[kafka]\n" + kafka)
    return load_manifest(path)


def test_plaintext_adds_nothing_but_the_protocol(tmp_path: Path) -> None:
    assert connection_options(manifest(tmp_path, "")) == {"security_protocol": "PLAINTEXT"}


def test_tls_verifies_the_broker_with_the_given_ca(tmp_path: Path, ca: trustme.CA) -> None:
    options = connection_options(manifest(tmp_path, 'security_protocol = "SSL"\nssl_cafile = "ca.pem"\n'))
    assert set(options) == {"security_protocol", "ssl_context"}
    context = options["ssl_context"]
    assert options["security_protocol"] == "SSL"
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    # The test CA is the one trusted, not the system's.
    assert context.get_ca_certs(binary_form=True) == [ssl.PEM_cert_to_DER_cert(ca.cert_pem.bytes().decode())]


def test_tls_without_a_ca_file_trusts_the_system(tmp_path: Path) -> None:
    context = connection_options(manifest(tmp_path, 'security_protocol = "SSL"\n'))["ssl_context"]
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname


def test_hostname_checking_can_be_turned_off_but_not_verification(tmp_path: Path, ca: trustme.CA) -> None:
    kafka = 'security_protocol = "SSL"\nssl_cafile = "ca.pem"\nssl_check_hostname = false\n'
    context = connection_options(manifest(tmp_path, kafka))["ssl_context"]
    assert not context.check_hostname and context.verify_mode is ssl.CERT_REQUIRED


def test_a_client_certificate_is_loaded(tmp_path: Path, ca: trustme.CA) -> None:
    kafka = 'security_protocol = "SSL"\nssl_cafile = "ca.pem"\nssl_certfile = "client.pem"\nssl_keyfile = "client.key"\n'
    assert isinstance(connection_options(manifest(tmp_path, kafka))["ssl_context"], ssl.SSLContext)


@pytest.mark.parametrize(
    ("kafka", "expected"),
    [
        ('ssl_cafile = "junk.pem"\n', r"kafka\.ssl_cafile: cannot load CA certificates from .*junk\.pem: "),
        ('ssl_cafile = "ca.pem"\nssl_certfile = "junk.pem"\n',
         r"kafka\.ssl_certfile: cannot load the client certificate and its key from .*junk\.pem: "),
        ('ssl_cafile = "ca.pem"\nssl_certfile = "client.pem"\nssl_keyfile = "ca.pem"\n',
         r"kafka\.ssl_certfile: cannot load the client certificate and its key from .*client\.pem and .*ca\.pem: "),
    ],
)
def test_tls_files_that_do_not_load_are_refused_by_key(tmp_path: Path, ca: trustme.CA, kafka: str, expected: str) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ManifestError, match=expected):
        Settings.from_manifest(manifest(tmp_path, 'security_protocol = "SSL"\n' + kafka))


def test_sasl_passes_mechanism_user_and_password(tmp_path: Path) -> None:
    kafka = 'security_protocol = "SASL_PLAINTEXT"\nsasl_mechanism = "SCRAM-SHA-256"\nsasl_username = "svc"\nsasl_password = "pw"\n'
    settings = Settings.from_manifest(manifest(tmp_path, kafka), batch_size=10)
    assert settings.connection == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "svc",
        "sasl_plain_password": "pw",
    }
    assert settings.batch_size == 10


def test_bootstrap_addresses() -> None:
    assert bootstrap_addresses("a:9093, b:19092,c,[::1]:9094,") == [("a", 9093), ("b", 19092), ("c", 9092), ("::1", 9094)]


async def test_refusal_says_why_no_server_answers(unused_tcp_port: int) -> None:
    reason = await refusal(f"127.0.0.1:{unused_tcp_port}", {"security_protocol": "PLAINTEXT"}, 2.0)
    assert reason is not None and reason.startswith(f"127.0.0.1:{unused_tcp_port}: ")
    assert "Connect call failed" in reason, reason


async def test_refusal_names_a_tls_server_that_is_not_trusted(tmp_path: Path, ca: trustme.CA, unused_tcp_port: int) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", unused_tcp_port, ssl=server_context)
    try:
        trusting_nothing = ssl.create_default_context(cafile=str(tmp_path / "client.pem"))  # not a CA
        options = {"security_protocol": "SSL", "ssl_context": trusting_nothing}
        reason = await refusal(f"127.0.0.1:{unused_tcp_port}", options, 2.0)
    finally:
        server.close()
        await server.wait_closed()
    assert reason is not None and "CERTIFICATE_VERIFY_FAILED" in reason, reason


async def test_refusal_is_none_once_one_server_answers(unused_tcp_port_factory) -> None:
    closed, listening = unused_tcp_port_factory(), unused_tcp_port_factory()

    async def api_versions(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answer the client's first request (ApiVersions v0) with an empty list of versions.
        size = int.from_bytes(await reader.readexactly(4), "big")
        request = await reader.readexactly(size)
        body = request[4:8] + (0).to_bytes(2, "big") + (0).to_bytes(4, "big")  # correlation id, no error, []
        writer.write(len(body).to_bytes(4, "big") + body)
        await writer.drain()
        await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(api_versions, "127.0.0.1", listening)
    try:
        both = f"127.0.0.1:{closed},127.0.0.1:{listening}"
        assert await refusal(both, {"security_protocol": "PLAINTEXT"}, 2.0) is None
        reason = await refusal(f"127.0.0.1:{closed},127.0.0.1:{closed}", {"security_protocol": "PLAINTEXT"}, 2.0)
    finally:
        server.close()
        await server.wait_closed()
    assert reason is not None and reason.count("Connect call failed") == 2 and "; " in reason, reason


@pytest.mark.parametrize(
    ("kafka", "warned"),
    [
        ('security_protocol = "SASL_PLAINTEXT"\nsasl_username = "u"\nsasl_password = "p"\n', True),
        ('security_protocol = "SASL_PLAINTEXT"\nsasl_mechanism = "SCRAM-SHA-256"\nsasl_username = "u"\nsasl_password = "p"\n', False),
        ('security_protocol = "SASL_SSL"\nsasl_username = "u"\nsasl_password = "p"\n', False),
    ],
)
def test_a_password_sent_in_the_clear_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kafka: str, warned: bool
) -> None:
    class Engine:  # the trigger only keeps it until it starts
        pass

    with caplog.at_level(logging.WARNING, logger="eventrun.triggers.kafka.trigger"):
        KafkaTrigger(Engine(), manifest(tmp_path, kafka))  # type: ignore[arg-type]
    warnings = [r.getMessage() for r in caplog.records if "unencrypted" in r.getMessage()]
    assert warnings == (["kafka: sasl_mechanism PLAIN over security_protocol SASL_PLAINTEXT sends the password "
                         "unencrypted; use SASL_SSL, or a SCRAM mechanism"] if warned else [])


@pytest.fixture
def encrypted_key(tmp_path: Path, ca: trustme.CA) -> Path:
    """client.pem's key again, encrypted with the password "opensesame"."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((tmp_path / "client.key").read_bytes(), None)
    path = tmp_path / "client-encrypted.key"
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"opensesame")
    ))
    return path


@pytest.mark.parametrize(
    ("password", "expected"),
    [
        (None, r"the private key is encrypted and kafka\.ssl_keyfile_password is not set"),
        ("wrong", r"the private key is encrypted and kafka\.ssl_keyfile_password does not open it"),
        ("opensesame", None),
    ],
)
def test_an_encrypted_key_needs_its_password_and_never_prompts(
    tmp_path: Path, encrypted_key: Path, password: str | None, expected: str | None
) -> None:
    kafka = f'security_protocol = "SSL"\nssl_cafile = "ca.pem"\nssl_certfile = "client.pem"\nssl_keyfile = "{encrypted_key.name}"\n'
    if password is not None:
        kafka += f'ssl_keyfile_password = "{password}"\n'
    if expected is None:
        assert isinstance(connection_options(manifest(tmp_path, kafka))["ssl_context"], ssl.SSLContext)
    else:
        with pytest.raises(ManifestError, match=expected):
            connection_options(manifest(tmp_path, kafka))
