"""Accept workers in front of an orchestrator: HTTP on one shared port, Service calls over zmq, live SSE.

The orchestrator is built in this process (Service + RpcServer + EventPublisher on a thread with its own loop);
the fanout plane and two accept workers are real processes, the workers both bound to one port (SO_REUSEPORT).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from aobd.config import ApiConfig, Config, PlanesConfig
from aobd.daemon.service import Service
from aobd.planes import paths
from aobd.planes.fanout import EventPublisher
from aobd.planes.rpc import RpcServer
from aobd.planes.watched import WatchedAnywhere
from aobd.store.factory import open_stores
from tests.conftest import ROOT, fn, workflow
from tests.integration.daemon import free_port

pytestmark = pytest.mark.integration

_ACCEPT = (
    "import sys, msgspec; from aobd.config import Config; from aobd.planes import accept; "
    "sys.exit(accept.main(msgspec.json.decode(sys.argv[1], type=Config), int(sys.argv[2])))"
)
_FANOUT = (
    "import sys, msgspec; from aobd.config import Config; from aobd.planes import fanout; "
    "sys.exit(fanout.main(msgspec.json.decode(sys.argv[1], type=Config)))"
)


class Orchestrator(threading.Thread):
    """What an orchestrator child runs, on a thread: the Service, its RPC server and its event publisher."""

    def __init__(self, config: Config) -> None:
        super().__init__(daemon=True)
        self.config = config
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by the test
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        service = Service(self.config, await open_stores(self.config))
        # As an orchestrator child does: publish only the runs an accept worker's stream follows.
        watched = WatchedAnywhere.of_daemon(self.config)
        publisher = EventPublisher(self.config, watched=watched)
        service.engine.record_listeners.append(publisher)
        await service.start()
        rpc = RpcServer(service, paths.orchestrator_rpc(self.config, 0))
        await rpc.start()
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        self.ready.set()
        await self._stopping.wait()
        await rpc.close()
        publisher.close()
        watched.close()
        await service.drain(1.0)
        await service.close()

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self.join(15)


def _spawn(code: str, config: Config, *args: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", code, msgspec.json.encode(config).decode(), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


def _request(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    # A new connection per request, so that the kernel spreads them over both workers.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        payload = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=payload, headers={"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def _url(port: int, path: str) -> str:
    return f"http://127.0.0.1:{port}{path}"


def _sse(port: int, run_id: str) -> list[tuple[int, str]]:
    """(id, event type) of every event of a live SSE stream, until the server ends it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", f"/v1/runs/{run_id}/events", headers={"accept": "text/event-stream"})
        response = conn.getresponse()
        assert response.status == 200
        seen: list[tuple[int, str]] = []
        seq = 0
        # The heartbeat is longer than the deadline here, so the stream's idle catch-up from the log cannot stand
        # in for live delivery: a stream whose events do not come through the fanout plane fails the test.
        deadline = time.monotonic() + 20
        for raw in response:
            assert time.monotonic() < deadline, f"the stream did not end; it got {seen}"
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                seq = int(line[4:])
            elif line.startswith("event: "):
                seen.append((seq, line[7:]))
        return seen
    finally:
        conn.close()


@pytest.fixture
def planes() -> Iterator[tuple[int, Path]]:
    # Short: the planes' unix socket paths must stay under 107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="aobd-pl-", dir="/tmp"))
    port = free_port()
    config = Config(
        data_dir=str(tmp / "data"),
        api=ApiConfig(listen=f"127.0.0.1:{port}", heartbeat_s=60.0),
        planes=PlanesConfig(orchestrators=1, accept_workers=2, socket_dir=str(tmp / "s")),
    )
    procs = [_spawn(_FANOUT, config, log=tmp / "fanout.log")]
    orchestrator = Orchestrator(config)
    orchestrator.start()
    orchestrator.ready.wait(20)
    try:
        assert orchestrator.error is None, orchestrator.error
        procs += [_spawn(_ACCEPT, config, str(i), log=tmp / f"accept-{i}.log") for i in range(2)]
        yield port, tmp
        for proc in procs:
            proc.terminate()
        codes = [proc.wait(15) for proc in procs]
        assert codes == [0, 0, 0], [(tmp / n).read_text() for n in ("fanout.log", "accept-0.log", "accept-1.log")]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        orchestrator.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_both_workers(port: int, tmp: Path) -> set[int]:
    pids: set[int] = set()
    deadline = time.monotonic() + 30
    while len(pids) < 2 and time.monotonic() < deadline:
        try:
            status, body = _request(port, "GET", "/v1/admin/status")
        except OSError:
            time.sleep(0.1)
            continue
        if status == 200:
            assert body["runs_active"] >= 0 and body["planes"]["accept"]["orchestrators"] == 1
            pids.add(body["planes"]["accept"]["pid"])
    assert len(pids) == 2, [(tmp / f"accept-{i}.log").read_text() for i in range(2)]
    return pids


def test_accept_workers_share_the_port_forward_calls_and_stream_live_events(planes: tuple[int, Path]) -> None:
    port, tmp = planes
    pids = _wait_for_both_workers(port, tmp)
    # No supervisor runs here, so no health table reaches the workers: they cannot vouch for the orchestrators and
    # runners, and say so (test_planes.py checks /readyz under the supervisor, through Daemon.start).
    assert all(r == (503, {"status": "starting"}) for r in (_request(port, "GET", "/readyz") for _ in range(4)))

    # Errors keep their HTTP status through the RPC hop.
    assert _request(port, "GET", "/v1/runs/r0000000000000000000")[0] == 404
    assert _request(port, "POST", "/v1/runs", {"inputs": {}})[0] == 400

    quick = workflow([fn("a"), fn("b")], [{"from": "a", "to": "b"}], name="quick")
    status, body = _request(port, "POST", "/v1/workflows", {"definition": quick})
    assert status == 201, body
    started = [_request(port, "POST", "/v1/runs?wait=10", {"workflow": "quick", "inputs": {"x": i}}) for i in range(6)]
    assert all(status == 201 and run["status"] == "completed" for status, run in started), started
    for _, run in started:
        status, again = _request(port, "GET", f"/v1/runs/{run['run_id']}")
        assert status == 200 and again["status"] == "completed"
    status, listed = _request(port, "GET", "/v1/runs?limit=100")
    assert status == 200 and {r["run_id"] for _, r in started} <= {r["run_id"] for r in listed}

    # A stream opened while the run is going: history from the log, the rest live through the fanout plane.
    slow = workflow(
        [fn(n, "builtin:sleep", config={"handler": "builtin:sleep", "ms": 150}) for n in ("s1", "s2", "s3")],
        [{"from": "s1", "to": "s2"}, {"from": "s2", "to": "s3"}],
        name="slow",
    )
    status, run = _request(port, "POST", "/v1/runs", {"definition": slow, "inputs": {}})
    assert status == 201 and run["status"] == "running"
    seen = _sse(port, run["run_id"])
    assert seen[-1][1] == "RunCompleted"
    assert [seq for seq, _ in seen] == list(range(1, len(seen) + 1))  # no gap, no duplicate
    status, events = _request(port, "GET", f"/v1/runs/{run['run_id']}/events")
    assert status == 200 and [e["type"] for e in events] == [kind for _, kind in seen]
    assert len(pids) == 2

    if shutil.which("curl") is not None:  # HTTP/2 by prior knowledge (h2c), as the single-process daemon serves it
        out = subprocess.run(
            [
                "curl",
                "-s",
                "--http2-prior-knowledge",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version}",
                _url(port, "/healthz"),
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        assert out.stdout == "2"


def test_external_agent_jobs_are_claimed_and_answered_through_accept_workers(planes: tuple[int, Path]) -> None:
    port, tmp = planes
    _wait_for_both_workers(port, tmp)
    config = {"runner": "external", "provider": "scripted", "script": [{"output": {"route": "billing"}}]}
    document = {"name": "ext", "nodes": [{"id": "ext", "type": "agent", "config": config}], "edges": []}
    status, run = _request(port, "POST", "/v1/runs", {"definition": document, "inputs": {}})
    assert status == 201, run
    job_id = f"{run['run_id']}:ext:1"
    status, listed = _request(port, "GET", "/v1/agent-jobs")
    assert status == 200 and [(j["job_id"], j["state"]) for j in listed] == [(job_id, "offered")]

    status, claimed = _request(port, "POST", "/v1/agent-jobs/claim", {"runner": "r1", "wait_s": 5, "lease_s": 30})
    assert status == 200 and claimed["job_id"] == job_id and 0 < claimed["lease_expires_in_s"] <= 30, claimed
    lease = claimed["lease_id"]
    status, renewed = _request(port, "POST", f"/v1/agent-jobs/{job_id}/heartbeat", {"lease_id": lease})
    assert status == 200 and renewed["lease_id"] == lease
    # A stale lease is refused with the same status as in one process.
    assert _request(port, "POST", f"/v1/agent-jobs/{job_id}/result", {"lease_id": "nope", "output": 1})[0] == 409
    body = {"lease_id": lease, "output": {"route": "billing"}}
    assert _request(port, "POST", f"/v1/agent-jobs/{job_id}/result", body) == (
        200,
        {"job_id": job_id, "status": "accepted"},
    )

    deadline = time.monotonic() + 10
    while (summary := _request(port, "GET", f"/v1/runs/{run['run_id']}")[1])["status"] == "running":
        assert time.monotonic() < deadline, summary
        time.sleep(0.05)
    assert summary["status"] == "completed" and summary["nodes"]["ext"]["output"] == {"route": "billing"}
    assert _request(port, "POST", "/v1/agent-jobs/claim", {"runner": "r1", "wait_s": 0})[0] == 204
