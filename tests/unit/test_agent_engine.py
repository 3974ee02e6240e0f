"""An OpenAI-compatible agent inside a real run: its patch extends the graph, its usage and exchange are kept."""

from __future__ import annotations

from typing import Any

import orjson

from aobd.agents.stub_server import StubLLM
from aobd.engine.driver import Engine
from aobd.model import events as ev
from aobd.store.memory import MemoryCas, MemoryEventLog
from tests.conftest import edge, fn, run_async, workflow

PATCH = {
    "reason": "needs a summary",
    "ops": [
        {"op": "add", "path": "/nodes/-", "value": fn("summarize", **{"in": {"route": "nodes.triage.output.route"}})},
        {"op": "add", "path": "/edges/-", "value": edge("triage", "summarize")},
    ],
}


async def scenario(responses: list[dict[str, Any]]) -> tuple[dict[str, Any], list[ev.Event], Engine, StubLLM]:
    stub = StubLLM(responses)
    base_url = await stub.start()
    port = base_url.split(":")[2].split("/")[0]
    engine = Engine(MemoryEventLog(), MemoryCas(), http_allow=[f"127.0.0.1:{port}"])
    agent = {
        "id": "triage",
        "type": "agent",
        "config": {"provider": "openai", "base_url": base_url, "model": "stub-model", "prompt": "Route this ticket."},
        "in": {"ticket": "inputs.ticket"},
        "retry": {"max_attempts": 3, "initial_ms": 1, "max_ms": 5},
    }
    summary = await engine.run(workflow([agent]), {"ticket": "refund please"})
    events = [ev.decode_event(r.data) for r in await engine.log.read(summary["run_id"])]
    return summary, events, engine, stub


def test_openai_agent_patch_applies_and_the_exchange_is_stored() -> None:
    async def run() -> None:
        summary, events, engine, stub = await scenario([{"answer": {"output": {"route": "billing"}, "patch": PATCH}}])
        try:
            assert summary["status"] == "completed", summary
            assert summary["patches"][0]["status"] == "applied"
            assert summary["nodes"]["summarize"]["output"] == {"route": "billing"}
            done = next(e for e in events if isinstance(e, ev.NodeCompleted) and e.node_id == "triage")
            assert done.usage and done.usage.get("total_tokens", 0) > 0
            assert done.exchange_ref is not None
            exchange = orjson.loads(await engine.cas.get(done.exchange_ref))
            assert "Route this ticket." in orjson.dumps(exchange).decode()
            assert "refund please" in orjson.dumps(stub.completions[0].body).decode()
        finally:
            await engine.close()
            await stub.close()

    run_async(run())


def test_malformed_answers_are_retried_then_recorded_as_failures() -> None:
    async def run() -> None:
        summary, events, engine, stub = await scenario([{"raw": "this is not json"}])
        try:
            assert summary["status"] == "failed"
            failures = [e for e in events if isinstance(e, ev.NodeFailed)]
            assert [f.error["code"] for f in failures] == ["agent_bad_answer"] * 3
            assert len(stub.completions) == 3
        finally:
            await engine.close()
            await stub.close()

    run_async(run())
