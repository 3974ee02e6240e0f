"""IR compile cost: ``python -m perf.bench_ir``.

Compiles W6 and a 200-node layered workflow from scratch (validation + IR), beside the two baselines that
bound it in the same run: validation alone, and an IR cache hit (what every run after the first of a version
pays). Medians of several repeats, microseconds per compile.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from aobd.model.canonical import version_of
from aobd.model.expr import compile_expr
from aobd.model.ir import IRCache, compile_ir
from aobd.model.validate import load_workflow, validate_document
from perf.w6 import w6_document


def layered(n: int = 200, width: int = 10) -> dict[str, Any]:
    nodes = [
        {
            "id": f"n{i}",
            "type": "function",
            "config": {"handler": "builtin:echo"},
            "in": {"x": f"nodes.n{max(0, i - width)}.output.x"},
        }
        for i in range(n)
    ]
    edges = [{"from": f"n{i}", "to": f"n{i + width}"} for i in range(n - width)]
    edges += [
        {"from": f"n{i}", "to": f"n{i + width + 1}", "when": f"nodes.n{i}.output.x > `0`"}
        for i in range(n - width - 1)
        if i % width != width - 1
    ]
    return {"name": "layered", "nodes": nodes, "edges": edges}


def per_call_us(fn: Callable[[], Any], repeats: int = 7, min_time: float = 0.2) -> float:
    samples = []
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_time:
            fn()
            count += 1
        samples.append((time.perf_counter() - start) / count * 1e6)
    return statistics.median(samples)


def main() -> None:
    print(f"{'workflow':<10} {'validate':>12} {'validate+IR':>13} {'cache hit':>11}  (median us per call)")
    for name, doc in (("w6", w6_document()), ("layered200", layered())):
        validate, compile_cold, hit = measure(doc)
        print(f"{name:<10} {validate:>12.1f} {compile_cold:>13.1f} {hit:>11.2f}  cold/hit = {compile_cold / hit:,.0f}x")


def measure(doc: dict[str, Any]) -> tuple[float, float, float]:
    version = version_of(doc)

    def full() -> None:
        compile_expr.cache_clear()  # a cold compile: expressions too
        compile_ir(load_workflow(doc), version)

    cache = IRCache()
    cache.get(version, lambda: load_workflow(doc))
    validate = per_call_us(lambda: validate_document(doc))
    compile_cold = per_call_us(full)
    hit = per_call_us(lambda: cache.get(version, lambda: load_workflow(doc)))
    return validate, compile_cold, hit


if __name__ == "__main__":
    main()
