"""The multi-process daemon (plain ``aobd serve``): supervisor, orchestrators, runners, accept workers, fanout.

W6 runs go through the planes over HTTP while children are killed with SIGKILL: the supervisor restarts each
(and counts it), and every run still completes with exactly one NodeCompleted per node and gap-free seqs. The
groups are pinned to their configured cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aobd.model import events as ev
from aobd.store.sqlite_log import SqliteEventLog
from perf.w6 import w6_document
from tests.integration.daemon import Daemon, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUNS = 240


def _config(path: Path, cpus: int, layout: str = "accept_workers = 0\nrunners = 2\n") -> Path:
    """By default accept_workers = 0: orchestrator 0 serves HTTP itself."""
    pinning = "control_cpus = [0]\nrunner_cpus = [1]\n" if cpus >= 2 else ""
    path.write_text(
        '[limits]\nrun_starts_per_s = 0\n[security]\nhandler_modules = ["perf.w6_handlers"]\n'
        f"[planes]\n{layout}restart_backoff_s = 0.1\n{pinning}"
    )
    return path


def _planes(daemon: Daemon) -> dict[str, Any]:
    reply = daemon.request("GET", "/v1/admin/status")
    assert reply.status == 200, reply.body
    return dict(reply.body["planes"])


def _all_up(daemon: Daemon) -> dict[str, Any] | None:
    planes = _planes(daemon)
    return planes if all(c["state"] == "up" for c in planes["children"]) else None


def _child(planes: dict[str, Any], role: str, index: int) -> dict[str, Any]:
    return next(c for c in planes["children"] if c["role"] == role and c["index"] == index)


def _wait_for(predicate: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_runner_and_orchestrator_killed_under_load_every_run_completes_once(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    # Every attempt on the runner plane, so killing the runner interrupts some of them.
    layout = "accept_workers = 0\nrunners = 2\ninline_sync_handlers = false\n"
    config = _config(tmp_path / "aobd.toml", cpus, layout)
    daemon = Daemon(tmp_path / "data", free_port(), config=config, single_process=False)
    daemon.start(extra_env={"AOBD_LOG_LEVEL": "warning"})
    try:
        # /readyz answers once orchestrator 0 serves; the runners start after it (orchestrators start first).
        planes = _wait_for(lambda: _all_up(daemon))
        assert planes["mode"] == "multi-process"
        orch, runner = _child(planes, "orchestrator", 0), _child(planes, "runner", 0)
        assert orch["pid"] != planes["supervisor_pid"] and runner["state"] == "up"
        if cpus >= 2:
            assert os.sched_getaffinity(orch["pid"]) == {0}
            assert os.sched_getaffinity(runner["pid"]) == {1}
            assert runner["cpus"] == [1]

        body = {"definition": w6_document(), "inputs": {"x": 1}}
        created: list[str] = []
        lock = threading.Lock()

        def client(n: int) -> None:
            for _ in range(n):
                while True:  # the orchestrator may be restarting: retry until it answers
                    try:
                        reply = daemon.request("POST", "/v1/runs", body, timeout=10)
                    except OSError:
                        time.sleep(0.05)
                        continue
                    if reply.status == 201:
                        break
                    time.sleep(0.05)
                with lock:
                    created.append(reply.body["run_id"])

        threads = [threading.Thread(target=client, args=(RUNS // 8,)) for _ in range(8)]
        for t in threads:
            t.start()
        _wait_for(lambda: len(created) >= RUNS // 4)
        os.kill(runner["pid"], signal.SIGKILL)
        _wait_for(lambda: len(created) >= RUNS // 2)
        os.kill(orch["pid"], signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert len(created) == RUNS

        def settled() -> bool:
            running = daemon.request("GET", "/v1/runs?status=running&limit=1000")
            return running.status == 200 and not running.body

        _wait_for(settled, timeout=60)

        def restarted() -> dict[str, Any] | None:
            # The health table is up to a heartbeat old: poll until it shows both restarts.
            planes = _all_up(daemon)
            if planes is None:
                return None
            runner_now, orch_now = _child(planes, "runner", 0), _child(planes, "orchestrator", 0)
            ok = runner_now["restarts"] >= 1 and orch_now["restarts"] >= 1 and orch_now["pid"] != orch["pid"]
            return planes if ok else None

        planes = _wait_for(restarted, timeout=30)
        metrics = daemon.request("GET", "/metrics").body.decode()
        assert 'aobd_plane_restarts_total{role="runner"}' in metrics
        assert 'aobd_plane_up{index="0",role="runner"} 1.0' in metrics
        children = [c["pid"] for c in planes["children"]]
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output()[-3000:]
    for pid in children:  # the drain stopped every child
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()

    async def check() -> None:
        log = SqliteEventLog(tmp_path / "data" / "events.db")
        try:
            runs = await log.list_runs(limit=10_000)
            assert len(runs) >= RUNS and {r.status for r in runs} == {"completed"}
            for info in runs:
                events = [ev.decode_event(r.data) for r in await log.read(info.run_id)]
                assert [e.seq for e in events] == list(range(1, len(events) + 1)), info.run_id
                completions = Counter(e.node_id for e in events if isinstance(e, ev.NodeCompleted))
                assert len(completions) == 6 and max(completions.values()) == 1, (info.run_id, completions)
        finally:
            await log.close()

    asyncio.run(check())


#: One node calling tests.handlers:dawdle, which sleeps inputs.s seconds and answers with its process id.
_DAWDLE = {
    "name": "dawdle",
    "nodes": [{"id": "a", "type": "function", "config": {"handler": "tests.handlers:dawdle"}, "in": {"s": "inputs.s"}}],
}


@contextlib.contextmanager
def _one_orchestrator_and_runner(
    tmp_path: Path, planes: str = ""
) -> Iterator[tuple[Daemon, dict[str, Any], dict[str, Any]]]:
    """The multi-process daemon with one orchestrator serving HTTP and one runner, both up, on the default
    inline_sync_handlers ("auto"); yields it and the two children's health entries, and checks its clean stop."""
    config = tmp_path / "aobd.toml"
    config.write_text(
        '[limits]\nrun_starts_per_s = 0\n[security]\nhandler_modules = ["tests.handlers"]\n'
        f"[planes]\naccept_workers = 0\nrunners = 1\nrestart_backoff_s = 0.1\n{planes}"
    )
    daemon = Daemon(tmp_path / "data", free_port(), config=config, single_process=False)
    daemon.start(extra_env={"AOBD_LOG_LEVEL": "warning"})
    try:
        children = _wait_for(lambda: _all_up(daemon))
        yield daemon, _child(children, "orchestrator", 0), _child(children, "runner", 0)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output()[-3000:]


def test_a_handler_running_inline_when_its_orchestrator_dies_runs_on_the_runners_after(tmp_path: Path) -> None:
    """inline_sync_handlers = "auto": the orchestrator that replaces a killed one reads which handlers were running
    inline at the kill (they may have hung it) and sends them to the runner plane, so a hanging handler cannot
    keep killing orchestrators."""
    with _one_orchestrator_and_runner(tmp_path) as (daemon, orch, runner):
        reply = daemon.request("POST", "/v1/runs", {"definition": _DAWDLE, "inputs": {"s": 2.0}})
        assert reply.status == 201, reply.body
        run_id = reply.body["run_id"]
        time.sleep(0.5)  # the handler is sleeping inline in the orchestrator now
        os.kill(orch["pid"], signal.SIGKILL)

        def finished() -> dict[str, Any] | None:
            run = daemon.request("GET", f"/v1/runs/{run_id}")
            return run.body if run.status == 200 and run.body["status"] == "completed" else None

        summary = _wait_for(finished, timeout=30)
        assert summary["nodes"]["a"]["output"] == {"pid": runner["pid"]}  # not the orchestrator's this time
        metrics = daemon.request("GET", "/metrics").body.decode()
        assert 'aobd_inline_handlers_demoted_total{reason="died"} 1.0' in metrics


def test_a_sync_handler_over_the_inline_budget_moves_to_the_runners(tmp_path: Path) -> None:
    """inline_sync_handlers = "auto": a handler's first call runs in the orchestrator; once a call took longer than
    inline_budget_ms, its next attempts run on the runner plane, and the daemon counts the demotion."""
    with _one_orchestrator_and_runner(tmp_path, "inline_budget_ms = 5.0\n") as (daemon, orch, runner):
        body = {"definition": _DAWDLE, "inputs": {"s": 0.05}}
        ran_in = []
        for _ in range(2):
            reply = daemon.request("POST", "/v1/runs?wait=30", body)
            assert reply.status == 201 and reply.body["status"] == "completed", reply.body
            ran_in.append(reply.body["nodes"]["a"]["output"]["pid"])
        assert ran_in == [orch["pid"], runner["pid"]]
        metrics = daemon.request("GET", "/metrics").body.decode()
        assert 'aobd_inline_handlers_demoted_total{reason="slow"} 1.0' in metrics


def test_drain_on_request_stops_the_whole_daemon(tmp_path: Path) -> None:
    """``aobctl drain`` reaches orchestrator 0 over the admin socket; the supervisor then stops every child."""
    daemon = Daemon(tmp_path / "data", free_port(), config=_config(tmp_path / "aobd.toml", 1), single_process=False)
    daemon.start(extra_env={"AOBD_LOG_LEVEL": "warning"})
    assert daemon.proc is not None
    reply = daemon.request("POST", "/v1/runs?wait=10", {"definition": w6_document(), "inputs": {"x": 1}})
    assert reply.status == 201 and reply.body["status"] == "completed", json.dumps(reply.body)[:500]
    drain = subprocess.run(
        [sys.executable, "-m", "aobd.ctl.main", "--socket", str(daemon.socket), "drain", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        env=daemon.env(),
    )
    assert drain.returncode == 0, drain.stderr
    assert daemon.proc.wait(timeout=40) == 0, daemon.output()[-3000:]


def test_default_layout_survives_a_kill_of_every_child_kind(tmp_path: Path) -> None:
    """Accept workers, two orchestrators (runs sharded by id), a runner and the fanout plane; each kind is killed
    once under load. Clients retry with an idempotency key, as a client of any HTTP service must when an answer
    is lost: a retried start never makes a second run. The layout's default inline_sync_handlers = "auto" runs
    W6's handlers in the orchestrators (until the orchestrator's kill demotes the ones it was running); killing a
    runner with attempts in flight is the first test's part."""
    layout = "accept_workers = 2\norchestrators = 2\nrunners = 1\n"
    daemon = Daemon(
        tmp_path / "data", free_port(), config=_config(tmp_path / "aobd.toml", 1, layout), single_process=False
    )
    daemon.start(extra_env={"AOBD_LOG_LEVEL": "warning"})
    runs = 160
    try:
        planes = _wait_for(lambda: _all_up(daemon))
        roles = Counter(c["role"] for c in planes["children"])
        assert roles == {"orchestrator": 2, "accept": 2, "runner": 1, "fanout": 1}, roles
        victims = [
            _child(planes, role, index)
            for role, index in (("accept", 1), ("runner", 0), ("orchestrator", 1), ("fanout", 0))
        ]
        body = {"definition": w6_document(), "inputs": {"x": 1}}
        created: dict[str, str] = {}
        lock = threading.Lock()

        def client(k: int, n: int) -> None:
            for i in range(n):
                key = f"c{k}-{i}"
                while True:
                    try:
                        reply = daemon.request("POST", "/v1/runs", {**body, "idempotency_key": key}, timeout=15)
                    except OSError:
                        time.sleep(0.05)
                        continue
                    if reply.status == 201:
                        break
                    assert reply.status in (502, 503), reply.body  # a child restarting, nothing else
                    time.sleep(0.05)
                with lock:
                    created[key] = reply.body["run_id"]

        threads = [threading.Thread(target=client, args=(k, runs // 8)) for k in range(8)]
        for t in threads:
            t.start()
        for step, victim in enumerate(victims, start=1):
            _wait_for(lambda step=step: len(created) >= runs * step // 5, timeout=60)
            os.kill(victim["pid"], signal.SIGKILL)
        for t in threads:
            t.join(90)
        assert len(created) == runs and len(set(created.values())) == runs

        def settled() -> bool:
            running = daemon.request("GET", "/v1/runs?status=running&limit=1000")
            return running.status == 200 and not running.body

        _wait_for(settled, timeout=90)

        def restarted() -> dict[str, Any] | None:
            # The health table served by orchestrator 0 is up to a heartbeat old: poll until it shows the restarts.
            planes = _all_up(daemon)
            if planes is None:
                return None
            children = [_child(planes, v["role"], v["index"]) for v in victims]
            done = all(c["restarts"] >= 1 and c["pid"] != v["pid"] for c, v in zip(children, victims, strict=True))
            return planes if done else None

        _wait_for(restarted, timeout=30)
        # a run's events still stream live through the restarted fanout plane
        reply = daemon.request("POST", "/v1/runs?wait=10", body)
        assert reply.status == 201 and reply.body["status"] == "completed", reply.body
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output()[-3000:]

    async def check() -> None:
        log = SqliteEventLog(tmp_path / "data" / "events.db")
        try:
            infos = await log.list_runs(limit=10_000)
            assert len(infos) == runs + 1 and {r.status for r in infos} == {"completed"}
            for info in infos:
                events = [ev.decode_event(r.data) for r in await log.read(info.run_id)]
                assert [e.seq for e in events] == list(range(1, len(events) + 1)), info.run_id
                completions = Counter(e.node_id for e in events if isinstance(e, ev.NodeCompleted))
                assert len(completions) == 6 and max(completions.values()) == 1, (info.run_id, completions)
                assert {e.writer for e in events} == {None}  # one daemon: no cluster writer ids
        finally:
            await log.close()

    asyncio.run(check())


def test_sighup_reloads_tokens_in_the_accept_workers_without_restarting_them(tmp_path: Path) -> None:
    """`systemctl reload aobd` signals the supervisor, which forwards SIGHUP to the accept workers: each rereads
    the config file. They must not die of it (SIGHUP's default action) and cut the requests in flight."""

    def tokens(token: str) -> str:
        return f'[[auth.tokens]]\ntoken = "{token}"\nworkspace = "w"\nrole = "admin"\n'

    layout = "accept_workers = 2\norchestrators = 1\nrunners = 1\n"
    config = _config(tmp_path / "aobd.toml", 1, layout)
    base = config.read_text()
    config.write_text(base + tokens("old-token"))
    daemon = Daemon(tmp_path / "data", free_port(), config=config, single_process=False)
    daemon.start(extra_env={"AOBD_LOG_LEVEL": "info"})
    try:
        before = _wait_for(lambda: _up_as(daemon, "old-token"))
        accept_pids = {c["pid"] for c in before["children"] if c["role"] == "accept"}
        assert len(accept_pids) == 2 and None not in accept_pids
        config.write_text(base + tokens("new-token"))
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: all(daemon.request("GET", "/v1/runs", token="new-token").status == 200 for _ in range(8)))
        # Each request is a new connection, which the kernel hands to either worker: both must have reloaded.
        assert {daemon.request("GET", "/v1/runs", token="new-token").status for _ in range(30)} == {200}
        assert {daemon.request("GET", "/v1/runs", token="old-token").status for _ in range(30)} == {401}
        for pid in accept_pids:
            os.kill(pid, 0)  # still the same processes (a dead, reaped one raises ProcessLookupError)
        time.sleep(1.5)  # the health table is as of the last heartbeat: let one pass
        after = _planes_as(daemon, "new-token")
        assert {c["pid"] for c in after["children"] if c["role"] == "accept"} == accept_pids
        assert all(c["restarts"] == 0 for c in after["children"])
    finally:
        assert daemon.stop() == 0
    assert daemon.output().count("configuration reloaded") >= 2


def _planes_as(daemon: Daemon, token: str) -> dict[str, Any]:
    reply = daemon.request("GET", "/v1/admin/status", token=token)
    assert reply.status == 200, reply.body
    return dict(reply.body["planes"])


def _up_as(daemon: Daemon, token: str) -> dict[str, Any] | None:
    planes = _planes_as(daemon, token)
    return planes if all(c["state"] == "up" and c["pid"] for c in planes["children"]) else None


def test_accept_workers_share_one_rate_limit_budget(tmp_path: Path) -> None:
    """Two accept workers, run_starts_burst = 4 at a trickle of a rate: every connection may land on either worker,
    and still only four starts of the workspace get through (each worker alone would have granted four)."""
    layout = "accept_workers = 2\norchestrators = 1\nrunners = 1\n"
    config = _config(tmp_path / "aobd.toml", 1, layout)
    config.write_text(
        config.read_text().replace("run_starts_per_s = 0\n", "run_starts_per_s = 0.01\nrun_starts_burst = 4\n")
    )
    daemon = Daemon(tmp_path / "data", free_port(), config=config, single_process=False)
    daemon.start(extra_env={"AOBD_LOG_LEVEL": "warning"})
    doc = {"name": "tiny", "nodes": [{"id": "a", "type": "function", "config": {"handler": "builtin:noop"}}]}
    try:
        _wait_for(lambda: _all_up(daemon))
        statuses = [daemon.request("POST", "/v1/runs", {"definition": doc}).status for _ in range(12)]
    finally:
        assert daemon.stop() == 0
    assert statuses.count(201) == 4 and statuses.count(429) == 8, statuses


def test_metrics_on_any_accept_worker_cover_the_whole_daemon(tmp_path: Path) -> None:
    """/metrics lands on either accept worker, and must show every process: the runs the orchestrator drove, the
    requests both workers served, the planes' health and each process's CPU."""
    import urllib.request

    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
    from prometheus_client.parser import text_string_to_metric_families

    layout = "accept_workers = 2\norchestrators = 1\nrunners = 1\n"
    daemon = Daemon(
        tmp_path / "data", free_port(), config=_config(tmp_path / "aobd.toml", 1, layout), single_process=False
    )
    daemon.start(extra_env={"AOBD_LOG_LEVEL": "warning"})
    doc = {"name": "tiny", "nodes": [{"id": "a", "type": "function", "config": {"handler": "builtin:noop"}}]}

    def scrape(openmetrics: bool = False) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        request = urllib.request.Request(daemon.url + "/metrics")
        if openmetrics:
            request.add_header("Accept", "application/openmetrics-text; version=1.0.0")
        with urllib.request.urlopen(request, timeout=10) as resp:  # a new connection: either worker
            content_type = resp.headers["Content-Type"]
            text = resp.read().decode()
        if openmetrics:
            assert content_type.startswith("application/openmetrics-text; version=1.0.0"), content_type
            assert text.endswith("# EOF\n")
        else:
            assert content_type == "text/plain; version=0.0.4; charset=utf-8", content_type
        parse = openmetrics_families if openmetrics else text_string_to_metric_families
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in parse(text) for s in family.samples}

    def complete(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> bool:
        started = (("method", "POST"), ("route", "startRun"), ("status", "201"))
        up = [v for (name, _), v in samples.items() if name == "aobd_plane_up"]
        return (
            samples.get(("aobd_runs_started_total", (("workflow", "tiny"),))) == 8
            and samples.get(("aobd_http_requests_total", started)) == 8
            and len(up) == 5
            and set(up) == {1.0}
        )

    try:
        _wait_for(lambda: _all_up(daemon))
        for _ in range(8):
            assert daemon.request("POST", "/v1/runs?wait=10", {"definition": doc}).status == 201
        _wait_for(lambda: complete(scrape()), timeout=10)  # the processes' beats are at most a second apart
        for i in range(6):  # whichever worker answers, in either format
            samples = scrape(openmetrics=i % 2 == 1)
            assert complete(samples)
            planes = {dict(labels)["plane"] for name, labels in samples if name == "process_cpu_seconds_total"}
            assert {"orchestrator-0", "accept-0", "accept-1"} <= planes
    finally:
        assert daemon.stop() == 0
