"""The real daemon over real HTTP: runs, patches, approvals, bad input, HTTP/2, drain and restart."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon import ROOT, Daemon, free_port

pytestmark = pytest.mark.integration

AGENTIC = json.loads((ROOT / "examples" / "agentic" / "workflow.json").read_text())
AGENTIC_INPUTS = json.loads((ROOT / "examples" / "agentic" / "inputs.json").read_text())


def sleeper(name: str = "sleeper", ms: int = 50, n: int = 3) -> dict[str, Any]:
    nodes = [{"id": f"n{i}", "type": "function", "config": {"handler": "builtin:sleep", "ms": ms}} for i in range(n)]
    edges = [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(n - 1)]
    return {"name": name, "nodes": nodes, "edges": edges}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("daemon")
    config = base / "aobd.toml"
    config.write_text(
        "[api]\nmax_body_bytes = 65536\nheartbeat_s = 0.5\n[limits]\nrun_starts_per_s = 1000\nrun_starts_burst = 2000\n"
    )
    d = Daemon(base / "data", free_port(), config=config).start()
    yield d
    assert d.stop() == 0, d.output()


def test_health_ready_and_openapi(daemon: Daemon) -> None:
    assert daemon.request("GET", "/healthz").body == {"status": "ok"}
    assert daemon.request("GET", "/readyz").status == 200
    spec = daemon.request("GET", "/openapi.json").body
    assert spec["openapi"] == "3.1.0" and "/v1/runs/{id}" in spec["paths"]


def test_register_workflow_and_run_it_by_name(daemon: Daemon) -> None:
    put = daemon.request("POST", "/v1/workflows", {"definition": sleeper("by_name", 5, 2), "tag": "main"})
    assert put.status == 201 and put.body["version"].startswith("sha256:")
    listed = daemon.request("GET", "/v1/workflows").body
    assert any(w["name"] == "by_name" and w["tags"]["main"] == put.body["version"] for w in listed)
    shown = daemon.request("GET", "/v1/workflows/by_name?tag=main").body
    assert shown["definition"]["name"] == "by_name"
    started = daemon.request("POST", "/v1/runs", {"workflow": "by_name", "tag": "main", "inputs": {}})
    assert started.status == 201 and started.body["status"] in ("running", "completed")
    final = daemon.wait_run(started.body["run_id"])
    assert final["status"] == "completed" and final["base_version"] == put.body["version"]
    events = daemon.request("GET", f"/v1/runs/{final['run_id']}/events").body
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "RunCompleted"


def test_wait_answers_when_the_run_finishes_or_when_the_wait_runs_out(daemon: Daemon) -> None:
    done = daemon.request("POST", "/v1/runs?wait=30", {"definition": sleeper("quick", 5, 2), "inputs": {}})
    assert done.status == 201 and done.body["status"] == "completed"
    # A 3 s node: "running" means the answer came when the 0.3 s wait ran out, not when the run finished.
    cut = daemon.request("POST", "/v1/runs?wait=0.3", {"definition": sleeper("slow", 3000, 1), "inputs": {}})
    assert cut.status == 201 and cut.body["status"] == "running"
    daemon.request("POST", f"/v1/runs/{cut.body['run_id']}/cancel", {"reason": "test over"})


def test_agentic_example_patches_over_the_api(daemon: Daemon) -> None:
    started = daemon.request("POST", "/v1/runs", {"definition": AGENTIC, "inputs": AGENTIC_INPUTS})
    final = daemon.wait_run(started.body["run_id"])
    assert final["status"] == "completed"
    patches = daemon.request("GET", f"/v1/runs/{final['run_id']}/patches").body
    assert [p["status"] for p in patches] == ["applied", "rejected"]
    one = daemon.request("GET", f"/v1/patches/{patches[1]['patch_id']}").body
    assert {r["code"] for r in one["reasons"]} >= {"past_removed", "ssrf"}


def test_idempotency_key_returns_the_first_run(daemon: Daemon) -> None:
    body = {"definition": sleeper("idem", 1, 1), "inputs": {}, "idempotency_key": "order-77"}
    first = daemon.request("POST", "/v1/runs", body).body["run_id"]
    second = daemon.request("POST", "/v1/runs", body).body["run_id"]
    assert first == second


def test_external_patch_approval_gate_and_double_decision(daemon: Daemon) -> None:
    doc = {
        "name": "gated",
        "nodes": [
            {"id": "gate", "type": "approval", "config": {"assignees": ["ops"]}},
            {"id": "ship", "type": "function", "config": {"handler": "builtin:echo"}},
        ],
        "edges": [{"from": "gate", "to": "ship", "when": "nodes.gate.output.decision == 'approve'"}],
    }
    run_id = daemon.request("POST", "/v1/runs", {"definition": doc}).body["run_id"]
    assert daemon.request("GET", f"/v1/runs/{run_id}").body["status"] == "waiting"
    patch = daemon.request(
        "POST",
        f"/v1/runs/{run_id}/patches",
        {
            "ops": [
                {
                    "op": "add",
                    "path": "/nodes/-",
                    "value": {"id": "audit", "type": "function", "config": {"handler": "builtin:noop"}},
                },
                {"op": "add", "path": "/edges/-", "value": {"from": "ship", "to": "audit"}},
            ],
            "reason": "audit trail",
        },
    )
    assert patch.status == 201 and patch.body["status"] == "applied"
    tickets = daemon.request("GET", "/v1/approvals?status=pending").body
    ticket = next(t for t in tickets if t["run_id"] == run_id)
    assert ticket["assignees"] == ["ops"]
    decided = daemon.request("POST", f"/v1/approvals/{ticket['ticket']}", {"decision": "approve", "reason": "ok"})
    assert decided.status == 200 and decided.body["status"] == "approved"
    again = daemon.request("POST", f"/v1/approvals/{ticket['ticket']}", {"decision": "reject", "reason": "no"})
    assert again.status == 409 and "already decided" in again.body["error"]["message"]
    final = daemon.wait_run(run_id)
    assert final["nodes"]["audit"]["status"] == "completed"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code", "says"),
    [
        ("POST", "/v1/runs", b"{not json", 400, "bad_request", "not valid JSON"),
        ("POST", "/v1/runs", {"definition": {"name": "x"}, "inputs": {}, "colour": 1}, 400, "bad_request", "colour"),
        ("POST", "/v1/runs", {"inputs": {}}, 400, "bad_request", "exactly one"),
        (
            "POST",
            "/v1/runs",
            b'{"definition": {"name": "x", "nodes": []}, "inputs": {"n": 123456789012345678901}}',
            400,
            "bad_request",
            "cannot be stored as canonical JSON",
        ),
        (
            "POST",
            "/v1/runs",
            b'{"definition": {"name": "x", "nodes": []}, "inputs": ' + b"[" * 300 + b"]" * 300 + b"}",
            400,
            "bad_request",
            "",
        ),
        (
            "POST",
            "/v1/runs",
            {"definition": {"name": "x", "nodes": [{"id": "a", "type": "nope"}]}},
            422,
            "workflow_invalid",
            "/nodes/0/type",
        ),
        ("POST", "/v1/runs", {"workflow": "never-registered"}, 404, "not_found", "never-registered"),
        ("GET", "/v1/runs/r-does-not-exist", None, 404, "not_found", "r-does-not-exist"),
        ("GET", "/v1/nothing-here", None, 404, "not_found", "/v1/nothing-here"),
        ("DELETE", "/v1/runs", None, 405, "method_not_allowed", "DELETE"),
        ("GET", "/v1/runs?limit=abc", None, 400, "bad_request", "limit"),
        ("POST", "/v1/approvals/tkt_nope", {"decision": "maybe"}, 400, "bad_request", "decision"),
        ("GET", "/v1/cas/sha256:" + "0" * 64, None, 404, "not_found", "sha256:"),
    ],
)
def test_bad_input_is_a_4xx_naming_what_and_where(
    daemon: Daemon, method: str, path: str, body: Any, status: int, code: str, says: str
) -> None:
    raw = body if isinstance(body, bytes) else None
    reply = daemon.request(method, path, None if raw else body, raw=raw)
    assert reply.status == status, reply.body
    assert reply.body["error"]["code"] == code
    assert says in reply.body["error"]["message"]


def test_oversized_body_is_refused_with_413(daemon: Daemon) -> None:
    reply = daemon.request("POST", "/v1/runs", raw=b'{"inputs": "' + b"x" * 70_000 + b'"}')
    assert reply.status == 413 and "max_body_bytes" in reply.body["error"]["message"]


def test_blob_of_a_node_output_is_served(daemon: Daemon) -> None:
    run_id = daemon.request("POST", "/v1/runs", {"definition": sleeper("blob", 1, 1)}).body["run_id"]
    daemon.wait_run(run_id)
    events = daemon.request("GET", f"/v1/runs/{run_id}/events").body
    ref = next(e["output_ref"] for e in events if e["type"] == "NodeCompleted")
    for _ in range(50):  # ownership is recorded in the background, within ~50 ms
        reply = daemon.request("GET", f"/v1/cas/{ref}")
        if reply.status == 200:
            break
        time.sleep(0.05)
    assert reply.status == 200 and reply.body == b"{}"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is needed to speak HTTP/2 prior knowledge")
def test_http2_prior_knowledge(daemon: Daemon) -> None:
    out = subprocess.run(
        [
            "curl",
            "-s",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            daemon.url + "/healthz",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout.strip() == "2 200"


def test_sse_stream_over_the_daemon_resumes_with_last_event_id(daemon: Daemon) -> None:
    import urllib.request

    run_id = daemon.request("POST", "/v1/runs", {"definition": sleeper("sse", 30, 4)}).body["run_id"]
    req = urllib.request.Request(daemon.url + f"/v1/runs/{run_id}/events", headers={"Accept": "text/event-stream"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        first_ids = []
        for raw in resp:
            line = raw.decode()
            if line.startswith("id:"):
                first_ids.append(int(line[3:]))
            if len(first_ids) == 3:
                break
    req = urllib.request.Request(
        daemon.url + f"/v1/runs/{run_id}/events",
        headers={"Accept": "text/event-stream", "Last-Event-ID": str(first_ids[-1])},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        rest = [int(line.decode()[3:]) for line in resp if line.startswith(b"id:")]
    seen = first_ids + rest
    assert seen == list(range(1, len(seen) + 1))
    events = daemon.request("GET", f"/v1/runs/{run_id}/events").body
    assert len(seen) == len(events) and events[-1]["type"] == "RunCompleted"


def test_drain_and_restart_lose_no_run(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "data", free_port()).start()
    run_ids = [
        d.request("POST", "/v1/runs", {"definition": sleeper("drain", 150, 4)}).body["run_id"] for _ in range(20)
    ]
    time.sleep(0.3)
    assert d.stop(signal.SIGTERM) == 0, d.output()
    assert "draining" in d.output()
    d.start()
    try:
        for run_id in run_ids:
            final = d.wait_run(run_id)
            assert final["status"] == "completed", final
            events = d.request("GET", f"/v1/runs/{run_id}/events").body
            completions = Counter(e["node_id"] for e in events if e["type"] == "NodeCompleted")
            assert completions == {f"n{i}": 1 for i in range(4)}
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    finally:
        assert d.stop() == 0


def test_refuses_to_listen_beyond_loopback_without_tokens(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "data", free_port())
    env = d.env()
    env["AOBD_API_LISTEN"] = f"0.0.0.0:{d.port}"
    out = subprocess.run(
        [*_aobd(), "serve", "--single-process"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "no [[auth.tokens]] are configured" in out.stderr + out.stdout


def _aobd() -> list[str]:
    import sys

    return [sys.executable, "-m", "aobd.cli.main"]


def test_ab_run_with_an_earlier_patch_set(daemon: Daemon) -> None:
    doc = sleeper("ab", 100, 2)
    first = daemon.request("POST", "/v1/runs", {"definition": doc}).body["run_id"]
    added = {"id": "extra", "type": "function", "config": {"handler": "builtin:noop"}}
    ops = [
        {"op": "add", "path": "/nodes/-", "value": added},
        {"op": "add", "path": "/edges/-", "value": {"from": "n1", "to": "extra"}},
    ]
    patch = daemon.request("POST", f"/v1/runs/{first}/patches", {"ops": ops, "reason": "variant B"}).body
    assert patch["status"] == "applied"
    variant = daemon.request("POST", "/v1/runs?wait=30", {"definition": doc, "patch_set": [patch["patch_id"]]}).body
    assert variant["status"] == "completed" and variant["nodes"]["extra"]["status"] == "completed"
    assert variant["version"] == daemon.wait_run(first)["version"]
    other = daemon.request(
        "POST", "/v1/runs", {"definition": sleeper("not_ab", 1, 1), "patch_set": [patch["patch_id"]]}
    )
    assert other.status == 400 and "belongs to a run of workflow 'ab'" in other.body["error"]["message"]


def test_workflows_over_the_api_may_not_call_arbitrary_modules(daemon: Daemon) -> None:
    doc = {"name": "rce", "nodes": [{"id": "x", "type": "function", "config": {"handler": "subprocess:run"}}]}
    for path, body in (("/v1/runs", {"definition": doc}), ("/v1/workflows", {"definition": doc})):
        reply = daemon.request("POST", path, body)
        assert reply.status == 422 and "subprocess" in reply.body["error"]["message"]
        assert "security.handler_modules" in reply.body["error"]["message"]
