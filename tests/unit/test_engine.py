"""The engine end to end on the in-memory stores: semantics a workflow author relies on."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from aobd.engine.driver import Engine
from aobd.errors import AobdError, WorkflowInvalid
from aobd.model import events as ev
from aobd.model.patch import PatchProposal
from aobd.store.memory import MemoryCas, MemoryEventLog
from tests.conftest import EXAMPLES, edge, fn, run_async, workflow


def engine(**kwargs: Any) -> Engine:
    return Engine(MemoryEventLog(), MemoryCas(), **kwargs)


async def events_of(eng: Engine, run_id: str) -> list[ev.Event]:
    return [ev.decode_event(r.data) for r in await eng.log.read(run_id)]


def types(events: list[ev.Event]) -> list[str]:
    return [ev.event_type(e) for e in events]


async def run_doc(doc: dict[str, Any], inputs: Any = None, **kwargs: Any) -> tuple[dict[str, Any], list[ev.Event]]:
    eng = engine(**kwargs)
    try:
        summary = await eng.run(doc, inputs)
        return summary, await events_of(eng, summary["run_id"])
    finally:
        await eng.close()


def load_example(name: str) -> dict[str, Any]:
    return orjson.loads((EXAMPLES / name / "workflow.json").read_bytes())


def fast_retry(max_attempts: int = 3) -> dict[str, Any]:
    return {"retry": {"max_attempts": max_attempts, "initial_ms": 1, "max_ms": 5}}


def test_w6_computes_20_and_records_a_gap_free_history(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES / "w6"))
    summary, events = run_async(run_doc(load_example("w6"), {"x": 1}))
    assert summary["status"] == "completed"
    assert summary["outputs"] == {"x": 20}
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    completed = Counter(e.node_id for e in events if isinstance(e, ev.NodeCompleted))
    assert completed == dict.fromkeys(["s1", "s2", "s3", "b1", "b2", "j"], 1)
    assert types(events)[0] == "RunCreated" and types(events)[-1] == "RunCompleted"


def test_listeners_see_each_committed_step_as_events_and_as_the_stored_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fanout publisher forwards the records' bytes as they are: they must be exactly what the log holds."""
    monkeypatch.syspath_prepend(str(EXAMPLES / "w6"))
    seen_events: list[ev.Event] = []
    seen_records: list[tuple[str, list[Any]]] = []

    async def go() -> tuple[str, list[Any]]:
        eng = engine()
        eng.listeners.append(seen_events.extend)
        eng.record_listeners.append(lambda run_id, records: seen_records.append((run_id, list(records))))
        try:
            summary = await eng.run(load_example("w6"), {"x": 1})
            return summary["run_id"], await eng.log.read(summary["run_id"])
        finally:
            await eng.close()

    run_id, stored = run_async(go())
    assert {rid for rid, _ in seen_records} == {run_id}
    assert [r for _, step in seen_records for r in step] == stored  # every step, in order, byte for byte
    assert len(seen_records) > 1  # one call per committed step, not one per run
    assert [ev.encode_event(e) for e in seen_events] == [r.data for r in stored]


def test_a_finished_run_leaves_memory_and_still_loads_whole_from_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon running thousands of runs per second must not keep the finished ones: their waiters get the
    summary, and anyone asking later gets the same run rebuilt from the log."""
    monkeypatch.syspath_prepend(str(EXAMPLES / "w6"))

    async def body() -> None:
        eng = engine()
        try:
            runs = await asyncio.gather(*(eng.run(load_example("w6"), {"x": 1}) for _ in range(20)))
            assert [r["outputs"] for r in runs] == [{"x": 20}] * 20
            assert not any(eng.drives(r["run_id"]) for r in runs)
            assert eng.active_runs() == []
            for r in runs:
                assert (await eng.load(r["run_id"])).summary() == r
                assert await eng.wait(r["run_id"]) == r  # a wait after the end answers from the log
        finally:
            await eng.close()

    run_async(body())


def test_condition_false_skips_branch_and_propagates_through_the_chain() -> None:
    doc = workflow(
        [fn("a"), fn("yes"), fn("yes2"), fn("no"), fn("no2")],
        [
            edge("a", "yes", "inputs.go"),
            edge("yes", "yes2"),
            edge("a", "no", "!inputs.go"),
            edge("no", "no2"),
        ],
    )
    summary, events = run_async(run_doc(doc, {"go": True}))
    assert summary["status"] == "completed"
    status = {k: v["status"] for k, v in summary["nodes"].items()}
    assert status == {
        "a": "completed",
        "yes": "completed",
        "yes2": "completed",
        "no": "skipped",
        "no2": "skipped",
    }
    assert {e.node_id for e in events if isinstance(e, ev.NodeSkipped)} == {"no", "no2"}


def test_join_runs_with_the_outputs_of_its_taken_inputs_only() -> None:
    doc = workflow(
        [fn("a"), fn("left"), fn("right"), {"id": "j", "type": "join"}],
        [edge("a", "left"), edge("a", "right", "`false`"), edge("left", "j"), edge("right", "j")],
    )
    summary, _ = run_async(run_doc(doc))
    assert summary["nodes"]["right"]["status"] == "skipped"
    assert summary["nodes"]["j"]["status"] == "completed"
    assert summary["nodes"]["j"]["output"] == {"left": {}}


def test_join_whose_inputs_are_all_skipped_is_skipped() -> None:
    doc = workflow(
        [fn("a"), fn("l"), fn("r"), {"id": "j", "type": "join"}],
        [edge("a", "l", "`false`"), edge("a", "r", "`false`"), edge("l", "j"), edge("r", "j")],
    )
    summary, _ = run_async(run_doc(doc))
    assert summary["status"] == "completed"
    assert summary["nodes"]["j"]["status"] == "skipped"


def test_bindings_sync_async_and_ctx_handlers() -> None:
    doc = workflow(
        [
            fn("one", "tests.handlers:add_one", **{"in": {"x": "inputs.x"}}),
            fn("two", "tests.handlers:async_double", **{"in": {"x": "nodes.one.output.x"}}),
            fn("ctx", "tests.handlers:with_ctx"),
        ],
        [edge("one", "two"), edge("two", "ctx")],
        outputs={"x": "nodes.two.output.x", "ctx": "nodes.ctx.output"},
    )
    summary, _ = run_async(run_doc(doc, {"x": 4}))
    assert summary["outputs"]["x"] == 10
    rid = summary["run_id"]
    assert summary["outputs"]["ctx"] == {"key": f"{rid}:ctx", "attempt": 1, "node": "ctx"}


def test_retries_with_backoff_then_success() -> None:
    doc = workflow(
        [{**fn("flaky", "builtin:fail"), "config": {"handler": "builtin:fail", "times": 2}, **fast_retry(3)}]
    )
    summary, events = run_async(run_doc(doc))
    assert summary["status"] == "completed"
    assert summary["nodes"]["flaky"]["attempts"] == 3
    failures = [e for e in events if isinstance(e, ev.NodeFailed)]
    assert [f.attempt for f in failures] == [1, 2]
    assert all(f.retry_at is not None and f.retry_at >= f.ts for f in failures)


def test_last_attempt_failure_fails_the_run_with_the_node_named() -> None:
    doc = workflow([{**fn("bad", "tests.handlers:boom"), **fast_retry(2)}, fn("after")], [edge("bad", "after")])
    summary, events = run_async(run_doc(doc))
    assert summary["status"] == "failed"
    assert "bad" in summary["error"]["message"] and "the handler broke on purpose" in summary["error"]["message"]
    failed = [e for e in events if isinstance(e, ev.NodeFailed)]
    assert failed[-1].error["code"] == "handler_error" and "ValueError" in failed[-1].error["message"]
    assert summary["nodes"]["after"]["status"] == "pending"


def test_non_json_output_is_a_clear_non_retryable_error() -> None:
    doc = workflow([{**fn("odd", "tests.handlers:not_json"), **fast_retry(3)}])
    summary, events = run_async(run_doc(doc))
    assert summary["status"] == "failed"
    failed = [e for e in events if isinstance(e, ev.NodeFailed)]
    assert len(failed) == 1 and failed[0].error["code"] == "output_not_json"
    assert "odd" in failed[0].error["message"]


def test_attempt_timeout_is_retried_then_fails() -> None:
    doc = workflow([{**fn("slow", "tests.handlers:slow"), "timeout_ms": 20, **fast_retry(2)}])
    summary, events = run_async(run_doc(doc))
    assert summary["status"] == "failed"
    codes = [e.error["code"] for e in events if isinstance(e, ev.NodeFailed)]
    assert codes == ["timeout", "timeout"]


def test_on_error_continue_lets_the_run_finish() -> None:
    doc = workflow(
        [{**fn("bad", "tests.handlers:boom"), "on_error": "continue", **fast_retry(1)}, fn("next")],
        [edge("bad", "next")],
    )
    summary, _ = run_async(run_doc(doc))
    assert summary["status"] == "completed"
    assert summary["nodes"]["bad"]["status"] == "failed"
    assert summary["nodes"]["next"]["status"] == "completed"


def test_a_broken_run_does_not_stop_other_runs() -> None:
    async def scenario() -> list[str]:
        eng = engine()
        good = workflow([fn("a"), fn("b")], [edge("a", "b")])
        bad = workflow([{**fn("x", "tests.handlers:boom"), **fast_retry(1)}])
        ids = [await eng.start_run(bad if i % 2 else good) for i in range(20)]
        statuses = [(await eng.wait(i))["status"] for i in ids]
        await eng.close()
        return statuses

    statuses = run_async(scenario())
    assert statuses == ["completed", "failed"] * 10


def test_invalid_workflow_is_refused_before_any_event() -> None:
    async def scenario() -> None:
        eng = engine()
        with pytest.raises(WorkflowInvalid) as info:
            await eng.start_run(workflow([fn("a"), fn("a")], [edge("a", "zz")]))
        assert "duplicate_node_id" in str(info.value) and "/edges/0/to" in str(info.value)
        assert await eng.log.list_runs() == []

    run_async(scenario())


def test_agent_patch_adds_nodes_that_run_and_invalid_patch_is_rejected_with_reasons() -> None:
    summary, events = run_async(
        run_doc(load_example("agentic"), orjson.loads((EXAMPLES / "agentic" / "inputs.json").read_bytes()))
    )
    assert summary["status"] == "completed"
    applied, rejected = summary["patches"]
    assert applied["status"] == "applied" and applied["author"] == "agent:plan"
    assert rejected["status"] == "rejected"
    codes = {r["code"] for r in rejected["reasons"]}
    assert {"past_removed", "ssrf", "invalid_result"} <= codes
    assert summary["nodes"]["lookup_account"]["status"] == "completed"
    assert summary["nodes"]["draft_reply"]["output"] == {"route": "billing", "account": "acme-corp"}
    assert summary["version"] != summary["base_version"]
    # The patch is decided before the agent's completion is routed.
    order = types(events)
    assert order.index("PatchApplied") < order.index("NodeCompleted", order.index("PatchProposed"))
    # The patch added an output to the run's document.
    assert summary["outputs"]["reply"] == {"route": "billing", "account": "acme-corp"}


def _agent(node_id: str, patch: dict[str, Any] | None, output: Any = "ok") -> dict[str, Any]:
    answer: dict[str, Any] = {"output": output}
    if patch is not None:
        answer["patch"] = patch
    return {"id": node_id, "type": "agent", "config": {"provider": "scripted", "script": [answer]}}


ADD_NODE = {
    "ops": [
        {"op": "add", "path": "/nodes/-", "value": fn("extra")},
        {"op": "add", "path": "/edges/-", "value": edge("ag", "extra")},
    ]
}


def test_patch_policy_deny_rejects_every_patch() -> None:
    doc = workflow([_agent("ag", ADD_NODE)], policy={"patches": "deny"})
    summary, _ = run_async(run_doc(doc))
    assert summary["status"] == "completed"
    assert summary["patches"][0]["status"] == "rejected"
    assert summary["patches"][0]["reasons"][0]["code"] == "policy_deny"
    assert "extra" not in summary["nodes"]


def test_spawn_limit_is_enforced() -> None:
    doc = workflow([_agent("ag", ADD_NODE)], policy={"max_spawned_nodes": 0})
    summary, _ = run_async(run_doc(doc))
    assert summary["patches"][0]["reasons"][0]["code"] == "spawn_limit"


def test_patch_may_not_touch_name_or_policy() -> None:
    doc = workflow([_agent("ag", {"ops": [{"op": "replace", "path": "/policy/max_patches", "value": 99}]})])
    summary, _ = run_async(run_doc(doc))
    reason = summary["patches"][0]["reasons"][0]
    assert reason["code"] == "out_of_scope" and reason["rule"] == 2 and reason["path"] == "/policy/max_patches"


def test_approve_policy_holds_the_patch_until_a_person_decides() -> None:
    async def scenario() -> dict[str, Any]:
        eng = engine()
        doc = workflow(
            [
                _agent("ag", ADD_NODE),
                fn("tail", "builtin:sleep", config={"handler": "builtin:sleep", "ms": 200}),
            ],
            [edge("ag", "tail")],
            policy={"patches": "approve"},
        )
        run_id = await eng.start_run(doc)
        for _ in range(100):
            await asyncio.sleep(0.005)
            machine = await eng.load(run_id)
            if machine.patches:
                break
        patch_id = next(iter(machine.patches))
        assert machine.patches[patch_id].status == "pending"
        await eng.decide_patch(run_id, patch_id, True, "alice")
        summary = await eng.wait(run_id)
        await eng.close()
        return summary

    summary = run_async(scenario())
    assert summary["patches"][0]["status"] == "applied"
    assert summary["nodes"]["extra"]["status"] == "completed"


def test_rollback_refused_once_an_added_node_started() -> None:
    async def scenario() -> None:
        eng = engine()
        doc = workflow([_agent("ag", ADD_NODE)])
        summary = await eng.run(doc)
        assert summary["nodes"]["extra"]["status"] == "completed"
        machine = await eng.load(summary["run_id"])
        with pytest.raises(AobdError, match=r"cannot be rolled back: node\(s\) extra it added already started"):
            machine.rollback_patch(summary["patches"][0]["patch_id"], "bob", 0.0)
        await eng.close()

    run_async(scenario())


def test_external_patch_to_pending_node_and_rollback() -> None:
    async def scenario() -> dict[str, Any]:
        eng = engine()
        doc = workflow(
            [fn("wait", "builtin:sleep", config={"handler": "builtin:sleep", "ms": 150}), fn("later")],
            [edge("wait", "later")],
        )
        run_id = await eng.start_run(doc)
        ops = [
            {"op": "add", "path": "/nodes/-", "value": fn("inserted")},
            {"op": "add", "path": "/edges/-", "value": edge("wait", "inserted")},
        ]
        patch_id = await eng.propose_patch(run_id, PatchProposal(ops=ops, author="user:carol", reason="try"))
        await eng.rollback_patch(run_id, patch_id, "carol")
        summary = await eng.wait(run_id)
        await eng.close()
        return summary

    summary = run_async(scenario())
    assert summary["status"] == "completed"
    assert summary["patches"][0]["status"] == "rolled_back"
    assert "inserted" not in summary["nodes"]
    assert summary["version"] == summary["base_version"]


def test_patch_changing_a_finished_node_is_rejected() -> None:
    doc = workflow(
        [
            fn("first"),
            _agent("ag", {"ops": [{"op": "replace", "path": "/nodes/0/config/handler", "value": "builtin:noop"}]}),
        ],
        [edge("first", "ag")],
    )
    summary, _ = run_async(run_doc(doc))
    reasons = summary["patches"][0]["reasons"]
    assert reasons[0]["code"] == "past_changed" and reasons[0]["node_id"] == "first" and reasons[0]["rule"] == 4


def test_map_runs_the_template_per_item_in_order() -> None:
    doc = workflow(
        [
            {
                "id": "m",
                "type": "map",
                "config": {
                    "over": "inputs.xs",
                    "concurrency": 2,
                    "node": {"type": "function", "config": {"handler": "builtin:echo"}},
                },
            }
        ],
        outputs={"items": "nodes.m.output[*].item"},
    )
    summary, _ = run_async(run_doc(doc, {"xs": [3, 1, 2]}))
    assert summary["outputs"] == {"items": [3, 1, 2]}


def test_composite_runs_a_child_run_linked_to_its_parent() -> None:
    child = workflow(
        [fn("inner", "tests.handlers:add_one", **{"in": {"x": "inputs.x"}})],
        name="child",
        outputs={"x": "nodes.inner.output.x"},
    )

    async def scenario() -> tuple[dict[str, Any], list[Any]]:
        eng = engine()
        doc = workflow(
            [{"id": "sub", "type": "composite", "config": {"definition": child}, "in": {"x": "inputs.x"}}],
            outputs={"x": "nodes.sub.output.x"},
        )
        summary = await eng.run(doc, {"x": 41})
        runs = await eng.log.list_runs()
        await eng.close()
        return summary, runs

    summary, runs = run_async(scenario())
    assert summary["outputs"] == {"x": 42}
    children = [r for r in runs if r.parent_run_id == summary["run_id"]]
    assert len(children) == 1 and children[0].status == "completed"


def test_timer_fires_once_not_early() -> None:
    doc = workflow([{"id": "t", "type": "timer", "config": {"delay": "50ms"}}, fn("after")], [edge("t", "after")])
    summary, events = run_async(run_doc(doc))
    assert summary["status"] == "completed"
    timer_set = next(e for e in events if isinstance(e, ev.TimerSet))
    fired = [e for e in events if isinstance(e, ev.TimerFired)]
    assert len(fired) == 1 and fired[0].ts >= timer_set.fire_at


def test_approval_gate_decision_branches_and_a_second_decision_is_refused() -> None:
    async def scenario() -> dict[str, Any]:
        eng = engine()
        doc = workflow(
            [{"id": "gate", "type": "approval", "config": {"assignees": ["ops"]}}, fn("ship"), fn("stop")],
            [
                edge("gate", "ship", "nodes.gate.output.decision == 'approve'"),
                edge("gate", "stop", "nodes.gate.output.decision == 'reject'"),
            ],
        )
        run_id = await eng.start_run(doc)
        machine = await eng.load(run_id)
        assert machine.public_status() == "waiting"
        ticket = machine.nodes["gate"].ticket
        assert ticket
        await eng.decide_approval(run_id, ticket, "approve", "dana", "looks right")
        with pytest.raises(AobdError, match="already decided: approve by dana"):
            await eng.decide_approval(run_id, ticket, "reject", "eve")
        summary = await eng.wait(run_id)
        await eng.close()
        return summary

    summary = run_async(scenario())
    assert summary["nodes"]["ship"]["status"] == "completed"
    assert summary["nodes"]["stop"]["status"] == "skipped"
    assert summary["nodes"]["gate"]["output"]["by"] == "dana"


def test_approval_timeout_applies_the_default_decision() -> None:
    doc = workflow([{"id": "gate", "type": "approval", "config": {"timeout": "30ms", "on_timeout": "reject"}}])
    summary, _ = run_async(run_doc(doc))
    assert summary["nodes"]["gate"]["output"]["decision"] == "reject"
    assert summary["nodes"]["gate"]["output"]["by"] == "system:timeout"


def test_fast_fidelity_leaves_out_scheduled_and_started() -> None:
    doc = workflow([fn("a"), fn("b")], [edge("a", "b")])
    summary, events = run_async(run_doc(doc, fidelity="fast"))
    assert summary["status"] == "completed"
    assert "NodeStarted" not in types(events) and "NodeScheduled" not in types(events)


def test_cancel_stops_the_run() -> None:
    async def scenario() -> dict[str, Any]:
        eng = engine()
        run_id = await eng.start_run(workflow([fn("s", "tests.handlers:slow")]))
        await eng.cancel(run_id, "no longer needed", "frank")
        summary = await eng.wait(run_id)
        await eng.close()
        return summary

    summary = run_async(scenario())
    assert summary["status"] == "cancelled"
    assert summary["error"]["by"] == "frank"


def test_conditions_see_outputs_too_large_to_ride_inline() -> None:
    doc = workflow(
        [fn("big", "tests.handlers:big"), fn("yes"), fn("no")],
        [edge("big", "yes", "nodes.big.output.route == 'yes'"), edge("big", "no", "nodes.big.output.route != 'yes'")],
    )
    summary, events = run_async(run_doc(doc))
    done = next(e for e in events if isinstance(e, ev.NodeCompleted) and e.node_id == "big")
    assert not done.inline
    assert summary["nodes"]["yes"]["status"] == "completed" and summary["nodes"]["no"]["status"] == "skipped"


def test_the_run_index_follows_the_status_though_only_changes_are_written(tmp_path: Path) -> None:
    """The driver writes a run's status to the index only when it changes (cheaper appends in SQLite): listing
    runs by status must still see every transition."""
    from aobd.store.sqlite_log import SqliteEventLog

    async def scenario() -> list[str]:
        log = SqliteEventLog(tmp_path / "events.db")
        eng = Engine(log, MemoryCas())
        doc = workflow(
            [fn("before"), {"id": "gate", "type": "approval", "config": {"assignees": ["ops"]}}, fn("after")],
            [edge("before", "gate"), edge("gate", "after")],
        )
        seen = []
        run_id = await eng.start_run(doc)
        for _ in range(200):  # the source and the gate's request commit in steps of their own
            info = await log.get_run(run_id)
            if info is not None and info.status == "waiting":
                break
            await asyncio.sleep(0.005)
        seen.append((await log.get_run(run_id)).status)  # type: ignore[union-attr]
        seen.append(",".join(r.run_id for r in await log.list_runs(status="waiting")))
        ticket = (await eng.load(run_id)).nodes["gate"].ticket
        assert ticket
        await eng.decide_approval(run_id, ticket, "approve", "dana")
        await eng.wait(run_id)
        seen.append((await log.get_run(run_id)).status)  # type: ignore[union-attr]
        seen.append(",".join(r.run_id for r in await log.list_runs(status="waiting")))
        await eng.close()
        await log.close()
        return [*seen, run_id]

    *seen, run_id = run_async(scenario())
    assert seen == ["waiting", run_id, "completed", ""]


def test_each_attempt_gets_its_own_services_naming_the_engines_current_agent_queue() -> None:
    from aobd.nodes.registry import default_executors

    seen: list[dict[str, Any]] = []
    first, second = object(), object()

    async def record(node: Any, inputs: Any, ctx: Any) -> Any:
        seen.append(dict(ctx.services))
        ctx.services["scribbled"] = True  # an executor's own copy: no other attempt sees this
        return {"ok": True}

    async def main() -> None:
        executors = default_executors()
        executors["function"] = record
        eng = engine(executors=executors)
        doc = workflow([fn("a"), fn("b")], [edge("a", "b")])
        eng.agent_jobs = first
        await eng.run(doc)
        eng.agent_jobs = second  # the daemon sets it once; a later change must still reach the next attempts
        await eng.run(doc)
        await eng.close()

    run_async(main())
    assert [s["agent_jobs"] for s in seen] == [first, first, second, second]
    assert not any("scribbled" in s for s in seen)
    assert all(s["document"]["nodes"][0]["id"] == "a" and s["version"].startswith("sha256:") for s in seen)


def test_a_waiter_that_gives_up_leaves_the_others_waiting_for_the_end() -> None:
    slow = workflow([fn("nap", "builtin:sleep", config={"handler": "builtin:sleep", "ms": 100})], [])

    async def go() -> None:
        eng = Engine(MemoryEventLog(), MemoryCas())
        try:
            run_id = await eng.start_run(slow, {})
            impatient = asyncio.create_task(eng.wait(run_id))
            patient = asyncio.create_task(eng.wait(run_id))
            await asyncio.sleep(0.01)
            impatient.cancel()  # a client that leaves
            with pytest.raises(asyncio.CancelledError):
                await impatient
            assert (await eng.wait(run_id, timeout_s=0.01))["status"] == "running"  # the run as it stands
            assert (await patient)["status"] == "completed"
            assert (await eng.wait(run_id))["status"] == "completed"  # after the end: from the log
        finally:
            await eng.close()

    run_async(go())
