"""Schemathesis fuzzes every operation of ``/openapi.json`` against the real daemon (DESIGN.md section 9).

Whatever the input, the answer is documented: never a 5xx ("a 5xx means a bug or an unavailable dependency (503),
never bad input"), only documented status codes, content types and headers, and bodies that match their schemas.
The daemon is seeded first (workflows, finished and waiting runs, applied/rejected/pending patches, approval
tickets, blobs) and the fuzzer draws path parameters from those ids half of the time, so it reaches the handlers'
real work and not only their 404s.

Each operation gets schemathesis' coverage cases (boundaries and each kind of invalid value) and a Hypothesis fuzz in
positive and negative modes; ``AOBD_FUZZ_EXAMPLES`` (default 100 per operation) sets the fuzz's size. The fuzz is
derandomized: the same code gives the same requests.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import hypothesis
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig

from aobd.api.app import ROUTES
from aobd.api.openapi import openapi_document
from tests.integration.daemon import ROOT, Daemon, free_port

pytestmark = pytest.mark.integration

#: The only token of the daemon under test (private to this module's temporary daemon, not a secret).
TOKEN = "fuzz-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
#: Statuses each operation answered during the fuzz, for the reachability test below.
SEEN: dict[str, Counter[int]] = defaultdict(Counter)


def _workflow(name: str) -> dict[str, Any]:
    return dict(json.loads((ROOT / "examples" / name / "workflow.json").read_text()))


GATED = {
    "name": "gated",
    "nodes": [
        {"id": "gate", "type": "approval", "config": {"assignees": ["ops"]}},
        {"id": "ship", "type": "function", "config": {"handler": "builtin:echo"}},
    ],
    "edges": [{"from": "gate", "to": "ship", "when": "nodes.gate.output.decision == 'approve'"}],
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("fuzz")
    config = base / "aobd.toml"
    # Rate limits off: a 429 is documented, but it would stop the fuzzer short of the handlers.
    config.write_text(
        f'[limits]\nrun_starts_per_s = 0\npatches_per_s = 0\n[[auth.tokens]]\ntoken = "{TOKEN}"\n'
        'workspace = "fuzz"\nrole = "admin"\n'
    )
    d = Daemon(base / "data", free_port(), config=config).start()
    yield d
    assert d.stop() == 0, d.output()


def _ok(reply: Any, status: int = 200) -> Any:
    assert reply.status == status, reply.body
    return reply.body


@pytest.fixture(scope="module")
def seeded(daemon: Daemon) -> dict[str, list[str]]:
    """Real objects for the fuzzer to find: their ids become its dictionaries."""

    def call(method: str, path: str, body: Any = None, status: int = 200) -> Any:
        return _ok(daemon.request(method, path, body, token=TOKEN), status)

    hello = _workflow("hello")
    agentic = _workflow("agentic")
    agentic_inputs = json.loads((ROOT / "examples" / "agentic" / "inputs.json").read_text())
    # The same agent script under a manual patch policy leaves its first patch pending.
    manual = {**agentic, "name": "manual", "policy": {**agentic["policy"], "patches": "approve"}}
    call("POST", "/v1/workflows", {"definition": hello, "tag": "main"}, 201)
    finished = call("POST", "/v1/runs", {"workflow": "hello", "inputs": {"name": "fuzz"}}, 201)["run_id"]
    runs = [finished]
    runs.append(call("POST", "/v1/runs", {"definition": agentic, "inputs": agentic_inputs}, 201)["run_id"])
    runs.append(call("POST", "/v1/runs", {"definition": manual, "inputs": agentic_inputs}, 201)["run_id"])
    # Inline (not registered), so no fuzzed {"workflow": name} can start a run that waits for ever.
    runs += [call("POST", "/v1/runs", {"definition": GATED}, 201)["run_id"] for _ in range(3)]
    # Waiting runs with a pending patch each, for approve / reject / rollback to act on.
    for _ in range(3):
        run_id = call("POST", "/v1/runs", {"definition": {**GATED, "policy": {"patches": "approve"}}}, 201)["run_id"]
        audit = {"id": "audit", "type": "function", "config": {"handler": "builtin:noop"}}
        ops = [
            {"op": "add", "path": "/nodes/-", "value": audit},
            {"op": "add", "path": "/edges/-", "value": {"from": "ship", "to": "audit"}},
        ]
        assert call("POST", f"/v1/runs/{run_id}/patches", {"ops": ops}, 201)["status"] == "pending"
        runs.append(run_id)
    daemon.wait_run(finished, token=TOKEN)
    deadline = time.monotonic() + 30
    while len(call("GET", "/v1/approvals?status=pending")) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    patches = [p["patch_id"] for run_id in runs for p in call("GET", f"/v1/runs/{run_id}/patches")]
    tickets = [t["ticket"] for t in call("GET", "/v1/approvals")]
    refs = [e["output_ref"] for e in call("GET", f"/v1/runs/{finished}/events") if e["type"] == "NodeCompleted"]
    assert len(patches) >= 6 and len(tickets) == 6 and refs
    return {
        "ids": runs + patches,
        "tickets": tickets,
        "refs": refs,
        "names": ["hello", "gated"],
        "nodes": ["greet", "done", "intake", "plan", "review", "notify", "gate", "ship"],
    }


@pytest.fixture(scope="module")
def api_schema(daemon: Daemon, seeded: dict[str, list[str]]) -> Any:
    config = SchemathesisConfig.from_dict(
        {
            "headers": AUTH,
            "request-timeout": 30,
            "generation": {"mode": "all", "deterministic": True, "database": "none"},
            "dictionaries": {name: {"values": values} for name, values in seeded.items()},
            # Half of the time a real id (or a real node for a replay's "from", a real workflow to start).
            "parameters": {
                key: {"dictionary": dictionary, "probability": 0.5}
                for key, dictionary in (
                    ("path.id", "ids"),
                    ("path.ticket", "tickets"),
                    ("path.ref", "refs"),
                    ("path.name", "names"),
                    ("body.workflow", "names"),
                    ("body.from", "nodes"),
                )
            },
        }
    )
    return schemathesis.openapi.from_url(daemon.url + "/openapi.json", config=config, headers=AUTH, timeout=30)


#: Every documented operation but POST /v1/admin/drain, which would drain (and so stop) the daemon under test;
#: tests/integration/test_daemon_api.py covers drain.
FUZZED = [route for route in ROUTES if route.method != "WS" and route.op_id != "adminDrain"]

# schemathesis.pytest.from_fixture() (the lazy loader) does not work with pytest 9.2 (it sets Node._nodeid), so the
# operations are parametrized here and each test runs schemathesis' two generators itself: the coverage cases
# (boundaries and each kind of invalid value, deterministic) and a Hypothesis fuzz in positive and negative modes.
SETTINGS = hypothesis.settings(
    max_examples=int(os.environ.get("AOBD_FUZZ_EXAMPLES", "100")),
    derandomize=True,
    database=None,
    deadline=None,
    # Slowness only: each example is a real HTTP round trip to a real daemon.
    suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large],
)


@pytest.mark.parametrize("route", FUZZED, ids=[route.op_id for route in FUZZED])
def test_operation_answers_as_documented(api_schema: Any, route: Any) -> None:
    operation = api_schema[route.path][route.method]
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    coverage = api_schema.iter_coverage_cases(
        operation, generation_modes=modes, generation_config=api_schema.config.generation_for(operation=operation)
    )
    for case in coverage:
        _call(route.op_id, case)

    @hypothesis.given(case=st.one_of([operation.as_strategy(generation_mode=mode) for mode in modes]))
    @SETTINGS
    def fuzz(case: schemathesis.Case) -> None:
        _call(route.op_id, case)

    fuzz()


def _call(op_id: str, case: schemathesis.Case) -> None:
    # Valid waits are long (?wait= up to 300 s, a claim's wait_s 20 s by default) and what they wait for may never
    # come in a fuzzed run: keep them short, leaving invalid ones as they are.
    if op_id == "startRun" and case.query and "wait" in case.query:
        wait = str(case.query["wait"])
        if wait.replace(".", "", 1).isdigit() and float(wait) > 0.2:
            case.query["wait"] = 0.2
    if op_id == "claimAgentJob" and isinstance(case.body, dict):
        wait_s = case.body.get("wait_s", 20.0)
        if isinstance(wait_s, int | float) and not isinstance(wait_s, bool) and wait_s > 0.2:
            case.body["wait_s"] = 0.2
    response = case.call_and_validate(headers=AUTH, checks=CHECKS)
    SEEN[op_id][response.status_code] += 1


#: Read operations the seeded data lets the fuzzer answer with a 2xx at least once.
REACHABLE = {
    "listWorkflows",
    "getWorkflow",
    "listRuns",
    "getRun",
    "getRunEvents",
    "listPatches",
    "getPatch",
    "listApprovals",
    "getBlob",
    "adminStatus",
    "adminConfig",
    "metrics",
    "healthz",
    "readyz",
    "openapi",
}


def test_the_fuzz_reached_the_handlers() -> None:
    if not SEEN:
        pytest.skip("the fuzz test did not run in this session")
    missed = {op for op in REACHABLE if not any(200 <= code < 300 for code in SEEN[op])}
    assert not missed, {op: dict(SEEN[op]) for op in sorted(missed)}
    assert not any(code >= 500 for counts in SEEN.values() for code in counts)


def test_the_daemon_logged_no_error(daemon: Daemon) -> None:
    """A fuzzed run can fail, but nothing in the daemon may crash (background tasks included)."""
    errors = []
    for line in daemon.output().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") in ("error", "critical") or "exception" in entry:
            errors.append(line[:2000])
    assert not errors, "\n".join(errors[:5])


BIG = 2**64  # one more than orjson (the canonical JSON of every stored document) can write
SUPERSCRIPT_TWO = "%C2%B2"  # "²".isdigit() is true, and int("²") raises
HUGE = "1" + "0" * 4400  # int() refuses more than 4300 digits


def _nested(depth: int) -> bytes:
    return b'{"definition": {"name": "n", "nodes": [{"id": "a", "type": "join"}]}, "inputs": ' + (
        b"[" * depth + b"]" * depth + b"}"
    )


@pytest.mark.parametrize(
    ("method", "path", "body", "headers"),
    [
        ("GET", "/v1/runs?limit=" + SUPERSCRIPT_TWO, None, {}),
        ("GET", "/v1/runs?limit=" + HUGE, None, {}),
        ("GET", "/v1/runs/{run}/events?after=" + str(2**63), None, {}),
        ("GET", "/v1/runs/{run}/events?after=" + SUPERSCRIPT_TWO, None, {}),
        ("GET", "/v1/runs/{run}/events?after=" + HUGE, None, {}),
        ("GET", "/v1/runs/{run}/events", None, {"Last-Event-ID": HUGE}),
        ("POST", "/v1/runs", {"definition": _workflow("hello"), "inputs": {"name": BIG}}, {}),
        ("POST", "/v1/runs", {"definition": {**_workflow("hello"), "metadata": {"n": -BIG}}}, {}),
        ("POST", "/v1/workflows", {"definition": {**_workflow("hello"), "metadata": {"n": BIG}}}, {}),
        ("POST", "/v1/runs", _nested(300), {}),  # deeper than orjson writes
        ("POST", "/v1/runs", _nested(5000), {}),  # deeper than msgspec reads
    ],
    ids=[
        "limit-superscript",
        "limit-4401-digits",
        "after-beyond-int64",
        "after-superscript",
        "after-4401-digits",
        "last-event-id-4401-digits",
        "inputs-beyond-64-bits",
        "definition-beyond-64-bits",
        "workflow-beyond-64-bits",
        "inputs-300-deep",
        "inputs-5000-deep",
    ],
)
def test_what_the_fuzz_found_is_a_400(
    daemon: Daemon, seeded: dict[str, list[str]], method: str, path: str, body: Any, headers: dict[str, str]
) -> None:
    """Each of these was a 500 (the fuzz found the first kinds; the others are their siblings)."""
    raw = body if isinstance(body, bytes) else None
    path = path.replace("{run}", seeded["ids"][0])
    reply = daemon.request(method, path, None if raw else body, raw=raw, token=TOKEN, headers=headers)
    assert reply.status == 400, reply.body
    assert reply.body["error"]["code"] == "bad_request"


def test_the_largest_event_seq_is_accepted(daemon: Daemon, seeded: dict[str, list[str]]) -> None:
    reply = daemon.request("GET", f"/v1/runs/{seeded['ids'][0]}/events?after={2**63 - 1}", token=TOKEN)
    assert reply.status == 200 and reply.body == []


def test_every_route_is_documented_and_the_document_is_valid_openapi_3_1(daemon: Daemon) -> None:
    served = _ok(daemon.request("GET", "/openapi.json", token=TOKEN))
    assert served == json.loads(json.dumps(openapi_document(ROUTES)))
    assert served["openapi"] == "3.1.0"
    operations = {
        (path, method.upper()): op for path, methods in served["paths"].items() for method, op in methods.items()
    }
    for route in ROUTES:
        if route.method == "WS":
            assert (route.path, "GET") not in operations  # OpenAPI cannot describe a WebSocket
            continue
        op = operations.pop((route.path, route.method))
        assert op["operationId"] == route.op_id
        assert str(route.status) in op["responses"] and "400" in op["responses"]
        params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert params == {part[1:-1] for part in route.path.split("/") if part.startswith("{")}
        assert ("security" in op) == (route.role is not None)
    assert not operations, f"operations without a route: {sorted(operations)}"
    ids = [op["operationId"] for methods in served["paths"].values() for op in methods.values()]
    assert len(ids) == len(set(ids))

    # The OpenAPI 3.1 meta-schema (the one schemathesis ships), then every Schema Object against JSON Schema 2020-12.
    loaded = schemathesis.openapi.from_dict(served)
    loaded.validate()
    with pytest.raises(jsonschema_rs.ValidationError):
        schemathesis.openapi.from_dict({**served, "info": {"title": "no version"}}).validate()
    dialect = "https://json-schema.org/draft/2020-12/schema"
    schemas = list(served["components"]["schemas"].values())
    for methods in served["paths"].values():
        for op in methods.values():
            schemas += [p["schema"] for p in op.get("parameters", [])]
            for response in op["responses"].values():
                schemas += [media["schema"] for media in response.get("content", {}).values()]
                schemas += [header["schema"] for header in response.get("headers", {}).values()]
    for one in schemas:
        jsonschema_rs.meta.validate({"$schema": dialect, **one})
    # Every $ref resolves within the document.
    refs = {ref for ref in _refs(served)}
    assert refs and all(ref.removeprefix("#/components/schemas/") in served["components"]["schemas"] for ref in refs)


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)
