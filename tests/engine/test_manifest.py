"""The manifest: durations, limits, precise refusals, environment overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from eventrun.engine.errors import ManifestError
from eventrun.engine.manifest import ServerConfig, load_manifest, parse_duration, parse_size


pytestmark = pytest.mark.usefixtures("no_eventrun_environment")


@pytest.fixture
def write(tmp_path: Path):
    """write(text) -> the path of an eventrun.toml holding text, beside a handler file."""
    (tmp_path / "handlers").mkdir()
    (tmp_path / "handlers" / "ok.py").write_text("def main_handler(event, context):\n    return 1\n")

    def write(text: str) -> Path:
        path = tmp_path / "eventrun.toml"
        path.write_text(text)
        return path

    return write


def function(name: str = "f", **keys: str) -> str:
    lines = [f"[functions.{name}]", 'handler = "handlers/ok.py:main_handler"']
    lines += [f"{key} = {value}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def refusal(path: Path) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return str(info.value)


def file_refusal(write, text: str) -> str:
    """The refusal of an eventrun.toml holding `text`, which names the file first: what follows its name."""
    path = write(text)
    message = refusal(path)
    assert message.startswith(f"{path}: "), message
    return message.removeprefix(f"{path}: ")


def setting(write, table: str, key: str, toml: str):
    """The value of `key` in [table], written `toml` (beside a function), as the manifest reads it."""
    manifest = load_manifest(write(f"[{table}]\n{key} = {toml}\n" + function()))
    return getattr(getattr(manifest, table), key)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90.0), ("15m", 900.0), ("2h", 7200.0), ("24h", 86400.0), ("1.5s", 1.5), ("500ms", 0.5), (30, 30.0)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5x", "h2", "-5s", "0s", "1 2s", True, "2 hours"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(("text", "size"), [("6MB", 6 * 1024**2), ("1KB", 1024), ("512kb", 512 * 1024), (100, 100)])
def test_sizes(text, size):
    assert parse_size(text) == size


def test_a_full_manifest_loads(write):
    manifest = load_manifest(
        write(
            '[server]\nport = 9001\ndata_dir = "state"\nmax_body_size = "1KB"\n'
            + function("thumbnail", timeout='"2h"', concurrency="2", environment='{ MODE = "fast" }')
            + '[[functions.thumbnail.triggers]]\ntype = "s3"\nbucket = "uploads"\n'
        )
    )
    config = manifest.functions["thumbnail"]
    assert config.timeout == 7200.0 and config.concurrency == 2 and config.async_execution is True
    assert config.environment == {"MODE": "fast"}
    assert config.triggers[0].bucket == "uploads"
    assert manifest.server.port == 9001 and manifest.server.max_body_size == 1024
    assert manifest.data_dir == (write("").parent / "state").resolve()
    assert manifest.handler_path("thumbnail") == (write("").parent / "handlers" / "ok.py").resolve()


def test_async_functions_may_run_24_hours_but_no_longer(write):
    assert load_manifest(write(function("long", timeout='"24h"'))).functions["long"].timeout == 86400.0
    message = refusal(write(function("long", timeout='"25h"')))
    assert re.search(r"functions\.long(\.|: )timeout", message) and "24h" in message, message
    assert str(write("")) in message or "eventrun.toml" in message, message


def test_sync_functions_may_run_900_seconds_but_no_longer(write):
    ok = load_manifest(write(function("api", async_execution="false", timeout='"900s"')))
    assert ok.functions["api"].timeout == 900.0
    message = refusal(write(function("api", async_execution="false", timeout='"901s"')))
    assert re.search(r"functions\.api(\.|: )timeout", message) and "sync" in message, message


def test_a_bad_duration_names_the_key(write):
    message = refusal(write(function("f", timeout='"soon"')))
    assert "functions.f.timeout" in message and "'soon'" in message, message


def test_a_typo_key_gets_a_suggestion(write):
    path = write(function("f", timout='"5s"'))
    message = refusal(path)
    line = next(line for line in message.splitlines() if "functions.f.timout" in line)
    assert line.startswith(str(path)) and "'timeout'" in line, message


def test_a_typo_in_server_gets_a_suggestion(write):
    message = refusal(write('[server]\nprot = 9000\n' + function()))
    assert "server.prot" in message and "'port'" in message, message


def test_an_unknown_trigger_type_is_refused(write):
    message = refusal(write(function() + '[[functions.f.triggers]]\ntype = "sqs"\nqueue = "q"\n'))
    assert "functions.f.triggers[0]" in message and "unknown trigger type" in message, message


def test_an_unknown_trigger_type_names_the_key_the_value_and_the_choices(write):
    text = function() + '[[functions.f.triggers]]\ntype = "tmer"\nname = "t"\ncron = "* * * * *"\n'
    assert file_refusal(write, text) == (
        "functions.f.triggers[0].type: unknown trigger type 'tmer' (did you mean 'timer'?); "
        "expected one of 's3', 'kafka', 'timer'"
    )


def test_a_trigger_without_a_type_says_so(write):
    text = function() + '[[functions.f.triggers]]\nname = "t"\ncron = "* * * * *"\n'
    assert file_refusal(write, text) == "functions.f.triggers[0]: missing key 'type' (one of 's3', 'kafka', 'timer')"


def test_triggers_written_as_one_table_ask_for_an_array_of_tables(write):
    path = write(function(triggers='{ type = "timer", name = "t", cron = "* * * * *" }'))
    assert refusal(path) == (
        f"{path}: functions.f.triggers: expected an array of tables ([[functions.f.triggers]]), got a table"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server = 5\n" + function(), "server: expected a table ([server]), got 5"),
        (function(environment='"MODE=fast"'), "functions.f.environment: expected a table, got a string"),
        (function(triggers='["timer"]'), "functions.f.triggers[0]: expected a table ([[functions.f.triggers]]), got 'timer'"),
        (function() + '[[functions.f.triggers]]\ntype = "s3"\nbucket = "b"\nevents = "s3:ObjectCreated:*"\n',
         "functions.f.triggers[0].events: expected an array of strings, got 's3:ObjectCreated:*'"),
        ("[server]\nport = [9000]\n" + function(), "server.port: Input should be a valid integer, got an array"),
        ("[server]\nfork_instances = \"maybe\"\n" + function(), "server.fork_instances: Input should be a valid boolean, got 'maybe'"),
        ("functions = [1]\n", "functions: expected a table ([functions.NAME]), got an array"),
        (function(on_failure='"http://x/y"'), "functions.f.on_failure: expected a table, got 'http://x/y'"),
        (function() + '[[functions.f.triggers]]\ntype = "kafka"\ntopic = "t"\nstarting_position = "lates"\n',
         "functions.f.triggers[0].starting_position: Input should be 'latest' or 'earliest', got 'lates' (did you mean 'latest'?)"),
    ],
    ids=["server", "environment", "trigger", "events", "port", "boolean", "functions", "on_failure", "choice"],
)
def test_shape_errors_are_worded_in_toml_terms(write, text, expected):
    message = refusal(write(text))
    assert expected in message, message
    for word in ("tuple", "dictionary", "list", "instance of", "unable to"):
        assert word not in message, message


TIMER = '[[functions.f.triggers]]\ntype = "timer"\nname = "t"\ncron = "* * * * *"\n'
UNQUOTED = "(a string: write the number without quotes)"
TRUE_OR_FALSE = "(a boolean is written true or false, without quotes)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (function(concurrency="true"), "functions.f.concurrency: Input should be a valid integer, got true"),
        (function(concurrency='"3"'), f"functions.f.concurrency: Input should be a valid integer, got '3' {UNQUOTED}"),
        (function(qps_limit="10.0"), "functions.f.qps_limit: Input should be a valid integer, got 10.0"),
        (function(async_execution='"no"'), f"functions.f.async_execution: Input should be a valid boolean, got 'no' {TRUE_OR_FALSE}"),
        (function(async_execution="0"), f"functions.f.async_execution: Input should be a valid boolean, got 0 {TRUE_OR_FALSE}"),
        ('[server]\nport = "9001"\n' + function(), f"server.port: Input should be a valid integer, got '9001' {UNQUOTED}"),
        ("[server]\nfork_instances = 1\n" + function(), f"server.fork_instances: Input should be a valid boolean, got 1 {TRUE_OR_FALSE}"),
        ("[server]\nmax_instances = false\n" + function(), "server.max_instances: Input should be a valid integer, got false"),
        ('[kafka]\nhigh_water_mark = "500"\n' + function(), f"kafka.high_water_mark: Input should be a valid integer, got '500' {UNQUOTED}"),
        ('[kafka]\nssl_check_hostname = "false"\n' + function(), f"kafka.ssl_check_hostname: Input should be a valid boolean, got 'false' {TRUE_OR_FALSE}"),
        ('[store]\npool_size = "4"\n' + function(), f"store.pool_size: Input should be a valid integer, got '4' {UNQUOTED}"),
        (function() + TIMER + 'catch_up = "yes"\n', f"functions.f.triggers[0].catch_up: Input should be a valid boolean, got 'yes' {TRUE_OR_FALSE}"),
    ],
    ids=["bool-for-int", "quoted-int", "float-for-int", "quoted-bool", "int-for-bool", "port", "fork_instances",
         "max_instances", "high_water_mark", "ssl_check_hostname", "pool_size", "catch_up"],
)
def test_a_value_of_another_toml_type_is_refused_not_read_as_one(write, text, expected):
    # Before, `concurrency = true` ran with 1, and `async_execution = "no"` made (and locked for
    # ever in the store) a sync function.
    assert file_refusal(write, text) == expected


def test_a_variables_text_is_parsed_into_its_keys_type(write, monkeypatch):
    for name, value in {
        "EVENTRUN_SERVER__PORT": "9123", "EVENTRUN_SERVER__FORK_INSTANCES": "no", "EVENTRUN_SERVER__HOST": "0.0.0.0",
        "EVENTRUN_FUNCTIONS__F__CONCURRENCY": "8", "EVENTRUN_FUNCTIONS__F__ASYNC_EXECUTION": "false",
        "EVENTRUN_FUNCTIONS__F__ENVIRONMENT": '{"MODE": "fast", "LEVEL": "3"}',
        "EVENTRUN_KAFKA": '{"high_water_mark": "500", "ssl_check_hostname": "0"}',
    }.items():
        monkeypatch.setenv(name, value)
    for path in (write('[server]\nport = 9001\n' + function()), None):  # (with a file, and alone)
        monkeypatch.setenv("EVENTRUN_FUNCTIONS__F__HANDLER", str(write("").parent / "handlers" / "ok.py:main_handler"))
        manifest = load_manifest(path)
        server, kafka_config, f = manifest.server, manifest.kafka, manifest.functions["f"]
        assert (server.port, server.fork_instances, f.concurrency, f.async_execution) == (9123, False, 8, False)
        assert (kafka_config.high_water_mark, kafka_config.ssl_check_hostname) == (500, False)
        # The variables' text is plain text once read (nothing of the marking stays in the manifest).
        assert type(server.host) is str and {type(v) for v in f.environment.values()} == {str}
        assert f.environment == {"MODE": "fast", "LEVEL": "3"}


def test_a_variables_text_that_is_not_of_its_keys_type_names_the_variable(write, monkeypatch):
    monkeypatch.setenv("EVENTRUN_FUNCTIONS__F__ASYNC_EXECUTION", "maybe")
    assert refusal(write(function())) == (
        "the environment: EVENTRUN_FUNCTIONS__F__ASYNC_EXECUTION: Input should be a valid boolean, got 'maybe'"
    )


def test_a_secret_of_the_wrong_type_is_not_shown(write):
    message = refusal(write(kafka(security_protocol='"SASL_SSL"', sasl_username='"u"', sasl_password="73519") + function()))
    assert "kafka.sasl_password" in message and "an integer" in message and "73519" not in message, message


def test_a_typo_in_store_gets_a_suggestion(write):
    message = refusal(write("[store]\npool_sise = 4\n" + function()))
    assert "store.pool_sise: unknown key (did you mean 'pool_size'?)" in message, message


def test_a_missing_trigger_key_is_named(write):
    message = refusal(write(function() + '[[functions.f.triggers]]\ntype = "kafka"\n'))
    assert message.endswith("functions.f.triggers[0].topic: a required key, not set"), message


def test_environment_overrides_the_file(write, monkeypatch):
    path = write("[server]\nport = 9001\n" + function())
    monkeypatch.setenv("EVENTRUN_SERVER__PORT", "9123")
    monkeypatch.setenv("EVENTRUN_KAFKA__BOOTSTRAP_SERVERS", "broker:29092")
    manifest = load_manifest(path)
    assert manifest.server.port == 9123
    assert manifest.kafka.bootstrap_servers == "broker:29092"
    assert "f" in manifest.functions


def test_no_variable_moves_the_manifest_folder(write, monkeypatch, tmp_path):
    # EVENTRUN_PATH is a plausible name for a variable of one's own: it must not move where
    # handlers and data_dir are found.
    monkeypatch.setenv("EVENTRUN_PATH", str(tmp_path / "elsewhere" / "eventrun.toml"))
    path = write(function())
    manifest = load_manifest(path)
    assert manifest.path == path and manifest.base_dir == tmp_path
    assert manifest.handler_path("f") == tmp_path / "handlers" / "ok.py"
    monkeypatch.chdir(tmp_path / "handlers")
    assert load_manifest(None).base_dir == tmp_path / "handlers"


def test_a_variable_for_a_table_the_manifest_has_not_is_refused(write, monkeypatch):
    # pydantic-settings leaves it unread: the server would run on port 8080 without a word.
    monkeypatch.setenv("EVENTRUN_SERVR__PORT", "9000")
    monkeypatch.setenv("EVENTRUN_PATH", "/opt/eventrun")  # no table in its name: not a manifest key, left alone
    assert refusal(write(function())) == (
        "the environment: EVENTRUN_SERVR__PORT: unknown table 'servr' (did you mean EVENTRUN_SERVER__PORT?);"
        " the tables are server, kafka, s3, store, cluster, functions"
    )


def test_a_bad_environment_value_is_refused(write, monkeypatch):
    monkeypatch.setenv("EVENTRUN_SERVER__PORT", "not-a-port")
    message = refusal(write(function()))
    assert message == "the environment: EVENTRUN_SERVER__PORT: Input should be a valid integer, got 'not-a-port'"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("EVENTRUN_SERVER__PORT", "abc", "the environment: EVENTRUN_SERVER__PORT: Input should be a valid integer, got 'abc'"),
        ("EVENTRUN_SERVER__PROT", "1", "the environment: EVENTRUN_SERVER__PROT: unknown key (did you mean EVENTRUN_SERVER__PORT?)"),
        ("EVENTRUN_SERVER__MAX_BODY_SIZE", "huge",
         "the environment: EVENTRUN_SERVER__MAX_BODY_SIZE: expected a size such as '6MB' or '512KB', got 'huge'"),
        ("EVENTRUN_KAFKA__SASL_PASWORD", "x",
         "the environment: EVENTRUN_KAFKA__SASL_PASWORD: unknown key (did you mean EVENTRUN_KAFKA__SASL_PASSWORD?)"),
        ("EVENTRUN_SERVER", '{"port": "x"}', "the environment: EVENTRUN_SERVER (port): Input should be a valid integer, got 'x'"),
    ],
)
def test_a_bad_environment_value_names_the_variable_not_the_file(write, monkeypatch, variable, value, expected):
    path = write("[server]\nport = 9001\n" + function())
    monkeypatch.setenv(variable, value)
    message = refusal(path)
    assert message == expected, message
    assert str(path) not in message


def test_errors_from_the_file_and_the_environment_each_name_their_source(write, monkeypatch):
    path = write('[server]\nport = "nope"\n' + function())
    monkeypatch.setenv("EVENTRUN_SERVER__MAX_BODY_SIZE", "huge")
    assert refusal(path).splitlines() == [
        f"{path}: server.port: Input should be a valid integer, got 'nope'",
        "the environment: EVENTRUN_SERVER__MAX_BODY_SIZE: expected a size such as '6MB' or '512KB', got 'huge'",
    ]


def test_an_environment_variable_that_is_not_json_is_not_blamed_on_the_file(write, monkeypatch):
    path = write(function())
    monkeypatch.setenv("EVENTRUN_SERVER", "port=9000")
    message = refusal(path)
    assert message.startswith("the environment: EVENTRUN_SERVER: not valid JSON"), message
    assert "EVENTRUN_SERVER__KEY" in message and "TOML" not in message and str(path) not in message, message


def test_a_table_check_names_the_variables_it_read(write, monkeypatch):
    monkeypatch.setenv("EVENTRUN_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("EVENTRUN_KAFKA__BOOTSTRAP_SERVERS", "broker:9092")
    path = write(kafka(sasl_username='"svc"') + function())
    message = refusal(path)
    assert message.startswith(f"{path}: kafka: security_protocol 'SASL_SSL' needs sasl_password"), message
    assert message.endswith("; set in the environment: EVENTRUN_KAFKA__SECURITY_PROTOCOL"), message
    # No [kafka] in the file: the environment alone is at fault.
    message = refusal(write(function()))
    assert message.startswith("the environment: kafka: security_protocol 'SASL_SSL' needs sasl_username"), message


def test_a_missing_file_named_by_a_variable_names_the_variable(write, monkeypatch):
    monkeypatch.setenv("EVENTRUN_KAFKA__SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("EVENTRUN_KAFKA__SSL_CAFILE", "certs/ca.pem")
    message = refusal(write(function()))
    assert message.startswith("the environment: EVENTRUN_KAFKA__SSL_CAFILE: file 'certs/ca.pem' not found"), message


def test_a_missing_handler_file_is_refused(write):
    path = write('[functions.ghost]\nhandler = "handlers/missing.py:main_handler"\n')
    message = refusal(path)
    assert "functions.ghost.handler" in message and "handlers/missing.py" in message, message


def test_a_handler_naming_a_directory_says_so(write, tmp_path):
    path = write('[functions.f]\nhandler = "handlers:main_handler"\n')
    message = refusal(path)
    assert message.startswith(f"{path}: functions.f.handler: 'handlers' is a directory ({tmp_path / 'handlers'})"), message
    assert 'a handler is "path/to/file.py:callable", relative to the manifest' in message, message
    assert "not found" not in message, message
    (tmp_path / "handlers" / "main_handler.py").write_text("def main_handler(event, context):\n    return 1\n")
    assert refusal(path).endswith('(did you mean "handlers/main_handler.py:main_handler"?)')


@pytest.mark.parametrize("name", ["handlers/x.txt", "handlers/x", "handlers/x.py.bak"])
def test_a_handler_file_that_is_not_python_is_refused(write, tmp_path, name):
    # It exists, but the worker can import no module from it: every run would fail with ImportError.
    (tmp_path / name).write_text("def main_handler(event, context):\n    return 1\n")
    path = write(f'[functions.f]\nhandler = "{name}:main_handler"\n')
    assert refusal(path) == (
        f"{path}: functions.f.handler: {name!r} is not a Python file (its name does not end in .py); a handler is"
        ' "path/to/file.py:callable", relative to the manifest'
    )


def test_a_handler_file_linking_to_a_file_that_is_not_python_is_refused(write, tmp_path):
    # The worker is given the file the link leads to.
    (tmp_path / "handlers" / "x.txt").write_text("def main_handler(event, context):\n    return 1\n")
    (tmp_path / "handlers" / "link.py").symlink_to("x.txt")
    path = write('[functions.f]\nhandler = "handlers/link.py:main_handler"\n')
    assert refusal(path).startswith(
        f"{path}: functions.f.handler: 'handlers/link.py' is not a Python file (it leads to {tmp_path / 'handlers' / 'x.txt'});"
    )


def test_a_handler_without_a_callable_is_refused(write):
    message = refusal(write('[functions.f]\nhandler = "handlers/ok.py"\n'))
    assert "functions.f.handler" in message, message


def test_bad_toml_syntax_is_refused(write):
    path = write('[functions.f\nhandler = "handlers/ok.py:main_handler"\n')
    message = refusal(path)
    assert str(path) in message and "TOML" in message, message


def test_a_missing_manifest_file_is_refused(tmp_path):
    message = refusal(tmp_path / "nowhere.toml")
    assert "nowhere.toml" in message, message


@pytest.mark.parametrize(("name", "shown"), [("9lives", "'9lives'"), ('"hello\\n"', "'hello\\n'"), ('"hello "', "'hello '")])
def test_a_bad_function_name_is_refused(write, name, shown):
    assert refusal(write(function(name))).endswith(
        f"functions: function name {shown} must start with an ASCII letter and hold only ASCII letters, digits, '_' or '-' (at most 64)"
    )


def test_a_node_id_with_a_line_break_is_refused(write):
    message = refusal(write('[cluster]\nnode_id = "a\\n"\n' + function()))
    assert message.endswith("cluster.node_id: node_id 'a\\n' may hold only letters, digits, '.', ':', '_' or '-'"), message


# -- [kafka] security ------------------------------------------------------------------------


def kafka(**keys: str) -> str:
    return "[kafka]\n" + "".join(f"{key} = {value}\n" for key, value in keys.items())


def test_kafka_is_plaintext_by_default(write):
    config = load_manifest(write(function())).kafka
    assert config.security_protocol == "PLAINTEXT" and not config.tls and not config.sasl


def test_kafka_protocol_and_mechanism_take_any_case(write):
    path = write(kafka(security_protocol='"sasl_ssl"', sasl_mechanism='"scram-sha-512"', sasl_username='"u"',
                       sasl_password='"p"') + function())
    config = load_manifest(path).kafka
    assert (config.security_protocol, config.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert config.tls and config.sasl


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"security_protocol": '"TLS"'}, r"kafka\.security_protocol: .*'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT' or 'SASL_SSL'"),
        ({"sasl_mechanism": '"GSSAPI"', "security_protocol": '"SASL_SSL"', "sasl_username": '"u"', "sasl_password": '"p"'},
         r"kafka\.sasl_mechanism: .*'PLAIN', 'SCRAM-SHA-256' or 'SCRAM-SHA-512'"),
        ({"ssl_cafile": '"ca.pem"'}, r"kafka: ssl_cafile set, but security_protocol is 'PLAINTEXT'.*security_protocol = \"SSL\""),
        ({"security_protocol": '"SASL_PLAINTEXT"', "sasl_username": '"u"', "sasl_password": '"p"', "ssl_certfile": '"c.pem"'},
         r"kafka: ssl_certfile set, but security_protocol is 'SASL_PLAINTEXT'.*\"SASL_SSL\""),
        ({"security_protocol": '"SSL"', "ssl_keyfile": '"k.pem"'}, r"kafka: ssl_keyfile set without ssl_certfile \(the client certificate"),
        ({"security_protocol": '"SSL"', "ssl_keyfile_password": '"pw"'}, r"kafka: ssl_keyfile_password set without ssl_certfile"),
        ({"security_protocol": '"SASL_SSL"'}, r"kafka: security_protocol 'SASL_SSL' needs sasl_username and sasl_password"),
        ({"security_protocol": '"SASL_SSL"', "sasl_username": '"u"'},
         r"kafka: security_protocol 'SASL_SSL' needs sasl_password \(.*EVENTRUN_KAFKA__SASL_PASSWORD"),
        ({"security_protocol": '"SSL"', "sasl_username": '"u"'},
         r"kafka: sasl_username or sasl_password set, but security_protocol is 'SSL'.*\"SASL_SSL\""),
        ({"sasl_pasword": '"p"'}, r"kafka\.sasl_pasword: unknown key \(did you mean 'sasl_password'\?\)"),
    ],
)
def test_kafka_security_mistakes_are_refused_precisely(write, keys, expected):
    path = write(kafka(**keys) + function())
    message = refusal(path)
    assert re.search(expected, message), message
    assert message.startswith(str(path)), message


def test_kafka_tls_files_must_exist_relative_to_the_manifest(write, tmp_path):
    message = refusal(write(kafka(security_protocol='"SSL"', ssl_cafile='"certs/ca.pem"') + function()))
    assert "kafka.ssl_cafile: file 'certs/ca.pem' not found" in message, message
    assert str(tmp_path / "certs" / "ca.pem") in message, message
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_text("x")
    manifest = load_manifest(write(kafka(security_protocol='"SSL"', ssl_cafile='"certs/ca.pem"') + function()))
    assert manifest.kafka_file(manifest.kafka.ssl_cafile) == tmp_path / "certs" / "ca.pem"


def test_the_sasl_password_may_come_from_the_environment_and_is_not_shown(write, monkeypatch):
    monkeypatch.setenv("EVENTRUN_KAFKA__SASL_PASSWORD", "hunter2")
    path = write(kafka(security_protocol='"SASL_PLAINTEXT"', sasl_username='"svc"') + function())
    config = load_manifest(path).kafka
    assert config.sasl_password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(config) and "hunter2" not in str(load_manifest(path))


def test_destinations_are_read_in_order_callback_then_on_failure(write) -> None:
    manifest = load_manifest(
        write(
            function("a", callback_url='"https://hooks.example.com/done"', callback_secret='"s3cr3t-value"', on_failure='{ kafka_topic = "failures" }')
            + function("b", on_failure='{ url = "http://127.0.0.1:9/failed" }')
            + function("c")
        )
    )
    assert manifest.functions["a"].destinations == [("callback", "https://hooks.example.com/done"), ("on_failure", "kafka:failures")]
    assert manifest.functions["a"].callback_secret.get_secret_value() == "s3cr3t-value"
    assert "s3cr3t-value" not in repr(manifest.functions["a"]), "the secret stays out of logs and reprs"
    assert manifest.functions["b"].destinations == [("on_failure", "http://127.0.0.1:9/failed")]
    assert manifest.functions["c"].destinations == []


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"callback_url": '"hooks.example.com/done"'}, "functions.f.callback_url: expected an http:// or https:// URL, got 'hooks.example.com/done', with no scheme (such as 'https://')"),
        ({"on_failure": '{ url = "ftp://x/y" }'}, "functions.f.on_failure.url: expected an http:// or https:// URL, got a URL of scheme 'ftp'"),
        # A mistyped scheme does not show the URL's user, password or query.
        ({"callback_url": '"htp://user:SECRETPW@hooks.example.com/done?token=SECRETQ"'},
         "functions.f.callback_url: expected an http:// or https:// URL, got a URL of scheme 'htp'"),
        ({"callback_url": '"http//user:SECRETPW@hooks.example.com/done?token=SECRETQ"'},
         "functions.f.callback_url: expected an http:// or https:// URL, got a value with no scheme (such as 'https://')"),
        ({"on_failure": '{ url = "https:/hooks/x?token=SECRETQ" }'},
         "functions.f.on_failure.url: expected an http:// or https:// URL, got 'https:/...' (expected 'https://' and a host)"),
        ({"callback_url": '"https://"'}, "functions.f.callback_url: expected an http:// or https:// URL, got 'https://' with no host after it"),
        ({"on_failure": '{ url = "http://x", kafka_topic = "t" }'}, "functions.f.on_failure: give exactly one of url or kafka_topic"),
        ({"on_failure": "{}"}, "functions.f.on_failure: give exactly one of url or kafka_topic"),
        ({"on_failure": '{ topic = "t" }'}, "functions.f.on_failure.topic: unknown key (did you mean 'kafka_topic'?)"),
        ({"on_success": '{ url = "http://x" }'}, "functions.f.on_success: unknown key (did you mean 'callback_url'?)"),
        # What the HTTP client or the Kafka producer would have failed on at every delivery:
        ({"callback_url": '"http://127.0.0.1:99999/x"'}, "functions.f.callback_url: not a valid URL: Port out of range 0-65535"),
        ({"callback_url": '"http://[::1/x"'}, "functions.f.callback_url: not a valid URL: Invalid IPv6 URL"),
        ({"callback_url": '"http://hooks:0/x"'}, "functions.f.callback_url: not a valid URL: port 0 (expected 1 to 65535)"),
        ({"callback_url": '"http://:8080/x"'}, "functions.f.callback_url: not a valid URL: it names no host"),
        ({"callback_url": '"http://hooks example/x"'}, "functions.f.callback_url: not a valid URL: it holds a space"),
        ({"on_failure": '{ url = "https://hooks:port/x" }'}, "functions.f.on_failure.url: not a valid URL: Port could not be cast to integer value as 'port'"),
        ({"on_failure": '{ kafka_topic = "bad topic!" }'}, "functions.f.on_failure.kafka_topic: expected a Kafka topic name (letters, digits, '.', '_' and '-'; not '.' or '..'), got 'bad topic!'"),
        ({"on_failure": '{ kafka_topic = ".." }'}, "functions.f.on_failure.kafka_topic: expected a Kafka topic name"),
        ({"on_failure": '{ kafka_topic = "failures\\n" }'}, "functions.f.on_failure.kafka_topic: expected a Kafka topic name"),
        ({"on_failure": f'{{ kafka_topic = "{"t" * 250}" }}'}, "functions.f.on_failure.kafka_topic: a Kafka topic name has at most 249 characters, got 250"),
    ],
)
def test_bad_destinations_are_refused_precisely(write, keys, message) -> None:
    assert message in refusal(write(function(**keys)))


def test_a_refused_destination_url_does_not_show_its_credentials(write) -> None:
    message = refusal(write(function(callback_url='"https://user:hunter2@hooks.example.com:99999/done?token=t0k3n"')))
    assert "functions.f.callback_url: not a valid URL: Port out of range 0-65535" in message, message
    assert "hunter2" not in message and "t0k3n" not in message, message


LABEL_64 = "a" * 64


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        # A backslash in the authority, which urllib.parse takes as part of the host or password.
        ({"callback_url": "'http://h\\x.com/'"},
         "functions.f.callback_url: not a valid URL: backslash ('\\') is not allowed in the authority component"),
        ({"on_failure": "{ url = 'http://alice:p\\w0rd@127.0.0.1:18201/ok' }"},
         "functions.f.on_failure.url: not a valid URL: backslash ('\\') is not allowed in the authority component"),
        # Characters IDNA would delete from a host name, so that it would name another host.
        ({"callback_url": '"http://ho\\uFEFFst.example.com/"'},
         "functions.f.callback_url: not a valid URL: Host 'ho\\ufeffst.example.com' cannot contain '\\ufeff'"),
        ({"callback_url": '"http://ho\\u200Bst.example.com/"'},
         "functions.f.callback_url: not a valid URL: Host 'ho\\u200bst.example.com' cannot contain '\\u200b'"),
        # A host name the lookup's IDNA refuses: every part between dots has 1 to 63 characters.
        ({"callback_url": f'"http://{LABEL_64}.example.com/"'},
         f"functions.f.callback_url: not a valid URL: host name '{LABEL_64}.example.com' cannot be looked up: "
         "label empty or too long"),
        ({"on_failure": '{ url = "http://hooks..example.com/" }'},
         "functions.f.on_failure.url: not a valid URL: host name 'hooks..example.com' cannot be looked up"),
        # An IPv4 address in a form aiohttp refuses (the system would read it as 127.0.0.1).
        ({"callback_url": '"http://127.1:8080/x"'},
         "functions.f.callback_url: not a valid URL: host '127.1' is not an IPv4 address as aiohttp takes one"),
        ({"callback_url": '"http://2130706433/x"'},
         "functions.f.callback_url: not a valid URL: host '2130706433' is not an IPv4 address as aiohttp takes one"),
        # A user and password Basic authentication cannot carry.
        ({"callback_url": '"http://al%3Aice:pw@hooks.example.com/x"'},
         "functions.f.callback_url: not a valid URL: its user name holds a ':' (written %3A)"),
        ({"callback_url": '"http://alice:\\u043f\\u0430\\u0440@hooks.example.com/x"'},
         "functions.f.callback_url: not a valid URL: its user name or password holds a character Basic authentication"),
    ],
    ids=["backslash-host", "backslash-password", "bom", "zero-width-space", "long-label", "empty-label",
         "short-ipv4", "number-ipv4", "colon-user", "cyrillic-password"],
)
def test_a_destination_url_aiohttp_could_not_send_to_is_refused_at_start(write, keys, message) -> None:
    # Before, each was taken, and every delivery to it failed for 24 hours.
    refused = refusal(write(function(**keys)))
    assert message in refused, refused
    assert len(refused.splitlines()) == 1 and "p\\w0rd" not in refused and "\u0430" not in refused, refused


@pytest.mark.parametrize(
    "url",
    [
        "https://alice:s\\uFF0Fcr3t@hooks.example.com/x?token=t0k3n",  # NFKC makes the password hold a '/'
        "https://alice:s3\\\\cr3t@hooks.example.com/x?token=t0k3n",
    ],
    ids=["nfkc", "backslash"],
)
def test_no_refusal_of_a_destination_url_shows_its_password_or_query(write, url) -> None:
    message = refusal(write(function(callback_url=f'"{url}"')))
    assert "functions.f.callback_url: not a valid URL: " in message, message
    assert "cr3t" not in message and "t0k3n" not in message, message


@pytest.mark.parametrize(
    "url",
    [
        "http://\\u00e4lice:pw@127.0.0.1:18201/ok",  # Latin-1: Basic authentication carries it
        "http://[::1]:8080/x",
        "http://hooks.example.com./x",  # a fully qualified name
        "http://b\\u00fccher.example/x?q=\\u00e4",  # an IDN host, sent as xn--
        "http://hooks.example.com/a\\\\b",  # a backslash in the path is percent-encoded
        f"http://{'a' * 63}.example.com/",
    ],
)
def test_a_destination_url_aiohttp_sends_to_is_taken(write, url) -> None:
    assert load_manifest(write(function(callback_url=f'"{url}"'))).functions["f"].callback_url


def test_the_longest_kafka_topic_and_every_legal_character_are_taken(write) -> None:
    for topic in ("t" * 249, "Failures.v2_eu-west"):
        manifest = load_manifest(write(function(on_failure=f'{{ kafka_topic = "{topic}" }}')))
        assert manifest.functions["f"].destinations == [("on_failure", f"kafka:{topic}")]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://u:pw@h/db", "expected a PostgreSQL URL"),
        ("postgresql://u:hunter2@h:notaport/db", "not a valid PostgreSQL URL: Port could not be cast to integer value as 'notaport'"),
        ("postgresql://u:hunter2@h:99999/db", "not a valid PostgreSQL URL: Port out of range 0-65535"),
        ("postgresql://u:hunter2@[::1/db", "not a valid PostgreSQL URL: Invalid IPv6 URL"),
        ("postgresql://u:hunter2\\uFF0F@h/db", "not a valid PostgreSQL URL: netloc '...@h' contains invalid characters"),
        ("postgresql://u:hunter2@h/db?sslmode=bogus", "sslmode 'bogus' in the URL: expected one of disable, allow"),
    ],
)
def test_a_store_url_the_driver_would_fail_on_is_refused_at_start(write, url, expected):
    # Before, these went through and `eventrun serve` died with the driver's traceback.
    message = refusal(write(f'[store]\nurl = "{url}"\n' + function()))
    assert "eventrun.toml: store.url: " in message, message
    assert expected in message and "hunter2" not in message, message


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        ("store", "url", "postgresql://u:pw@db.example:5433/eventrun?sslmode=verify-full"),
        ("kafka", "bootstrap_servers", "a:9092, b.example:9093,[::1]:9094,c"),  # as Kafka clients read them
    ],
    ids=["store-url-with-its-options", "brokers"],
)
def test_a_connection_its_client_could_open_is_taken_as_written(write, table, key, value):
    assert setting(write, table, key, f'"{value}"') == value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nretention = 1e13\n", "server.retention: a duration may be at most 36500d (100 years), got 10000000000000.0"),
        ('[server]\nretention = "3000000000d"\n', "server.retention: a duration may be at most 36500d (100 years), got '3000000000d'"),
        ("[server]\nretention = nan\n", "server.retention: expected a duration such as '90s' or '2h', got nan"),
        ("[server]\nkill_grace = inf\n", "server.kill_grace: a duration may be at most 36500d (100 years), got inf"),
    ],
    ids=["huge", "huge-days", "nan", "inf"],
)
def test_a_duration_that_is_no_time_is_refused(write, text, expected):
    assert expected in refusal(write(text + function()))


@pytest.mark.parametrize("retention", ['"0s"', '"0h"', "0", '"0"', "0.0"])
def test_a_zero_retention_in_any_unit_keeps_runs_for_ever(write, retention):
    assert setting(write, "server", "retention", retention) == 0.0


@pytest.mark.parametrize(
    ("trigger", "expected"),
    [
        ('{ type = "kafka", topic = "my topic!" }',
         "functions.f.triggers[0].topic: expected a Kafka topic name (letters, digits, '.', '_' and '-'; not '.' or '..'), got 'my topic!'"),
        ('{ type = "kafka", topic = "" }', "functions.f.triggers[0].topic: expected a Kafka topic name, got an empty string"),
        ('{ type = "s3", bucket = "" }', "functions.f.triggers[0].bucket: expected a bucket's name, got an empty string"),
        ('{ type = "s3", bucket = "b", events = [] }', "functions.f.triggers[0].events: expected at least one event name"),
        ('{ type = "timer", name = "n", cron = "* * * * *", payload = { x = [1, nan] } }',
         "functions.f.triggers[0].payload: nan and inf have no JSON form"),
        ('{ type = "kafka", topic = "t", prefix = "x" }',
         "functions.f.triggers[0].prefix: unknown key (a key of s3 triggers; this trigger's type is 'kafka')"),
        ('{ type = "s3", bucket = "b", cron = "* * * * *" }',
         "functions.f.triggers[0].cron: unknown key (a key of timer triggers; this trigger's type is 's3')"),
        ('{ type = "kafka", topic = "t", group = "g" }', "functions.f.triggers[0].group: unknown key (did you mean 'group_id'?)"),
    ],
    ids=["topic", "no-topic", "no-bucket", "no-events", "nan-payload", "s3-key", "timer-key", "typo"],
)
def test_a_trigger_that_could_never_work_is_refused_precisely(write, trigger, expected):
    message = refusal(write(function(triggers=f"[{trigger}]")))
    assert expected in message, message


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('[kafka]\nbootstrap_servers = "127.0.0.1:99999"\n',
         "kafka.bootstrap_servers: expected host:port, or several separated by commas, got '127.0.0.1:99999'"),
        ('[kafka]\nbootstrap_servers = ""\n', "kafka.bootstrap_servers: expected host:port, or several separated by commas, got ''"),
        ('[kafka]\nbootstrap_servers = "broker:kafka"\n', "kafka.bootstrap_servers: expected host:port"),
        ('[s3]\nsqs_queue_url = "q1"\n', "s3.sqs_queue_url: expected an http:// or https:// URL, got 'q1'"),
        ('[s3]\nendpoint_url = "127.0.0.1:9000"\n', "s3.endpoint_url: expected an http:// or https:// URL, got '127.0.0.1:9000'"),
        # Where clients (and the other nodes of a cluster) reach this server.
        ('[server]\nurl = "127.0.0.1:18822"\n', "server.url: expected an http:// or https:// URL, got '127.0.0.1:18822', with no scheme"),
    ],
    ids=["port", "empty", "not-a-port", "queue", "endpoint", "server-url"],
)
def test_a_connection_no_client_could_open_is_refused(write, table, expected):
    message = refusal(write(table + function()))
    assert expected in message, message


@pytest.mark.parametrize(
    ("host", "url"),
    [("127.0.0.1", "http://127.0.0.1:8080"), ("0.0.0.0", "http://127.0.0.1:8080"), ("::1", "http://[::1]:8080"),
     ("::", "http://127.0.0.1:8080"), ("fe80::1", "http://[fe80::1]:8080"), ("box.example", "http://box.example:8080")],
)
def test_clients_reach_the_server_at_its_host_as_a_url_holds_it(host: str, url: str) -> None:
    assert ServerConfig(host=host).base_url == url


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ('{ X = "a\\u0000b-secret" }', "functions.f.environment: variable X: its value holds a NUL character"),
        ('{ "A=B" = "c" }', "functions.f.environment: variable name 'A=B': expected a name without '=' or NUL characters"),
        ('{ "" = "c" }', "functions.f.environment: variable name '': expected a name without '=' or NUL characters"),
    ],
    ids=["nul-value", "equals-name", "empty-name"],
)
def test_an_environment_no_process_can_have_is_refused(write, environment, expected):
    message = refusal(write(function(environment=environment)))
    assert expected in message and "secret" not in message, message


def test_a_url_scheme_is_read_in_any_case(write):
    manifest = load_manifest(write('[s3]\nendpoint_url = "HTTP://MINIO:9000"\n' + function(callback_url='"HTTPS://hooks.example/x"')))
    assert manifest.s3.endpoint_url == "HTTP://MINIO:9000"


TOKEN_RULE = (
    "expected printable ASCII only (the characters ! to ~: no spaces, control or non-ASCII characters), "
    "as a token travels in an HTTP Authorization header"
)
UNSENDABLE_TOKENS = {
    # (the TOML string, the value the environment gives, what the refusal says of it)
    "latin-1": ('"p\\u00e4sswort-x"', "p\u00e4sswort-x", "holds a non-ASCII character"),
    "chinese": ('"\\u5bc6\\u7801"', "\u5bc6\u7801", "holds a non-ASCII character"),
    "trailing-space": ('"sesame "', "sesame ", "ends with whitespace"),
    "leading-tab": ('"\\tsesame"', "\tsesame", "begins with whitespace"),
    "inner-space": ('"ses ame"', "ses ame", "holds a space"),
    "escape": ('"ses\\u001bame"', "ses\x1bame", "holds a control character"),
    "delete": ('"ses\\u007fame"', "ses\x7fame", "holds a control character"),
    "blank": ('"   "', "   ", "holds only whitespace"),
}


@pytest.mark.parametrize(("toml", "value", "why"), UNSENDABLE_TOKENS.values(), ids=UNSENDABLE_TOKENS.keys())
def test_a_ui_token_no_client_could_send_is_refused(write, monkeypatch, toml, value, why):
    # (what is wrong with it, never the token: it is a secret)
    assert file_refusal(write, f"[server]\nui_token = {toml}\n" + function()) == f"server.ui_token: {TOKEN_RULE}; this one {why}"
    monkeypatch.setenv("EVENTRUN_SERVER__UI_TOKEN", value)
    message = refusal(write(function()))
    assert message == f"the environment: EVENTRUN_SERVER__UI_TOKEN: {TOKEN_RULE}; this one {why}"


@pytest.mark.parametrize("value", ["sesame ", "p\u00e4sswort", "ses ame"])
def test_an_s3_webhook_token_no_client_could_send_is_refused(write, monkeypatch, value):
    # MinIO sends it as `Authorization: Bearer <token>`, which the webhook strips: it must match as sent.
    monkeypatch.setenv("EVENTRUN_S3__WEBHOOK_TOKEN", value)
    assert refusal(write(function())).startswith(f"the environment: EVENTRUN_S3__WEBHOOK_TOKEN: {TOKEN_RULE}; this one ")
    monkeypatch.setenv("EVENTRUN_S3__WEBHOOK_TOKEN", "0123abcd-token")
    assert load_manifest(write(function())).s3.webhook_token == "0123abcd-token"


@pytest.mark.parametrize("token", ["", "s3cret-token", "!#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "Zm9vYmFy=="])
def test_a_ui_token_of_printable_ascii_loads(write, token):
    toml = token.replace("\\", "\\\\")
    assert setting(write, "server", "ui_token", f'"{toml}"') == token


# --- memory_limit's bounds ---------------------------------------------------------------------

MEMORY_LIMIT_TOO_LARGE = "a memory_limit may be at most 2^63 - 1 bytes (9223372036854775807, just under 8589934592GB)"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ('"8589934592GB"', "'8589934592GB'"),
        ("99999999999999999999", "99999999999999999999"),
        ("9223372036854775808", "9223372036854775808"),
        ('"9223372036854775808"', "'9223372036854775808'"),
    ],
    ids=["gigabytes", "huge-integer", "2^63", "2^63-as-text"],
)
def test_a_memory_limit_setrlimit_cannot_take_is_refused_at_start(write, value, shown):
    # Taken, every instance would die at its start (setrlimit raises OverflowError past a C long).
    path = write(f"[server]\nmemory_limit = {value}\n" + function("g", memory_limit=value))
    assert refusal(path).splitlines() == [
        f"{path}: server.memory_limit: {MEMORY_LIMIT_TOO_LARGE}, got {shown}",
        f"{path}: functions.g.memory_limit: {MEMORY_LIMIT_TOO_LARGE}, got {shown}",
    ]


@pytest.mark.parametrize(
    ("value", "size"),
    [("9223372036854775807", 2**63 - 1), ('"9223372036854775807"', 2**63 - 1), ('"8589934591GB"', 2**63 - 2**30)],
)
def test_the_largest_memory_limit_is_taken_to_the_byte(write, value, size):
    assert setting(write, "server", "memory_limit", value) == size


def test_a_memory_limit_from_the_environment_past_the_bound_names_the_variable(write, monkeypatch):
    monkeypatch.setenv("EVENTRUN_SERVER__MEMORY_LIMIT", "8589934592GB")
    assert refusal(write(function())) == (
        f"the environment: EVENTRUN_SERVER__MEMORY_LIMIT: {MEMORY_LIMIT_TOO_LARGE}, got '8589934592GB'"
    )


# --- every refusal shows the value refused ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (function(concurrency="0"), "functions.f.concurrency: Input should be greater than or equal to 1, got 0"),
        (function(concurrency="20000"), "functions.f.concurrency: Input should be less than or equal to 10000, got 20000"),
        (function(qps_limit="-3"), "functions.f.qps_limit: Input should be greater than or equal to 1, got -3"),
        ("[server]\nport = 70000\n" + function(), "server.port: Input should be less than or equal to 65535, got 70000"),
        ("[server]\nmax_instances = 0\n" + function(), "server.max_instances: Input should be greater than or equal to 1, got 0"),
        ("[store]\npool_size = 1\n" + function(), "store.pool_size: Input should be greater than or equal to 2, got 1"),
        ("[kafka]\nhigh_water_mark = 0\n" + function(), "kafka.high_water_mark: Input should be greater than or equal to 1, got 0"),
        (f'[cluster]\nnode_id = "{"n" * 129}"\n' + function(), f"cluster.node_id: String should have at most 128 characters, got '{'n' * 129}'"),
    ],
    ids=["concurrency-low", "concurrency-high", "qps", "port", "instances", "pool", "high-water", "node-id"],
)
def test_a_value_out_of_bounds_is_shown_with_the_bound(write, text, expected):
    assert file_refusal(write, text) == expected


def test_a_bound_refused_in_the_environment_shows_the_value_and_names_the_variable(write, monkeypatch):
    monkeypatch.setenv("EVENTRUN_FUNCTIONS__F__CONCURRENCY", "0")
    assert refusal(write(function())) == (
        "the environment: EVENTRUN_FUNCTIONS__F__CONCURRENCY: Input should be greater than or equal to 1, got '0'"
    )


# --- a function's keys from the environment ---------------------------------------------------


@pytest.mark.parametrize("variable", ["EVENTRUN_FUNCTIONS__HELLO__TIMEOUT", "EVENTRUN_FUNCTIONS__hello__TIMEOUT"])
def test_a_function_variable_sets_the_files_function_whatever_the_case(write, monkeypatch, variable):
    monkeypatch.setenv(variable, "5s")
    manifest = load_manifest(write(function("Hello")))
    assert list(manifest.functions) == ["Hello"]
    assert manifest.functions["Hello"].timeout == 5.0


def test_a_bad_function_variable_is_blamed_on_the_variable_whatever_the_case(write, monkeypatch):
    monkeypatch.setenv("EVENTRUN_FUNCTIONS__HELLO__TIMEOUT", "5x")
    path = write(function("Hello"))
    assert refusal(path) == (
        "the environment: EVENTRUN_FUNCTIONS__HELLO__TIMEOUT: expected a duration such as '90s', '15m' or '2h', got '5x'"
    )


def test_a_function_variable_that_cannot_say_which_function_is_refused(write, monkeypatch):
    monkeypatch.setenv("EVENTRUN_FUNCTIONS__HELLO__TIMEOUT", "5s")
    path = write(function("Hello") + function("HELLO"))
    assert refusal(path) == (
        f"the environment: EVENTRUN_FUNCTIONS__HELLO__TIMEOUT: {path} has functions 'HELLO' and 'Hello', and a "
        "variable's name is read without regard to case, so the variable cannot say which; set this key in the file instead"
    )


def test_variables_may_add_a_function_named_in_lower_case(write, monkeypatch):
    monkeypatch.setenv("EVENTRUN_FUNCTIONS__EXTRA__HANDLER", "handlers/ok.py:main_handler")
    monkeypatch.setenv("EVENTRUN_FUNCTIONS__EXTRA__CONCURRENCY", "2")
    manifest = load_manifest(write(function("Hello")))
    assert sorted(manifest.functions) == ["Hello", "extra"]
    assert manifest.functions["extra"].concurrency == 2


def test_a_function_the_variables_add_without_a_handler_is_blamed_on_them(write, monkeypatch):
    monkeypatch.setenv("EVENTRUN_FUNCTIONS__HELO__TIMEOUT", "5s")
    assert refusal(write(function("Hello"))) == (
        "the environment: functions.helo.handler: a required key, not set; "
        "set in the environment: EVENTRUN_FUNCTIONS__HELO__TIMEOUT"
    )


def test_what_the_values_lead_to_is_refused_all_at_once(write, tmp_path):
    # Each was refused alone: fixed, the next came up, one start after another.
    text = (
        kafka(security_protocol='"SSL"', ssl_cafile='"certs/ca.pem"')
        + function("a")
        + "[functions.b]\nhandler = \"handlers/missing.py:main_handler\"\n"
        + "[functions.c]\nhandler = \"handlers/gone.py:main_handler\"\n"
    )
    message = refusal(write(text))
    lines = message.splitlines()
    assert len(lines) == 3, message
    assert "functions.b.handler: file 'handlers/missing.py' not found" in lines[0], message
    assert "functions.c.handler: file 'handlers/gone.py' not found" in lines[1], message
    assert "kafka.ssl_cafile: file 'certs/ca.pem' not found" in lines[2], message
