"""A refused manifest's errors in the manifest's own terms: each names where its value came
from (the EVENTRUN_* variable that set it, else the file), its key, the value, and what is
wrong, in TOML words (arrays and tables), with a suggestion for a typo.

Used by engine.manifest.load_manifest, for pydantic's errors and for the checks it makes after
pydantic's, with the manifest's models given as a Schema (this module imports none of them).
The variables and the file are read again only to describe an error.
"""

from __future__ import annotations

import datetime
import difflib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsError


@dataclass(frozen=True)
class Schema:
    """What errors are described against (the manifest's models, given by engine.manifest)."""

    settings: type[BaseSettings]  # read again for the values the environment gave
    keys: Mapping[str, tuple[str, ...]]  # the known keys by table: "" (the top), "server", ..., "function",
    # "trigger" (of any type), "trigger.s3" (of one type)
    trigger_types: tuple[str, ...]


ENV_PREFIX = "EVENTRUN_"
"""What the names of the variables that set the manifest begin with (in any case)."""
_ENV_DELIMITER = "__"

# -- where a value came from: an EVENTRUN_* variable or the file ---------------------------------

_MISSING = object()


class Origins:
    """Where the values of one load came from, so that each error names its true source: the
    EVENTRUN_* variable that set the value, else the manifest file."""

    def __init__(self, schema: Schema, label: str, location: Path | None) -> None:
        self.schema = schema
        self.label = label
        self.location = location
        self._env: dict[str, Any] | None = None
        self._file: dict[str, Any] | None = None

    @property
    def env(self) -> dict[str, Any]:
        """The values the EVENTRUN_* variables give, nested as in the manifest."""
        if self._env is None:
            try:
                self._env = EnvSettingsSource(self.schema.settings)()
            except ValueError:  # SettingsError included: reported before this is asked
                self._env = {}
        return self._env

    @property
    def file(self) -> dict[str, Any]:
        """The values the manifest file holds."""
        if self._file is None:
            self._file = {}
            if self.location is not None:
                try:
                    self._file = tomllib.loads(self.location.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    pass
        return self._file

    def variable(self, loc: list[str]) -> tuple[str, list[str]] | None:
        """The variable that set the value at loc, and the keys of loc inside it (when the
        variable holds a whole table as JSON); None if the value did not come from one."""
        if _lookup(self.env, loc) is _MISSING:
            return None
        for end in range(len(loc), 0, -1):
            name = _env_variable(loc[:end])
            if name is not None:
                return name, loc[end:]
        return None

    def variables_under(self, loc: list[str]) -> list[str]:
        """The variables that set keys inside the table at loc."""
        node = _lookup(self.env, loc)
        names: set[str] = set()
        if isinstance(node, dict):
            for leaf in _leaves(node, list(loc)):
                found = self.variable(leaf)
                if found is not None:
                    names.add(found[0])
        return sorted(names)

    def line(self, loc: list[str], message: str, *, scope: list[str] | None = None) -> str:
        """`message` about the value at loc, after the place it came from. `scope` is the table
        the error is about, when that is not loc itself (a missing key: its table)."""
        found = self.variable(loc)
        if found is not None:
            name, inside = found
            key = f"{name} ({dotted(inside)})" if inside else name
            return f"the environment: {key}: {message}"
        # An error about a whole table (a check of several keys, a missing key): name the
        # variables that took part, and the environment alone if the file holds no such table.
        scope = loc if scope is None else scope
        names = self.variables_under(scope)
        label = self.label
        if self.location is None or _lookup(self.file, scope) is _MISSING:
            label = "the environment" if names else label
        else:
            names = [name for name in names if _mentioned(name, message)]
        if names:
            message += f"; set in the environment: {_and(names)}"
        key = dotted(loc)
        return f"{label}: {key}: {message}" if key else f"{label}: {message}"


def _lookup(tree: Any, loc: list[str]) -> Any:
    """The value at loc in nested tables and arrays, or _MISSING. Variable names are read
    without regard to case, so keys are compared that way too."""
    node = tree
    for part in loc:
        if isinstance(node, dict):
            if part in node:
                node = node[part]
                continue
            matches = [key for key in node if isinstance(key, str) and key.lower() == part.lower()]
            if not matches:
                return _MISSING
            node = node[matches[0]]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _leaves(node: dict[str, Any], prefix: list[str]) -> list[list[str]]:
    out: list[list[str]] = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out += _leaves(value, [*prefix, key])
        else:
            out.append([*prefix, key])
    return out


def _env_variable(loc: list[str]) -> str | None:
    """The name, as set, of the EVENTRUN_* variable for the key at loc, if it is set."""
    wanted = ENV_PREFIX + _ENV_DELIMITER.join(loc).upper()
    return next((name for name in os.environ if name.upper() == wanted), None)


def _mentioned(variable: str, message: str) -> bool:
    """Whether the message names the key the variable sets."""
    key = variable.rpartition(_ENV_DELIMITER)[2].lower()
    return re.search(rf"\b{re.escape(key)}\b", message) is not None


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def unknown_tables(schema: Schema) -> str | None:
    """A line for each EVENTRUN_<TABLE>__<KEY> variable whose table the manifest has not (which
    pydantic-settings would leave unread, silently), or None."""
    tables = [key for key in schema.keys[""] if key != "path"]
    lines = []
    for name in sorted(os.environ):
        rest = name.upper().removeprefix(ENV_PREFIX)
        if rest == name.upper() or _ENV_DELIMITER not in rest:
            continue
        table, _, key = rest.partition(_ENV_DELIMITER)
        if table.lower() in tables:
            continue
        close = difflib.get_close_matches(table.lower(), tables, n=1)
        hint = f" (did you mean {ENV_PREFIX}{close[0].upper()}{_ENV_DELIMITER}{key}?)" if close else ""
        lines.append(f"the environment: {name}: unknown table {table.lower()!r}{hint}; the tables are {', '.join(tables)}")
    return "\n".join(lines) or None


def describe_settings_error(label: str, exc: SettingsError) -> str:
    if "EnvSettingsSource" not in str(exc):  # (pydantic's, or engine.manifest's _EnvSettingsSource)
        return f"{label}: {exc}"
    match = re.search(r'field "([^"]+)"', str(exc))
    table = (match.group(1) if match else "").upper()
    stem = ENV_PREFIX + table
    candidates = [
        name for name in sorted(os.environ)
        if name.upper() == stem or name.upper().startswith(stem + _ENV_DELIMITER)
    ]
    wrong = [name for name in candidates if not _is_json(os.environ[name])] or candidates or [stem]
    exact = [name for name in wrong if name.upper() == stem]
    names = _and(exact or wrong)
    cause = exc.__cause__ or "unreadable"
    if exact:
        return (
            f"the environment: {names}: not valid JSON ({cause}); a variable that sets a whole table "
            f"holds a JSON object, or set one key per variable: {stem}{_ENV_DELIMITER}KEY"
        )
    return f"the environment: {names}: not valid JSON ({cause}); a variable that sets a table or an array holds JSON"


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# -- pydantic's errors in manifest terms -------------------------------------------------------

_ARRAY_ERRORS = ("list_type", "tuple_type", "set_type", "frozen_set_type")
_TABLE_ERRORS = ("dict_type", "model_type", "model_attributes_type", "dataclass_type")
_SECRET_WORDS = ("password", "secret", "token")
# Raised by eventrun's own validators, whose messages show the value where they may (not a URL
# that could hold credentials, nor a secret).
_OWN_ERRORS = ("value_error", "assertion_error")


def describe(origins: Origins, exc: ValidationError) -> str:
    """pydantic's errors, a line each, in the manifest's terms and naming each value's source."""
    trigger_types = origins.schema.trigger_types
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        # Drop pydantic's union tags ("s3", "function-after[...]") that are not manifest keys.
        loc = [part for part in loc if not part.startswith(("function-", "tagged-union"))]
        tags = [part for i, part in enumerate(loc) if i and loc[i - 1].isdigit() and part in trigger_types]
        loc = [
            part
            for i, part in enumerate(loc)
            if not (i and loc[i - 1].isdigit() and part in trigger_types)
        ]
        kind = error["type"]
        value = error.get("input")
        message = error["msg"].removeprefix("Value error, ")
        scope = None
        if kind == "extra_forbidden":
            message = "unknown key" + _unknown_key_hint(origins, loc, tags[-1] if tags else "")
        elif kind == "missing":
            message = "a required key, not set"
            scope = loc[:-1]
        elif kind == "union_tag_not_found":
            message = f"missing key 'type' (one of {_choices(trigger_types)})"
        elif kind == "union_tag_invalid":
            tag = value.get("type", "") if isinstance(value, dict) else error.get("ctx", {}).get("tag", "")
            loc = [*loc, "type"]
            message = (
                f"unknown trigger type {_shown(tag)}{_did_you_mean(str(tag), trigger_types)}; "
                f"expected one of {_choices(trigger_types)}"
            )
        else:
            message = _in_toml_terms(kind, loc, value, message, error.get("ctx") or {})
        lines.append(origins.line(loc, message, scope=scope))
    return "\n".join(lines)


def _in_toml_terms(kind: str, loc: list[str], value: Any, message: str, ctx: dict[str, Any]) -> str:
    """Pydantic's message, in the words of TOML (arrays and tables, not tuples and
    dictionaries), with the value that was refused."""
    secret = any(word in part.lower() for part in loc for word in _SECRET_WORDS) or "environment" in loc
    shown = _shown(value, secret=secret)
    key = loc[-1] if loc else ""
    if kind in _ARRAY_ERRORS:
        if key == "triggers":
            wanted = f"an array of tables ([[{dotted(loc)}]])"
        elif key == "events":
            wanted = "an array of strings"
        else:
            wanted = "an array"
        return f"expected {wanted}, got {shown}"
    if kind in _TABLE_ERRORS:
        if len(loc) == 1:
            header = " ([functions.NAME])" if key == "functions" else f" ([{key}])"
        elif len(loc) == 2 and loc[0] == "functions":
            header = f" ([{dotted(loc)}])"
        elif len(loc) >= 2 and key.isdigit() and loc[-2] == "triggers":
            header = f" ([[{dotted(loc[:-1])}]])"
        else:
            header = ""
        return f"expected a table{header}, got {shown}"
    if kind == "path_type":
        return f"expected a path (a string), got {shown}"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        hint = _did_you_mean(value, choices) if isinstance(value, str) and not secret else ""
        return f"{message}, got {shown}{hint}"
    if kind.endswith(("_type", "_parsing")) or kind == "int_from_float":
        return f"{message.split(',')[0]}, got {shown}{_how_toml_writes_it(kind, value)}"
    if kind in _OWN_ERRORS:
        return message
    return f"{message}, got {shown}"  # (a bound, a length, ...: pydantic's words name the limit, not the value)


def _how_toml_writes_it(kind: str, value: Any) -> str:
    """For a boolean or an integer given as another type (a string, most likely quoted by
    mistake), how TOML writes one; else nothing."""
    if kind == "bool_type" and isinstance(value, (str, int, float)):
        return " (a boolean is written true or false, without quotes)"
    if kind == "int_type" and isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return " (a string: write the number without quotes)"
    return ""


def _shown(value: Any, *, secret: bool = False) -> str:
    """A value as the manifest writes it; a table or an array by its kind only."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, datetime.datetime):
        return "a date-time" if secret else f"the date-time {value.isoformat()}"
    if isinstance(value, datetime.date):
        return "a date" if secret else f"the date {value.isoformat()}"
    if isinstance(value, datetime.time):
        return "a time" if secret else f"the time {value.isoformat()}"
    if secret:
        return {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}.get(type(value), "a value")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _choices(items: tuple[str, ...] | list[str]) -> str:
    return ", ".join(repr(item) for item in items)


def _did_you_mean(wrong: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(wrong, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key_hint(origins: Origins, loc: list[str], trigger_type: str = "") -> str:
    keys = origins.schema.keys
    if trigger_type and loc:
        # A key of another type of trigger: say so, rather than suggest the key itself.
        owners = [t for t in origins.schema.trigger_types if t != trigger_type and loc[-1] in keys.get(f"trigger.{t}", ())]
        if owners:
            return f" (a key of {' and '.join(owners)} triggers; this trigger's type is {trigger_type!r})"
        keys = {**keys, "trigger": keys.get(f"trigger.{trigger_type}", keys.get("trigger", ()))}
    close = _suggest(loc, keys)
    if close is None:
        return ""
    found = origins.variable(loc)
    if found is not None and not found[1]:
        # Set by its own variable: suggest the variable that would be read.
        stem = found[0].rpartition(_ENV_DELIMITER)[0] or found[0]
        return f" (did you mean {stem}{_ENV_DELIMITER}{close.upper()}?)"
    return f" (did you mean {close!r}?)"


def dotted(loc: list[str]) -> str:
    """Keys as a manifest path: `functions.f.triggers[0].cron`."""
    out = ""
    for part in loc:
        if part.isdigit():
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


_NAMED_ELSEWHERE = {("function", "on_success"): "callback_url"}
"""Keys as other platforms name them (AWS Lambda's destinations), and ours: (scope, theirs) -> ours."""


def _suggest(loc: list[str], keys: Mapping[str, tuple[str, ...]]) -> str | None:
    """The known key closest to the unknown one at loc, if one is close."""
    if not loc:
        return None
    wrong = loc[-1]
    parent = loc[:-1]
    if not parent:
        scope = ""
    elif parent[0] == "functions" and len(parent) == 2:
        scope = "function"
    elif parent[0] == "functions" and parent[2:] == ["on_failure"]:
        scope = "on_failure"
    elif parent[0] == "functions" and len(parent) >= 4:
        scope = "trigger"
    else:
        scope = parent[0]
    if (scope, wrong) in _NAMED_ELSEWHERE:
        return _NAMED_ELSEWHERE[scope, wrong]
    known = keys.get(scope, ())
    close = difflib.get_close_matches(wrong, [k for k in known if k != "path"], n=1)
    return close[0] if close else None
