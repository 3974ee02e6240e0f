"""Approval gates: timeouts, escalation chains under an injected clock, webhooks through the SSRF guard,
and per-workspace patch governance."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from aobd.engine.driver import Engine
from aobd.engine.effects import Wake
from aobd.engine.machine import RunMachine, merge_policy
from aobd.model import events as ev
from aobd.model.workflow import Policy
from aobd.store.memory import MemoryCas, MemoryEventLog
from tests.conftest import edge, fn, run_async, workflow

CHAIN = [{"after": "10m", "notify": "oncall"}, {"after": "1h", "decision": "reject"}]
GATE = workflow(
    [
        {"id": "gate", "type": "approval", "config": {"assignees": ["ops"], "timeout": "2h", "escalation": CHAIN}},
        fn("after"),
    ],
    [edge("gate", "after", "nodes.gate.output.decision == 'approve'")],
)


def kinds(events: list[ev.Event]) -> list[str]:
    return [ev.event_type(e) for e in events]


def test_escalation_chain_runs_in_order_once_and_not_early() -> None:
    machine, step = RunMachine.start("r", GATE, {}, 100.0)
    wakes = sorted((w.at, w.kind, w.attempt) for w in step.effects if isinstance(w, Wake))
    assert wakes == [(700.0, "escalation", 0), (3700.0, "escalation", 1), (7300.0, "approval", 0)]
    assert machine.escalation_due("gate", 0, 699.9) is None
    first = machine.escalate("gate", 0, 700.0, result="sent: HTTP 200")
    assert kinds(first.events) == ["ApprovalEscalated"]
    escalated = first.events[0]
    assert (
        isinstance(escalated, ev.ApprovalEscalated)
        and escalated.notify == "oncall"
        and escalated.result == "sent: HTTP 200"
    )
    assert machine.escalate("gate", 0, 701.0).events == []  # a step runs once
    second = machine.wake("escalation", "gate", 1, 3700.0)
    assert kinds(second.events)[:3] == ["ApprovalEscalated", "ApprovalDecided", "NodeCompleted"]
    assert machine.nodes["gate"].output == {
        "decision": "reject",
        "by": "system:escalation",
        "reason": "escalation step 2",
        "at": machine.nodes["gate"].output["at"],
    }
    assert machine.wake("approval", "gate", 0, 7300.0).events == []  # decided: the deadline no longer fires
    assert machine.status == "completed" and machine.nodes["after"].status == "skipped"


def test_recovery_rearms_only_the_escalations_not_taken() -> None:
    machine, step = RunMachine.start("r", GATE, {}, 100.0)
    log = list(step.events) + machine.escalate("gate", 0, 700.0, result="sent").events
    rebuilt = RunMachine.from_events([ev.decode_event(ev.encode_event(e)) for e in log], GATE)
    wakes = sorted((w.at, w.kind, w.attempt) for w in rebuilt.recover(800.0).effects if isinstance(w, Wake))
    assert wakes == [(3700.0, "escalation", 1), (7300.0, "approval", 0)]


def test_approval_timeout_decides_with_the_default() -> None:
    machine, _ = RunMachine.start("r", GATE, {}, 100.0)
    machine.nodes["gate"].escalated.update({0, 1})  # as if both steps had run without deciding
    step = machine.wake("approval", "gate", 0, 7300.0)
    assert "ApprovalDecided" in kinds(step.events)
    assert machine.nodes["gate"].decision is not None and machine.nodes["gate"].decision["by"] == "system:timeout"


async def _webhook_run(url_of: Any) -> tuple[list[dict[str, Any]], list[ev.Event]]:
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    engine = Engine(MemoryEventLog(), MemoryCas(), http_allow=[f"127.0.0.1:{port}"], webhooks={"oncall": url_of(port)})
    try:
        doc = workflow(
            [
                {
                    "id": "gate",
                    "type": "approval",
                    "config": {
                        "escalation": [{"after": "30ms", "notify": "oncall"}, {"after": "80ms", "decision": "approve"}]
                    },
                }
            ]
        )
        summary = await engine.run(doc)
        assert summary["status"] == "completed"
        events = [ev.decode_event(r.data) for r in await engine.log.read(summary["run_id"])]
        return received, events
    finally:
        await engine.close()
        await runner.cleanup()


def test_escalation_notifies_a_configured_webhook_and_records_it() -> None:
    received, events = run_async(_webhook_run(lambda port: f"http://127.0.0.1:{port}/hook"))
    assert len(received) == 1 and received[0]["event"] == "approval.escalated" and received[0]["node_id"] == "gate"
    steps = [e for e in events if isinstance(e, ev.ApprovalEscalated)]
    assert [(s.step, s.result) for s in steps] == [(0, "sent: HTTP 200"), (1, None)]
    decided = next(e for e in events if isinstance(e, ev.ApprovalDecided))
    assert decided.decision == "approve" and decided.by == "system:escalation"


def test_escalation_webhook_denied_by_the_ssrf_guard_is_recorded_not_sent() -> None:
    received, events = run_async(_webhook_run(lambda port: "http://169.254.169.254/hook"))
    assert received == []
    first = next(e for e in events if isinstance(e, ev.ApprovalEscalated))
    assert first.result is not None and first.result.startswith("failed:") and "metadata" in first.result


def test_workspace_policy_tightens_never_loosens() -> None:
    workflow_policy = Policy(patches="auto", max_spawned_nodes=20, max_patches=10)
    merged = merge_policy(
        workflow_policy, {"patches": "approve", "max_spawned_nodes": 3, "allowed_node_types": ["function"]}
    )
    assert merged.patches == "approve" and merged.max_spawned_nodes == 3 and merged.allowed_node_types == ["function"]
    assert merge_policy(Policy(patches="deny"), {"patches": "auto"}).patches == "deny"
    assert merge_policy(workflow_policy, {"max_patches": 99}).max_patches == 10


def test_a_workspace_deny_policy_rejects_agent_patches() -> None:
    async def scenario() -> dict[str, Any]:
        engine = Engine(
            MemoryEventLog(), MemoryCas(), workspace_policy=lambda ws: {"patches": "deny"} if ws == "locked" else None
        )
        answer = {"output": 1, "patch": {"ops": [{"op": "add", "path": "/nodes/-", "value": fn("extra")}]}}
        doc = workflow([{"id": "ag", "type": "agent", "config": {"provider": "scripted", "script": [answer]}}])
        locked = await engine.run(doc, workspace="locked")
        free = await engine.run(doc, workspace="free")
        await engine.close()
        return {"locked": locked, "free": free}

    result = run_async(scenario())
    assert result["locked"]["patches"][0]["reasons"][0]["code"] == "policy_deny"
    assert result["free"]["patches"][0]["status"] == "applied"


def test_timer_until_in_the_past_fires_at_once() -> None:
    doc = workflow([{"id": "t", "type": "timer", "config": {"until": "2020-01-01T00:00:00Z"}}])
    engine_result = run_async(_run_plain(doc))
    assert engine_result["status"] == "completed"


async def _run_plain(doc: dict[str, Any]) -> dict[str, Any]:
    engine = Engine(MemoryEventLog(), MemoryCas())
    try:
        return await asyncio.wait_for(engine.run(doc), 10)
    finally:
        await engine.close()


def test_a_ticket_names_its_run_and_stays_the_same_across_recovery() -> None:
    from aobd.engine.machine import approval_ticket, run_of_ticket

    ticket = approval_ticket("r01a2b3c4d5e6f7a8b9c0", "review")
    assert ticket == approval_ticket("r01a2b3c4d5e6f7a8b9c0", "review")  # replays and recovery name the same ticket
    assert ticket != approval_ticket("r01a2b3c4d5e6f7a8b9c0", "sign-off")
    assert run_of_ticket(ticket) == "r01a2b3c4d5e6f7a8b9c0"
    assert run_of_ticket("tkt_0123456789abcdef") is None  # the older format does not name its run
    assert run_of_ticket("nope.x") is None
