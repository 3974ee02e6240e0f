"""W6 on aobd and its peers (Prefect 3, DBOS Transact, LangGraph), durable, in one session: one table.

    python -m perf.peers [--runs N] [--concurrency C] [--c1-runs M] [--only prefect,dbos,langgraph,aobd] [--json]

Each peer is pip-installed (pinned, once) into its own venv under ``.peers/<name>/`` (perf/peers/install.py) and
runs W6 there as a subprocess (perf/peers/<peer>_w6.py), printing one JSON line with perf.w6's keys. aobd runs
``python -m perf.w6 --mode inprocess --json`` with the project's venv (embedded: SQLite, synchronous=FULL, local
CAS), once at ``--concurrency`` and once at concurrency 1 for the per-node overhead. Everything runs one after
another, never two at once. Without ``--runs``, each system gets a run count that keeps it to roughly a minute
or two on a 2-core machine (see RUNS); the runs used are in the table. See docs/peers.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from perf.peers import install

ROOT = Path(__file__).resolve().parents[2]
AOBD_PYTHON = ROOT / ".venv" / "bin" / "python"

#: name -> (venv, module, extra arguments)
PEERS: dict[str, tuple[str, str, list[str]]] = {
    "prefect": ("prefect", "perf.peers.prefect_w6", []),
    "prefect-no-heartbeat": ("prefect", "perf.peers.prefect_w6", ["--no-heartbeat"]),
    "dbos": ("dbos", "perf.peers.dbos_w6", ["--backend", "postgres"]),
    "dbos-sqlite": ("dbos", "perf.peers.dbos_w6", ["--backend", "sqlite"]),
    "langgraph": ("langgraph", "perf.peers.langgraph_w6", []),
    "langgraph-no-checkpointer": ("langgraph", "perf.peers.langgraph_w6", ["--no-checkpointer"]),
}
DEFAULT_ONLY = "aobd,aobd-cluster,langgraph,langgraph-no-checkpointer,dbos,dbos-sqlite,prefect,prefect-no-heartbeat"
#: name -> (runs at --concurrency, runs at concurrency 1); sized for about a minute or two each on 2 cores, and
#: aobd's for a few seconds at least: 2,000 runs took under a second and scattered by a third between sessions.
RUNS: dict[str, tuple[int, int]] = {
    "aobd": (10000, 300),
    "aobd-fast": (10000, 300),
    "aobd-cluster": (1000, 100),
    "langgraph": (3000, 200),
    "langgraph-no-checkpointer": (3000, 200),
    "dbos": (3000, 200),
    "dbos-sqlite": (2000, 200),
    "prefect": (75, 10),
    "prefect-no-heartbeat": (75, 10),
}
TIMEOUT_S = 900


def _log(message: str) -> None:
    print(f"[peers] {message}", file=sys.stderr, flush=True)


def _last_json(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise ValueError("no JSON line")


def _run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[dict[str, Any] | None, str]:
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {TIMEOUT_S} s"
    try:
        return _last_json(proc.stdout), proc.stderr
    except ValueError:
        return None, f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"


def aobd_handler_us() -> float:
    """The same micro-benchmark as the peers' (perf/peers/_common.py), on perf/w6_handlers.py."""
    code = (
        "import types; from perf import w6_handlers as h; from perf.peers._common import handler_cost_us\n"
        "c = types.SimpleNamespace(run_id='bench', node_id='n')\n"
        "print(handler_cost_us([lambda: h.inc({'x': 1}, c), lambda: h.inc({'x': 2}, c), lambda: h.inc({'x': 3}, c),"
        " lambda: h.double({'x': 4}, c), lambda: h.triple({'x': 4}, c), lambda: h.total({'a': 8, 'b': 12}, c)]))"
    )
    out = subprocess.run([str(AOBD_PYTHON), "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


#: aobd's entries: name -> (perf.w6 arguments, what it is)
AOBD_MODES: dict[str, tuple[list[str], str]] = {
    "aobd": (
        ["--mode", "inprocess"],
        "embedded (perf.w6 --mode inprocess): SQLite event log synchronous=FULL, local CAS; asyncio (uvloop), "
        "C engine.run coroutines on one loop",
    ),
    "aobd-fast": (
        ["--mode", "inprocess", "--fidelity", "fast"],
        "embedded as above, fast-path fidelity (DESIGN.md section 5): NodeScheduled and NodeStarted are not "
        "recorded; every completion is still durable before the next node starts",
    ),
    "aobd-cluster": (
        ["--mode", "cluster", "--daemons", "1"],
        "perf.w6 --mode cluster --daemons 1: one daemon on the Postgres event log, S3 CAS (moto), Kafka-protocol "
        "broker (Tansu); C HTTP clients, POST /v1/runs?wait=60; RSS not measured",
    ),
}


def _aobd_version(result: dict[str, Any]) -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:
        rev = ""
    details = " ".join(f"{k}={result[k]}" for k in ("mode", "impl", "store", "fidelity", "daemons") if k in result)
    return f"aobd @ {rev.strip() or '?'} (work tree), {details}"


def run_aobd(name: str, runs: int, c1_runs: int, concurrency: int) -> dict[str, Any]:
    mode_args, description = AOBD_MODES[name]
    base = [str(AOBD_PYTHON), "-m", "perf.w6", *mode_args, "--json"]
    main, err = _run([*base, "--runs", str(runs), "--concurrency", str(concurrency)])
    if main is None:
        return {"peer": name, "error": err}
    c1, err = _run([*base, "--runs", str(c1_runs), "--concurrency", "1"])
    if c1 is None:
        return {"peer": name, "error": err}
    handler_us = aobd_handler_us()
    wall_us = c1["seconds"] / (6 * c1_runs) * 1e6
    main.update(
        peer=name,
        version=_aobd_version(main),
        c1_runs=c1_runs,
        c1_completed=c1["completed"],
        c1_seconds=c1["seconds"],
        c1_wall_per_node_us=round(wall_us, 1),
        handler_us=round(handler_us, 3),
        per_node_overhead_us=round(wall_us - handler_us, 1),
        c1_hop_p50_ms=c1["hop_p50_ms"],
        config={"mode": description},
    )
    return main


def run_peer(name: str, runs: int, c1_runs: int, concurrency: int) -> dict[str, Any]:
    venv, module, extra = PEERS[name]
    python = install.ensure(venv)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [str(python), "-m", module, "--json", "--runs", str(runs), "--c1-runs", str(c1_runs)]
    result, err = _run([*cmd, "--concurrency", str(concurrency), *extra], env=env)
    if result is None:
        return {"peer": name, "error": err}
    failures = [line for line in err.splitlines() if "run failed" in line]
    if failures:
        result["failures_sample"] = failures[:3]
    return result


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:,.{digits}f}"
    return str(value)


def _ratio(num: float | None, den: float | None) -> str:
    if not num or not den:
        return "n/a"
    r = num / den
    return f"{r:,.0f}x" if r >= 100 else f"{r:,.1f}x"


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| system | runs (C) / runs at C=1 | completed | workflows/s | node exec/s | per-node overhead us (C=1) "
        "| hop p50 ms | hop p99 ms | peak RSS MB | aobd x wf/s | aobd x overhead |"
    )
    lines = [head, "|" + "---|" * 11]
    ref = next((r for r in results if r.get("peer") == "aobd" and "error" not in r), None)
    for r in results:
        if "error" in r:
            lines.append(f"| {r['peer']} | failed: {r['error'][:200]!r} |" + " |" * 9)
            continue
        is_ref = r is ref
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r["peer"]),
                    f"{r['runs']} ({min(r['runs'], r['concurrency'])}) / {r['c1_runs']}",
                    f"{r['completed']}/{r['runs']}, {r['c1_completed']}/{r['c1_runs']}",
                    _fmt(r["workflows_per_s"]),
                    _fmt(r["node_executions_per_s"]),
                    _fmt(r["per_node_overhead_us"]),
                    _fmt(r["hop_p50_ms"], 2),
                    _fmt(r["hop_p99_ms"], 2),
                    _fmt(r["peak_rss_mb"]),
                    "1 (ref)" if is_ref else _ratio(ref and ref["workflows_per_s"], r["workflows_per_s"]),
                    "1 (ref)" if is_ref else _ratio(r["per_node_overhead_us"], ref and ref["per_node_overhead_us"]),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def c1_table(results: list[dict[str, Any]]) -> str:
    """The concurrency-1 phase behind the per-node overhead column."""
    lines = [
        "| system | runs at C=1 | seconds | wall per node us | handler us | per-node overhead us | hop p50 ms at C=1 |",
        "|" + "---|" * 7,
    ]
    for r in results:
        if "error" in r:
            continue
        lines.append(
            f"| {r['peer']} | {r['c1_runs']} | {_fmt(r['c1_seconds'], 2)} | {_fmt(r['c1_wall_per_node_us'])} "
            f"| {_fmt(r['handler_us'], 2)} | {_fmt(r['per_node_overhead_us'])} | {_fmt(r['c1_hop_p50_ms'], 2)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, help="runs at --concurrency for every system (default: per system)")
    parser.add_argument("--c1-runs", type=int, help="runs at concurrency 1 for every system (default: per system)")
    parser.add_argument("--concurrency", type=int, default=200, help="runs in flight at once (default 200, as perf.w6)")
    known = ", ".join([*AOBD_MODES, *PEERS])
    parser.add_argument("--only", default=DEFAULT_ONLY, help=f"comma-separated; known: {known}")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON list instead")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in AOBD_MODES and n not in PEERS]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    for name in names:
        runs, c1_runs = RUNS[name]
        runs, c1_runs = args.runs or runs, args.c1_runs or c1_runs
        _log(f"{name}: {runs} runs at concurrency {args.concurrency}, {c1_runs} at concurrency 1")
        t0 = time.perf_counter()
        if name in AOBD_MODES:
            res = run_aobd(name, runs, c1_runs, args.concurrency)
        else:
            res = run_peer(name, runs, c1_runs, args.concurrency)
        res["harness_seconds"] = round(time.perf_counter() - t0, 1)
        _log(f"{name}: done in {res['harness_seconds']} s" + (f" ({res['error']})" if "error" in res else ""))
        results.append(res)
    total = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(results))
    else:
        print(table(results))
        print()
        print(c1_table(results))
        print()
        for r in results:
            if "error" not in r:
                print(f"- {r['peer']}: {r['version']}; {json.dumps(r['config'])}; {r['harness_seconds']} s")
                for line in r.get("failures_sample", []):
                    print(f"  - {line[:300]}")
        print(f"\ntotal {total} s")
    ok = all("error" not in r and r["completed"] == r["runs"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
