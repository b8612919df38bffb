"""The benchmark scripts still run end to end (a few calls each); their figures are not judged here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def measured(output: str, name: str) -> tuple[float, int]:
    """The median and the error count of one measure's line in the figures table."""
    match = re.search(rf"^{name}\s+([0-9.]+)\s+[0-9.]+\s+[0-9.]+\s+(\d+)$", output, re.MULTILINE)
    assert match, f"no line for {name} in:\n{output}"
    return float(match.group(1)), int(match.group(2))


@pytest.mark.timeout(120)
def test_overhead_measures_every_baseline_in_one_run() -> None:
    output = run_bench("overhead.py", "--calls", "20", "--warmup", "5", "--pipe-trips", "200")
    for name in ("eventrun", "bare", "relay", "pipe"):
        median, errors = measured(output, name)
        assert median > 0 and errors == 0, (name, median, errors)
    assert re.search(r"^that overhead / pipe round trip: -?[0-9.]+x", output, re.MULTILINE), output
    assert re.search(r"^eventrun - relay: -?[0-9.]+ us a call", output, re.MULTILINE), output


@pytest.mark.timeout(120)
def test_ack_checks_what_it_acknowledged() -> None:
    output = run_bench("ack.py", "--seconds", "1", "--warmup", "0", "--concurrency", "4")
    assert re.search(r"check: last RequestId \S+ is recorded", output), output
    assert re.search(r"^eventrun / bare accepted/s: [0-9.]+$", output, re.MULTILINE), output


@pytest.mark.timeout(120)
def test_e2e_runs_its_rounds_and_checks_every_run() -> None:
    output = run_bench("e2e.py", "--only", "eventrun", "--jobs", "60", "--warmup", "10", "--rounds", "2")
    assert output.count("check: GET /counts has 70 FINISHED runs of noop") == 2, output
    rows = re.findall(r"^([12])\s+eventrun\s+60\s+[0-9.]+\s+([0-9.]+)\s", output, re.MULTILINE)
    assert [number for number, _ in rows] == ["1", "2"] and all(float(rate) > 0 for _, rate in rows), output
