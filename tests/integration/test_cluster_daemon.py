"""`aobd serve` on the scale-out backends: Postgres event log and registry, S3 CAS (moto's server), Redis
rate limits. Runs complete, survive kill -9, and land in Postgres and the bucket."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_services import AWS_ENV, cluster_config, shared_services
from tests.integration.daemon import ROOT, Daemon, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with shared_services(kafka=False) as services:
        yield {**services, "base": tmp_path_factory.mktemp("cluster")}


def cluster_daemon(backends: dict[str, Any], name: str) -> Daemon:
    base: Path = backends["base"]
    return Daemon(base / name, free_port(), config=cluster_config(backends, base / f"{name}.toml"))


ENV = AWS_ENV


def test_runs_on_postgres_and_s3_complete_and_survive_kill_9(backends: dict[str, str]) -> None:
    import boto3
    import psycopg

    from perf.w6 import w6_document

    agentic = json.loads((ROOT / "examples" / "agentic" / "workflow.json").read_text())
    inputs = json.loads((ROOT / "examples" / "agentic" / "inputs.json").read_text())
    slow = {
        "name": "slow",
        "nodes": [
            {"id": f"n{i}", "type": "function", "config": {"handler": "builtin:sleep", "ms": 150}} for i in range(4)
        ],
        "edges": [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(3)],
    }
    d = cluster_daemon(backends, "one").start(extra_env=ENV)
    try:
        w6 = d.request("POST", "/v1/runs?wait=30", {"definition": w6_document(), "inputs": {"x": 1}}).body
        assert w6["status"] == "completed" and w6["outputs"] == {"x": 20}, w6
        triage = d.request("POST", "/v1/runs?wait=30", {"definition": agentic, "inputs": inputs}).body
        assert [p["status"] for p in triage["patches"]] == ["applied", "rejected"]
        slow_ids = [d.request("POST", "/v1/runs", {"definition": slow}).body["run_id"] for _ in range(10)]
        time.sleep(0.25)
    finally:
        d.stop(signal.SIGKILL)
    d.start(extra_env=ENV)
    try:
        for run_id in slow_ids:
            final = d.wait_run(run_id)
            assert final["status"] == "completed"
            events = d.request("GET", f"/v1/runs/{run_id}/events").body
            assert Counter(e["node_id"] for e in events if e["type"] == "NodeCompleted") == {
                f"n{i}": 1 for i in range(4)
            }
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    finally:
        assert d.stop() == 0
    with psycopg.connect(backends["dsn"]) as conn:
        rows: list[Any] = conn.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall()
    assert dict(rows) == {"completed": 12}
    s3 = boto3.client("s3", endpoint_url=backends["endpoint"], region_name="us-east-1", **_creds())
    keys = s3.list_objects_v2(Bucket="aobd-cas", Prefix="cas/sha256/").get("KeyCount", 0)
    assert keys > 0


def _creds() -> dict[str, str]:
    return {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
