"""An executor whose attempts run elsewhere: each call becomes a :class:`NodeJob` on a transport, and the call
returns when the matching :class:`NodeOutcome` is delivered back.

The driver keeps enforcing the attempt's timeout around the call; a job whose outcome never comes back (its
runner died, the broker lost it before acknowledging) times out like any slow attempt and is retried under the
node's retry policy. Outcomes nobody waits for any more (a timed-out attempt, or a run that moved to another
owner) are dropped: the attempt that counts is recorded by whoever drives the run now.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from aobd.errors import NodeError
from aobd.model.workflow import Node
from aobd.nodes.base import NodeContext

from .wire import NodeJob, NodeOutcome


class JobTransport(Protocol):
    async def submit(self, job: NodeJob) -> None:
        """Hand the job to a runner (or to a durable queue that will); raise if it could not be handed off."""


class SyncJobTransport(JobTransport, Protocol):
    def submit_nowait(self, job: NodeJob) -> None:
        """:meth:`submit` for a transport that hands a job off without waiting (the runner plane's zmq)."""


class Documents(Protocol):
    def publish(self, version: str, document: dict[str, Any]) -> bool:
        """Make ``document`` readable by ``version`` in every process (idempotent: content-addressed)."""


class RemoteExecutor:
    """With ``documents`` (the runner plane's shared memory), a job names its node by the run's document
    version instead of carrying it: the document is published once per version, and every runner reads nodes
    from there. Without (Kafka between machines), the node travels in the job."""

    def __init__(
        self,
        transport: JobTransport,
        *,
        origin: str,
        clock: Callable[[], float] = time.time,
        documents: Documents | None = None,
    ) -> None:
        self.transport = transport
        self.origin = origin
        self.clock = clock
        self.documents = documents
        self._published: OrderedDict[str, None] = OrderedDict()
        self._pending: dict[str, asyncio.Future[NodeOutcome]] = {}
        self._callbacks: dict[str, Callable[[NodeOutcome], object]] = {}
        self.submitted = 0
        self.dropped = 0

    async def __call__(self, node: Node, inputs: dict[str, Any], ctx: NodeContext) -> Any:
        job = self._job(node, inputs, ctx)
        future: asyncio.Future[NodeOutcome] = asyncio.get_running_loop().create_future()
        self._pending[job.job_id] = future
        try:
            await self.transport.submit(job)
            self.submitted += 1
            outcome = await future
        finally:
            self._pending.pop(job.job_id, None)
        return result_of(outcome)

    @property
    def can_dispatch(self) -> bool:
        """Whether :meth:`dispatch` works: the transport takes jobs without waiting."""
        return callable(getattr(self.transport, "submit_nowait", None))

    def dispatch(
        self, node: Node, inputs: dict[str, Any], ctx: NodeContext, done: Callable[[NodeOutcome], object]
    ) -> str | None:
        """Send the attempt and return at once: :meth:`deliver` calls ``done(outcome)`` when it comes back, unless
        :meth:`forget` came first. Returns the job id, or None when the transport cannot take a job without waiting
        (then call the executor instead). No task, future or timeout per attempt: the caller keeps the deadline
        (``Engine._dispatch``)."""
        submit = getattr(self.transport, "submit_nowait", None)
        if submit is None:
            return None
        job = self._job(node, inputs, ctx)
        self._callbacks[job.job_id] = done
        try:
            submit(job)
        except BaseException:
            self._callbacks.pop(job.job_id, None)
            raise
        self.submitted += 1
        return job.job_id

    def forget(self, job_id: str) -> None:
        """Nobody waits for this job any more (its attempt timed out, its run was cancelled or released): an
        outcome arriving later is dropped."""
        self._callbacks.pop(job_id, None)

    def _job(self, node: Node, inputs: dict[str, Any], ctx: NodeContext) -> NodeJob:
        version = self._shared_version(node, ctx)
        return NodeJob(
            job_id=os.urandom(16).hex(),  # as unique as uuid4, at a fifth of its cost
            run_id=ctx.run_id,
            node_id=ctx.node_id,
            attempt=ctx.attempt,
            node=None if version else node,
            inputs=inputs,
            timeout_s=ctx.timeout_s,
            deadline=self.clock() + ctx.timeout_s,
            workspace=ctx.workspace,
            priority=ctx.priority,  # type: ignore[arg-type]
            origin=self.origin,
            idempotency_key=ctx.idempotency_key,
            version=version,
        )

    def _shared_version(self, node: Node, ctx: NodeContext) -> str:
        """The version a runner can read this node from, publishing it first if needed; "" to send it inline
        (no shared memory, a node that is not in the document such as a map's item, or publishing failed)."""
        version: str = ctx.services.get("version", "")
        document = ctx.services.get("document")
        if self.documents is None or not version or document is None or node.id != ctx.node_id:
            return ""
        if version in self._published:
            self._published.move_to_end(version)
            return version
        try:
            self.documents.publish(version, document)
        except OSError:
            return ""  # /dev/shm full or unavailable: the job carries its node, as over Kafka
        self._published[version] = None
        if len(self._published) > 4096:
            self._published.popitem(last=False)
        return version

    def deliver(self, outcome: NodeOutcome) -> bool:
        """Resolve the call waiting for ``outcome``; False when nobody waits for it any more."""
        done = self._callbacks.pop(outcome.job_id, None)
        if done is not None:
            done(outcome)
            return True
        future = self._pending.get(outcome.job_id)
        if future is None or future.done():
            self.dropped += 1
            return False
        future.set_result(outcome)
        return True

    def pending(self) -> int:
        return len(self._pending) + len(self._callbacks)


def result_of(outcome: NodeOutcome) -> Any:
    """The attempt's output, or the NodeError its runner reported."""
    if outcome.ok:
        return outcome.output
    error = outcome.error or {}
    raise NodeError(
        str(error.get("message", "the runner reported a failure without a message")),
        code=str(error.get("code", "node_error")),
        retryable=outcome.retryable,
        traceback=error.get("traceback"),
    )
