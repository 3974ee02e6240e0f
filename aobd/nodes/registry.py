"""Node type -> executor. The driver looks executors up here; tests and embedders may add their own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aobd.model.workflow import Node

from .agent import execute_agent
from .base import NodeContext
from .composite import execute_composite
from .function import execute_function
from .map import execute_map

Executor = Callable[[Node, dict[str, Any], NodeContext], Awaitable[Any]]


async def execute_join(node: Node, inputs: dict[str, Any], ctx: NodeContext) -> Any:
    """A join's output is what it received: the outputs of its taken inputs (or its bindings)."""
    return inputs


def default_executors() -> dict[str, Executor]:
    """Executors for the types that run in-process. ``http`` is added by the driver (it owns a client)."""
    return {
        "function": execute_function,
        "agent": execute_agent,
        "map": execute_map,
        "join": execute_join,
        "composite": execute_composite,
    }
