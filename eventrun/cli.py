"""The `eventrun` command: `serve`, and the client commands that talk to a running server."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from eventrun.client import (
    DEFAULT_MANIFEST,
    DEFAULT_URL,
    LIST_LIMIT,
    MAX_LIMIT,
    POLL_FIRST,
    POLL_MAX,
    STATUSES,
    TERMINAL,
    TERMINATE_WAIT,
    CliError,
    Client,
    NoAnswer,
    describe_stream_error,
    end_state,
    describe_os_error,
    printable,
    sse_events,
)
from eventrun.engine.tokens import token_problem

def resolve_url(args: argparse.Namespace, manifest: Any = None) -> str:
    """--url, else the manifest's server address, else $EVENTRUN_URL, else the default.

    The manifest is the one `load_client_manifest` reads: --config FILE, else ./eventrun.toml,
    each with the EVENTRUN_* variables applied, else those variables alone. With no manifest
    file, its address counts only where EVENTRUN_SERVER__URL, __HOST or __PORT set one.
    """
    if manifest is None and not args.url:
        manifest = load_client_manifest(args.config)
    url = args.url or _manifest_url(manifest) or os.environ.get("EVENTRUN_URL") or DEFAULT_URL
    if control := next((char for char in url if unicodedata.category(char) == "Cc"), None):
        # (urllib drops tabs and line breaks as it reads a URL: the request would carry them)
        raise CliError(f"not a server URL: it holds {control!r}, a control character", exit_status=2)
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # (raises for a port that is not a number from 0 to 65535)
    except ValueError:
        parts = urllib.parse.SplitResult("", "", "", "", "")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CliError(f"not an http(s) URL: {url!r} (expected e.g. {DEFAULT_URL})", exit_status=2)
    problem = _server_url_problem(url, parts)
    if problem is not None:
        raise CliError(problem, exit_status=2)
    return url.rstrip("/")


def _server_url_problem(url: str, parts: urllib.parse.SplitResult) -> str | None:
    """Why an http(s) URL cannot name the server requests go to, or None.

    Paths are appended to it, so it holds no query or fragment; a server asks for a token, not
    a password. Said without echoing the password, or the query (it may hold a secret too).
    """
    if "@" in parts.netloc:
        shown = f"{parts.scheme}://...@{parts.netloc.rpartition('@')[2]}"
        return f"not a server URL: {shown!r} holds a user name or password (a server's ui_token goes in --token)"
    base = f"{parts.scheme}://{parts.netloc}{parts.path}"
    for mark, what in (("?", "a query"), ("#", "a fragment")):
        if mark in url:
            shown = base + mark + "..."
            return f"not a server URL: {shown!r} holds {what}; give the server's address alone, e.g. {DEFAULT_URL}"
    if " " in parts.netloc:
        return f"not a valid host name in {base!r}: it holds a space"
    try:
        (parts.hostname or "").encode("idna")  # as the connection will look the name up
    except UnicodeError as exc:
        return f"not a valid host name in {base!r}: {exc.__cause__ or exc}"
    wrong = next((char for char in parts.path if not "!" <= char <= "~"), None)
    if wrong is not None:
        return f"not a valid URL path in {base!r}: {wrong!r} cannot be sent as it is (percent-encode it)"
    return None


def client_for(args: argparse.Namespace) -> Client:
    """A client of the server the arguments name, with its ui_token if it asks for one."""
    manifest = None
    # An explicit --config is always read (a missing or refused one is a usage error); the
    # manifest found in the current folder only when --url and --token leave something to find.
    if args.config or not (args.url and getattr(args, "token", None)):
        manifest = load_client_manifest(args.config)
    return Client(resolve_url(args, manifest), resolve_token(args, manifest))


def resolve_token(args: argparse.Namespace, manifest: Any = None) -> str | None:
    """--token, else the manifest's [server] ui_token (or EVENTRUN_SERVER__UI_TOKEN), else $EVENTRUN_TOKEN."""
    if manifest is None and not getattr(args, "token", None):
        manifest = load_client_manifest(args.config)
    sources = (
        ("--token", getattr(args, "token", None)),
        ("[server] ui_token", manifest.server.ui_token if manifest is not None else None),
        ("EVENTRUN_TOKEN", os.environ.get("EVENTRUN_TOKEN")),
    )
    for source, token in sources:
        if token:
            # A token the request could not carry as written would crash it, or be refused.
            problem = token_problem(token)
            if problem is not None:
                raise CliError(f"{source}: {problem}", exit_status=2)
            return token
    return None


def _manifest_path(config: str | None) -> Path | None:
    """--config FILE as given (it must then exist), else ./eventrun.toml if it exists, else None."""
    if config:
        return Path(config)
    path = Path(DEFAULT_MANIFEST)
    return path if path.is_file() else None


# Variables a client reads itself; every other EVENTRUN_* variable is the manifest's.
_CLIENT_VARIABLES = ("EVENTRUN_URL", "EVENTRUN_TOKEN")


def load_client_manifest(config: str | None) -> Any:
    """The manifest a client command finds its server in, read as `eventrun serve` reads it.

    --config FILE, else ./eventrun.toml if it exists, else the defaults, each with the
    EVENTRUN_<TABLE>__<KEY> variables applied (None when there is neither a file nor such a
    variable: the defaults alone, without loading pydantic). A manifest that is missing or
    refused is a usage error (exit status 2) with the message `serve` gives for it.
    """
    path = _manifest_path(config)
    if path is None and not any(
        name.upper().startswith("EVENTRUN_") and name.upper() not in _CLIENT_VARIABLES for name in os.environ
    ):
        return None
    # Imported here so that a client with nothing to read never loads pydantic.
    from eventrun.engine.errors import EventrunError
    from eventrun.engine.manifest import load_manifest

    try:
        return load_manifest(path)
    except EventrunError as exc:
        raise CliError(str(exc), exit_status=2) from None


def _manifest_url(manifest: Any) -> str | None:
    """The manifest's server address; with no manifest file, only one the environment set."""
    if manifest is None:
        return None
    if manifest.path is None and not {"url", "host", "port"} & manifest.server.model_fields_set:
        return None  # the defaults alone: $EVENTRUN_URL may still name the server
    return str(manifest.server.base_url)


# --------------------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the gateway, every configured trigger and the engine."""
    # Imported here so the client commands never load the engine.
    from eventrun.app import serve
    from eventrun.engine.errors import EventrunError

    config = Path(args.config) if args.config else _manifest_path(None)
    try:
        return serve(config)
    except EventrunError as exc:  # a bad manifest, a refused async-mode flip, …
        raise CliError(str(exc)) from None


def _single_node_manifest(args: argparse.Namespace, instead: str) -> Any:
    """The manifest of --config (or ./eventrun.toml, or defaults alone) for backup and restore;
    CliError (exit status 2) for a PostgreSQL store, saying what to do `instead`."""
    from eventrun.engine.manifest import Manifest

    manifest = load_client_manifest(args.config) or Manifest()
    if manifest.store.shared:
        raise CliError(
            f"the store is PostgreSQL ([store] url): its runs and their logs are all in the database; {instead}",
            exit_status=2,
        )
    return manifest


def _copying(step: Callable[[], Any], interrupted: str) -> Any:
    """`step()`, a backup or a restore, with SIGTERM taken as Ctrl-C: its refusals exit 2, its
    failures 1, and an interruption says `interrupted` (what it left as it was)."""
    from eventrun.engine.backup import BackupRefused, terminated_as_interrupted
    from eventrun.engine.errors import EventrunError

    try:
        with terminated_as_interrupted():
            return step()
    except BackupRefused as exc:
        raise CliError(str(exc), exit_status=2) from None
    except EventrunError as exc:
        raise CliError(str(exc)) from None
    except KeyboardInterrupt:
        print(f"eventrun: {interrupted}", file=sys.stderr)
        raise


def cmd_backup(args: argparse.Namespace) -> int:
    """Copy a single node's store and logs into a new folder, while its server serves or not."""
    from eventrun.engine.backup import take_backup

    manifest = _single_node_manifest(args, "back it up as PostgreSQL is (pg_dump)")
    folder = Path(args.folder).absolute()
    taken = _copying(
        lambda: take_backup(manifest.data_dir, folder, manifest.server.retention),
        f"the backup was interrupted; what it had copied into {folder} was removed",
    )
    left_out = (
        f"; it left out {taken.left_out:,} run{'' if taken.left_out == 1 else 's'} that [server] retention deleted, "
        "or could have, while it copied"
        if taken.left_out else ""
    )
    print(
        f"backed up {taken.runs:,} runs ({taken.store_bytes:,} bytes) and {taken.logs:,} logs "
        f"({taken.log_bytes:,} bytes) from {manifest.data_dir} to {taken.folder}{left_out}"
    )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Put a folder `eventrun backup` made in place as the data_dir's store and logs, no server running on it."""
    from eventrun.engine.backup import restore_backup

    manifest = _single_node_manifest(args, "restore it as PostgreSQL is (pg_restore or psql)")
    folder = Path(args.folder).absolute()
    restored = _copying(
        lambda: restore_backup(folder, manifest.data_dir),
        f"the restore was interrupted; the data_dir {manifest.data_dir} is as it was",
    )
    print(
        f"restored {restored.runs:,} runs ({restored.store_bytes:,} bytes) and {restored.logs:,} logs "
        f"({restored.log_bytes:,} bytes) from {folder} to {restored.folder}"
    )
    return 0


def cmd_invoke(args: argparse.Namespace) -> int:
    """Invoke a function; print its RequestId, or its result with --wait."""
    client = client_for(args)
    body, content_type = _invoke_body(args.data, args.file)
    status, answer = _send_event(client, args.name, body, content_type, key=args.idempotency_key)
    answer = answer if isinstance(answer, dict) else {}
    request_id = str(answer.get("RequestId", ""))
    if not request_id:
        raise CliError(f"{client.base_url} accepted the event but sent no RequestId")
    # A sync function answers 200 once its run has ended (or, should the server stop first, with
    # the run as it stands); an async one 202 at once.
    ended = answer if status == 200 and "Status" in answer else None
    if not args.wait:
        print(printable(str(request_id)))
        if ended is not None:
            _raise_unless_finished(client, request_id, ended)
        return 0
    try:
        outcome = ended or _wait(client, request_id)
    except KeyboardInterrupt:  # (its RequestId was not printed yet: it would be lost with the wait)
        print(f"eventrun: stopped waiting; the run {request_id} goes on: `eventrun status {request_id}` shows it", file=sys.stderr)
        raise
    _raise_unless_finished(client, request_id, outcome)
    print(_json(outcome.get("Result")))
    return 0


def _send_event(client: Client, name: str, body: bytes, content_type: str, *, key: str | None = None) -> tuple[int, Any]:
    """POST the event (with `key` as its Idempotency-Key); the status and the answer. A sync
    function answers once its run has ended, however long that takes (a run queued at its
    function's concurrency waits its turn first), so once connected the answer is waited for
    without a time limit."""
    path = f"/functions/{_quote(name)}/invocations"
    headers = {"Content-Type": content_type, **_key_header(key)}
    try:
        return client.call("POST", path, body=body, headers=headers, timeout=None)
    except NoAnswer as exc:
        raise CliError(_unanswered_event(client, name, exc, keyed=key is not None)) from None


def _unanswered_event(client: Client, name: str, exc: NoAnswer, *, keyed: bool = False) -> str:
    """The one line for an event sent whose answer never came: the run may be going on."""
    if exc.request_id:
        return (
            f"sent the event for {name} to {client.base_url}, but the answer was cut off ({exc.reason}); "
            f"the run {exc.request_id} may still be going on: `eventrun status {exc.request_id}` shows it"
        )
    if keyed:
        return (
            f"sent the event for {name} to {client.base_url}, but no answer came ({exc.reason}); send it again "
            f"with the same --idempotency-key: if the server accepted it, that answers its run rather than making another"
        )
    return (
        f"sent the event for {name} to {client.base_url}, but no answer came ({exc.reason}); if the server "
        f"accepted it, the run may still be going on: `eventrun list --function {name}` shows it"
    )


def _invoke_body(data: str | None, file: str | None) -> tuple[bytes, str]:
    if data is not None:
        try:
            orjson.loads(data)  # as the server reads it (no NaN or Infinity)
        except ValueError as exc:
            raise CliError(f"--data is not valid JSON: {exc}", exit_status=2) from None
        return data.encode("utf-8"), "application/json"
    if file is not None:
        try:
            raw = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read {file}: {describe_os_error(exc)}", exit_status=2) from None
        try:
            orjson.loads(raw)
        except ValueError:
            return raw, "application/octet-stream"
        return raw, "application/json"
    return b"{}", "application/json"


def _wait(client: Client, request_id: str, deadline: float | None = None) -> dict[str, Any]:
    """Poll an invocation until it ends (or the deadline passes); return its last state."""
    delay = POLL_FIRST
    while True:
        invocation = _get_invocation(client, request_id)
        if invocation.get("Status") in TERMINAL:
            return invocation
        if deadline is not None and time.monotonic() >= deadline:
            return invocation
        time.sleep(delay)
        delay = min(delay * 1.5, POLL_MAX)


def _get_invocation(client: Client, request_id: str) -> dict[str, Any]:
    _, invocation = client.call("GET", f"/invocations/{_quote(request_id)}")
    if not isinstance(invocation, dict):
        raise CliError(f"{client.base_url} answered with an invocation that is not a JSON object")
    return invocation


def _raise_unless_finished(client: Client, request_id: str, state: dict[str, Any]) -> None:
    """Raise the one-line account of a run that ended other than FINISHED, or has not ended."""
    status = state.get("Status")
    if status == "FINISHED":
        return
    if status not in TERMINAL:
        raise CliError(_not_ended(request_id, str(status)))
    # Short answers (the SSE end event) carry only the status; the invocation has the why.
    invocation = state if "ErrorType" in state else _get_invocation(client, request_id)
    parts = [f"{request_id} {status}"]
    if invocation.get("ErrorType"):
        parts.append(str(invocation["ErrorType"]))
    if invocation.get("ErrorMessage"):
        # Keep it to one line even when the message carries a traceback.
        parts.append(" ".join(str(invocation["ErrorMessage"]).split()))
    # The function wrote these: escape what would drive the terminal (ESC, BEL, ...).
    raise CliError(printable(": ".join(parts)))


def _not_ended(request_id: str, status: str) -> str:
    """Why a sync call was answered before its run ended: the server stopped first."""
    if status == "QUEUED":
        return (
            f"{request_id} QUEUED: the server stopped before the run started; the run stays queued and "
            f"runs once a server is running again (`eventrun status {request_id}` then gives its outcome)"
        )
    return (
        f"{request_id} {status}: the server answered before the run ended; "
        f"`eventrun status {request_id}` gives its outcome"
    )


def cmd_status(args: argparse.Namespace) -> int:
    """Print one invocation as indented JSON."""
    print(_json(_get_invocation(client_for(args), args.request_id)))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    """Print a run's log; with --follow, stream it until the run ends."""
    client = client_for(args)
    path = f"/invocations/{_quote(args.request_id)}/logs"
    if not args.follow:
        text = client.text(path)
        sys.stdout.write(text if not text or text.endswith("\n") else text + "\n")
        return 0
    end: list[str] | None = None
    for event, data in sse_events(client.lines(path, {"follow": "true"})):
        if event == "end":
            end = data
            break
        if event == "error":
            raise CliError(describe_stream_error(data))
        for line in data:
            print(line, flush=True)
    invocation = end_state(end) or _get_invocation(client, args.request_id)
    if invocation.get("Status") not in TERMINAL:
        raise CliError(
            f"the log stream closed before {args.request_id} ended (now {printable(str(invocation.get('Status')))})"
        )
    _raise_unless_finished(client, args.request_id, invocation)
    return 0


def cmd_terminate(args: argparse.Namespace) -> int:
    """Kill a QUEUED or RUNNING run and print its final status."""
    client = client_for(args)
    _, answer = client.call("POST", f"/invocations/{_quote(args.request_id)}/terminate")
    status = answer.get("Status") if isinstance(answer, dict) else None
    if status not in TERMINAL:
        # The kill may still be under way (a grace period); wait a little for the end.
        status = _wait(client, args.request_id, time.monotonic() + TERMINATE_WAIT).get("Status")
    print(printable(str(status)))
    return 0


REPLAY_LIMIT = 100  # the runs a bulk replay takes at most unless --limit says (the server's default too)
_REPLAY_FILTERS = ("status", "trigger", "since", "until", "limit", "cursor")


def cmd_replay(args: argparse.Namespace) -> int:
    """Replay one ended run (print the new RequestId), or a function's runs that match a filter."""
    _check_replay_usage(args)
    client = client_for(args)
    if args.request_id is not None:
        return _replay_one(client, args.request_id, dry_run=args.dry_run, key=args.idempotency_key)
    return _replay_matching(client, args)


def _key_header(key: str | None) -> dict[str, str]:
    """The Idempotency-Key header of an invoke or a replay, if --idempotency-key gave one."""
    # http.client sends header text as Latin-1, so the key's UTF-8 bytes (what the server reads),
    # spelt as Latin-1, go out as they are: "日本" is sent, not a UnicodeEncodeError.
    return {"Idempotency-Key": key.encode(errors="surrogateescape").decode("latin-1")} if key else {}


def _check_replay_usage(args: argparse.Namespace) -> None:
    """A usage error unless the arguments name one run, or a function with a filter."""
    if args.request_id is not None and args.function is not None:
        raise CliError("give a REQUEST_ID or --function, not both", exit_status=2)
    if args.request_id is None and args.function is None:
        raise CliError("give the REQUEST_ID of a run to replay, or --function F with a filter", exit_status=2)
    filters = [f"--{name}" for name in _REPLAY_FILTERS if getattr(args, name) is not None]
    if args.request_id is not None and filters:
        # Ignoring them would replay the run even where they would have left it out.
        raise CliError(
            f"{' and '.join(filters)} choose which of a function's runs to replay (with --function F), "
            "not one REQUEST_ID",
            exit_status=2,
        )


def _replay_matching(client: Client, args: argparse.Namespace) -> int:
    """Replay (or with --dry-run, list) the function's ended runs that match the filter."""
    # --limit, --since and --until were checked (and the times made RFC 3339) while parsing.
    body: dict[str, Any] = {"Limit": args.limit or REPLAY_LIMIT, "DryRun": args.dry_run}
    if args.status:
        body["Status"] = args.status
    if args.trigger:
        body["Trigger"] = args.trigger
    for key, value in (("Since", args.since), ("Until", args.until), ("Cursor", args.cursor)):
        if value:
            body[key] = value
    _, answer = client.call(
        "POST", f"/functions/{_quote(args.function)}/replay", body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **_key_header(args.idempotency_key)},
    )
    for pair in answer["Replayed"]:
        # (A dry run's RequestId is None, or with a key the run's replay under that key already.)
        shown = pair["ReplayOf"] if pair["RequestId"] is None else f"{pair['ReplayOf']} -> {pair['RequestId']}"
        print(printable(shown))
    what = "would be replayed" if args.dry_run else "replayed"
    count = len(answer["Replayed"])
    print(f"{count} {'run' if count == 1 else 'runs'} {what}", file=sys.stderr)
    if answer.get("Cursor"):  # (a server before cursors sends none)
        print(f"more runs may match: add --cursor {printable(str(answer['Cursor']))}", file=sys.stderr)
    return 0


def _replay_one(client: Client, request_id: str, *, dry_run: bool, key: str | None = None) -> int:
    """Replay one ended run (with `key`, its replay under that key, made once) and print the new
    RequestId; with dry_run, print the run's own RequestId if the server would replay it (it has
    ended, and its function is still there), replaying nothing."""
    if not dry_run:
        _, answer = client.call("POST", f"/invocations/{_quote(request_id)}/replay", headers=_key_header(key))
        print(printable(str(answer["RequestId"])))
        return 0
    invocation = _get_invocation(client, request_id)
    status, function = str(invocation.get("Status")), str(invocation.get("FunctionName"))
    # What the server would refuse the replay for: 409 InvocationActive, 404 FunctionNotFound.
    if status not in TERMINAL:
        raise CliError(f"invocation {request_id!r} is still {status}; replay it once it has ended")
    if function not in {str(item.get("FunctionName")) for item in _functions(client)}:
        raise CliError(
            f"{request_id} is a run of function {function!r}, which the server no longer has, so it cannot be replayed"
        )
    # (What the server sent, escaped: printed outside main's escaping of error lines.)
    print(printable(str(invocation.get("RequestId") or request_id)))
    print(f"1 run would be replayed: {printable(function)}, {status}", file=sys.stderr)
    return 0


def _functions(client: Client) -> list[dict[str, Any]]:
    """The server's function registry: one JSON object per function."""
    _, answer = client.call("GET", "/functions")
    items = answer.get("Functions", []) if isinstance(answer, dict) else answer or []
    return [item for item in items if isinstance(item, dict)]


def cmd_list(args: argparse.Namespace) -> int:
    """Print invocations, newest first, as a table.

    The table shows no results, so they are not asked for (results=false). A page of runs with
    large error messages may still hold fewer than asked (the server bounds what a page holds),
    so pages are asked for until --limit runs are in; each is cut to the table's cells before
    the next is read, so no more than one page is held at a time.
    """
    client = client_for(args)
    headers = ("RequestId", "FunctionName", "Status", "CreatedAt", "DurationMs")
    rows: list[list[str]] = []
    limit, cursor = args.limit, args.cursor
    while True:
        query = {
            key: str(value)
            for key, value in (
                ("function", args.function),
                ("status", args.status),
                ("limit", limit),
                ("cursor", cursor),
                ("results", "false"),
            )
            if value is not None
        }
        _, answer = client.call("GET", "/invocations", query=query)
        answer = answer if isinstance(answer, dict) else {}
        page = [[_cell(item.get(h)) for h in headers] for item in answer.get("Invocations") or []]
        cursor = answer.get("NextCursor")
        del answer  # (the page's error messages: the next page is read without them)
        rows += page
        left = (args.limit or LIST_LIMIT) - len(rows)
        if not (cursor and page and left > 0):  # (an empty page with a cursor: asking again would not advance)
            break
        limit = left
    print(_table(headers, rows))
    if cursor:
        print(f"more invocations follow: add --cursor {printable(str(cursor))}", file=sys.stderr)
    return 0


def cmd_functions(args: argparse.Namespace) -> int:
    """Print the function registry as a table."""
    headers = ("FunctionName", "Async", "Timeout", "Concurrency", "QpsLimit", "Triggers")
    rows = [_function_row(item) for item in _functions(client_for(args))]
    print(_table(headers, rows))
    return 0


def _function_row(item: dict[str, Any]) -> list[str]:
    asynchronous = item.get("AsyncExecution")
    return [
        _cell(item.get("FunctionName")),
        "-" if asynchronous is None else ("yes" if asynchronous else "no"),
        _duration(item.get("Timeout")),
        _cell(item.get("Concurrency")),
        _cell(item.get("QpsLimit")),
        ",".join(_trigger_label(t) for t in item.get("Triggers") or []) or "-",
    ]


def _trigger_label(trigger: Any) -> str:
    """`s3:BUCKET`, `kafka:TOPIC` or `timer:NAME`: enough to tell a function's triggers apart."""
    if not isinstance(trigger, dict):
        return str(trigger)
    kind = str(trigger.get("Type") or "?")
    detail = trigger.get({"s3": "Bucket", "kafka": "Topic"}.get(kind, "Name"))
    return f"{kind}:{detail}" if detail else kind


def _duration(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _cell(value)
    for unit, size in (("h", 3600), ("m", 60)):
        if value >= size and value % size == 0:
            return f"{int(value // size)}{unit}"
    return f"{value:g}s"


# --------------------------------------------------------------------------- output


def _json(value: Any) -> str:
    """Indented JSON for stdout: characters as they are where stdout's encoding has them all,
    else as JSON's escapes (`\\ud83d\\ude00`), since the escapes that stdout's backslashreplace
    would write (`\\U0001f600`, `\\xe9`) are not JSON. Control characters are JSON's escapes
    either way (`\\u001b`, and `\\u007f`, `\\u009b` too, which json leaves as they are), so
    that text a server sent cannot drive the terminal."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    if not _encodable(text, sys.stdout):
        return json.dumps(value, indent=2)
    # (Outside strings, JSON holds only ASCII below DEL: escaping these anywhere keeps it valid.)
    return text.translate(_JSON_CONTROLS)


_INVISIBLE = (0x061C, *range(0x200B, 0x2010), *range(0x2028, 0x202F), *range(0x2060, 0x206A), 0xFEFF)
"""Characters that are not seen but change what is (direction marks and overrides such as U+202E,
zero widths, the line and paragraph separators)."""
_JSON_CONTROLS = {code: f"\\u{code:04x}" for code in (*range(0x7F, 0xA0), *_INVISIBLE)}
"""DEL, the C1 controls and the invisible characters, as JSON's escapes (json.dumps escapes the
C0 controls itself)."""


def _encodable(text: str, stream: Any) -> bool:
    """Whether the stream's encoding has every character of text."""
    try:
        text.encode(getattr(stream, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks. Cells hold
    what the server sent (a function's name, a trigger's): their control characters are shown
    escaped (`\\x1b`, `\\n`), so none can drive the terminal or break a row."""
    shown = [[printable(str(cell)) for cell in row] for row in [headers, *rows]]
    widths = [max(_columns(row[i]) for row in shown) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell + " " * (width - _columns(cell)) for cell, width in zip(row, widths)).rstrip() for row in shown
    )


def _columns(text: str) -> int:
    """The columns `text` takes on a terminal: two for a wide character (CJK, most emoji), none
    for one that combines with the character before it (an accent written apart)."""
    if text.isascii():
        return len(text)
    return sum(
        0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text
    )


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


# --------------------------------------------------------------------------- argument parsing


def build_parser() -> argparse.ArgumentParser:
    """The `eventrun` argument parser."""
    parser = argparse.ArgumentParser(prog="eventrun", description="Self-hosted async functions.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway, the triggers and the engine")
    serve.add_argument(
        "--config", metavar="FILE", help=f"the manifest (default: ./{DEFAULT_MANIFEST} if it exists)"
    )
    serve.set_defaults(handler=cmd_serve)

    for name, handler, summary, folder in (
        ("backup", cmd_backup, "copy a single node's store and runs' logs into a new folder (the server may be serving)",
         "a new or empty folder"),
        ("restore", cmd_restore, "put a folder `eventrun backup` made in place as the data_dir (no server running on it)",
         "a folder `eventrun backup` made"),
    ):
        command = commands.add_parser(name, help=summary)
        command.add_argument("folder", metavar="FOLDER", type=_named("a folder"), help=folder)
        command.add_argument(
            "--config", metavar="FILE", help=f"the manifest naming the data_dir (default: ./{DEFAULT_MANIFEST} if it exists)"
        )
        command.set_defaults(handler=handler)

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--url",
        help=f"the server (default: from the manifest, else $EVENTRUN_URL, else {DEFAULT_URL})",
    )
    client.add_argument(
        "--config", metavar="FILE", help=f"the manifest to read the URL from (default: ./{DEFAULT_MANIFEST})"
    )
    client.add_argument(
        "--token",
        help="the server's ui_token, if it asks for one (default: from the manifest, else $EVENTRUN_TOKEN)",
    )

    invoke = commands.add_parser("invoke", parents=[client], help="invoke a function")
    invoke.add_argument("name", metavar="NAME", type=_named("a function's name"))
    body = invoke.add_mutually_exclusive_group()
    body.add_argument("--data", metavar="JSON", help="the event data as JSON (default: {})")
    body.add_argument("--file", metavar="F", help="send this file's bytes ('-' for stdin)")
    invoke.add_argument("--wait", action="store_true", help="wait for the run and print its result")
    invoke.add_argument(
        "--idempotency-key",
        metavar="KEY",
        type=_named("an Idempotency-Key"),
        help="send the event with this key: sent again with the same key, it answers the same run rather than making another",
    )
    invoke.set_defaults(handler=cmd_invoke)

    status = commands.add_parser("status", parents=[client], help="show one invocation")
    status.add_argument("request_id", metavar="REQUEST_ID", type=_named("a RequestId"))
    status.set_defaults(handler=cmd_status)

    logs = commands.add_parser("logs", parents=[client], help="print a run's log")
    logs.add_argument("request_id", metavar="REQUEST_ID", type=_named("a RequestId"))
    logs.add_argument("--follow", "-f", action="store_true", help="stream the log until the run ends")
    logs.set_defaults(handler=cmd_logs)

    terminate = commands.add_parser("terminate", parents=[client], help="kill a queued or running run")
    terminate.add_argument("request_id", metavar="REQUEST_ID", type=_named("a RequestId"))
    terminate.set_defaults(handler=cmd_terminate)

    replaying = commands.add_parser(
        "replay", parents=[client], help="run an ended run's event again (or a function's runs that match)"
    )
    replaying.add_argument(
        "request_id", metavar="REQUEST_ID", nargs="?", type=_named("a RequestId"), help="the run to replay"
    )
    replaying.add_argument(
        "--function", metavar="F", type=_named("a function's name"), help="replay this function's ended runs that match"
    )
    replaying.add_argument("--status", metavar="S", type=_status, help="only runs that ended so")
    replaying.add_argument("--trigger", choices=("http", "kafka", "s3", "timer"), help="only runs from this trigger")
    replaying.add_argument(
        "--since", metavar="T", type=_time_or_ago, help="accepted since: an RFC 3339 time, or a duration ago (1h)"
    )
    replaying.add_argument(
        "--until", metavar="T", type=_time_or_ago, help="accepted before: an RFC 3339 time, or a duration ago"
    )
    replaying.add_argument(
        "--limit", metavar="N", type=_limit, help=f"at most N runs (default {REPLAY_LIMIT}, at most {MAX_LIMIT})"
    )
    replaying.add_argument("--cursor", help="go on after the runs of a previous replay (its --cursor)")
    replaying.add_argument(
        "--dry-run", action="store_true", help="only print what would be replayed (the runs' RequestIds), replaying nothing"
    )
    replaying.add_argument(
        "--idempotency-key",
        metavar="KEY",
        type=_named("an Idempotency-Key"),
        help="replay each run with this key: sent again, the same key makes no other replay of a run",
    )
    replaying.set_defaults(handler=cmd_replay)

    listing = commands.add_parser("list", parents=[client], help="list invocations, newest first")
    listing.add_argument(
        "--function", metavar="F", type=_named("a function's name"), help="only this function's invocations"
    )
    listing.add_argument("--status", metavar="S", type=_status, help="only this status")
    listing.add_argument(
        "--limit", metavar="N", type=_limit, help=f"at most N invocations (default 50, at most {MAX_LIMIT})"
    )
    listing.add_argument("--cursor", help="continue after a previous page")
    listing.set_defaults(handler=cmd_list)

    functions = commands.add_parser("functions", parents=[client], help="list the functions")
    functions.set_defaults(handler=cmd_functions)
    for command in commands.choices.values():
        command.set_defaults(command_parser=command)  # (see parse)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments; an unknown one is a usage error of its command (`eventrun logs --follw`
    shows the usage of `logs`, where argparse shows eventrun's own, which lists no option)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _limit(text: str) -> int:
    """A --limit value: an integer the server takes, 1 to MAX_LIMIT (as `list` and `replay` send it)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {MAX_LIMIT}, got {text!r}")
    return value


def _named(what: str) -> Callable[[str], str]:
    """The type of an argument that names `what` (a function, a run): an empty or blank one names
    nothing (in a URL it would make the path of another route)."""

    def named(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return text

    return named


def _status(text: str) -> str:
    """A --status value, in any case, as the server takes it (upper case)."""
    if text.upper() not in STATUSES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(STATUSES)}, got {text!r}")
    return text.upper()


def _time_or_ago(text: str) -> str:
    """A --since/--until value as the server takes it: an RFC 3339 time with its zone, as given,
    or a duration ("90m", "1h", "2d") as that long ago, in UTC."""
    from datetime import datetime, timedelta, timezone

    from eventrun.engine.manifest import parse_duration

    try:
        seconds = parse_duration(text, most=math.inf)  # (further back than 1970 reads as 1970)
    except (ValueError, TypeError):
        pass
    else:
        start = datetime(1970, 1, 1, tzinfo=timezone.utc)  # the server reads earlier times as this
        try:
            when = max(start, datetime.now(timezone.utc) - timedelta(seconds=seconds))
        except OverflowError:  # further back than datetime goes
            when = start
        return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    from eventrun.engine.envelope import is_rfc3339

    # What the server's list and replay take: datetime.fromisoformat, with a zone, and RFC 3339's
    # leap second (23:59:60Z), which datetime refuses.
    try:
        zoned = datetime.fromisoformat(text.strip().upper()).tzinfo is not None
    except ValueError:
        zoned = is_rfc3339(text.strip())
    if not zoned:
        raise argparse.ArgumentTypeError(
            "expected an RFC 3339 time with its zone (e.g. 2026-12-05T08:00:00Z) "
            f"or a duration ago (e.g. 90m, 1h, 2d), got {text!r}"
        )
    return text.strip()


def _not_utf8(args: argparse.Namespace) -> tuple[str, bytes] | None:
    """The first argument that is not valid UTF-8 (the shell passed bytes no request can carry)."""
    for name, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return name.replace("_", "-"), os.fsencode(item)
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one `eventrun` command and return its exit status."""
    for stream in (sys.stdout, sys.stderr):
        # A log or a result in characters the terminal's encoding lacks (LC_ALL=C) is shown
        # escaped rather than ending the command with a traceback.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    try:
        args = parse(argv)
    except SystemExit as exc:  # argparse has printed usage or help already
        return exc.code if isinstance(exc.code, int) else 2
    undecodable = _not_utf8(args)
    if undecodable is not None:
        name, raw = undecodable
        print(f"eventrun: {name}: not valid UTF-8: {raw!r}", file=sys.stderr)
        return 2
    try:
        return int(args.handler(args))
    except CliError as exc:
        # Each line with its control characters escaped: messages carry text a server sent.
        print("eventrun: " + "\n".join(map(printable, str(exc).split("\n"))), file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`eventrun logs -f ID | head -1`): it has what it wanted, which is
        # no failure of the command. Silence the flush at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
