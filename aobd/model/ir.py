"""Compiled IR of a materialized workflow: dense integer indexes, CSR successor arrays, compiled expressions.

The IR is what routing runs on. Compiling is a pure function of the document, so IRs are cached by version:
every run of the same version shares one IR, and a patched run compiles its new version once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from jmespath.parser import ParsedResult

from aobd.model.expr import compile_expr
from aobd.model.workflow import Node, Retry, Workflow, node_retry, node_timeout_ms


@dataclass(frozen=True, slots=True)
class IR:
    version: str
    workflow: Workflow
    node_ids: tuple[str, ...]
    index: dict[str, int]
    nodes: tuple[Node, ...]
    #: CSR: out-edges of node i are edge ids out_offsets[i] .. out_offsets[i+1]-1.
    out_offsets: tuple[int, ...]
    out_targets: tuple[int, ...]
    #: Per edge id: the compiled ``when`` (None: always taken) and its source node.
    edge_conds: tuple[ParsedResult | None, ...]
    edge_sources: tuple[int, ...]
    indegree: tuple[int, ...]
    #: Per node: incoming edge ids (for join inputs and for rewiring checks).
    in_edges: tuple[tuple[int, ...], ...]
    #: Per node: compiled input bindings.
    bindings: tuple[tuple[tuple[str, ParsedResult], ...], ...]
    retry: tuple[Retry, ...]
    timeout_s: tuple[float, ...]
    outputs: tuple[tuple[str, ParsedResult], ...] | None
    sinks: tuple[int, ...]

    def edge_key(self, edge: int) -> tuple[str, str]:
        return self.node_ids[self.edge_sources[edge]], self.node_ids[self.out_targets[edge]]

    def out_edges(self, node: int) -> range:
        return range(self.out_offsets[node], self.out_offsets[node + 1])


def compile_ir(workflow: Workflow, version: str) -> IR:
    """Compile a validated workflow. Node order is document order, so indexes are stable across patches that
    only append nodes."""
    node_ids = tuple(n.id for n in workflow.nodes)
    index = {nid: i for i, nid in enumerate(node_ids)}
    n = len(node_ids)
    by_source: list[list[tuple[int, ParsedResult | None]]] = [[] for _ in range(n)]
    indegree = [0] * n
    for edge in workflow.edges:
        src, dst = index[edge.from_], index[edge.to]
        by_source[src].append((dst, compile_expr(edge.when) if edge.when else None))
        indegree[dst] += 1
    offsets = [0]
    targets: list[int] = []
    conds: list[ParsedResult | None] = []
    sources: list[int] = []
    in_edges: list[list[int]] = [[] for _ in range(n)]
    for src, outs in enumerate(by_source):
        for dst, cond in outs:
            in_edges[dst].append(len(targets))
            targets.append(dst)
            conds.append(cond)
            sources.append(src)
        offsets.append(len(targets))
    outputs = None
    if workflow.outputs is not None:
        outputs = tuple((name, compile_expr(src)) for name, src in workflow.outputs.items())
    return IR(
        version=version,
        workflow=workflow,
        node_ids=node_ids,
        index=index,
        nodes=tuple(workflow.nodes),
        out_offsets=tuple(offsets),
        out_targets=tuple(targets),
        edge_conds=tuple(conds),
        edge_sources=tuple(sources),
        indegree=tuple(indegree),
        in_edges=tuple(tuple(e) for e in in_edges),
        bindings=tuple(tuple((k, compile_expr(v)) for k, v in node.in_.items()) for node in workflow.nodes),
        retry=tuple(node_retry(workflow, node) for node in workflow.nodes),
        timeout_s=tuple(node_timeout_ms(workflow, node) / 1000.0 for node in workflow.nodes),
        outputs=outputs,
        sinks=tuple(i for i in range(n) if offsets[i] == offsets[i + 1]),
    )


class IRCache:
    """A bounded LRU of compiled IRs by version (shared by every run in the process)."""

    def __init__(self, capacity: int = 1024) -> None:
        self._items: OrderedDict[str, IR] = OrderedDict()
        self._capacity = capacity
        self.hits = 0
        self.misses = 0

    def get(self, version: str, workflow_factory: Any) -> IR:
        """The IR of ``version``; ``workflow_factory()`` returns the validated Workflow on a miss."""
        ir = self._items.get(version)
        if ir is not None:
            self.hits += 1
            self._items.move_to_end(version)
            return ir
        self.misses += 1
        ir = compile_ir(workflow_factory(), version)
        self._items[version] = ir
        if len(self._items) > self._capacity:
            self._items.popitem(last=False)
        return ir
