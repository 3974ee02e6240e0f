"""``map`` nodes: run ``config.node`` once per item, at most ``config.concurrency`` at a time.

Items run inside the map node's attempt (not as graph nodes), so the DAG and its event log stay small; each
item gets its own idempotency key ``<run_id>:<node_id>:<index>``. The output is the list of item outputs in
item order; the first failing item fails the attempt (and a retry runs the items again, which their keys
make safe).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from aobd.errors import NodeError
from aobd.model.workflow import Node

from .base import NodeContext


async def execute_map(node: Node, inputs: dict[str, Any], ctx: NodeContext) -> list[Any]:
    items = inputs.get("items")
    if not isinstance(items, list):
        raise NodeError(
            f"map {ctx.node_id!r}: config.over must give a list, got {type(items).__name__}",
            code="bad_map_items",
            retryable=False,
        )
    template = node.config["node"]
    child = msgspec.convert(
        {"id": f"{ctx.node_id}_item", "type": template["type"], "config": template.get("config", {})}, Node
    )
    run_one = ctx.services["execute"]
    limit = asyncio.Semaphore(max(1, int(node.config.get("concurrency", 8))))
    shared = {k: v for k, v in inputs.items() if k != "items"}

    async def one(index: int, item: Any) -> Any:
        async with limit:
            item_ctx = msgspec.structs.replace(
                ctx, node_id=f"{ctx.node_id}[{index}]", idempotency_key=f"{ctx.idempotency_key}:{index}"
            )
            result = await run_one(child, {**shared, "item": item, "index": index}, item_ctx)
            return getattr(result, "output", result)

    return list(await asyncio.gather(*(one(i, item) for i, item in enumerate(items))))
