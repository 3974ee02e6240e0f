"""Workflow validation reports every problem with the pointer and node it concerns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aobd.errors import WorkflowInvalid
from aobd.model.validate import load_workflow, validate_document
from aobd.nodes.function import check_handler
from tests.conftest import EXAMPLES, edge, fn, workflow


def codes(doc: object, **kw: object) -> list[tuple[str, str, str | None]]:
    _, problems = validate_document(doc, **kw)  # type: ignore[arg-type]
    return [(p.code, p.pointer, p.node_id) for p in problems]


@pytest.mark.parametrize("example", ["hello", "w6", "agentic"])
def test_examples_are_valid(example: str) -> None:
    doc = json.loads((EXAMPLES / example / "workflow.json").read_text())
    wf, problems = validate_document(doc)
    assert problems == [] and wf is not None


def test_every_problem_is_reported_with_where() -> None:
    doc = workflow(
        [
            fn("a"),
            fn("a"),
            {"id": "h", "type": "http", "config": {"url": 7}},
            {"id": "x", "type": "teleport"},
            fn("b", "nope"),
        ],
        [edge("a", "missing"), edge("b", "b")],
    )
    found = codes(doc)
    assert ("duplicate_node_id", "/nodes/0/id", "a") in found
    assert ("bad_config", "/nodes/2/config/url", "h") in found
    assert ("unknown_node_type", "/nodes/3/type", "x") in found
    assert ("bad_handler", "/nodes/4/config/handler", "b") in found
    assert ("unknown_node", "/edges/0/to", "missing") in found
    assert ("self_loop", "/edges/1", "b") in found


def test_cycle_is_named() -> None:
    _, problems = validate_document(
        workflow([fn("a"), fn("b"), fn("c")], [edge("a", "b"), edge("b", "c"), edge("c", "a")])
    )
    cycle = [p for p in problems if p.code == "cycle"]
    assert len(cycle) == 1 and "a -> b -> c -> a" in cycle[0].message


def test_bad_expressions_in_bindings_conditions_and_outputs() -> None:
    doc = workflow(
        [fn("a", **{"in": {"q": "inputs.[["}}), fn("b")],
        [edge("a", "b", "nodes.a.output ==")],
        outputs={"o": "nodes.ghost.output"},
    )
    found = codes(doc)
    assert ("bad_expression", "/nodes/0/in/q", "a") in found
    assert ("bad_expression", "/edges/0/when", None) in found
    assert ("unknown_reference", "/outputs/o", None) in found


def test_handler_resolution_is_checked_when_asked() -> None:
    doc = workflow([fn("a", "tests.handlers:no_such_function"), fn("b", "no_such_module_xyz:f")])
    found = codes(doc, handler_check=check_handler)
    assert [c[0] for c in found] == ["bad_handler", "bad_handler"]
    assert codes(workflow([fn("a", "tests.handlers:add_one")]), handler_check=check_handler) == []


def test_node_ids_must_be_expression_safe() -> None:
    assert ("bad_node_id", "/nodes/0/id", None) in codes(workflow([fn("9lives")]))


def test_load_workflow_raises_listing_problems() -> None:
    with pytest.raises(WorkflowInvalid) as info:
        load_workflow({"name": "x", "nodes": []})
    assert "empty_workflow" in str(info.value)


def test_not_an_object_and_unknown_top_level_keys() -> None:
    assert codes([1, 2]) == [("not_an_object", "", None)]
    assert any(c[0] == "schema" for c in codes({**workflow([fn("a")]), "nodez": []}))


def test_cli_validate_exits_1_and_names_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(workflow([fn("a"), fn("a")], [edge("a", "zz")])))
    result = subprocess.run(
        [sys.executable, "-m", "aobd.cli.main", "validate", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "/nodes/0/id" in result.stderr and "duplicate_node_id" in result.stderr and "/edges/0/to" in result.stderr
    good = subprocess.run(
        [sys.executable, "-m", "aobd.cli.main", "validate", str(EXAMPLES / "w6" / "workflow.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert good.returncode == 0, good.stderr


def test_committed_json_schema_is_current() -> None:
    from aobd.model.schema import render

    committed = (EXAMPLES.parent / "docs" / "workflow.schema.json").read_bytes()
    assert committed == render(), "run `python -m aobd.model.schema` and commit docs/workflow.schema.json"
