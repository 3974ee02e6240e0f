"""The daemon's application layer: what every API route and admin command does, with workspaces enforced.

HTTP handlers (``aobd.api.app``) decode requests and call these methods with a :class:`Caller`; nothing here
knows about HTTP. Every lookup checks that the object belongs to the caller's workspace and answers NotFound
otherwise (another workspace's objects are indistinguishable from missing ones, so ids leak nothing).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import orjson

from aobd import __version__, _fast
from aobd.agents.jobs import AgentJobQueue
from aobd.api import schemas as s
from aobd.config import Config, masked
from aobd.engine.driver import Engine, new_run_id
from aobd.engine.machine import RunMachine, run_of_ticket
from aobd.errors import (
    AobdError,
    BadRequest,
    Conflict,
    ConflictError,
    Misdirected,
    NotFound,
    Unavailable,
    WorkflowInvalid,
)
from aobd.model import events as ev
from aobd.model.canonical import canonical_json, sha256_ref
from aobd.model.events import NodeCompleted, NodeScheduled, NodeStarted
from aobd.model.patch import PatchProposal, handler_modules
from aobd.model.validate import load_workflow
from aobd.nodes.function import module_allowed
from aobd.store.factory import Stores

ROLES = {"read": 0, "write": 1, "admin": 2}


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: from a bearer token, or the admin socket (admin in the workspace it names)."""

    workspace: str
    role: str
    name: str
    via: str = "http"

    def allows(self, role: str) -> bool:
        return ROLES[self.role] >= ROLES[role]


#: Checked document versions remembered (cleared when full: a miss costs one validation).
_CHECKED_MAX = 4096


@dataclass(slots=True)
class _Approval:
    ticket: str
    run_id: str
    node_id: str
    workspace: str
    assignees: list[str]
    deadline: float | None
    status: str = "pending"
    decided_by: str | None = None

    def info(self) -> s.ApprovalInfo:
        return s.ApprovalInfo(
            ticket=self.ticket,
            run_id=self.run_id,
            node_id=self.node_id,
            status=self.status,  # type: ignore[arg-type]
            assignees=self.assignees,
            deadline=self.deadline,
            decided_by=self.decided_by,
        )


class Service:
    """Owns the stores and the engine of one daemon (single-process mode)."""

    def __init__(self, config: Config, stores: Stores) -> None:
        self.config = config
        self.started_at = time.time()
        self.ready = False
        self.draining = False
        self.stores = stores
        self.log = stores.log
        self.cas = stores.cas
        self.meta = stores.meta
        self.engine = Engine(
            self.log,
            self.cas,
            http_allow=list(config.security.http_allow),
            fidelity=config.engine.fidelity,
            max_inflight=config.engine.max_inflight,
            max_computing_runs=config.engine.max_computing_runs,
            start_wait_s=config.engine.start_wait_s,
            workflow_resolver=self._resolve_workflow,
            webhooks=dict(config.approvals.webhooks),
            handler_modules=list(config.security.handler_modules),
            workspace_policy=config.workspace_policy,
        )
        self._workspace_of: dict[str, str] = {}
        #: Set in a cluster: which runs this daemon drives (aobd.cluster.coordinator.ClusterCoordinator).
        self.cluster: Any = None
        #: [planes] An orchestrator of a shard resumes only the runs this says it owns (None: every run).
        self.owns_run: Callable[[str], bool] | None = None
        #: [planes] The supervisor's health table and this orchestrator's job transport, for ``status()``.
        self.planes_status: Callable[[], dict[str, Any]] | None = None
        #: [planes] The whole daemon's metrics merged from every process's, for ``metrics_exposition()``.
        self.planes_metrics: Callable[[str | None], tuple[bytes, str]] | None = None
        #: [planes] Whether the other processes this one needs are up (``/readyz``); None: nothing else to wait for.
        self.planes_ready: Callable[[], bool] | None = None
        #: The agent.jobs channel for external runners (claimed over the HTTP API).
        self.agent_jobs = AgentJobQueue()
        self.engine.agent_jobs = self.agent_jobs
        self._approvals: dict[str, _Approval] = {}
        #: The tickets of each unfinished run's approvals, so a run's end does not scan every approval.
        self._tickets_of_run: dict[str, set[str]] = {}
        #: Versions of run documents that passed validation and the handler allow-list here.
        self._checked: set[str] = set()
        self.engine.listeners.append(self._on_events)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> list[str]:
        """Resume every unfinished run (a cluster resumes only its partitions' runs), then report ready."""
        if self.cluster is not None:
            resumed = []
        elif self.owns_run is not None:
            resumed = [r for r in await self.log.unfinished_runs() if self.owns_run(r)]
            for run_id in resumed:
                await self.engine.resume(run_id)
        else:
            resumed = await self.engine.resume_all()
        for run_id in resumed:
            await self.index_resumed(run_id)
        self.ready = True
        return resumed

    async def index_resumed(self, run_id: str) -> None:
        """Index what a run this daemon now drives waits for (its pending approvals): after a restart, or in a
        cluster when a rebalance hands the run over (no new ApprovalRequested is recorded then)."""
        machine = await self.engine.load(run_id)
        self._workspace_of[run_id] = machine.workspace
        for node_id, node in machine.nodes.items():
            if node.ticket and node.status == "waiting":
                self._index_approval(machine, node_id)

    def _index_approval(self, machine: RunMachine, node_id: str) -> _Approval:
        node = machine.nodes[node_id]
        assert node.ticket is not None
        spec = machine.ir.nodes[machine.ir.index[node_id]]
        return self._add_approval(
            _Approval(
                node.ticket,
                machine.run_id,
                node_id,
                machine.workspace,
                list(spec.config.get("assignees", [])),
                node.wake_at,
            )
        )

    def _add_approval(self, approval: _Approval) -> _Approval:
        self._approvals[approval.ticket] = approval
        self._tickets_of_run.setdefault(approval.run_id, set()).add(approval.ticket)
        return approval

    async def drain(self, grace_s: float) -> bool:
        self.draining = True
        finished = await self.engine.drain(grace_s)
        self.agent_jobs.close()  # ends waiting claims (503) so the HTTP server can stop at once
        return finished

    async def close(self) -> None:
        self.agent_jobs.close()
        await self.engine.close()
        await self.stores.close()

    async def _resolve_workflow(self, name: str, workspace: str) -> dict[str, Any]:
        """Composite nodes name registered workflows of their own run's workspace (never another's)."""
        found = await self.meta.resolve_workflow(workspace, name)
        if found is None:
            raise NotFound(f"no workflow {name!r} registered in workspace {workspace!r}")
        document: dict[str, Any] = orjson.loads(await self.cas.get(found.doc_ref))
        return document

    # ------------------------------------------------------------------ event hooks

    def _on_events(self, events: list[ev.Event]) -> None:
        """Keep the approval index and CAS ownership in step with committed events.

        It sees every event the daemon commits (20 per W6 run): the checks go in the order of how often each
        type occurs, after passing over the scheduling events, because a failed isinstance on an event class is a
        slow call (msgspec's metaclass) and a chain of them per event was 5% of an orchestrator's CPU.
        """
        refs: dict[str, list[str]] = {}
        workspace_of = self._workspace_of
        for e in events:
            # The node events by identity (event classes are not subclassed): cheaper than a failed isinstance.
            if type(e) is NodeScheduled:
                continue
            workspace = workspace_of.get(e.run_id, "default")
            if type(e) is NodeStarted:
                refs.setdefault(workspace, []).append(e.inputs_ref)
            elif type(e) is NodeCompleted:
                owned = refs.setdefault(workspace, [])
                owned.append(e.output_ref)
                if e.exchange_ref:
                    owned.append(e.exchange_ref)
            elif isinstance(e, ev.RunCreated):
                workspace = self._workspace_of[e.run_id] = e.workspace
                refs.setdefault(workspace, []).extend((e.base_ref, e.inputs_ref))
            elif isinstance(e, (ev.RunCompleted, ev.RunFailed, ev.RunCancelled)):
                if isinstance(e, ev.RunCompleted) and e.outputs_ref:
                    refs.setdefault(workspace, []).append(e.outputs_ref)
                self._forget(e.run_id)
            elif isinstance(e, (ev.PatchApplied, ev.PatchRolledBack)):
                refs.setdefault(workspace, []).append(e.version_ref)
            elif isinstance(e, ev.ApprovalRequested):
                self._add_approval(_Approval(e.ticket, e.run_id, e.node_id, workspace, e.assignees, e.deadline))
            elif isinstance(e, ev.ApprovalDecided) and e.ticket in self._approvals:
                approval = self._approvals[e.ticket]
                approval.status = "approved" if e.decision == "approve" else "rejected"
                approval.decided_by = e.by
        for workspace, owned in refs.items():
            self.meta.own_refs(workspace, owned)

    def _forget(self, run_id: str) -> None:
        """A finished run emits nothing more: forget it, or these maps grow with every run ever started."""
        self._workspace_of.pop(run_id, None)
        for ticket in self._tickets_of_run.pop(run_id, ()):
            approval = self._approvals.get(ticket)
            if approval is not None and approval.status == "pending":
                del self._approvals[ticket]

    # ------------------------------------------------------------------ workflows

    def _check_document(self, document: dict[str, Any]) -> None:
        """Validate a run's document and check its handlers, once per version: a version in the engine's IR cache
        was validated when it was compiled, and one in ``_checked`` passed this daemon's allow-list (the cache
        alone would not do: it also holds versions of runs resumed from the log, started under older settings)."""
        version = sha256_ref(canonical_json(document))
        if version in self._checked:
            return
        self.engine.ir_cache.get(version, lambda: load_workflow(document, source="definition"))
        self._check_handlers(document)
        if len(self._checked) >= _CHECKED_MAX:
            self._checked.clear()
        self._checked.add(version)

    def _check_handlers(self, document: dict[str, Any]) -> None:
        """Workflows that come over the API may call only builtins and security.handler_modules."""
        allowed = self.config.security.handler_modules
        refused = sorted(m for m in handler_modules(document) if not module_allowed(m, allowed))
        if refused:
            raise WorkflowInvalid(
                f"handler modules {', '.join(refused)} are not allowed on this daemon "
                f"(security.handler_modules: {', '.join(allowed) or 'builtins only'})",
                details=[{"code": "handler_not_allowed", "modules": refused}],
            )

    async def put_workflow(self, caller: Caller, body: s.WorkflowPut) -> s.WorkflowRef:
        workflow = load_workflow(body.definition, source="definition")
        self._check_handlers(body.definition)
        data = canonical_json(body.definition)
        version = sha256_ref(data)
        await self.cas.put(data)
        await self.meta.put_workflow(caller.workspace, workflow.name, version, version, body.tag)
        self.meta.own_refs(caller.workspace, [version])
        return s.WorkflowRef(workflow=workflow.name, version=version, tag=body.tag)

    async def list_workflows(self, caller: Caller) -> list[s.WorkflowInfo]:
        entries = await self.meta.list_workflows(caller.workspace)
        return [
            s.WorkflowInfo(e.name, e.workspace, e.latest_version, e.tags, e.versions, e.updated_at) for e in entries
        ]

    async def get_workflow(self, caller: Caller, name: str, tag: str | None = None) -> s.WorkflowInfo:
        found = await self.meta.resolve_workflow(caller.workspace, name, tag)
        if found is None:
            raise NotFound(f"no workflow {name!r}" + (f" with tag {tag!r}" if tag else "") + " in this workspace")
        entry = next(e for e in await self.meta.list_workflows(caller.workspace) if e.name == name)
        definition = orjson.loads(await self.cas.get(found.doc_ref))
        return s.WorkflowInfo(
            entry.name, entry.workspace, entry.latest_version, entry.tags, entry.versions, entry.updated_at, definition
        )

    # ------------------------------------------------------------------ runs

    async def start_run(
        self, caller: Caller, body: s.RunStart, *, wait_s: float = 0.0, run_id: str | None = None
    ) -> dict[str, Any]:
        """Start a run; ``run_id`` is minted here unless given (an accept worker mints it to pick the shard that
        owns the run before calling that orchestrator, see :class:`aobd.planes.rpc.ServiceProxy`)."""
        if self.draining:
            raise Unavailable("the daemon is draining; it accepts no new runs")
        if (body.workflow is None) == (body.definition is None):
            raise BadRequest("give exactly one of 'workflow' (a registered name) or 'definition' (a document)")
        if body.definition is not None:
            document = body.definition
        else:
            assert body.workflow is not None
            found = await self.meta.resolve_workflow(caller.workspace, body.workflow, body.tag)
            if found is None:
                raise NotFound(
                    f"no workflow {body.workflow!r}"
                    + (f" tagged {body.tag!r}" if body.tag else "")
                    + " in this workspace"
                )
            document = orjson.loads(await self.cas.get(found.doc_ref))
        run_id = run_id or new_run_id()
        retried = False
        if body.idempotency_key:
            existing = await self.meta.claim_idempotency(caller.workspace, body.idempotency_key, run_id)
            if existing is not None:
                if await self.log.get_run(existing) is not None:
                    return await self.get_run(caller, existing)
                # The attempt that claimed the key died before recording its run (a crash, a killed
                # orchestrator): this retry records it under the same id, so the key still names one run.
                if self.owns_run is not None and not self.owns_run(existing):
                    raise Unavailable("the run of this idempotency key belongs to another orchestrator; retry")
                run_id, retried = existing, True
        self._check_document(document)
        overlays = await self._patch_set(caller, body.patch_set or [], document)
        drive = self.cluster is None or self.cluster.owns(run_id)
        try:
            await self.engine.start_run(
                document,
                body.inputs,
                run_id=run_id,
                workspace=caller.workspace,
                overlays=overlays,
                drive=drive,
                priority=body.priority,
            )
        except ConflictError:
            if not retried:
                raise
            return await self.get_run(caller, run_id)  # the first attempt was still in flight, and won
        if not drive:
            await self.cluster.announce(run_id)  # its owner carries it on from the log
            if wait_s > 0:
                await self._wait_in_log(run_id, wait_s)
            return (await self.engine.load(run_id)).summary()
        if wait_s > 0:
            return await self.engine.wait(run_id, timeout_s=wait_s)
        return (await self.engine.load(run_id)).summary()

    async def _wait_in_log(self, run_id: str, wait_s: float) -> None:
        """Wait for a run another daemon drives to finish, watching its status in the shared log."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            info = await self.log.get_run(run_id)
            if info is not None and info.status in ("completed", "failed", "cancelled"):
                return
            await asyncio.sleep(0.05)

    async def _patch_set(self, caller: Caller, patch_ids: list[str], document: dict[str, Any]) -> list[PatchProposal]:
        """A/B: earlier patches (from any run of the same workflow in this workspace) to start a run with."""
        overlays = []
        for patch_id in patch_ids:
            machine = await self._machine(caller, self.run_of_patch(patch_id))
            record = machine.patches.get(patch_id)
            if record is None:
                raise NotFound(f"no patch {patch_id!r}")
            if machine.workflow_name != document.get("name"):
                raise BadRequest(
                    f"patch {patch_id} belongs to a run of workflow {machine.workflow_name!r}, "
                    f"not {document.get('name')!r}"
                )
            overlays.append(PatchProposal(ops=record.ops, author=record.author, reason=f"patch set: {patch_id}"))
        return overlays

    async def replay(
        self, caller: Caller, run_id: str, from_node: str, mode: str, *, new_run_id: str | None = None
    ) -> dict[str, Any]:
        """A new run from ``run_id``'s history; ``new_run_id`` as in :meth:`start_run` (the new run's shard)."""
        if self.draining:
            raise Unavailable("the daemon is draining; it accepts no new runs")
        await self.check_run(caller, run_id)
        new_id = await self.engine.replay(run_id, from_node, mode, new_run_id=new_run_id)
        return (await self.engine.load(new_id)).summary()

    async def _machine(self, caller: Caller, run_id: str) -> RunMachine:
        info = await self.log.get_run(run_id)
        if info is None or info.workspace != caller.workspace:
            raise NotFound(f"no run {run_id!r} in this workspace")
        return await self.engine.load(run_id)

    async def get_run(self, caller: Caller, run_id: str) -> dict[str, Any]:
        return (await self._machine(caller, run_id)).summary()

    async def list_runs(self, caller: Caller, status: str | None, limit: int) -> list[s.RunInfoOut]:
        runs = await self.log.list_runs(status=status, workspace=caller.workspace, limit=limit)
        return [msgspec.convert(msgspec.to_builtins(r), s.RunInfoOut) for r in runs]

    async def check_run(self, caller: Caller, run_id: str) -> None:
        info = await self.log.get_run(run_id)
        if info is None or info.workspace != caller.workspace:
            raise NotFound(f"no run {run_id!r} in this workspace")

    async def events(self, caller: Caller, run_id: str, after_seq: int = 0) -> list[Any]:
        await self.check_run(caller, run_id)
        return [orjson.loads(r.data) for r in await self.log.read(run_id, after_seq)]

    async def cancel(self, caller: Caller, run_id: str, reason: str) -> dict[str, Any]:
        machine = await self._machine(caller, run_id)
        await self._check_owner(machine)
        if machine.status != "running":
            raise Conflict(f"run {run_id} is {machine.status}; only running runs can be cancelled")
        await self.engine.cancel(run_id, reason, caller.name)
        return (await self.engine.load(run_id)).summary()

    # ------------------------------------------------------------------ patches

    @staticmethod
    def _patch_info(machine: RunMachine, patch_id: str) -> s.PatchInfo:
        p = machine.patches[patch_id]
        return s.PatchInfo(
            patch_id=p.patch_id,
            run_id=machine.run_id,
            author=p.author,
            status=p.status,  # type: ignore[arg-type]
            reason=p.reason,
            ops=p.ops,
            reasons=p.reasons,
            proposed_at=p.proposed_at,
            node_id=p.node_id,
            version=p.version,
            added_nodes=p.added_nodes,
            decided_by=p.decided_by,
        )

    async def _running(self, caller: Caller, run_id: str) -> RunMachine:
        machine = await self._machine(caller, run_id)
        await self._check_owner(machine)
        if machine.status != "running":
            raise Conflict(f"run {run_id} is {machine.status}; patches and decisions apply only to running runs")
        return machine

    async def _check_owner(self, machine: RunMachine) -> None:
        """In a cluster, only the daemon driving a running run changes it (the API forwards the command there)."""
        run_id = machine.run_id
        if self.cluster is not None and machine.status == "running" and not self.cluster.owns(run_id):
            owner = await self.cluster.directory.owner_of(run_id)
            raise Misdirected(
                f"run {run_id} is driven by "
                + (f"daemon {owner[0]} ({owner[1]})" if owner else "another daemon of the cluster")
                + "; send this request there",
                owner=owner[0] if owner else None,
                owner_url=owner[1] if owner else None,
            )
        if self.cluster is not None and machine.status == "running" and not self.engine.drives(run_id):
            # Ours, but not picked up yet: created on another daemon a moment ago, its nudge still on the way.
            await self.engine.resume(run_id)
            await self.index_resumed(run_id)

    async def propose_patch(self, caller: Caller, run_id: str, body: s.PatchPost) -> s.PatchInfo:
        await self._running(caller, run_id)
        proposal = PatchProposal(ops=body.ops, author=body.author or caller.name, reason=body.reason, base=body.base)
        patch_id = await self.engine.propose_patch(run_id, proposal)
        return self._patch_info(await self.engine.load(run_id), patch_id)

    async def list_patches(self, caller: Caller, run_id: str) -> list[s.PatchInfo]:
        machine = await self._machine(caller, run_id)
        return [self._patch_info(machine, pid) for pid in machine.patches]

    @staticmethod
    def run_of_patch(patch_id: str) -> str:
        run_id, sep, number = patch_id.rpartition(".p")
        if not sep or not number.isdigit():
            raise NotFound(f"no patch {patch_id!r}: patch ids look like <run_id>.p<n>")
        return run_id

    async def get_patch(self, caller: Caller, patch_id: str) -> s.PatchInfo:
        machine = await self._machine(caller, self.run_of_patch(patch_id))
        if patch_id not in machine.patches:
            raise NotFound(f"no patch {patch_id!r}")
        return self._patch_info(machine, patch_id)

    async def decide_patch(self, caller: Caller, patch_id: str, action: str, reason: str) -> s.PatchInfo:
        run_id = self.run_of_patch(patch_id)
        machine = await self._running(caller, run_id)
        if patch_id not in machine.patches:
            raise NotFound(f"no patch {patch_id!r}")
        by = caller.name + (f" ({reason})" if reason else "")
        try:
            if action == "rollback":
                await self.engine.rollback_patch(run_id, patch_id, by)
            else:
                await self.engine.decide_patch(run_id, patch_id, action == "approve", by)
        except NotFound:
            raise
        except AobdError as exc:
            # The machine refuses decisions on patches that are not pending / rollbacks of started work.
            raise Conflict(exc.message) from None
        return self._patch_info(await self.engine.load(run_id), patch_id)

    # ------------------------------------------------------------------ approvals

    async def list_approvals(self, caller: Caller, status: str | None) -> list[s.ApprovalInfo]:
        return [
            a.info()
            for a in self._approvals.values()
            if a.workspace == caller.workspace and (status is None or a.status == status)
        ]

    async def decide_approval(self, caller: Caller, ticket: str, body: s.ApprovalDecision) -> s.ApprovalInfo:
        approval = self._approvals.get(ticket)
        if approval is None or self.cluster is not None:
            # Not indexed here (a run another daemon of the cluster drives, or one this daemon took over), or in a
            # cluster, where ownership may have moved since it was indexed: ask the run itself.
            approval = await self._approval_of_run(caller, ticket) or approval
        if approval is None or approval.workspace != caller.workspace:
            raise NotFound(f"no approval ticket {ticket!r} in this workspace")
        if approval.status != "pending":
            raise Conflict(f"ticket {ticket} was already decided: {approval.status} by {approval.decided_by}")
        try:
            await self.engine.decide_approval(approval.run_id, ticket, body.decision, caller.name, body.reason)
        except AobdError as exc:
            if isinstance(exc, NotFound):
                raise
            raise Conflict(exc.message) from None
        return approval.info()

    async def _approval_of_run(self, caller: Caller, ticket: str) -> _Approval | None:
        """The pending approval ``ticket`` names, from its run (a Misdirected error when another daemon drives
        it, which the API forwards there); None when the ticket does not name a run or the run does not wait."""
        run_id = run_of_ticket(ticket)
        if run_id is None:
            return None
        try:
            machine = await self._machine(caller, run_id)
        except NotFound:
            return None
        node_id = next((nid for nid, n in machine.nodes.items() if n.ticket == ticket), None)
        if node_id is None or machine.nodes[node_id].status != "waiting":
            return self._approvals.get(ticket)  # decided already: the index knows by whom, if it saw it
        await self._check_owner(machine)
        return self._approvals.get(ticket) or self._index_approval(machine, node_id)

    # ------------------------------------------------------------------ CAS and admin

    async def get_blob(self, caller: Caller, ref: str) -> bytes:
        if not await self.meta.owns_ref(caller.workspace, ref):
            raise NotFound(f"no blob {ref} in this workspace")
        return await self.cas.get(ref)

    async def metrics_exposition(self, accept: str | None = None) -> tuple[bytes, str] | None:
        """The whole daemon's metrics as (body, content type), in the format ``accept`` (the scrape's Accept
        header) asks for, when this process can see them all (orchestrators of the multi-process daemon: see
        :func:`aobd.metrics.merge_expositions`); None: the caller's own registry is the daemon's."""
        return self.planes_metrics(accept) if self.planes_metrics is not None else None

    def status(self, listen: str) -> s.Status:
        return s.Status(
            version=__version__,
            impl=_fast.__impl__,
            pid=os.getpid(),
            uptime_s=round(time.time() - self.started_at, 3),
            data_dir=str(Path(self.config.data_dir).resolve()),
            runs_active=len(self.engine.active_runs()),
            draining=self.draining,
            listen=listen,
            planes={
                "mode": "single-process",
                "inflight": self.engine.inflight(),
                # This process's runs computing and waiting to start ([engine] max_computing_runs).
                "admission": {
                    "limit": self.engine.admission.limit,
                    "computing": self.engine.admission.computing,
                    "waiting": self.engine.admission.waiting(),
                },
                **(self.planes_status() if self.planes_status is not None else {}),
                **({"cluster": self.cluster.status()} if self.cluster is not None else {}),
            },
        )

    def config_view(self) -> dict[str, Any]:
        return masked(self.config)
