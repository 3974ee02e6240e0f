"""Routing decisions per second: the pure-Python reference against the Cython twin, in one run.

Run with ``python -m perf.bench_routing`` after ``make build``. Two graphs:

* ``W6``: ``s1 -> s2 -> s3 -> (b1 || b2) -> j``, a full run (``start()`` and 6 ``complete()`` calls) repeated;
* ``dag200``: a 200-node layered random DAG (fixed seed) in which 15% of the edges are not taken, so that
  dead-path elimination runs too.

Each run replays a schedule recorded once with the reference (the node and ``taken`` of every ``complete()``),
so the timed loop holds nothing but router calls. A decision is one ``complete()`` call. Columns:

* ``dropped``: the caller drops each result before the next call (an event handler that returns);
* ``kept``: the caller unpacks each result into locals that are still alive at the next call (a tight loop),
  which defeats the compiled twin's reuse of its result lists;
* ``runs/s +build``: full runs including the ``Router`` constructor; the other columns build routers untimed.

Figures are medians over ``--repeats``; the footer gives the cost of the loop itself.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from aobd._fast import _py_routing

Graph = tuple[list[int], list[int], list[int]]
Schedule = list[tuple[int, list[bool]]]
CHUNK = 200  # routers built (untimed) per timed batch: enough to amortize the clock, few enough to stay cached


def csr(n: int, edges: Sequence[tuple[int, int]]) -> Graph:
    """CSR arrays (out_offsets, out_targets, indegree) for ``edges``, kept in their order per source."""
    by_source: list[list[int]] = [[] for _ in range(n)]
    indegree = [0] * n
    for s, t in edges:
        by_source[s].append(t)
        indegree[t] += 1
    offsets = [0]
    targets: list[int] = []
    for outs in by_source:
        targets.extend(outs)
        offsets.append(len(targets))
    return offsets, targets, indegree


def w6() -> tuple[Graph, list[list[bool]]]:
    # s1=0 s2=1 s3=2 b1=3 b2=4 j=5; every edge taken, as in the W6 workload.
    graph = csr(6, [(0, 1), (1, 2), (2, 3), (2, 4), (3, 5), (4, 5)])
    return graph, [[True] * (graph[0][i + 1] - graph[0][i]) for i in range(6)]


def layered_dag(
    n: int = 200, width: int = 10, fan_out: int = 3, p_taken: float = 0.85, seed: int = 6
) -> tuple[Graph, list[list[bool]]]:
    rng = random.Random(seed)
    edges = []
    for i in range(n - width):
        layer_end = (i // width + 1) * width
        for t in rng.sample(range(layer_end, min(layer_end + width, n)), fan_out):
            edges.append((i, t))
    graph = csr(n, edges)
    offsets = graph[0]
    taken = [[rng.random() < p_taken for _ in range(offsets[i + 1] - offsets[i])] for i in range(n)]
    return graph, taken


def record_schedule(graph: Graph, taken: list[list[bool]]) -> Schedule:
    """The complete() calls of one run, lowest ready node first (deterministic)."""
    router = _py_routing.Router(*graph)
    ready = router.start()
    schedule: Schedule = []
    while ready:
        node = ready.pop(0)
        schedule.append((node, taken[node]))
        newly, _ = router.complete(node, taken[node])
        ready = sorted(ready + newly)
    assert router.done(), "the schedule did not finish the run"
    return schedule


def run_dropped(routers: list[Any], schedule: Schedule) -> float:
    t0 = time.perf_counter()
    for router in routers:
        router.start()
        complete = router.complete
        for node, taken in schedule:
            complete(node, taken)
    return time.perf_counter() - t0


def run_kept(routers: list[Any], schedule: Schedule) -> float:
    t0 = time.perf_counter()
    for router in routers:
        router.start()
        complete = router.complete
        for node, taken in schedule:
            _ready, _skipped = complete(node, taken)  # alive until the next call returns
    return time.perf_counter() - t0


def run_noop(routers: list[Any], schedule: Schedule) -> float:
    # The same loop around a C method that does next to nothing: the floor under every figure.
    t0 = time.perf_counter()
    for router in routers:
        router.done()
        status = router.status
        for node, _taken in schedule:
            status(node)
    return time.perf_counter() - t0


def run_built(mod: ModuleType, graph: Graph, schedule: Schedule, runs: int) -> float:
    router_cls: Any = mod.Router
    t0 = time.perf_counter()
    for _ in range(runs):
        router = router_cls(*graph)
        router.start()
        complete = router.complete
        for node, taken in schedule:
            complete(node, taken)
    return time.perf_counter() - t0


def timed(mod: ModuleType, graph: Graph, schedule: Schedule, runs: int, loop: Any) -> float:
    """Seconds that ``loop`` spends on ``runs`` full runs, routers built untimed in chunks."""
    total = 0.0
    for first in range(0, runs, CHUNK):
        routers = [mod.Router(*graph) for _ in range(min(CHUNK, runs - first))]
        total += loop(routers, schedule)
    return total


def median(repeats: int, fn: Any, *args: Any) -> float:
    fn(*args)  # warm-up
    return statistics.median(fn(*args) for _ in range(repeats))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per figure (median reported)")
    parser.add_argument("--budget", type=float, default=0.2, help="seconds per repeat, roughly")
    args = parser.parse_args(argv)

    impls: list[tuple[str, ModuleType]] = [("python", _py_routing)]
    try:
        from aobd._fast import routing as c_routing
    except ImportError:
        print("note: aobd._fast.routing is not built (make build): pure Python only", file=sys.stderr)
    else:
        impls.append(("cython", c_routing))

    print(f"complete() calls/s, median of {args.repeats}")
    header = f"{'graph':<8} {'impl':<7} {'dropped':>13} {'kept':>13} {'runs/s +build':>14}"
    print(header)
    print("-" * len(header))
    floors = []
    for name, (graph, taken) in (("W6", w6()), ("dag200", layered_dag())):
        schedule = record_schedule(graph, taken)
        calls = len(schedule)
        rates: dict[str, tuple[float, float, float]] = {}
        for impl, mod in impls:
            probe = timed(mod, graph, schedule, 50, run_dropped) / 50
            runs = max(CHUNK, int(args.budget / probe))
            n_calls = runs * calls
            dropped = n_calls / median(args.repeats, timed, mod, graph, schedule, runs, run_dropped)
            kept = n_calls / median(args.repeats, timed, mod, graph, schedule, runs, run_kept)
            built = runs / median(args.repeats, run_built, mod, graph, schedule, runs)
            rates[impl] = (dropped, kept, built)
            print(f"{name:<8} {impl:<7} {dropped:>13,.0f} {kept:>13,.0f} {built:>14,.0f}")
            if impl == "cython":
                noop = median(args.repeats, timed, mod, graph, schedule, runs, run_noop)
                floors.append(f"{name} {noop / n_calls * 1e9:.0f} ns")
        if len(rates) == 2:
            ratios = [c / p for c, p in zip(rates["cython"], rates["python"], strict=True)]
            print(f"{name:<8} {'ratio':<7} {ratios[0]:>12.1f}x {ratios[1]:>12.1f}x {ratios[2]:>13.1f}x")
    if floors:
        print(f"loop floor (same loop around a no-op C method call): {', '.join(floors)} per call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
