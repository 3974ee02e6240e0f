"""What the run machine asks its driver to do. The machine never does I/O; it returns these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aobd.model.events import Event
from aobd.model.workflow import Node


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Run one attempt of a node (after the step's events are durable)."""

    node_id: str
    attempt: int
    node: Node
    inputs: dict[str, Any]
    timeout_s: float


@dataclass(frozen=True, slots=True)
class Wake:
    """Call the machine back at ``at`` (unix seconds): a retry backoff, a timer, an approval deadline."""

    at: float
    kind: str  # "retry" | "timer" | "approval"
    node_id: str
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class Finished:
    status: str


Effect = Dispatch | Wake | Finished


@dataclass(slots=True)
class Step:
    """The outcome of one command: events to append (already folded into the machine), blobs that must be
    durable in the CAS before those events, and effects to perform after."""

    events: list[Event] = field(default_factory=list)
    blobs: dict[str, bytes] = field(default_factory=dict)
    effects: list[Effect] = field(default_factory=list)
