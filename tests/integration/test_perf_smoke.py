"""The benchmark harnesses stay runnable: tiny runs of each, checking they finish and print their figures.

Figures are never asserted (shared, noisy machines); only that every run completed and the keys exist.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from perf import spy_top
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
    # Where the time went: shares of the run's wall time, so never above one (the loop is one thread).
    assert 0 < result["loop_busy"] <= 1 and 0 < result["log_in_commit"] <= 1
    assert result["appends_per_commit"] >= 1


def test_longpoll_reports_the_latency_of_simultaneous_waiting_clients() -> None:
    result = harness("perf.longpoll", "--requests", "6", "--sleep-ms", "50", "--json")
    assert result["statuses"] == {"201": 6}
    assert 0 < result["latency_p50_s"] <= result["latency_p99_s"] <= result["latency_max_s"]


def test_floor_runs_beside_aobd_and_reports_the_ratio() -> None:
    result = harness("perf.floor", "--runs", "60", "--concurrency", "8", "--ceiling", "--json")
    assert result["floor"]["completed"] == 60 and result["aobd"]["completed"] == 60
    assert result["aobd"]["fidelity"] == "full" and result["aobd_fast"]["fidelity"] == "fast"
    assert result["aobd_fast"]["completed"] == 60
    assert result["aobd_to_floor"] > 0 and result["aobd_fast_to_floor"] > 0
    # The ceiling: the same two fidelities on the in-memory store, each beside the floor.
    assert [result[k]["store"] for k in ("aobd", "aobd_fast", "aobd_memory", "aobd_memory_fast")] == [
        "sqlite",
        "sqlite",
        "memory",
        "memory",
    ]
    assert result["aobd_memory_fast"]["fidelity"] == "fast" and result["aobd_memory"]["completed"] == 60
    assert result["aobd_memory_to_floor"] > 0 and result["aobd_memory_fast_to_floor"] > 0


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is missing (apt-get install valgrind)")
def test_instruction_count_counts_only_the_measured_runs() -> None:
    few, more = (harness("perf.instructions", "--runs", str(n), "--concurrency", "4") for n in (10, 30))
    assert few["runs"] == 10 and more["runs"] == 30
    assert few["engine"] in ("compiled", "source")  # says which form ran: a stale build runs the source
    # The warm-up and the imports are not counted: the count grows with the runs, and 20 more runs cost about 20
    # runs' worth (a run is the same work whichever run it is).
    added = (more["instructions"] - few["instructions"]) / 20
    assert few["instructions_per_run"] > 0 and 0.5 < added / few["instructions_per_run"] < 2
    assert few["loop_instructions_per_run"] == few["instructions_per_run"]  # the memory store has one thread


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is missing (apt-get install valgrind)")
def test_instruction_count_by_layer_adds_what_each_layer_costs() -> None:
    """The service layer is the engine plus the daemon's listeners, the api layer that plus the ASGI app."""
    counts = [
        harness("perf.instructions", "--runs", "20", "--concurrency", "4", "--layer", layer)["instructions_per_run"]
        for layer in ("engine", "service", "api")
    ]
    assert counts[0] < counts[1] < counts[2]


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is missing (apt-get install valgrind)")
def test_instruction_count_on_sqlite_splits_the_loop_from_the_writer() -> None:
    result = harness("perf.instructions", "--runs", "10", "--concurrency", "4", "--store", "sqlite")
    assert result["store"] == "sqlite"
    # The writer thread commits the runs' events: its instructions are counted in the total, not the loop's.
    assert 0 < result["loop_instructions_per_run"] < result["instructions_per_run"]


def test_engine_bench_prints_each_layer_per_fidelity() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "perf.bench_engine", "--runs", "20", "--repeats", "1", "--concurrency", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert rows.keys() == {"full", "fast"}
    for line in rows.values():
        assert "machine" in line and "machine + encode" in line and "engine, memory store" in line


def test_flat_cost_compares_a_small_and_a_filled_store() -> None:
    result = harness("perf.flat", "--fill", "400", "--batch", "40", "--repeats", "1", "--json")
    assert result["runs_stored_before_full_batches"] >= 400
    assert result["full_to_empty_time"] > 0


def test_peers_table_runs_with_aobd_alone() -> None:
    # Peers need their own venvs (PyPI): the harness's own plumbing is what this keeps from rotting.
    result = harness("perf.peers", "--only", "aobd", "--runs", "20", "--c1-runs", "3", "--concurrency", "4", "--json")
    assert [row["peer"] for row in result] == ["aobd"] and result[0]["completed"] == 20


@pytest.mark.parametrize(
    ("processes", "inline"), [("single", "auto"), ("multi-accept", "false"), ("multi-accept", "auto")]
)
def test_w6_over_http_reports_the_daemons_cpu_and_memory(processes: str, inline: str) -> None:
    extra = ["--inline", inline]
    result = harness(
        "perf.w6", "--mode", "http", "--processes", processes, *extra, "--runs", "30", "--concurrency", "4", "--json"
    )
    assert result["completed"] == 30
    assert result["inline_sync_handlers"] == inline
    assert result["cpu_ms_per_1000_nodes"] > 0 and result["peak_rss_mb"] > 0


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load is missing (apt-get install nghttp2-client)")
def test_w6_over_http2_reports_runs_hops_and_the_daemons_cpu() -> None:
    result = harness(
        "perf.w6", "--mode", "http2", "--processes", "multi-accept", "--runs", "40", "--concurrency", "2", "--json"
    )
    assert result["completed"] == 40 and result["orchestrators"] == "auto"
    assert result["hop_p50_ms"] is not None and result["hop_p99_ms"] >= result["hop_p50_ms"]
    assert result["cpu_ms_per_1000_nodes"] > 0 and result["peak_rss_mb"] > 0
    by_plane = result["cpu_ms_per_1000_nodes_by_plane"]
    assert {"orchestrator", "accept", "runner", "fanout", "supervisor"} <= by_plane.keys()
    assert by_plane["orchestrator"] > 0 and by_plane["accept"] > 0
    assert sum(by_plane.values()) == pytest.approx(result["cpu_ms_per_1000_nodes"], abs=0.5)


def test_spy_top_folds_lines_into_functions(tmp_path: Path) -> None:
    raw = tmp_path / "w6.spy"
    raw.write_text("main (a.py:1);step (b.py:10) 3\nmain (a.py:1);step (b.py:12) 2\nmain (a.py:2) 5\n")
    total, inclusive, own = spy_top.summarize(raw)
    assert total == 10
    assert inclusive["main (a.py)"] == 10 and inclusive["step (b.py)"] == 5
    assert own == {"step (b.py)": 5, "main (a.py)": 5}
