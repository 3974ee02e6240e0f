"""The ``agent.jobs`` channel over HTTP: external runners claim agent jobs, renew leases and post results.

``POST /v1/agent-jobs/claim`` long-polls for a job of the caller's workspace (204 when none arrived in time),
``POST /v1/agent-jobs/{id}/heartbeat`` renews the lease, ``POST /v1/agent-jobs/{id}/result`` answers (409 when the
lease lapsed or another runner holds the job), ``GET /v1/agent-jobs`` lists what is pending. Runners hold
``write`` tokens. The queue behind them is :class:`aobd.agents.jobs.AgentJobQueue` (``api.service.agent_jobs``).

``aobd.api.app`` appends :data:`AGENT_ROUTES` to its route table. The table is built on first access (PEP 562
``__getattr__``) because ``Route`` lives in ``aobd.api.app``, which imports this module: whichever of the two is
imported first, neither needs the other half-initialized.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, TypeVar

import msgspec

from aobd.agents.base import AgentAnswer
from aobd.agents.jobs import AgentJobQueue, ClaimedJob
from aobd.errors import BadRequest, NodeError, Unavailable
from aobd.model.canonical import canonical_json
from aobd.model.patch import PatchProposal

if TYPE_CHECKING:
    from aobd.api.app import Api, Request, Route

T = TypeVar("T")

#: Longest long poll: below the idle timeouts of common proxies and load balancers (60 s and up).
MAX_WAIT_S = 60.0
MAX_LEASE_S = 3600.0
_MESSAGE_CHARS = 4000

RunnerName = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
LeaseSeconds = Annotated[float, msgspec.Meta(gt=0, le=MAX_LEASE_S)]


class AgentJobClaim(msgspec.Struct, forbid_unknown_fields=True):
    """Wait up to ``wait_s`` for an agent job of this workspace and lease it for ``lease_s``."""

    #: Who claims (shown to other runners whose late answers are refused, and in ``GET /v1/agent-jobs``).
    runner: RunnerName
    wait_s: Annotated[float, msgspec.Meta(ge=0, le=MAX_WAIT_S)] = 20.0
    lease_s: LeaseSeconds = 30.0


class AgentJobOut(msgspec.Struct):
    """A claimed job: what to run, and the lease to heartbeat and answer with."""

    job_id: str
    lease_id: str
    lease_expires_in_s: float
    run_id: str
    node_id: str
    attempt: int
    inputs: dict[str, Any]
    #: The node's config, secrets left out (``api_key_env`` names the variable in the runner's environment).
    config: dict[str, Any]
    #: The run's current materialized workflow.
    document: dict[str, Any]
    #: Version of ``document``: the base of a patch in the answer.
    version: str | None = None
    #: Seconds until the attempt gives up whatever the lease says; None: no limit.
    deadline_in_s: float | None = None
    #: Node id -> status in the run when the job was offered.
    node_status: dict[str, str] | None = None


class AgentJobHeartbeat(msgspec.Struct, forbid_unknown_fields=True):
    lease_id: str
    #: New lease length from now; the claim's when absent.
    lease_s: LeaseSeconds | None = None


class AgentJobLease(msgspec.Struct):
    job_id: str
    lease_id: str
    lease_expires_in_s: float


class AgentPatchIn(msgspec.Struct, forbid_unknown_fields=True):
    """RFC 6902 operations on the workflow document; authored by ``agent:<node id>`` whoever runs the agent."""

    ops: list[dict[str, Any]]
    reason: str = ""
    #: The version the ops were computed against; the job's ``version`` when absent.
    base: str | None = None


class AgentErrorIn(msgspec.Struct, forbid_unknown_fields=True):
    """The agent failed this attempt; ``retryable`` tells the engine whether another attempt may help."""

    message: str
    code: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$")] = "agent_error"
    retryable: bool = True


class AgentJobResult(msgspec.Struct, forbid_unknown_fields=True):
    """The answer (``output`` and optional ``patch``, DESIGN.md section 3) or an ``error``, under a live lease."""

    lease_id: str
    output: Any = None
    patch: AgentPatchIn | None = None
    #: Token usage as the provider reported it.
    usage: dict[str, Any] | None = None
    #: The raw exchange with the model (request and response bodies, never credentials), stored in the CAS.
    exchange: dict[str, Any] | None = None
    error: AgentErrorIn | None = None


class AgentJobAccepted(msgspec.Struct):
    job_id: str
    status: Literal["accepted"] = "accepted"


class AgentJobInfo(msgspec.Struct):
    job_id: str
    run_id: str
    node_id: str
    attempt: int
    state: Literal["offered", "leased"]
    runner: str | None
    lease_expires_in_s: float | None
    deadline_in_s: float | None
    claims: int


class AgentJobs(Protocol):
    """What the routes need of the ``agent.jobs`` channel: async, so that the queue may live in another process
    (an accept worker reaches the orchestrators' queues over RPC: :class:`aobd.planes.rpc.RemoteAgentJobs`)."""

    async def claim(self, workspace: str, runner: str, wait_s: float, lease_s: float) -> AgentJobOut | None: ...

    async def release(self, workspace: str, job_id: str, lease_id: str) -> None: ...

    async def heartbeat(self, workspace: str, job_id: str, lease_id: str, lease_s: float | None) -> AgentJobLease: ...

    async def complete(self, workspace: str, job_id: str, runner: str, body: AgentJobResult) -> AgentJobAccepted: ...

    async def pending(self, workspace: str) -> list[AgentJobInfo]: ...


class LocalAgentJobs:
    """:class:`AgentJobs` over this process's :class:`~aobd.agents.jobs.AgentJobQueue`.

    Lease and deadline times leave as seconds from now (never as the queue's clock readings), so the answers
    mean the same in any process.
    """

    def __init__(self, queue: AgentJobQueue) -> None:
        self.queue = queue

    async def claim(self, workspace: str, runner: str, wait_s: float, lease_s: float) -> AgentJobOut | None:
        claimed = await self.queue.claim(workspace, runner, wait_s, lease_s)
        return None if claimed is None else _job_out(claimed, self.queue.clock())

    async def release(self, workspace: str, job_id: str, lease_id: str) -> None:
        self.queue.release(workspace, job_id, lease_id)

    async def heartbeat(self, workspace: str, job_id: str, lease_id: str, lease_s: float | None) -> AgentJobLease:
        claimed = self.queue.heartbeat(workspace, job_id, lease_id, lease_s)
        return AgentJobLease(
            claimed.job.job_id, claimed.lease_id, round(claimed.lease_deadline - self.queue.clock(), 3)
        )

    async def complete(self, workspace: str, job_id: str, runner: str, body: AgentJobResult) -> AgentJobAccepted:
        job = self.queue.job(workspace, job_id)
        result: AgentAnswer | NodeError
        if body.error is not None:
            if body.output is not None or body.patch is not None:
                raise BadRequest("a result carries either 'error' or 'output'/'patch', not both")
            result = NodeError(
                f"agent {job.node_id!r} (external runner {runner}): {body.error.message[:_MESSAGE_CHARS]}",
                code=body.error.code,
                retryable=body.error.retryable,
            )
        else:
            patch = None
            if body.patch is not None:
                patch = PatchProposal(
                    ops=body.patch.ops,
                    author=f"agent:{job.node_id}",
                    reason=body.patch.reason,
                    base=body.patch.base or job.version,
                )
            exchange = None if body.exchange is None else canonical_json(body.exchange)
            result = AgentAnswer(output=body.output, patch=patch, usage=body.usage, exchange=exchange)
        self.queue.complete(workspace, job_id, body.lease_id, result)
        return AgentJobAccepted(job_id)

    async def pending(self, workspace: str) -> list[AgentJobInfo]:
        return [AgentJobInfo(**dataclasses.asdict(info)) for info in self.queue.pending(workspace)]


def _jobs(api: Api) -> AgentJobs:
    jobs: AgentJobQueue | AgentJobs | None = getattr(api.service, "agent_jobs", None)
    if jobs is None:
        raise Unavailable("this daemon has no agent job queue; external agent runners are not available")
    return LocalAgentJobs(jobs) if isinstance(jobs, AgentJobQueue) else jobs


def _job_out(claimed: ClaimedJob, now: float) -> AgentJobOut:
    job = claimed.job
    return AgentJobOut(
        job_id=job.job_id,
        lease_id=claimed.lease_id,
        lease_expires_in_s=round(claimed.lease_deadline - now, 3),
        run_id=job.run_id,
        node_id=job.node_id,
        attempt=job.attempt,
        inputs=job.inputs,
        config=job.config,
        document=job.document,
        version=job.version,
        deadline_in_s=None if job.deadline is None else round(job.deadline - now, 3),
        node_status=job.node_status,
    )


async def _unless_disconnected(work: Coroutine[Any, Any, T], r: Request) -> tuple[T | None, bool]:
    """(result of ``work`` or None when it was cancelled, whether the client left); ``work`` ends either way."""
    work_task = asyncio.ensure_future(work)

    async def watch() -> None:
        # The body was read whole, so the next message is the disconnect.
        while (await r.receive())["type"] != "http.disconnect":
            pass

    watch_task = asyncio.ensure_future(watch())
    try:
        await asyncio.wait((work_task, watch_task), return_when=asyncio.FIRST_COMPLETED)
        # A broken receive() means the connection is gone just as an http.disconnect does.
        left = watch_task.done()
    finally:
        # Also reached when this handler is cancelled (server shutdown): no child may outlive it.
        for task in (work_task, watch_task):
            task.cancel()
        await asyncio.gather(work_task, watch_task, return_exceptions=True)
    if work_task.cancelled():
        return None, left
    return work_task.result(), left


async def claim_job(api: Api, r: Request) -> Any:
    from aobd.api.app import Response

    body = r.decode(AgentJobClaim)
    jobs = _jobs(api)
    workspace = r.caller.workspace
    claimed, left = await _unless_disconnected(jobs.claim(workspace, body.runner, body.wait_s, body.lease_s), r)
    if claimed is not None and left:
        # Nobody will ever see this lease: hand the job to the next runner now rather than when the lease lapses.
        await jobs.release(workspace, claimed.job_id, claimed.lease_id)
        claimed = None
    if claimed is None:
        return Response(None, 204)
    return claimed


async def heartbeat_job(api: Api, r: Request) -> Any:
    body = r.decode(AgentJobHeartbeat)
    return await _jobs(api).heartbeat(r.caller.workspace, r.params["id"], body.lease_id, body.lease_s)


async def post_job_result(api: Api, r: Request) -> Any:
    body = r.decode(AgentJobResult)
    return await _jobs(api).complete(r.caller.workspace, r.params["id"], r.caller.name, body)


async def list_agent_jobs(api: Api, r: Request) -> Any:
    return await _jobs(api).pending(r.caller.workspace)


def _routes() -> tuple[Route, ...]:
    from aobd.api.app import Route

    return (
        Route(
            "POST",
            "/v1/agent-jobs/claim",
            claim_job,
            "write",
            "claimAgentJob",
            "Long-poll for an external agent job and lease it (204 when none arrived within wait_s)",
            AgentJobClaim,
            AgentJobOut,
        ),
        Route(
            "POST",
            "/v1/agent-jobs/{id}/heartbeat",
            heartbeat_job,
            "write",
            "heartbeatAgentJob",
            "Renew the lease on a claimed agent job (409 when it lapsed or another runner holds it)",
            AgentJobHeartbeat,
            AgentJobLease,
        ),
        Route(
            "POST",
            "/v1/agent-jobs/{id}/result",
            post_job_result,
            "write",
            "postAgentJobResult",
            "Answer a claimed agent job: output and optional patch, or an error (409 for a stale lease)",
            AgentJobResult,
            AgentJobAccepted,
        ),
        Route(
            "GET",
            "/v1/agent-jobs",
            list_agent_jobs,
            "write",
            "listAgentJobs",
            "Agent jobs of this workspace waiting for a runner or held by one",
            None,
            list[AgentJobInfo],
        ),
    )


AGENT_ROUTES: tuple[Route, ...]


def __getattr__(name: str) -> Any:
    if name == "AGENT_ROUTES":
        routes = globals()["AGENT_ROUTES"] = _routes()
        return routes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
