"""`make run`'s main job: the showcase completes with one patch applied, one rejected, and the approval
escalated and then decided by its timeout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.daemon import ROOT

pytestmark = pytest.mark.integration


def test_showcase_runs_end_to_end(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "showcase" / "run.py"), "--data-dir", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed"
    assert [p["status"] for p in summary["patches"]] == ["applied", "rejected"]
    assert {r["code"] for r in summary["patches"][1]["reasons"]} >= {"past_removed", "ssrf"}
    assert summary["outputs"]["decision"] == "approve" and summary["outputs"]["reply"]["account"] == "acme-corp"
    assert "escalation step 1: notified oncall (sent: HTTP 200)" in out.stderr
    assert "on-call paged" in out.stdout + out.stderr
