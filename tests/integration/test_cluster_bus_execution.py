"""Two daemons, node attempts over the bus (``[cluster] execution = "bus"``): the runners of both daemons execute
attempts, also of runs the other daemon owns, and every run's history stays exactly-once."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_services import AWS_ENV, cluster_config, shared_services
from tests.integration.daemon import Daemon, free_port
from tests.integration.test_cluster_multinode import check_history, start_runs, wait_all_completed

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NODES = 4
WHERE = {
    "name": "where",
    "nodes": [{"id": f"n{i}", "type": "function", "config": {"handler": "tests.handlers:where"}} for i in range(NODES)],
    "edges": [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(NODES - 1)],
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with shared_services(kafka=True) as services:
        yield {**services, "base": Path(tmp_path_factory.mktemp("bus"))}


def bus_daemon(cluster: dict[str, Any], name: str, prefix: str) -> Daemon:
    base: Path = cluster["base"]
    path = cluster_config(cluster, base / f"{name}.toml", daemon_id=name, kafka_prefix=prefix, execution="bus")
    text = path.read_text().replace('handler_modules = ["perf.w6_handlers"]', 'handler_modules = ["tests.handlers"]')
    path.write_text(text)
    return Daemon(base / name, free_port(), config=path)


def cluster_status(d: Daemon) -> dict[str, Any]:
    return d.request("GET", "/v1/admin/status").body["planes"]["cluster"]


def wait_for_split(daemons: list[Daemon]) -> list[list[int]]:
    """Each daemon's partitions, once the group has divided all six among them (or after 30 s, as they are)."""
    deadline = time.monotonic() + 30
    while True:
        owned = [cluster_status(d)["owned_partitions"] for d in daemons]
        if all(owned) and sorted(p for parts in owned for p in parts) == list(range(6)):
            return owned
        if time.monotonic() > deadline:
            return owned
        time.sleep(0.2)


def approval_ticket(d: Daemon, run_id: str, timeout: float = 15) -> str:
    """The ticket of the run's approval request, once ``d`` can read it from the shared log."""
    deadline = time.monotonic() + timeout
    while True:
        events = d.request("GET", f"/v1/runs/{run_id}/events").body
        tickets = [e["ticket"] for e in events if e["type"] == "ApprovalRequested"]
        if tickets:
            return str(tickets[0])
        assert time.monotonic() < deadline, f"run {run_id} requested no approval within {timeout}s"
        time.sleep(0.2)


def test_attempts_run_on_both_daemons_and_are_recorded_once(cluster: dict[str, Any]) -> None:
    import psycopg

    prefix = f"b{uuid.uuid4().hex[:6]}"
    daemons = [bus_daemon(cluster, name, prefix) for name in ("p", "q")]
    for d in daemons:
        d.start(extra_env=AWS_ENV)
    try:
        wait_for_split(daemons)
        pids = {d.proc.pid: name for d, name in zip(daemons, ("p", "q")) if d.proc is not None}
        run_ids = start_runs(daemons, [(WHERE, {})] * 40)
        wait_all_completed(cluster["dsn"], run_ids, timeout=60)
        statuses = [cluster_status(d) for d in daemons]
    finally:
        for d in daemons:
            d.stop()
    check_history(cluster["dsn"], run_ids)
    # Who recorded each completion (the run's owner) and whose runner executed it (the pid in the output).
    pairs: Counter[tuple[str, str]] = Counter()
    with psycopg.connect(cluster["dsn"]) as conn:
        rows = conn.execute(
            "SELECT data FROM events WHERE run_id = ANY(%s) AND type = 'NodeCompleted'", (run_ids,)
        ).fetchall()
    for (data,) in rows:
        event = json.loads(bytes(data))
        pairs[(event["writer"], pids[event["output"]["pid"]])] += 1
    assert sum(pairs.values()) == 40 * NODES
    assert {runner for _, runner in pairs} == {"p", "q"}, pairs  # both daemons' runners executed attempts
    assert any(writer != runner for writer, runner in pairs), pairs  # also attempts of runs the other owns
    assert all(s["execution"] == "bus" for s in statuses), statuses
    assert sum(s["jobs_submitted"] for s in statuses) >= 40 * NODES
    assert sum(s["runner"]["jobs_executed"] for s in statuses) >= 40 * NODES
    assert sum(s["outcomes_delivered"] for s in statuses) == 40 * NODES, statuses


def test_a_command_sent_to_the_wrong_daemon_is_forwarded_to_the_runs_owner(cluster: dict[str, Any]) -> None:
    import psycopg

    from aobd.api.forward import FORWARDED_ADMIN, FORWARDED_BY, PEER_TOKEN
    from aobd.bus.kafka import partition_of
    from aobd.ctl.client import Client, Target

    prefix = f"f{uuid.uuid4().hex[:6]}"
    daemons = [bus_daemon(cluster, name, prefix) for name in ("u", "v")]
    peer_token = uuid.uuid4().hex + uuid.uuid4().hex  # what lets the admin socket's commands be forwarded
    for d in daemons:
        d.start(extra_env={**AWS_ENV, "AOBD_PEER_TOKEN": peer_token})
    slow = {
        "name": "slow",
        "nodes": [{"id": "wait", "type": "function", "config": {"handler": "builtin:sleep", "ms": 20000}}],
    }
    try:
        owned = wait_for_split(daemons)
        reply = daemons[0].request("POST", "/v1/runs", {"definition": slow, "inputs": {}})
        assert reply.status == 201, reply.body
        run_id = reply.body["run_id"]
        owner_index = next(i for i, parts in enumerate(owned) if partition_of(run_id, 6) in parts)
        stranger = daemons[1 - owner_index]
        # the directory is announced every 2 s: the stranger forwards as soon as it knows the owner's address
        deadline = time.monotonic() + 15
        while True:
            answer = stranger.request("POST", f"/v1/runs/{run_id}/cancel", {"reason": "wrong door"})
            if answer.status != 409 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert answer.status == 200, answer.body
        assert answer.body["status"] == "cancelled"

        # An approval decision too: its ticket names the run, so any daemon knows whom to forward it to.
        gated = {
            "name": "gated",
            "nodes": [
                {"id": "gate", "type": "approval", "config": {"assignees": ["ops"]}},
                {"id": "ship", "type": "function", "config": {"handler": "builtin:echo"}},
            ],
            "edges": [{"from": "gate", "to": "ship", "when": "nodes.gate.output.decision == 'approve'"}],
        }
        while True:  # a run the stranger does not drive
            gated_id = daemons[0].request("POST", "/v1/runs", {"definition": gated}).body["run_id"]
            if partition_of(gated_id, 6) in owned[owner_index]:
                break
        ticket = approval_ticket(stranger, gated_id)
        decided = stranger.request("POST", f"/v1/approvals/{ticket}", {"decision": "approve", "reason": "ok"})
        assert decided.status == 200, decided.body
        assert decided.body["status"] == "approved"
        deadline = time.monotonic() + 30
        while stranger.request("GET", f"/v1/runs/{gated_id}").body["status"] != "completed":
            assert time.monotonic() < deadline, "the approved run did not complete"
            time.sleep(0.2)

        # aobctl's way: over the stranger's admin socket, without a token, forwarded with the peer token.
        while True:
            socket_id = daemons[0].request("POST", "/v1/runs", {"definition": gated}).body["run_id"]
            if partition_of(socket_id, 6) in owned[owner_index]:
                break
        forged = {FORWARDED_ADMIN: "workspace=default&caller=mallory", FORWARDED_BY: "x", PEER_TOKEN: "0" * 64}
        refused = stranger.request("POST", f"/v1/runs/{socket_id}/cancel", {}, headers=forged)
        assert refused.status == 401, refused.body  # the header that grants admin, without the secret
        with Client(Target(socket_path=str(stranger.socket))) as ctl:
            by_socket = ctl.post(f"/v1/runs/{socket_id}/cancel", {"reason": "over the socket"})
        assert by_socket["status"] == "cancelled"

        # A patch and an approval over the stranger's socket, both carried out by the owner.
        while True:
            patched_id = daemons[0].request("POST", "/v1/runs", {"definition": gated}).body["run_id"]
            if partition_of(patched_id, 6) in owned[owner_index]:
                break
        audit = {"id": "audit", "type": "function", "config": {"handler": "builtin:noop"}}
        ops = [
            {"op": "add", "path": "/nodes/-", "value": audit},
            {"op": "add", "path": "/edges/-", "value": {"from": "ship", "to": "audit"}},
        ]
        ticket = approval_ticket(stranger, patched_id)
        with Client(Target(socket_path=str(stranger.socket))) as ctl:
            patch = ctl.post(f"/v1/runs/{patched_id}/patches", {"ops": ops, "reason": "audit trail"})
            assert patch["status"] == "applied", patch
            assert ctl.post(f"/v1/approvals/{ticket}", {"decision": "approve", "reason": "ok"})["status"] == "approved"
        deadline = time.monotonic() + 30
        while (summary := stranger.request("GET", f"/v1/runs/{patched_id}").body)["status"] != "completed":
            assert time.monotonic() < deadline, "the patched and approved run did not complete"
            time.sleep(0.2)
        assert summary["nodes"]["audit"]["status"] == "completed"  # the graph it ran on was the patched one
    finally:
        for d in daemons:
            d.stop()
    with psycopg.connect(cluster["dsn"]) as conn:
        rows = conn.execute(
            "SELECT convert_from(data, 'UTF8') FROM events WHERE run_id = %s ORDER BY seq", (run_id,)
        ).fetchall()
        socket_rows = conn.execute(
            "SELECT convert_from(data, 'UTF8') FROM events WHERE run_id = %s ORDER BY seq", (socket_id,)
        ).fetchall()
    events = [json.loads(r[0]) for r in rows]
    assert events[-1]["type"] == "RunCancelled"
    assert events[-1]["writer"] == ("u", "v")[owner_index]  # recorded by the owner, not by the daemon asked
    cancelled = json.loads(socket_rows[-1][0])
    assert cancelled["type"] == "RunCancelled" and cancelled["reason"] == "over the socket"
    assert cancelled["writer"] == ("u", "v")[owner_index]
    assert cancelled["by"] == f"admin:uid:{os.getuid()} via {('u', 'v')[1 - owner_index]}"  # who, through whom
