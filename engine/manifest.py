"""The function manifest (`eventrun.toml`): pydantic models, read once with the environment."""

from __future__ import annotations

import ipaddress
import math
import re
import socket
import urllib.parse
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yarl
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from .errors import ManifestError
from .manifest_errors import ENV_PREFIX, Origins, Schema, describe, describe_settings_error, dotted, unknown_tables
from .tokens import token_problem

ASYNC_MAX_TIMEOUT = 24 * 3600.0
SYNC_MAX_TIMEOUT = 900.0

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 1024, "k": 1024, "mb": 1024**2, "m": 1024**2, "gb": 1024**3, "g": 1024**3}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")  # (used with fullmatch: no newline after it)


MAX_DURATION = 100 * 365 * 86400.0
"""Seconds a duration may be at most: past it, times in the past or future stop being dates."""


def parse_duration(value: Any, most: float = MAX_DURATION) -> float:
    """Seconds from a number or a string such as "90s", "15m", "2h", "24h"; at most `most`."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as '90s' or '2h', got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"expected a duration such as '90s', '15m' or '2h', got {value!r}")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if math.isnan(seconds):  # (TOML has nan and inf)
        raise ValueError(f"expected a duration such as '90s' or '2h', got {value!r}")
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, got {value!r}")
    if seconds > most:
        raise ValueError(f"a duration may be at most {most // 86400:.0f}d (100 years), got {value!r}")
    return seconds


def parse_duration_or_zero(value: Any, most: float = MAX_DURATION) -> float:
    """parse_duration, or 0 for a zero ("0", "0s", "", 0): none, as a setting that may be off."""
    if isinstance(value, str) and (match := _DURATION.match(value)) and float(match.group(1)) == 0:
        return 0.0
    if value in (0, "", None) and not isinstance(value, bool):
        return 0.0
    return parse_duration(value, most)


def parse_size(value: Any) -> int:
    """Bytes from a number or a string such as "6MB" or "512kb"."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.match(str(value))
        unit = match.group(2).lower() if match else ""
        if not match or unit not in _SIZE_UNITS:
            raise ValueError(f"expected a size such as '6MB' or '512KB', got {value!r}")
        size = _whole_bytes(match.group(1), _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"a size must be positive, got {value!r}")
    return size


def _whole_bytes(number: str, unit: int) -> int:
    """`number` (digits, perhaps with a fraction) times `unit`, in whole bytes; exact for whole numbers."""
    if "." in number:
        return int(float(number) * unit)
    return int(number) * unit


MIN_MEMORY_LIMIT = 64 * 1024**2  # an instance's interpreter needs some 30 MB before the handler's module
MAX_MEMORY_LIMIT = 2**63 - 1  # the largest limit setrlimit takes (a C long); past it every instance would die


def parse_memory_limit(value: Any) -> int:
    """An instance's memory_limit in bytes: a size from 64MB to 2^63 - 1 bytes, or 0 (no limit)."""
    if value in (0, "0", "") and not isinstance(value, bool):
        return 0
    size = parse_size(value)
    if size < MIN_MEMORY_LIMIT:
        raise ValueError(f"a memory_limit must be at least 64MB (or 0: no limit), got {value!r}")
    if size > MAX_MEMORY_LIMIT:
        raise ValueError(
            f"a memory_limit may be at most 2^63 - 1 bytes ({MAX_MEMORY_LIMIT}, just under 8589934592GB), "
            f"got {value!r}"
        )
    return size


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _VariableText(str):
    """A value as an EVENTRUN_* variable gave it: text, which has no type until it is parsed."""


def _typed_in_file(kind: type[Any]) -> WrapValidator:
    """Takes a value of the key's own TOML type (`concurrency = 3`, `overlap = false`) and refuses
    another (`"3"`, or `true` for a number; `0` or `"no"` for a boolean) rather than read it as
    one; an EVENTRUN_* variable's text is parsed (`8`, `false`, `no`), as it has no other form."""
    strict = TypeAdapter(kind, config=ConfigDict(strict=True))

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if isinstance(value, _VariableText):
            return handler(str(value))
        return handler(strict.validate_python(value))

    return WrapValidator(validate)


Integer = Annotated[int, _typed_in_file(int)]
"""An integer key: an integer in the file (not a string, a boolean or a float); digits in a variable."""
Boolean = Annotated[bool, _typed_in_file(bool)]
"""A boolean key: true or false in the file (not a string or a number); in a variable, also
yes/no, 1/0 or on/off."""


def _browser_origin(entry: Any) -> str:
    """A cors_origins entry as a browser sends it in Origin: scheme://host[:port], in lower case,
    without its scheme's default port; ValueError naming anything that is no such origin."""
    if not isinstance(entry, str):
        raise ValueError(f"expected an origin such as 'https://app.example.com', got {entry!r}")
    shown = repr(entry[:200])
    if entry.strip() == "*":
        raise ValueError(
            "'*' is refused: it would let every site the user visits call the API and read its answers; "
            "list the origins instead, e.g. [\"https://app.example.com\"]"
        )
    if entry.strip().lower() == "null":
        raise ValueError(
            "'null' is refused: it is the origin of sandboxed frames and local files, which any site can "
            "make; list the origins instead, e.g. [\"https://app.example.com\"]"
        )
    scheme, sep, authority = entry.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise ValueError(f"{shown}: expected an http:// or https:// origin, such as 'https://app.example.com'")
    if not authority:
        raise ValueError(f"{shown}: not an origin: it names no host")
    if re.search(r"[\s/?#@\\]", authority):
        raise ValueError(
            f"{shown}: an origin is scheme://host or scheme://host:port, nothing else "
            "(no path, not even a trailing '/', no query, no user)"
        )
    try:
        url = yarl.URL(f"{scheme.lower()}://{authority}")
        port = url.explicit_port  # (raises for a port that is not a number up to 65535)
    except ValueError as exc:
        raise ValueError(f"{shown}: not an origin: {exc}") from None
    host = (url.raw_host or "").lower()
    if not host or port == 0:
        raise ValueError(f"{shown}: not an origin: {'port 0' if host else 'it names no host'}")
    try:
        host = f"[{ipaddress.IPv6Address(host).compressed}]"
    except ValueError:
        host = _ipv4_as_browsers_write_it(host, shown)
    default = {"http": 80, "https": 443}[url.scheme]
    return f"{url.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


_IPV4_PART = re.compile(r"0x[0-9a-f]*|[0-9]+")


def _ipv4_as_browsers_write_it(host: str, shown: str) -> str:
    """A host whose last label is a number is an IPv4 address to a browser, which writes it in
    four decimal parts (`127.1` and `0x7f.0.0.1` are 127.0.0.1 in its Origin); other hosts as they are."""
    labels = host.removesuffix(".").split(".")
    if not _IPV4_PART.fullmatch(labels[-1]):
        return host
    try:
        return socket.inet_ntoa(socket.inet_aton(host.removesuffix(".")))
    except OSError:
        raise ValueError(f"{shown}: not an origin: its host is no IPv4 address a browser would take") from None


class ServerConfig(_Strict):
    """The `[server]` table."""

    host: str = "127.0.0.1"
    port: Integer = Field(8080, ge=0, le=65535)
    data_dir: Path = Path(".eventrun")
    url: str = ""
    max_body_size: int = 6 * 1024 * 1024
    max_instances: Integer = Field(32, ge=1)
    instance_idle_timeout: float = 300.0
    kill_grace: float = 3.0
    log_limit: int = 64 * 1024 * 1024
    shutdown_grace: float = 10.0
    fork_instances: Boolean = True
    ui_token: str = ""  # if set, the dashboard and the API ask for it: Authorization: Bearer <ui_token>
    metrics_token: str = ""  # if set, GET /metrics takes it (a scraper's token, good for nothing else)
    retention: float = 0.0  # ended runs (and their logs) older than this are deleted; 0: kept for ever
    memory_limit: int = 0  # each instance's data memory (RLIMIT_DATA), unless its function sets one; 0: no limit
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API from a browser (CORS)
    run_as: str = ""  # the Unix user functions run as, unless one sets its own; "": the server's user

    _sizes = field_validator("max_body_size", "log_limit", mode="before")(parse_size)
    _memory_limit = field_validator("memory_limit", mode="before")(parse_memory_limit)
    _retention = field_validator("retention", mode="before")(parse_duration_or_zero)
    _durations = field_validator("instance_idle_timeout", "kill_grace", "shutdown_grace", mode="before")(
        parse_duration
    )

    @field_validator("ui_token", "metrics_token")
    @classmethod
    def _sendable_token(cls, value: str) -> str:
        return _sendable_token(value)

    _url = field_validator("url")(lambda value: _http_url(value))

    @model_validator(mode="after")
    def _tokens_apart(self) -> ServerConfig:
        if self.metrics_token and self.metrics_token == self.ui_token:
            raise ValueError(
                "metrics_token is the same as ui_token: give the scraper a token of its own "
                "(the ui_token already opens GET /metrics)"
            )
        return self

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        """Each entry as a browser sends it in Origin (see _browser_origin), once."""
        if isinstance(value, str):
            raise ValueError(f'expected an array of origins, e.g. ["https://app.example.com"], got {value[:200]!r}')
        if not isinstance(value, (list, tuple)):
            return value  # (pydantic words the wrong type)
        return tuple(dict.fromkeys(map(_browser_origin, value)))

    @property
    def base_url(self) -> str:
        """Where clients reach this server."""
        if self.url:
            return self.url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{url_host(host)}:{self.port}"


def url_host(host: str) -> str:
    """A host as a URL holds it: an IPv6 address in brackets (`[::1]`)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


KafkaProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


_BROKER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:,\[\]]+)(?::(\d{1,5}))?")  # host or [IPv6], then :port if any


class KafkaConfig(_Strict):
    """The `[kafka]` connection table."""

    bootstrap_servers: str = "127.0.0.1:9092"
    high_water_mark: Integer = Field(10_000, ge=1)
    security_protocol: KafkaProtocol = "PLAINTEXT"
    ssl_cafile: str = ""  # empty: the system's trusted CAs
    ssl_certfile: str = ""  # a client certificate, for brokers that ask for one
    ssl_keyfile: str = ""  # its private key, unless ssl_certfile holds it too
    ssl_keyfile_password: SecretStr = SecretStr("")  # if that key is encrypted
    ssl_check_hostname: Boolean = True
    sasl_mechanism: SaslMechanism = "PLAIN"
    sasl_username: str = ""
    sasl_password: SecretStr = SecretStr("")

    _uppercase = field_validator("security_protocol", "sasl_mechanism", mode="before")(_upper)

    @field_validator("bootstrap_servers")
    @classmethod
    def _brokers(cls, value: str) -> str:
        for broker in value.split(","):
            match = _BROKER.fullmatch(broker.strip())
            if match is None or (match[2] is not None and not 1 <= int(match[2]) <= 65535):
                raise ValueError(f"expected host:port, or several separated by commas, got {value!r}")
        return value

    @property
    def tls(self) -> bool:
        """Whether the connection is encrypted."""
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        """Whether the client authenticates with SASL."""
        return self.security_protocol.startswith("SASL_")

    @model_validator(mode="after")
    def _coherent(self) -> KafkaConfig:
        # Settings the protocol would ignore are refused: a TLS file under PLAINTEXT most likely
        # means a forgotten security_protocol, and the connection would go out unencrypted.
        protocol = self.security_protocol
        if not self.tls:
            unused = [key for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile") if getattr(self, key)]
            if unused:
                raise ValueError(
                    f"{', '.join(unused)} set, but security_protocol is {protocol!r}, which does not use TLS; "
                    f"set security_protocol = \"{'SASL_SSL' if self.sasl else 'SSL'}\""
                )
        if not self.ssl_certfile:
            key_password = self.ssl_keyfile_password.get_secret_value()
            for key, value in (("ssl_keyfile", self.ssl_keyfile), ("ssl_keyfile_password", key_password)):
                if value:
                    raise ValueError(f"{key} set without ssl_certfile (the client certificate whose key it names)")
        username, password = self.sasl_username, self.sasl_password.get_secret_value()
        if self.sasl:
            missing = [key for key, value in (("sasl_username", username), ("sasl_password", password)) if not value]
            if missing:
                raise ValueError(
                    f"security_protocol {protocol!r} needs {' and '.join(missing)} "
                    "(the password may come from EVENTRUN_KAFKA__SASL_PASSWORD)"
                )
        elif username or password:
            raise ValueError(
                f"sasl_username or sasl_password set, but security_protocol is {protocol!r}, which does not "
                f"use SASL; set security_protocol = \"{'SASL_SSL' if self.tls else 'SASL_PLAINTEXT'}\""
            )
        return self

    def files(self) -> dict[str, str]:
        """The TLS files named, by key."""
        return {key: value for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile") if (value := getattr(self, key))}


class S3Config(_Strict):
    """The `[s3]` connection table."""

    endpoint_url: str = ""
    region: str = "us-east-1"
    access_key_id: str = ""
    secret_access_key: str = ""
    webhook_token: str = ""
    sqs_queue_url: str = ""

    _urls = field_validator("endpoint_url", "sqs_queue_url")(lambda value: _http_url(value))
    _token = field_validator("webhook_token")(lambda value: _sendable_token(value))

    def aws_environment(self) -> dict[str, str]:
        """The standard AWS variables a function instance receives."""
        env = {"AWS_DEFAULT_REGION": self.region}
        if self.endpoint_url:
            env["AWS_ENDPOINT_URL"] = self.endpoint_url
        if self.access_key_id:
            env["AWS_ACCESS_KEY_ID"] = self.access_key_id
        if self.secret_access_key:
            env["AWS_SECRET_ACCESS_KEY"] = self.secret_access_key
        return env


def _sendable_token(value: str) -> str:
    """A bearer token as configured; ValueError if no client could send it as written (which
    would let nobody in). The message says what is wrong, never the token: it is a secret."""
    problem = token_problem(value) if value else None
    if problem is not None:
        raise ValueError(problem)
    return value


_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


class StoreConfig(_Strict):
    """The `[store]` table: where invocations are kept."""

    url: str = ""  # postgresql://user:password@host:5432/db; empty: SQLite in data_dir
    pool_size: Integer = Field(10, ge=2, le=200)

    @field_validator("url")
    @classmethod
    def _postgres(cls, value: str) -> str:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError(
                "expected a PostgreSQL URL (postgresql://user:password@host:5432/db), "
                "or nothing for the embedded SQLite store in data_dir"
            )
        if value:
            # What the driver would fail on with a traceback at start (never naming the password).
            try:
                parts = urllib.parse.urlsplit(value)
                parts.port  # noqa: B018 - raises for a port that is not a number from 0 to 65535
            except ValueError as exc:
                raise ValueError(f"not a valid PostgreSQL URL: {_without_secrets(str(exc), value)}") from None
            for mode in urllib.parse.parse_qs(parts.query).get("sslmode", []):
                if mode not in _SSL_MODES:
                    raise ValueError(f"sslmode {mode!r} in the URL: expected one of {', '.join(_SSL_MODES)}")
        return value

    @property
    def shared(self) -> bool:
        """True when the store is a PostgreSQL database that several nodes may share."""
        return bool(self.url)


class ClusterConfig(_Strict):
    """The `[cluster]` table: this node among several on one PostgreSQL store."""

    node_id: str = Field("", max_length=128)  # empty: the host name and the process id
    lease: float = 10.0  # a node silent this long is taken for dead: its RUNNING runs end FAILED

    _durations = field_validator("lease", mode="before")(parse_duration)

    @field_validator("lease")
    @classmethod
    def _lease_range(cls, value: float) -> float:
        if not 1.0 <= value <= 3600.0:
            raise ValueError(f"expected a lease from 1s to 1h, got {format_duration(value)}")
        return value

    @field_validator("node_id")
    @classmethod
    def _node_name(cls, value: str) -> str:
        if value and not _NODE_ID.fullmatch(value):
            raise ValueError(f"node_id {value!r} may hold only letters, digits, '.', ':', '_' or '-'")
        return value


_NODE_ID = re.compile(r"[A-Za-z0-9._:-]+")


class S3Trigger(_Strict):
    """Bucket notifications for one bucket."""

    type: Literal["s3"]
    bucket: str
    events: tuple[str, ...] = ("s3:ObjectCreated:*",)
    prefix: str = ""
    suffix: str = ""

    @field_validator("bucket")
    @classmethod
    def _a_bucket(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected a bucket's name, got an empty string")
        return value

    @field_validator("events")
    @classmethod
    def _some_events(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("expected at least one event name (such as 's3:ObjectCreated:*'), got none: nothing would ever match")
        return value


class KafkaTrigger(_Strict):
    """Records of one Kafka topic."""

    type: Literal["kafka"]
    topic: str
    group_id: str = ""
    starting_position: Literal["latest", "earliest"] = "latest"

    @field_validator("topic")
    @classmethod
    def _a_topic(cls, value: str) -> str:
        if not value:
            raise ValueError("expected a Kafka topic name, got an empty string")
        return _kafka_topic(value)


class TimerTrigger(_Strict):
    """A cron schedule."""

    type: Literal["timer"]
    name: str
    cron: str
    timezone: str = "UTC"
    payload: Any = None
    catch_up: Boolean = False
    overlap: Boolean = True

    @field_validator("payload")
    @classmethod
    def _as_json(cls, value: Any) -> Any:
        if not _finite(value):
            raise ValueError("nan and inf have no JSON form, so the function could not be given them; write them as strings")
        return value


Trigger = Annotated[Union[S3Trigger, KafkaTrigger, TimerTrigger], Field(discriminator="type")]
TRIGGER_TYPES: tuple[str, ...] = tuple(
    get_args(model.model_fields["type"].annotation)[0] for model in get_args(get_args(Trigger)[0])
)


def _finite(value: Any) -> bool:
    """Whether every number in a value parsed from TOML has a JSON form (not nan or inf)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(map(_finite, value.values()))
    if isinstance(value, (list, tuple)):
        return all(map(_finite, value))
    return True


def _http_url(value: str) -> str:
    if not value:
        return value
    # Not echoed: a receiver's URL may hold its credentials (userinfo, a token in the query).
    if not re.match(r"^https?://[^/\s]+", value, re.IGNORECASE):
        raise ValueError(f"expected an http:// or https:// URL, got {_scheme_of(value)}")
    # What the HTTP client would fail on at every delivery.
    if re.search(r"\s", value):
        raise ValueError("not a valid URL: it holds a space")
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port  # raises for a port that is not a number from 0 to 65535
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {_without_secrets(str(exc), value)}") from None
    if not parts.hostname:
        raise ValueError("not a valid URL: it names no host")
    if port == 0:
        raise ValueError("not a valid URL: port 0 (expected 1 to 65535)")
    problem = _aiohttp_problem(value)
    if problem is not None:
        raise ValueError(f"not a valid URL: {problem}")
    return value


def _aiohttp_problem(value: str) -> str | None:
    """Why aiohttp, which makes the deliveries, could not send to the URL, or None.

    urllib.parse takes more than aiohttp does: aiohttp reads the URL with yarl, looks its host
    name up as IDNA, refuses an IPv4 address in any but its dotted-quad form, and sends a user
    and password as Basic authentication. Said without the URL's user, password or query.
    """
    try:
        url = yarl.URL(value)
    except ValueError as exc:  # (UnicodeError, of the host's IDNA form, included)
        return _without_secrets(str(exc).removeprefix("Invalid URL: "), value)
    host = url.raw_host or ""
    if ":" not in host:  # (an IPv6 address: neither looked up nor a dotted quad)
        problem = _ipv4_problem(host) if host.replace(".", "").isdigit() else _host_name_problem(host)
        if problem is not None:
            return problem
    return _basic_auth_problem(url.user or "", url.password or "")


def _scheme_of(value: str) -> str:
    """What a value that is no http(s) URL is, for its error: the value itself only when it can
    hold no credentials (no `@`, no query)."""
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):(/*)", value)
    if scheme is not None and scheme[1].lower() in ("http", "https"):
        if scheme[2] == "//":
            return f"{scheme[0]!r} with no host after it"
        return f"'{scheme[0]}...' (expected '{scheme[1]}://' and a host)"
    if scheme is not None and scheme[2] == "//":
        return f"a URL of scheme {scheme[1]!r}"
    if "@" in value or "?" in value or "#" in value:
        return "a value with no scheme (such as 'https://')"
    return f"{value!r}, with no scheme (such as 'https://')"


def _without_secrets(message: str, url: str) -> str:
    """A parser's message about the URL, its user and password, query and fragment written `...`
    (a parser may quote the URL's authority: urllib.parse and yarl do, in their NFKC check)."""
    authority = re.match(r"[^:/?#]*://([^/?#]*)", url)
    userinfo = authority[1].rpartition("@")[0] if authority else ""
    before_fragment, _, fragment = url.partition("#")
    query = before_fragment.partition("?")[2]
    for secret, shown in ((f"{userinfo}@", "...@"), (f"?{query}", "?..."), (f"#{fragment}", "#...")):
        if len(secret) > 1:
            message = message.replace(secret, shown)
    return message


def _ipv4_problem(host: str) -> str | None:
    """aiohttp takes an IPv4 address only as four numbers from 0 to 255 (no 127.1, no 0177.0.0.1),
    since the other forms the system reads name another address than they seem to."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return f"host {host!r} is not an IPv4 address as aiohttp takes one (four numbers 0 to 255: 127.0.0.1)"
    return None


def _host_name_problem(host: str) -> str | None:
    """Why the host name could not be looked up (as IDNA, in which each dot-separated label has
    1 to 63 characters), or None."""
    if host.endswith(".."):
        host = host.rstrip(".") + "."  # as aiohttp looks it up: one trailing dot, a fully qualified name
    try:
        host.encode("idna")
    except UnicodeError as exc:
        reason = exc.__cause__ or exc
        return f"host name {host!r} cannot be looked up: {reason} (each part between dots has 1 to 63 characters)"
    return None


def _basic_auth_problem(user: str, password: str) -> str | None:
    """Why aiohttp could not send the URL's user and password as Basic authentication, or None."""
    if ":" in user:
        return "its user name holds a ':' (written %3A), which Basic authentication cannot send"
    try:
        f"{user}:{password}".encode("latin-1")
    except UnicodeEncodeError:
        return "its user name or password holds a character Basic authentication cannot send (only Latin-1 ones)"
    return None


_KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def _kafka_topic(value: str) -> str:
    if value and (not _KAFKA_TOPIC.fullmatch(value) or value in (".", "..")):
        if len(value) > 249:
            raise ValueError(f"a Kafka topic name has at most 249 characters, got {len(value)}")
        raise ValueError(
            f"expected a Kafka topic name (letters, digits, '.', '_' and '-'; not '.' or '..'), got {value!r}"
        )
    return value


class OnFailure(_Strict):
    """Where the record of a failed run goes: `{ url = ... }` or `{ kafka_topic = ... }`."""

    url: str = ""
    kafka_topic: str = ""

    _url = field_validator("url")(_http_url)
    _topic = field_validator("kafka_topic")(_kafka_topic)

    @model_validator(mode="after")
    def _one_target(self) -> OnFailure:
        if bool(self.url) == bool(self.kafka_topic):
            raise ValueError("give exactly one of url or kafka_topic")
        return self

    @property
    def target(self) -> str:
        """The destination as the outbox records it: the URL, or `kafka:TOPIC`."""
        return self.url or f"kafka:{self.kafka_topic}"


class FunctionConfig(_Strict):
    """One `[functions.NAME]` table."""

    handler: str
    async_execution: Boolean = True
    timeout: float = 900.0
    concurrency: Integer = Field(4, ge=1, le=10_000)
    qps_limit: Integer = Field(1000, ge=1)
    environment: dict[str, str] = Field(default_factory=dict)
    callback_url: str = ""
    callback_secret: SecretStr = SecretStr("")  # signs what goes to callback_url and on_failure.url
    on_failure: OnFailure | None = None
    triggers: tuple[Trigger, ...] = ()
    memory_limit: int | None = None  # bytes of data memory per instance; None: [server] memory_limit; 0: no limit
    run_as: str | None = None  # the Unix user its instances run as; None: [server] run_as; "": the server's user

    _timeout = field_validator("timeout", mode="before")(parse_duration)
    _memory_limit = field_validator("memory_limit", mode="before")(parse_memory_limit)
    _callback_url = field_validator("callback_url")(_http_url)

    @field_validator("environment")
    @classmethod
    def _variables(cls, value: dict[str, str]) -> dict[str, str]:
        # What no process environment can hold (each instance would fail to start); values unshown.
        for name, text in value.items():
            if not name or "=" in name or "\0" in name:
                raise ValueError(f"variable name {name!r}: expected a name without '=' or NUL characters")
            if "\0" in text:
                raise ValueError(f"variable {name}: its value holds a NUL character, which no environment can hold")
        return value

    @field_validator("handler")
    @classmethod
    def _handler_shape(cls, value: str) -> str:
        path, sep, attr = value.rpartition(":")
        if not sep or not path or not attr.isidentifier():
            raise ValueError(f"expected 'path/to/file.py:callable', got {value!r}")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout_limit(cls, value: float, info: ValidationInfo) -> float:
        is_async = info.data.get("async_execution", True)
        limit = ASYNC_MAX_TIMEOUT if is_async else SYNC_MAX_TIMEOUT
        if value > limit:
            kind = "async" if is_async else "sync"
            raise ValueError(
                f"{kind} functions may run at most {format_duration(limit)}, got {format_duration(value)}"
            )
        return value

    @property
    def destinations(self) -> list[tuple[str, str]]:
        """(kind, target) of each place the function's ended runs go: "callback" (every end)
        and "on_failure" (FAILED and TIMED_OUT runs)."""
        out = [("callback", self.callback_url)] if self.callback_url else []
        if self.on_failure is not None:
            out.append(("on_failure", self.on_failure.target))
        return out

    @property
    def handler_file(self) -> str:
        """The handler's file path as written in the manifest."""
        return self.handler.rpartition(":")[0]

    @property
    def handler_name(self) -> str:
        """The handler's callable name."""
        return self.handler.rpartition(":")[2]


def format_duration(seconds: float) -> str:
    """A duration the way the manifest writes it."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def functions_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The server's environment as its functions' processes get it: without the EVENTRUN_*
    variables, eventrun's own configuration, which holds its tokens and passwords (a store's
    URL, a Kafka password, the ui_token) and is no function's to read."""
    return {name: value for name, value in environ.items() if not name.upper().startswith(ENV_PREFIX)}


class Manifest(BaseSettings):
    """The whole manifest: `[server]`, `[kafka]`, `[s3]` and `[functions.*]`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    server: ServerConfig = ServerConfig()
    kafka: KafkaConfig = KafkaConfig()
    s3: S3Config = S3Config()
    store: StoreConfig = StoreConfig()
    cluster: ClusterConfig = ClusterConfig()
    functions: dict[str, FunctionConfig] = Field(default_factory=dict)
    path: Path | None = Field(default=None, exclude=True)

    @field_validator("functions")
    @classmethod
    def _names(cls, value: dict[str, FunctionConfig]) -> dict[str, FunctionConfig]:
        for name in value:
            if not _NAME.fullmatch(name):
                raise ValueError(
                    f"function name {name!r} must start with an ASCII letter and hold only ASCII "
                    "letters, digits, '_' or '-' (at most 64)"
                )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The init arguments hold only `path` (load_manifest's), which no variable may move:
        # handler paths and data_dir are relative to it.
        toml_file = _TOML_FILE.get("path")
        if toml_file is None:
            return (init_settings, _EnvSettingsSource(settings_cls, file_functions=()))
        file = TomlConfigSettingsSource(settings_cls, toml_file=toml_file)
        env = _EnvSettingsSource(settings_cls, file_functions=_table_keys(file.toml_data.get("functions")))
        return (init_settings, env, file)

    @property
    def base_dir(self) -> Path:
        """The folder handler paths and data_dir are relative to."""
        return self.path.parent if self.path else Path.cwd()

    @property
    def data_dir(self) -> Path:
        """The absolute data directory."""
        return (self.base_dir / self.server.data_dir).resolve()

    def kafka_file(self, name: str) -> Path:
        """The absolute path of a TLS file named in `[kafka]`."""
        return (self.base_dir / name).resolve()

    def handler_path(self, name: str) -> Path:
        """The absolute path of a function's handler file."""
        return (self.base_dir / self.functions[name].handler_file).resolve()


class _EnvSettingsSource(EnvSettingsSource):
    """The EVENTRUN_* variables, each function they name spelled as the manifest file spells it,
    and each text they give marked as theirs (_VariableText), to be parsed into its key's type.

    A variable's name is read without regard to case (pydantic-settings lowers it), so
    EVENTRUN_FUNCTIONS__HELLO__TIMEOUT is about the file's [functions.Hello]. A name the file
    has in no case is a function of the environment's own, named in lower case.
    """

    def __init__(self, settings_cls: type[BaseSettings], file_functions: Collection[str]) -> None:
        super().__init__(settings_cls)
        self.file_functions = file_functions

    def __call__(self) -> dict[str, Any]:
        values = _as_variable_text(super().__call__())
        functions = values.get("functions")
        if isinstance(functions, dict):
            values["functions"] = {self._as_in_file(name): table for name, table in functions.items()}
        return values

    def _as_in_file(self, name: str) -> str:
        spellings = _spellings(name, self.file_functions)
        # Two spellings: load_manifest refused the variable before reading (_ambiguous_functions).
        return spellings[0] if len(spellings) == 1 else name


def _as_variable_text(table: dict[str, Any]) -> dict[str, Any]:
    """The table with each text in it, and in the tables in it, marked as a variable's. Arrays,
    which a variable can only write as JSON, keep their types (a timer's payload too)."""
    return {key: _marked(value) for key, value in table.items()}


def _marked(value: Any) -> Any:
    if isinstance(value, str):
        return _VariableText(value)
    return _as_variable_text(value) if isinstance(value, dict) else value


def _spellings(name: str, names: Collection[str]) -> list[str]:
    """The names in `names` that are `name` in some case."""
    return sorted(other for other in names if other.lower() == name.lower())


def _table_keys(table: Any) -> list[str]:
    return [key for key in table if isinstance(key, str)] if isinstance(table, dict) else []


def _ambiguous_functions(origins: Origins) -> str | None:
    """A line for each function the EVENTRUN_* variables name that the file spells two ways
    (`[functions.Hello]` and `[functions.HELLO]`), as no variable's name can choose one; or None."""
    file_functions = _table_keys(origins.file.get("functions"))
    lines = []
    for name in _table_keys(origins.env.get("functions")):
        spellings = _spellings(name, file_functions)
        if len(spellings) > 1:
            variables = ", ".join(origins.variables_under(["functions", name])) or "EVENTRUN_FUNCTIONS"
            lines.append(
                f"the environment: {variables}: {origins.label} has functions {' and '.join(map(repr, spellings))}, "
                "and a variable's name is read without regard to case, so the variable cannot say which; "
                "set this key in the file instead"
            )
    return "\n".join(lines) or None


_TOML_FILE: dict[str, Path] = {}

_SCHEMA = Schema(
    Manifest,
    keys={
        "": tuple(Manifest.model_fields),
        "server": tuple(ServerConfig.model_fields),
        "kafka": tuple(KafkaConfig.model_fields),
        "s3": tuple(S3Config.model_fields),
        "store": tuple(StoreConfig.model_fields),
        "cluster": tuple(ClusterConfig.model_fields),
        "function": tuple(FunctionConfig.model_fields),
        "on_failure": tuple(OnFailure.model_fields),
        "trigger": tuple({*S3Trigger.model_fields, *KafkaTrigger.model_fields, *TimerTrigger.model_fields}),
        **{f"trigger.{kind}": tuple(model.model_fields) for kind, model in zip(TRIGGER_TYPES, get_args(get_args(Trigger)[0]))},
    },
    trigger_types=TRIGGER_TYPES,
)


Problem = tuple[list[str], str]
"""What a trigger finds wrong in its part of a manifest (a cron no date matches, two consumers
of one group): where, as the keys that lead to the value, and what."""


def problems_text(problems: Sequence[Problem]) -> str:
    """Problems one a line, each after the keys of its value: `functions.f.triggers[0].cron: ...`."""
    return "\n".join(f"{dotted(loc)}: {message}" for loc, message in problems)


def load_manifest(path: Path | str | None, check: Callable[[Manifest], Sequence[Problem]] | None = None) -> Manifest:
    """Read the manifest at `path` (or defaults only) plus EVENTRUN_* variables. `check` looks at
    what the triggers read (ManifestError listing every problem it finds, each after its source)."""
    location = Path(path).resolve() if path is not None else None
    label = str(path) if path is not None else "the environment"
    if location is not None and not location.is_file():
        raise ManifestError(f"{label}: no such manifest file")
    unread = unknown_tables(_SCHEMA)
    if unread is not None:
        raise ManifestError(unread)
    ambiguous = _ambiguous_functions(Origins(_SCHEMA, label, location))
    if ambiguous is not None:
        raise ManifestError(ambiguous)
    _TOML_FILE.clear()
    if location is not None:
        _TOML_FILE["path"] = location
    try:
        manifest = Manifest(path=location)
    except ValidationError as exc:
        raise ManifestError(describe(Origins(_SCHEMA, label, location), exc)) from None
    except SettingsError as exc:  # an EVENTRUN_* variable that should hold JSON does not
        raise ManifestError(describe_settings_error(label, exc)) from None
    except ValueError as exc:  # TOML syntax errors arrive as tomllib.TOMLDecodeError
        raise ManifestError(f"{label}: not valid TOML: {exc}") from None
    finally:
        _TOML_FILE.clear()
    # What the values lead to (files, names across tables, the triggers' own reading): every
    # problem at once, as the values' own problems above are.
    problems = [*_file_problems(manifest), *_trigger_name_problems(manifest)]
    if check is not None:
        problems += check(manifest)
    if problems:
        origins = Origins(_SCHEMA, label, location)
        raise ManifestError("\n".join(origins.line(loc, message) for loc, message in problems))
    return manifest


def _file_problems(manifest: Manifest) -> list[Problem]:
    """Handler files that are not Python files, and Kafka files (certificates, keys) not found."""
    problems: list[Problem] = []
    for name, function in manifest.functions.items():
        handler = manifest.handler_path(name)
        if not handler.is_file() or not handler.name.endswith(".py"):
            problems.append((["functions", name, "handler"], _handler_problem(function, handler)))
    for key, name in manifest.kafka.files().items():
        found = manifest.kafka_file(name)
        if not found.is_file():
            problems.append((["kafka", key], f"file {name!r} not found (looked for {found})"))
    return problems


def _handler_problem(function: FunctionConfig, found: Path) -> str:
    file = function.handler_file
    if found.is_file():  # the worker imports a module from the file, and only from a .py file
        why = "its name does not end in .py" if not file.endswith(".py") else f"it leads to {found}"
        return f'{file!r} is not a Python file ({why}); a handler is "path/to/file.py:callable", relative to the manifest'
    if not found.is_dir():
        return f"file {file!r} not found (looked for {found})"
    message = (
        f"{file!r} is a directory ({found}), not a Python file; a handler is "
        '"path/to/file.py:callable", relative to the manifest'
    )
    guess = found / f"{function.handler_name}.py"
    if guess.is_file():
        message += f' (did you mean "{file.rstrip("/")}/{guess.name}:{function.handler_name}"?)'
    return message


def _trigger_name_problems(manifest: Manifest) -> list[Problem]:
    """Two timer triggers of one function with one name."""
    problems: list[Problem] = []
    for name, function in manifest.functions.items():
        seen: set[str] = set()
        for trigger in function.triggers:
            if isinstance(trigger, TimerTrigger):
                if trigger.name in seen:
                    problems.append((["functions", name, "triggers"], f"two timer triggers are named {trigger.name!r}"))
                seen.add(trigger.name)
    return problems
