"""What every executor receives and returns.

An executor runs one attempt of one node: ``await executor(node, inputs, ctx)`` returns the node's
JSON-serializable output, or raises :class:`aobd.errors.NodeError` (``retryable`` says whether another attempt
may help). Any other exception is a bug in a handler and is recorded as a retryable ``handler_error``.
Executors never touch the event log: recording is the coordinator's job, which is what makes completions
exactly-once even though execution is at-least-once.
"""

from __future__ import annotations

from typing import Any

import msgspec


class NodeContext(msgspec.Struct, frozen=True):
    """Per-attempt facts handed to handlers (``handler(inputs, ctx)``) and executors.

    A frozen msgspec Struct rather than a frozen dataclass: one is made per attempt, and a frozen dataclass's
    ``__init__`` (``object.__setattr__`` per field) cost ten times as much. Copy with ``msgspec.structs.replace``.
    """

    run_id: str
    node_id: str
    attempt: int
    #: Stable across attempts and replays of the same run: ``<run_id>:<node_id>``.
    idempotency_key: str
    #: Per-attempt timeout in seconds (the driver enforces it; executors may use it for their own I/O).
    timeout_s: float
    workspace: str = "default"
    #: The run's priority: which ``node.jobs.*`` topic a cluster sends the attempt to.
    priority: str = "medium"
    #: Extra values for executors that need engine services (e.g. the child-run launcher for composites).
    services: dict[str, Any] = msgspec.field(default_factory=dict)
