"""Patch governance (DESIGN.md section 3): whether a proposed patch may change a run's graph.

``judge_patch`` is a pure function of the current materialized document, the run's facts and the patch; it
returns either the new document or the machine-readable reasons for refusing. The SSRF rule needs DNS, which
is I/O: the driver resolves the patch's URLs beforehand and passes the verdicts in through ``url_check``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from aobd import _fast
from aobd.errors import PatchError
from aobd.model.validate import validate_document
from aobd.model.workflow import Policy

#: The parts of a workflow document a patch may touch (rule 2).
PATCHABLE_ROOTS = ("/nodes", "/edges", "/outputs")


class PatchReason(msgspec.Struct, frozen=True, omit_defaults=True):
    """Why a patch was refused. ``rule`` is the DESIGN.md section 3 rule number."""

    code: str
    message: str
    rule: int
    path: str | None = None
    op_index: int | None = None
    node_id: str | None = None


class PatchProposal(msgspec.Struct, frozen=True, omit_defaults=True):
    """A patch as agents, people and programs propose it."""

    ops: list[dict[str, Any]]
    author: str = "unknown"
    reason: str = ""
    base: str | None = None


UrlCheck = Callable[[str], list[str]]
"""Given an http node URL, the SSRF guard's reasons for refusing it (empty when allowed)."""


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What governance needs to know about the run the patch targets."""

    policy: Policy
    #: node id -> status; any status but "pending" means the node is part of the immutable past.
    node_status: Mapping[str, str]
    spawned_nodes: int = 0
    applied_patches: int = 0
    #: node id -> agent nesting depth of agent nodes (base agents are 0).
    agent_depth: Mapping[str, int] = field(default_factory=dict)
    proposer_node: str | None = None


@dataclass(frozen=True, slots=True)
class Judgement:
    accepted: bool
    reasons: list[PatchReason]
    document: dict[str, Any] | None = None
    added_nodes: list[str] = field(default_factory=list)
    #: True when the policy holds the patch for a person's approval (``policy.patches = "approve"``).
    needs_approval: bool = False


def judge_patch(
    document: dict[str, Any],
    ops: Sequence[Mapping[str, Any]],
    facts: RunFacts,
    *,
    url_check: UrlCheck,
    approved: bool = False,
    count_limits: bool = True,
) -> Judgement:
    """Apply rules 1-7 to ``ops`` against the current materialized ``document``.

    Args:
        approved: a person already approved it (rule 7 then passes for ``approve`` policies).
        count_limits: False when re-judging an already counted patch (approval, replay).
    """
    if facts.policy.patches == "deny":
        return Judgement(False, [PatchReason("policy_deny", "this workflow's patch policy is 'deny'", 7)])
    reasons = _check_scope(ops)
    if reasons:
        return Judgement(False, reasons)
    try:
        new_doc = _fast.apply_patch(document, ops)
    except PatchError as exc:
        return Judgement(False, [PatchReason("apply_failed", exc.message, 1, exc.path, exc.op_index)])
    if not isinstance(new_doc, dict):
        return Judgement(False, [PatchReason("apply_failed", "the patched document is not an object", 1)])

    # Rules 3-6 are all checked, so the proposer learns every reason at once, not one per attempt.
    _, problems = validate_document(new_doc)
    reasons = [PatchReason("invalid_result", p.message, 3, p.pointer or None, None, p.node_id) for p in problems]
    old_nodes = _nodes_by_id(document)
    new_nodes = _nodes_by_id(new_doc)
    added = [nid for nid in new_nodes if nid not in old_nodes]
    reasons += _check_past(document, new_doc, old_nodes, new_nodes, facts)
    reasons += _check_limits(added, new_nodes, facts, count_limits)
    reasons += _check_handlers(document, old_nodes, new_nodes)
    reasons += _check_urls(old_nodes, new_nodes, url_check)
    if reasons:
        return Judgement(False, reasons)
    if facts.policy.patches == "approve" and not approved:
        return Judgement(True, [], new_doc, added, needs_approval=True)
    return Judgement(True, [], new_doc, added)


def _check_scope(ops: Sequence[Mapping[str, Any]]) -> list[PatchReason]:
    reasons = []
    if not ops:
        return [PatchReason("empty_patch", "a patch needs at least one operation", 1)]
    for i, op in enumerate(ops):
        if not isinstance(op, Mapping):
            reasons.append(PatchReason("bad_op", f"op {i} is not an object", 1, None, i))
            continue
        for key in ("path", "from"):
            pointer = op.get(key)
            if key == "from" and op.get("op") not in ("move", "copy"):
                continue
            if not isinstance(pointer, str):
                continue  # rule 1 reports the malformed op with RFC 6902's own words
            if not any(pointer == root or pointer.startswith(root + "/") for root in PATCHABLE_ROOTS):
                reasons.append(
                    PatchReason(
                        "out_of_scope",
                        f"op {i} ({op.get('op')}) {key} {pointer!r} is outside /nodes, /edges and /outputs",
                        2,
                        pointer,
                        i,
                    )
                )
    return reasons


def _nodes_by_id(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    nodes = doc.get("nodes")
    if not isinstance(nodes, list):
        return {}
    return {n["id"]: n for n in nodes if isinstance(n, dict) and isinstance(n.get("id"), str)}


def _edges(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    edges = doc.get("edges")
    if not isinstance(edges, list):
        return []
    return [e for e in edges if isinstance(e, dict) and isinstance(e.get("from"), str) and isinstance(e.get("to"), str)]


def _edge_set(doc: Mapping[str, Any]) -> set[tuple[str, str]]:
    return {(e["from"], e["to"]) for e in _edges(doc)}


def _check_past(
    old_doc: Mapping[str, Any],
    new_doc: Mapping[str, Any],
    old_nodes: Mapping[str, Any],
    new_nodes: Mapping[str, Any],
    facts: RunFacts,
) -> list[PatchReason]:
    """Rule 4: nodes that started, finished or were skipped are immutable, and so are the edges into them."""
    reasons = []
    past = {nid for nid, status in facts.node_status.items() if status != "pending" and nid in old_nodes}
    for nid in sorted(past):
        if nid not in new_nodes:
            status = facts.node_status[nid]
            reasons.append(
                PatchReason("past_removed", f"node {nid!r} is {status} and cannot be removed", 4, None, None, nid)
            )
        elif new_nodes[nid] != old_nodes[nid]:
            status = facts.node_status[nid]
            reasons.append(
                PatchReason("past_changed", f"node {nid!r} is {status} and cannot be changed", 4, None, None, nid)
            )
    old_edges, new_edges = _edge_set(old_doc), _edge_set(new_doc)
    old_when = {(e["from"], e["to"]): e.get("when") for e in _edges(old_doc)}
    for edge in sorted(new_edges ^ old_edges):
        if edge[1] in past:
            verb = "added" if edge in new_edges else "removed"
            reasons.append(
                PatchReason(
                    "past_edge",
                    f"edge {edge[0]} -> {edge[1]} cannot be {verb}: {edge[1]!r} is {facts.node_status[edge[1]]}",
                    4,
                    None,
                    None,
                    edge[1],
                )
            )
    for e in _edges(new_doc):
        key = (e["from"], e["to"])
        if key in old_edges and key[1] in past and e.get("when") != old_when.get(key):
            reasons.append(
                PatchReason(
                    "past_edge",
                    f"the condition of edge {key[0]} -> {key[1]} cannot change",
                    4,
                    None,
                    None,
                    key[1],
                )
            )
    return reasons


def _check_limits(
    added: list[str], new_nodes: Mapping[str, Any], facts: RunFacts, count_limits: bool
) -> list[PatchReason]:
    """Rule 5: spawn limits, patch count, node types and agent nesting depth."""
    policy = facts.policy
    reasons = []
    if count_limits and facts.applied_patches + 1 > policy.max_patches:
        reasons.append(
            PatchReason(
                "too_many_patches",
                f"this run already has {facts.applied_patches} patches (max_patches={policy.max_patches})",
                5,
            )
        )
    if count_limits and facts.spawned_nodes + len(added) > policy.max_spawned_nodes:
        reasons.append(
            PatchReason(
                "spawn_limit",
                f"adding {len(added)} nodes would make {facts.spawned_nodes + len(added)} spawned nodes "
                f"(max_spawned_nodes={policy.max_spawned_nodes})",
                5,
            )
        )
    proposer_depth = facts.agent_depth.get(facts.proposer_node or "", 0)
    for nid in added:
        node_type = new_nodes[nid].get("type")
        if node_type is None:
            continue  # rule 3 already reports it
        if node_type not in policy.allowed_node_types:
            reasons.append(
                PatchReason(
                    "node_type_not_allowed",
                    f"a patch may not add {node_type!r} nodes (allowed: {', '.join(policy.allowed_node_types)})",
                    5,
                    None,
                    None,
                    nid,
                )
            )
        if node_type == "agent" and proposer_depth + 1 > policy.max_agent_depth:
            reasons.append(
                PatchReason(
                    "agent_depth",
                    f"agent {nid!r} would nest at depth {proposer_depth + 1} "
                    f"(max_agent_depth={policy.max_agent_depth})",
                    5,
                    None,
                    None,
                    nid,
                )
            )
    return reasons


def handler_modules(document: Mapping[str, Any]) -> set[str]:
    """Modules of the function handlers a document uses (builtins excluded)."""
    modules = set()
    for node in _nodes_by_id(document).values():
        config = node.get("config")
        handler = config.get("handler") if isinstance(config, dict) else None
        if node.get("type") == "function" and isinstance(handler, str) and not handler.startswith("builtin:"):
            modules.add(handler.partition(":")[0])
    return modules


def _check_handlers(
    old_doc: Mapping[str, Any], old_nodes: Mapping[str, Any], new_nodes: Mapping[str, Any]
) -> list[PatchReason]:
    """Rule 5 (node types an agent may add): a patch may call builtins and the handler modules the workflow
    already uses, never a new module. An agent steered by a hostile prompt could otherwise run
    ``subprocess:run`` with inputs of its choosing."""
    known = handler_modules(old_doc)
    reasons = []
    for nid, node in new_nodes.items():
        if node.get("type") != "function" or old_nodes.get(nid) == node:
            continue
        config = node.get("config")
        handler = config.get("handler") if isinstance(config, dict) else None
        if not isinstance(handler, str) or handler.startswith("builtin:"):
            continue
        module = handler.partition(":")[0]
        if module not in known:
            reasons.append(
                PatchReason(
                    "handler_not_allowed",
                    f"a patch may call builtins and the handler modules this workflow already uses "
                    f"({', '.join(sorted(known)) or 'none'}), not {module!r}",
                    5,
                    None,
                    None,
                    nid,
                )
            )
    return reasons


def _check_urls(old_nodes: Mapping[str, Any], new_nodes: Mapping[str, Any], url_check: UrlCheck) -> list[PatchReason]:
    """Rule 6: every http URL a patch adds or changes passes the SSRF guard."""
    reasons = []
    for nid, node in new_nodes.items():
        if node.get("type") != "http" or old_nodes.get(nid) == node:
            continue
        config = node.get("config")
        url = config.get("url") if isinstance(config, dict) else None
        if not isinstance(url, str):
            continue  # rule 3 already reports it
        for why in url_check(url):
            reasons.append(PatchReason("ssrf", why, 6, None, None, nid))
    return reasons


def http_urls(ops: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every string under a ``url`` key in the ops' values: what the driver resolves before judging."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "url" and isinstance(item, str):
                    found.append(item)
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for op in ops:
        if isinstance(op, Mapping):
            walk(op.get("value"))
    return found


def materialize(base: dict[str, Any], patches: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Base plus the ordered accepted patches. Deterministic; ``base`` is never mutated."""
    doc = base
    for ops in patches:
        doc = _fast.apply_patch(doc, ops)
    return doc
