"""/metrics text: label values escaped, and the sources a composition root adds."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from eventrun.engine.core import Engine
from eventrun.engine.manifest import load_manifest
from eventrun.engine.metrics import family, labels


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
