"""The inline path: attempts whose handlers cannot await run inside the step that made them ready.

What a workflow author relies on is unchanged by it (durability before execution, retries, timeouts of what
does await, draining); what changes is that a ready set's completions share one append.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from aobd.engine.driver import Engine
from aobd.model import events as ev
from aobd.nodes.base import NodeContext
from aobd.store.memory import MemoryCas, MemoryEventLog
from aobd.store.protocols import EventRecord, RunIndex
from tests.conftest import edge, fn, run_async, workflow

HERE = "tests.unit.test_inline_steps"


def label(event: ev.Event) -> str:
    return f"{ev.event_type(event)}:{getattr(event, 'node_id', '')}"


class RecordingLog(MemoryEventLog):
    """A memory log that remembers which event types went into each append."""

    def __init__(self) -> None:
        super().__init__()
        self.appends: list[list[str]] = []

    async def append(self, run_id: str, records: Sequence[EventRecord], *, index: RunIndex | None = None) -> None:
        await super().append(run_id, records, index=index)
        self.appends.append([label(ev.decode_event(r.data)) for r in records])

    def stored(self, run_id: str) -> list[ev.AnyEvent]:
        """What is durable right now (read synchronously, as a handler running inline would see it)."""
        return [ev.decode_event(r.data) for r in self._events.get(run_id, [])]


LOG: RecordingLog | None = None
ENGINE: Engine | None = None
SEEN: list[tuple[str, list[str]]] = []
CALLS: dict[str, int] = {}


def remember_durable(inputs: dict[str, Any], ctx: NodeContext) -> dict[str, Any]:
    assert LOG is not None
    SEEN.append((ctx.node_id, [label(e) for e in LOG.stored(ctx.run_id)]))
    return {"x": 1}


def flaky(inputs: dict[str, Any], ctx: NodeContext) -> dict[str, Any]:
    CALLS[ctx.node_id] = CALLS.get(ctx.node_id, 0) + 1
    if ctx.attempt < 3:
        raise RuntimeError(f"attempt {ctx.attempt} breaks")
    return {"attempt": ctx.attempt}


def returns_coroutine(inputs: dict[str, Any]) -> Any:
    async def later() -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"later": True}

    return later()


def returns_slow_coroutine(inputs: dict[str, Any]) -> Any:
    return asyncio.sleep(30)


def starts_draining(inputs: dict[str, Any]) -> dict[str, Any]:
    assert ENGINE is not None
    ENGINE.draining = True
    return {"x": 1}


def one() -> dict[str, Any]:
    return fn("a", f"{HERE}:remember_durable")


def diamond() -> dict[str, Any]:
    return workflow(
        [one(), fn("b", f"{HERE}:remember_durable"), fn("c", f"{HERE}:remember_durable"), fn("j")],
        [edge("a", "b"), edge("a", "c"), edge("b", "j"), edge("c", "j")],
    )


async def run_on(log: RecordingLog, doc: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    global LOG
    LOG = log
    eng = Engine(log, MemoryCas(), **kwargs)
    try:
        return await eng.run(doc, {})
    finally:
        await eng.close()


@pytest.fixture(autouse=True)
def _clean() -> None:
    SEEN.clear()
    CALLS.clear()


def test_the_completions_of_a_ready_set_share_one_append() -> None:
    log = RecordingLog()
    summary = run_async(run_on(log, diamond(), fidelity="fast"))
    assert summary["status"] == "completed"
    assert ["NodeCompleted:b", "NodeCompleted:c"] in log.appends
    # RunCreated, a, (b, c), (j and RunCompleted): one append per ready set.
    assert len(log.appends) == 4


@pytest.mark.parametrize("fidelity", ["full", "fast"])
def test_a_node_runs_only_once_the_step_that_started_it_is_durable(fidelity: str) -> None:
    summary = run_async(run_on(RecordingLog(), diamond(), fidelity=fidelity))
    assert summary["status"] == "completed"
    seen = dict(SEEN)
    assert seen.keys() == {"a", "b", "c"}
    assert "NodeCompleted:a" in seen["b"] and "NodeCompleted:a" in seen["c"]
    if fidelity == "full":
        for node_id, durable in seen.items():
            assert f"NodeStarted:{node_id}" in durable, node_id


def test_a_failing_sync_handler_is_retried_and_each_failure_recorded() -> None:
    log = RecordingLog()
    doc = workflow([fn("f", f"{HERE}:flaky", retry={"max_attempts": 3, "initial_ms": 1, "max_ms": 2})])
    summary = run_async(run_on(log, doc))
    assert summary["status"] == "completed"
    assert summary["nodes"]["f"]["output"] == {"attempt": 3}
    failures = [e for e in log.stored(summary["run_id"]) if isinstance(e, ev.NodeFailed)]
    assert [f.attempt for f in failures] == [1, 2]
    assert all(f.error["code"] == "handler_error" and "breaks" in f.error["message"] for f in failures)
    assert CALLS == {"f": 3}


def test_a_sync_handler_returning_a_coroutine_is_awaited() -> None:
    summary = run_async(run_on(RecordingLog(), workflow([fn("c", f"{HERE}:returns_coroutine")])))
    assert summary["status"] == "completed"
    assert summary["nodes"]["c"]["output"] == {"later": True}


def test_the_timeout_applies_to_the_coroutine_a_sync_handler_returns() -> None:
    doc = workflow([fn("c", f"{HERE}:returns_slow_coroutine", timeout_ms=50, retry={"max_attempts": 1})])
    summary = run_async(run_on(RecordingLog(), doc))
    assert summary["status"] == "failed"
    assert summary["nodes"]["c"]["error"]["code"] == "timeout"


def test_another_function_executor_gets_every_attempt() -> None:
    """The runner plane and the cluster's job topics replace the function executor: nothing may bypass them."""
    executed: list[str] = []

    async def remote(node: Any, inputs: dict[str, Any], ctx: NodeContext) -> Any:
        executed.append(ctx.node_id)
        return {"remote": True}

    summary = run_async(run_on(RecordingLog(), diamond(), executors={"function": remote}))
    assert summary["status"] == "completed"
    assert sorted(executed) == ["a", "b", "c", "j"]
    assert SEEN == []  # the handlers themselves never ran in this process


def test_draining_stops_the_inline_chain_and_a_resume_finishes_it() -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        global ENGINE
        log = RecordingLog()
        doc = workflow([fn("a", f"{HERE}:starts_draining"), fn("b")], [edge("a", "b")])
        first = ENGINE = Engine(log, MemoryCas())
        run_id = await first.start_run(doc, {})
        for _ in range(100):
            await asyncio.sleep(0)
        before = (await first.load(run_id)).summary()
        await first.close()
        second = Engine(log, first.cas)
        await second.resume(run_id)
        after = await second.wait(run_id)
        await second.close()
        return before, after

    before, after = run_async(scenario())
    assert before["status"] == "running"
    assert before["nodes"]["a"]["status"] == "completed"
    assert before["nodes"]["b"]["status"] == "running"  # recorded as started, never dispatched
    assert after["status"] == "completed"
    assert after["nodes"]["b"]["status"] == "completed"


def test_an_orchestrator_told_to_inline_keeps_sync_handlers_and_sends_the_rest() -> None:
    """``planes.inline_sync_handlers``: the orchestrator runs sync handlers itself, async ones still leave it."""
    executed: list[str] = []

    async def remote(node: Any, inputs: dict[str, Any], ctx: NodeContext) -> Any:
        executed.append(ctx.node_id)
        return {"remote": True}

    async def scenario() -> dict[str, Any]:
        global LOG
        LOG = RecordingLog()
        eng = Engine(LOG, MemoryCas(), executors={"function": remote})
        eng.inline_handlers = True
        doc = workflow(
            [one(), fn("later", "tests.handlers:async_double", **{"in": {"x": "nodes.a.output.x"}})],
            [edge("a", "later")],
        )
        try:
            return await eng.run(doc, {})
        finally:
            await eng.close()

    summary = run_async(scenario())
    assert summary["status"] == "completed"
    assert [node_id for node_id, _ in SEEN] == ["a"]  # ran here, inline
    assert executed == ["later"]  # an async handler: the runner plane's
