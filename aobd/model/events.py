"""The events of a run (DESIGN.md section 5): the only source of truth.

Every event carries ``run_id``, ``seq`` (1, 2, 3... without gaps), ``type`` (the msgspec tag) and ``ts`` (unix
seconds, from the injected clock). Run state is a fold over these (``aobd.model.state``). Encoded with msgspec
JSON; large values (inputs, outputs, documents) live in the CAS and events hold their refs, except small node
outputs, which are also carried inline (``output``) so that recovery and replay do not need one CAS read
per node.
"""

from __future__ import annotations

from typing import Any, get_args

import msgspec


class ReplayPlan(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a replay reuses from its source run (refs only; the values are in the CAS)."""

    source_run: str
    from_node: str
    mode: str  # "freeze" | "live"
    #: Nodes not downstream of ``from_node``: node id -> recorded output ref, reused without executing.
    reuse: dict[str, str] = msgspec.field(default_factory=dict)
    #: freeze mode: agents downstream, node id -> [recorded inputs ref, recorded output ref]; the recorded answer
    #: is replayed when the agent's inputs hash to the same ref.
    frozen: dict[str, list[str]] = msgspec.field(default_factory=dict)


class Event(msgspec.Struct, tag_field="type", omit_defaults=True, kw_only=True):
    run_id: str
    seq: int
    ts: float
    #: The daemon that appended the event, in a cluster (omitted on a single daemon): the audit trail of
    #: which daemon drove a run when.
    writer: str | None = None


class RunCreated(Event, tag="RunCreated"):
    workflow: str
    base_version: str
    #: CAS ref of the base document (canonical JSON).
    base_ref: str
    inputs_ref: str
    inputs: Any = None
    workspace: str = "default"
    #: The workspace's patch governance at creation (merged with the workflow's policy, the stricter wins);
    #: recorded so that recovery and replays judge patches exactly as the run did.
    workspace_policy: dict[str, Any] | None = None
    #: Replays: the run this one was derived from (composite children: the parent run, with parent_node_id).
    parent_run_id: str | None = None
    replay: ReplayPlan | None = None
    #: Composite children: the parent run's node that started this run.
    parent_node_id: str | None = None
    fidelity: str = "full"
    #: Directory of the workflow file a run was started from (``aobd run FILE``); handlers next to the file
    #: are importable from there, also when ``aobd resume`` picks the run up after a crash.
    source_dir: str | None = None
    #: Which node.jobs topic the run's attempts go to in a cluster (``POST /v1/runs`` ``priority``).
    priority: str = "medium"


class NodeScheduled(Event, tag="NodeScheduled"):
    node_id: str
    attempt: int


class NodeStarted(Event, tag="NodeStarted"):
    node_id: str
    attempt: int
    inputs_ref: str


class NodeCompleted(Event, tag="NodeCompleted"):
    node_id: str
    attempt: int
    output_ref: str
    node_type: str = ""
    #: The output itself when small (see ``INLINE_OUTPUT_MAX``).
    output: Any = None
    inline: bool = False
    duration_ms: float = 0.0
    #: Set when the output was not produced by executing the node (replay reuse): the source run.
    reused_from: str | None = None
    #: Agents: token usage and the CAS ref of the raw provider exchange.
    usage: dict[str, Any] | None = None
    exchange_ref: str | None = None


class NodeFailed(Event, tag="NodeFailed"):
    node_id: str
    attempt: int
    error: dict[str, Any]
    retryable: bool
    node_type: str = ""
    #: When another attempt is due (unix seconds); None when this was the last attempt.
    retry_at: float | None = None
    duration_ms: float = 0.0


class NodeSkipped(Event, tag="NodeSkipped"):
    node_id: str
    reason: str = "no_taken_edge"


class PatchProposed(Event, tag="PatchProposed"):
    patch_id: str
    author: str
    ops: list[dict[str, Any]]
    reason: str = ""
    base: str | None = None
    #: The agent node whose answer carried the patch, if any.
    node_id: str | None = None


class PatchApplied(Event, tag="PatchApplied"):
    patch_id: str
    version: str
    version_ref: str
    added_nodes: list[str] = msgspec.field(default_factory=list)
    approved_by: str | None = None


class PatchRejected(Event, tag="PatchRejected"):
    patch_id: str
    reasons: list[dict[str, Any]]
    rejected_by: str | None = None


class PatchRolledBack(Event, tag="PatchRolledBack"):
    patch_id: str
    version: str
    version_ref: str
    by: str | None = None


class ApprovalRequested(Event, tag="ApprovalRequested"):
    node_id: str
    ticket: str
    assignees: list[str] = msgspec.field(default_factory=list)
    deadline: float | None = None
    on_timeout: str = "reject"


class ApprovalDecided(Event, tag="ApprovalDecided"):
    node_id: str
    ticket: str
    decision: str
    by: str
    reason: str = ""


class ApprovalEscalated(Event, tag="ApprovalEscalated"):
    """One step of an approval's escalation chain ran: who was notified (and how that went), what was decided."""

    node_id: str
    ticket: str
    step: int
    notify: str | None = None
    result: str | None = None
    decision: str | None = None


class TimerSet(Event, tag="TimerSet"):
    node_id: str
    fire_at: float


class TimerFired(Event, tag="TimerFired"):
    node_id: str


class RunCompleted(Event, tag="RunCompleted"):
    outputs: Any = None
    outputs_ref: str | None = None


class RunFailed(Event, tag="RunFailed"):
    error: dict[str, Any]
    node_id: str | None = None


class RunCancelled(Event, tag="RunCancelled"):
    reason: str = ""
    by: str | None = None


AnyEvent = (
    RunCreated
    | NodeScheduled
    | NodeStarted
    | NodeCompleted
    | NodeFailed
    | NodeSkipped
    | PatchProposed
    | PatchApplied
    | PatchRejected
    | PatchRolledBack
    | ApprovalRequested
    | ApprovalDecided
    | ApprovalEscalated
    | TimerSet
    | TimerFired
    | RunCompleted
    | RunFailed
    | RunCancelled
)

#: Outputs whose canonical JSON is at most this many bytes ride inline in NodeCompleted.
INLINE_OUTPUT_MAX = 4096

TERMINAL_EVENTS = (RunCompleted, RunFailed, RunCancelled)

_encoder = msgspec.json.Encoder()
_encode = _encoder.encode  # bound once: no method lookup per event
_decoder = msgspec.json.Decoder(AnyEvent)


def encode_event(event: Event) -> bytes:
    return _encode(event)


def decode_event(data: bytes) -> AnyEvent:
    return _decoder.decode(data)


def event_type(event: Event) -> str:
    try:
        return EVENT_TAGS[type(event)]
    except KeyError:  # not one of AnyEvent's classes (a test's own subclass)
        return type(event).__struct_config__.tag  # type: ignore[return-value,unused-ignore]


#: Each event class's tag (its type name), by class: a dict probe instead of two attribute lookups per event.
EVENT_TAGS: dict[type, str] = {cls: cls.__struct_config__.tag for cls in get_args(AnyEvent)}
