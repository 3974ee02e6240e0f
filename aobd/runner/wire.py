"""What travels between an orchestrator and a runner: one job per node attempt, one outcome per job.

Both are msgspec Structs encoded as msgpack (compact, and faster than JSON for the nested inputs and outputs).
A job carries the node itself, so a runner needs nothing but the job and its own configuration (its handler
allow-list, its HTTP allow-list): it never trusts the sender for what it may execute.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from aobd.model.workflow import Node

Priority = Literal["high", "medium", "low"]

#: Node types whose attempts need nothing from the orchestrator but the job: these may run on a runner.
#: Agents read the live graph, maps and composites launch sub-attempts and child runs: they stay with the owner.
REMOTE_TYPES: frozenset[str] = frozenset({"function", "http"})


class NodeJob(msgspec.Struct, frozen=True, omit_defaults=True):
    job_id: str
    run_id: str
    node_id: str
    attempt: int
    #: The node to run; None when ``version`` names it instead (the shared-memory IR of the runner plane).
    node: Node | None
    inputs: dict[str, Any]
    timeout_s: float
    #: Unix time after which the orchestrator has given up on this attempt: a runner skips stale jobs.
    deadline: float
    workspace: str = "default"
    priority: Priority = "medium"
    #: Who to answer (transport-specific: an orchestrator's id).
    origin: str = ""
    #: The attempt's ``ctx.idempotency_key`` (a map item's is ``<run>:<node>:<index>``); empty: ``<run>:<node>``.
    idempotency_key: str = ""
    #: The run's document version holding ``node_id``, published in shared memory (aobd.planes.shm_ir): the
    #: runner reads the node from there, so a patched run is executed on its patched graph.
    version: str = ""


class NodeOutcome(msgspec.Struct, frozen=True, omit_defaults=True):
    job_id: str
    run_id: str
    node_id: str
    attempt: int
    ok: bool
    output: Any = None
    #: On failure: {"code", "message", "traceback"?}.
    error: dict[str, Any] | None = None
    retryable: bool = True
    #: The runner that executed the attempt (for the operator; not recorded in the run's history).
    runner: str = ""
    origin: str = ""


_job_encoder = msgspec.msgpack.Encoder()
_job_decoder = msgspec.msgpack.Decoder(NodeJob)
_outcome_decoder = msgspec.msgpack.Decoder(NodeOutcome)
_jobs_decoder = msgspec.msgpack.Decoder(list[NodeJob])
_outcomes_decoder = msgspec.msgpack.Decoder(list[NodeOutcome])


def encode(value: NodeJob | NodeOutcome | list[NodeJob] | list[NodeOutcome]) -> bytes:
    return _job_encoder.encode(value)


def decode_job(data: bytes | memoryview) -> NodeJob:
    return _job_decoder.decode(data)


def decode_outcome(data: bytes | memoryview) -> NodeOutcome:
    return _outcome_decoder.decode(data)


def decode_jobs(data: bytes | memoryview) -> list[NodeJob]:
    """A batched frame of jobs (the zmq transport sends several per frame)."""
    return _jobs_decoder.decode(data)


def decode_outcomes(data: bytes | memoryview) -> list[NodeOutcome]:
    return _outcomes_decoder.decode(data)
