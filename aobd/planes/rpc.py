"""The Service over zmq: accept workers call the orchestrator that owns a run as if it were in process.

An orchestrator runs :class:`RpcServer` (a ROUTER at :func:`aobd.planes.paths.orchestrator_rpc`); an accept
worker holds one :class:`ServiceProxy`, which has the Service's method names and signatures and picks the
orchestrator per call. A frame is one msgpack array: ``[id, method, args, kwargs]`` in, ``[id, ok, value]`` out.
Arguments travel as plain msgpack and are converted back with the Service method's own annotations (so
:class:`~aobd.daemon.service.Caller` and the request Structs need no parallel wire types). Errors travel as
the project's tree: an :class:`~aobd.errors.AobdError` is re-raised on the client as the same class with the same
code, message, details and attributes, so the Api maps it to the same HTTP status as in a single process.

Routing (why each call goes where it goes):

- a call naming a run (or a patch, whose id starts with its run id) goes to ``shard_of(run_id)``, the only
  process driving that run: commands must reach its live machine, and reads get it instead of a log rebuild;
- ``start_run`` and ``replay`` mint the new run's id here and go to that id's shard, which then drives it;
- approvals live in each orchestrator's memory, so ``list_approvals`` asks all of them and concatenates, and
  ``decide_approval`` (tickets do not name their run) asks all of them: only the owner does not answer NotFound;
- everything else (workflows, blobs, run listings) reads the shared stores, which every orchestrator sees
  whole: asking one (chosen by workspace, to spread the load) is enough, and merging answers from all of them
  would only return every row N times;
- agent jobs (:class:`RemoteAgentJobs`) sit in the queue of their run's orchestrator and their ids start with
  the run id; a claim asks every orchestrator at once and takes the first job leased.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import structlog
import zmq

from aobd import errors
from aobd.agents.jobs import AgentJobQueue
from aobd.api import schemas as s
from aobd.api.agent_routes import (
    AgentJobAccepted,
    AgentJobInfo,
    AgentJobLease,
    AgentJobOut,
    AgentJobResult,
    LocalAgentJobs,
)
from aobd.config import Config, masked, orchestrator_count
from aobd.daemon.service import Caller, Service
from aobd.engine.driver import new_run_id as mint_run_id
from aobd.errors import AobdError, NotFound, Unavailable
from aobd.planes import paths
from aobd.planes.zloop import LoopSocket
from aobd.store.protocols import EventLog

__all__ = ["METHODS", "RemoteAgentJobs", "RemoteError", "RpcServer", "ServiceProxy"]

log = structlog.get_logger("aobd.planes.rpc")

#: The Service methods an accept worker may call: what ``aobd.api`` uses, nothing else (the server refuses the
#: rest, so a compromised or buggy accept worker cannot reach drain/close or private helpers).
METHODS = frozenset(
    {
        "put_workflow",
        "list_workflows",
        "get_workflow",
        "start_run",
        "replay",
        "get_run",
        "list_runs",
        "check_run",
        "events",
        "cancel",
        "propose_patch",
        "list_patches",
        "get_patch",
        "decide_patch",
        "list_approvals",
        "decide_approval",
        "get_blob",
        "status",
        "metrics_exposition",
    }
)

#: The agent job channel's operations (:class:`aobd.api.agent_routes.AgentJobs`), served as ``agent_jobs.<name>``.
AGENT_JOB_METHODS = ("claim", "release", "heartbeat", "complete", "pending")

#: Seconds a call may wait for its orchestrator before it fails with Unavailable (plus ``wait_s`` for a start).
DEFAULT_TIMEOUT_S = 10.0

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class RemoteError(RuntimeError):
    """An orchestrator failed with something other than an AobdError (a bug): the Api answers 500."""


class _WireError(msgspec.Struct, array_like=True):
    type: str
    code: str
    message: str
    details: list[Any]
    #: Instance attributes beyond message/details (RateLimited.retry_after_s, NodeError.retryable...).
    attrs: dict[str, Any]


def _error_to_wire(exc: BaseException) -> _WireError:
    if not isinstance(exc, AobdError):
        return _WireError("", "internal", f"{type(exc).__name__}: {exc}", [], {})
    # The nearest class of aobd.errors: a subclass defined elsewhere is rebuilt as its public ancestor.
    cls = next(c for c in type(exc).__mro__ if getattr(errors, c.__name__, None) is c)
    attrs = {
        k: v
        for k, v in vars(exc).items()
        if k not in ("message", "details") and (v is None or isinstance(v, str | int | float | bool))
    }
    return _WireError(cls.__name__, exc.code, exc.message, exc.details, attrs)


def _error_from_wire(wire: _WireError) -> Exception:
    cls = getattr(errors, wire.type, None) if wire.type else None
    if not (isinstance(cls, type) and issubclass(cls, AobdError)):
        return RemoteError(wire.message)
    # Some subclasses take other constructor arguments (RateLimited, PatchError): build without __init__ and set
    # exactly the state the server's instance had.
    exc = cls.__new__(cls)
    Exception.__init__(exc, wire.message)
    exc.message = wire.message
    exc.details = wire.details
    for key, value in wire.attrs.items():
        setattr(exc, key, value)
    if exc.code != wire.code:
        exc.code = wire.code  # NodeError carries a per-instance code
    return exc


# ---------------------------------------------------------------------------------------------- server


class _Method:
    """One allowed method of the served object, with the types to convert its wire arguments to.

    The arguments are named from the signature once, here, and converted in one ``msgspec.convert`` into a Struct
    built from the annotations: per call that is a zip and one C call, where ``Signature.bind`` and a conversion per
    argument cost about 8 us of an orchestrator's CPU on every run start.
    """

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.name = function.__name__
        parameters = inspect.signature(function).parameters
        hints = typing.get_type_hints(function)
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.positional = tuple(name for name, p in parameters.items() if p.kind in positional)
        fields: list[tuple[str, Any] | tuple[str, Any, Any]] = [
            (name, hints.get(name, Any)) if p.default is p.empty else (name, hints.get(name, Any), p.default)
            for name, p in parameters.items()
        ]
        self.arguments = msgspec.defstruct(f"{self.name}_arguments", fields, kw_only=True, forbid_unknown_fields=True)

    async def __call__(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if len(args) > len(self.positional):
            raise RemoteError(f"bad arguments for {self.name}: {len(args)} positional, at most {len(self.positional)}")
        values = dict(zip(self.positional, args, strict=False))
        if not values.keys().isdisjoint(kwargs):
            raise RemoteError(f"bad arguments for {self.name}: {sorted(values.keys() & kwargs)} given twice")
        values.update(kwargs)
        try:
            arguments = msgspec.convert(values, self.arguments)
        except msgspec.ValidationError as exc:
            raise RemoteError(f"bad arguments for {self.name}: {exc}") from None
        result = self.function(**msgspec.structs.asdict(arguments))
        return await result if inspect.isawaitable(result) else result


class RpcServer:
    """Serves ``service``'s allowed methods at ``endpoint`` (a zmq ROUTER) until :meth:`close`.

    Every request runs in its own task, so a slow call (``start_run`` with ``wait_s``) holds up nobody else.

    Args:
        service: The orchestrator's :class:`~aobd.daemon.service.Service` (or anything with those methods).
        endpoint: Where to bind, normally ``paths.orchestrator_rpc(config, index)``.
        context: The zmq context to use; a new one by default.
    """

    def __init__(self, service: Any, endpoint: str, *, context: zmq.Context[Any] | None = None) -> None:
        self.endpoint = endpoint
        self._methods = {name: _Method(getattr(service, name)) for name in METHODS if hasattr(service, name)}
        queue = getattr(service, "agent_jobs", None)
        if isinstance(queue, AgentJobQueue):
            jobs = LocalAgentJobs(queue)
            self._methods.update({f"agent_jobs.{name}": _Method(getattr(jobs, name)) for name in AGENT_JOB_METHODS})
        self._context: zmq.Context[Any] = context or zmq.Context()
        self._own_context = context is None
        self._socket: LoopSocket | None = None
        self._calls: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.endpoint.startswith("ipc://"):
            Path(self.endpoint[len("ipc://") :]).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(self.endpoint)
        self._socket = LoopSocket(socket, self._receive)

    async def close(self) -> None:
        """Stop answering; calls in flight are cancelled (their clients time out with Unavailable)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        tasks = list(self._calls)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_context:
            self._context.term()

    def _receive(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return  # not one of our DEALERs: nothing sensible to answer
        task = asyncio.get_running_loop().create_task(self._answer(frames[0], frames[1]))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _answer(self, peer: bytes, payload: bytes) -> None:
        call_id = -1
        try:
            call_id, name, args, kwargs = _decoder.decode(payload)
            method = self._methods.get(name)
            if method is None:
                raise RemoteError(f"method {name!r} is not served over RPC")
            reply = _encoder.encode((call_id, True, await method(args, kwargs)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, AobdError):
                log.exception("rpc call failed", endpoint=self.endpoint)
            reply = _encoder.encode((call_id, False, _error_to_wire(exc)))
        if self._socket is not None:  # closed under us: the client times out
            self._socket.send([peer, reply])


# ---------------------------------------------------------------------------------------------- client


class _CallTimedOut(Exception):
    """A call's reply did not come in time (set on its future by the call's timer)."""


def _time_out(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(_CallTimedOut())


class _Channel:
    """A DEALER to one orchestrator: many calls in flight, matched to their replies by id."""

    def __init__(self, context: zmq.Context[Any], endpoint: str) -> None:
        self.endpoint = endpoint
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        # Queue only to a live connection: a request must not sit in a buffer and run minutes later on an
        # orchestrator that restarted, long after its caller was told 503 (a request zmq did not take yet is
        # withdrawn when its call times out).
        socket.setsockopt(zmq.IMMEDIATE, 1)
        socket.connect(endpoint)
        self._socket = LoopSocket(socket, self._read)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout_s: float) -> Any:
        if self._socket.closed:
            raise Unavailable("the accept worker is shutting down")
        call_id = next(self._ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending[call_id] = future
        request = [_encoder.encode((call_id, method, args, kwargs))]
        # A timer on the reply's future, not asyncio.timeout: its context manager is interpreted code, per call.
        timer = loop.call_later(timeout_s, _time_out, future)
        try:
            self._socket.send(request)
            return await future
        except _CallTimedOut:
            raise Unavailable(
                f"the orchestrator at {self.endpoint} did not answer {method} within {timeout_s:g} s",
                details=[{"endpoint": self.endpoint, "method": method}],
            ) from None
        finally:
            timer.cancel()
            self._pending.pop(call_id, None)
            if not future.done() or future.cancelled() or isinstance(future.exception(), _CallTimedOut):
                # No reply: the request may still be queued (no orchestrator connected), and must not go later.
                # A timeout or a cancelled caller has settled the future by now, so "not done" alone misses them.
                self._socket.discard(request)

    def _read(self, frames: list[bytes]) -> None:
        try:
            call_id, ok, value = _decoder.decode(frames[-1])
        except (msgspec.DecodeError, ValueError):
            log.warning("undecodable rpc reply", endpoint=self.endpoint)
            return
        future = self._pending.get(call_id)
        if future is None or future.done():
            return  # its caller timed out already
        if ok:
            future.set_result(value)
        else:
            future.set_exception(_error_from_wire(msgspec.convert(value, _WireError)))

    async def close(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(Unavailable("the accept worker is shutting down"))
        self._socket.close()


class ServiceProxy:
    """The Service of an accept worker: the same methods, each forwarded to the right orchestrator.

    Also carries what the Api reads besides methods: ``config``, ``ready``, ``draining``, ``log`` (the event
    log live streams replay from, opened by the accept worker) and ``agent_jobs`` (:class:`RemoteAgentJobs`,
    the orchestrators' agent job queues). ``status`` is a coroutine here (the Api awaits it when it is one).

    Args:
        config: The daemon's config (``orchestrator_count(config)`` and the socket paths).
        log: The event log, read-only use: streams replay history from it.
        endpoints: Overrides the orchestrators' RPC endpoints (tests); default from :mod:`aobd.planes.paths`.
        timeout_s: Per-call limit before Unavailable.
    """

    def __init__(
        self,
        config: Config,
        *,
        log: EventLog | None = None,
        endpoints: list[str] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.agent_jobs = RemoteAgentJobs(self)
        self.ready = False
        #: Whether the orchestrators and a runner are up (set by the accept worker from the health table).
        self.planes_ready: Callable[[], bool] | None = None
        self.draining = False
        self.timeout_s = timeout_s
        count = orchestrator_count(config)
        self.endpoints = endpoints or [paths.orchestrator_rpc(config, i) for i in range(count)]
        self._context: zmq.Context[Any] = context or zmq.Context()
        self._own_context = context is None
        self._channels: list[_Channel] = []

    async def start(self) -> None:
        """Connect to every orchestrator (zmq connects in the background: a missing one fails calls, not this)."""
        self._channels = [_Channel(self._context, e) for e in self.endpoints]
        self.ready = True

    async def close(self) -> None:
        await self.agent_jobs.close()
        await asyncio.gather(*(c.close() for c in self._channels))
        self._channels = []
        if self._own_context:
            self._context.term()

    # ------------------------------------------------------------------ routing

    def shard(self, run_id: str) -> int:
        return paths.shard_of(run_id, len(self.endpoints))

    async def _call(self, index: int, method: str, /, *args: Any, timeout_s: float = 0.0, **kwargs: Any) -> Any:
        if not self._channels:
            raise Unavailable("the accept worker is not connected to the orchestrators")
        return await self._channels[index].call(method, args, kwargs, timeout_s or self.timeout_s)

    async def _on_run(self, run_id: str, method: str, /, *args: Any, **kwargs: Any) -> Any:
        return await self._call(self.shard(run_id), method, *args, **kwargs)

    async def _any(self, caller: Caller, method: str, /, *args: Any) -> Any:
        return await self._call(paths.shard_of(caller.workspace, len(self.endpoints)), method, *args)

    async def _all(self, method: str, *args: Any) -> list[Any | BaseException]:
        return await asyncio.gather(
            *(self._call(i, method, *args) for i in range(len(self.endpoints))), return_exceptions=True
        )

    # ------------------------------------------------------------------ workflows

    async def put_workflow(self, caller: Caller, body: s.WorkflowPut) -> s.WorkflowRef:
        return msgspec.convert(await self._any(caller, "put_workflow", caller, body), s.WorkflowRef)

    async def list_workflows(self, caller: Caller) -> list[s.WorkflowInfo]:
        return msgspec.convert(await self._any(caller, "list_workflows", caller), list[s.WorkflowInfo])

    async def get_workflow(self, caller: Caller, name: str, tag: str | None = None) -> s.WorkflowInfo:
        return msgspec.convert(await self._any(caller, "get_workflow", caller, name, tag), s.WorkflowInfo)

    # ------------------------------------------------------------------ runs

    async def start_run(
        self, caller: Caller, body: s.RunStart, *, wait_s: float = 0.0, run_id: str | None = None
    ) -> dict[str, Any]:
        if run_id is None:
            # A retried start (same idempotency key) must reach the orchestrator the first attempt reached: only
            # it can tell whether that attempt recorded its run, and record it under the same id if it did not.
            key = body.idempotency_key
            target = paths.shard_of(f"{caller.workspace}\0{key}", len(self.endpoints)) if key else None
            run_id = mint_run_id()
            while target is not None and self.shard(run_id) != target:
                run_id = mint_run_id()  # ids are random: about n tries for n orchestrators
        result: dict[str, Any] = await self._on_run(
            run_id,
            "start_run",
            caller,
            body,
            wait_s=wait_s,
            run_id=run_id,
            # The run may wait for its place first: the orchestrator refuses it (503) after start_wait_s.
            timeout_s=self.timeout_s + self.config.engine.start_wait_s + wait_s,
        )
        return result

    async def replay(
        self, caller: Caller, run_id: str, from_node: str, mode: str, *, new_run_id: str | None = None
    ) -> dict[str, Any]:
        # Sent to the shard of the *new* id, which must drive the copy; it reads the source run's history from the
        # shared log (Engine.load rebuilds a run this process does not drive), so the source's shard is not needed.
        new_id = new_run_id or mint_run_id()
        result = await self._on_run(new_id, "replay", caller, run_id, from_node, mode, new_run_id=new_id)
        return dict(result)

    async def get_run(self, caller: Caller, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._on_run(run_id, "get_run", caller, run_id)
        return result

    async def list_runs(self, caller: Caller, status: str | None, limit: int) -> list[s.RunInfoOut]:
        return msgspec.convert(await self._any(caller, "list_runs", caller, status, limit), list[s.RunInfoOut])

    async def check_run(self, caller: Caller, run_id: str) -> None:
        await self._on_run(run_id, "check_run", caller, run_id)

    async def events(self, caller: Caller, run_id: str, after_seq: int = 0) -> list[Any]:
        result: list[Any] = await self._on_run(run_id, "events", caller, run_id, after_seq)
        return result

    async def cancel(self, caller: Caller, run_id: str, reason: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._on_run(run_id, "cancel", caller, run_id, reason)
        return result

    # ------------------------------------------------------------------ patches

    async def propose_patch(self, caller: Caller, run_id: str, body: s.PatchPost) -> s.PatchInfo:
        return msgspec.convert(await self._on_run(run_id, "propose_patch", caller, run_id, body), s.PatchInfo)

    async def list_patches(self, caller: Caller, run_id: str) -> list[s.PatchInfo]:
        return msgspec.convert(await self._on_run(run_id, "list_patches", caller, run_id), list[s.PatchInfo])

    run_of_patch = staticmethod(Service.run_of_patch)

    async def get_patch(self, caller: Caller, patch_id: str) -> s.PatchInfo:
        run_id = self.run_of_patch(patch_id)
        return msgspec.convert(await self._on_run(run_id, "get_patch", caller, patch_id), s.PatchInfo)

    async def decide_patch(self, caller: Caller, patch_id: str, action: str, reason: str) -> s.PatchInfo:
        run_id = self.run_of_patch(patch_id)
        result = await self._on_run(run_id, "decide_patch", caller, patch_id, action, reason)
        return msgspec.convert(result, s.PatchInfo)

    # ------------------------------------------------------------------ approvals

    async def list_approvals(self, caller: Caller, status: str | None) -> list[s.ApprovalInfo]:
        found: list[s.ApprovalInfo] = []
        for answer in await self._all("list_approvals", caller, status):
            if isinstance(answer, BaseException):
                raise answer  # a partial list would look complete: better a 503
            found.extend(msgspec.convert(answer, list[s.ApprovalInfo]))
        return found

    async def decide_approval(self, caller: Caller, ticket: str, body: s.ApprovalDecision) -> s.ApprovalInfo:
        answers = await self._all("decide_approval", caller, ticket, body)
        for answer in answers:
            if not isinstance(answer, BaseException):
                return msgspec.convert(answer, s.ApprovalInfo)
        # Only the owner knows the ticket: its error (Conflict...) beats the others' NotFound.
        errors_ = [a for a in answers if isinstance(a, BaseException)]
        raise next((e for e in errors_ if not isinstance(e, NotFound)), errors_[0])

    # ------------------------------------------------------------------ CAS and admin

    async def get_blob(self, caller: Caller, ref: str) -> bytes:
        result: bytes = await self._any(caller, "get_blob", caller, ref)
        return result

    async def status(self, listen: str) -> s.Status:
        """The daemon's status as orchestrator 0 reports it (its ``planes`` holds the supervisor's health table),
        with ``runs_active`` summed over every orchestrator and this accept worker's pid under ``planes.accept``."""
        answers = await self._all("status", listen)
        first = answers[0]
        if isinstance(first, BaseException):
            raise first
        status = msgspec.convert(first, s.Status)
        status.runs_active = sum(a["runs_active"] for a in answers if not isinstance(a, BaseException))
        status.draining = status.draining or self.draining
        status.planes = {**status.planes, "accept": {"pid": os.getpid(), "orchestrators": len(self.endpoints)}}
        return status

    async def metrics_exposition(self, accept: str | None = None) -> tuple[bytes, str] | None:
        """The daemon's metrics, merged by orchestrator 0 from every process's last heartbeat (at most a beat old)
        and rendered in the format ``accept`` asks for: (body, content type)."""
        result = await self._call(0, "metrics_exposition", accept)
        return msgspec.convert(result, tuple[bytes, str] | None)  # msgpack hands the pair back as a list

    def config_view(self) -> dict[str, Any]:
        return masked(self.config)


class RemoteAgentJobs:
    """The orchestrators' agent job queues as one (:class:`aobd.api.agent_routes.AgentJobs`), for the agent routes
    of an accept worker. A job lives in the queue of the orchestrator driving its run, and its id starts with the
    run id (``<run_id>:<node_id>:<attempt>``), so everything but claims and listings goes to one shard."""

    def __init__(self, proxy: ServiceProxy) -> None:
        self._proxy = proxy
        self._late: set[asyncio.Task[None]] = set()
        self._losers: set[asyncio.Future[Any]] = set()

    async def close(self) -> None:
        # The losing claims too: a release task cancelled before it started would leave them unawaited.
        waiting = [*self._late, *self._losers]
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)

    def _shard(self, job_id: str) -> int:
        return self._proxy.shard(job_id.partition(":")[0])

    async def claim(self, workspace: str, runner: str, wait_s: float, lease_s: float) -> AgentJobOut | None:
        """The first job any orchestrator leases within ``wait_s``: every one of them is asked at once."""
        timeout_s = self._proxy.timeout_s + wait_s
        calls = {
            asyncio.ensure_future(
                self._proxy._call(i, "agent_jobs.claim", workspace, runner, wait_s, lease_s, timeout_s=timeout_s)
            )
            for i in range(len(self._proxy.endpoints))
        }
        winner: asyncio.Future[Any] | None = None
        failures: list[BaseException] = []
        pending = set(calls)
        try:
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for call in done:
                    error = call.exception()
                    if error is not None:
                        failures.append(error)
                    elif call.result() is not None and winner is None:
                        winner = call
        finally:
            if pending or winner is None:
                # A claim cannot be withdrawn from an orchestrator: the losers keep waiting there, and whatever
                # they still lease goes back at once instead of sitting leased to nobody until the lease lapses.
                losers = [c for c in calls if c is not winner]
                for loser in losers:
                    self._losers.add(loser)
                    loser.add_done_callback(self._losers.discard)
                task = asyncio.get_running_loop().create_task(self._release_late(workspace, losers))
                self._late.add(task)
                task.add_done_callback(self._late.discard)
        if winner is not None:
            return msgspec.convert(winner.result(), AgentJobOut)
        if failures and len(failures) == len(calls):
            raise failures[0]
        return None

    async def _release_late(self, workspace: str, calls: Sequence[asyncio.Future[Any]]) -> None:
        for answer in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(answer, dict):
                with contextlib.suppress(AobdError):
                    await self.release(workspace, answer["job_id"], answer["lease_id"])

    async def release(self, workspace: str, job_id: str, lease_id: str) -> None:
        await self._proxy._call(self._shard(job_id), "agent_jobs.release", workspace, job_id, lease_id)

    async def heartbeat(self, workspace: str, job_id: str, lease_id: str, lease_s: float | None) -> AgentJobLease:
        answer = await self._proxy._call(
            self._shard(job_id), "agent_jobs.heartbeat", workspace, job_id, lease_id, lease_s
        )
        return msgspec.convert(answer, AgentJobLease)

    async def complete(self, workspace: str, job_id: str, runner: str, body: AgentJobResult) -> AgentJobAccepted:
        answer = await self._proxy._call(self._shard(job_id), "agent_jobs.complete", workspace, job_id, runner, body)
        return msgspec.convert(answer, AgentJobAccepted)

    async def pending(self, workspace: str) -> list[AgentJobInfo]:
        found: list[AgentJobInfo] = []
        for answer in await self._proxy._all("agent_jobs.pending", workspace):
            if isinstance(answer, BaseException):
                raise answer
            found.extend(msgspec.convert(answer, list[AgentJobInfo]))
        return found
