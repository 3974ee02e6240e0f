"""Replay and fork: what is reused, what runs again, and that a frozen replay reproduces the run."""

from __future__ import annotations

from typing import Any

import orjson

from aobd.engine.driver import Engine
from aobd.model import events as ev
from aobd.store.memory import MemoryCas, MemoryEventLog
from tests import handlers
from tests.conftest import EXAMPLES, edge, fn, run_async, workflow


def counted(node_id: str, **extra: Any) -> dict[str, Any]:
    return fn(node_id, "tests.handlers:count", **extra)


CHAIN = workflow(
    [counted("a"), counted("b"), counted("c")],
    [edge("a", "b"), edge("b", "c")],
    outputs={"c": "nodes.c.output"},
)


async def _replay(
    doc: dict[str, Any], inputs: Any, from_node: str, mode: str
) -> tuple[dict[str, Any], dict[str, Any], list[ev.Event]]:
    engine = Engine(MemoryEventLog(), MemoryCas())
    try:
        original = await engine.run(doc, inputs)
        replay_id = await engine.replay(original["run_id"], from_node, mode)
        replayed = await engine.wait(replay_id)
        events = [ev.decode_event(r.data) for r in await engine.log.read(replay_id)]
        return original, replayed, events
    finally:
        await engine.close()


def test_replay_from_a_middle_node_reuses_upstream_and_reruns_downstream() -> None:
    handlers.CALLS.clear()
    original, replayed, events = run_async(_replay(CHAIN, {}, "b", "live"))
    assert original["status"] == replayed["status"] == "completed"
    # The side-effect counter per node: a ran once (reused in the replay), b and c ran twice.
    runs_per_node = {key.split(":")[1]: n for key, n in handlers.CALLS.items() if key.startswith(original["run_id"])}
    assert runs_per_node == {"a": 1, "b": 1, "c": 1}
    replay_calls = {key.split(":")[1]: n for key, n in handlers.CALLS.items() if key.startswith(replayed["run_id"])}
    assert replay_calls == {"b": 1, "c": 1}
    reused = [e for e in events if isinstance(e, ev.NodeCompleted) and e.reused_from]
    assert [e.node_id for e in reused] == ["a"] and reused[0].reused_from == original["run_id"]
    created = events[0]
    assert isinstance(created, ev.RunCreated) and created.parent_run_id == original["run_id"]
    assert created.replay is not None and created.replay.from_node == "b"


def test_frozen_replay_of_the_agentic_example_from_its_first_node_reproduces_outputs_and_version() -> None:
    doc = orjson.loads((EXAMPLES / "agentic" / "workflow.json").read_bytes())
    inputs = orjson.loads((EXAMPLES / "agentic" / "inputs.json").read_bytes())
    original, replayed, events = run_async(_replay(doc, inputs, "intake", "freeze"))
    assert replayed["status"] == "completed"
    assert replayed["outputs"] == original["outputs"]
    assert replayed["version"] == original["version"] and replayed["base_version"] == original["base_version"]
    # The original's applied patch came along as an overlay before anything ran.
    assert [ev.event_type(e) for e in events[1:3]] == ["PatchProposed", "PatchApplied"]
    # Agents whose inputs did not change replayed their recorded answers.
    agents = {
        e.node_id: e.reused_from for e in events if isinstance(e, ev.NodeCompleted) and e.node_id in ("plan", "review")
    }
    assert agents == {"plan": original["run_id"], "review": original["run_id"]}


def test_live_replay_calls_agents_again() -> None:
    doc = orjson.loads((EXAMPLES / "agentic" / "workflow.json").read_bytes())
    inputs = orjson.loads((EXAMPLES / "agentic" / "inputs.json").read_bytes())
    _, replayed, events = run_async(_replay(doc, inputs, "plan", "live"))
    assert replayed["status"] == "completed"
    plan_done = next(e for e in events if isinstance(e, ev.NodeCompleted) and e.node_id == "plan")
    assert plan_done.reused_from is None
    intake_done = next(e for e in events if isinstance(e, ev.NodeCompleted) and e.node_id == "intake")
    assert intake_done.reused_from is not None
    # Called again, the agent re-proposes its patch, which no longer applies on top of the overlay.
    assert replayed["patches"][0]["status"] == "applied"
    assert "rejected" in [p["status"] for p in replayed["patches"][1:]]
