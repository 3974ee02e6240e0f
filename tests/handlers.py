"""Handlers used by the test workflows (referenced as ``tests.handlers:<name>``)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

CALLS: dict[str, int] = {}


def add_one(inputs: dict[str, Any]) -> dict[str, Any]:
    return {"x": inputs["x"] + 1}


async def async_double(inputs: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"x": inputs["x"] * 2}


def with_ctx(inputs: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return {"key": ctx.idempotency_key, "attempt": ctx.attempt, "node": ctx.node_id}


def boom(inputs: dict[str, Any]) -> None:
    raise ValueError("the handler broke on purpose")


def not_json(inputs: dict[str, Any]) -> Any:
    return {"a set": {1, 2, 3}}


async def slow(inputs: dict[str, Any]) -> str:
    await asyncio.sleep(5)
    return "late"


def count(inputs: dict[str, Any], ctx: Any) -> int:
    CALLS[ctx.idempotency_key] = CALLS.get(ctx.idempotency_key, 0) + 1
    return CALLS[ctx.idempotency_key]


def big(inputs: dict[str, Any]) -> dict[str, Any]:
    """An output larger than the inline limit, so it lives only in the CAS."""
    return {"route": "yes", "padding": "x" * 10_000}


def where(inputs: Any) -> dict[str, Any]:
    """Which process executed the attempt (cluster tests: which daemon's runner)."""
    return {"pid": os.getpid()}


def dawdle(inputs: Any) -> dict[str, Any]:
    """A sync handler that holds its thread for ``inputs["s"]`` seconds (the inline budget's tests), then says
    which process ran it."""
    time.sleep(float(inputs.get("s", 0.02)) if isinstance(inputs, dict) else 0.02)
    return {"pid": os.getpid()}


def sulk(inputs: Any) -> None:
    """A sync handler that takes 20 ms to fail (the inline budget's tests)."""
    time.sleep(0.02)
    raise ValueError("the handler gave up on purpose")
