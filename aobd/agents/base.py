"""The one shape of an agent's answer, whatever produced it (a script, an LLM, an external runner)."""

from __future__ import annotations

from typing import Any

import msgspec

from aobd.errors import NodeError
from aobd.model.patch import PatchProposal


class AgentAnswer(msgspec.Struct, frozen=True, omit_defaults=True):
    """``{"output": <any JSON>, "patch": {"ops": [...], "reason": "..."}}``, ``patch`` optional."""

    output: Any = None
    patch: PatchProposal | None = None
    #: Token usage as the provider reports it (prompt_tokens, completion_tokens, total_tokens).
    usage: dict[str, Any] | None = None
    #: The raw exchange (request and response JSON, never credentials), stored in the CAS by the engine.
    exchange: bytes | None = None


def parse_answer(raw: Any, *, author: str, base: str | None) -> AgentAnswer:
    """Validate a raw answer dict. A malformed answer is a retryable node error naming the problem."""
    if not isinstance(raw, dict):
        raise NodeError(
            f"agent answer must be an object with 'output' and optional 'patch', got {type(raw).__name__}",
            code="bad_agent_answer",
        )
    patch = raw.get("patch")
    proposal = None
    if patch is not None:
        if not isinstance(patch, dict) or not isinstance(patch.get("ops"), list):
            raise NodeError("agent answer 'patch' must be an object with an 'ops' list", code="bad_agent_answer")
        proposal = PatchProposal(
            ops=patch["ops"],
            author=patch.get("author") or author,
            reason=str(patch.get("reason", "")),
            base=patch.get("base") or base,
        )
    return AgentAnswer(output=raw.get("output"), patch=proposal, usage=raw.get("usage"))
