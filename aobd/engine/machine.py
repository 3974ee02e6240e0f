"""The run state machine: commands in, events and effects out. Pure: no I/O, no clock, no randomness.

Every state change happens in :meth:`RunMachine.apply`, the fold over events; command handlers decide which
events to emit and emit them through ``_emit``, which folds each one immediately. So a machine rebuilt from
the log (:meth:`RunMachine.from_events`) is identical to the one that wrote it, which is what makes recovery,
replay and a second implementation (the Cython router) testable against each other.

Routing runs on the compiled IR with :class:`aobd._fast.Router`; edge conditions are evaluated here, in
Python, on the run context ``{"inputs": ..., "nodes": {id: {"output": ...}}}``, and handed to the router as
booleans.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from aobd import _fast
from aobd.errors import AobdError, ExpressionError, NotFound
from aobd.model import events as ev
from aobd.model.canonical import canonical_json, sha256_ref, version_of
from aobd.model.events import INLINE_OUTPUT_MAX, NodeCompleted, NodeScheduled, NodeStarted
from aobd.model.expr import compile_expr, evaluate, truthy
from aobd.model.ir import IR, IRCache
from aobd.model.patch import Judgement, PatchProposal, RunFacts, judge_patch, materialize
from aobd.model.validate import load_workflow
from aobd.model.workflow import Policy, Retry, parse_duration_ms

from .effects import Dispatch, Finished, Step, Wake

PENDING, READY, DONE, SKIPPED = 0, 1, 2, 3
#: Node statuses that count as "the past" for patch rule 4.
_ROUTER_STATUS = {
    "pending": PENDING,
    "running": READY,
    "retrying": READY,
    "waiting": READY,
    "completed": DONE,
    "failed": DONE,
    "skipped": SKIPPED,
}
_shared_ir_cache = IRCache()
#: Routing results: the node indexes made ready, and those skipped.
Routed = tuple[Sequence[int], Sequence[int]]
#: What a folded event that routes nothing routed: one shared pair of empty tuples rather than two new lists and
#: a tuple per event (1% of a W6 run's instructions); tuples, so that nothing can add to it.
_NOTHING_ROUTED: Routed = ((), ())


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class NodeRun:
    """A node's state in a run. A slotted class: compiled, machine.pxd makes it an extension type, so the
    machine's per-node methods read and set its fields as C fields (a msgspec Struct's go through the generic
    attribute lookup, about 150 instructions each, a few hundred times a W6 run)."""

    __slots__ = (
        "attempts",
        "decision",
        "error",
        "escalated",
        "finished_at",
        "inputs_ref",
        "output",
        "output_ref",
        "requested_at",
        "reused_from",
        "started_at",
        "status",
        "ticket",
        "usage",
        "wake_at",
    )

    def __init__(self) -> None:
        self.status: str = "pending"  # pending|running|retrying|waiting|completed|failed|skipped
        self.attempts: int = 0
        self.output: Any = None
        self.output_ref: str | None = None
        self.inputs_ref: str | None = None
        self.error: dict[str, Any] | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        #: When the next attempt, timer or approval deadline is due.
        self.wake_at: float | None = None
        self.ticket: str | None = None
        self.decision: dict[str, Any] | None = None
        self.requested_at: float | None = None
        #: Escalation steps already taken (indexes into config.escalation).
        self.escalated: set[int] = set()
        self.reused_from: str | None = None
        self.usage: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"NodeRun(status={self.status!r}, attempts={self.attempts!r}, output_ref={self.output_ref!r})"


@dataclass(slots=True)
class PatchRecord:
    patch_id: str
    author: str
    reason: str
    ops: list[dict[str, Any]]
    base: str | None
    node_id: str | None
    proposed_at: float
    status: str = "pending"  # pending|applied|rejected|rolled_back
    reasons: list[dict[str, Any]] = field(default_factory=list)
    version: str | None = None
    added_nodes: list[str] = field(default_factory=list)
    decided_by: str | None = None


UrlCheck = Callable[[str], list[str]]


def approval_ticket(run_id: str, node_id: str) -> str:
    """The ticket of an approval node: deterministic (recovery and replays name the same ticket) and naming its
    run, so that any daemon of a cluster can tell which run, hence which daemon, a decision is for."""
    return f"tkt_{run_id}.{hashlib.sha256(f'{run_id}:{node_id}'.encode()).hexdigest()[:12]}"


def run_of_ticket(ticket: str) -> str | None:
    """The run an approval ticket belongs to (None for tickets of the older format, which do not name it)."""
    run_id, dot, _ = ticket.removeprefix("tkt_").partition(".")
    return run_id if dot and ticket.startswith("tkt_") else None


def no_url_check(url: str) -> list[str]:
    """The URL check when no patch URL needs the SSRF guard's verdict."""
    return []


class RunMachine:
    """One run's state and the decisions on it.

    Every event is built with its header spelled out (``run_id=self.run_id, seq=self.seq + 1,
    writer=self.writer``) rather than unpacked from a shared dict: a msgspec Struct built from ``**fields`` costs
    0.63 us against 0.11 us, and W6 builds twenty events per run (docs/performance.md).
    """

    # Slots, not an instance dict, and the same names declared in machine.pxd: compiled, the class is then an
    # extension type whose attributes are C struct fields, which its own methods read directly, where each
    # ``self.x`` of an ordinary class is a generic attribute lookup (Cython does not specialize them as the
    # interpreter does; a W6 run reads about 1,400). machine.pxd also makes the methods a node's start and
    # completion call on ``self`` direct C calls. Keep the two lists the same (tests/unit/test_engine_pxd.py).
    # Measured with callgrind in docs/performance.md.
    __slots__ = (
        "_blobs",
        "_last_patch_routing",
        "_routed",
        "agent_depth",
        "base_doc",
        "base_version",
        "context",
        "created",
        "created_at",
        "doc",
        "error",
        "events_seen",
        "fidelity",
        "inputs",
        "ir",
        "ir_cache",
        "nodes",
        "outputs",
        "patches",
        "router",
        "run_id",
        "seq",
        "spawned_nodes",
        "status",
        "updated_at",
        "version",
        "workflow_name",
        "workspace",
        "writer",
    )

    def __init__(
        self, created: ev.RunCreated, base_doc: dict[str, Any], *, ir_cache: IRCache | None = None, ir: IR | None = None
    ) -> None:
        """``ir``: the base version's IR when the caller has it already (else it comes from ``ir_cache``)."""
        self.run_id = created.run_id
        self.workflow_name = created.workflow
        self.workspace = created.workspace
        self.fidelity = created.fidelity
        self.created = created
        self.base_doc = base_doc
        self.base_version = created.base_version
        self.doc = base_doc
        self.version = created.base_version
        self.inputs = created.inputs
        self.ir_cache = ir_cache or _shared_ir_cache
        self.ir = ir if ir is not None else self._compile(self.doc, self.version)
        self.router = _fast.Router(self.ir.out_offsets, self.ir.out_targets, self.ir.indegree)
        self.nodes: dict[str, NodeRun] = {nid: NodeRun() for nid in self.ir.node_ids}
        self.context: dict[str, Any] = {"inputs": self.inputs, "nodes": {}}
        self.patches: dict[str, PatchRecord] = {}
        self.spawned_nodes = 0
        self.agent_depth: dict[str, int] = {}
        self.seq = 0
        self.status = "running"
        self.error: dict[str, Any] | None = None
        self.outputs: Any = None
        self.created_at = created.ts
        self.updated_at = created.ts
        self.events_seen = 0
        #: Routing results of the last folded event, consumed by the command that emitted it.
        self._routed: Routed = _NOTHING_ROUTED
        self._last_patch_routing: Routed = _NOTHING_ROUTED
        #: Recorded on every event this machine emits (a cluster's daemon id); not part of the fold.
        self.writer: str | None = None
        #: Values of non-inline outputs, by ref: supplied when rebuilding from the log, added as they are made.
        self._blobs: Mapping[str, Any] = {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def start(
        cls,
        run_id: str,
        document: dict[str, Any],
        inputs: Any,
        now: float,
        *,
        workspace: str = "default",
        fidelity: str = "full",
        parent_run_id: str | None = None,
        parent_node_id: str | None = None,
        source_dir: str | None = None,
        ir_cache: IRCache | None = None,
        overlays: Sequence[PatchProposal] = (),
        replay: ev.ReplayPlan | None = None,
        known_outputs: Mapping[str, Any] | None = None,
        url_check: UrlCheck | None = None,
        workspace_policy: Mapping[str, Any] | None = None,
        writer: str | None = None,
        priority: str = "medium",
    ) -> tuple[RunMachine, Step]:
        """Create a run: RunCreated, the overlay patches it starts with, and the scheduling of its sources.

        Args:
            overlays: patches applied before anything runs (A/B patch sets, a replayed run's patches), each
                judged by the same rules as any patch.
            replay: what a replay reuses from its source run; ``known_outputs`` maps the plan's refs to values.
        """
        base_bytes = canonical_json(document)
        base_ref = sha256_ref(base_bytes)
        cache = ir_cache or _shared_ir_cache
        # A version already compiled was validated then: the cache hit saves re-validating every run's base.
        ir = cache.get(base_ref, lambda: load_workflow(document))
        inputs_bytes = canonical_json(inputs)
        inputs_ref = sha256_ref(inputs_bytes)
        created = ev.RunCreated(
            run_id=run_id,
            seq=1,
            ts=now,
            workflow=ir.workflow.name,
            base_version=base_ref,
            base_ref=base_ref,
            inputs_ref=inputs_ref,
            inputs=inputs,
            workspace=workspace,
            parent_run_id=parent_run_id,
            parent_node_id=parent_node_id,
            fidelity=fidelity,
            source_dir=source_dir,
            replay=replay,
            workspace_policy=dict(workspace_policy) if workspace_policy else None,
            writer=writer,
            priority=priority,
        )
        machine = cls(created, document, ir_cache=cache, ir=ir)
        machine.writer = writer
        machine.seq = 1
        machine._blobs = dict(known_outputs or {})
        step = Step(events=[created], blobs={base_ref: base_bytes, inputs_ref: inputs_bytes})
        for overlay in overlays:
            machine._propose(step, overlay, now, node_id=None, url_check=url_check or no_url_check)
        # An applied overlay rebuilt the router, which then already holds the sources as READY.
        ready = machine.router.start() or [i for i, s in enumerate(machine.router.statuses()) if s == READY]
        machine._schedule(step, ready, now)
        machine._maybe_finish(step, now)
        return machine, step

    @classmethod
    def from_events(
        cls,
        events: Sequence[ev.Event],
        base_doc: dict[str, Any],
        blobs: Mapping[str, Any] | None = None,
        *,
        ir_cache: IRCache | None = None,
    ) -> RunMachine:
        """Rebuild a machine by folding stored events. ``blobs`` maps refs of non-inline outputs to values."""
        first = events[0]
        if not isinstance(first, ev.RunCreated):
            raise AobdError(f"run {first.run_id}: first event is {type(first).__name__}, not RunCreated")
        machine = cls(first, base_doc, ir_cache=ir_cache)
        machine.seq = 1
        machine.router.start()
        machine._blobs = blobs or {}
        for event in events[1:]:
            machine.apply(event)
        return machine

    def _compile(self, doc: dict[str, Any], version: str) -> IR:
        return self.ir_cache.get(version, lambda: load_workflow(doc, source=f"run {self.run_id} version {version}"))

    # ------------------------------------------------------------------ the fold

    def apply(self, event: ev.Event) -> None:
        """Fold one event into the state. The only place state changes."""
        seq = event.seq
        if seq != self.seq + 1:
            raise AobdError(f"run {self.run_id}: event seq {seq} does not follow {self.seq}")
        self.seq = seq
        self.updated_at = event.ts
        self._routed = _NOTHING_ROUTED
        # The three events of every node by identity, as direct calls (compiled); the rest through the table.
        kind = type(event)
        if kind is NodeCompleted:
            self._on_completed(event)  # type: ignore[arg-type]
        elif kind is NodeStarted:
            self._on_started(event)  # type: ignore[arg-type]
        elif kind is NodeScheduled:
            self._on_scheduled(event)  # type: ignore[arg-type]
        else:
            handler = _FOLD.get(kind)
            if handler is not None:
                handler(self, event)

    def _on_scheduled(self, e: NodeScheduled) -> None:
        node = self.nodes[e.node_id]
        node.status = "running"
        node.attempts = e.attempt
        node.wake_at = None
        node.started_at = e.ts

    def _on_started(self, e: NodeStarted) -> None:
        node = self.nodes[e.node_id]
        node.status = "running"
        node.attempts = e.attempt
        node.inputs_ref = e.inputs_ref
        node.wake_at = None
        node.started_at = e.ts

    def _on_completed(self, e: NodeCompleted) -> None:
        # Each field of the event read once: an event is a msgspec Struct, each read a generic attribute lookup.
        node_id, ref, ts = e.node_id, e.output_ref, e.ts
        node = self.nodes[node_id]
        if e.inline or ref not in self._blobs:
            output = e.output
        else:
            output = self._blobs[ref]
        node.status = "completed"
        attempt = e.attempt
        if attempt > node.attempts:
            node.attempts = attempt
        node.output = output
        node.output_ref = ref
        node.finished_at = ts
        node.wake_at = None
        node.reused_from = e.reused_from
        node.usage = e.usage
        if node.started_at is None:
            node.started_at = ts - e.duration_ms / 1000.0
        self.context["nodes"][node_id] = {"output": output}
        self._routed = self._route_done(node_id)

    def _on_failed(self, e: ev.NodeFailed) -> None:
        node = self.nodes[e.node_id]
        node.attempts = max(node.attempts, e.attempt)
        node.error = e.error
        if e.retry_at is not None:
            node.status = "retrying"
            node.wake_at = e.retry_at
            return
        node.status = "failed"
        node.finished_at = e.ts
        node.wake_at = None
        spec = self.ir.nodes[self.ir.index[e.node_id]]
        if spec.on_error == "continue":
            # The run goes on: downstream conditions see a null output and the error.
            self.context["nodes"][e.node_id] = {"output": None, "error": e.error}
            self._routed = self._route_done(e.node_id)

    def _on_skipped(self, e: ev.NodeSkipped) -> None:
        node = self.nodes[e.node_id]
        node.status = "skipped"
        node.finished_at = e.ts
        idx = self.ir.index[e.node_id]
        if self.router.status(idx) != SKIPPED:
            # A skip decided outside routing (cancelled branch); routing skips are already known to the router.
            self._routed = self.router.skip(idx)

    def _on_patch_proposed(self, e: ev.PatchProposed) -> None:
        self.patches[e.patch_id] = PatchRecord(
            patch_id=e.patch_id,
            author=e.author,
            reason=e.reason,
            ops=e.ops,
            base=e.base,
            node_id=e.node_id,
            proposed_at=e.ts,
        )

    def _on_patch_applied(self, e: ev.PatchApplied) -> None:
        record = self.patches[e.patch_id]
        record.status = "applied"
        record.version = e.version
        record.added_nodes = list(e.added_nodes)
        record.decided_by = e.approved_by
        self.spawned_nodes += len(e.added_nodes)
        proposer_depth = self.agent_depth.get(record.node_id or "", 0)
        new_doc = _fast.apply_patch(self.doc, record.ops)
        for nid in e.added_nodes:
            node_spec = next(n for n in new_doc["nodes"] if n["id"] == nid)
            if node_spec.get("type") == "agent":
                self.agent_depth[nid] = proposer_depth + 1
        self._switch_document(new_doc, e.version)

    def _on_patch_rejected(self, e: ev.PatchRejected) -> None:
        record = self.patches[e.patch_id]
        record.status = "rejected"
        record.reasons = list(e.reasons)
        record.decided_by = e.rejected_by

    def _on_patch_rolled_back(self, e: ev.PatchRolledBack) -> None:
        record = self.patches[e.patch_id]
        record.status = "rolled_back"
        record.decided_by = e.by
        self.spawned_nodes -= len(record.added_nodes)
        applied = [p.ops for p in self.patches.values() if p.status == "applied"]
        self._switch_document(materialize(self.base_doc, applied), e.version)

    def _on_approval_requested(self, e: ev.ApprovalRequested) -> None:
        node = self.nodes[e.node_id]
        node.status = "waiting"
        node.ticket = e.ticket
        node.wake_at = e.deadline
        node.requested_at = e.ts

    def _on_approval_escalated(self, e: ev.ApprovalEscalated) -> None:
        self.nodes[e.node_id].escalated.add(e.step)

    def _on_approval_decided(self, e: ev.ApprovalDecided) -> None:
        self.nodes[e.node_id].decision = {
            "decision": e.decision,
            "by": e.by,
            "reason": e.reason,
            "at": iso(e.ts),
        }

    def _on_timer_set(self, e: ev.TimerSet) -> None:
        node = self.nodes[e.node_id]
        node.status = "waiting"
        node.wake_at = e.fire_at

    def _on_run_completed(self, e: ev.RunCompleted) -> None:
        self.status = "completed"
        self.outputs = e.outputs

    def _on_run_failed(self, e: ev.RunFailed) -> None:
        self.status = "failed"
        self.error = e.error

    def _on_run_cancelled(self, e: ev.RunCancelled) -> None:
        self.status = "cancelled"
        self.error = {"code": "cancelled", "message": e.reason or "cancelled", "by": e.by}

    # ------------------------------------------------------------------ routing helpers (used by the fold)

    def _route_done(self, node_id: str) -> Routed:
        idx = self.ir.index[node_id]
        if self.router.status(idx) == DONE:
            return [], []
        offsets = self.ir.out_offsets  # IR.out_edges, inline: ir.py is not compiled
        taken = [self._edge_taken(e) for e in range(offsets[idx], offsets[idx + 1])]
        return self.router.complete(idx, taken)

    def _edge_taken(self, edge: int) -> bool:
        cond = self.ir.edge_conds[edge]
        if cond is None:
            return True
        try:
            return truthy(evaluate(cond, self.context))
        except ExpressionError:
            # A condition that cannot be evaluated on this output is not satisfied; the event log keeps the
            # output, so the user can see why the branch was not taken.
            return False

    def _switch_document(self, new_doc: dict[str, Any], version: str) -> None:
        """Adopt a new materialized document: recompile, rebuild the router from what has happened so far."""
        old_ir = self.ir
        old_edges = self.router.edge_state()
        known = {old_ir.edge_key(e): old_edges[e] for e in range(len(old_ir.out_targets))}
        self.doc = new_doc
        self.version = version
        self.ir = ir = self._compile(new_doc, version)
        for nid in ir.node_ids:
            self.nodes.setdefault(nid, NodeRun())
        for nid in [nid for nid in self.nodes if nid not in ir.index]:
            del self.nodes[nid]  # only pending nodes can be removed (rule 4)
        statuses = [_ROUTER_STATUS[self.nodes[nid].status] for nid in ir.node_ids]
        edge_state = []
        for e in range(len(ir.out_targets)):
            key = ir.edge_key(e)
            src_status = statuses[ir.edge_sources[e]]
            if key in known and known[key] != -1:
                edge_state.append(known[key])
            elif src_status == DONE:
                edge_state.append(1 if self._edge_taken(e) else 0)
            elif src_status == SKIPPED:
                edge_state.append(0)
            else:
                edge_state.append(-1)
        self.router, ready, skipped = _fast.Router.restore(
            ir.out_offsets, ir.out_targets, ir.indegree, statuses, edge_state
        )
        self._routed = (ready, skipped)

    # ------------------------------------------------------------------ emitting

    def _type_of(self, node_id: str) -> str:
        return self.ir.nodes[self.ir.index[node_id]].type

    def _emit(self, step: Step, event: ev.Event) -> Routed:
        self.apply(event)
        step.events.append(event)
        return self._routed

    def _schedule(self, step: Step, ready: Iterable[int], now: float) -> None:
        """Emit what routing decided: dispatch ready nodes (or set their timers and tickets)."""
        for idx in ready:
            if self.status != "running":
                return
            node_id = self.ir.node_ids[idx]
            self._start_attempt(step, node_id, 1, now)

    def _emit_skips(self, step: Step, skipped: Iterable[int], now: float) -> None:
        for idx in skipped:
            node_id = self.ir.node_ids[idx]
            if self.nodes[node_id].status != "skipped":
                self._emit(
                    step,
                    ev.NodeSkipped(run_id=self.run_id, seq=self.seq + 1, writer=self.writer, ts=now, node_id=node_id),
                )

    def _after_routing(self, step: Step, routed: Routed, now: float) -> None:
        ready, skipped = routed
        self._emit_skips(step, skipped, now)
        self._schedule(step, ready, now)
        self._maybe_finish(step, now)

    def _start_attempt(self, step: Step, node_id: str, attempt: int, now: float) -> None:
        idx = self.ir.index[node_id]
        spec = self.ir.nodes[idx]
        try:
            inputs = self._resolve_inputs(idx)
        except ExpressionError as exc:
            self._emit(
                step,
                NodeScheduled(
                    run_id=self.run_id, seq=self.seq + 1, writer=self.writer, ts=now, node_id=node_id, attempt=attempt
                ),
            )
            self._fail_node(step, node_id, attempt, {"code": "binding_error", "message": exc.message}, False, now, 0.0)
            return
        if self._replayed(step, node_id, attempt, inputs, now):
            return
        if self.fidelity == "full" or spec.type in ("timer", "approval"):
            self._emit(
                step,
                NodeScheduled(
                    run_id=self.run_id, seq=self.seq + 1, writer=self.writer, ts=now, node_id=node_id, attempt=attempt
                ),
            )
            inputs_bytes = canonical_json(inputs)
            inputs_ref = sha256_ref(inputs_bytes)
            step.blobs[inputs_ref] = inputs_bytes
            self._emit(
                step,
                NodeStarted(
                    run_id=self.run_id,
                    seq=self.seq + 1,
                    writer=self.writer,
                    ts=now,
                    node_id=node_id,
                    attempt=attempt,
                    inputs_ref=inputs_ref,
                ),
            )
        else:
            node = self.nodes[node_id]
            node.status = "running"
            node.attempts = attempt
            node.started_at = now
        if spec.type == "timer":
            fire_at = self._timer_deadline(spec.config, now)
            self._emit(
                step,
                ev.TimerSet(
                    run_id=self.run_id, seq=self.seq + 1, writer=self.writer, ts=now, node_id=node_id, fire_at=fire_at
                ),
            )
            step.effects.append(Wake(fire_at, "timer", node_id))
        elif spec.type == "approval":
            timeout = spec.config.get("timeout")
            deadline = now + parse_duration_ms(timeout) / 1000.0 if timeout else None
            ticket = approval_ticket(self.run_id, node_id)
            self._emit(
                step,
                ev.ApprovalRequested(
                    run_id=self.run_id,
                    seq=self.seq + 1,
                    writer=self.writer,
                    ts=now,
                    node_id=node_id,
                    ticket=ticket,
                    assignees=list(spec.config.get("assignees", [])),
                    deadline=deadline,
                    on_timeout=spec.config.get("on_timeout", "reject"),
                ),
            )
            if deadline is not None:
                step.effects.append(Wake(deadline, "approval", node_id))
            for index, escalation in enumerate(spec.config.get("escalation", [])):
                step.effects.append(
                    Wake(now + parse_duration_ms(escalation["after"]) / 1000.0, "escalation", node_id, index)
                )
        else:
            step.effects.append(Dispatch(node_id, attempt, spec, inputs, self.ir.timeout_s[idx]))

    def _replayed(self, step: Step, node_id: str, attempt: int, inputs: dict[str, Any], now: float) -> bool:
        """In a replay, complete a node from its source run's record instead of running it, when the plan
        says so: nodes not downstream of the replay point, and (freeze) agents whose inputs are unchanged."""
        plan = self.created.replay
        if plan is None or attempt != 1:
            return False
        ref = plan.reuse.get(node_id)
        if ref is None and node_id in plan.frozen:
            recorded_inputs, recorded_output = plan.frozen[node_id]
            if sha256_ref(canonical_json(inputs)) == recorded_inputs:
                ref = recorded_output
        if ref is None or ref not in self._blobs:
            return False
        output = self._blobs[ref]
        node = self.nodes[node_id]
        node.status = "running"
        node.attempts = 1
        routed = self._emit_completed(step, node_id, 1, output, now, ref=ref, reused_from=plan.source_run)
        self._after_routing(step, routed, now)
        return True

    @staticmethod
    def _timer_deadline(config: Mapping[str, Any], now: float) -> float:
        if config.get("delay"):
            return now + parse_duration_ms(config["delay"]) / 1000.0
        return datetime.fromisoformat(str(config["until"]).replace("Z", "+00:00")).timestamp()

    def _resolve_inputs(self, idx: int) -> dict[str, Any]:
        bindings = self.ir.bindings[idx]
        spec = self.ir.nodes[idx]
        if spec.type == "map":
            # The list a map runs over is evaluated here, on the run context, like any binding.
            inputs = {name: evaluate(expr, self.context) for name, expr in bindings}
            inputs["items"] = evaluate(compile_expr(spec.config["over"]), self.context)
            return inputs
        if bindings:
            return {name: evaluate(expr, self.context) for name, expr in bindings}
        if spec.type == "join":
            # A join without bindings receives the outputs of its taken inputs, by node id.
            state = self.router.edge_state()
            return {
                self.ir.node_ids[self.ir.edge_sources[e]]: self.context["nodes"][
                    self.ir.node_ids[self.ir.edge_sources[e]]
                ]["output"]
                for e in self.ir.in_edges[idx]
                if state[e] == 1
            }
        return {}

    def _maybe_finish(self, step: Step, now: float) -> None:
        if self.status != "running" or not self.router.done():
            return
        try:
            outputs = self._run_outputs()
        except ExpressionError as exc:
            self._emit(
                step,
                ev.RunFailed(
                    run_id=self.run_id,
                    seq=self.seq + 1,
                    writer=self.writer,
                    ts=now,
                    error={"code": "output_error", "message": exc.message},
                ),
            )
            step.effects.append(Finished("failed"))
            return
        data = canonical_json(outputs)
        ref = sha256_ref(data)
        step.blobs[ref] = data
        inline = outputs if len(data) <= INLINE_OUTPUT_MAX else None
        self._emit(
            step,
            ev.RunCompleted(
                run_id=self.run_id, seq=self.seq + 1, writer=self.writer, ts=now, outputs=inline, outputs_ref=ref
            ),
        )
        self.outputs = outputs
        step.effects.append(Finished("completed"))

    def _run_outputs(self) -> Any:
        if self.ir.outputs is not None:
            return {name: evaluate(expr, self.context) for name, expr in self.ir.outputs}
        return {
            self.ir.node_ids[i]: self.nodes[self.ir.node_ids[i]].output
            for i in self.ir.sinks
            if self.nodes[self.ir.node_ids[i]].status == "completed"
        }

    # ------------------------------------------------------------------ commands

    def node_completed(
        self,
        node_id: str,
        attempt: int,
        output: Any,
        now: float,
        *,
        duration_ms: float = 0.0,
        patch: PatchProposal | None = None,
        url_check: UrlCheck = no_url_check,
        usage: dict[str, Any] | None = None,
        exchange_ref: str | None = None,
    ) -> Step:
        """An attempt finished. Duplicates and stale attempts are dropped (exactly-once recording)."""
        step = Step()
        node = self.nodes.get(node_id)
        if self.status != "running" or node is None or node.status != "running" or node.attempts != attempt:
            return step
        try:
            data = canonical_json(output)
        except TypeError as exc:
            self._fail_node(
                step,
                node_id,
                attempt,
                {
                    "code": "output_not_json",
                    "message": f"node {node_id!r} returned a value that is not JSON: {exc}",
                },
                False,
                now,
                duration_ms,
            )
            return step
        pre_ready: Sequence[int] = ()
        pre_skipped: Sequence[int] = ()
        if patch is not None:
            # Decided before this completion is routed, so edges the patch adds from this node are followed.
            self._propose(step, patch, now, node_id=node_id, url_check=url_check)
            pre_ready, pre_skipped = self._last_patch_routing
        routed = self._emit_completed(
            step,
            node_id,
            attempt,
            output,
            now,
            data=data,
            duration_ms=duration_ms,
            usage=usage,
            exchange_ref=exchange_ref,
        )
        self._after_routing(step, ([*pre_ready, *routed[0]], [*pre_skipped, *routed[1]]), now)
        return step

    def node_failed(
        self,
        node_id: str,
        attempt: int,
        error: dict[str, Any],
        retryable: bool,
        now: float,
        *,
        rand: float = 0.5,
        duration_ms: float = 0.0,
    ) -> Step:
        """An attempt failed; retry with backoff if attempts remain, else fail the node (and maybe the run)."""
        step = Step()
        node = self.nodes.get(node_id)
        if self.status != "running" or node is None or node.status != "running" or node.attempts != attempt:
            return step
        idx = self.ir.index[node_id]
        retry = self.ir.retry[idx]
        if retryable and attempt < retry.max_attempts:
            retry_at = now + backoff_s(retry, attempt, rand)
            self._emit_failure(step, node_id, attempt, error, True, now, duration_ms, retry_at=retry_at)
            step.effects.append(Wake(retry_at, "retry", node_id, attempt + 1))
            return step
        self._fail_node(step, node_id, attempt, error, retryable, now, duration_ms)
        return step

    def _emit_failure(
        self,
        step: Step,
        node_id: str,
        attempt: int,
        error: dict[str, Any],
        retryable: bool,
        now: float,
        duration_ms: float,
        *,
        retry_at: float | None = None,
    ) -> Routed:
        """NodeFailed: with ``retry_at`` another attempt follows, without it the node has failed for good."""
        return self._emit(
            step,
            ev.NodeFailed(
                run_id=self.run_id,
                seq=self.seq + 1,
                writer=self.writer,
                ts=now,
                node_id=node_id,
                node_type=self._type_of(node_id),
                attempt=attempt,
                error=error,
                retryable=retryable,
                retry_at=retry_at,
                duration_ms=duration_ms,
            ),
        )

    def _fail_node(
        self,
        step: Step,
        node_id: str,
        attempt: int,
        error: dict[str, Any],
        retryable: bool,
        now: float,
        duration_ms: float,
    ) -> None:
        routed = self._emit_failure(step, node_id, attempt, error, retryable, now, duration_ms)
        spec = self.ir.nodes[self.ir.index[node_id]]
        if spec.on_error == "continue":
            self._after_routing(step, routed, now)
            return
        plural = "s" if attempt != 1 else ""
        message = f"node {node_id!r} failed after {attempt} attempt{plural}: {error.get('message', error)}"
        self._emit(
            step,
            ev.RunFailed(
                run_id=self.run_id,
                seq=self.seq + 1,
                writer=self.writer,
                ts=now,
                error={"code": "node_failed", "message": message, "node_error": error},
                node_id=node_id,
            ),
        )
        step.effects.append(Finished("failed"))

    def escalation_due(self, node_id: str, index: int, now: float) -> dict[str, Any] | None:
        """The escalation step to take now, or None (decided, already taken, not yet due, stale)."""
        node = self.nodes.get(node_id)
        if self.status != "running" or node is None or node.status != "waiting" or node.ticket is None:
            return None
        if node.decision is not None or index in node.escalated or node.requested_at is None:
            return None
        chain = self.ir.nodes[self.ir.index[node_id]].config.get("escalation", [])
        if index >= len(chain) or now < node.requested_at + parse_duration_ms(chain[index]["after"]) / 1000.0:
            return None
        return dict(chain[index])

    def escalate(self, node_id: str, index: int, now: float, *, result: str | None = None) -> Step:
        """Record an escalation step (``result`` says how its notification went) and apply its decision."""
        step = Step()
        spec = self.escalation_due(node_id, index, now)
        if spec is None:
            return step
        ticket = self.nodes[node_id].ticket
        assert ticket is not None
        decision = spec.get("decision")
        self._emit(
            step,
            ev.ApprovalEscalated(
                run_id=self.run_id,
                seq=self.seq + 1,
                writer=self.writer,
                ts=now,
                node_id=node_id,
                ticket=ticket,
                step=index,
                notify=spec.get("notify"),
                result=result,
                decision=decision,
            ),
        )
        if decision:
            decided = self.decide_approval(ticket, decision, "system:escalation", f"escalation step {index + 1}", now)
            step.extend(decided)
        return step

    def wake(self, kind: str, node_id: str, attempt: int, now: float) -> Step:
        """A Wake effect came due. Early or stale wakes are ignored: timers fire once and never early."""
        step = Step()
        if kind == "escalation":
            return self.escalate(node_id, attempt, now)
        node = self.nodes.get(node_id)
        if self.status != "running" or node is None or node.wake_at is None or now < node.wake_at:
            return step
        if kind == "retry" and node.status == "retrying" and attempt == node.attempts + 1:
            self._start_attempt(step, node_id, attempt, now)
        elif kind == "timer" and node.status == "waiting":
            self._emit(
                step, ev.TimerFired(run_id=self.run_id, seq=self.seq + 1, writer=self.writer, ts=now, node_id=node_id)
            )
            self._complete_internal(step, node_id, {"fired_at": iso(now)}, now)
        elif kind == "approval" and node.status == "waiting" and node.ticket is not None:
            spec = self.ir.nodes[self.ir.index[node_id]]
            decision = spec.config.get("on_timeout", "reject")
            return self.decide_approval(node.ticket, decision, "system:timeout", "approval timed out", now)
        return step

    def _complete_internal(self, step: Step, node_id: str, output: Any, now: float) -> None:
        routed = self._emit_completed(step, node_id, self.nodes[node_id].attempts, output, now)
        self._after_routing(step, routed, now)

    def _emit_completed(
        self,
        step: Step,
        node_id: str,
        attempt: int,
        output: Any,
        now: float,
        *,
        data: bytes | None = None,
        ref: str | None = None,
        duration_ms: float = 0.0,
        reused_from: str | None = None,
        usage: dict[str, Any] | None = None,
        exchange_ref: str | None = None,
    ) -> Routed:
        """NodeCompleted, with the output inline when small. A new output's blob joins the step (``ref`` names a
        recorded one instead). A large output's value is handed to the fold through ``_blobs``, so the routing
        decided by this very event sees it."""
        if data is None:
            data = canonical_json(output)
        if ref is None:
            ref = sha256_ref(data)
            step.blobs[ref] = data
        inline = len(data) <= INLINE_OUTPUT_MAX
        if not inline:
            self._blobs = {**self._blobs, ref: output}
        return self._emit(
            step,
            NodeCompleted(
                run_id=self.run_id,
                seq=self.seq + 1,
                writer=self.writer,
                ts=now,
                node_id=node_id,
                node_type=self._type_of(node_id),
                attempt=attempt,
                output_ref=ref,
                output=output if inline else None,
                inline=inline,
                duration_ms=duration_ms,
                reused_from=reused_from,
                usage=usage,
                exchange_ref=exchange_ref,
            ),
        )

    def decide_approval(self, ticket: str, decision: str, by: str, reason: str, now: float) -> Step:
        """A person (or the deadline) decided an approval ticket. A second decision is refused."""
        if decision not in ("approve", "reject"):
            raise AobdError(f"decision must be 'approve' or 'reject', not {decision!r}")
        node_id = next((nid for nid, n in self.nodes.items() if n.ticket == ticket), None)
        if node_id is None:
            raise NotFound(f"run {self.run_id} has no approval ticket {ticket!r}")
        node = self.nodes[node_id]
        if node.decision is not None:
            first = node.decision
            raise AobdError(
                f"ticket {ticket} was already decided: {first['decision']} by {first['by']} at {first['at']}"
            )
        if self.status != "running":
            raise AobdError(f"run {self.run_id} is {self.status}; ticket {ticket} can no longer be decided")
        step = Step()
        self._emit(
            step,
            ev.ApprovalDecided(
                run_id=self.run_id,
                seq=self.seq + 1,
                writer=self.writer,
                ts=now,
                node_id=node_id,
                ticket=ticket,
                decision=decision,
                by=by,
                reason=reason,
            ),
        )
        self._complete_internal(step, node_id, self.nodes[node_id].decision, now)
        return step

    def cancel(self, reason: str, by: str | None, now: float) -> Step:
        step = Step()
        if self.status == "running":
            self._emit(
                step,
                ev.RunCancelled(run_id=self.run_id, seq=self.seq + 1, writer=self.writer, ts=now, reason=reason, by=by),
            )
            step.effects.append(Finished("cancelled"))
        return step

    # ------------------------------------------------------------------ patches

    def propose_patch(
        self,
        patch: PatchProposal,
        now: float,
        *,
        node_id: str | None = None,
        url_check: UrlCheck = no_url_check,
    ) -> tuple[Step, str]:
        """A person or program proposes a patch to this run (agents propose through ``node_completed``)."""
        step = Step()
        if self.status != "running":
            raise AobdError(f"run {self.run_id} is {self.status}; patches apply only to running runs")
        patch_id = self._propose(step, patch, now, node_id=node_id, url_check=url_check)
        self._after_routing(step, self._last_patch_routing, now)
        return step, patch_id

    def _facts(self, proposer: str | None) -> RunFacts:
        return RunFacts(
            policy=merge_policy(self.ir.workflow.policy, self.created.workspace_policy),
            node_status={nid: n.status for nid, n in self.nodes.items()},
            spawned_nodes=self.spawned_nodes,
            applied_patches=sum(1 for p in self.patches.values() if p.status == "applied"),
            agent_depth=self.agent_depth,
            proposer_node=proposer,
        )

    def _propose(
        self, step: Step, patch: PatchProposal, now: float, *, node_id: str | None, url_check: UrlCheck
    ) -> str:
        patch_id = f"{self.run_id}.p{len(self.patches) + 1}"
        self._emit(
            step,
            ev.PatchProposed(
                run_id=self.run_id,
                seq=self.seq + 1,
                writer=self.writer,
                ts=now,
                patch_id=patch_id,
                author=patch.author,
                ops=list(patch.ops),
                reason=patch.reason,
                base=patch.base,
                node_id=node_id,
            ),
        )
        judgement = judge_patch(self.doc, patch.ops, self._facts(node_id), url_check=url_check)
        self._last_patch_routing = self._record_judgement(step, patch_id, judgement, now, by=None)
        return patch_id

    def _record_judgement(self, step: Step, patch_id: str, judgement: Judgement, now: float, by: str | None) -> Routed:
        if not judgement.accepted:
            reasons = [msgspec.to_builtins(r) for r in judgement.reasons]
            self._emit(
                step,
                ev.PatchRejected(
                    run_id=self.run_id,
                    seq=self.seq + 1,
                    writer=self.writer,
                    ts=now,
                    patch_id=patch_id,
                    reasons=reasons,
                    rejected_by=by,
                ),
            )
            return [], []
        if judgement.needs_approval:
            return [], []  # held as pending until a person decides (decide_patch)
        assert judgement.document is not None
        data = canonical_json(judgement.document)
        version = sha256_ref(data)
        step.blobs[version] = data
        return self._emit(
            step,
            ev.PatchApplied(
                run_id=self.run_id,
                seq=self.seq + 1,
                writer=self.writer,
                ts=now,
                patch_id=patch_id,
                version=version,
                version_ref=version,
                added_nodes=judgement.added_nodes,
                approved_by=by,
            ),
        )

    def decide_patch(
        self, patch_id: str, approve: bool, by: str, now: float, *, url_check: UrlCheck = no_url_check
    ) -> Step:
        """Approve or reject a pending patch. An approved patch is judged again against the current document."""
        record = self.patches.get(patch_id)
        if record is None:
            raise NotFound(f"run {self.run_id} has no patch {patch_id!r}")
        if record.status != "pending":
            raise AobdError(
                f"patch {patch_id} is {record.status}{' by ' + record.decided_by if record.decided_by else ''}; "
                "only pending patches can be decided"
            )
        step = Step()
        if not approve:
            reasons = [{"code": "rejected_by_reviewer", "message": f"rejected by {by}", "rule": 7}]
            self._emit(
                step,
                ev.PatchRejected(
                    run_id=self.run_id,
                    seq=self.seq + 1,
                    writer=self.writer,
                    ts=now,
                    patch_id=patch_id,
                    reasons=reasons,
                    rejected_by=by,
                ),
            )
            return step
        judgement = judge_patch(self.doc, record.ops, self._facts(record.node_id), url_check=url_check, approved=True)
        routed = self._record_judgement(step, patch_id, judgement, now, by)
        self._after_routing(step, routed, now)
        return step

    def rollback_patch(self, patch_id: str, by: str, now: float) -> Step:
        """Remove an applied patch while none of the nodes it added has started."""
        record = self.patches.get(patch_id)
        if record is None:
            raise NotFound(f"run {self.run_id} has no patch {patch_id!r}")
        if record.status != "applied":
            raise AobdError(f"patch {patch_id} is {record.status}; only applied patches can be rolled back")
        started = [nid for nid in record.added_nodes if nid in self.nodes and self.nodes[nid].status != "pending"]
        if started:
            raise AobdError(
                f"patch {patch_id} cannot be rolled back: node(s) {', '.join(started)} it added already started"
            )
        remaining = [p.ops for p in self.patches.values() if p.status == "applied" and p.patch_id != patch_id]
        try:
            doc = materialize(self.base_doc, remaining)
            load_workflow(doc)
        except AobdError as exc:
            raise AobdError(
                f"patch {patch_id} cannot be rolled back: later patches depend on it ({exc.message})"
            ) from None
        step = Step()
        data = canonical_json(doc)
        version = version_of(doc)
        step.blobs[version] = data
        routed = self._emit(
            step,
            ev.PatchRolledBack(
                run_id=self.run_id,
                seq=self.seq + 1,
                writer=self.writer,
                ts=now,
                patch_id=patch_id,
                version=version,
                version_ref=version,
                by=by,
            ),
        )
        self._after_routing(step, routed, now)
        return step

    # ------------------------------------------------------------------ recovery and views

    def recover(self, now: float) -> Step:
        """What must happen after rebuilding from the log: re-dispatch running attempts (at-least-once), re-arm
        wakes, route what a crash interrupted, and finish a run whose last events were written."""
        step = Step()
        if self.status != "running":
            return step
        for nid, node in self.nodes.items():
            if node.status == "running":
                idx = self.ir.index[nid]
                try:
                    inputs = self._resolve_inputs(idx)
                except ExpressionError:
                    inputs = {}
                step.effects.append(Dispatch(nid, node.attempts, self.ir.nodes[idx], inputs, self.ir.timeout_s[idx]))
            elif node.status == "retrying" and node.wake_at is not None:
                step.effects.append(Wake(node.wake_at, "retry", nid, node.attempts + 1))
            elif node.status == "waiting":
                spec = self.ir.nodes[self.ir.index[nid]]
                if node.wake_at is not None:
                    step.effects.append(Wake(node.wake_at, "timer" if spec.type == "timer" else "approval", nid))
                for index, escalation in enumerate(spec.config.get("escalation", [])):
                    if index not in node.escalated and node.requested_at is not None:
                        at = node.requested_at + parse_duration_ms(escalation["after"]) / 1000.0
                        step.effects.append(Wake(at, "escalation", nid, index))
        # Nodes the router holds READY but that never got an attempt (fast-path mode, or a crash between a
        # routing decision and its scheduling) are started now.
        statuses = self.router.statuses()
        ready = [
            i for i, s in enumerate(statuses) if s == READY and self.nodes[self.ir.node_ids[i]].status == "pending"
        ]
        self._schedule(step, ready, now)
        self._maybe_finish(step, now)
        return step

    def summary(self, *, events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The run summary of DESIGN.md section 8."""
        nodes = self._node_summaries()
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "workflow": self.workflow_name,
            "status": self.public_status(),
            "base_version": self.base_version,
            "version": self.version,
            "nodes": nodes,
            "patches": [
                {"patch_id": p.patch_id, "author": p.author, "status": p.status, "reasons": p.reasons}
                for p in self.patches.values()
            ],
            "outputs": self.outputs,
            "error": self.error,
        }
        if self.created.parent_run_id:
            out["parent_run_id"] = self.created.parent_run_id
        if events is not None:
            out["events"] = events
        return out

    def _node_summaries(self) -> dict[str, dict[str, Any]]:
        """Each node's part of the summary (apart from :meth:`summary`: compiled, its NodeRun is typed)."""
        nodes: dict[str, dict[str, Any]] = {}
        for nid, node in self.nodes.items():
            status = node.status
            entry: dict[str, Any] = {
                "status": "running" if status == "retrying" else status,
                "attempts": node.attempts,
                "output": node.output,
            }
            # Set, not merged from conditional dicts: two temporary dicts and two merges per node cost about 1% of
            # a W6 run (perf.instructions).
            if node.error:
                entry["error"] = node.error
            if node.reused_from:
                entry["reused_from"] = node.reused_from
            nodes[nid] = entry
        return nodes

    def public_status(self) -> str:
        if self.status != "running":
            return self.status
        # Called for every step of every run, hence the single pass that stops at the first working node.
        waiting = False
        for node in self.nodes.values():
            status = node.status
            if status == "running" or status == "retrying":
                return "running"
            waiting = waiting or status == "waiting"
        if waiting:
            return "waiting"
        for patch in self.patches.values():  # a loop, not any(): compiled, a cpdef method holds no generator
            if patch.status == "pending":
                return "waiting"
        return "running"


_STRICTNESS = {"auto": 0, "approve": 1, "deny": 2}


def merge_policy(workflow: Policy, workspace: Mapping[str, Any] | None) -> Policy:
    """The stricter of a workflow's patch policy and its workspace's: a workspace can tighten, never loosen."""
    if not workspace:
        return workflow
    mode = workspace.get("patches", "auto")
    types = workspace.get("allowed_node_types")
    return Policy(
        patches=max(workflow.patches, mode, key=_STRICTNESS.__getitem__),
        max_spawned_nodes=min(
            workflow.max_spawned_nodes, workspace.get("max_spawned_nodes", workflow.max_spawned_nodes)
        ),
        max_patches=min(workflow.max_patches, workspace.get("max_patches", workflow.max_patches)),
        allowed_node_types=[t for t in workflow.allowed_node_types if types is None or t in types],
        max_agent_depth=min(workflow.max_agent_depth, workspace.get("max_agent_depth", workflow.max_agent_depth)),
    )


def backoff_s(retry: Retry, attempt: int, rand: float) -> float:
    """Delay before attempt ``attempt + 1``: exponential from ``initial_ms``, capped at ``max_ms``, with jitter.

    ``rand`` in [0, 1) comes from the driver so this stays deterministic under test.
    """
    base = min(retry.initial_ms * retry.multiplier ** (attempt - 1), retry.max_ms)
    spread = base * retry.jitter
    return max(0.0, base - spread + 2 * spread * rand) / 1000.0


#: How every other event folds into the machine (``apply`` calls the three of every node directly).
_FOLD: dict[type, Callable[[RunMachine, Any], None]] = {
    ev.NodeFailed: RunMachine._on_failed,
    ev.NodeSkipped: RunMachine._on_skipped,
    ev.PatchProposed: RunMachine._on_patch_proposed,
    ev.PatchApplied: RunMachine._on_patch_applied,
    ev.PatchRejected: RunMachine._on_patch_rejected,
    ev.PatchRolledBack: RunMachine._on_patch_rolled_back,
    ev.ApprovalRequested: RunMachine._on_approval_requested,
    ev.ApprovalDecided: RunMachine._on_approval_decided,
    ev.ApprovalEscalated: RunMachine._on_approval_escalated,
    ev.TimerSet: RunMachine._on_timer_set,
    ev.RunCompleted: RunMachine._on_run_completed,
    ev.RunFailed: RunMachine._on_run_failed,
    ev.RunCancelled: RunMachine._on_run_cancelled,
}
