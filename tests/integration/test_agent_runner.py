"""External agent runners against the real daemon: the reference runner, leases that lapse, late answers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon import ROOT, Daemon, Reply, free_port

pytestmark = pytest.mark.integration

#: One workspace per test, so that no test claims another's job.
TOKENS = {
    "patching": "patching-write-secret",
    "lapsing": "lapsing-write-secret",
    "polling": "polling-write-secret",
    "bystander": "bystander-write-secret",
}
READ_TOKEN = "patching-read-secret"

FOLLOWUP = {
    "id": "followup",
    "type": "function",
    "config": {"handler": "builtin:echo"},
    "in": {"route": "nodes.ext.output.route"},
}
ANSWER = {
    "output": {"route": "billing"},
    "patch": {
        "ops": [
            {"op": "add", "path": "/nodes/-", "value": FOLLOWUP},
            {"op": "add", "path": "/edges/-", "value": {"from": "ext", "to": "followup"}},
        ],
        "reason": "billing tickets need a follow-up",
    },
}


def external(name: str, script: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    config = {"runner": "external", "provider": "scripted", "script": script or [ANSWER]}
    return {"name": name, "nodes": [{"id": "ext", "type": "agent", "config": config}], "edges": []}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("agent-runner")
    lines = []
    for workspace, token in TOKENS.items():
        lines += ["[[auth.tokens]]", f'token = "{token}"', f'workspace = "{workspace}"', 'role = "write"', ""]
    lines += ["[[auth.tokens]]", f'token = "{READ_TOKEN}"', 'workspace = "patching"', 'role = "read"', ""]
    config = base / "aobd.toml"
    config.write_text("\n".join(lines))
    d = Daemon(base / "data", free_port(), config=config).start()
    yield d
    assert d.stop() == 0, d.output()


def runner(daemon: Daemon, token: str, *args: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "aobd.agents.runner", "--url", daemon.url, "--token", token, *args]
    return subprocess.Popen(command, env=daemon.env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(errors="replace")


def start(daemon: Daemon, workspace: str, document: dict[str, Any]) -> str:
    reply = daemon.request("POST", "/v1/runs", {"definition": document}, token=TOKENS[workspace])
    assert reply.status == 201, reply.body
    return str(reply.body["run_id"])


def claim(daemon: Daemon, workspace: str, runner_name: str, wait_s: float = 10, lease_s: float = 30) -> Reply:
    body = {"runner": runner_name, "wait_s": wait_s, "lease_s": lease_s}
    return daemon.request("POST", "/v1/agent-jobs/claim", body, token=TOKENS[workspace])


def post(daemon: Daemon, workspace: str, job_id: str, what: str, body: dict[str, Any]) -> Reply:
    return daemon.request("POST", f"/v1/agent-jobs/{job_id}/{what}", body, token=TOKENS[workspace])


def test_the_reference_runner_answers_and_its_patch_is_applied(daemon: Daemon) -> None:
    run_id = start(daemon, "patching", external("patching"))
    pending = daemon.request("GET", "/v1/agent-jobs", token=TOKENS["patching"])
    assert pending.status == 200
    assert [(j["job_id"], j["state"]) for j in pending.body] == [(f"{run_id}:ext:1", "offered")]
    # Other workspaces neither see the job nor can claim it.
    assert daemon.request("GET", "/v1/agent-jobs", token=TOKENS["bystander"]).body == []
    assert claim(daemon, "bystander", "thief", wait_s=0).status == 204

    code, out = finish(runner(daemon, TOKENS["patching"], "--once", "--runner-name", "reference"))
    assert code == 0, out
    final = daemon.wait_run(run_id, token=TOKENS["patching"])
    assert final["status"] == "completed", final
    assert final["nodes"]["ext"] == {"status": "completed", "attempts": 1, "output": {"route": "billing"}}
    assert final["nodes"]["followup"]["status"] == "completed"
    assert final["nodes"]["followup"]["output"] == {"route": "billing"}
    [patch] = final["patches"]
    assert (patch["author"], patch["status"]) == ("agent:ext", "applied")
    assert daemon.request("GET", "/v1/agent-jobs", token=TOKENS["patching"]).body == []


def test_a_lapsed_lease_is_taken_over_and_the_late_answer_refused(daemon: Daemon) -> None:
    run_id = start(daemon, "lapsing", external("lapsing"))
    job_id = f"{run_id}:ext:1"
    # A runner claims with a tiny lease, then dies without a heartbeat.
    doomed = claim(daemon, "lapsing", "doomed", lease_s=0.3)
    assert doomed.status == 200 and doomed.body["job_id"] == job_id
    assert doomed.body["attempt"] == 1 and doomed.body["document"]["name"] == "lapsing"
    assert doomed.body["config"]["script"] == [ANSWER] and doomed.body["version"].startswith("sha256:")
    # A second runner, parked in its long poll, gets the job once the lease lapses.
    second = claim(daemon, "lapsing", "second", wait_s=10, lease_s=2.0)
    assert second.status == 200 and second.body["job_id"] == job_id
    assert second.body["lease_id"] != doomed.body["lease_id"]
    late = post(daemon, "lapsing", job_id, "result", {"lease_id": doomed.body["lease_id"], "output": {"late": 1}})
    assert late.status == 409, late.body
    assert "lease expired or held by another runner" in late.body["error"]["message"]
    assert late.body["error"]["details"][0]["holder"] == "second"
    assert post(daemon, "lapsing", job_id, "heartbeat", {"lease_id": doomed.body["lease_id"]}).status == 409
    beat = post(daemon, "lapsing", job_id, "heartbeat", {"lease_id": second.body["lease_id"]})
    assert beat.status == 200 and 1.0 < beat.body["lease_expires_in_s"] <= 2.0
    listed = daemon.request("GET", "/v1/agent-jobs", token=TOKENS["lapsing"]).body
    assert [(j["state"], j["runner"], j["claims"]) for j in listed] == [("leased", "second", 2)]

    # The second runner dies too; the reference runner takes over when its lease lapses, and answers.
    code, out = finish(runner(daemon, TOKENS["lapsing"], "--once", "--runner-name", "third"))
    assert code == 0, out
    too_late = post(daemon, "lapsing", job_id, "result", {"lease_id": second.body["lease_id"], "output": None})
    assert too_late.status == 404, too_late.body
    final = daemon.wait_run(run_id, token=TOKENS["lapsing"])
    assert final["status"] == "completed", final
    assert final["nodes"]["ext"]["attempts"] == 1 and final["nodes"]["followup"]["status"] == "completed"
    assert [p["status"] for p in final["patches"]] == ["applied"]


def test_a_long_poll_wakes_on_an_offer_and_an_error_result_fails_the_attempt(daemon: Daemon) -> None:
    started = time.monotonic()
    assert claim(daemon, "polling", "idle", wait_s=0.3).status == 204
    assert time.monotonic() - started >= 0.25

    replies: list[Reply] = []
    parked = threading.Thread(target=lambda: replies.append(claim(daemon, "polling", "parked", wait_s=20)))
    parked.start()
    time.sleep(0.3)
    document = external("polling")
    document["defaults"] = {"retry": {"max_attempts": 1}}
    run_id = start(daemon, "polling", document)
    parked.join(timeout=10)
    [reply] = replies
    assert reply.status == 200 and reply.body["job_id"] == f"{run_id}:ext:1"
    job_id, lease_id = reply.body["job_id"], reply.body["lease_id"]

    for bad in (
        {"lease_id": lease_id, "output": 1, "error": {"message": "both"}},
        {"lease_id": lease_id, "error": {"message": "m", "code": "Not A Code"}},
        {"lease_id": lease_id, "surprise": True},
        {"lease_id": lease_id, "patch": {"ops": "not a list"}},
    ):
        assert post(daemon, "polling", job_id, "result", bad).status == 400, bad
    assert claim(daemon, "polling", "greedy", wait_s=61).status == 400
    assert claim(daemon, "polling", "greedy", lease_s=0).status == 400

    failed = {
        "lease_id": lease_id,
        "error": {"message": "the model refused", "code": "model_refused", "retryable": False},
    }
    assert post(daemon, "polling", job_id, "result", failed).status == 200
    final = daemon.wait_run(run_id, token=TOKENS["polling"])
    assert final["status"] == "failed"
    assert final["nodes"]["ext"]["error"]["code"] == "model_refused"
    assert "the model refused" in final["nodes"]["ext"]["error"]["message"]


def test_the_runner_stops_on_sigterm_and_refuses_to_run_with_a_read_token(daemon: Daemon) -> None:
    idle = runner(daemon, TOKENS["bystander"], "--wait-s", "20")
    time.sleep(1.0)  # parked in its long poll
    assert idle.poll() is None
    idle.send_signal(signal.SIGTERM)
    code, out = finish(idle, timeout=10)
    assert code == 0, out

    code, out = finish(runner(daemon, READ_TOKEN, "--once"), timeout=30)
    assert code == 2 and "403" in out, out


def test_stopping_the_daemon_ends_parked_claims_at_once(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "data", free_port()).start()
    replies: list[Reply] = []
    parked = threading.Thread(target=lambda: replies.append(d.request("POST", "/v1/agent-jobs/claim", {"runner": "p"})))
    parked.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert d.stop() == 0, d.output()
    assert time.monotonic() - started < 5, "a parked long poll held up the shutdown"
    parked.join(timeout=10)
    [reply] = replies
    assert reply.status == 503 and reply.body["error"]["code"] == "unavailable"


def test_openai_jobs_use_the_runners_own_key_and_heartbeats_outlast_the_lease(daemon: Daemon, tmp_path: Path) -> None:
    # The key lives only in the runner's environment: the daemon hands out the variable's name, never a key.
    port = free_port()
    script = tmp_path / "answers.json"
    # The model takes longer than the lease: only the runner's heartbeats keep the job its own.
    behaviour = {"answer": ANSWER, "usage": {"prompt_tokens": 3, "completion_tokens": 2}, "delay_s": 2.0}
    script.write_text(json.dumps([behaviour]))
    env = {**daemon.env(), "STUB_KEY": "runner-only-key"}
    serve = ["aobd.agents.stub_server", "--port", str(port), "--script", str(script), "--api-key-env", "STUB_KEY"]
    stub = subprocess.Popen(
        [sys.executable, "-m", *serve],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert stub.stdout is not None and b"serving" in stub.stdout.readline()
        config = {
            "runner": "external",
            "provider": "openai",
            "base_url": f"http://127.0.0.1:{port}/v1",
            "model": "stub-model",
            "api_key_env": "STUB_KEY",
            "prompt": "Route the ticket.",
        }
        document = {"name": "llm", "nodes": [{"id": "ext", "type": "agent", "config": config}], "edges": []}
        run_id = start(daemon, "patching", document)
        command = [sys.executable, "-m", "aobd.agents.runner", "--url", daemon.url, "--once"]
        command += ["--http-allow", f"127.0.0.1:{port}", "--lease-s", "0.6"]
        proc = subprocess.Popen(
            command,
            env={**env, "AOBD_RUNNER_TOKEN": TOKENS["patching"]},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        code, out = finish(proc)
        assert code == 0, out
        final = daemon.wait_run(run_id, token=TOKENS["patching"])
        assert final["status"] == "completed", final
        assert final["nodes"]["ext"]["output"] == {"route": "billing"}
        assert final["nodes"]["followup"]["status"] == "completed"
        events = daemon.request("GET", f"/v1/runs/{run_id}/events", token=TOKENS["patching"]).body
        [done] = [e for e in events if e["type"] == "NodeCompleted" and e["node_id"] == "ext"]
        assert done["usage"]["prompt_tokens"] == 3 and done["exchange_ref"].startswith("sha256:")
        assert "heartbeat failed" not in out and "lease lost" not in out
    finally:
        stub.terminate()
        stub.wait(timeout=10)
        if stub.stdout is not None:
            stub.stdout.close()
