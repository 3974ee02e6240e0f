"""What the run machine asks its driver to do. The machine never does I/O; it returns these."""

from __future__ import annotations

from typing import Any

import msgspec

from aobd.model.events import Event
from aobd.model.workflow import Node

# Wake and Finished are msgspec Structs: a dataclass's __init__ is interpreted code (a frozen one's costs ten times
# as much). Dispatch and Step, made and read for every attempt, are slotted classes that effects.pxd makes extension
# types when compiled, so typed code reads their fields directly.


class Dispatch:
    """Run one attempt of a node (after the step's events are durable). A slotted class, an extension type when
    compiled (effects.pxd), like Step: the engine reads its fields for every attempt."""

    __slots__ = ("attempt", "inputs", "node", "node_id", "timeout_s")

    def __init__(self, node_id: str, attempt: int, node: Node, inputs: dict[str, Any], timeout_s: float) -> None:
        self.node_id = node_id
        self.attempt = attempt
        self.node = node
        self.inputs = inputs
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"Dispatch(node_id={self.node_id!r}, attempt={self.attempt!r}, timeout_s={self.timeout_s!r})"


class Wake(msgspec.Struct, frozen=True):
    """Call the machine back at ``at`` (unix seconds): a retry backoff, a timer, an approval deadline."""

    at: float
    kind: str  # "retry" | "timer" | "approval"
    node_id: str
    attempt: int = 0


class Finished(msgspec.Struct, frozen=True):
    status: str


Effect = Dispatch | Wake | Finished


class Step:
    """The outcome of one command: events to append (already folded into the machine), blobs that must be
    durable in the CAS before those events, and effects to perform after.

    A slotted class, not a Struct like the effects: compiled, effects.pxd makes it an extension type, so
    :meth:`extend` and the engine read its three lists as C fields (four steps per W6 node are made and folded).
    """

    __slots__ = ("blobs", "effects", "events")

    def __init__(
        self,
        events: list[Event] | None = None,
        blobs: dict[str, bytes] | None = None,
        effects: list[Effect] | None = None,
    ) -> None:
        self.events: list[Event] = [] if events is None else events
        self.blobs: dict[str, bytes] = {} if blobs is None else blobs
        self.effects: list[Effect] = [] if effects is None else effects

    def extend(self, later: Step) -> None:
        """Fold ``later`` (a step the machine took after this one) into this one, to be committed together."""
        self.events += later.events
        self.blobs.update(later.blobs)
        self.effects += later.effects

    def __repr__(self) -> str:
        return f"Step(events={self.events!r}, blobs={sorted(self.blobs)!r}, effects={self.effects!r})"
