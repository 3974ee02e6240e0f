"""Validation of workflow documents: every problem, each with the JSON pointer and node id it concerns.

``validate_document`` never stops at the first problem: a user fixing a workflow wants the whole list. It is
pure; checks that need the outside world (importing a handler module) come in through ``handler_check``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec

from aobd.errors import ExpressionError, WorkflowInvalid
from aobd.model.expr import compile_expr, referenced_nodes
from aobd.model.workflow import (
    CONFIG_TYPES,
    NODE_ID_RE,
    NODE_TYPES,
    Edge,
    Node,
    Workflow,
    parse_duration_ms,
)


class Problem(msgspec.Struct, frozen=True, omit_defaults=True):
    code: str
    message: str
    pointer: str = ""
    node_id: str | None = None

    def __str__(self) -> str:
        where = self.pointer or "/"
        who = f" (node {self.node_id})" if self.node_id else ""
        return f"{where}{who}: {self.message} [{self.code}]"


HandlerCheck = Callable[[str], str | None]
"""Given a ``module:attr`` reference, return None if it resolves or a message saying why not."""

_HANDLER_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_BUILTINS = ("noop", "echo", "sleep", "fail")
_MSGSPEC_PATH_RE = re.compile(r"\$((?:\.[^.\[]+|\[\d+\])*)")


def _pointer_from_msgspec(base: str, message: str) -> str:
    """Turn msgspec's ``at `$.config.url``` into a JSON pointer below ``base``."""
    match = re.search(r"at `\$([^`]*)`", message)
    if not match:
        return base
    parts = re.findall(r"\.([^.\[]+)|\[(\d+)\]", match.group(1))
    return base + "".join("/" + (key or idx) for key, idx in parts)


def _clean(message: str) -> str:
    return re.sub(r" - at `\$[^`]*`", "", message)


def validate_document(raw: Any, *, handler_check: HandlerCheck | None = None) -> tuple[Workflow | None, list[Problem]]:
    """Decode and check a workflow document.

    Returns the decoded Workflow (None when the document is too broken to decode) and the list of problems;
    the document is valid iff the list is empty.
    """
    problems: list[Problem] = []
    if not isinstance(raw, dict):
        return None, [Problem("not_an_object", "a workflow document must be a JSON object")]
    nodes_raw = raw.get("nodes")
    if not isinstance(nodes_raw, list):
        problems.append(Problem("missing_nodes", "'nodes' must be a list of node objects", "/nodes"))
        nodes_raw = []
    edges_raw = raw.get("edges", [])
    if not isinstance(edges_raw, list):
        problems.append(Problem("bad_edges", "'edges' must be a list of edge objects", "/edges"))
        edges_raw = []

    # Decode node by node and edge by edge so one bad node does not hide the problems of the others.
    nodes: list[Node] = []
    for i, item in enumerate(nodes_raw):
        pointer = f"/nodes/{i}"
        node_id = item.get("id") if isinstance(item, dict) and isinstance(item.get("id"), str) else None
        if isinstance(item, dict) and item.get("type") not in NODE_TYPES and "type" in item:
            problems.append(
                Problem(
                    "unknown_node_type",
                    f"unknown node type {item.get('type')!r}; expected one of {', '.join(NODE_TYPES)}",
                    pointer + "/type",
                    node_id,
                )
            )
            continue
        try:
            nodes.append(msgspec.convert(item, Node))
        except msgspec.ValidationError as exc:
            problems.append(Problem("schema", _clean(str(exc)), _pointer_from_msgspec(pointer, str(exc)), node_id))
    edges: list[Edge] = []
    for i, item in enumerate(edges_raw):
        try:
            edges.append(msgspec.convert(item, Edge))
        except msgspec.ValidationError as exc:
            problems.append(Problem("schema", _clean(str(exc)), _pointer_from_msgspec(f"/edges/{i}", str(exc))))

    rest = {k: v for k, v in raw.items() if k not in ("nodes", "edges")}
    rest["nodes"] = []
    try:
        shell = msgspec.convert(rest, Workflow)
    except msgspec.ValidationError as exc:
        problems.append(Problem("schema", _clean(str(exc)), _pointer_from_msgspec("", str(exc))))
        shell = None

    problems.extend(_check_nodes(nodes_raw, nodes, handler_check))
    problems.extend(_check_edges(edges_raw, nodes, edges))
    if shell is not None:
        problems.extend(_check_outputs(shell.outputs, {n.id for n in nodes}))
    if not nodes_raw and isinstance(raw.get("nodes"), list):
        problems.append(Problem("empty_workflow", "a workflow needs at least one node", "/nodes"))

    if shell is None or problems:
        return None, problems
    shell.nodes = nodes
    shell.edges = edges
    return shell, problems


def _check_nodes(nodes_raw: list[Any], nodes: list[Node], handler_check: HandlerCheck | None) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    pointer_of: dict[str, str] = {}
    for i, item in enumerate(nodes_raw):
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            pointer_of.setdefault(item["id"], f"/nodes/{i}")
    for i, node in enumerate(nodes):
        pointer = pointer_of.get(node.id, f"/nodes/{i}")
        if not NODE_ID_RE.match(node.id):
            problems.append(
                Problem(
                    "bad_node_id",
                    f"node id {node.id!r} must match [A-Za-z_][A-Za-z0-9_]{{0,63}}",
                    pointer + "/id",
                )
            )
        if node.id in seen:
            problems.append(
                Problem("duplicate_node_id", f"node id {node.id!r} is used twice", pointer + "/id", node.id)
            )
        seen[node.id] = i
        for name, source in node.in_.items():
            problems.extend(_check_expr(source, f"{pointer}/in/{name}", node.id))
        problems.extend(_check_config(node, pointer, handler_check))
        if node.retry is not None and node.retry.max_attempts < 1:
            problems.append(Problem("bad_retry", "retry.max_attempts must be >= 1", pointer + "/retry", node.id))
        if node.timeout_ms is not None and node.timeout_ms <= 0:
            problems.append(Problem("bad_timeout", "timeout_ms must be > 0", pointer + "/timeout_ms", node.id))
    return problems


def _check_expr(source: str, pointer: str, node_id: str | None) -> list[Problem]:
    try:
        compile_expr(source)
    except ExpressionError as exc:
        return [Problem("bad_expression", exc.message, pointer, node_id)]
    return []


def _check_config(node: Node, pointer: str, handler_check: HandlerCheck | None) -> list[Problem]:
    problems: list[Problem] = []
    try:
        config = msgspec.convert(node.config, CONFIG_TYPES[node.type])
    except msgspec.ValidationError as exc:
        where = _pointer_from_msgspec(pointer + "/config", str(exc))
        return [Problem("bad_config", f"{node.type} node: {_clean(str(exc))}", where, node.id)]
    cp = pointer + "/config"
    if node.type == "function":
        handler = node.config["handler"]
        if handler.startswith("builtin:"):
            if handler.removeprefix("builtin:") not in _BUILTINS:
                problems.append(
                    Problem(
                        "bad_handler",
                        f"unknown builtin {handler!r}; builtins: {', '.join(_BUILTINS)}",
                        cp + "/handler",
                        node.id,
                    )
                )
        elif not _HANDLER_RE.match(handler):
            problems.append(
                Problem("bad_handler", f"handler {handler!r} must be 'module:attr'", cp + "/handler", node.id)
            )
        elif handler_check is not None and (why := handler_check(handler)) is not None:
            problems.append(Problem("bad_handler", why, cp + "/handler", node.id))
    elif node.type == "map":
        problems.extend(_check_expr(node.config["over"], cp + "/over", node.id))
        template = node.config["node"]
        if template.get("type") not in NODE_TYPES or template.get("type") in (
            "map",
            "approval",
            "timer",
            "composite",
        ):
            problems.append(
                Problem(
                    "bad_config",
                    "map.node.type must be function, http, agent or join",
                    cp + "/node/type",
                    node.id,
                )
            )
    elif node.type == "agent":
        if node.config.get("provider", "scripted") == "scripted" and node.config.get("runner") != "external":
            if not node.config.get("script"):
                problems.append(
                    Problem(
                        "bad_config",
                        "a scripted agent needs a non-empty config.script",
                        cp + "/script",
                        node.id,
                    )
                )
        elif node.config.get("provider") == "openai" and not (node.config.get("base_url") and node.config.get("model")):
            problems.append(
                Problem("bad_config", "an openai agent needs config.base_url and config.model", cp, node.id)
            )
    elif node.type == "composite":
        if bool(node.config.get("workflow")) == bool(node.config.get("definition")):
            problems.append(
                Problem(
                    "bad_config",
                    "composite needs exactly one of config.workflow or config.definition",
                    cp,
                    node.id,
                )
            )
    elif node.type in ("timer", "approval"):
        for key in ("delay", "timeout"):
            value = node.config.get(key)
            if isinstance(value, str):
                try:
                    parse_duration_ms(value)
                except ValueError as exc:
                    problems.append(Problem("bad_duration", str(exc), f"{cp}/{key}", node.id))
        if node.type == "timer" and bool(node.config.get("delay")) == bool(node.config.get("until")):
            problems.append(
                Problem("bad_config", "timer needs exactly one of config.delay or config.until", cp, node.id)
            )
    del config
    return problems


def _check_edges(edges_raw: list[Any], nodes: list[Node], edges: list[Edge]) -> list[Problem]:
    problems: list[Problem] = []
    ids = {n.id for n in nodes}
    seen: set[tuple[str, str]] = set()
    j = 0
    for i, item in enumerate(edges_raw):
        if (
            j >= len(edges)
            or not isinstance(item, dict)
            or item.get("from") != edges[j].from_
            or item.get("to") != edges[j].to
        ):
            continue  # this raw edge failed to decode; already reported
        edge = edges[j]
        j += 1
        pointer = f"/edges/{i}"
        for end, node_id in (("from", edge.from_), ("to", edge.to)):
            if node_id not in ids:
                problems.append(
                    Problem("unknown_node", f"edge {end} {node_id!r}: no such node", f"{pointer}/{end}", node_id)
                )
        if edge.from_ == edge.to:
            problems.append(Problem("self_loop", f"edge from {edge.from_!r} to itself", pointer, edge.from_))
        if (edge.from_, edge.to) in seen:
            problems.append(Problem("duplicate_edge", f"edge {edge.from_} -> {edge.to} appears twice", pointer))
        seen.add((edge.from_, edge.to))
        if edge.when is not None:
            problems.extend(_check_expr(edge.when, pointer + "/when", None))
    cycle = find_cycle(ids, [(e.from_, e.to) for e in edges if e.from_ in ids and e.to in ids])
    if cycle:
        problems.append(Problem("cycle", "edges form a cycle: " + " -> ".join(cycle), "/edges", cycle[0]))
    problems.extend(_check_references(nodes, edges, ids))
    return problems


def _check_references(nodes: list[Node], edges: list[Edge], ids: set[str]) -> list[Problem]:
    """Expressions may read only nodes that exist (reading a non-upstream node is allowed but racy)."""
    problems: list[Problem] = []
    for node in nodes:
        for name, source in node.in_.items():
            for ref in sorted(referenced_nodes(source) - ids):
                problems.append(
                    Problem(
                        "unknown_reference",
                        f"'in.{name}' reads node {ref!r}, which does not exist",
                        "",
                        node.id,
                    )
                )
    for edge in edges:
        if edge.when:
            for ref in sorted(referenced_nodes(edge.when) - ids):
                problems.append(
                    Problem(
                        "unknown_reference",
                        f"edge {edge.from_} -> {edge.to} condition reads unknown node {ref!r}",
                        "/edges",
                    )
                )
    return problems


def _check_outputs(outputs: dict[str, str] | None, ids: set[str]) -> list[Problem]:
    problems: list[Problem] = []
    for name, source in (outputs or {}).items():
        problems.extend(_check_expr(source, f"/outputs/{name}", None))
        for ref in sorted(referenced_nodes(source) - ids):
            problems.append(
                Problem("unknown_reference", f"output {name!r} reads unknown node {ref!r}", f"/outputs/{name}")
            )
    return problems


def find_cycle(ids: set[str], edges: list[tuple[str, str]]) -> list[str] | None:
    """A cycle as a list of node ids (first repeated at the end), or None when the graph is acyclic."""
    succ: dict[str, list[str]] = {i: [] for i in ids}
    for a, b in edges:
        succ[a].append(b)
    color = dict.fromkeys(ids, 0)
    parent: dict[str, str] = {}
    for root in sorted(ids):
        if color[root]:
            continue
        stack = [(root, iter(succ[root]))]
        color[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = 2
                stack.pop()
            elif color[nxt] == 0:
                color[nxt] = 1
                parent[nxt] = node
                stack.append((nxt, iter(succ[nxt])))
            elif color[nxt] == 1:
                cycle = [nxt]
                cur = node
                while cur != nxt:
                    cycle.append(cur)
                    cur = parent[cur]
                cycle.append(nxt)
                return list(reversed(cycle))
    return None


def load_workflow(raw: Any, *, handler_check: HandlerCheck | None = None, source: str = "workflow") -> Workflow:
    """Decode and validate, raising WorkflowInvalid listing every problem."""
    workflow, problems = validate_document(raw, handler_check=handler_check)
    if problems or workflow is None:
        lines = "\n".join(f"  {p}" for p in problems)
        raise WorkflowInvalid(
            f"{source} is not a valid workflow ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n{lines}",
            details=[msgspec.to_builtins(p) for p in problems],
        )
    return workflow
