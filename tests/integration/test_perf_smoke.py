"""The benchmark harnesses stay runnable: tiny runs of each, checking they finish and print their figures.

Figures are never asserted (shared, noisy machines); only that every run completed and the keys exist.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.integration.daemon import ROOT

pytestmark = pytest.mark.integration


def harness(*args: str) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_w6_inprocess_prints_every_figure() -> None:
    result = harness("perf.w6", "--mode", "inprocess", "--runs", "40", "--concurrency", "8", "--json")
    assert result["completed"] == 40
    for key in ("workflows_per_s", "node_executions_per_s", "hop_p50_ms", "hop_p99_ms", "peak_rss_mb"):
        assert result[key] > 0, key
    assert result["cpu_ms_per_1000_nodes"] > 0


def test_floor_runs_beside_aobd_and_reports_the_ratio() -> None:
    result = harness("perf.floor", "--runs", "60", "--concurrency", "8", "--json")
    assert result["floor"]["completed"] == 60 and result["aobd"]["completed"] == 60
    assert result["aobd_to_floor"] > 0


def test_flat_cost_compares_a_small_and_a_filled_store() -> None:
    result = harness("perf.flat", "--fill", "400", "--batch", "40", "--repeats", "1", "--json")
    assert result["runs_stored_before_full_batches"] >= 400
    assert result["full_to_empty_time"] > 0


def test_peers_table_runs_with_aobd_alone() -> None:
    # Peers need their own venvs (PyPI): the harness's own plumbing is what this keeps from rotting.
    result = harness("perf.peers", "--only", "aobd", "--runs", "20", "--c1-runs", "3", "--concurrency", "4", "--json")
    assert [row["peer"] for row in result] == ["aobd"] and result[0]["completed"] == 20


@pytest.mark.parametrize("processes", ["single", "multi-accept"])
def test_w6_over_http_reports_the_daemons_cpu_and_memory(processes: str) -> None:
    result = harness(
        "perf.w6", "--mode", "http", "--processes", processes, "--runs", "30", "--concurrency", "4", "--json"
    )
    assert result["completed"] == 30
    assert result["cpu_ms_per_1000_nodes"] > 0 and result["peak_rss_mb"] > 0
