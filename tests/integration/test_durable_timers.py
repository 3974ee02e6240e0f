"""Timers and approval deadlines live in the event log: they survive kill -9 and fire once, never early."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.integration.daemon import Daemon, free_port

pytestmark = pytest.mark.integration


def test_timer_and_approval_deadline_survive_kill_9(tmp_path: Path) -> None:
    doc = {
        "name": "durable",
        "nodes": [
            {"id": "wait", "type": "timer", "config": {"delay": "1500ms"}},
            {"id": "gate", "type": "approval", "config": {"timeout": "2s", "on_timeout": "approve"}},
            {"id": "done", "type": "function", "config": {"handler": "builtin:echo"}},
        ],
        "edges": [{"from": "wait", "to": "done"}, {"from": "gate", "to": "done"}],
    }
    d = Daemon(tmp_path / "data", free_port()).start()
    run_id = d.request("POST", "/v1/runs", {"definition": doc}).body["run_id"]
    time.sleep(0.4)
    d.stop(signal.SIGKILL)
    d.start()
    try:
        final = d.wait_run(run_id, timeout=30)
        events = d.request("GET", f"/v1/runs/{run_id}/events").body
    finally:
        assert d.stop() == 0
    assert final["status"] == "completed"
    timer_set = [e for e in events if e["type"] == "TimerSet"]
    fired = [e for e in events if e["type"] == "TimerFired"]
    assert len(timer_set) == 1 and len(fired) == 1
    assert fired[0]["ts"] >= timer_set[0]["fire_at"]
    requested = next(e for e in events if e["type"] == "ApprovalRequested")
    decided = [e for e in events if e["type"] == "ApprovalDecided"]
    assert len(decided) == 1 and decided[0]["by"] == "system:timeout" and decided[0]["ts"] >= requested["deadline"]
