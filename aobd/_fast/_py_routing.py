"""Routing: which nodes of a compiled workflow graph become ready or skipped (DESIGN.md section 4).

This is the pure-Python reference, the specification; ``routing.pyx`` is its Cython twin with the same names,
results and error messages. Callers import ``Router`` from ``aobd._fast``, which picks one of the two.

The router is sans-IO and integer-only: it never evaluates an edge condition. The engine evaluates the
``when`` of each out-edge of a completed node and passes the booleans in; the router answers which nodes
became ready to run and which were skipped by dead-path elimination.

Graph encoding (the compiled IR): nodes are ``0..n-1``; edges are numbered in CSR order by source, so the
out-edges of node ``i`` are ``out_offsets[i] .. out_offsets[i + 1] - 1`` and ``out_targets[e]`` is the node
edge ``e`` leads to; ``indegree[i]`` counts the edges into ``i``. The graph must be acyclic (the compiler
checks it); a node on a cycle would simply never be decided.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Self

__all__ = ["DONE", "PENDING", "READY", "SKIPPED", "Router"]

PENDING, READY, DONE, SKIPPED = 0, 1, 2, 3
_STATUS_NAMES = ("PENDING", "READY", "DONE", "SKIPPED")

# Edge states, as reported by Router.edge_state() and accepted by Router.restore().
_UNRESOLVED, _NOT_TAKEN, _TAKEN = -1, 0, 1


def _int_list(name: str, values: Sequence[int]) -> list[int]:
    try:
        return [operator.index(v) for v in values]
    except TypeError as exc:
        raise TypeError(f"{name} must be a sequence of integers ({exc})") from None


def _check_graph(offsets: list[int], targets: list[int], indegree: list[int]) -> None:
    n, m = len(indegree), len(targets)
    if len(offsets) != n + 1:
        raise ValueError(f"out_offsets has {len(offsets)} entries; expected n_nodes + 1 = {n + 1}")
    if offsets[0] != 0:
        raise ValueError(f"out_offsets[0] is {offsets[0]}; it must be 0")
    for i in range(n):
        if offsets[i + 1] < offsets[i]:
            raise ValueError(
                f"out_offsets must never decrease, but out_offsets[{i + 1}] = {offsets[i + 1]}"
                f" < out_offsets[{i}] = {offsets[i]}"
            )
    if offsets[n] != m:
        raise ValueError(f"out_offsets[{n}] is {offsets[n]}; it must equal len(out_targets) = {m}")
    counted = [0] * n
    for e, t in enumerate(targets):
        if not 0 <= t < n:
            raise ValueError(f"out_targets[{e}] = {t} is not a node index (0..{n - 1})")
        counted[t] += 1
    for i in range(n):
        if indegree[i] != counted[i]:
            raise ValueError(f"indegree[{i}] = {indegree[i]} but {counted[i]} edges lead into node {i}")


class Router:
    """Readiness and dead-path elimination over one run of a compiled, acyclic graph.

    Node statuses are the module constants ``PENDING``, ``READY``, ``DONE`` and ``SKIPPED``. An edge is
    unresolved until its source completes (then taken or not, as the engine says) or is skipped (then not
    taken). A pending node whose in-edges are all resolved is decided: READY if it has no in-edges or at
    least one taken in-edge, else SKIPPED, which resolves its own out-edges as not taken, transitively.

    Every mutating call returns ``(ready, skipped)``: the nodes that became READY, in ascending index order,
    and the nodes that became SKIPPED, in the order they were decided (breadth-first from the cause).
    """

    __slots__ = (
        "_edge_state",
        "_indegree",
        "_n_open",
        "_n_taken",
        "_offsets",
        "_started",
        "_status",
        "_targets",
        "_unresolved",
    )

    def __init__(self, out_offsets: Sequence[int], out_targets: Sequence[int], indegree: Sequence[int]) -> None:
        """Build a router for a graph with every node PENDING and every edge unresolved.

        Raises:
            ValueError: the arrays do not describe a CSR graph (lengths, offsets, target range, indegrees).
        """
        offsets = _int_list("out_offsets", out_offsets)
        targets = _int_list("out_targets", out_targets)
        indeg = _int_list("indegree", indegree)
        _check_graph(offsets, targets, indeg)
        n = len(indeg)
        self._offsets = offsets
        self._targets = targets
        self._indegree = indeg
        self._status = [PENDING] * n
        self._edge_state = [_UNRESOLVED] * len(targets)
        self._unresolved = list(indeg)
        self._n_taken = [0] * n
        self._n_open = n  # nodes neither DONE nor SKIPPED: done() in O(1)
        self._started = False

    @property
    def n_nodes(self) -> int:
        """Number of nodes in the graph."""
        return len(self._status)

    def start(self) -> list[int]:
        """Mark the source nodes (no in-edges) READY and return them in index order; [] once started."""
        if self._started:
            return []
        self._started = True
        status, indegree = self._status, self._indegree
        ready = [i for i in range(len(status)) if indegree[i] == 0 and status[i] == PENDING]
        for i in ready:
            status[i] = READY
        return ready

    def complete(self, node: int, taken: Sequence[bool] | bytes) -> tuple[list[int], list[int]]:
        """Mark READY ``node`` DONE and resolve its out-edges.

        Args:
            node: a READY node.
            taken: one truth value per out-edge of ``node``, in CSR order: whether the edge's condition held.
                A ``bytes`` object (one byte per edge, nonzero = taken) is accepted too.

        Returns:
            ``(ready, skipped)``: nodes that became READY (ascending) and SKIPPED (in decision order).

        Raises:
            IndexError: ``node`` is not a node index.
            ValueError: ``node`` is not READY, or ``len(taken)`` is not its out-degree. Nothing changes.
        """
        self._check_node(node)
        status = self._status
        if status[node] != READY:
            raise ValueError(f"node {node} is {_STATUS_NAMES[status[node]]}, not READY: only a ready node can complete")
        first, end = self._offsets[node], self._offsets[node + 1]
        if len(taken) != end - first:
            raise ValueError(f"node {node} has {end - first} out-edges but taken has {len(taken)} entries")
        # Read every flag before changing anything, so that a bad element leaves the router untouched.
        flags = [_TAKEN if v else _NOT_TAKEN for v in taken]
        status[node] = DONE
        self._n_open -= 1
        ready: list[int] = []
        skipped: list[int] = []
        for e in range(first, end):
            self._resolve(e, flags[e - first], ready, skipped)
        self._propagate(skipped, 0, ready)
        ready.sort()
        return ready, skipped

    def skip(self, node: int) -> tuple[list[int], list[int]]:
        """Mark a PENDING or READY node SKIPPED from outside (a cancelled branch) and propagate.

        Returns:
            ``(ready, skipped)`` as for :meth:`complete`; ``skipped`` starts with ``node`` itself. A node can
            become READY here: a join whose other input was taken.

        Raises:
            IndexError: ``node`` is not a node index.
            ValueError: ``node`` is already DONE or SKIPPED.
        """
        self._check_node(node)
        status = self._status
        if status[node] != PENDING and status[node] != READY:
            raise ValueError(
                f"node {node} is {_STATUS_NAMES[status[node]]}: only a PENDING or READY node can be skipped"
            )
        status[node] = SKIPPED
        self._n_open -= 1
        ready: list[int] = []
        skipped = [node]
        self._propagate(skipped, 0, ready)
        ready.sort()
        return ready, skipped

    def status(self, node: int) -> int:
        """Status code of ``node`` (PENDING, READY, DONE or SKIPPED)."""
        self._check_node(node)
        return self._status[node]

    def statuses(self) -> list[int]:
        """Status code of every node, by index (a copy)."""
        return list(self._status)

    def edge_state(self) -> list[int]:
        """State of every edge, by edge id: -1 unresolved, 0 not taken, 1 taken (a copy)."""
        return list(self._edge_state)

    def done(self) -> bool:
        """True when every node is DONE or SKIPPED."""
        return self._n_open == 0

    @classmethod
    def restore(
        cls,
        out_offsets: Sequence[int],
        out_targets: Sequence[int],
        indegree: Sequence[int],
        statuses: Sequence[int],
        edge_state: Sequence[int],
    ) -> tuple[Self, list[int], list[int]]:
        """Rebuild a router from recorded node statuses and edge resolutions, then settle it.

        Used on recovery and after a patch changed the graph (new nodes arrive PENDING, new edges -1).
        Out-edges of a SKIPPED node given as -1 become not taken; out-edges of a DONE node must be given as
        0 or 1 (the engine evaluates the condition of an edge added after its source completed); out-edges
        of a PENDING or READY node must be -1. Then every PENDING node whose in-edges are all resolved is
        decided, with dead-path elimination. The restored router counts as started; READY nodes passed in
        stay READY and are not reported again. In-edges of nodes that are not PENDING are not checked.

        Returns:
            ``(router, ready, skipped)``, the last two being the nodes decided while settling.

        Raises:
            ValueError: the graph is malformed, a length is wrong, a code is unknown, or an edge state
                contradicts its source's status.
        """
        router = cls(out_offsets, out_targets, indegree)
        status_in = _int_list("statuses", statuses)
        state_in = _int_list("edge_state", edge_state)
        offsets, targets, indeg = router._offsets, router._targets, router._indegree
        n, m = len(indeg), len(targets)
        if len(status_in) != n:
            raise ValueError(f"statuses has {len(status_in)} entries but the graph has {n} nodes")
        if len(state_in) != m:
            raise ValueError(f"edge_state has {len(state_in)} entries but the graph has {m} edges")
        for i, st in enumerate(status_in):
            if not PENDING <= st <= SKIPPED:
                raise ValueError(f"statuses[{i}] = {st} is not a node status (0..3)")
        for e, v in enumerate(state_in):
            if not _UNRESOLVED <= v <= _TAKEN:
                raise ValueError(f"edge_state[{e}] = {v} is not an edge state (-1, 0 or 1)")

        for s in range(n):
            st = status_in[s]
            for e in range(offsets[s], offsets[s + 1]):
                v = state_in[e]
                if st == DONE:
                    if v == _UNRESOLVED:
                        raise ValueError(
                            f"edge {e} ({s}->{targets[e]}) leaves DONE node {s} but is unresolved; pass 0 or 1"
                        )
                elif st == SKIPPED:
                    if v == _TAKEN:
                        raise ValueError(
                            f"edge {e} ({s}->{targets[e]}) leaves SKIPPED node {s} but is taken; pass 0 or -1"
                        )
                    state_in[e] = _NOT_TAKEN
                elif v != _UNRESOLVED:
                    raise ValueError(
                        f"edge {e} ({s}->{targets[e]}) leaves {_STATUS_NAMES[st]} node {s} but is resolved; pass -1"
                    )

        unresolved, n_taken = router._unresolved, router._n_taken
        for e, v in enumerate(state_in):
            if v != _UNRESOLVED:
                unresolved[targets[e]] -= 1
                if v == _TAKEN:
                    n_taken[targets[e]] += 1
        router._status = status_in
        router._edge_state = state_in
        router._n_open = sum(1 for st in status_in if st in (PENDING, READY))
        router._started = True

        # Settle: decide every PENDING node whose in-edges are all resolved, then propagate the skips.
        ready: list[int] = []
        skipped: list[int] = []
        for i in range(n):
            if status_in[i] == PENDING and unresolved[i] == 0:
                if indeg[i] == 0 or n_taken[i] > 0:
                    status_in[i] = READY
                    ready.append(i)
                else:
                    status_in[i] = SKIPPED
                    router._n_open -= 1
                    skipped.append(i)
        router._propagate(skipped, 0, ready)
        ready.sort()
        return router, ready, skipped

    def __repr__(self) -> str:
        counts = [0, 0, 0, 0]
        for st in self._status:
            counts[st] += 1
        return (
            f"<Router {len(self._status)} nodes: {counts[PENDING]} pending, {counts[READY]} ready,"
            f" {counts[DONE]} done, {counts[SKIPPED]} skipped>"
        )

    # -- internals -------------------------------------------------------------------------------------

    def _check_node(self, node: int) -> None:
        if not 0 <= node < len(self._status):
            raise IndexError(f"node {node} is out of range: the graph has {len(self._status)} nodes")

    def _resolve(self, edge: int, flag: int, ready: list[int], skipped: list[int]) -> None:
        self._edge_state[edge] = flag
        target = self._targets[edge]
        if flag:
            self._n_taken[target] += 1
        left = self._unresolved[target] - 1
        self._unresolved[target] = left
        # A node skipped from outside while pending keeps receiving resolutions; it is already decided.
        if left == 0 and self._status[target] == PENDING:
            # target has an in-edge (this one), so it runs iff one of its in-edges was taken.
            if self._n_taken[target]:
                self._status[target] = READY
                ready.append(target)
            else:
                self._status[target] = SKIPPED
                self._n_open -= 1
                skipped.append(target)

    def _propagate(self, skipped: list[int], head: int, ready: list[int]) -> None:
        # skipped doubles as the FIFO worklist: each entry's out-edges resolve as not taken, which may
        # decide (and append) further nodes. Iterative, so a long dead chain cannot hit the recursion limit.
        offsets = self._offsets
        while head < len(skipped):
            s = skipped[head]
            head += 1
            for e in range(offsets[s], offsets[s + 1]):
                self._resolve(e, _NOT_TAKEN, ready, skipped)
