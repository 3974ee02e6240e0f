"""W6 (DESIGN.md section 10) through aobd: one JSON line of figures.

    python -m perf.w6 --mode inprocess --runs 2000 --concurrency 200 --json
        [--store sqlite|memory] [--fidelity full|fast]

``inprocess`` drives the engine in this process on the embedded stores (SQLite with synchronous=FULL and the
local CAS in a temporary data dir, unless ``--store memory``). Hop latency is the time from the end of one
node's handler to the start of the next one's (s1->s2, s2->s3, s3->b1, s3->b2, b1->j / b2->j, whichever
finished last), measured with perf_counter stamps taken inside the handlers. The ``http`` and ``cluster``
modes come with the daemon and scale-out issues.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from perf import w6_handlers

ROOT = Path(__file__).resolve().parents[1]
HOPS = (("s1", "s2"), ("s2", "s3"), ("s3", "b1"), ("s3", "b2"))


def w6_document() -> dict[str, Any]:
    doc = json.loads((ROOT / "examples" / "w6" / "workflow.json").read_text())
    doc = copy.deepcopy(doc)
    for node in doc["nodes"]:
        node["config"]["handler"] = node["config"]["handler"].replace("w6_handlers:", "perf.w6_handlers:")
    return doc


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_inprocess(runs: int, concurrency: int, store: str, fidelity: str, data_dir: Path) -> dict[str, Any]:
    from aobd import _fast
    from aobd.engine.driver import Engine

    if store == "memory":
        from aobd.store.memory import MemoryCas, MemoryEventLog

        log: Any = MemoryEventLog()
        cas: Any = MemoryCas()
    else:
        from aobd.store.local_cas import LocalCas
        from aobd.store.sqlite_log import SqliteEventLog

        log = SqliteEventLog(data_dir / "events.db")
        cas = LocalCas(data_dir / "cas")
    engine = Engine(log, cas, fidelity=fidelity)
    doc = w6_document()
    await engine.run(doc, {"x": 1})  # warm-up: imports, IR compile, first CAS writes
    w6_handlers.STAMPS.clear()
    gate = asyncio.Semaphore(concurrency)
    statuses: list[str] = []

    async def one() -> None:
        async with gate:
            summary = await engine.run(doc, {"x": 1})
            statuses.append(summary["status"] if summary["outputs"] == {"x": 20} else "wrong")

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(runs)))
    elapsed = time.perf_counter() - started
    await engine.close()
    await cas.close()
    await log.close()

    hops: list[float] = []
    by_run: dict[str, dict[str, tuple[float, float]]] = {}
    for (run_id, node_id), stamp in w6_handlers.STAMPS.items():
        by_run.setdefault(run_id, {})[node_id] = stamp
    for stamps in by_run.values():
        for a, b in HOPS:
            if a in stamps and b in stamps:
                hops.append((stamps[b][0] - stamps[a][1]) * 1000.0)
        if {"b1", "b2", "j"} <= stamps.keys():
            hops.append((stamps["j"][0] - max(stamps["b1"][1], stamps["b2"][1])) * 1000.0)
    return {
        "mode": "inprocess",
        "store": store,
        "fidelity": fidelity,
        "impl": _fast.__impl__,
        "runs": runs,
        "concurrency": concurrency,
        "completed": statuses.count("completed"),
        "seconds": round(elapsed, 3),
        "workflows_per_s": round(runs / elapsed, 1),
        "node_executions_per_s": round(6 * runs / elapsed, 1),
        "hop_p50_ms": round(percentile(hops, 0.50), 3),
        "hop_p99_ms": round(percentile(hops, 0.99), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.w6", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["inprocess", "http", "cluster"], default="inprocess")
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    parser.add_argument("--fidelity", choices=["full", "fast"], default="full")
    parser.add_argument("--data-dir", help="keep the stores here (default: a temporary directory)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if args.mode != "inprocess":
        print(f"--mode {args.mode} needs the daemon; not available yet", file=sys.stderr)
        return 2
    import uvloop

    with tempfile.TemporaryDirectory(prefix="aobd-w6-") as tmp:
        data_dir = Path(args.data_dir) if args.data_dir else Path(tmp)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(run_inprocess(args.runs, args.concurrency, args.store, args.fidelity, data_dir))
    if not args.json:
        for key, value in result.items():
            print(f"{key:>22}  {value}", file=sys.stderr)
    print(json.dumps(result))
    return 0 if result["completed"] == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
