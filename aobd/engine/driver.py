"""The asyncio driver: feeds commands to run machines and performs their effects.

For each command it (1) asks the machine for a :class:`Step`, (2) makes the step's blobs durable in the CAS,
(3) appends its events with the expected seq, and only then (4) performs the effects: dispatching node
attempts, arming wakes, resolving waiters. A run's commands are serialized by a per-run lock, so each run has
exactly one writer in this process; the log's expected-seq check refuses a second process writing the same
run. If anything between (1) and (3) fails, the machine is rebuilt from the log, so memory never runs ahead
of what is durable.

Seams for later issues: ``EventLog``/``Cas`` are protocols (Postgres/S3 plug in there), dispatching goes
through ``_dispatch`` (the runner plane and Kafka job topics plug in there), ``listeners`` receive every
committed event (metrics, streams and the approval index plug in there), and ``record_listeners`` the same events
as the log stored them, encoded (the fanout plane's publisher forwards those bytes instead of encoding again).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from time import perf_counter
from typing import Any

import msgspec
import orjson
import structlog

from aobd.agents.base import AgentAnswer
from aobd.errors import (
    AobdError,
    ConflictError,
    NodeError,
    NotFound,
    StoreError,
    Unavailable,
    WorkflowInvalid,
)
from aobd.model import events as ev
from aobd.model.events import encode_event, event_type
from aobd.model.ir import IRCache
from aobd.model.patch import PatchProposal, http_urls
from aobd.model.workflow import Node
from aobd.nodes.base import NodeContext
from aobd.nodes.function import InlineCall, execute_function, inline_call
from aobd.nodes.registry import Executor, default_executors, execute_join
from aobd.runner.remote import result_of
from aobd.runner.worker import failure_of
from aobd.store.protocols import Cas, EventLog, EventRecord, RunIndex

from .admission import DEFAULT_LIMIT as DEFAULT_MAX_COMPUTING_RUNS
from .admission import Admission
from .effects import Dispatch, Finished, Step, Wake
from .inline_policy import InlinePolicy
from .machine import RunMachine, no_url_check
from .runlock import RunLock

_log = structlog.get_logger("aobd.engine")
Listener = Callable[[list[ev.Event]], None]
#: Called with a run's id and the records of each committed step: the events as the log stored them.
RecordListener = Callable[[str, list[EventRecord]], None]
_InlineJob = tuple[Dispatch, InlineCall]
#: A dispatched attempt's result (its output, or the exception it failed with) and duration in ms.
_Completion = tuple[Dispatch, Any, float]
_DURABLE_REFS_MAX = 100_000
#: Results an inline handler returns that cannot be awaitables or agent answers (checked first: it is cheaper).
_PLAIN_RESULTS = frozenset({dict, list, str, int, float, bool, type(None)})
WorkflowResolver = Callable[[str, str], Awaitable[dict[str, Any]]]
"""(name, workspace) -> the workflow document a composite node names."""


def _join_inline(inputs: dict[str, Any], ctx: NodeContext) -> Any:
    """:func:`execute_join` without the coroutine: a join's output is what it received."""
    return inputs


class _RunSlot(msgspec.Struct):
    """What the engine holds of a run it drives. A msgspec Struct: a dataclass's __init__ is interpreted code."""

    machine: RunMachine
    lock: RunLock = msgspec.field(default_factory=RunLock)
    #: The futures of the callers waiting for the run to end (:meth:`Engine.wait`), resolved by ``_finish``. One
    #: each, so that a caller that gives up (a client's timeout cancels its future) leaves the others waiting.
    waiters: list[asyncio.Future[None]] | None = None
    tasks: set[asyncio.Task[Any]] = msgspec.field(default_factory=set)
    #: The status this engine last wrote to the run index (None: not known, write it with the next append).
    indexed_status: str | None = None
    #: Attempts sent through an executor's ``dispatch`` (no task each): job id -> (deadline timer, executor).
    dispatched: dict[str, tuple[asyncio.TimerHandle, Any]] = msgspec.field(default_factory=dict)
    #: Their results waiting for the run's next completion step (:meth:`Engine._complete`), and whether a task
    #: to record them is scheduled already.
    completions: list[_Completion] = msgspec.field(default_factory=list)
    completing: bool = False
    #: Whether the run holds an admission place (see aobd.engine.admission): from its start until it first waits
    #: on something outside the loop, or ends.
    admitted: bool = False


class Engine:
    """Runs workflows on an event log and a CAS. One instance per process (or per orchestrator shard)."""

    # Slots, not an instance dict: the engine's attributes are read on every step. Compiled, driver.pxd declares
    # them as the fields of an extension type, which the engine's own methods read directly (see RunMachine).
    # Keep the two lists the same. Measured with perf.instructions (docs/performance.md).
    __slots__ = (
        "_agent_jobs",
        "_closed",
        "_dispatched",
        "_durable_refs",
        "_http_allow",
        "_http_client",
        "_inflight",
        "_runs",
        "_services_base",
        "_storing",
        "_timers",
        "_url_guard",
        "admission",
        "cas",
        "clock",
        "draining",
        "executors",
        "fidelity",
        "handler_modules",
        "inline_handlers",
        "inline_policy",
        "ir_cache",
        "listeners",
        "log",
        "max_inflight",
        "rand",
        "record_listeners",
        "start_wait_s",
        "webhooks",
        "workflow_resolver",
        "workspace_policy",
        "writer_id",
    )

    def __init__(
        self,
        log: EventLog,
        cas: Cas,
        *,
        executors: dict[str, Executor] | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        fidelity: str = "full",
        http_allow: list[str] | None = None,
        workflow_resolver: WorkflowResolver | None = None,
        max_inflight: int = 10_000,
        max_computing_runs: int = DEFAULT_MAX_COMPUTING_RUNS,
        start_wait_s: float | None = None,
        webhooks: dict[str, str] | None = None,
        handler_modules: list[str] | None = None,
        workspace_policy: Callable[[str], dict[str, Any] | None] | None = None,
    ) -> None:
        self.log = log
        self.cas = cas
        self.clock = clock
        self.rand = rand
        self.fidelity = fidelity
        self.executors = executors if executors is not None else default_executors()
        self.workflow_resolver = workflow_resolver
        #: The agent.jobs queue (see the agent_jobs property).
        self._agent_jobs: Any = None
        #: What every attempt's ``ctx.services`` starts from (see _services); None: to be built.
        self._services_base: dict[str, Any] | None = None
        #: Handler modules function nodes may call (None: any, as for `aobd run` of one's own file).
        self.handler_modules = handler_modules
        #: Named webhook URLs that approval escalations notify (config ``approvals.webhooks``).
        self.webhooks = dict(webhooks or {})
        #: Per-workspace patch governance, merged into each new run's policy (the stricter wins).
        self.workspace_policy = workspace_policy
        self.listeners: list[Listener] = []
        self.record_listeners: list[RecordListener] = []
        self.ir_cache = IRCache()
        self._http_allow = list(http_allow or [])
        self._http_client: Any = None
        self._url_guard: Any = None
        self._runs: dict[str, _RunSlot] = {}
        #: Refs this engine has made durable in the CAS (bounded; blobs are never deleted, so it cannot go stale).
        self._durable_refs: set[str] = set()
        #: Refs being written to the CAS right now, and the future their writer resolves (see _store_blobs).
        self._storing: dict[str, asyncio.Future[None]] = {}
        self._inflight = asyncio.Semaphore(max_inflight)
        self.max_inflight = max_inflight
        #: Attempts out through ``dispatch`` (they hold no semaphore slot: this counts them against the limit).
        self._dispatched = 0
        #: Places for the runs this engine computes at once; new runs wait for one (aobd.engine.admission).
        self.admission = Admission(max_computing_runs)
        #: How long a new run may wait for its place before its start is refused (None: as long as it takes).
        self.start_wait_s = start_wait_s
        self._timers: set[asyncio.TimerHandle] = set()
        self._closed = False
        #: In a cluster: this daemon's id, recorded on every event it appends (None on a single daemon).
        self.writer_id: str | None = None
        #: Whether sync function handlers may run inline (see ``_run_inline``). None: when the function executor
        #: is the in-process one. True: even though another executor is installed (``planes.inline_sync_handlers``).
        self.inline_handlers: bool | None = None
        #: With inline handlers beside another executor: which handlers stay inline (``inline_sync_handlers =
        #: "auto"``: all until one proves slow). None: every eligible handler, unmeasured.
        self.inline_policy: InlinePolicy | None = None
        #: While draining, no new attempt is dispatched: nodes that became ready stay recorded as started and
        #: are re-dispatched by whoever resumes the run (the next start of this daemon).
        self.draining = False

    # ------------------------------------------------------------------ public API

    async def start_run(
        self,
        document: dict[str, Any],
        inputs: Any = None,
        *,
        run_id: str | None = None,
        workspace: str = "default",
        parent_run_id: str | None = None,
        parent_node_id: str | None = None,
        source_dir: str | None = None,
        overlays: list[PatchProposal] | None = None,
        replay: ev.ReplayPlan | None = None,
        known_outputs: dict[str, Any] | None = None,
        workspace_policy: dict[str, Any] | None = None,
        drive: bool = True,
        priority: str = "medium",
    ) -> str:
        """Validate, record RunCreated (and any overlay patches) and start the source nodes. Returns the run id.

        With ``drive=False`` the first step is only recorded: another daemon of the cluster owns the run and
        carries it on from the log.
        """
        run_id = run_id or new_run_id()
        if run_id in self._runs:
            raise ConflictError(f"run {run_id!r} exists already")
        url_check: Callable[[str], list[str]] = no_url_check
        if overlays:
            url_check = await self._url_verdicts(PatchProposal(ops=[op for o in overlays for op in o.ops]))
        if drive and not self.admission.take():
            # Before anything is recorded: a run that waits here has not started, and its events say so.
            await self.admission.wait(priority, self.start_wait_s)
        try:
            machine, step = RunMachine.start(
                run_id,
                document,
                {} if inputs is None else inputs,
                self.clock(),
                workspace=workspace,
                fidelity=self.fidelity,
                parent_run_id=parent_run_id,
                parent_node_id=parent_node_id,
                source_dir=source_dir,
                ir_cache=self.ir_cache,
                overlays=overlays or (),
                replay=replay,
                known_outputs=known_outputs,
                url_check=url_check,
                workspace_policy=workspace_policy
                if workspace_policy is not None
                else (self.workspace_policy(workspace) if self.workspace_policy else None),
                writer=self.writer_id,
                priority=priority,
            )
        except BaseException:
            if drive:
                self.admission.leave()
            raise
        slot = _RunSlot(machine, admitted=drive)
        if not drive:
            await self._persist(slot, step, first=True)
            return run_id
        if run_id in self._runs:  # started by another call while this one waited for its place
            self._give_place(slot)
            raise ConflictError(f"run {run_id!r} exists already")
        self._runs[run_id] = slot
        async with slot.lock:
            try:
                await self._persist(slot, step, first=True)
            except BaseException:
                self._runs.pop(run_id, None)
                self._give_place(slot)
                raise
            self._perform(slot, step)
        return run_id

    async def wait(self, run_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        """Wait until the run is no longer running (or waiting on a person/timer) and return its summary; after
        ``timeout_s`` seconds, its summary as it stands."""
        slot = self._runs.get(run_id)
        if slot is not None:
            if slot.machine.status == "running":
                # A future of its own rather than asyncio.shield over a shared one: the same isolation, without
                # shield's extra future and callbacks per wait; and a timer on it rather than asyncio.timeout,
                # whose context manager is interpreted code.
                loop = asyncio.get_running_loop()
                waiter: asyncio.Future[None] = loop.create_future()
                if slot.waiters is None:
                    slot.waiters = [waiter]
                else:
                    slot.waiters.append(waiter)
                if timeout_s is None:
                    await waiter
                else:
                    timer = loop.call_later(timeout_s, _resolve, waiter)
                    try:
                        await waiter
                    finally:
                        timer.cancel()
            return slot.machine.summary()
        return (await self.load(run_id)).summary()

    async def run(self, document: dict[str, Any], inputs: Any = None, **kwargs: Any) -> dict[str, Any]:
        return await self.wait(await self.start_run(document, inputs, **kwargs))

    async def events(self, run_id: str) -> list[ev.AnyEvent]:
        """The run's events, decoded, from the log."""
        return [ev.decode_event(r.data) for r in await self.log.read(run_id)]

    async def load(self, run_id: str) -> RunMachine:
        """A machine rebuilt from the log (the live one if this engine owns the run).

        The live machine folds a step's events before they are durable; taking the run's lock waits out a step
        in flight, so readers never see state the log does not have yet.
        """
        slot = self._runs.get(run_id)
        if slot is not None:
            async with slot.lock:
                return slot.machine
        return await self._rebuild(run_id)

    async def resume(self, run_id: str) -> None:
        """Take ownership of an unfinished run found in the log and carry it on."""
        if run_id in self._runs:
            return
        machine = await self._rebuild(run_id)
        if run_id in self._runs:
            return  # another resume of the same run (a nudge and a command at once) won while this one read
        if machine.status != "running":
            return  # it finished after the caller found it unfinished: nothing to carry on, nothing to hold
        machine.writer = self.writer_id
        source_dir = machine.created.source_dir
        if source_dir and source_dir not in sys.path:
            sys.path.insert(0, source_dir)  # handlers that live next to the workflow file
        slot = _RunSlot(machine)
        self._runs[run_id] = slot
        async with slot.lock:
            step = machine.recover(self.clock())
            await self._persist(slot, step)
            self._perform(slot, step)

    async def resume_all(self) -> list[str]:
        """Resume every unfinished run of the log (crash recovery); returns their ids."""
        ids = await self.log.unfinished_runs()
        for run_id in ids:
            await self.resume(run_id)
        return ids

    async def replay(self, run_id: str, from_node: str, mode: str = "freeze", *, new_run_id: str | None = None) -> str:
        """A new run linked to ``run_id``: nodes not downstream of ``from_node`` reuse their recorded outputs,
        ``from_node`` and everything after it run again; ``freeze`` also replays recorded agent answers whose
        inputs are unchanged. The source run's applied patches come along as overlays."""
        if mode not in ("freeze", "live"):
            raise AobdError(f"replay mode must be 'freeze' or 'live', not {mode!r}")
        source = await self.load(run_id)
        if from_node not in source.ir.index:
            raise NotFound(f"run {run_id} has no node {from_node!r} to replay from")
        rerun = descendants(source, from_node)
        reuse: dict[str, str] = {}
        frozen: dict[str, list[str]] = {}
        known: dict[str, Any] = {}
        for nid, node in source.nodes.items():
            if node.status != "completed" or node.output_ref is None:
                continue
            if nid not in rerun:
                reuse[nid] = node.output_ref
            elif mode == "freeze" and node.inputs_ref and source.ir.nodes[source.ir.index[nid]].type == "agent":
                frozen[nid] = [node.inputs_ref, node.output_ref]
            else:
                continue
            known[node.output_ref] = node.output
        overlays = [
            PatchProposal(ops=p.ops, author=p.author, reason=p.reason or f"overlay from {run_id}")
            for p in source.patches.values()
            if p.status == "applied"
        ]
        plan = ev.ReplayPlan(source_run=run_id, from_node=from_node, mode=mode, reuse=reuse, frozen=frozen)
        return await self.start_run(
            source.base_doc,
            source.inputs,
            run_id=new_run_id,
            workspace=source.workspace,
            parent_run_id=run_id,
            source_dir=source.created.source_dir,
            overlays=overlays,
            replay=plan,
            known_outputs=known,
            workspace_policy=source.created.workspace_policy or {},
            priority=source.created.priority,
        )

    async def propose_patch(self, run_id: str, proposal: PatchProposal) -> str:
        slot = self._owned(run_id)
        verdicts = await self._url_verdicts(proposal)
        async with slot.lock:
            step, patch_id = slot.machine.propose_patch(proposal, self.clock(), url_check=verdicts)
            await self._commit(slot, step)
        return patch_id

    async def decide_patch(self, run_id: str, patch_id: str, approve: bool, by: str) -> None:
        slot = self._owned(run_id)
        record = slot.machine.patches.get(patch_id)
        verdicts = await self._url_verdicts(PatchProposal(ops=record.ops)) if record else no_url_check
        async with slot.lock:
            await self._commit(slot, slot.machine.decide_patch(patch_id, approve, by, self.clock(), url_check=verdicts))

    async def rollback_patch(self, run_id: str, patch_id: str, by: str) -> None:
        slot = self._owned(run_id)
        async with slot.lock:
            await self._commit(slot, slot.machine.rollback_patch(patch_id, by, self.clock()))

    async def decide_approval(self, run_id: str, ticket: str, decision: str, by: str, reason: str = "") -> None:
        slot = self._owned(run_id)
        async with slot.lock:
            await self._commit(slot, slot.machine.decide_approval(ticket, decision, by, reason, self.clock()))

    async def cancel(self, run_id: str, reason: str = "", by: str | None = None) -> None:
        slot = self._owned(run_id)
        async with slot.lock:
            await self._commit(slot, slot.machine.cancel(reason, by, self.clock()))
        self._drop_dispatched(slot)
        for task in list(slot.tasks):
            task.cancel()

    async def close(self) -> None:
        """Stop timers and in-flight attempts (their runs stay resumable) and release clients."""
        self._closed = True
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        for slot in self._runs.values():
            self._drop_dispatched(slot)
        tasks = [t for slot in self._runs.values() for t in slot.tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._http_client is not None:
            await self._http_client.close()

    def inflight(self) -> int:
        """Node attempts, wakes and child waits currently executing."""
        return sum(len(slot.tasks) for slot in self._runs.values()) + self._dispatched

    async def drain(self, grace_s: float) -> bool:
        """Stop dispatching and wait up to ``grace_s`` for in-flight attempts; True if all finished in time. Runs
        still waiting for an admission place are refused: they never started."""
        self.draining = True
        self.admission.refuse_waiting(lambda: Unavailable("the daemon is draining; this run was not started (retry)"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        # Finishing attempts may spawn short follow-up tasks (their commits, wakes), so wait in rounds. Dispatched
        # attempts have no task to wait on: their outcomes arrive as callbacks, so poll for them.
        while self.inflight() and loop.time() < deadline:
            tasks = [t for slot in self._runs.values() for t in slot.tasks]
            if tasks:
                await asyncio.wait(tasks, timeout=min(deadline - loop.time(), 0.05 if self._dispatched else 3600.0))
            else:
                await asyncio.sleep(min(0.01, max(0.0, deadline - loop.time())))
        return self.inflight() == 0

    def drives(self, run_id: str) -> bool:
        """Whether this engine drives ``run_id`` now (it holds the run's state in memory)."""
        return run_id in self._runs

    def active_runs(self) -> list[str]:
        return [rid for rid, slot in self._runs.items() if slot.machine.status == "running"]

    # ------------------------------------------------------------------ persistence

    def _owned(self, run_id: str) -> _RunSlot:
        slot = self._runs.get(run_id)
        if slot is None:
            raise NotFound(f"run {run_id} is not active in this engine")
        return slot

    async def _rebuild(self, run_id: str) -> RunMachine:
        records = await self.log.read(run_id)
        if not records:
            raise NotFound(f"no run {run_id!r} in the event log")
        events = [ev.decode_event(r.data) for r in records]
        created = events[0]
        assert isinstance(created, ev.RunCreated)
        base_doc = orjson.loads(await self.cas.get(created.base_ref))
        blobs: dict[str, Any] = {}
        for e in events:
            if isinstance(e, ev.NodeCompleted) and not e.inline:
                blobs[e.output_ref] = orjson.loads(await self.cas.get(e.output_ref))
        if created.replay is not None:
            # A resumed replay still needs the recorded outputs it may reuse.
            refs = set(created.replay.reuse.values()) | {pair[1] for pair in created.replay.frozen.values()}
            for ref in refs - blobs.keys():
                blobs[ref] = orjson.loads(await self.cas.get(ref))
        return RunMachine.from_events(events, base_doc, blobs, ir_cache=self.ir_cache)

    async def _store_blobs(self, blobs: dict[str, bytes]) -> None:
        """Make ``blobs`` durable in the CAS, each once.

        Most steps carry blobs stored before (the same inputs and outputs recur across runs): skipping them saves
        re-hashing them in the CAS, or a request to it. A blob another step is storing right now is waited for,
        not written again: when hundreds of runs of a new workflow start at once, they all carry its document and
        the same first outputs, and each would otherwise write (and fsync) them.
        """
        durable, storing = self._durable_refs, self._storing
        new: dict[str, bytes] = {}
        waits: set[asyncio.Future[None]] = set()
        for ref, data in blobs.items():
            if ref in durable:
                continue
            pending = storing.get(ref)
            if pending is not None:
                waits.add(pending)
            else:
                new[ref] = data
        if new:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            for ref in new:
                storing[ref] = done
            try:
                await self.cas.put_many(list(new.values()))
            except BaseException as exc:
                # The steps waiting for these blobs are not durable either: they fail as this one does.
                done.set_exception(exc if isinstance(exc, Exception) else StoreError("a blob write was interrupted"))
                done.exception()  # marks it retrieved; each waiter gets it from its own await
                raise
            else:
                done.set_result(None)
                if len(durable) >= _DURABLE_REFS_MAX:
                    durable.clear()
                durable.update(new)
            finally:
                for ref in new:
                    storing.pop(ref, None)
        for pending in waits:
            await pending

    async def _persist(self, slot: _RunSlot, step: Step, *, first: bool = False) -> None:
        if step.blobs:
            await self._store_blobs(step.blobs)
        if not step.events:
            return
        machine = slot.machine
        run_id = machine.run_id
        records = [EventRecord(run_id, e.seq, event_type(e), e.ts, encode_event(e)) for e in step.events]
        status = machine.public_status()
        if first:
            index: RunIndex | None = RunIndex(
                workflow=machine.workflow_name,
                status=status,
                parent_run_id=machine.created.parent_run_id,
                workspace=machine.workspace,
            )
        else:
            # The status only when it changed: an index write that leaves the indexed columns alone is three times
            # cheaper in SQLite (it need not touch the status indexes), and most steps do not change it.
            index = RunIndex(status=status) if status != slot.indexed_status else None
        slot.indexed_status = None  # unknown until this append is known to have committed
        await self.log.append(run_id, records, index=index)
        slot.indexed_status = status
        for listener in self.listeners:
            listener(step.events)
        for forward in self.record_listeners:
            forward(run_id, records)

    async def _commit(self, slot: _RunSlot, step: Step) -> None:
        """Persist a step of a live run and perform its effects; on failure, resync the machine with the log."""
        await self._persist_live(slot, step)
        self._perform(slot, step)

    async def _persist_live(self, slot: _RunSlot, step: Step) -> None:
        try:
            await self._persist(slot, step)
        except ConflictError:
            # Another writer owns this run now: stop driving it.
            self.release(slot.machine.run_id)
            raise
        except BaseException:
            slot.machine = await self._rebuild(slot.machine.run_id)
            raise

    # ------------------------------------------------------------------ effects

    def _perform(self, slot: _RunSlot, step: Step, *, collect: bool = False) -> list[_InlineJob]:
        """Perform the effects of a durable step. Attempts that may run inline are started together in one
        inline loop; with ``collect`` (the loop itself asking) they are returned for its next step instead."""
        inline: list[_InlineJob] = []
        for effect in step.effects:
            if isinstance(effect, Dispatch):
                if self.draining:
                    continue
                call = self._inline_call(effect.node)
                if call is not None:
                    inline.append((effect, call))
                elif not self._dispatch(slot, effect):
                    self._spawn(slot, self._execute(slot, effect))
            elif isinstance(effect, Wake):
                self._arm(slot, effect)
            elif isinstance(effect, Finished):
                self._finish(slot)
        if not collect:
            if inline:
                self._spawn(slot, self._run_inline(slot, inline))
            elif slot.admitted:
                self._give_place(slot)  # what the run does next happens outside the loop
            return []
        return inline

    def _give_place(self, slot: _RunSlot) -> None:
        """The run stops computing for now (it waits on something outside the loop, or it ended): its admission
        place goes to the next new run. It never queues again: a run carries on ahead of new ones."""
        if slot.admitted:
            slot.admitted = False
            self.admission.leave()

    def _inline_call(self, node: Node) -> InlineCall | None:
        """How to call ``node`` inline, if its handler cannot await and its executor is the in-process default.
        Another executor (the runner plane's, a cluster's job topics) gets every attempt, unless
        ``inline_handlers`` says otherwise."""
        if node.type == "function":
            inline = self.inline_handlers
            if inline is None:
                inline = self.executors.get("function") is execute_function
            if not inline:
                return None
            policy = self.inline_policy
            if policy is not None and not policy.allows(node.config.get("handler", "")):
                return None  # demoted: it goes to the other executor
            return inline_call(node, self.handler_modules)
        if node.type == "join" and self.executors.get("join") is execute_join:
            return _join_inline
        return None

    async def _run_inline(self, slot: _RunSlot, jobs: list[_InlineJob]) -> None:
        """Run attempts whose handlers cannot await, one ready set per step.

        The ready set's handlers are called back to back, their completions folded into one step, and the step
        committed once; the attempts that step makes ready and that may run inline form the next set. So a
        chain of trivial nodes costs one task and one commit per ready set, where the general path
        (:meth:`_execute`) costs a task, a timeout, the run's lock and a commit per attempt. The durability rule
        is unchanged: a node runs only after the step that started it is durable. A handler that returns an
        awaitable after all finishes on the general path.
        """
        try:
            while jobs and self._live(slot) and not self.draining:
                async with slot.lock:
                    step = self._call_inline_set(slot, jobs)
                    await self._persist_live(slot, step)
                    jobs = self._perform(slot, step, collect=True)
        finally:
            self._give_place(slot)  # the run's inline sets are over: it waits, or it ended

    def _call_inline_set(self, slot: _RunSlot, jobs: list[_InlineJob]) -> Step:
        """Call a ready set's handlers back to back (under the run's lock): their outcomes as one step."""
        machine = slot.machine
        step = Step()
        policy = self.inline_policy
        if policy is not None:
            # Each handler once (a fan-out's branches often share one), joins not at all (builtin).
            policy.entering({job.node.config["handler"] for job, _ in jobs if job.node.type == "function"})
        try:
            for job, call in jobs:
                ctx = self._context(machine, job)
                started = perf_counter()
                failure: Exception | None = None
                try:
                    result = call(job.inputs, ctx)
                except Exception as exc:
                    failure = exc
                duration_ms = _ms_since(started)
                if policy is not None and job.node.type == "function":
                    policy.observed(job.node.config["handler"], duration_ms)
                if failure is not None:
                    error, retryable = failure_of(failure, job.node_id, job.attempt, job.timeout_s)
                    part = self._failed(machine, job, error, retryable, duration_ms)
                elif type(result) not in _PLAIN_RESULTS and (
                    isinstance(result, AgentAnswer) or inspect.isawaitable(result)
                ):
                    self._spawn(slot, self._settle(slot, job, result, started))
                    continue
                else:
                    part = machine.node_completed(
                        job.node_id, job.attempt, result, self.clock(), duration_ms=duration_ms
                    )
                step.extend(part)
        finally:
            if policy is not None:
                policy.left()  # whatever the calls did: the marker names only running handlers
        return step

    def _dispatch(self, slot: _RunSlot, job: Dispatch) -> bool:
        """Send an attempt through an executor that runs it elsewhere and calls back (``dispatch``: the runner
        plane's :class:`~aobd.runner.remote.RemoteExecutor`), with no task, timeout or lock of its own: a timer
        keeps its deadline, and its result joins the run's next completion step (:meth:`_complete`), so
        results that arrive together (a fan-out's branches, answered in one batch) share one commit. False: not
        such an executor, or the in-flight limit is reached; the general path (:meth:`_execute`) takes it.
        """
        executor = self.executors.get(job.node.type)
        dispatch = getattr(executor, "dispatch", None)
        if dispatch is None or self._dispatched >= self.max_inflight:
            return False
        started = perf_counter()
        job_id = dispatch(
            job.node,
            job.inputs,
            self._context(slot.machine, job),
            lambda outcome: self._arrived(slot, job, started, outcome),
        )
        if job_id is None:
            return False
        timer = asyncio.get_running_loop().call_later(job.timeout_s, self._expired, slot, job, started, job_id)
        slot.dispatched[job_id] = (timer, executor)
        self._dispatched += 1
        return True

    def _arrived(self, slot: _RunSlot, job: Dispatch, started: float, outcome: Any) -> None:
        entry = slot.dispatched.pop(outcome.job_id, None)
        if entry is None:
            return  # timed out or dropped already
        entry[0].cancel()
        self._dispatched -= 1
        try:
            result = result_of(outcome)
        except NodeError as exc:
            result = exc
        self._complete_later(slot, (job, result, _ms_since(started)))

    def _expired(self, slot: _RunSlot, job: Dispatch, started: float, job_id: str) -> None:
        entry = slot.dispatched.pop(job_id, None)
        if entry is None:
            return
        entry[1].forget(job_id)
        self._dispatched -= 1
        self._complete_later(slot, (job, TimeoutError(), _ms_since(started)))

    def _drop_dispatched(self, slot: _RunSlot) -> None:
        """The run stops here (cancelled, released, closing): its dispatched attempts' outcomes are not awaited."""
        for job_id, (timer, executor) in slot.dispatched.items():
            timer.cancel()
            executor.forget(job_id)
        self._dispatched -= len(slot.dispatched)
        slot.dispatched.clear()
        slot.completions.clear()

    def _complete_later(self, slot: _RunSlot, completion: _Completion) -> None:
        slot.completions.append(completion)
        if not slot.completing:
            slot.completing = True
            self._spawn(slot, self._complete(slot))

    async def _complete(self, slot: _RunSlot) -> None:
        """Record the dispatched attempts' results gathered since the last call, as one step and one commit."""
        async with slot.lock:
            # Results arriving from here on, while this step commits, schedule the next call.
            slot.completing = False
            batch, slot.completions = slot.completions, []
            if not batch or not self._live(slot):
                return  # released: whoever drives the run now runs those attempts again
            machine = slot.machine
            step = Step()
            for job, result, duration_ms in batch:
                if isinstance(result, BaseException):
                    error, retryable = failure_of(result, job.node_id, job.attempt, job.timeout_s)
                    part = self._failed(machine, job, error, retryable, duration_ms)
                else:
                    part = machine.node_completed(
                        job.node_id, job.attempt, result, self.clock(), duration_ms=duration_ms
                    )
                step.extend(part)
            await self._commit(slot, step)

    async def _settle(self, slot: _RunSlot, job: Dispatch, result: Any, started: float) -> None:
        """Finish an inline attempt whose handler returned an awaitable, as the general path would have."""
        try:
            if inspect.isawaitable(result):
                async with asyncio.timeout(job.timeout_s):
                    result = await result
        except Exception as exc:
            error, retryable = failure_of(exc, job.node_id, job.attempt, job.timeout_s)
            await self._report_failure(slot, job, error, retryable, started)
            return
        await self._record_result(slot, job, result, started)

    def release(self, run_id: str) -> bool:
        """Stop driving a run (its partition moved to another daemon): in-flight attempts are cancelled and
        their timers ignored; whoever owns the run now re-dispatches them from the log."""
        slot = self._runs.pop(run_id, None)
        if slot is None:
            return False
        self._give_place(slot)
        self._drop_dispatched(slot)
        for task in list(slot.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        return True

    def _live(self, slot: _RunSlot) -> bool:
        return self._runs.get(slot.machine.run_id) is slot

    @staticmethod
    def _reap(task: asyncio.Task[None]) -> None:
        """Background work of a run: a takeover by another writer ends it quietly, anything else is logged."""
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, ConflictError):
            _log.info("run taken over by another writer", error=exc.message)
        elif exc is not None:
            _log.error("background work of a run failed", exc_info=exc)

    def _spawn(self, slot: _RunSlot, coro: Coroutine[Any, Any, None]) -> None:
        # The loop's create_task, not asyncio.ensure_future: that is three interpreted calls before it gets there.
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(self._reap)
        slot.tasks.add(task)
        task.add_done_callback(slot.tasks.discard)

    def _finish(self, slot: _RunSlot) -> None:
        self._give_place(slot)
        waiters, slot.waiters = slot.waiters, None
        if waiters is not None:
            for waiter in waiters:
                _resolve(waiter)  # unless its caller gave up (cancelled) or its timeout passed
        # A finished run leaves memory at once: its waiters hold the slot and read the summary from it, and a later
        # load rebuilds it from the log. Kept for a while instead (it was 5 s), finished runs piled up at the
        # throughput (15,000 at 3,000 runs/s, 40-odd tracked objects each) and every young collection promoted
        # them, which made the collector a tenth of in-process W6 (docs/performance.md).
        if self._runs.get(slot.machine.run_id) is slot:
            del self._runs[slot.machine.run_id]

    def _arm(self, slot: _RunSlot, wake: Wake) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        # Wall-clock deadline to monotonic loop time; a wake that arrives early is simply re-armed.
        delay = max(0.0, wake.at - self.clock())
        handle = loop.call_later(delay, lambda: self._spawn(slot, self._wake(slot, wake)))
        self._timers.add(handle)

    async def _wake(self, slot: _RunSlot, wake: Wake) -> None:
        if not self._live(slot):
            return
        if self.clock() < wake.at:
            self._arm(slot, wake)
            return
        if wake.kind == "escalation":
            await self._escalate(slot, wake)
            return
        async with slot.lock:
            await self._commit(slot, slot.machine.wake(wake.kind, wake.node_id, wake.attempt, self.clock()))

    async def _escalate(self, slot: _RunSlot, wake: Wake) -> None:
        """An approval escalation step: notify its webhook (outside the run's lock), then record it."""
        async with slot.lock:
            spec = slot.machine.escalation_due(wake.node_id, wake.attempt, self.clock())
        if spec is None:
            return
        result = None
        if spec.get("notify"):
            result = await self._notify(slot.machine, wake.node_id, wake.attempt, spec["notify"])
        async with slot.lock:
            await self._commit(slot, slot.machine.escalate(wake.node_id, wake.attempt, self.clock(), result=result))

    async def _notify(self, machine: RunMachine, node_id: str, index: int, target: str) -> str:
        url = self.webhooks.get(target) or (target if target.startswith(("http://", "https://")) else None)
        if url is None:
            return f"not sent: no webhook named {target!r} in approvals.webhooks"
        node = machine.nodes[node_id]
        payload = {
            "event": "approval.escalated",
            "run_id": machine.run_id,
            "workflow": machine.workflow_name,
            "node_id": node_id,
            "ticket": node.ticket,
            "step": index,
            "assignees": machine.ir.nodes[machine.ir.index[node_id]].config.get("assignees", []),
            "deadline": node.wake_at,
        }
        ctx = NodeContext(
            machine.run_id, node_id, 1, f"{machine.run_id}:{node_id}:escalation:{index}", 10.0, machine.workspace
        )
        run_http = await self._http_executor()
        request = Node(id=node_id, type="http", config={"method": "POST", "url": url, "body": payload})
        try:
            async with asyncio.timeout(10.0):
                response = await run_http(request, {}, ctx)
        except NodeError as exc:
            return f"failed: {exc.message}"
        except TimeoutError:
            return "failed: the webhook did not answer within 10s"
        return f"sent: HTTP {response['status']}"

    def _context(self, machine: RunMachine, job: Dispatch) -> NodeContext:
        return NodeContext(
            run_id=machine.run_id,
            node_id=job.node_id,
            attempt=job.attempt,
            idempotency_key=f"{machine.run_id}:{job.node_id}",
            timeout_s=job.timeout_s,
            workspace=machine.workspace,
            priority=machine.created.priority,
            services=self._services(machine, job.node.type),
        )

    async def _execute(self, slot: _RunSlot, job: Dispatch) -> None:
        ctx = self._context(slot.machine, job)
        started = perf_counter()
        async with self._inflight:
            try:
                async with asyncio.timeout(job.timeout_s):
                    result = await self._run_node(job.node, job.inputs, ctx)
            except Exception as exc:  # CancelledError is no Exception: a release or a shutdown passes through
                error, retryable = failure_of(exc, job.node_id, job.attempt, job.timeout_s)
                await self._report_failure(slot, job, error, retryable, started)
                return
        await self._record_result(slot, job, result, started)

    async def _record_result(self, slot: _RunSlot, job: Dispatch, result: Any, started: float) -> None:
        duration_ms = _ms_since(started)
        patch = usage = exchange_ref = None
        if isinstance(result, AgentAnswer):
            if result.exchange is not None:
                exchange_ref = await self.cas.put(result.exchange)  # the raw LLM exchange, for audit and replay
            patch, usage, result = result.patch, result.usage, result.output
        verdicts = await self._url_verdicts(patch) if patch is not None else no_url_check
        if not self._live(slot):
            return  # released while the attempt ran: the new owner runs it again and records that
        async with slot.lock:
            step = slot.machine.node_completed(
                job.node_id,
                job.attempt,
                result,
                self.clock(),
                duration_ms=duration_ms,
                patch=patch,
                url_check=verdicts,
                usage=usage,
                exchange_ref=exchange_ref,
            )
            await self._commit(slot, step)

    async def _run_node(self, node: Any, inputs: dict[str, Any], ctx: NodeContext) -> Any:
        executor = self.executors.get(node.type)
        if executor is None:
            if node.type == "http":
                executor = self.executors["http"] = await self._http_executor()
            else:
                raise NodeError(f"no executor for node type {node.type!r}", code="no_executor", retryable=False)
        return await executor(node, inputs, ctx)

    async def _report_failure(
        self, slot: _RunSlot, job: Dispatch, error: dict[str, Any], retryable: bool, started: float
    ) -> None:
        duration_ms = _ms_since(started)  # the attempt's, without the wait for the run's lock
        async with slot.lock:
            await self._commit(slot, self._failed(slot.machine, job, error, retryable, duration_ms))

    def _failed(
        self, machine: RunMachine, job: Dispatch, error: dict[str, Any], retryable: bool, duration_ms: float
    ) -> Step:
        """The machine's step for a failed attempt (a retry with backoff, or the node failing)."""
        return machine.node_failed(
            job.node_id, job.attempt, error, retryable, self.clock(), rand=self.rand(), duration_ms=duration_ms
        )

    @property
    def agent_jobs(self) -> Any:
        """The agent.jobs queue external runners claim from (the daemon sets it; None: no external runners)."""
        return self._agent_jobs

    @agent_jobs.setter
    def agent_jobs(self, queue: Any) -> None:
        self._agent_jobs = queue
        self._services_base = None  # the attempts' services name it

    def _services(self, machine: RunMachine, node_type: str) -> dict[str, Any]:
        """Each attempt's own ``ctx.services``: a copy of one prebuilt dict with the run's values put in. Copying a
        dict of the final size is one allocation; building it key by key grew it through a resize, every attempt."""
        base = self._services_base
        if base is None:
            base = self._services_base = {
                "version": None,
                "http_allow": self._http_allow,
                "handler_modules": self.handler_modules,
                "agent_jobs": self._agent_jobs,
                "execute": self._run_node,
                "run_child": self._run_child,
                "document": None,
            }
        services = base.copy()
        services["version"] = machine.version
        # A reference, not a copy: agents read the graph, the runner plane publishes it by version.
        services["document"] = machine.doc
        if node_type in ("agent", "map"):
            # Only agents read the node statuses: building them per attempt of every node would cost O(nodes).
            services["node_status"] = {nid: n.status for nid, n in machine.nodes.items()}
        return services

    # ------------------------------------------------------------------ http, SSRF and composites

    async def _http_executor(self) -> Executor:
        from aobd.nodes.http import HttpNodeClient, execute_http

        if self._http_client is None:
            self._http_client = HttpNodeClient(allow=self._http_allow)
        client = self._http_client

        async def run_http(node: Any, inputs: dict[str, Any], ctx: NodeContext) -> Any:
            return await execute_http(node.config, inputs, ctx, client)

        return run_http

    async def _url_verdicts(self, proposal: PatchProposal | None) -> Callable[[str], list[str]]:
        """Resolve and judge the URLs a patch would add (I/O), so that judging the patch stays pure."""
        urls = http_urls(proposal.ops) if proposal is not None else []
        if not urls:
            return no_url_check
        from aobd.security.ssrf import UrlGuard

        if self._url_guard is None:
            self._url_guard = UrlGuard(allow=self._http_allow)
        verdicts: dict[str, list[str]] = await self._url_guard.check_urls(urls)
        return lambda url: verdicts.get(url, [])

    async def _run_child(self, node: Any, inputs: dict[str, Any], ctx: NodeContext) -> Any:
        config = node.config
        if config.get("definition") is not None:
            document = config["definition"]
        else:
            if self.workflow_resolver is None:
                raise NodeError(
                    f"composite {ctx.node_id!r}: no workflow registry to find {config['workflow']!r}",
                    code="no_workflow",
                    retryable=False,
                )
            try:
                document = await self.workflow_resolver(config["workflow"], ctx.workspace)
            except (AobdError, OSError) as exc:
                raise NodeError(
                    f"composite {ctx.node_id!r}: workflow {config['workflow']!r}: {exc}",
                    code="no_workflow",
                    retryable=False,
                ) from None
        child_id = f"{ctx.run_id}.{ctx.node_id}.{ctx.attempt}"
        if await self.log.last_seq(child_id) == 0:
            try:
                await self.start_run(
                    document,
                    inputs,
                    run_id=child_id,
                    workspace=ctx.workspace,
                    parent_run_id=ctx.run_id,
                    parent_node_id=ctx.node_id,
                )
            except WorkflowInvalid as exc:
                raise NodeError(
                    f"composite {ctx.node_id!r}: {exc.message}", code="workflow_invalid", retryable=False
                ) from None
        else:
            await self.resume(child_id)
        summary = await self.wait(child_id)
        if summary["status"] != "completed":
            raise NodeError(
                f"child run {child_id} {summary['status']}: {summary['error']}",
                code="child_failed",
                retryable=False,
            )
        return summary["outputs"]


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _ms_since(started: float) -> float:
    return (perf_counter() - started) * 1000.0


def descendants(machine: RunMachine, node_id: str) -> set[str]:
    """``node_id`` and every node reachable from it in the machine's current graph."""
    ir = machine.ir
    seen = {ir.index[node_id]}
    stack = [ir.index[node_id]]
    while stack:
        for edge in ir.out_edges(stack.pop()):
            target = ir.out_targets[edge]
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return {ir.node_ids[i] for i in seen}


def new_run_id() -> str:
    """Time-ordered, unique run ids (``r`` + 12 hex of ms timestamp + 8 random hex): they sort by creation."""
    return f"r{int(time.time() * 1000):012x}{os.urandom(4).hex()}"


def file_workflow_resolver(directory: Path) -> WorkflowResolver:
    """Resolve composite ``config.workflow`` names to ``<dir>/<name>.json`` (used by ``aobd run FILE``)."""

    async def resolve(name: str, workspace: str) -> dict[str, Any]:
        for candidate in (directory / f"{name}.json", directory / name / "workflow.json"):
            if candidate.is_file():
                data: dict[str, Any] = orjson.loads(candidate.read_bytes())
                return data
        raise NotFound(f"no workflow {name!r} next to the parent ({directory}/{name}.json)")

    return resolve
