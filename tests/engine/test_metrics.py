"""/metrics text: label values escaped, and the sources a composition root adds."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

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
