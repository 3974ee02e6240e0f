"""``composite`` nodes: a child run of another workflow; the node's output is the child's outputs.

The child's run id is derived from the parent's idempotency key, so after a crash the resumed parent finds
and awaits the same child instead of starting a second one.
"""

from __future__ import annotations

from typing import Any

from aobd.model.workflow import Node

from .base import NodeContext


async def execute_composite(node: Node, inputs: dict[str, Any], ctx: NodeContext) -> Any:
    run_child = ctx.services["run_child"]
    return await run_child(node, inputs, ctx)
