"""The code that runs inside an instance: load the handler, run one event at a time.

The parent talks to this process over two pipes. Tasks arrive as JSON lines on a private
copy of stdin; stdout and stderr share one pipe that carries the function's output, and
frames back to the parent are lines marked with a per-instance token on that same pipe, so
output and outcome arrive in the order they happened. Frames go through a private copy of
stdout, so a handler that closes its stdout and stderr, or puts a file in their place, cannot
lose them; should it close or replace that copy instead (closing every fd from 3 up), they go
through stdout, or any fd still on the pipe, and the instance is not reused.

What a run leaves behind ends with it. The instance is a child subreaper
(PR_SET_CHILD_SUBREAPER): a process the function starts stays in the instance's tree of
children even if it forks twice and moves to a session of its own, which takes it out of the
instance's process group, the unit eventrun signals. So when the handler has returned, every
process still in that tree is killed before the outcome is reported; one system call finds
that there is none, the usual case. Should the instance itself die first (a crash, a kill at a
timeout), its remaining processes pass to its parent: the spawner, also a subreaper, kills
them. The spawner also starts the instances that need a fresh interpreter (it forks, the child
execs). Only while the spawner is down does the server start instances itself; it kills their
leftovers as it kills the instance, or after a crash those that still hold its output pipe
(see instances.Instance.kill). A thread cannot be killed: one the run left running makes the
instance not reused. A process the handler forked that comes back from the handler ends
there (_leave_fork): only the instance reports, and reads events.

A function's memory_limit is an RLIMIT_DATA set here before its module is imported, for
forked instances too: heap and other private writable memory, not shared libraries or mapped
files. An allocation past it (a MemoryError, a thread whose stack does not fit, a mapping or
fork refused with ENOMEM) is reported as MemoryLimitExceeded.

An instance runs the function's code as it was when the instance imported it. With the outcome
of its first run (and of any run that imported more of it) it reports the files of that code and
their signatures (see _CodeFiles); the server stops an instance whose files changed since,
rather than hand it another run.

Functions of one server run as one Unix user, so an instance guards itself against the others:
it and the spawner are not dumpable (PR_SET_DUMPABLE 0, set first thing by each interpreter, and
kept across a fork), which closes their /proc/PID/fd, mem and environ, and ptrace, to other
processes of that user; the root user is not held back. Its secrets (the frame token, and the key
each task must carry) come as the first line on its task pipe, never on its command line or in
its environment; so does its function's own environment, set before any of the function's code
runs: sent through the spawner, it would stay in the spawner's memory, which every instance
forked after it starts with (another function's, run as another user, among them). A task
without the key is refused, and the instance ends; each end frame names the run it ends (the
task's request_id and run), for the server to refuse an answer for another.

A server started as root can run a function as a user of its own (run_as): the spawner's child
becomes that user (_become_user) before any of the function's code is loaded, and cannot become
root again.

The same file, run with --spawner, is the process instances are forked from (see spawner()).
"""

from __future__ import annotations

# Every instance start pays for what is imported here, so this module imports only what every
# run needs. The rest comes when used: logging with the first use of context.logger, traceback
# with the first error, asyncio with the first async handler. orjson, which writes results, comes
# as the instance starts (main()): a run that holds every file descriptor as it returns could not
# import it then. The spawner imports it once, for the instances it forks. It runs as a script, outside the eventrun package, so the package (and
# whatever it imports) is not loaded either.
import json
import os
import signal
import sys
import threading
import time

TYPE_CHECKING = False  # typing itself is not imported: it would cost every start a few ms
if TYPE_CHECKING:
    import logging
    from types import TracebackType
    from typing import Any, Callable, Iterator, NoReturn

FRAME_MARK = "\x1eeventrun-frame:"
# A frame is a line: FRAME_MARK, the instance's token, FRAME_LAST, the frame's JSON. A write to a
# pipe of at most PIPE_BUF bytes is atomic (no other write's bytes land inside it), a longer one
# is not: a frame that long goes as several such lines, each written by one write, all but the
# last with FRAME_MORE after the token, each holding the next slice of the JSON. So output that
# other threads of the run write meanwhile comes between the pieces (or before a piece's mark, on
# its line), never inside one, and the parent puts the frame together again (instances.Instance).
FRAME_LAST = " "
FRAME_MORE = "+"
PIPE_BUF = 4096  # Linux's (select.PIPE_BUF: select is not imported for it)
MAX_RESULT = 6 * 1024 * 1024  # the same bound as an invocation body
MAX_MESSAGE = 16 * 1024  # characters of an error message kept (the traceback in the log has it all)
HANDLER_LOAD_FAILED = "HandlerLoadFailed"  # the ErrorType of a run whose handler could not be imported or found
MAX_FRAME = MAX_RESULT + 256 * 1024  # no frame is longer: a result, or a message, and a little
# orjson writes at most JSON_DEPTH levels of nesting (see triggers/http/parser.py, MAX_NESTING),
# and a result is written inside other documents: 3 levels down in GET /invocations
# ({"Invocations": [{"Result": ...}]}), 1 in GET /invocations/{id}, a sync call's answer and a
# callback. A result nested deeper than this could be stored but not always served; the server
# checks it as it arrives (instances.Instance) and fails the run with ResultNotSerializable.
JSON_DEPTH = 254
MAX_RESULT_NESTING = JSON_DEPTH - 3
RESULT_TOO_DEEP = (
    f"the handler's return value is not JSON-serialisable: it nests deeper than {MAX_RESULT_NESTING} levels"
)
_MB = 1024 * 1024
_BALLAST = 4 * _MB  # under a memory_limit, let go of when it is reached: room to report it
_LEFTOVER_WAIT = 2.0  # seconds to wait for the processes a run left behind to die once killed
_THREAD_GRACE = 0.05  # seconds a thread the run started may take to end once the handler has returned
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
NO_NEW_PRIVILEGES = "--no-new-privileges"  # the argument that sets PR_SET_NO_NEW_PRIVS (see _become_user)
# The function's code is watched for changes (see _CodeFiles) in at most this many files: the
# server stats each of them every time it hands the instance a run.
MAX_CODE_FILES = 64
CHANGED_WHILE_LOADING = -1  # a file's mtime in its signature: it changed as it was read, no version to trust
_MTIME_SLACK_NS = 10_000_000  # file times come from a clock that lags by up to a tick (1-10 ms)


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write part of a large buffer to a pipe; write it all."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:  # the handler made stdout non-blocking, and so our copy of it
            os.set_blocking(fd, True)


def _identity(fd: int) -> tuple[int, int] | None:
    """What an fd is open on (device and inode: one pipe, one file), None if it is closed."""
    try:
        st = os.fstat(fd)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _flush_stdio() -> None:
    """Flush what the handler printed, as far as it left its streams usable."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001, S110 - closed, replaced by something odd, or its fd closed
            pass


class Context:
    """What a handler gets beside the event."""

    __slots__ = ("request_id", "function_name", "deadline", "memory_limit_in_mb", "_logger")

    def __init__(self, request_id: str, function_name: str, deadline: float, logger: Callable[[], logging.Logger]) -> None:
        self.request_id = request_id
        self.function_name = function_name
        self.deadline = deadline  # epoch seconds
        self.memory_limit_in_mb: int | None = None
        self._logger = logger

    def __repr__(self) -> str:
        return (
            f"Context(request_id={self.request_id!r}, function_name={self.function_name!r}, "
            f"deadline={self.deadline!r}, memory_limit_in_mb={self.memory_limit_in_mb!r})"
        )

    @property
    def logger(self) -> logging.Logger:
        """A logger whose lines go to the run's log (INFO and above)."""
        return self._logger()

    def remaining_time(self) -> float:
        """Seconds left before the run is stopped."""
        return max(0.0, self.deadline - time.time())

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left, for code written against other platforms."""
        return int(self.remaining_time() * 1000)


def _frame_json(payload: dict[str, Any] | list[Any]) -> bytes:
    """A frame's JSON: text and flags only, which the standard library writes as well as orjson."""
    # A lone surrogate (it can come with an exception's message) becomes "?": the parent's
    # parser accepts only valid UTF-8.
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")


def _frame_pieces(mark: bytes, frame: bytes) -> Iterator[bytes]:
    """A frame's line (`mark`, ending in FRAME_LAST, then its JSON and a newline) as lines of at most
    PIPE_BUF bytes, each to go out in one write: itself, as a rule (see FRAME_MORE)."""
    if len(frame) <= PIPE_BUF:
        yield frame
        return
    more = mark[: -len(FRAME_LAST)] + FRAME_MORE.encode()
    body = memoryview(frame)[len(mark) : -1]
    size = PIPE_BUF - len(mark) - 1
    at = 0
    while len(body) - at > size:
        yield more + body[at : at + size] + b"\n"
        at += size
    yield mark + body[at:] + b"\n"


def _ballast() -> Any:
    """Memory counted against the memory_limit but never touched (so not resident): an
    anonymous private mapping, given back when the limit is reached."""
    import mmap

    return mmap.mmap(-1, _BALLAST, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _result_json(value: Any) -> bytes:
    """A result's JSON, by eventrun's own rules (orjson, non-string keys allowed); TypeError if it has none.

    JSON has no NaN or Infinity, and orjson writes them (values and keys alike) as null, which
    would store another value than the one returned: such a result is refused. Finding one takes
    a walk through the value in Python, so only a result whose JSON holds the text null is walked
    (no other can hold them): most are not, and their check is one search of the bytes. Nor is
    one over MAX_RESULT, which fails for its size anyway.

    Nor are two keys of one dict written as the same string (1 and "1", True and "true"): orjson
    writes both, and whoever reads the JSON keeps one. Only a result with a key other than a str
    can hold them, and only such a result is walked: the first encoding, without non-string
    keys, fails for it.
    """
    if value is None:
        return b"null"
    import orjson

    try:
        encoded = orjson.dumps(value)
        keyed = False
    except TypeError as exc:
        if str(exc) != "Dict key must be str":
            raise _located(value, exc) from None
        try:
            encoded = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
        except TypeError as exc:
            raise _located(value, exc) from None
        keyed = True
    if len(encoded) > MAX_RESULT:
        return encoded
    if b"null" in encoded:
        where = _non_finite(value)
        if where is not None:
            raise TypeError(f"{where}; JSON has no NaN or Infinity (return such a number as a string, or None)")
    if keyed:
        where = _key_collision(value)
        if where is not None:
            raise TypeError(f"{where}; JSON keys are strings, so one value would be lost (give each a key of its own)")
    return encoded


_UNWRITTEN_HINTS = {
    "set": " (return a list)",
    "frozenset": " (return a list)",
    "bytes": " (return text: decoded, or in base64)",
    "bytearray": " (return text: decoded, or in base64)",
    "Decimal": " (return a string, or a float)",
}


def _located(result: Any, exc: TypeError) -> TypeError:
    """orjson's refusal of a value or a key it has no JSON for, said with where it is in the
    result (e.g. 'result["tags"] is of type set, which JSON cannot hold (return a list)'); any other
    refusal as it is. orjson's own words name only the type, once in broken English."""
    if not str(exc).startswith(("Type is not JSON serializable", "Dict key must")):
        return exc
    import dataclasses
    from enum import Enum

    import orjson

    def written(thing: Any) -> bool:
        try:
            orjson.dumps(thing, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:
            return False
        return True

    def unwritten(value: Any) -> str | None:
        if isinstance(value, dict):
            key = next((key for key in value if not written({key: None})), _NO_KEY)
            return None if key is _NO_KEY else f"has a key {_key_text(key)} of type {type(key).__name__}, which JSON cannot write as text"
        if isinstance(value, (list, tuple, Enum)) or dataclasses.is_dataclass(value) or written(value):
            return None  # (what it holds is looked at next)
        kind = type(value).__name__
        return f"is of type {kind}, which JSON cannot hold{_UNWRITTEN_HINTS.get(kind, '')}"

    where = _first_fault(result, unwritten)
    return TypeError(where) if where is not None else exc


_NO_KEY = object()


def _first_fault(result: Any, fault: Callable[[Any], str | None]) -> str | None:
    """Where `fault` first finds one in a result, walked as orjson writes it (dicts, lists,
    tuples, enums by their value, dataclasses by their fields), e.g. 'result["x"][2] is NaN';
    None if nowhere. `fault(value)` says what is wrong with a value itself (not what it holds)."""
    from enum import Enum

    plain = {str, int, bool, type(None)}  # (no call for these: nothing is wrong with them)

    def find(value: Any) -> tuple[list[str], str] | None:
        """The first one found: (the path's steps, innermost first; what fault said)."""
        what = fault(value)
        if what:
            return [], what
        if isinstance(value, dict):
            items: Any = value.items()
        elif isinstance(value, (list, tuple)):
            items = enumerate(value)
        elif isinstance(value, Enum):  # written as its value
            return find(value.value)
        elif hasattr(type(value), "__dataclass_fields__"):
            items = _dataclass_items(value)
        else:  # str, numbers, datetime, UUID and the like: nothing inside
            return None
        for key, item in items:
            if type(item) in plain:
                continue
            found = find(item)
            if found:
                found[0].append(_step(key, value))
                return found
        return None

    found = find(result)
    if found is None:
        return None
    steps, what = found
    return "result" + "".join(reversed(steps)) + " " + what


def _key_collision(result: Any) -> str | None:
    """Where a dict in a result has two keys orjson writes as the same string, e.g.
    'result["x"] has keys 1 and "1", both written "1"'; None if nowhere."""
    import orjson

    def written(keys: Any) -> dict[str, None]:
        return orjson.loads(orjson.dumps(dict.fromkeys(keys), option=orjson.OPT_NON_STR_KEYS))  # type: ignore[no-any-return]

    def clash(value: Any) -> str | None:
        if not isinstance(value, dict):
            return None
        if all(type(key) is str for key in value) or len(written(value)) == len(value):
            return None
        seen: dict[str, Any] = {}
        for key in value:
            name = next(iter(written([key])))
            if name in seen:
                return f"has keys {_key_text(seen[name])} and {_key_text(key)}, both written {_key_text(name)}"
            seen[name] = key
        return None

    return _first_fault(result, clash)


def _key_text(key: Any) -> str:
    """A key as a message shows it: a str as JSON, anything else as Python writes it; 40 characters at most."""
    text = json.dumps(key, ensure_ascii=False) if isinstance(key, str) else repr(key)
    return text if len(text) <= 42 else text[:40] + "..."


def _non_finite(result: Any) -> str | None:
    """Where a result holds a NaN or an infinity that orjson would write as null, e.g.
    'result["x"][2] is NaN'; None if nowhere. Only what orjson writes is looked at."""
    from enum import Enum
    from math import isfinite

    def name(number: Any) -> str | None:
        if isinstance(number, Enum):
            number = number.value
        if not isinstance(number, float) or isfinite(number):
            return None
        return "NaN" if number != number else "Infinity" if number > 0 else "-Infinity"

    def nan(value: Any) -> str | None:
        if isinstance(value, float):
            what = name(value)
            return f"is {what}" if what else None
        if isinstance(value, dict):
            for key in value:
                if type(key) is not str and (what := name(key)):
                    return f"has a key that is {what}"
        return None

    return _first_fault(result, nan)


def _dataclass_items(value: Any) -> list[tuple[str, Any]]:
    """A dataclass instance's fields as orjson writes them: its attributes but those named _..."""
    if hasattr(value, "__dict__"):
        return [(key, item) for key, item in vars(value).items() if not key.startswith("_")]
    import dataclasses

    missing = object()
    pairs = [(field.name, getattr(value, field.name, missing)) for field in dataclasses.fields(value)]
    return [(key, item) for key, item in pairs if item is not missing and not key.startswith("_")]


def _step(key: Any, container: Any) -> str:
    """One step of a path into a result: ["name"] or [1] for a key or an index, .name for a field."""
    if isinstance(key, str) and len(key) > 40:  # the path stays short enough to read
        key = key[:40] + "..."
    if not isinstance(container, (dict, list, tuple)):
        return f".{key}"
    if isinstance(key, str):
        return "[" + json.dumps(key, ensure_ascii=False) + "]"
    return f"[{key!r}]"


class _CodeFiles:
    """The function's code as this instance imported it, for the server to tell when it changed.

    That is the handler's file and every module the instance imported from the handler's
    folder or below it (not the interpreter's own, nor site-packages), each with its signature
    (st_mtime_ns, st_size, st_ino: an editor that saves by renaming a new file over the old one
    may keep its time and size) as the instance read it. Files are looked for once the handler's
    module is loaded, and after each run: a len() when the run imported nothing, else a scan of
    sys.modules. A file is statted once, when first found: statted again, it would take in a
    change made since it was read. One whose time falls since the run began (it may have changed
    after it was read) gets CHANGED_WHILE_LOADING, which no file has: the server replaces the
    instance.
    """

    __slots__ = ("_folder", "_skip", "_modules", "_new", "signatures", "left_out")

    def __init__(self, handler_file: str) -> None:
        self._folder = os.path.join(os.path.dirname(os.path.abspath(handler_file)), "")
        platform = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
        self._skip = tuple(os.path.join(folder, "") for folder in platform if folder)
        self._modules = 0  # len(sys.modules) when last looked at
        self._new = False  # files were added since the signatures were last reported
        self.signatures: dict[str, tuple[int, int, int]] = {}
        self.left_out = False  # files past MAX_CODE_FILES were found, and are not watched

    def look(self, since: int) -> None:
        """Take in the files of modules imported since the last look. `since`: when the run that
        imported them began (time.time_ns()), before it could import anything."""
        if len(sys.modules) != self._modules:
            self._modules = len(sys.modules)
            self._add(since)

    def report(self) -> list[list[Any]] | None:
        """Every file's [path, mtime_ns, size, ino], if files were added since the last report; else None."""
        if not self._new:
            return None
        self._new = False
        return [[path, *signature] for path, signature in self.signatures.items()]

    def _add(self, since: int) -> None:
        for path in self._files():
            if path in self.signatures:
                continue  # (statted again, it would take in a change made since it was read)
            if len(self.signatures) >= MAX_CODE_FILES:
                self.left_out = True
                return
            try:
                st = os.stat(path)
            except OSError:  # (e.g. a module from a zip file): not watched
                continue
            changed = since - _MTIME_SLACK_NS <= st.st_mtime_ns <= time.time_ns()
            self.signatures[path] = (CHANGED_WHILE_LOADING if changed else st.st_mtime_ns, st.st_size, st.st_ino)
            self._new = True

    def _files(self) -> list[str]:
        """The files of the modules loaded from the handler's folder or below it, in the order they came."""
        found = []
        for module in list(sys.modules.values()):
            try:
                path = module.__file__
            except Exception:  # noqa: BLE001, S112 - whatever the handler put in sys.modules
                continue
            if (
                type(path) is str
                and path.startswith(self._folder)
                and not path.startswith(self._skip)
                and "-packages" + os.sep not in path  # (site-packages, dist-packages)
                and path != __file__  # (the worker itself, should the handler live beside it)
                and path.isprintable()  # (a name the frame's JSON cannot carry as it is)
            ):
                found.append(path)
        return found


class _Worker:
    def __init__(self, handler: str, function: str, tasks: int, frames: int, memory_limit: int) -> None:
        self.handler_spec = handler
        self.function = function
        # (Never closed by the file object: should the handler close the fd, or open something
        # else on its number, finalising the object must not close what is there then.)
        self.tasks = os.fdopen(tasks, "rb", closefd=False)
        token, self.key, environment = _secrets(self.tasks.readline())
        os.environ.update(environment)  # the function's own variables (before any of its code runs)
        if "TZ" in environment:
            time.tzset()
        self.mark = (FRAME_MARK + token + FRAME_LAST).encode()
        self.answer = b"{"  # an end frame's start: the run it ends, named (see run_one)
        self.frames = frames  # a private copy of stdout's pipe
        # What the worker's fds are open on, to know whether a handler closed or replaced them.
        self._tasks_pipe = _identity(tasks)
        self._output_pipe = _identity(frames)
        self._stdin = _identity(0)  # /dev/null
        # sys.stdin, sys.stdout and sys.stderr as a run should leave them (once the handler's module
        # is imported: what that sets up is the instance's own); stderr as it is now, the run's log.
        self._streams = (sys.stdout, sys.stderr)
        self._stdin_stream = sys.stdin
        self._stderr = sys.stderr
        self.pid = os.getpid()  # a process the handler forks is not the instance (see _leave_fork)
        self.serving = True  # False once the tasks can no longer be read
        self.memory_limit = memory_limit  # bytes; 0: none
        self.handler: Callable[..., Any] | None = None
        self._logger: logging.Logger | None = None
        self._ballast = _ballast() if memory_limit else None
        self._threads: list[threading.Thread] | None = None  # those there as the handler was called
        self._code: _CodeFiles | None = None  # (once the handler is loaded)
        self._began = 0  # when the current run began (time.time_ns())

    def logger(self) -> logging.Logger:
        if self._logger is None:
            import logging

            logger = logging.getLogger(f"eventrun.function.{self.function}")
            logger.setLevel(logging.INFO)
            logger.propagate = False
            # The run's log, even inside contextlib.redirect_stderr (the handler is made once).
            stream = logging.StreamHandler(self._stderr)
            stream.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
            logger.addHandler(stream)
            self._logger = logger
        return self._logger

    def write(self, data: bytes) -> bool:
        """Output to the run's log, after what the handler printed; False if no fd reaches it any more."""
        return self._send(iter((data,)))

    def frame(self, payload: dict[str, Any]) -> bool:
        """Report to the parent (see send_frame), naming the run."""
        return self.send_frame(self.answer + _frame_json(payload)[1:])

    def send_frame(self, body: bytes, *, checked: bool = False) -> bool:
        """A frame, its JSON `body` after the mark, found by the parent wherever it is in the
        output; one longer than PIPE_BUF goes in pieces (see FRAME_MORE). False if no fd reaches
        the parent any more. `checked`: the private copy of stdout's pipe was just found on it."""
        return self._send(_frame_pieces(self.mark, self.mark + body + b"\n"), checked=checked)

    def _send(self, pieces: Iterator[bytes], *, checked: bool = False) -> bool:
        """Write the pieces, each in one write, after what the handler printed.

        They go through the private copy of stdout's pipe, unless the handler closed it or put
        something else on its number: then through any fd of this process still on that pipe
        (stdout, most often).
        """
        _flush_stdio()
        piece: bytes | None = next(pieces)
        fds = [self.frames] if checked or _identity(self.frames) == self._output_pipe else []
        for fd in fds or self._output_fds():
            try:
                while piece is not None:
                    _write_all(fd, piece)
                    piece = next(pieces, None)
            except OSError:  # e.g. the read end of the pipe, opened through /proc: try another, from this piece
                continue
            return True
        return False

    def _output_fds(self) -> list[int]:
        """This process's fds on the output pipe, stdout and stderr first."""
        try:
            found = sorted(int(name) for name in os.listdir("/proc/self/fd"))
        except OSError:
            found = [1, 2]
        return [fd for fd in found if _identity(fd) == self._output_pipe]

    def load(self) -> Callable[..., Any]:
        if self.handler is None:
            import importlib.util

            path, _, name = self.handler_spec.rpartition(":")
            sys.path.insert(0, os.path.dirname(path))
            self._code = _CodeFiles(path)
            stem = os.path.splitext(os.path.basename(path))[0]
            spec = importlib.util.spec_from_file_location(f"eventrun_handler_{stem}", path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load handler file {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            handler = getattr(module, name, None)
            if not callable(handler):
                raise AttributeError(f"handler file {path} has no callable {name!r}")
            self.handler = handler
        return self.handler

    def run_one(self, task: dict[str, Any]) -> None:
        self.answer = b'{"request_id":' + _frame_json(task["request_id"]) + b',"run":' + _frame_json(task.get("run")) + b","
        context = Context(
            request_id=task["request_id"],
            function_name=self.function,
            deadline=task["deadline"],
            logger=self.logger,
        )
        if self.memory_limit:
            context.memory_limit_in_mb = self.memory_limit // _MB
        failure: dict[str, Any] | None = None
        self._threads = None
        self._began = time.time_ns()
        loading = False
        try:
            imported = self.handler is not None
            loading = not imported
            handler = self.load()
            loading = False
            if not imported:  # what importing its module set up is the instance's, alike for each run
                self._streams = (sys.stdout, sys.stderr)
                self._stdin_stream = sys.stdin
                if self._code is not None:  # (before the handler runs: an edit meanwhile is seen as one)
                    self._code.look(self._began)
            self._threads = threading.enumerate()
            outcome = handler(task["event"], context)
            if _maybe_awaitable(outcome):
                import asyncio
                import inspect

                if inspect.isawaitable(outcome):
                    outcome = asyncio.run(_awaited(outcome))
        except BaseException as exc:  # SystemExit too: the run failed, the parent decides
            if os.getpid() != self.pid:
                _leave_fork(exc)
            failure = self.failed(exc, loading=loading)
        if os.getpid() != self.pid:
            _leave_fork(None)
        if failure is not None:  # (reported out of the except block, which holds the handler's frames)
            self.end({"ok": False, **failure, "recycle": True})
            return
        try:
            encoded = _result_json(outcome)
        except TypeError as exc:
            if str(exc) == "Recursion limit reached":  # orjson's, past JSON_DEPTH levels (or a cycle)
                message = f"{RESULT_TOO_DEEP} (or contains itself)"
            elif str(exc) == "Integer exceeds 64-bit range":
                message = (
                    "the handler's return value is not JSON-serialisable: it holds an integer beyond 64 bits"
                    " (a result's integers fit in 64 bits; return a larger one as a string)"
                )
            else:
                message = f"the handler's return value is not JSON-serialisable: {exc}"
            self.end({"ok": False, "error_type": "ResultNotSerializable", "error_message": message, "recycle": False})
            return
        except MemoryError as exc:
            failure = self.failed(exc)
        except Exception as exc:  # noqa: BLE001 - e.g. OSError EMFILE: the run holds every file descriptor
            self.end(
                {
                    "ok": False,
                    "error_type": type(exc).__name__,
                    "error_message": f"the handler's result could not be written: {exc}"[:MAX_MESSAGE],
                    "recycle": True,
                }
            )
            return
        if failure is not None:
            del outcome
            self.end({"ok": False, **failure, "recycle": True})
            return
        if len(encoded) > MAX_RESULT:
            self.end(
                {
                    "ok": False,
                    "error_type": "ResultTooLarge",
                    "error_message": f"the handler's result is {len(encoded)} bytes; the limit is {MAX_RESULT}",
                    "recycle": False,
                }
            )
            return
        self.end(None, encoded)

    def failed(self, exc: BaseException, *, loading: bool = False) -> dict[str, str]:
        """Print the handler's traceback to the run's log; the error type and message to report.

        `loading`: raised as the handler's module was imported, or its callable looked for: the
        run fails HANDLER_LOAD_FAILED, naming the exception, and the traceback starts in the
        function's own code (its import went through this worker and importlib first).
        """
        if self.memory_limit and _out_of_memory(exc):
            if self._ballast is not None:
                self._ballast.close()  # the room to report it in
                self._ballast = None
            error_type = "MemoryLimitExceeded"
            message = f"the function ran out of memory: its memory_limit is {self.memory_limit // _MB} MB"
            if isinstance(exc, RuntimeError):
                message += " (a new thread's stack did not fit)"
        else:
            error_type = type(exc).__name__
            try:
                message = str(exc)
            except BaseException:  # noqa: BLE001 - a hostile __str__ does not take the report down with it
                message = f"<{error_type} whose message cannot be read>"
            if loading:
                message = f"the handler {self.handler_spec} could not be loaded: {error_type}: {message}"
                error_type = HANDLER_LOAD_FAILED
        try:
            import traceback

            # Skip this frame: the user's traceback starts at their handler.
            frames = exc.__traceback__.tb_next if exc.__traceback__ else None
            trace = traceback.format_exception(type(exc), exc, _past_the_loader(frames) if loading else frames)
            text = "".join(trace)
        except BaseException:  # noqa: BLE001 - e.g. MemoryError again
            text = f"{error_type}: {message}\n"
        self.write(text.encode("utf-8", "replace"))
        return {"error_type": error_type, "error_message": message[:MAX_MESSAGE]}

    def end(self, failure: dict[str, Any] | None, result: bytes = b"") -> None:
        """Report the run's outcome (a failure, else the result's JSON), once what it left behind is gone.

        A run that left processes or threads running, broke its standard streams or the worker's
        own fds does not leave its instance warm: the parent discards it ("recycle"). Should no
        fd on the output pipe be left to report through, the parent sees the pipe end without an
        outcome and says so (the run closed its output); this process waits to be stopped.
        """
        notes: list[str] = []
        killed = _end_leftovers(_LEFTOVER_WAIT)
        if killed:
            pids = ", ".join(map(str, killed[:10])) + (", ..." if len(killed) > 10 else "")
            notes.append(f"the run left {len(killed)} processes running ({pids}); they were killed, and this instance")
        if not _still_subreaper():  # what it starts from now on would go to the spawner: killed as the instance goes
            notes.append("the run let go of the processes it starts (PR_SET_CHILD_SUBREAPER 0); this instance")
        threads = _threads_left(self._threads) if self._threads is not None else 0
        if threads:  # (a thread cannot be stopped: it would go on into the next runs)
            notes.append(f"the run left {threads} threads running; this instance")
        on = {fd: _identity(fd) for fd in (0, 1, 2, self.tasks.fileno(), self.frames)}  # (one fstat each, per run)
        if not self._stdio_intact(on):
            notes.append("the run closed or replaced its stdout or stderr; this instance")
        if not self._stdin_intact(on):
            notes.append("the run closed or replaced its stdin; this instance")
        if not _fd_free(self.frames):  # (what the next run would need, from an import on)
            notes.append("the run left no file descriptor free; this instance")
        own_fds = self._own_fds_intact(on)
        if not own_fds:
            # No more tasks can be read: this process ends once the outcome is out.
            self.serving = False
            notes.append(
                f"the run closed or replaced the file descriptors eventrun's worker reads events from and reports"
                f" through ({self.tasks.fileno()} and {self.frames}); this instance"
            )
        for note in notes:
            self.write(f"[eventrun] {note} is not reused\n".encode())
        recycle = bool(notes)
        code = None if recycle else self._code_changes()
        if failure is not None:
            sent = self.frame({**failure, "recycle": True} if recycle else {**failure, "code": code} if code else failure)
        elif recycle:
            sent = self.send_frame(self.answer + b'"ok":true,"recycle":true,"result":' + result + b"}")
        elif code:
            sent = self.send_frame(
                self.answer + b'"ok":true,"code":' + _frame_json(code) + b',"result":' + result + b"}", checked=True
            )
        else:  # (the usual end: the fds were just found as they were)
            sent = self.send_frame(self.answer + b'"ok":true,"result":' + result + b"}", checked=True)
        if not sent:
            while True:  # stopped by the parent, or by the watch should the parent be gone
                time.sleep(3600)

    def _code_changes(self) -> list[list[Any]] | None:
        """The signature of the code this instance runs, to report with the outcome of a run that
        keeps it, if it changed since last reported (after the first run, as a rule); else None."""
        if self._code is None:
            return None
        self._code.look(self._began)
        code = self._code.report()
        if code and self._code.left_out:
            self.write(
                f"[eventrun] the function imported more than {MAX_CODE_FILES} files from its folder: changes to"
                " those past them are not seen until its instances are replaced\n".encode()
            )
        return code

    def _stdio_intact(self, on: dict[int, tuple[int, int] | None]) -> bool:
        """True if fds 1 and 2 are still the output pipe, and sys.stdout and sys.stderr the objects
        they were before the run, and open."""
        if on[1] != self._output_pipe or on[2] != self._output_pipe:
            return False
        if sys.stdout is not self._streams[0] or sys.stderr is not self._streams[1]:
            return False
        return not any(stream is None or getattr(stream, "closed", False) for stream in (sys.stdout, sys.stderr))

    def _stdin_intact(self, on: dict[int, tuple[int, int] | None]) -> bool:
        """True if fd 0 is still /dev/null, and sys.stdin the object it was before the run, and open."""
        stream = sys.stdin
        if on[0] != self._stdin or stream is not self._stdin_stream:
            return False
        return stream is not None and not getattr(stream, "closed", False)

    def _own_fds_intact(self, on: dict[int, tuple[int, int] | None]) -> bool:
        """True if the worker's private copies of its pipes are still open on them."""
        return on[self.tasks.fileno()] == self._tasks_pipe and on[self.frames] == self._output_pipe

    def serve(self) -> None:
        while self.serving:
            try:
                line = self.tasks.readline()
            except (OSError, ValueError):  # its fd closed meanwhile (by a thread a handler left)
                return
            if not line:
                return  # the parent closed it: no more events
            if line.strip():
                task = _task(line, self.key)
                if task is None:
                    # Written by some other process that got hold of the task pipe: whatever comes
                    # on it may be that process's, so the instance takes no more.
                    self.write(b"[eventrun] a task that did not come from eventrun was refused; this instance ends\n")
                    return
                self.run_one(task)


def _secrets(line: bytes) -> tuple[str, str, dict[str, str]]:
    """The frame token, the task key and the function's environment, from the first line on the
    task pipe ("TOKEN KEY {JSON}")."""
    token, _, rest = line.partition(b" ")
    key, _, environment = rest.partition(b" ")
    try:
        words = [token.decode("ascii"), key.decode("ascii")]
        variables = json.loads(environment)
    except ValueError:
        words, variables = [], None
    if not all(word.isalnum() for word in words) or len(words) != 2 or type(variables) is not dict:
        raise SystemExit("eventrun: the instance's first line on its task pipe is not its token, key and environment")
    return words[0], words[1], variables


def _task(line: bytes, key: str) -> dict[str, Any] | None:
    """A task line, read; None unless it is a JSON object that carries the instance's key."""
    try:
        task = json.loads(line)
    except ValueError:
        return None
    if type(task) is not dict or task.get("key") != key or type(task.get("request_id")) is not str:
        return None
    return task


def _fd_free(fd: int) -> bool:
    """Whether the process can still open a file descriptor (a dup of `fd`, closed again)."""
    try:
        os.close(os.dup(fd))
    except OSError as exc:
        return exc.errno != 24  # EMFILE (a closed `fd` is no sign of a full table)
    return True


def _past_the_loader(frames: TracebackType | None) -> TracebackType | None:
    """A traceback from its first frame in the function's own code: without this worker's and
    importlib's frames before it (none is left when the error is the loader's own)."""
    while frames is not None and (
        frames.tb_frame.f_code.co_filename == __file__ or frames.tb_frame.f_code.co_filename.startswith("<frozen importlib")
    ):
        frames = frames.tb_next
    return frames


def _leave_fork(exc: BaseException | None) -> NoReturn:
    """End a process the handler forked that came back from it (a return, `exc` raised, SystemExit)
    as the end of a script would, but at once: it is not the instance, and reports nothing,
    reads no event."""
    code: Any = 0
    if isinstance(exc, SystemExit):
        code = exc.code
    elif exc is not None:
        code = 1
        try:
            import traceback

            traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next if exc.__traceback__ else None)
        except BaseException:  # noqa: BLE001, S110 - a broken stderr, MemoryError: it ends all the same
            pass
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message")
        try:
            print(code, file=sys.stderr)
        except BaseException:  # noqa: BLE001, S110
            pass
        code = 1
    _flush_stdio()
    os._exit(code & 0xFF)


def _out_of_memory(exc: BaseException) -> bool:
    """Whether an exception says that memory could not be had: MemoryError, ENOMEM (a mapping, a
    fork), or a thread whose stack could not be mapped."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError):
        return exc.errno == 12  # ENOMEM
    return type(exc) is RuntimeError and exc.args == ("can't start new thread",)


def _threads_left(before: list[threading.Thread], grace: float = _THREAD_GRACE) -> int:
    """How many threads that were not among `before` are alive after `grace` seconds at most
    (counted first: most runs leave none). A thread that has just handed its work over to the
    handler may not have returned yet: it is not taken for one left running."""
    if threading.active_count() <= sum(thread.is_alive() for thread in before):
        return 0
    known = set(before)
    left = [thread for thread in threading.enumerate() if thread not in known]
    deadline = time.monotonic() + grace
    while (alive := sum(thread.is_alive() for thread in left)) and time.monotonic() < deadline:
        time.sleep(0.001)
    return alive


def _maybe_awaitable(value: Any) -> bool:
    """Cheap and never wrong the other way: everything inspect.isawaitable accepts passes."""
    return hasattr(value, "__await__") or type(value).__name__ == "generator"


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _watch_parent(parent: int) -> None:
    """End this instance, its process group and what it started when its parent is gone (e.g. kill -9).

    The parent is the server, or the spawner the server forks instances from (which ends its
    instances when the server is gone). The instance runs in a process group of its own, so
    that death reaches it only through this watch; its runs are recorded FAILED on restart
    and must not go on unseen.
    """
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            _end_leftovers(0.5)
            os.killpg(os.getpgrp(), signal.SIGKILL)


def children_of(pid: int) -> list[int]:
    """The pids of a process's children, from /proc (its zombies included)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as file:
                found += map(int, file.read().split())
        except FileNotFoundError:
            if os.path.isdir(f"/proc/{pid}/task/{tid}"):  # a kernel without CONFIG_PROC_CHILDREN
                return _children_by_scan(pid)
        except OSError:  # the thread or the process ended meanwhile
            pass
    return found


def _children_by_scan(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as file:
                    stat = file.read()
            except OSError:
                continue
            if int(stat.rpartition(b")")[2].split()[1]) == pid:
                found.append(int(name))
    return found


def _end_leftovers(wait: float) -> list[int]:
    """Kill every process this instance has below it, wait up to `wait` s for them; the pids killed.

    As a subreaper, the instance is the parent of every process the run started, or of its
    parent: each round kills the children (their own children then come to this process)
    and reaps what died, until no child is left. Zombies (children that ended and were never
    waited for) are reaped, not counted.
    """
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return []  # no child at all: the usual case, for one system call
    killed: list[int] = []
    me = os.getpid()
    deadline = time.monotonic() + wait
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            break  # none left
        if time.monotonic() > deadline:
            break
        for pid in children_of(me):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            if pid not in killed:
                killed.append(pid)
        time.sleep(0.002)
    return killed


def _subreaper() -> None:
    """Become the process that orphans below this one are handed to (instead of init; not on
    Linux: process groups alone, then)."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _still_subreaper() -> bool:
    """Whether this process is still the subreaper of what it starts (a handler may undo it, and
    the processes it then leaves behind pass to the spawner); True where that cannot be asked."""
    libc = _libc()
    if libc is None:
        return True
    import ctypes

    flag = ctypes.c_int(1)
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)
    return flag.value != 0


def _libc() -> Any:
    """The C library, through ctypes (loaded once); None where it has no prctl (not Linux)."""
    global _LIBC
    if _LIBC is False:
        try:
            import ctypes

            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.prctl  # noqa: B018 - AttributeError where there is none
        except (ImportError, OSError, AttributeError):
            _LIBC = None
    return _LIBC


_LIBC: Any = False  # not loaded yet


def _undumpable() -> None:
    """Make this process not dumpable: other processes of its user no longer open its /proc/PID/fd,
    mem or environ, nor ptrace it. A fork keeps it; an exec makes a process dumpable again."""
    _prctl(_PR_SET_DUMPABLE, 0)


def _prctl(option: int, value: int) -> None:
    """prctl(option, value) on Linux; elsewhere, nothing."""
    libc = _libc()
    if libc is not None:
        libc.prctl(option, value, 0, 0, 0)


def _limit_memory(limit: int) -> None:
    """Cap the process's data memory (and its children's) at `limit` bytes; the hard limit too,
    so the function cannot lift it."""
    import resource

    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _deprioritise() -> None:
    """Should the machine run out of memory, let the kernel pick an instance before the server.

    The spawner too (its instances keep its score; as a rule they hold more memory than it, and go
    first), as only a process still dumpable may write its own score (see the end of this file)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as file:
            file.write("500")
    except OSError:
        pass


def main() -> None:
    """Entry point of an instance process (not dumpable by now: see the end of this file)."""
    handler, function = sys.argv[1:3]
    memory_limit = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    if sys.argv[4:5] == [NO_NEW_PRIVILEGES]:  # started by the server as a function's run_as user
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    import orjson  # noqa: F401 - for the end of a run (see the imports); loaded already in a forked instance

    _subreaper()
    if memory_limit:
        _limit_memory(memory_limit)  # before the handler's module is imported (with the first event)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
    # Tasks come on a private copy of stdin; the handler sees an empty stdin. Frames go out on
    # a private copy of stdout.
    tasks = os.dup(0)
    frames = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    _Worker(handler, function, tasks, frames, memory_limit).serve()


# -- the spawner ----------------------------------------------------------------------------
#
# A fresh interpreter costs every instance 30 ms or more of CPU before it can load its handler.
# The spawner is one interpreter, started once by the server, that has done that already: it
# forks each instance on request and the child becomes the worker above, with the function's
# own process group, standard streams, folder and environment. The server and the spawner
# talk over a SOCK_SEQPACKET socket: one JSON message each way per request, the instance's two
# pipe ends passed along; the spawner also reports each instance's exit status, as only the
# parent of a process can learn it.

_SPAWN_MESSAGE = 1 << 20  # a request's size bound: the environment is most of it
_SWEEP_EVERY = 1.0  # seconds: how long a child of the spawner that is no instance may live, at most


def spawner(control: int) -> None:
    """Fork instances on request until the server closes its end, then end every instance left."""
    import contextlib
    import select
    import socket

    sock = socket.socket(fileno=control)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # the wake-up byte is what counts
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # shutdown comes from the server, not a terminal
    _subreaper()  # (also loads ctypes, so that instances forked from here have it at hand)
    import orjson  # noqa: F401 - once, for every instance forked from here (see main())
    # What the worker itself imports when first needed (a memory_limit, a traceback, context.logger,
    # a result it cannot write), once too: a function run as a user who cannot read this Python's
    # files could not import them. (asyncio, for async handlers, is not: it would cost the spawner
    # 45 ms and 7 MB.)
    import dataclasses  # noqa: F401
    import enum  # noqa: F401
    import importlib.util  # noqa: F401
    import logging  # noqa: F401
    import math  # noqa: F401
    import mmap  # noqa: F401
    import resource  # noqa: F401
    import traceback  # noqa: F401
    children: set[int] = set()

    def send(message: dict[str, Any]) -> None:
        try:
            sock.send(json.dumps(message).encode())
        except OSError:
            pass  # the server is gone; the loop ends at the next read

    def reap() -> None:
        reaped = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reaped = True
            if pid in children:
                children.discard(pid)
                send({"exit": pid, "code": os.waitstatus_to_exitcode(status)})
        if reaped:
            sweep()

    def sweep() -> None:
        # A child of ours that is no instance goes: one left by an instance that died (this
        # spawner is their subreaper), or one a run made our child (clone with CLONE_PARENT),
        # out of its instance's sight. Its own children come to us, and go next.
        for pid in children_of(os.getpid()):
            if pid not in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    control = sock.fileno()
    swept = time.monotonic()
    while True:
        ready, _, _ = select.select([control, wake_r], [], [], max(0.0, swept + _SWEEP_EVERY - time.monotonic()))
        if time.monotonic() >= swept + _SWEEP_EVERY:
            sweep()
            swept = time.monotonic()
        if wake_r in ready:
            while True:
                try:
                    if not os.read(wake_r, 512):
                        break
                except BlockingIOError:
                    break
            reap()
        if control not in ready:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(sock, _SPAWN_MESSAGE, 2)
        except OSError:
            data, fds = b"", []
        if not data:
            break  # the server is gone (or closed its end to stop us)
        request = json.loads(data)
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            send({"id": request["id"], "error": f"{type(exc).__name__}: {exc}"})
            continue
        if pid == 0:
            # The instance. Leaving by SystemExit (never back into this loop) lets the
            # interpreter shut down as usual: atexit handlers run, streams are flushed.
            signal.set_wakeup_fd(-1)
            sock.close()
            os.close(wake_r)
            os.close(wake_w)
            raise SystemExit(_become_instance(request, fds))
        for fd in fds:
            os.close(fd)
        children.add(pid)
        send({"id": request["id"], "pid": pid})
        reap()
    for pid in children:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    # What those instances had started comes to us as they die: end it all before we go.
    _end_leftovers(2.0)


def _become_instance(request: dict[str, Any], fds: list[int]) -> int | str | None:
    """In a child of the spawner: take the instance's place, run the worker, give its exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setsid()  # its own process group, as a started instance has
    tasks_in, output = fds
    os.dup2(tasks_in, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    if request.get("user"):
        _become_user(*request["user"])
    arguments = [request["handler"], request["function"], str(request["memory_limit"])]
    if request.get("fresh"):
        _become_fresh_interpreter(arguments, request["env"])
    os.environ.clear()
    os.environ.update(request["env"])
    time.tzset()  # TZ may differ from the spawner's
    sys.argv = [__file__, *arguments]
    try:
        main()
    except SystemExit as exc:
        return exc.code
    return 0


def _become_user(uid: int, gid: int, groups: list[int]) -> None:
    """In a child of the spawner (root): become the function's user, for good (real, effective
    and saved ids, and its groups alone), before any of its code runs. Should that fail, the
    reason goes to the instance's output (the run's log) and the instance ends, status 126."""
    try:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        os.write(2, f"eventrun: cannot run as uid {uid}, gid {gid}: {exc}\n".encode())
        os._exit(126)
    _undumpable()  # (a change of user leaves it as the system's suid_dumpable says)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)  # nor may a set-user-ID program it runs (su, sudo) make it root again


def _become_fresh_interpreter(arguments: list[str], env: dict[str, str]) -> None:
    """In a child of the spawner: start the worker in a new interpreter, as the server would.

    The process stays the spawner's child, so what it leaves behind still comes to a subreaper
    that kills it (the server is none). Never returns: should the exec fail, the reason goes to
    the instance's output (the run's log) and the instance ends with status 127.
    """
    try:
        os.execve(sys.executable, [sys.executable, "-P", __file__, *arguments], env)
    except OSError as exc:
        os.write(2, f"eventrun: cannot start a fresh interpreter ({sys.executable}): {exc}\n".encode())
    os._exit(127)


if __name__ == "__main__":
    # First thing, in the spawner and in a fresh instance alike (a forked instance keeps both from
    # the spawner). Raising its own oom_score_adj comes first: a process not dumpable owns no file
    # of its /proc, and, if not root, cannot write it.
    _deprioritise()
    _undumpable()
    if sys.argv[1:2] == ["--spawner"]:
        spawner(int(sys.argv[2]))
    else:
        main()
