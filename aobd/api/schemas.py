"""Request and response bodies of the HTTP API, as msgspec Structs.

The same Structs validate request bodies (errors name the field) and generate ``/openapi.json``; the
workflow ``definition`` is the engine's own document (validated by ``aobd.model.validate``).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

#: The largest event seq the event log can address (a signed 64-bit SQLite INTEGER).
MAX_SEQ = 2**63 - 1

#: The public statuses of a run (``GET /v1/runs?status=`` accepts exactly these).
RunStatus = Literal["running", "waiting", "completed", "failed", "cancelled"]
#: The statuses of an approval ticket (``GET /v1/approvals?status=`` accepts exactly these).
ApprovalStatus = Literal["pending", "approved", "rejected"]


class ErrorBody(msgspec.Struct):
    code: str
    message: str
    details: list[Any] = msgspec.field(default_factory=list)


class ErrorResponse(msgspec.Struct):
    """Every error: ``{"error": {"code", "message", "details"}}``; 4xx for caller mistakes, 5xx for bugs/503."""

    error: ErrorBody


class WorkflowPut(msgspec.Struct, forbid_unknown_fields=True):
    definition: dict[str, Any]
    #: A movable name for this version (e.g. "main", "v2"); "latest" always names the newest.
    tag: str | None = None


class WorkflowRef(msgspec.Struct):
    workflow: str
    version: str
    tag: str | None = None


class WorkflowInfo(msgspec.Struct):
    name: str
    workspace: str
    latest_version: str
    tags: dict[str, str]
    versions: list[str]
    updated_at: float
    definition: dict[str, Any] | None = None


class RunStart(msgspec.Struct, forbid_unknown_fields=True):
    """Start a run of a registered ``workflow`` (at ``tag`` or latest) or of an inline ``definition``."""

    workflow: str | None = None
    definition: dict[str, Any] | None = None
    tag: str | None = None
    inputs: Any = msgspec.field(default_factory=dict)
    #: Starting twice with the same key (per workspace) returns the first run instead of a second one.
    idempotency_key: str | None = None
    priority: Literal["high", "medium", "low"] = "medium"
    #: A/B: ids of earlier patches (from any run of the same workflow) applied to the base at start.
    patch_set: list[str] | None = None


class NodeSummary(msgspec.Struct):
    status: Literal["pending", "running", "waiting", "completed", "failed", "skipped"]
    attempts: int
    output: Any = None
    error: dict[str, Any] | None = None


class PatchBrief(msgspec.Struct):
    patch_id: str
    author: str
    status: Literal["pending", "applied", "rejected", "rolled_back"]
    reasons: list[dict[str, Any]]


class RunSummary(msgspec.Struct):
    """DESIGN.md section 8's run summary."""

    run_id: str
    workflow: str
    status: RunStatus
    base_version: str
    version: str
    nodes: dict[str, NodeSummary]
    patches: list[PatchBrief]
    outputs: Any = None
    error: dict[str, Any] | None = None


class RunInfoOut(msgspec.Struct):
    run_id: str
    workflow: str
    status: str
    created_at: float
    updated_at: float
    last_seq: int
    parent_run_id: str | None = None
    workspace: str = "default"


class CancelRequest(msgspec.Struct, forbid_unknown_fields=True):
    reason: str = ""


class ReplayRequest(msgspec.Struct, forbid_unknown_fields=True):
    from_: str = msgspec.field(name="from")
    mode: Literal["freeze", "live"] = "freeze"


class PatchPost(msgspec.Struct, forbid_unknown_fields=True):
    ops: list[dict[str, Any]]
    reason: str = ""
    #: Recorded as the proposer; defaults to the caller's token name.
    author: str | None = None
    base: str | None = None


class PatchInfo(msgspec.Struct):
    patch_id: str
    run_id: str
    author: str
    status: Literal["pending", "applied", "rejected", "rolled_back"]
    reason: str
    ops: list[dict[str, Any]]
    reasons: list[dict[str, Any]]
    proposed_at: float
    node_id: str | None = None
    version: str | None = None
    added_nodes: list[str] = msgspec.field(default_factory=list)
    decided_by: str | None = None


class PatchDecision(msgspec.Struct, forbid_unknown_fields=True):
    reason: str = ""


class ApprovalInfo(msgspec.Struct):
    ticket: str
    run_id: str
    node_id: str
    status: ApprovalStatus
    assignees: list[str]
    deadline: float | None = None
    decided_by: str | None = None


class ApprovalDecision(msgspec.Struct, forbid_unknown_fields=True):
    decision: Literal["approve", "reject"]
    reason: str = ""


class Status(msgspec.Struct):
    version: str
    impl: str
    pid: int
    uptime_s: float
    data_dir: str
    runs_active: int
    draining: bool
    listen: str
    planes: dict[str, Any] = msgspec.field(default_factory=dict)


class Health(msgspec.Struct):
    status: Literal["ok", "draining", "starting"]
