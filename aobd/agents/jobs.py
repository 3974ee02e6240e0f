"""Agent jobs: agent attempts served by runners outside the daemon (``config.runner = "external"``).

The attempt *offers* a job; a runner *claims* it (a long poll) and receives a *lease* that it renews with
heartbeats; the runner's *result* (an answer or an error) resolves the attempt. A lease that lapses makes the job
claimable again, and from that moment the old holder's heartbeats and results are refused with
:class:`~aobd.errors.Conflict`: exactly one result per attempt is accepted, from whoever holds the lease when it
arrives. The attempt's own timeout still bounds everything; when it fires (or the run is cancelled) the job is
withdrawn and later results for it are :class:`~aobd.errors.NotFound`.

:class:`AgentJobQueue` is the embedded backend of the ``agent.jobs`` bus channel (DESIGN.md section 6): in memory,
one process, isolated per workspace, no background tasks. Jobs need not survive a restart: the attempt that offered
a job dies with the daemon, and the resumed run dispatches its node again, which offers a new job.

Two clocks, on purpose: *decisions* (is this lease still valid? is this job past its deadline?) use the injected
``clock``, so tests move time by hand; *waiting* (how long a long poll parks) uses the event loop, since it is
how long an HTTP request stays open.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from aobd.errors import Conflict, NodeError, NotFound, Unavailable
from aobd.model.workflow import Node
from aobd.nodes.base import NodeContext

from .base import AgentAnswer

__all__ = [
    "AgentJob",
    "AgentJobQueue",
    "ClaimedJob",
    "JobInfo",
    "execute_external",
    "job_id_of",
    "public_config",
]

#: Config keys that name where a secret lives (an environment variable, a mounted file), not the secret: the runner
#: needs them to find *its own* key, which is the point of running an agent outside the daemon.
_SECRET_REFERENCES = frozenset({"api_key_env", "api_key_file"})
#: Whole words of a key name (split on ``_`` and ``-``) that mark a secret value; ``max_tokens`` is not one.
_SECRET_KEY = re.compile(
    r"(?:^|[_-])(?:password|passwd|secret|token|apikey|api[_-]key|auth|authorization|cookie|credentials?"
    r"|private[_-]key|signature|session)(?:$|[_-])",
    re.I,
)
#: The attempt gives up this much before the engine's own per-attempt timeout, so that its error can say whether a
#: runner ever claimed the job (the engine's timeout would only say "timed out").
_TIMEOUT_MARGIN_S = 0.25


def job_id_of(run_id: str, node_id: str, attempt: int) -> str:
    """Stable for one attempt: a re-offered attempt is recognizably the same job."""
    return f"{run_id}:{node_id}:{attempt}"


def public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The node config as a runner receives it: values under secret-looking keys left out.

    Agent configs name their key (``api_key_env``, ``api_key_file``) rather than hold it, and those names are
    kept: the runner resolves them in its own environment. Anything else that looks like a credential (a key
    named ``token``, ``api_key``, ``password``..., or such a header) never leaves the daemon.
    """
    shown: dict[str, Any] = {}
    for name, value in config.items():
        if name in _SECRET_REFERENCES:
            shown[name] = value
        elif _SECRET_KEY.search(name):
            continue
        elif name == "headers" and isinstance(value, Mapping):
            shown[name] = {k: v for k, v in value.items() if not _SECRET_KEY.search(str(k))}
        else:
            shown[name] = value
    return shown


@dataclass(frozen=True, slots=True)
class AgentJob:
    """One attempt of one external agent node, as offered to runners."""

    #: ``<run_id>:<node_id>:<attempt>`` (:func:`job_id_of`).
    job_id: str
    run_id: str
    node_id: str
    attempt: int
    workspace: str
    #: The node's resolved ``in`` bindings.
    inputs: dict[str, Any]
    #: The node's config without secrets (:func:`public_config`).
    config: dict[str, Any]
    #: The run's current materialized workflow document.
    document: dict[str, Any]
    #: Queue-clock time at which the attempt gives up; None: no limit.
    deadline: float | None = None
    #: Version of ``document``: the base of a patch in the answer.
    version: str | None = None
    #: Node id -> status in the run when the job was offered (lets an LLM prompt say what is done).
    node_status: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job and the lease its runner holds on it."""

    job: AgentJob
    lease_id: str
    runner: str
    #: Queue-clock time at which the lease lapses unless renewed by a heartbeat.
    lease_deadline: float


@dataclass(frozen=True, slots=True)
class JobInfo:
    """A pending job as listed for people and runners (``GET /v1/agent-jobs``)."""

    job_id: str
    run_id: str
    node_id: str
    attempt: int
    state: Literal["offered", "leased"]
    #: The runner holding a live lease, or None.
    runner: str | None
    lease_expires_in_s: float | None
    deadline_in_s: float | None
    #: How many times the job was claimed (more than one: an earlier lease lapsed).
    claims: int


@dataclass(slots=True)
class _Entry:
    job: AgentJob
    future: asyncio.Future[AgentAnswer]
    runner: str | None = None
    lease_id: str | None = None
    lease_deadline: float = 0.0
    lease_s: float = 0.0
    claims: int = 0

    def leased(self, now: float) -> bool:
        return self.lease_id is not None and now < self.lease_deadline

    def claimable(self, now: float) -> bool:
        if self.future.done() or self.leased(now):
            return False
        return self.job.deadline is None or now < self.job.deadline


class AgentJobQueue:
    """In-memory agent job queue, per workspace (see the module docstring for the protocol).

    Args:
        clock: the time leases and deadlines are judged by (seconds, monotonic).
        lease_ids: makes lease ids; random by default, so a lease cannot be guessed by another runner.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        lease_ids: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.clock = clock
        self._lease_ids = lease_ids
        #: workspace -> job id -> entry, in offer order (the oldest claimable job is handed out first).
        self._jobs: dict[str, dict[str, _Entry]] = {}
        self._workspace_of: dict[str, str] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._closed = False

    # ------------------------------------------------------------------ the attempt's side

    def offer(self, job: AgentJob) -> asyncio.Future[AgentAnswer]:
        """Make ``job`` claimable; the future resolves with the accepted answer or error.

        Cancelling the future (or :meth:`cancel`) withdraws the job. Raises Conflict if the same attempt is
        already offered.
        """
        if job.job_id in self._workspace_of:
            raise Conflict(f"agent job {job.job_id} is already offered")
        future: asyncio.Future[AgentAnswer] = asyncio.get_running_loop().create_future()
        entry = _Entry(job, future)
        self._jobs.setdefault(job.workspace, {})[job.job_id] = entry
        self._workspace_of[job.job_id] = job.workspace
        # Whoever ends the future (a result, the attempt's timeout, a cancelled run), the job leaves the queue.
        future.add_done_callback(lambda _: self._remove(entry))
        self._wake(job.workspace)
        return future

    def cancel(self, job_id: str) -> bool:
        """Withdraw a job whose attempt was abandoned; True if it was pending."""
        entry = self._find(job_id)
        if entry is None:
            return False
        self._remove(entry)
        entry.future.cancel()
        return True

    def info(self, job_id: str) -> JobInfo | None:
        entry = self._find(job_id)
        return None if entry is None else self._info(entry, self.clock())

    # ------------------------------------------------------------------ the runner's side

    async def claim(self, workspace: str, runner: str, wait_s: float, lease_s: float) -> ClaimedJob | None:
        """The oldest claimable job of ``workspace``, leased to ``runner`` for ``lease_s``; None after ``wait_s``.

        A job is claimable when nobody holds a live lease on it. Racing claimers never share a job: taking it
        happens without an ``await`` in between.
        """
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, not {lease_s!r}")
        loop = asyncio.get_running_loop()
        give_up = loop.time() + max(0.0, wait_s)
        while True:
            if self._closed:
                raise Unavailable("the daemon is shutting down and hands out no more agent jobs; claim again later")
            now = self.clock()
            claimed = self._take(workspace, runner, lease_s, now)
            if claimed is not None:
                return claimed
            remaining = give_up - loop.time()
            if remaining <= 0:
                return None
            # Park until an offer wakes us, or the earliest lease of this workspace lapses, or the wait is over.
            expiry = min((e.lease_deadline for e in self._entries(workspace) if e.leased(now)), default=None)
            timeout = remaining if expiry is None else min(remaining, expiry - now)
            waiter: asyncio.Future[None] = loop.create_future()
            waiters = self._waiters.setdefault(workspace, set())
            waiters.add(waiter)
            try:
                await asyncio.wait((waiter,), timeout=timeout)
            finally:
                waiters.discard(waiter)
                if not waiters:
                    self._waiters.pop(workspace, None)
                waiter.cancel()

    def heartbeat(self, workspace: str, job_id: str, lease_id: str, lease_s: float | None = None) -> ClaimedJob:
        """Extend a live lease by ``lease_s`` from now (the claim's lease length when None).

        Raises:
            NotFound: no such pending job in ``workspace`` (answered, withdrawn, never offered).
            Conflict: the lease lapsed or another runner holds the job; the message names the holder.
        """
        now = self.clock()
        entry = self._held(workspace, job_id, lease_id, now)
        if lease_s is not None:
            if lease_s <= 0:
                raise ValueError(f"lease_s must be positive, not {lease_s!r}")
            entry.lease_s = lease_s
        entry.lease_deadline = now + entry.lease_s
        return self._claimed(entry)

    def complete(self, workspace: str, job_id: str, lease_id: str, result: AgentAnswer | BaseException) -> None:
        """Resolve the attempt with the runner's answer, or fail it with ``result`` (a NodeError, usually).

        Raises:
            NotFound: no such pending job in ``workspace`` (answered, withdrawn, never offered).
            Conflict: "lease expired or held by another runner": a late or foreign result is refused.
        """
        entry = self._held(workspace, job_id, lease_id, self.clock())
        self._remove(entry)
        if isinstance(result, BaseException):
            entry.future.set_exception(result)
        else:
            entry.future.set_result(result)

    def release(self, workspace: str, job_id: str, lease_id: str) -> None:
        """Give a lease back (a runner that cannot serve the job, a claim whose client left): claimable at once."""
        entry = self._held(workspace, job_id, lease_id, self.clock())
        entry.runner = entry.lease_id = None
        entry.lease_deadline = 0.0
        self._wake(workspace)

    def job(self, workspace: str, job_id: str) -> AgentJob:
        """The pending job ``job_id`` of ``workspace``; NotFound otherwise."""
        entry = self._jobs.get(workspace, {}).get(job_id)
        if entry is None or entry.future.done():
            raise _not_found(job_id)
        return entry.job

    def pending(self, workspace: str) -> list[JobInfo]:
        """The jobs of ``workspace`` waiting for a runner or held by one, oldest first."""
        now = self.clock()
        return [self._info(e, now) for e in self._entries(workspace) if not e.future.done()]

    def close(self) -> None:
        """Refuse claims from now on (Unavailable) and end the parked ones, so the HTTP server can stop at once.

        Leases already held stay valid: a runner that finishes its job before the daemon exits is still heard.
        """
        self._closed = True
        for workspace in list(self._waiters):
            self._wake(workspace)

    def __len__(self) -> int:
        return len(self._workspace_of)

    # ------------------------------------------------------------------ internals

    def _entries(self, workspace: str) -> list[_Entry]:
        return list(self._jobs.get(workspace, {}).values())

    def _find(self, job_id: str) -> _Entry | None:
        workspace = self._workspace_of.get(job_id)
        return None if workspace is None else self._jobs[workspace].get(job_id)

    def _take(self, workspace: str, runner: str, lease_s: float, now: float) -> ClaimedJob | None:
        for entry in self._jobs.get(workspace, {}).values():
            if entry.claimable(now):
                entry.runner = runner
                entry.lease_id = self._lease_ids()
                entry.lease_s = lease_s
                entry.lease_deadline = now + lease_s
                entry.claims += 1
                return self._claimed(entry)
        return None

    def _held(self, workspace: str, job_id: str, lease_id: str, now: float) -> _Entry:
        entry = self._jobs.get(workspace, {}).get(job_id)
        if entry is None or entry.future.done():
            raise _not_found(job_id)
        if entry.lease_id == lease_id and entry.leased(now):
            return entry
        if entry.leased(now):
            state = f"runner {entry.runner!r} holds it for another {entry.lease_deadline - now:.3g}s"
        elif entry.lease_id == lease_id:
            state = f"this lease lapsed {now - entry.lease_deadline:.3g}s ago and nobody holds the job now"
        else:
            state = "nobody holds it now"
        raise Conflict(
            f"lease expired or held by another runner: agent job {job_id}: {state}; claim it again to work on it",
            details=[
                {
                    "job_id": job_id,
                    "holder": entry.runner if entry.leased(now) else None,
                    "lease_expires_in_s": round(entry.lease_deadline - now, 3) if entry.leased(now) else None,
                }
            ],
        )

    def _claimed(self, entry: _Entry) -> ClaimedJob:
        assert entry.lease_id is not None and entry.runner is not None
        return ClaimedJob(entry.job, entry.lease_id, entry.runner, entry.lease_deadline)

    def _info(self, entry: _Entry, now: float) -> JobInfo:
        job = entry.job
        leased = entry.leased(now)
        return JobInfo(
            job_id=job.job_id,
            run_id=job.run_id,
            node_id=job.node_id,
            attempt=job.attempt,
            state="leased" if leased else "offered",
            runner=entry.runner if leased else None,
            lease_expires_in_s=round(entry.lease_deadline - now, 3) if leased else None,
            deadline_in_s=None if job.deadline is None else round(job.deadline - now, 3),
            claims=entry.claims,
        )

    def _remove(self, entry: _Entry) -> None:
        job = entry.job
        jobs = self._jobs.get(job.workspace)
        if jobs is not None and jobs.get(job.job_id) is entry:
            del jobs[job.job_id]
            del self._workspace_of[job.job_id]
            if not jobs:
                del self._jobs[job.workspace]

    def _wake(self, workspace: str) -> None:
        # Every parked claimer of the workspace retries; one wins, the others park again.
        for waiter in self._waiters.get(workspace, ()):
            if not waiter.done():
                waiter.set_result(None)


def _not_found(job_id: str) -> NotFound:
    return NotFound(
        f"no pending agent job {job_id!r} in this workspace: it was answered, its attempt gave up "
        "(timeout, cancelled run), or it never existed"
    )


async def execute_external(node: Node, inputs: dict[str, Any], ctx: NodeContext, queue: AgentJobQueue) -> AgentAnswer:
    """Run one agent attempt on an external runner: offer the job and wait for its accepted result.

    The wait ends a little before ``ctx.timeout_s`` with a retryable ``agent_timeout`` saying whether a runner
    ever claimed the job; whatever ends the attempt (timeout, cancellation) withdraws the job, so a runner's
    later result is refused. ``ctx.services`` supplies ``document`` (the materialized workflow), ``version`` and
    ``node_status``.
    """
    job = AgentJob(
        job_id=job_id_of(ctx.run_id, ctx.node_id, ctx.attempt),
        run_id=ctx.run_id,
        node_id=ctx.node_id,
        attempt=ctx.attempt,
        workspace=ctx.workspace,
        inputs=inputs,
        config=public_config(node.config),
        document=ctx.services.get("document") or {},
        deadline=queue.clock() + ctx.timeout_s if ctx.timeout_s > 0 else None,
        version=ctx.services.get("version"),
        node_status=ctx.services.get("node_status"),
    )
    budget = ctx.timeout_s - min(_TIMEOUT_MARGIN_S, ctx.timeout_s * 0.05) if ctx.timeout_s > 0 else None
    future = queue.offer(job)
    try:
        async with asyncio.timeout(budget):
            # Shielded so that a timeout leaves the job in place long enough to say who held it; the finally
            # clause withdraws it whatever happened.
            return await asyncio.shield(future)
    except TimeoutError:
        info = queue.info(job.job_id)
        if info is None or info.claims == 0:
            why = f"no runner claimed it (is a runner polling workspace {ctx.workspace!r}?)"
        elif info.runner is not None:
            why = f"runner {info.runner!r} holds it but has not answered"
        else:
            why = f"it was claimed {info.claims} time(s) but every lease lapsed without an answer"
        raise NodeError(
            f"agent {ctx.node_id!r}: external job {job.job_id} got no result within {ctx.timeout_s:g}s: {why}",
            code="agent_timeout",
            retryable=True,
        ) from None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # The job was withdrawn by someone else (queue.cancel) while this attempt still runs: fail it, do not hang.
        raise NodeError(
            f"agent {ctx.node_id!r}: external job {job.job_id} was withdrawn", code="agent_withdrawn", retryable=True
        ) from None
    finally:
        queue.cancel(job.job_id)
