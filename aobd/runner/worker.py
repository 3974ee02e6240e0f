"""The runner side: execute one :class:`NodeJob` with this process's executors and configuration.

Shared by the runner plane (jobs over zmq) and by cluster runners (jobs from Kafka's ``node.jobs.*``). A runner
applies its *own* handler and HTTP allow-lists, never ones carried by the job.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import traceback
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec

from aobd.errors import NodeError
from aobd.model.workflow import Node
from aobd.nodes.base import NodeContext
from aobd.nodes.function import execute_function, inline_call
from aobd.nodes.registry import Executor

from .wire import REMOTE_TYPES, NodeJob, NodeOutcome


def failure_of(exc: BaseException, node_id: str, attempt: int, timeout_s: float) -> tuple[dict[str, Any], bool]:
    """How a failed attempt is recorded: the error object and whether another attempt may help.

    A handler that raised something other than NodeError is a bug in the handler, recorded as a retryable
    ``handler_error`` carrying its innermost frames, never a crash of the engine or the runner.
    """
    if isinstance(exc, TimeoutError):
        message = f"node {node_id!r} attempt {attempt} timed out after {timeout_s:g}s"
        return {"code": "timeout", "message": message}, True
    if isinstance(exc, NodeError):
        error: dict[str, Any] = {"code": exc.code, "message": exc.message}
        if exc.traceback:
            error["traceback"] = exc.traceback
        return error, exc.retryable
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3)
    return {"code": "handler_error", "message": f"{type(exc).__name__}: {exc}", "traceback": "".join(tb)[-2000:]}, True


class Runner:
    """Executes jobs of the :data:`REMOTE_TYPES`; owns the HTTP client its http nodes share."""

    def __init__(
        self,
        runner_id: str,
        *,
        handler_modules: list[str] | None,
        http_allow: list[str] | None = None,
        clock: Callable[[], float] = time.time,
        documents: Any = None,
    ) -> None:
        self.runner_id = runner_id
        #: Where jobs naming a document version find their node (aobd.planes.shm_ir.SharedDocuments).
        self.documents = documents
        self._nodes: OrderedDict[tuple[str, str], Node] = OrderedDict()
        self.handler_modules = handler_modules
        self.http_allow = list(http_allow or [])
        self.clock = clock
        self.executed = 0
        self.expired = 0
        self._http: Any = None
        self._executors: dict[str, Executor] = {"function": execute_function, "http": self._run_http}

    async def run(self, job: NodeJob) -> NodeOutcome:
        if job.deadline < self.clock():
            # The orchestrator timed this attempt out already and retries it under the node's policy; running
            # it now would only repeat a side effect nobody waits for.
            self.expired += 1
            message = "the job reached a runner after its deadline"
            return self._outcome(job, error={"code": "expired", "message": message})
        node = job.node if job.node is not None else self._shared_node(job.version, job.node_id)
        if node is None:
            message = f"node {job.node_id!r} of version {job.version!r} is not in shared memory"
            return self._outcome(job, error={"code": "ir_missing", "message": message})
        executor = self._executors.get(node.type) if node.type in REMOTE_TYPES else None
        if executor is None:
            message = f"node type {node.type!r} does not run on a runner"
            return self._outcome(job, error={"code": "no_executor", "message": message}, retryable=False)
        ctx = self._context(job)
        self.executed += 1
        try:
            async with asyncio.timeout(max(0.0, job.deadline - self.clock())):
                output = await executor(node, job.inputs, ctx)
        except Exception as exc:
            error, retryable = failure_of(exc, job.node_id, job.attempt, job.timeout_s)
            return self._outcome(job, error=error, retryable=retryable)
        return self._success(job, output)

    def run_now(self, job: NodeJob) -> NodeOutcome | Coroutine[Any, Any, NodeOutcome]:
        """The job's outcome at once when its handler cannot await (a sync function handler not marked
        ``blocking``, ``builtin:noop``, ``builtin:echo``: :func:`~aobd.nodes.function.inline_call`); otherwise the
        coroutine that runs it (:meth:`run`), for the caller to schedule.

        The same semantics as :meth:`run`, minus a task and a timeout per attempt: :meth:`run` also calls such a
        handler on the event loop, where a timeout cannot interrupt it.
        """
        if job.deadline < self.clock():
            return self.run(job)  # reports the expiry
        node = job.node if job.node is not None else self._shared_node(job.version, job.node_id)
        call = inline_call(node, self.handler_modules) if node is not None and node.type == "function" else None
        if call is None:
            return self.run(job)
        self.executed += 1
        try:
            output = call(job.inputs, self._context(job))
        except Exception as exc:
            error, retryable = failure_of(exc, job.node_id, job.attempt, job.timeout_s)
            return self._outcome(job, error=error, retryable=retryable)
        if inspect.isawaitable(output):
            return self._settle(job, output)
        return self._success(job, output)

    async def _settle(self, job: NodeJob, pending: Awaitable[Any]) -> NodeOutcome:
        """A sync handler that returned an awaitable after all: awaited under the job's deadline, as :meth:`run`."""
        try:
            async with asyncio.timeout(max(0.0, job.deadline - self.clock())):
                output = await pending
        except Exception as exc:
            error, retryable = failure_of(exc, job.node_id, job.attempt, job.timeout_s)
            return self._outcome(job, error=error, retryable=retryable)
        return self._success(job, output)

    def _context(self, job: NodeJob) -> NodeContext:
        return NodeContext(
            run_id=job.run_id,
            node_id=job.node_id,
            attempt=job.attempt,
            idempotency_key=job.idempotency_key or f"{job.run_id}:{job.node_id}",
            timeout_s=job.timeout_s,
            workspace=job.workspace,
            priority=job.priority,
            services={"handler_modules": self.handler_modules, "http_allow": self.http_allow},
        )

    def _success(self, job: NodeJob, output: Any) -> NodeOutcome:
        return NodeOutcome(
            job.job_id, job.run_id, job.node_id, job.attempt, True, output, runner=self.runner_id, origin=job.origin
        )

    def _shared_node(self, version: str, node_id: str) -> Node | None:
        """The node from the published document, decoded once per (version, node) in this process."""
        key = (version, node_id)
        node = self._nodes.get(key)
        if node is None and self.documents is not None:
            raw = self.documents.node(version, node_id)
            if raw is None:
                return None
            node = self._nodes[key] = msgspec.convert(raw, Node)
            if len(self._nodes) > 16_384:
                self._nodes.popitem(last=False)
        return node

    def _outcome(self, job: NodeJob, *, error: dict[str, Any], retryable: bool = True) -> NodeOutcome:
        return NodeOutcome(
            job.job_id,
            job.run_id,
            job.node_id,
            job.attempt,
            False,
            error=error,
            retryable=retryable,
            runner=self.runner_id,
            origin=job.origin,
        )

    async def _run_http(self, node: Any, inputs: dict[str, Any], ctx: NodeContext) -> Any:
        from aobd.nodes.http import HttpNodeClient, execute_http

        if self._http is None:
            self._http = HttpNodeClient(allow=self.http_allow)
        return await execute_http(node.config, inputs, ctx, self._http)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self.documents is not None:
            self.documents.close()
