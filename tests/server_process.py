"""A real `eventrun serve` process for a test, its API, and polling: what the tests import by name.

(Kept out of conftest.py: test modules in several folders import these, and a module named
`conftest` is not one module when several folders have one.)
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from multidict import CIMultiDict

HANDLERS = Path(__file__).parent / "e2e" / "handlers"
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
ENDED = frozenset({"FINISHED", "FAILED", "TIMED_OUT", "ABORTED"})

# Short graces keep teardown of a server with a 30 s run in flight well under a second or two.
TEST_SERVER_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "shutdown_grace": "2s",
    "kill_grace": "1s",
}

T = TypeVar("T")


def handler(name: str, attr: str = "main_handler") -> str:
    """The manifest `handler` value of a test handler file in tests/e2e/handlers/."""
    path = HANDLERS / f"{name}.py"
    assert path.is_file(), f"no test handler {path}"
    return f"{path}:{attr}"


# --------------------------------------------------------------------------- TOML


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(document: Mapping[str, Mapping[str, Any]]) -> str:
    """A manifest as TOML: top-level tables, `functions` as one table per function."""
    out: list[str] = []
    for section, table in document.items():
        if section == "functions":
            for name, config in table.items():
                out.append(f"[functions.{_toml_key(name)}]")
                out.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in config.items())
                out.append("")
            continue
        out.append(f"[{_toml_key(section)}]")
        out.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- the server process


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTRUN_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie runs no code)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class ServerProcess:
    """One `python -m eventrun.cli serve --config PATH` subprocess and its files."""

    def __init__(
        self,
        tmp_path: Path,
        functions: Mapping[str, Mapping[str, Any]],
        *,
        server: Mapping[str, Any] | None = None,
        extra: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.data_dir = tmp_path / "data"
        self.manifest_path = tmp_path / "eventrun.toml"
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = {**TEST_SERVER_DEFAULTS, **(server or {})}
        self._extra = dict(extra or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._runs = 0
        self._stdout: Path | None = None
        self._stderr: Path | None = None
        self._groups: list[int] = []
        self.write_manifest(functions)

    # -- files

    def write_manifest(self, functions: Mapping[str, Mapping[str, Any]]) -> None:
        """(Re)write the manifest with these functions, keeping port and data_dir."""
        server = {**self._server, "port": self.port, "data_dir": str(self.data_dir)}
        document: dict[str, Mapping[str, Any]] = {"server": server, **self._extra, "functions": functions}
        self.manifest_path.write_text(to_toml(document))

    def stderr_text(self) -> str:
        """Standard error of the latest start."""
        return self._stderr.read_text(errors="replace") if self._stderr else ""

    def stdout_text(self) -> str:
        """Standard output of the latest start."""
        return self._stdout.read_text(errors="replace") if self._stdout else ""

    def log_text(self) -> str:
        """Everything every start of this server wrote, for failure messages."""
        parts = []
        for run in range(1, self._runs + 1):
            for stream in ("stdout", "stderr"):
                path = self.tmp_path / f"server-{run}.{stream}"
                if path.exists():
                    parts.append(f"----- start #{run} {stream} -----\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    # -- lifecycle

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.proc is not None, "the server is not started"
        return self.proc.pid

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it to be ready."""
        assert self.proc is None or self.proc.poll() is not None, "the server is still running"
        self._runs += 1
        self._stdout = self.tmp_path / f"server-{self._runs}.stdout"
        self._stderr = self.tmp_path / f"server-{self._runs}.stderr"
        with open(self._stdout, "wb") as out, open(self._stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "eventrun.cli", "serve", "--config", str(self.manifest_path)],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=self.tmp_path,
                env=_clean_env(),
                start_new_session=True,  # its own group, so teardown can reap stray instances
            )
        self._groups.append(self.proc.pid)
        return self.proc

    def start(self) -> ServerProcess:
        """Start and wait for GET /healthz; fail the test with the server's log otherwise."""
        proc = self.spawn()
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                pytest.fail(f"eventrun serve exited with {code} before it was ready\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1.0) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.kill9()
        pytest.fail(f"eventrun serve was not ready within {READY_TIMEOUT}s\n{self.log_text()}")

    def run_to_exit(self, timeout: float = READY_TIMEOUT) -> int:
        """Start a server that is expected to refuse to start; its exit status."""
        proc = self.spawn()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            pytest.fail(f"eventrun serve did not exit within {timeout}s\n{self.log_text()}")

    def restart(self) -> ServerProcess:
        """Start again with the same manifest and data (after stop() or kill9())."""
        return self.start()

    def kill9(self) -> None:
        """SIGKILL the server process alone (its instances are left as they are)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(STOP_TIMEOUT)

    def stop(self) -> int | None:
        """SIGTERM, then wait for the exit; SIGKILL if it does not come. The exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        return self.proc.returncode

    def close(self) -> None:
        """Teardown: stop the server and kill whatever is left of the groups it started."""
        try:
            self.stop()
        finally:
            self._reap()

    def _reap(self) -> None:
        # Only the groups this helper created (each start is a new session led by the server).
        for group in self._groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._groups = []

    def client(self, session: aiohttp.ClientSession) -> Api:
        """An API client for this server."""
        return Api(session, self.url)


# --------------------------------------------------------------------------- polling


async def poll_until(
    fn: Callable[[], Awaitable[T] | T],
    timeout: float,
    message: str,
    *,
    interval: float = 0.1,
) -> T:
    """Call fn until it returns something truthy; fail with `message` and the last value after timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        value = fn()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        last = value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} (not within {timeout}s; last value: {last!r})")
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- HTTP client


@dataclass
class Reply:
    """One HTTP answer, read whole."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)

    @property
    def text(self) -> str:
        """The body as text."""
        return self.body.decode("utf-8", errors="replace")

    def error(self, status: int) -> dict[str, str]:
        """Assert this is the API's error shape with `status`; return the Error object."""
        assert self.status == status, f"expected HTTP {status}, got {self.status}: {self.text}"
        assert self.headers.get("Content-Type", "").startswith("application/json"), self.headers
        body = self.json
        assert set(body) == {"Error"}, body
        error = body["Error"]
        assert isinstance(error.get("Code"), str) and error["Code"], body
        assert isinstance(error.get("Message"), str) and error["Message"], body
        assert "Traceback" not in self.text, self.text
        return error


class Api:
    """The gateway's HTTP API, as tests use it."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        """Send one request; the answer read whole."""
        async with self.session.request(method, self.url + path, **kwargs) as response:
            return Reply(response.status, CIMultiDict(response.headers), await response.read())

    async def invoke(
        self,
        function: str,
        data: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> Reply:
        """POST /functions/{function}/invocations with JSON `data` (or a raw `body`)."""
        if body is None:
            body = json.dumps({} if data is None else data).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        return await self.request("POST", f"/functions/{function}/invocations", data=body, headers=headers)

    async def accepted(self, function: str, data: Any = None, **kwargs: Any) -> str:
        """Invoke and assert the 202 acknowledgement; the RequestId."""
        reply = await self.invoke(function, data, **kwargs)
        assert reply.status == 202, f"invoke {function}: expected 202, got {reply.status}: {reply.text}"
        request_id = reply.json["RequestId"]
        assert isinstance(request_id, str) and request_id, reply.json
        assert reply.headers.get("X-Request-Id") == request_id, reply.headers
        return request_id

    async def status(self, request_id: str) -> dict[str, Any]:
        """GET /invocations/{id}, asserted 200."""
        reply = await self.request("GET", f"/invocations/{request_id}")
        assert reply.status == 200, f"status of {request_id}: HTTP {reply.status}: {reply.text}"
        return reply.json  # type: ignore[no-any-return]

    async def wait_for(self, request_id: str, statuses: set[str] | frozenset[str], timeout: float) -> dict[str, Any]:
        """Poll until the invocation's Status is one of `statuses`; its state then."""
        last: dict[str, Any] = {}

        async def reached() -> dict[str, Any] | None:
            nonlocal last
            last = await self.status(request_id)
            return last if last["Status"] in statuses else None

        try:
            return await poll_until(reached, timeout, f"{request_id} never reached {sorted(statuses)}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last state: {last}") from None

    async def wait_ended(self, request_id: str, timeout: float = 20.0) -> dict[str, Any]:
        """Poll until the run has ended; its final state."""
        return await self.wait_for(request_id, ENDED, timeout)

    async def logs(self, request_id: str) -> str:
        """GET /invocations/{id}/logs, asserted 200 text/plain."""
        reply = await self.request("GET", f"/invocations/{request_id}/logs")
        assert reply.status == 200, f"logs of {request_id}: HTTP {reply.status}: {reply.text}"
        assert reply.headers.get("Content-Type", "").startswith("text/plain"), reply.headers
        return reply.text

    async def terminate(self, request_id: str) -> Reply:
        """POST /invocations/{id}/terminate."""
        return await self.request("POST", f"/invocations/{request_id}/terminate")

    async def list(self, **query: Any) -> Reply:
        """GET /invocations with the given query."""
        params = {k: str(v) for k, v in query.items() if v is not None}
        return await self.request("GET", "/invocations", params=params)


BOTH_STORES = pytest.mark.parametrize("server_store", ["sqlite", "postgres"], indirect=True)
"""A module's `pytestmark`: its end-to-end tests run once on each kind of store."""


def writer_of(server_pid: int) -> int:
    """The store's writer process: the server's child running eventrun.engine.writer."""
    for task in os.listdir(f"/proc/{server_pid}/task"):
        for child in Path(f"/proc/{server_pid}/task/{task}/children").read_text().split():
            if b"eventrun.engine.writer" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise AssertionError("no store writer below the server")
