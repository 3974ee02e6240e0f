"""The ``scripted`` provider: ``config.script`` holds one answer per attempt (the last repeats).

It makes agentic workflows deterministic for demos, tests and replays without any LLM.
An answer with ``"error"`` fails that attempt (retryable), which is how a script demonstrates retries.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aobd.errors import NodeError

from .base import AgentAnswer, parse_answer


def scripted_answer(config: Mapping[str, Any], attempt: int, *, author: str, base: str | None) -> AgentAnswer:
    script = config.get("script") or []
    if not script:
        raise NodeError("scripted agent has an empty config.script", code="bad_config", retryable=False)
    raw = script[min(attempt, len(script)) - 1]
    if isinstance(raw, dict) and raw.get("error"):
        raise NodeError(f"scripted agent error: {raw['error']}", code="agent_error", retryable=True)
    return parse_answer(raw, author=author, base=base)
