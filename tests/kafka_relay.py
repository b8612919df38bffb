"""A relay in front of the test broker that adds what Tansu cannot be set up with here: TLS and SASL.

Tansu 0.6 has TLS and SASL flags, but its TLS listener does not complete a handshake and its SCRAM
users cannot be created once authentication is on. So tests put this relay where clients connect
(Tansu advertises the relay's port): it terminates TLS with a real certificate, optionally asks
for a client certificate, and, if given users, answers the SASL login as a broker does
(SaslHandshake, then SaslAuthenticate: PLAIN, or SCRAM-SHA-256/512 per RFC 5802) before
passing bytes through. Everything after the login
goes to the real broker unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import secrets
import ssl
import struct
from collections.abc import Mapping

from aiokafka.protocol.admin import (
    SaslAuthenticateResponse_v0,
    SaslAuthenticateResponse_v1,
    SaslHandShakeResponse_v0,
    SaslHandShakeResponse_v1,
)

SASL_HANDSHAKE = 17
SASL_AUTHENTICATE = 36
AUTHENTICATION_FAILED = 58  # SASL_AUTHENTICATION_FAILED
UNSUPPORTED_MECHANISM = 33  # UNSUPPORTED_SASL_MECHANISM


class Relay:
    """Listens on 127.0.0.1:`port` and relays each connection to 127.0.0.1:`target`."""

    def __init__(
        self,
        port: int,
        target: int,
        *,
        tls: ssl.SSLContext | None = None,
        users: Mapping[str, str] | None = None,
    ) -> None:
        self.port = port
        self.target = target
        self.tls = tls
        self.users = dict(users) if users is not None else None  # SASL logins (any mechanism) if given
        self.client_subjects: list[str] = []  # commonName of each client certificate shown
        self.logins: list[str] = []  # users whose password was right
        self.refused: list[str] = []  # users whose password was wrong
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.tls)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            peer = writer.get_extra_info("peercert")
            if peer:
                self.client_subjects += [value for rdn in peer["subject"] for key, value in rdn if key == "commonName"]
            broker_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target)
            if self.users is not None and not await self._login(reader, writer, broker_reader, upstream):
                return
            await asyncio.gather(_pipe(reader, upstream), _pipe(broker_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            for stream in (writer, upstream):
                if stream is not None:
                    stream.close()
            self._tasks.discard(task)

    async def _login(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        broker_reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
    ) -> bool:
        """Answer SaslHandshake and SaslAuthenticate; pass other requests (ApiVersions) to the broker."""
        assert self.users is not None
        exchange: _Exchange | None = None
        while True:
            frame = await _frame(reader)
            api_key, version, correlation = struct.unpack(">hhi", frame[:8])
            (client_id_size,) = struct.unpack(">h", frame[8:10])
            body = frame[10 + max(client_id_size, 0) :]
            if api_key == SASL_HANDSHAKE:
                (size,) = struct.unpack(">h", body[:2])
                mechanism = body[2 : 2 + size].decode()
                known = mechanism in MECHANISMS
                response = SaslHandShakeResponse_v1 if version >= 1 else SaslHandShakeResponse_v0
                await _answer(writer, correlation, response(0 if known else UNSUPPORTED_MECHANISM, list(MECHANISMS)).encode())
                if not known:
                    return False
                exchange = MECHANISMS[mechanism](self.users)
            elif api_key == SASL_AUTHENTICATE and exchange is not None:
                (size,) = struct.unpack(">i", body[:4])
                reply, outcome = exchange.step(body[4 : 4 + size])
                if outcome is not None:
                    (self.logins if outcome else self.refused).append(exchange.user)
                args = (0, None, reply) if outcome is not False else (
                    AUTHENTICATION_FAILED, f"Authentication failed for user {exchange.user}", b""
                )
                encoded = SaslAuthenticateResponse_v1(*args, 0) if version >= 1 else SaslAuthenticateResponse_v0(*args)
                await _answer(writer, correlation, encoded.encode())
                if outcome is not None:
                    return outcome
            else:  # what a client asks before it logs in (ApiVersions) is the broker's to answer
                upstream.write(struct.pack(">i", len(frame)) + frame)
                await upstream.drain()
                writer.write(await _sized(broker_reader))
                await writer.drain()


class _Exchange:
    """The server's side of one SASL login: step() takes what the client sent and answers
    (reply bytes, outcome), the outcome None while the exchange goes on, else whether it passed."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self.users = users
        self.user = ""

    def step(self, message: bytes) -> tuple[bytes, bool | None]:
        raise NotImplementedError


class _Plain(_Exchange):
    def step(self, message: bytes) -> tuple[bytes, bool | None]:
        _, self.user, password = message.decode().split("\0")
        return b"", self.users.get(self.user) == password


class _Scram(_Exchange):
    """RFC 5802, as Kafka brokers speak it (no channel binding)."""

    hash_name = "sha256"
    iterations = 4096

    def __init__(self, users: Mapping[str, str]) -> None:
        super().__init__(users)
        self._first = ""
        self._server_first = ""

    def step(self, message: bytes) -> tuple[bytes, bool | None]:
        text = message.decode()
        if not self._first:  # client-first: "n,,n=user,r=nonce"
            self._first = text.split(",", 2)[2]
            fields = dict(part.split("=", 1) for part in self._first.split(","))
            self.user = fields["n"].replace("=2C", ",").replace("=3D", "=")
            self._salt = secrets.token_bytes(16)
            nonce = fields["r"] + secrets.token_hex(12)
            self._server_first = f"r={nonce},s={base64.b64encode(self._salt).decode()},i={self.iterations}"
            return self._server_first.encode(), None
        without_proof, _, proof = text.rpartition(",p=")  # client-final: "c=biws,r=nonce,p=proof"
        password = self.users.get(self.user)
        if password is None:
            return b"", False
        salted = hashlib.pbkdf2_hmac(self.hash_name, password.encode(), self._salt, self.iterations)
        client_key = hmac.digest(salted, b"Client Key", self.hash_name)
        auth_message = f"{self._first},{self._server_first},{without_proof}".encode()
        signature = hmac.digest(hashlib.new(self.hash_name, client_key).digest(), auth_message, self.hash_name)
        expected = bytes(a ^ b for a, b in zip(client_key, signature))
        if not hmac.compare_digest(base64.b64decode(proof), expected):
            return b"", False
        server_signature = hmac.digest(hmac.digest(salted, b"Server Key", self.hash_name), auth_message, self.hash_name)
        return f"v={base64.b64encode(server_signature).decode()}".encode(), True


class _Scram512(_Scram):
    hash_name = "sha512"


MECHANISMS: dict[str, type[_Exchange]] = {"PLAIN": _Plain, "SCRAM-SHA-256": _Scram, "SCRAM-SHA-512": _Scram512}


async def _frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    return await reader.readexactly(size)


async def _sized(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(4)
    (size,) = struct.unpack(">i", head)
    return head + await reader.readexactly(size)


async def _answer(writer: asyncio.StreamWriter, correlation: int, body: bytes) -> None:
    payload = struct.pack(">i", correlation) + body
    writer.write(struct.pack(">i", len(payload)) + payload)
    await writer.drain()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    with contextlib.suppress(OSError, RuntimeError):
        if sink.can_write_eof():
            sink.write_eof()
