"""The sans-IO run machine: exactly-once recording, fold determinism, recovery, backoff."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from aobd.engine.effects import Dispatch, Finished, Step, Wake
from aobd.engine.machine import RunMachine, backoff_s
from aobd.model import events as ev
from aobd.model.patch import PatchProposal
from aobd.model.workflow import Retry
from tests.conftest import edge, fn, workflow

DIAMOND = workflow(
    [fn("a"), fn("b"), fn("c"), fn("d")],
    [edge("a", "b"), edge("a", "c", "inputs.take_c"), edge("b", "d"), edge("c", "d")],
)


def dispatches(step: Step) -> list[str]:
    return [e.node_id for e in step.effects if isinstance(e, Dispatch)]


def start(doc: dict[str, Any] = DIAMOND, inputs: Any = None, **kw: Any) -> tuple[RunMachine, list[ev.Event]]:
    machine, step = RunMachine.start("run1", doc, inputs or {"take_c": True}, 100.0, **kw)
    return machine, list(step.events)


def roundtrip(events: list[ev.Event]) -> list[ev.Event]:
    """Events as the log gives them back: encoded and decoded."""
    return [ev.decode_event(ev.encode_event(e)) for e in events]


def test_start_records_run_created_and_dispatches_sources() -> None:
    _, step = RunMachine.start("run1", DIAMOND, {"take_c": True}, 100.0)
    assert ev.event_type(step.events[0]) == "RunCreated"
    assert dispatches(step) == ["a"]
    # Base document and inputs go to the CAS with the first step.
    created = step.events[0]
    assert isinstance(created, ev.RunCreated)
    assert created.base_ref in step.blobs and created.inputs_ref in step.blobs


def test_duplicate_and_stale_completions_are_dropped() -> None:
    machine, _ = start()
    first = machine.node_completed("a", 1, {"v": 1}, 101.0)
    assert ev.event_type(first.events[0]) == "NodeCompleted"
    again = machine.node_completed("a", 1, {"v": 2}, 102.0)
    assert again.events == [] and again.effects == []
    stale = machine.node_completed("b", 7, None, 102.0)
    assert stale.events == []
    assert machine.nodes["a"].output == {"v": 1}


def test_fold_of_recorded_events_rebuilds_identical_state() -> None:
    machine, log = start()
    for node, t in (("a", 101.0), ("b", 102.0), ("c", 103.0), ("d", 104.0)):
        step = machine.node_completed(node, 1, {"n": node}, t)
        log += step.events
    assert machine.status == "completed"
    rebuilt = RunMachine.from_events(roundtrip(log), DIAMOND)
    assert rebuilt.summary() == machine.summary()
    assert rebuilt.seq == machine.seq == len(log)


def test_recover_redispatches_running_attempts_and_rearms_retries() -> None:
    doc = workflow(
        [{**fn("a"), "retry": {"max_attempts": 3, "initial_ms": 1000, "max_ms": 1000, "jitter": 0}}, fn("b")]
    )
    machine, log = start(doc, {})
    log += machine.node_failed("a", 1, {"code": "x", "message": "x"}, True, 101.0).events
    rebuilt = RunMachine.from_events(roundtrip(log), doc)
    step = rebuilt.recover(101.5)
    wakes = [e for e in step.effects if isinstance(e, Wake)]
    assert [(w.node_id, w.attempt, w.at) for w in wakes] == [("a", 2, 102.0)]
    # b was running when the process died: dispatched again (at-least-once), same attempt.
    assert dispatches(step) == ["b"]
    # An early wake does nothing; a due one starts attempt 2.
    assert rebuilt.wake("retry", "a", 2, 101.9).events == []
    due = rebuilt.wake("retry", "a", 2, 102.0)
    assert dispatches(due) == ["a"] and rebuilt.nodes["a"].attempts == 2


def test_recover_in_fast_mode_starts_ready_nodes_that_have_no_events() -> None:
    machine, log = start(fidelity="fast")
    log += machine.node_completed("a", 1, 1, 101.0).events
    assert "NodeStarted" not in [ev.event_type(e) for e in log]
    rebuilt = RunMachine.from_events(roundtrip(log), DIAMOND)
    step = rebuilt.recover(102.0)
    assert sorted(dispatches(step)) == ["b", "c"]


def test_failure_after_last_attempt_fails_run_and_finishes() -> None:
    doc = workflow([{**fn("a"), "retry": {"max_attempts": 1}}])
    machine, _ = start(doc, {})
    step = machine.node_failed("a", 1, {"code": "boom", "message": "boom"}, True, 101.0)
    assert [ev.event_type(e) for e in step.events] == ["NodeFailed", "RunFailed"]
    assert any(isinstance(e, Finished) and e.status == "failed" for e in step.effects)
    assert machine.summary()["error"]["node_error"]["code"] == "boom"


def test_backoff_grows_exponentially_capped_with_bounded_jitter() -> None:
    retry = Retry(max_attempts=10, initial_ms=100, max_ms=1000, multiplier=2.0, jitter=0.2)
    assert backoff_s(retry, 1, 0.5) == pytest.approx(0.1)
    assert backoff_s(retry, 3, 0.5) == pytest.approx(0.4)
    assert backoff_s(retry, 8, 0.5) == pytest.approx(1.0)
    assert 0.08 <= backoff_s(retry, 1, 0.0) < backoff_s(retry, 1, 0.999) <= 0.12


def test_patch_from_agent_adds_edge_from_itself_and_the_new_node_runs_next() -> None:
    doc = workflow([{"id": "ag", "type": "agent", "config": {"provider": "scripted", "script": [{"output": 1}]}}])
    machine, _ = start(doc, {})
    ops = [
        {"op": "add", "path": "/nodes/-", "value": fn("new")},
        {"op": "add", "path": "/edges/-", "value": edge("ag", "new")},
    ]
    step = machine.node_completed("ag", 1, {"r": 1}, 101.0, patch=PatchProposal(ops=ops, author="agent:ag"))
    kinds = [ev.event_type(e) for e in step.events]
    assert kinds[:3] == ["PatchProposed", "PatchApplied", "NodeCompleted"]
    assert dispatches(step) == ["new"]
    assert machine.version != machine.base_version
    assert machine.base_doc == doc  # the base is never mutated


def test_patch_with_new_source_node_runs_it_immediately() -> None:
    machine, _ = start(workflow([fn("a", "builtin:sleep")]), {})
    step, _ = machine.propose_patch(PatchProposal(ops=[{"op": "add", "path": "/nodes/-", "value": fn("side")}]), 101.0)
    assert dispatches(step) == ["side"]


def test_rejected_patch_leaves_the_run_unchanged() -> None:
    machine, _ = start()
    version = machine.version
    step, patch_id = machine.propose_patch(PatchProposal(ops=[{"op": "remove", "path": "/nodes/9"}]), 101.0)
    assert [ev.event_type(e) for e in step.events] == ["PatchProposed", "PatchRejected"]
    rejected = step.events[1]
    assert isinstance(rejected, ev.PatchRejected)
    assert rejected.reasons[0]["code"] == "apply_failed" and rejected.reasons[0]["op_index"] == 0
    assert machine.version == version and machine.patches[patch_id].status == "rejected"


def test_events_round_trip_through_msgspec() -> None:
    _, log = start()
    for e in log:
        assert ev.decode_event(ev.encode_event(e)) == e
        assert msgspec.to_builtins(e)["type"] == ev.event_type(e)
