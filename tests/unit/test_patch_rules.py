"""Patch governance, rule by rule (DESIGN.md section 3), on the pure judge."""

from __future__ import annotations

from typing import Any

import pytest

from aobd.model.patch import RunFacts, http_urls, judge_patch
from aobd.model.workflow import Policy
from tests.conftest import edge, fn, workflow

DOC = workflow(
    [
        fn("done"),
        {"id": "ag", "type": "agent", "config": {"provider": "scripted", "script": [{"output": 1}]}},
        fn("later"),
    ],
    [edge("done", "ag"), edge("ag", "later")],
)
STATUS = {"done": "completed", "ag": "running", "later": "pending"}


def judge(
    ops: list[dict[str, Any]], *, policy: Policy | None = None, url_reasons: list[str] | None = None, **facts: Any
) -> Any:
    run = RunFacts(policy=policy or Policy(), node_status=STATUS, proposer_node="ag", **facts)
    return judge_patch(DOC, ops, run, url_check=lambda url: list(url_reasons or []))


def add(node: dict[str, Any]) -> dict[str, Any]:
    return {"op": "add", "path": "/nodes/-", "value": node}


def codes(judgement: Any) -> set[str]:
    return {r.code for r in judgement.reasons}


def test_accepted_patch_returns_the_new_document_and_never_touches_the_base() -> None:
    before = repr(DOC)
    result = judge([add(fn("extra")), {"op": "add", "path": "/edges/-", "value": edge("ag", "extra")}])
    assert result.accepted and result.added_nodes == ["extra"]
    assert result.document is not None and len(result.document["nodes"]) == 4
    assert repr(DOC) == before


def test_rule_1_ops_must_apply_including_test() -> None:
    result = judge([{"op": "test", "path": "/nodes/0/id", "value": "not-done"}])
    assert codes(result) == {"apply_failed"} and result.reasons[0].op_index == 0 and result.reasons[0].rule == 1
    assert codes(judge([])) == {"empty_patch"}


def test_rule_2_only_nodes_edges_outputs() -> None:
    result = judge(
        [{"op": "replace", "path": "/name", "value": "x"}, {"op": "move", "from": "/policy", "path": "/nodes/9"}]
    )
    assert codes(result) == {"out_of_scope"} and [r.op_index for r in result.reasons] == [0, 1]


def test_rule_3_result_must_be_a_valid_acyclic_document() -> None:
    cycle = judge([{"op": "add", "path": "/edges/-", "value": edge("later", "ag")}])
    assert "invalid_result" in codes(cycle)
    dangling = judge([{"op": "add", "path": "/edges/-", "value": edge("later", "ghost")}])
    assert any(r.rule == 3 and "ghost" in r.message for r in dangling.reasons)


def test_rule_4_the_past_is_immutable_but_pending_nodes_are_not() -> None:
    assert codes(judge([{"op": "remove", "path": "/nodes/0"}])) >= {"past_removed"}
    assert codes(judge([{"op": "replace", "path": "/nodes/1/config/script", "value": []}])) >= {"past_changed"}
    assert codes(judge([{"op": "add", "path": "/edges/-", "value": edge("later", "done")}])) >= {"past_edge"}
    assert judge([{"op": "replace", "path": "/nodes/2/config/handler", "value": "builtin:noop"}]).accepted
    assert judge([{"op": "remove", "path": "/edges/1"}, {"op": "remove", "path": "/nodes/2"}]).accepted


@pytest.mark.parametrize(
    ("policy", "facts", "ops", "code"),
    [
        (Policy(max_spawned_nodes=1), {}, [add(fn("a1")), add(fn("a2"))], "spawn_limit"),
        (Policy(max_spawned_nodes=3), {"spawned_nodes": 3}, [add(fn("a1"))], "spawn_limit"),
        (Policy(max_patches=2), {"applied_patches": 2}, [add(fn("a1"))], "too_many_patches"),
        (
            Policy(allowed_node_types=["function"]),
            {},
            [add({"id": "h", "type": "timer", "config": {"delay": "1s"}})],
            "node_type_not_allowed",
        ),
        (
            Policy(max_agent_depth=1),
            {"agent_depth": {"ag": 1}},
            [add({"id": "sub", "type": "agent", "config": {"provider": "scripted", "script": [{"output": 1}]}})],
            "agent_depth",
        ),
    ],
)
def test_rule_5_spawn_limits(policy: Policy, facts: dict[str, Any], ops: list[dict[str, Any]], code: str) -> None:
    result = judge(ops, policy=policy, **facts)
    assert codes(result) == {code} and all(r.rule == 5 for r in result.reasons)


def test_rule_6_every_http_url_passes_the_ssrf_guard() -> None:
    node = {"id": "h", "type": "http", "config": {"url": "http://10.0.0.5/admin"}}
    assert http_urls([add(node)]) == ["http://10.0.0.5/admin"]
    result = judge([add(node)], url_reasons=["http://10.0.0.5/admin targets 10.0.0.5, which is private"])
    assert codes(result) == {"ssrf"} and result.reasons[0].node_id == "h"
    assert judge([add(node)]).accepted


def test_rule_7_policy_deny_and_approve() -> None:
    assert codes(judge([add(fn("a1"))], policy=Policy(patches="deny"))) == {"policy_deny"}
    held = judge([add(fn("a1"))], policy=Policy(patches="approve"))
    assert held.accepted and held.needs_approval
    approved = judge_patch(
        DOC, [add(fn("a1"))], RunFacts(Policy(patches="approve"), STATUS), url_check=lambda u: [], approved=True
    )
    assert approved.accepted and not approved.needs_approval


def test_every_violated_rule_is_reported_at_once() -> None:
    ops = [
        {"op": "remove", "path": "/nodes/0"},
        add({"id": "h", "type": "http", "config": {"url": "http://169.254.169.254/"}}),
    ]
    result = judge(ops, url_reasons=["metadata endpoint"], policy=Policy(max_spawned_nodes=0))
    assert {r.rule for r in result.reasons} >= {3, 4, 5, 6}


def test_a_patch_cannot_introduce_a_new_handler_module() -> None:
    hostile = add({**fn("pwn", "subprocess:run"), "in": {"rm": "`1`"}})
    result = judge([hostile])
    assert codes(result) == {"handler_not_allowed"} and result.reasons[0].node_id == "pwn"
    assert judge([add(fn("ok", "builtin:echo"))]).accepted
