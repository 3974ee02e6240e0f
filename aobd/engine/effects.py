"""What the run machine asks its driver to do. The machine never does I/O; it returns these."""

from __future__ import annotations

from typing import Any

import msgspec

from aobd.model.events import Event
from aobd.model.workflow import Node

# Effects and steps are msgspec Structs: several are made per step, and a dataclass's __init__ is interpreted code
# (a frozen one's costs ten times as much; making Step a Struct saved 1.8% of a W6 run's instructions).


class Dispatch(msgspec.Struct, frozen=True):
    """Run one attempt of a node (after the step's events are durable)."""

    node_id: str
    attempt: int
    node: Node
    inputs: dict[str, Any]
    timeout_s: float


class Wake(msgspec.Struct, frozen=True):
    """Call the machine back at ``at`` (unix seconds): a retry backoff, a timer, an approval deadline."""

    at: float
    kind: str  # "retry" | "timer" | "approval"
    node_id: str
    attempt: int = 0


class Finished(msgspec.Struct, frozen=True):
    status: str


Effect = Dispatch | Wake | Finished


class Step(msgspec.Struct):
    """The outcome of one command: events to append (already folded into the machine), blobs that must be
    durable in the CAS before those events, and effects to perform after."""

    events: list[Event] = msgspec.field(default_factory=list)
    blobs: dict[str, bytes] = msgspec.field(default_factory=dict)
    effects: list[Effect] = msgspec.field(default_factory=list)

    def extend(self, later: Step) -> None:
        """Fold ``later`` (a step the machine took after this one) into this one, to be committed together."""
        self.events += later.events
        self.blobs.update(later.blobs)
        self.effects += later.effects
