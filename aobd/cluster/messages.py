"""What rides the results topic: the coordinators' nudges and the runners' node outcomes, told apart by a header.

Both are keyed by run_id, so both reach the daemon that owns the run, which already consumes that topic: an
outcome needs no topic, consumer or routing table of its own. The ``aobd-kind`` header names the payload, so a
message is classified without trying decoders in turn (a msgpack outcome can happen to parse as something else).
A message without the header is a nudge of a daemon from before outcomes rode this topic (rolling upgrades);
a kind this daemon does not know is skipped, never guessed at.

Pure: no client and no I/O, unit-tested without a broker.
"""

from __future__ import annotations

import enum
from typing import Final

import msgspec

from aobd.bus.kafka import Message
from aobd.runner import wire
from aobd.runner.wire import NodeOutcome

KIND_HEADER: Final = "aobd-kind"


class Kind(enum.Enum):
    NUDGE = "nudge"
    OUTCOME = "outcome"
    #: A kind of a newer daemon, or a message of something else on our topic: skipped.
    UNKNOWN = "unknown"


class Nudge(msgspec.Struct, frozen=True):
    kind: str  # "resume"
    run_id: str
    sender: str


_nudge_encoder = msgspec.json.Encoder()
_nudge_decoder = msgspec.json.Decoder(Nudge)
_HEADERS: Final = {Kind.NUDGE: {KIND_HEADER: Kind.NUDGE.value}, Kind.OUTCOME: {KIND_HEADER: Kind.OUTCOME.value}}


def kind_of(message: Message) -> Kind:
    raw = message.headers.get(KIND_HEADER)
    if raw is None:
        return Kind.NUDGE
    try:
        return Kind(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return Kind.UNKNOWN


def encode_nudge(nudge: Nudge) -> tuple[bytes, dict[str, str]]:
    """The value and headers of a nudge message."""
    return _nudge_encoder.encode(nudge), _HEADERS[Kind.NUDGE]


def encode_outcome(outcome: NodeOutcome) -> tuple[bytes, dict[str, str]]:
    """The value and headers of an outcome message."""
    return wire.encode(outcome), _HEADERS[Kind.OUTCOME]


def decode(message: Message) -> Nudge | NodeOutcome | None:
    """The message's payload, or None when it is of an unknown kind or malformed (the caller logs and skips it)."""
    kind = kind_of(message)
    try:
        if kind is Kind.NUDGE:
            return _nudge_decoder.decode(message.value)
        if kind is Kind.OUTCOME:
            return wire.decode_outcome(message.value)
    except msgspec.DecodeError:
        return None
    return None
