"""The workflow document (DESIGN.md section 2) as msgspec Structs.

The Structs are the single schema: the engine decodes with them, ``aobd validate`` reports their errors with
JSON pointers, and ``docs/workflow.schema.json`` is exported from them (``python -m aobd.model.schema``).
Documents stay plain dicts while patches apply to them (RFC 6902 works on JSON, not on objects); they are
decoded into these Structs for validation and compilation.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

NODE_ID_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
NODE_TYPES = ("function", "http", "map", "join", "composite", "agent", "approval", "timer")
NodeType = Literal["function", "http", "map", "join", "composite", "agent", "approval", "timer"]
DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


class Retry(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Retry policy: exponential backoff from ``initial_ms`` doubling up to ``max_ms``, with jitter."""

    max_attempts: int = 3
    initial_ms: int = 100
    max_ms: int = 10_000
    multiplier: float = 2.0
    #: Fraction of each delay drawn at random (0.2: the delay is in [0.8d, 1.2d]); avoids retry storms.
    jitter: float = 0.2


class Defaults(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    retry: Retry = msgspec.field(default_factory=Retry)
    timeout_ms: int = 30_000


DEFAULT_AGENT_NODE_TYPES = ("function", "http", "join", "map", "agent", "approval", "timer")


class Policy(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Patch governance for runs of this workflow (DESIGN.md section 3)."""

    patches: Literal["auto", "approve", "deny"] = "auto"
    max_spawned_nodes: int = 20
    max_patches: int = 10
    #: Node types a patch may add.
    allowed_node_types: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_AGENT_NODE_TYPES))
    #: How deep agents added by agents may nest (an agent in the base is depth 0).
    max_agent_depth: int = 2


class Node(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    id: str
    type: NodeType
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    #: Input name -> JMESPath expression over {"inputs": ..., "nodes": {id: {"output": ...}}}.
    in_: dict[str, str] = msgspec.field(default_factory=dict, name="in")
    retry: Retry | None = None
    timeout_ms: int | None = None
    on_error: Literal["fail", "continue"] = "fail"
    description: str | None = None


class Edge(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    from_: str = msgspec.field(name="from")
    to: str
    #: JMESPath over the run context; the edge is taken when truthy (or absent).
    when: str | None = None


class Workflow(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: str
    nodes: list[Node]
    edges: list[Edge] = msgspec.field(default_factory=list)
    outputs: dict[str, str] | None = None
    defaults: Defaults = msgspec.field(default_factory=Defaults)
    policy: Policy = msgspec.field(default_factory=Policy)
    description: str | None = None
    #: Free-form metadata (owner, labels); ignored by the engine.
    metadata: dict[str, Any] | None = None


# Per-type node configuration. Unknown keys are refused so a typo ("handelr") is an error, not a no-op.


class FunctionConfig(msgspec.Struct, forbid_unknown_fields=True):
    handler: str
    #: builtin:sleep duration.
    ms: int | None = None
    #: builtin:fail: how many attempts fail before it succeeds.
    times: int | None = None
    #: The handler blocks (I/O, heavy CPU): run it in a worker thread instead of on the event loop.
    blocking: bool = False


class HttpConfig(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    headers: dict[str, str] | None = None
    body: Any = None


class MapConfig(msgspec.Struct, forbid_unknown_fields=True):
    #: JMESPath giving the list to map over.
    over: str
    #: The node template run once per item: {"type": ..., "config": ...}; its inputs are {"item", "index"}.
    node: dict[str, Any]
    concurrency: int = 8


class JoinConfig(msgspec.Struct, forbid_unknown_fields=True):
    pass


class CompositeConfig(msgspec.Struct, forbid_unknown_fields=True):
    workflow: str | None = None
    definition: dict[str, Any] | None = None


class ScriptedAnswer(msgspec.Struct, forbid_unknown_fields=True):
    output: Any = None
    patch: dict[str, Any] | None = None
    error: str | None = None


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True):
    provider: Literal["scripted", "openai"] = "scripted"
    script: list[ScriptedAnswer] | None = None
    base_url: str | None = None
    model: str | None = None
    #: Name of the environment variable holding the API key (the key itself never appears in a workflow).
    api_key_env: str | None = None
    #: Or a file holding the key (a mounted secret), read when the node runs.
    api_key_file: str | None = None
    #: Per-request timeout (the node's timeout_ms bounds the whole attempt, retries included).
    request_timeout_ms: int | None = None
    prompt: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    runner: Literal["inline", "external"] = "inline"


class Escalation(msgspec.Struct, forbid_unknown_fields=True):
    after: str
    notify: str | None = None
    decision: Literal["approve", "reject"] | None = None


class ApprovalConfig(msgspec.Struct, forbid_unknown_fields=True):
    assignees: list[str] = msgspec.field(default_factory=list)
    timeout: str | None = None
    on_timeout: Literal["approve", "reject"] = "reject"
    escalation: list[Escalation] = msgspec.field(default_factory=list)
    prompt: str | None = None


class TimerConfig(msgspec.Struct, forbid_unknown_fields=True):
    delay: str | None = None
    until: str | None = None


CONFIG_TYPES: dict[str, type[msgspec.Struct]] = {
    "function": FunctionConfig,
    "http": HttpConfig,
    "map": MapConfig,
    "join": JoinConfig,
    "composite": CompositeConfig,
    "agent": AgentConfig,
    "approval": ApprovalConfig,
    "timer": TimerConfig,
}


def parse_duration_ms(text: str) -> int:
    """``"30s"`` -> 30000. Units: ms, s, m, h, d. Raises ValueError naming the text."""
    match = DURATION_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like '500ms', '30s', '10m', '2h' or '1d'")
    scale = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}[match.group(2)]
    return int(float(match.group(1)) * scale)


def node_timeout_ms(workflow: Workflow, node: Node) -> int:
    return node.timeout_ms if node.timeout_ms is not None else workflow.defaults.timeout_ms


def node_retry(workflow: Workflow, node: Node) -> Retry:
    return node.retry if node.retry is not None else workflow.defaults.retry
