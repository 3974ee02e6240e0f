"""Shared by the peer modules; standard library only, since each peer runs in its own venv (not the project's).

Every peer module measures W6 (DESIGN.md section 10) the same way:

* a warm-up run, then ``--c1-runs`` runs one after another (concurrency 1): wall time per node execution there,
  minus the handler's own cost (a micro-benchmark of the plain step bodies, stamps included), is the per-node
  overhead;
* then ``--runs`` runs with at most ``--concurrency`` in flight: workflows/s, node executions/s, and hop latency
  (end of one step body to the start of the next, from ``perf_counter`` stamps taken inside the step bodies, as
  perf/w6_handlers.py does for aobd);
* peak RSS of the whole process tree (the benchmark process plus any server it starts, e.g. Prefect's
  ephemeral API server), sampled every 20 ms, and never less than this process's own ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

HOPS = (("s1", "s2"), ("s2", "s3"), ("s3", "b1"), ("s3", "b2"))
NODES = 6


class Stamps:
    """(run key, node id) -> (entered, left), perf_counter seconds; thread-safe enough (dict item assignment)."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], tuple[float, float]] = {}
        self.enabled = True

    def put(self, run: str, node: str, entered: float) -> None:
        if self.enabled:
            self.data[(run, node)] = (entered, time.perf_counter())

    def clear(self) -> None:
        self.data.clear()

    def hops_ms(self) -> list[float]:
        return hops_ms(dict(self.data))


def hops_ms(stamps: Mapping[tuple[str, str], tuple[float, float]]) -> list[float]:
    """Hop latencies in ms from (run, node) -> (entered, left) stamps: the end of one step body to the start of the
    next, and for the join, from the later of its two branches."""
    by_run: dict[str, dict[str, tuple[float, float]]] = {}
    for (run, node), stamp in stamps.items():
        by_run.setdefault(run, {})[node] = stamp
    hops: list[float] = []
    for nodes in by_run.values():
        for a, b in HOPS:
            if a in nodes and b in nodes:
                hops.append((nodes[b][0] - nodes[a][1]) * 1000.0)
        if {"b1", "b2", "j"} <= nodes.keys():
            hops.append((nodes["j"][0] - max(nodes["b1"][1], nodes["b2"][1])) * 1000.0)
    return hops


@dataclass
class Phases:
    """What the two measured phases gave: ``c1_*`` one run after another, the rest at most ``concurrency`` in
    flight; ``ok`` says which runs returned W6's 20."""

    c1_ok: list[bool]
    c1_seconds: float
    c1_hops: list[float]
    ok: list[bool] = field(default_factory=list)
    seconds: float = 0.0
    hops: list[float] = field(default_factory=list)


def measure_c1(one: Callable[[], bool], runs: int, stamps: Stamps) -> Phases:
    """The concurrency-1 phase (after the caller's warm-up); the stamps are cleared before and after."""
    stamps.clear()
    t0 = time.perf_counter()
    ok = [one() for _ in range(runs)]
    phases = Phases(c1_ok=ok, c1_seconds=time.perf_counter() - t0, c1_hops=stamps.hops_ms())
    stamps.clear()
    return phases


async def measure_async(one: Callable[[], Awaitable[bool]], args: argparse.Namespace, stamps: Stamps) -> Phases:
    """Both phases for a peer whose runs are coroutines: a warm-up, ``args.c1_runs`` in a row, then ``args.runs``
    with at most ``args.concurrency`` in flight on this loop."""
    assert await one(), "the warm-up run did not return 20"
    stamps.clear()
    t0 = time.perf_counter()
    c1_ok = [await one() for _ in range(args.c1_runs)]
    phases = Phases(c1_ok=c1_ok, c1_seconds=time.perf_counter() - t0, c1_hops=stamps.hops_ms())
    stamps.clear()
    gate = asyncio.Semaphore(args.concurrency)

    async def gated() -> bool:
        async with gate:
            return await one()

    t0 = time.perf_counter()
    phases.ok = list(await asyncio.gather(*(gated() for _ in range(args.runs))))
    phases.seconds = time.perf_counter() - t0
    phases.hops = stamps.hops_ms()
    return phases


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def handler_cost_us(bodies: Iterable[Callable[[], Any]], rounds: int = 20000) -> float:
    """Mean cost of one call of the W6 step bodies (the six nodes' bodies, called plainly), in microseconds."""
    calls = list(bodies)
    for call in calls:  # warm
        call()
    started = time.perf_counter()
    for _ in range(rounds):
        for call in calls:
            call()
    return (time.perf_counter() - started) / (rounds * len(calls)) * 1e6


def _tree_rss_kb(root: int) -> int:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as fh:
                pages = int(fh.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue
        pid = int(entry)
        children.setdefault(ppid, []).append(pid)
        rss[pid] = pages * (os.sysconf("SC_PAGE_SIZE") // 1024)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


class RssSampler:
    """Peak resident set of this process and its descendants."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        pid = os.getpid()
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _tree_rss_kb(pid))
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(max(self.peak_kb, own) / 1024.0, 1)


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    p.add_argument("--runs", type=int, default=100, help="runs in the concurrent phase")
    p.add_argument("--concurrency", type=int, default=200, help="runs in flight at once in the concurrent phase")
    p.add_argument("--c1-runs", type=int, default=20, help="runs one after another for the per-node overhead")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    return p


def result(
    *,
    peer: str,
    version: str,
    args: argparse.Namespace,
    phases: Phases,
    handler_us: float,
    peak_rss_mb: float,
    config: dict[str, Any],
) -> dict[str, Any]:
    """The same keys as ``python -m perf.w6 --json`` (plus the concurrency-1 phase and the peer's settings)."""
    runs, concurrency, c1_runs = args.runs, args.concurrency, args.c1_runs
    completed, seconds, hops = sum(phases.ok), phases.seconds, phases.hops
    c1_completed, c1_seconds, c1_hops = sum(phases.c1_ok), phases.c1_seconds, phases.c1_hops
    wall_per_node_us = c1_seconds / (NODES * c1_runs) * 1e6 if c1_runs else float("nan")

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return {
        "mode": "peer",
        "peer": peer,
        "version": version,
        "runs": runs,
        "concurrency": concurrency,
        "completed": completed,
        "seconds": round(seconds, 3),
        # completed, not started: a peer whose runs fail is not credited for them (aobd's runs all complete)
        "workflows_per_s": round(completed / seconds, 2),
        "node_executions_per_s": round(NODES * completed / seconds, 1),
        "hop_p50_ms": ms(percentile(hops, 0.50)),
        "hop_p99_ms": ms(percentile(hops, 0.99)),
        "peak_rss_mb": peak_rss_mb,
        "c1_runs": c1_runs,
        "c1_completed": c1_completed,
        "c1_seconds": round(c1_seconds, 3),
        "c1_wall_per_node_us": round(wall_per_node_us, 1),
        "handler_us": round(handler_us, 3),
        "per_node_overhead_us": round(wall_per_node_us - handler_us, 1),
        "c1_hop_p50_ms": ms(percentile(c1_hops, 0.50)),
        "config": config,
    }


def emit(res: dict[str, Any], as_json: bool) -> int:
    if not as_json:
        for key, value in res.items():
            print(f"{key:>22}  {value}", file=sys.stderr)
    print(json.dumps(res), flush=True)
    ok = res["completed"] == res["runs"] and res["c1_completed"] == res["c1_runs"]
    return 0 if ok else 1
