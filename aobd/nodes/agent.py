"""``agent`` nodes: ask the configured provider and return its answer (output and optional patch)."""

from __future__ import annotations

import os
from typing import Any

from aobd.agents.base import AgentAnswer
from aobd.agents.scripted import scripted_answer
from aobd.errors import NodeError
from aobd.model.workflow import Node

from .base import NodeContext


async def execute_agent(node: Node, inputs: dict[str, Any], ctx: NodeContext) -> AgentAnswer:
    provider = node.config.get("provider", "scripted")
    author = f"agent:{ctx.node_id}"
    base = ctx.services.get("version")
    if node.config.get("runner") == "external":
        queue = ctx.services.get("agent_jobs")
        if queue is None:
            raise NodeError(
                "external agent runners need the daemon (aobd serve)", code="no_external_runner", retryable=False
            )
        from aobd.agents.jobs import execute_external

        return await execute_external(node, inputs, ctx, queue)
    if provider == "scripted":
        return scripted_answer(node.config, ctx.attempt, author=author, base=base)
    if provider == "openai":
        from aobd.agents.openai import openai_answer

        return await openai_answer(
            node.config,
            inputs,
            ctx,
            document=ctx.services["document"],
            http_allow=ctx.services.get("http_allow", []),
            env=os.environ,
            node_status=ctx.services.get("node_status"),
        )
    raise NodeError(f"agent provider {provider!r} is not available in this build", code="no_provider", retryable=False)
