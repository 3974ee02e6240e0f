"""W6 handlers for the benchmark: the same arithmetic as examples/w6, plus entry/exit stamps for hop latency."""

from __future__ import annotations

import time
from typing import Any

#: (run_id, node_id) -> (entered, left), perf_counter seconds.
STAMPS: dict[tuple[str, str], tuple[float, float]] = {}


def _stamped(ctx: Any, entered: float, result: dict[str, Any]) -> dict[str, Any]:
    STAMPS[(ctx.run_id, ctx.node_id)] = (entered, time.perf_counter())
    return result


def inc(inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return _stamped(ctx, time.perf_counter(), {"x": inputs["x"] + 1})


def double(inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return _stamped(ctx, time.perf_counter(), {"x": inputs["x"] * 2})


def triple(inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return _stamped(ctx, time.perf_counter(), {"x": inputs["x"] * 3})


def total(inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return _stamped(ctx, time.perf_counter(), {"x": inputs["a"] + inputs["b"]})
