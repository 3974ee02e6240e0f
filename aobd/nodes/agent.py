"""``agent`` nodes: ask the configured provider and return its answer (output and optional patch)."""

from __future__ import annotations

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
        raise NodeError(
            "external agent runners need the daemon (aobd serve)", code="no_external_runner", retryable=False
        )
    if provider == "scripted":
        return scripted_answer(node.config, ctx.attempt, author=author, base=base)
    raise NodeError(f"agent provider {provider!r} is not available in this build", code="no_provider", retryable=False)
