"""/metrics text: label values escaped, families whole, and the sources a composition root adds."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from eventrun.app import build_triggers
from eventrun.destinations import Deliverer
from eventrun.engine.core import Engine
from eventrun.engine.manifest import load_manifest
from eventrun.engine.api import Status
from eventrun.engine.metrics import Metrics, family, labels


def test_label_values_are_escaped_as_the_text_format_wants():
    assert labels(function="f", group='we "quote"\\ and\nbreak') == '{function="f",group="we \\"quote\\"\\\\ and\\nbreak"}'


def test_a_family_opens_with_help_and_type():
    assert family("x_total", "counter", "Things.") == ["# HELP x_total Things.", "# TYPE x_total counter"]


async def test_added_sources_follow_the_engine_counters_and_a_failing_one_is_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "h.py").write_text("def main_handler(event, context):\n    return None\n")
    (tmp_path / "eventrun.toml").write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\n\n[functions.f]\nhandler = "h.py:main_handler"\n'
    )
    engine = Engine(load_manifest(tmp_path / "eventrun.toml"))

    def broken() -> str:
        raise RuntimeError("no figures")

    engine.add_metrics(lambda: "a_total 1\n")
    engine.add_metrics(broken)
    engine.add_metrics(lambda: "b_total 2\n")
    with caplog.at_level(logging.ERROR):
        text = engine.metrics_text()
    lines = text.splitlines()
    assert 'eventrun_accepted_total{function="f"} 0' in lines
    assert lines[-2:] == ["a_total 1", "b_total 2"]
    assert "a metrics source failed" in caplog.text


def test_run_durations_fill_cumulative_buckets() -> None:
    metrics = Metrics()
    for seconds in (0.005, 0.01, 0.3, 7200.0, 100000.0):  # on a bound counts in that bucket
        metrics.observe_end("f", Status.FINISHED, seconds)
    metrics.observe_end("f", Status.ABORTED, None)  # ended before it ran: counted, no duration
    lines = metrics.render(["f"], lambda f: (0, 0)).splitlines()
    buckets = {
        line.split('le="')[1].split('"')[0]: int(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("eventrun_run_duration_seconds_bucket")
    }
    assert buckets == {
        "0.01": 2, "0.05": 2, "0.1": 2, "0.5": 3, "1": 3, "5": 3, "10": 3, "60": 3, "300": 3,
        "1800": 3, "3600": 3, "21600": 4, "86400": 4, "+Inf": 5,
    }
    assert 'eventrun_run_duration_seconds_count{function="f"} 5' in lines
    assert 'eventrun_run_duration_seconds_sum{function="f"} 107200.315000' in lines
    assert 'eventrun_runs_total{function="f",status="ABORTED"} 1' in lines


# A sample's name for each kind of family: the family's own, or the family's with a suffix.
_SUFFIXES = {
    "counter": ("", "_total"),
    "gauge": ("",),
    "untyped": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}
_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? (\S+)')


def check_exposition(text: str) -> None:
    """Fail unless `text` is Prometheus text exposition with every family in one piece.

    Each family's TYPE line comes once in the whole text (right after its HELP line, if any);
    every sample belongs to the family of the TYPE line before it; no series comes twice.
    """
    assert text.endswith("\n"), "the text ends with a line feed"
    typed: set[str] = set()
    series: set[str] = set()
    name, kind, helped = "", "", ""
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {number}: {line!r}"
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in typed, f"{where}: the family {name} was opened before"
            assert helped in ("", name), f"{where}: the HELP line before is of {helped}"
            assert kind in _SUFFIXES, where
            typed.add(name)
            helped = ""
            continue
        assert not helped, f"{where}: the HELP line of {helped} is not followed by its TYPE line"
        if line.startswith("# HELP "):
            helped = line.split(" ", 3)[2]
            assert helped not in typed, f"{where}: the family {helped} was opened before"
            continue
        sample = _SAMPLE.fullmatch(line)
        assert sample, f"{where}: not a sample"
        assert name, f"{where}: a sample before any TYPE line"
        assert sample[1] in {name + suffix for suffix in _SUFFIXES[kind]}, f"{where}: not of the family {name}"
        float(sample[3])
        key = sample[1] + (sample[2] or "")
        assert key not in series, f"{where}: the series came before"
        series.add(key)
    assert not helped, f"the HELP line of {helped} is not followed by its TYPE line"


@pytest.mark.parametrize(
    "text",
    [
        "# HELP a A.\n# TYPE a gauge\n# HELP b B.\n# TYPE b gauge\na 1\nb 1\n",  # samples after the wrong TYPE
        "# HELP a A.\n# TYPE a gauge\na{f=\"x\"} 1\n# HELP a A.\n# TYPE a gauge\na{f=\"y\"} 1\n",  # opened twice
        "a 1\n# HELP a A.\n# TYPE a gauge\n",  # a sample before its TYPE
        "# HELP a A.\n# TYPE a gauge\na_total 1\n",  # a suffix its kind has not
        "# HELP a A.\n# TYPE a gauge\na 1\na 2\n",  # one series twice
        "# HELP a A.\n# TYPE a gauge\n# HELP b B.\na 1\n# TYPE b gauge\nb 1\n",  # a HELP line astray
    ],
)
def test_the_check_refuses_text_that_breaks_the_format(text: str) -> None:
    with pytest.raises(AssertionError):
        check_exposition(text)


def test_every_family_is_whole_with_several_functions_and_every_status() -> None:
    metrics = Metrics()
    names = ["b", "a", "c-1"]
    for n, function in enumerate(names, 1):
        metrics.accepted[function] += n
        metrics.duplicates[function] += n
        metrics.throttled[function] += n
        for status in Status:
            if status.ended:
                metrics.observe_end(function, status, 0.2 * n)
        metrics.observe_end(function, Status.ABORTED, None)
    gauges = {"a": (1, 2), "b": (3, 4), "c-1": (5, 6)}
    text = metrics.render(names, gauges.__getitem__)
    check_exposition(text)
    lines = text.splitlines()
    assert [line for line in lines if line.startswith(("eventrun_queued", "eventrun_running"))] == [
        'eventrun_queued{function="a"} 1', 'eventrun_queued{function="b"} 3', 'eventrun_queued{function="c-1"} 5',
        'eventrun_running{function="a"} 2', 'eventrun_running{function="b"} 4', 'eventrun_running{function="c-1"} 6',
    ]  # fmt: skip
    assert sum(line.startswith("eventrun_runs_total") for line in lines) == 3 * 4


async def test_the_whole_metrics_text_keeps_every_family_whole(tmp_path: Path) -> None:
    # Every source /metrics joins: the engine's counters, a node's cluster figures (a shared
    # store, not connected to), the deliveries, and each kind of trigger.
    (tmp_path / "h.py").write_text("def main_handler(event, context):\n    return None\n")
    (tmp_path / "eventrun.toml").write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\n\n'
        '[store]\nurl = "postgresql://u:p@127.0.0.1:1/db"\n\n'
        '[kafka]\nbootstrap_servers = "127.0.0.1:9092"\n\n'
        '[functions.a]\nhandler = "h.py:main_handler"\n'
        '[[functions.a.triggers]]\ntype = "kafka"\ntopic = "orders"\ngroup_id = "g"\n'
        '[[functions.a.triggers]]\ntype = "kafka"\ntopic = "refunds"\ngroup_id = "g"\n\n'
        '[functions.b]\nhandler = "h.py:main_handler"\n'
        '[[functions.b.triggers]]\ntype = "s3"\nbucket = "uploads"\n\n'
        '[functions.c]\nhandler = "h.py:main_handler"\n'
        '[[functions.c.triggers]]\ntype = "timer"\nname = "morning"\ncron = "0 8 * * *"\n'
        '[[functions.c.triggers]]\ntype = "timer"\nname = "evening"\ncron = "0 20 * * *"\n'
    )
    manifest = load_manifest(tmp_path / "eventrun.toml")
    engine = Engine(manifest)
    engine.metrics.observe_end("a", Status.FINISHED, 1.0)
    engine.add_metrics(Deliverer(engine, manifest).metrics)
    triggers = build_triggers(engine, manifest).triggers
    assert set(triggers) == {"kafka", "s3", "timer"}
    for trigger in triggers.values():
        engine.add_metrics(trigger.metrics)
    text = engine.metrics_text()
    check_exposition(text)
    for name in ("eventrun_queued", "eventrun_cluster_backlog", "eventrun_outbox_pending", "eventrun_s3_records_total",
                 "eventrun_kafka_partitions", "eventrun_timer_fired_total"):  # fmt: skip
        assert f"# TYPE {name} " in text, name
