"""JSON Patch applications per second: the pure-Python reference against the Cython twin, in one run.

Run with ``python -m perf.bench_patch`` (build the extension first: ``make build``). The workload is the patch
an agent typically proposes to a running workflow: on a 20-node document (nodes with config, ``in``
bindings and retry policies, 24 edges, defaults, policy, metadata), ``test`` that the node it extends is
still there, ``add`` two nodes and two edges with ``-`` (append), and ``replace`` a prompt in an existing
node's config: six operations, every one of the RFC 6902 paths the engine takes on a real patch.

Each figure is the median over several repeats of a timed loop sized to ``--budget`` seconds; one
application is a full ``apply_patch`` call (parse, validate, copy on write, apply), and ops/s counts the
operations inside those calls. The patched result is checked once, against the reference, before timing.
Repeats alternate between the implementations; ``spread`` is (max - min) / median of a row's repeats, and
a spread above ~10% means the machine was busy: rerun before quoting the figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from aobd._fast import _py_jsonpatch


def workflow_document(n_nodes: int = 20) -> dict[str, Any]:
    """A workflow document shaped like ``aobd.model.workflow.Workflow``: a fan-out/fan-in chain of stages."""
    kinds = ("function", "http", "agent", "function", "join")
    nodes: list[dict[str, Any]] = []
    for i in range(n_nodes):
        kind = kinds[i % len(kinds)]
        node: dict[str, Any] = {
            "id": f"step_{i}",
            "type": kind,
            "in": {"data": f"nodes.step_{max(i - 1, 0)}.output"},
        }
        if kind == "function":
            node["config"] = {"handler": f"examples.handlers:stage_{i}", "ms": 5 * i}
        elif kind == "http":
            node["config"] = {
                "url": f"https://api.example.com/v1/items/{i}",
                "method": "POST",
                "headers": {"content-type": "application/json", "x-request-id": f"req-{i}"},
                "body": {"page": i, "size": 50, "filters": ["active", "recent"]},
            }
            node["retry"] = {"max_attempts": 5, "initial_ms": 200, "max_ms": 5000, "multiplier": 2.0}
        elif kind == "agent":
            node["config"] = {
                "provider": "openai",
                "model": "small-model",
                "prompt": f"Summarise the output of step {i - 1} in three bullet points.",
                "temperature": 0.2,
                "max_tokens": 512,
            }
            node["timeout_ms"] = 60_000
        else:
            node["config"] = {}
        node["description"] = f"stage {i} of the pipeline"
        nodes.append(node)
    edges = [{"from": f"step_{i}", "to": f"step_{i + 1}"} for i in range(n_nodes - 1)]
    edges += [
        {"from": f"step_{i}", "to": f"step_{i + 3}", "when": f"nodes.step_{i}.output.ok"}
        for i in range(0, n_nodes - 3, 4)
    ]
    return {
        "name": "ingest-and-summarise",
        "description": "Fetch, enrich and summarise items; agents may extend the graph.",
        "nodes": nodes,
        "edges": edges,
        "outputs": {"summary": f"nodes.step_{n_nodes - 1}.output"},
        "defaults": {"retry": {"max_attempts": 3, "initial_ms": 100, "max_ms": 10_000}, "timeout_ms": 30_000},
        "policy": {"patches": "auto", "max_spawned_nodes": 20, "max_patches": 10, "max_agent_depth": 2},
        "metadata": {"owner": "data-team", "labels": ["nightly", "summaries"]},
    }


def agent_patch() -> list[dict[str, Any]]:
    """What an agent at step_12 proposes: check its anchor, add a verify/notify branch, sharpen a prompt."""
    return [
        {"op": "test", "path": "/nodes/12/id", "value": "step_12"},
        {
            "op": "add",
            "path": "/nodes/-",
            "value": {
                "id": "verify_12",
                "type": "agent",
                "config": {
                    "provider": "openai",
                    "model": "small-model",
                    "prompt": "Check the summary for errors.",
                },
                "in": {"summary": "nodes.step_12.output"},
                "timeout_ms": 30_000,
            },
        },
        {
            "op": "add",
            "path": "/nodes/-",
            "value": {
                "id": "notify_12",
                "type": "http",
                "config": {
                    "url": "https://hooks.example.com/notify",
                    "method": "POST",
                    "body": {"channel": "ops"},
                },
                "in": {"text": "nodes.verify_12.output"},
            },
        },
        {"op": "add", "path": "/edges/-", "value": {"from": "step_12", "to": "verify_12"}},
        {
            "op": "add",
            "path": "/edges/-",
            "value": {"from": "verify_12", "to": "notify_12", "when": "output.ok"},
        },
        {"op": "replace", "path": "/nodes/17/config/prompt", "value": "Summarise in two bullet points."},
    ]


def time_applications(mod: ModuleType, doc: Any, patch: Sequence[Any], n: int) -> float:
    """Seconds for ``n`` applications of ``patch`` to ``doc``."""
    apply_patch: Callable[[Any, Any], Any] = mod.apply_patch
    t0 = time.perf_counter()
    for _ in range(n):
        apply_patch(doc, patch)
    return time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per figure (median reported)")
    parser.add_argument("--budget", type=float, default=0.25, help="target seconds per repeat (Python side)")
    parser.add_argument("--nodes", type=int, default=20, help="nodes in the workflow document")
    args = parser.parse_args(argv)

    impls: list[tuple[str, ModuleType]] = [("python", _py_jsonpatch)]
    try:
        from aobd._fast import jsonpatch as c_jsonpatch
    except ImportError:
        print("note: aobd._fast.jsonpatch is not built (make build); pure Python only", file=sys.stderr)
    else:
        impls.append(("cython", c_jsonpatch))

    doc = workflow_document(args.nodes)
    patch = agent_patch()
    expected = _py_jsonpatch.apply_patch(doc, patch)
    for name, mod in impls:
        if mod.apply_patch(doc, patch) != expected:
            print(f"error: {name} gives a different result than the reference", file=sys.stderr)
            return 1

    # Size the loop once, on the reference, so every implementation does the same number of calls.
    calls = 100
    while time_applications(_py_jsonpatch, doc, patch, calls) < args.budget / 4:
        calls *= 2
    calls *= 4

    for _, mod in impls:
        time_applications(mod, doc, patch, calls)  # warm-up
    # Repeats alternate between implementations so that a burst of load on the machine hits both alike.
    samples: dict[str, list[float]] = {name: [] for name, _ in impls}
    for _ in range(args.repeats):
        for name, mod in impls:
            samples[name].append(calls / time_applications(mod, doc, patch, calls))
    rates = {name: statistics.median(rs) for name, rs in samples.items()}

    print(f"apply_patch: {len(patch)} ops on a {args.nodes}-node workflow document")
    print(f"median of {args.repeats} repeats x {calls} applications\n")
    print(f"{'impl':<8} {'patches/s':>12} {'ops/s':>12} {'us/patch':>10} {'spread':>8}")
    for name, rate in rates.items():
        spread = (max(samples[name]) - min(samples[name])) / rate
        print(f"{name:<8} {rate:>12,.0f} {rate * len(patch):>12,.0f} {1e6 / rate:>10.2f} {spread:>8.0%}")
    if "cython" in rates:
        print(f"\ncython / python: {rates['cython'] / rates['python']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
