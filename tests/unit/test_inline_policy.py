"""``[planes] inline_sync_handlers = "auto"``: sync handlers run inline in the orchestrator until one proves slow,
and a handler that was running when an orchestrator died never runs inline there again."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from aobd.config import Config, PlanesConfig
from aobd.engine.driver import Engine
from aobd.engine.inline_policy import InlinePolicy
from aobd.metrics import Metrics
from aobd.nodes.base import NodeContext
from aobd.planes.child import _inline_policy
from aobd.planes.inline_marker import FileLedger, FileMarker, forget_demotions, ledger_path, marker_path
from aobd.store.memory import MemoryCas, MemoryEventLog
from tests.conftest import edge, fn, run_async, workflow

SLOW = "tests.handlers:dawdle"
FAST = "tests.handlers:add_one"


class Remote:
    """Stands in for the runner plane: records which nodes were sent to it."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def __call__(self, node: Any, inputs: dict[str, Any], ctx: NodeContext) -> Any:
        self.sent.append(ctx.node_id)
        return {"pid": -1, "x": 1}


def _engine(policy: InlinePolicy) -> tuple[Engine, Remote]:
    remote = Remote()
    engine = Engine(MemoryEventLog(), MemoryCas(), executors={"function": remote})
    engine.inline_handlers = True
    engine.inline_policy = policy
    return engine, remote


def _chain(handler: str, n: int, inputs: dict[str, Any]) -> dict[str, Any]:
    nodes = [fn(f"n{i}", handler, **{"in": {k: f"inputs.{k}" for k in inputs}}) for i in range(n)]
    return workflow(nodes, [edge(f"n{i}", f"n{i + 1}") for i in range(n - 1)])


def test_a_handler_over_the_budget_runs_once_inline_then_on_the_runners(tmp_path: Path) -> None:
    told: list[tuple[str, str]] = []
    ledger = FileLedger(tmp_path / "demoted")
    policy = InlinePolicy(5.0, ledger=ledger, on_demote=lambda ref, reason, why: told.append((ref, why)))
    engine, remote = _engine(policy)

    async def scenario() -> dict[str, Any]:
        try:
            return await engine.run(_chain(SLOW, 3, {"s": 0.02}), {"s": 0.02})
        finally:
            await engine.close()

    summary = run_async(scenario())
    assert summary["status"] == "completed"
    assert summary["nodes"]["n0"]["output"] == {"pid": os.getpid()}  # the first call ran here, inline
    assert remote.sent == ["n1", "n2"]  # then the handler went to the runner plane
    assert [ref for ref, _ in told] == [SLOW] and "budget 5 ms" in told[0][1]
    assert ledger.read() == {SLOW}


def test_a_handler_under_the_budget_stays_inline() -> None:
    policy = InlinePolicy(1000.0)
    engine, remote = _engine(policy)

    async def scenario() -> list[dict[str, Any]]:
        try:
            return [await engine.run(_chain(FAST, 3, {"x": 1}), {"x": 1}) for _ in range(5)]
        finally:
            await engine.close()

    assert all(s["status"] == "completed" for s in run_async(scenario()))
    assert remote.sent == [] and policy.demoted == set()


def test_a_failing_handler_is_measured_too() -> None:
    """A handler that raises after the budget is demoted like one that returns after it (its retry goes to the
    runners, which stand in here by answering)."""
    policy = InlinePolicy(5.0)
    engine, remote = _engine(policy)
    doc = workflow([fn("a", "tests.handlers:sulk", retry={"max_attempts": 2, "initial_ms": 1})])

    async def scenario() -> dict[str, Any]:
        try:
            return await engine.run(doc, {})
        finally:
            await engine.close()

    assert run_async(scenario())["status"] == "completed"
    assert remote.sent == ["a"]
    assert policy.demoted == {"tests.handlers:sulk"}


def test_the_marker_names_the_handlers_while_they_run(tmp_path: Path) -> None:
    marker = FileMarker(tmp_path / "running")
    seen: list[list[str]] = []

    def peek(inputs: Any) -> dict[str, Any]:
        seen.append(FileMarker(tmp_path / "running").left_behind())  # what a successor would read right now
        return {}

    policy = InlinePolicy(1000.0, marker=marker)
    engine, _ = _engine(policy)
    engine.handler_modules = None
    import tests.handlers as handlers

    handlers.peek = peek  # type: ignore[attr-defined]
    try:

        async def scenario() -> dict[str, Any]:
            try:
                return await engine.run(workflow([fn("a", "tests.handlers:peek")]), {})
            finally:
                await engine.close()

        assert run_async(scenario())["status"] == "completed"
    finally:
        del handlers.peek  # type: ignore[attr-defined]
    assert seen == [["tests.handlers:peek"]]
    assert marker.left_behind() == []  # idle once the set is over


def test_a_successor_demotes_what_its_predecessor_left_running(tmp_path: Path) -> None:
    config = Config(data_dir=str(tmp_path / "data"), planes=PlanesConfig(inline_budget_ms=7.0))
    (tmp_path / "data" / "planes").mkdir(parents=True)
    FileMarker(marker_path(config, 1)).running([SLOW, FAST])  # and the process "dies" without idle()
    FileLedger(ledger_path(config)).record("tests.handlers:earlier")
    metrics = Metrics(process_metrics=False)

    policy = _inline_policy(config, 1, metrics)
    assert policy.budget_ms == 7.0
    assert policy.demoted == {SLOW, FAST, "tests.handlers:earlier"}
    assert FileLedger(ledger_path(config)).read() == policy.demoted  # shared with the other orchestrators
    assert FileMarker(marker_path(config, 1)).left_behind() == []
    exposition = metrics.render()[0].decode()
    assert 'aobd_inline_handlers_demoted_total{reason="died"} 2.0' in exposition

    # Another orchestrator starts with the same demotions; a new daemon trusts every handler again.
    assert _inline_policy(config, 0, metrics).demoted == policy.demoted
    forget_demotions(config)
    assert _inline_policy(config, 1, metrics).demoted == set()


def test_a_running_orchestrator_learns_its_siblings_demotions_without_counting_them(tmp_path: Path) -> None:
    config = Config(data_dir=str(tmp_path / "data"))
    (tmp_path / "data" / "planes").mkdir(parents=True)
    metrics = Metrics(process_metrics=False)
    first, second = _inline_policy(config, 0, metrics), _inline_policy(config, 1, metrics)
    assert second.learn() == set()

    first.observed(SLOW, 50.0)  # demoted by the first orchestrator while the second runs
    assert second.allows(SLOW)  # not yet read
    assert second.learn() == {SLOW}
    assert not second.allows(SLOW) and second.learn() == set()
    exposition = metrics.render()[0].decode()
    assert 'aobd_inline_handlers_demoted_total{reason="slow"} 1.0' in exposition  # once, by the one that demoted


def test_the_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        InlinePolicy(0)


def test_the_marker_keeps_whole_refs_when_a_set_overflows_its_page(tmp_path: Path) -> None:
    refs = [f"module_{i:03}:handler_{'x' * 40}" for i in range(200)]  # about 11 KiB, the page holds 4
    marker = FileMarker(tmp_path / "running")
    marker.running(refs)
    left = FileMarker(tmp_path / "running").left_behind()
    assert 0 < len(left) < len(refs) and left == refs[: len(left)]
