"""The README's daemon walkthrough, for real: aobctl over the admin socket against a running daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon import ROOT, Daemon, free_port

pytestmark = pytest.mark.integration

GATED = {
    "name": "gated",
    "nodes": [
        {"id": "prep", "type": "function", "config": {"handler": "builtin:sleep", "ms": 20}},
        {"id": "gate", "type": "approval", "config": {"assignees": ["ops"]}},
        {"id": "ship", "type": "function", "config": {"handler": "builtin:echo"}},
    ],
    "edges": [{"from": "prep", "to": "gate"}, {"from": "gate", "to": "ship"}],
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("ctl") / "data", free_port()).start()
    yield d
    if d.proc is not None:
        d.stop()


def ctl(daemon: Daemon, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-m", "aobd.ctl.main", *args],
        env=daemon.env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if ok:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def js(daemon: Daemon, *args: str) -> Any:
    return json.loads(ctl(daemon, *args, "--json").stdout.strip().splitlines()[-1])


def test_status_over_the_admin_socket(daemon: Daemon) -> None:
    status = js(daemon, "status")
    assert status["draining"] is False and status["listen"].endswith(str(daemon.port))
    assert daemon.socket.stat().st_mode & 0o777 == 0o600


def test_agentic_example_start_wait_and_stream(daemon: Daemon) -> None:
    example = ROOT / "examples" / "agentic"
    summary = js(
        daemon, "run", "start", str(example / "workflow.json"), "--inputs", f"@{example / 'inputs.json'}", "--wait"
    )
    assert summary["status"] == "completed"
    run_id = summary["run_id"]
    streamed = ctl(daemon, "logs", "stream", run_id, "--json").stdout.splitlines()
    seqs = [json.loads(line)["seq"] for line in streamed]
    assert seqs == list(range(1, len(seqs) + 1)) and json.loads(streamed[-1])["type"] == "RunCompleted"
    plan_only = [
        json.loads(line)
        for line in ctl(daemon, "logs", "stream", run_id, "--node", "plan", "--json").stdout.splitlines()
    ]
    assert {e.get("node_id") for e in plan_only if e["type"].startswith("Node")} == {"plan"}
    patches = js(daemon, "patch", "list", run_id)
    assert [p["status"] for p in patches] == ["applied", "rejected"]
    timeline = js(daemon, "run", "timeline", run_id)
    assert len(timeline) == len(seqs)


def test_workflow_registry_approval_and_patch_commands(daemon: Daemon, tmp_path: Path) -> None:
    wf = tmp_path / "gated.json"
    wf.write_text(json.dumps(GATED))
    put = js(daemon, "workflow", "put", str(wf), "--tag", "prod")
    assert put["workflow"] == "gated"
    assert any(w["name"] == "gated" for w in js(daemon, "workflow", "list"))
    run_id = js(daemon, "run", "start", "gated", "--tag", "prod")["run_id"]
    patch = tmp_path / "patch.json"
    patch.write_text(
        json.dumps(
            {
                "ops": [
                    {
                        "op": "add",
                        "path": "/nodes/-",
                        "value": {"id": "note", "type": "function", "config": {"handler": "builtin:noop"}},
                    }
                ],
                "reason": "note it",
            }
        )
    )
    applied = js(daemon, "patch", "apply", run_id, str(patch))
    assert applied["status"] == "applied"
    for _ in range(100):
        tickets = [t for t in js(daemon, "approvals", "list") if t["run_id"] == run_id]
        if tickets:
            break
    ticket = tickets[0]
    assert set(ticket) >= {"ticket", "run_id", "node_id", "status", "assignees", "deadline"}
    ctl(daemon, "approve", ticket["ticket"], "approve", "--reason", "ship it")
    again = ctl(daemon, "approve", ticket["ticket"], "reject", "--reason", "changed my mind", ok=False)
    assert again.returncode == 1 and "already decided" in again.stderr + again.stdout
    final = js(daemon, "run", "get", run_id)
    for _ in range(100):
        if final["status"] == "completed":
            break
        final = js(daemon, "run", "get", run_id)
    assert final["status"] == "completed" and final["nodes"]["note"]["status"] == "completed"


def test_config_show_masks_nothing_secret_and_drain_stops_the_daemon(daemon: Daemon) -> None:
    config = js(daemon, "config", "show")
    assert config["api"]["listen"].endswith(str(daemon.port))
    drained = js(daemon, "drain")
    assert drained["draining"] is True
    assert daemon.proc is not None and daemon.proc.wait(timeout=60) == 0
    daemon.proc = None
    down = ctl(daemon, "status", ok=False)
    assert down.returncode == 2 and str(daemon.socket) in down.stderr
