"""A relay in front of the test broker that adds what Tansu cannot be set up with here: TLS and SASL.

Tansu 0.6 has TLS and SASL flags, but its TLS listener does not complete a handshake and its SCRAM
users cannot be created once authentication is on. So tests put this relay where clients connect
(Tansu advertises the relay's port): it terminates TLS with a real certificate, optionally asks
for a client certificate, and, if given users, answers the SASL PLAIN exchange as a broker does
(SaslHandshake, then SaslAuthenticate) before passing bytes through. Everything after the login
goes to the real broker unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
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


class Relay:
    """Listens on 127.0.0.1:`port` and relays each connection to 127.0.0.1:`target`."""

    def __init__(
        self,
        port: int,
        target: int,
        *,
        tls: ssl.SSLContext | None = None,
        plain_users: Mapping[str, str] | None = None,
    ) -> None:
        self.port = port
        self.target = target
        self.tls = tls
        self.plain_users = dict(plain_users) if plain_users is not None else None
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
            if self.plain_users is not None and not await self._login(reader, writer, broker_reader, upstream):
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
        assert self.plain_users is not None
        while True:
            frame = await _frame(reader)
            api_key, version, correlation = struct.unpack(">hhi", frame[:8])
            if api_key == SASL_HANDSHAKE:
                (name_size,) = struct.unpack(">h", frame[8:10])
                (size,) = struct.unpack(">h", frame[10 + name_size : 12 + name_size])
                mechanism = frame[12 + name_size : 12 + name_size + size].decode()
                response = SaslHandShakeResponse_v1 if version >= 1 else SaslHandShakeResponse_v0
                await _answer(writer, correlation, response(0 if mechanism == "PLAIN" else 33, ["PLAIN"]).encode())
                if mechanism != "PLAIN":
                    return False
            elif api_key == SASL_AUTHENTICATE:
                (name_size,) = struct.unpack(">h", frame[8:10])
                body = frame[10 + name_size :]
                (size,) = struct.unpack(">i", body[:4])
                _, user, password = body[4 : 4 + size].decode().split("\0")
                ok = self.plain_users.get(user) == password
                (self.logins if ok else self.refused).append(user)
                args = (0, None, b"") if ok else (AUTHENTICATION_FAILED, f"Authentication failed for user {user}", b"")
                encoded = SaslAuthenticateResponse_v1(*args, 0) if version >= 1 else SaslAuthenticateResponse_v0(*args)
                await _answer(writer, correlation, encoded.encode())
                return ok
            else:  # what a client asks before it logs in (ApiVersions) is the broker's to answer
                upstream.write(struct.pack(">i", len(frame)) + frame)
                await upstream.drain()
                writer.write(await _sized(broker_reader))
                await writer.drain()


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
