"""``aobctl`` against a fake daemon: an aiohttp app with canned bodies on a unix socket and on TCP.

The fake implements the routes of DESIGN.md section 9 the way the daemon serves them (JSON bodies of
``aobd.api.schemas``, errors as ``{"error": {...}}``, SSE framed by ``aobd.api.sse.encode_message``), and can be
told to misbehave on event streams (drop a connection mid-message, say ``lagged``, replay events after a resume)
so that the follower's exactly-once delivery is exercised. It runs on its own event loop in a thread; the
commands run in this process through ``aobd.ctl.main.main``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from aobd.api.sse import encode_message
from aobd.ctl import client as ctl_client
from aobd.ctl.main import main
from aobd.ctl.render import EventLines, RunProgress, Spinner, flatten, table
from tests.conftest import edge, fn, workflow

TOKEN = "s3cret"
V1 = "sha256:" + "1" * 64
V2 = "sha256:" + "2" * 64


def _event(run_id: str, seq: int, type_: str, **fields: Any) -> dict[str, Any]:
    return {"run_id": run_id, "seq": seq, "ts": 1_700_000_000.0 + seq / 100, "type": type_, **fields}


def _events_ok(run_id: str) -> list[dict[str, Any]]:
    return [
        _event(run_id, 1, "RunCreated", workflow="demo", base_version=V1, base_ref=V1, inputs_ref=V1),
        _event(run_id, 2, "NodeScheduled", node_id="a", attempt=1),
        _event(run_id, 3, "NodeStarted", node_id="a", attempt=1, inputs_ref=V1),
        _event(run_id, 4, "NodeCompleted", node_id="a", attempt=1, output_ref=V1, output={"x": 1}, inline=True),
        _event(run_id, 5, "NodeStarted", node_id="b", attempt=1, inputs_ref=V1),
        _event(run_id, 6, "NodeCompleted", node_id="b", attempt=1, output_ref=V1, output={"y": 2}, inline=True),
        _event(run_id, 7, "RunCompleted", outputs={"y": 2}),
    ]


def _events_failed(run_id: str) -> list[dict[str, Any]]:
    error = {"code": "handler_error", "message": "boom"}
    return [
        _event(run_id, 1, "RunCreated", workflow="failing", base_version=V1, base_ref=V1, inputs_ref=V1),
        _event(run_id, 2, "NodeStarted", node_id="a", attempt=1, inputs_ref=V1),
        _event(run_id, 3, "NodeFailed", node_id="a", attempt=1, error=error, retryable=True, retry_at=1_700_000_001.0),
        _event(run_id, 4, "NodeFailed", node_id="a", attempt=2, error=error, retryable=False),
        _event(run_id, 5, "RunFailed", error=error, node_id="a"),
    ]


def _summary(run_id: str, status: str, workflow_name: str = "demo") -> dict[str, Any]:
    done = status == "completed"
    node_status = "completed" if done else ("failed" if status == "failed" else "pending")
    return {
        "run_id": run_id,
        "workflow": workflow_name,
        "status": status,
        "base_version": V1,
        "version": V2 if done else V1,
        "nodes": {
            "a": {"status": node_status, "attempts": 1, "output": {"x": 1} if done else None, "error": None},
            "b": {"status": "completed" if done else "pending", "attempts": 1 if done else 0, "output": None},
        },
        "patches": [{"patch_id": "p1", "author": "agent:plan", "status": "applied", "reasons": []}] if done else [],
        "outputs": {"y": 2} if done else None,
        "error": {"code": "handler_error", "message": "boom"} if status == "failed" else None,
    }


def _patch(patch_id: str, status: str, **extra: Any) -> dict[str, Any]:
    return {
        "patch_id": patch_id,
        "run_id": "r1",
        "author": "alice",
        "status": status,
        "reason": "add a step",
        "ops": [{"op": "add", "path": "/nodes/-", "value": {"id": "c", "type": "function"}}],
        "reasons": [],
        "proposed_at": 1_700_000_000.0,
        "added_nodes": ["c"] if status == "applied" else [],
        "version": V2 if status == "applied" else None,
        **extra,
    }


WORKFLOW_INFO = {
    "name": "demo",
    "workspace": "default",
    "latest_version": V2,
    "tags": {"main": V1, "latest": V2},
    "versions": [V1, V2],
    "updated_at": 1_700_000_000.0,
}
STATUS = {
    "version": "0.1.0",
    "impl": "c",
    "pid": 4242,
    "uptime_s": 3725.0,
    "data_dir": "/var/lib/aobd",
    "runs_active": 3,
    "draining": False,
    "listen": "127.0.0.1:7070",
    "planes": {"control": {"workers": 2}},
}
CONFIG = {"data_dir": "/var/lib/aobd", "api": {"listen": "127.0.0.1:7070"}, "auth": {"tokens": [{"token": "***"}]}}
APPROVALS = [
    {
        "ticket": "t-1",
        "run_id": "r1",
        "node_id": "gate",
        "status": "pending",
        "assignees": ["alice", "bob"],
        "deadline": 1_700_003_600.0,
        "decided_by": None,
    }
]


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, "details": []}}, status=status)


class FakeDaemon:
    """The daemon's routes with canned bodies; records every request.

    Attributes:
        stream_plans: What each successive SSE connection does: ``("drop", n)`` closes the connection after
            ``n`` events and half of the next one, ``("lagged", n)`` sends ``lagged`` after ``n`` events,
            ``("overlap", k)`` resends the ``k`` events before the resume point, ``("json", n)`` answers with the
            first ``n`` events as a JSON list. Exhausted: serve to the end.
        finished: Run ids whose summary says the run is over; a stream that sends the terminal event adds it.
    """

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.port = 0
        self.requests: list[dict[str, Any]] = []
        self.stream_headers: list[str | None] = []
        self.stream_plans: list[tuple[str, int]] = []
        self.finished: set[str] = set()
        self.events = {"r1": _events_ok("r1"), "r2": _events_failed("r2"), "r3": _events_ok("r3")}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def reset(self) -> None:
        self.requests.clear()
        self.stream_headers.clear()
        self.stream_plans = []
        self.finished = {"r1", "r2", "r3"}

    # -- routes ---------------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        r = app.router
        r.add_post("/v1/workflows", self.workflow_put)
        r.add_get("/v1/workflows", self.workflow_list)
        r.add_get("/v1/workflows/{name}", self.workflow_show)
        r.add_post("/v1/runs", self.run_start)
        r.add_get("/v1/runs", self.run_list)
        r.add_get("/v1/runs/{id}", self.run_get)
        r.add_get("/v1/runs/{id}/events", self.run_events)
        r.add_post("/v1/runs/{id}/cancel", self.run_cancel)
        r.add_post("/v1/runs/{id}/replay", self.run_replay)
        r.add_post("/v1/runs/{id}/patches", self.patch_post)
        r.add_get("/v1/runs/{id}/patches", self.patch_list)
        r.add_get("/v1/patches/{id}", self.patch_show)
        r.add_post("/v1/patches/{id}/{action}", self.patch_decide)
        r.add_get("/v1/approvals", self.approvals)
        r.add_post("/v1/approvals/{ticket}", self.approval_decide)
        r.add_get("/v1/admin/status", self.status)
        r.add_post("/v1/admin/drain", self.drain)
        r.add_get("/v1/admin/config", self.config)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        via_tcp = isinstance(request.transport.get_extra_info("sockname") if request.transport else None, tuple)
        self.requests.append(
            {"method": request.method, "path": request.path, "query": dict(request.query), "body": body, "tcp": via_tcp}
        )
        if via_tcp and request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return _error(401, "unauthorized", "a valid Bearer token is required")
        try:
            resp: web.StreamResponse = await handler(request)
        except _NotFound as exc:
            return _error(404, "not_found", str(exc))
        except web.HTTPNotFound:
            return _error(404, "not_found", f"no route for {request.path}")
        return resp

    def _run(self, request: web.Request) -> str:
        run_id = request.match_info["id"]
        if run_id not in self.events:
            raise _NotFound(f"run {run_id} not found")
        return run_id

    async def workflow_put(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not isinstance(body.get("definition"), dict):
            return _error(400, "invalid_body", "definition must be an object")
        return web.json_response(
            {"workflow": body["definition"]["name"], "version": V2, "tag": body.get("tag")}, status=201
        )

    async def workflow_list(self, request: web.Request) -> web.Response:
        return web.json_response([WORKFLOW_INFO])

    async def workflow_show(self, request: web.Request) -> web.Response:
        if request.match_info["name"] != "demo":
            return _error(404, "not_found", f"workflow {request.match_info['name']} not found")
        return web.json_response({**WORKFLOW_INFO, "definition": workflow([fn("a"), fn("b")], [edge("a", "b")])})

    async def run_start(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("workflow") == "failing":
            return web.json_response(_summary("r2", "running", "failing"), status=201)
        if body.get("workflow") not in (None, "demo"):
            return _error(404, "not_found", f"workflow {body['workflow']} not found")
        return web.json_response(_summary("r1", "running"), status=201)

    async def run_list(self, request: web.Request) -> web.Response:
        runs = [
            {
                "run_id": "r1",
                "workflow": "demo",
                "status": "completed",
                "created_at": 1.7e9,
                "updated_at": 1.7e9,
                "last_seq": 7,
                "parent_run_id": None,
                "workspace": "default",
            },
            {
                "run_id": "r2",
                "workflow": "failing",
                "status": "failed",
                "created_at": 1.7e9,
                "updated_at": 1.7e9,
                "last_seq": 5,
                "parent_run_id": None,
                "workspace": "default",
            },
        ]
        if "status" in request.query:
            runs = [r for r in runs if r["status"] == request.query["status"]]
        return web.json_response(runs[: int(request.query.get("limit", 100))])

    async def run_get(self, request: web.Request) -> web.Response:
        run_id = self._run(request)
        if run_id not in self.finished:
            return web.json_response(_summary(run_id, "running"))
        return web.json_response(_summary(run_id, "failed" if run_id == "r2" else "completed"))

    async def run_cancel(self, request: web.Request) -> web.Response:
        return web.json_response(_summary(self._run(request), "cancelled"))

    async def run_replay(self, request: web.Request) -> web.Response:
        self._run(request)
        body = await request.json()
        if body.get("from") != "a":
            return _error(400, "unknown_node", f"node {body.get('from')} is not in the run")
        return web.json_response(_summary("r3", "running"), status=201)

    async def run_events(self, request: web.Request) -> web.StreamResponse:
        run_id = self._run(request)
        node = request.query.get("node")
        events = [e for e in self.events[run_id] if node is None or e.get("node_id") == node]
        if "text/event-stream" not in request.headers.get("Accept", ""):
            return web.json_response(events)
        last_id = request.headers.get("Last-Event-ID")
        self.stream_headers.append(last_id)
        plan = self.stream_plans.pop(0) if self.stream_plans else ("full", 0)
        start = int(last_id or 0)
        if plan[0] == "overlap":
            start -= plan[1]
        if plan[0] == "json":  # a proxy that ignored Accept
            return web.json_response([e for e in events if e["seq"] <= plan[1]])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(b": hello\nretry: 10\n\n")
        sent = 0
        for event in events:
            if event["seq"] <= start:
                continue
            message = encode_message(json.dumps(event), id=str(event["seq"]), event=event["type"])
            if plan[0] == "drop" and sent == plan[1]:
                await resp.write(message[: len(message) // 2])
                assert request.transport is not None
                request.transport.close()
                return resp
            if plan[0] == "lagged" and sent == plan[1]:
                await resp.write(encode_message("{}", event="lagged"))
                await resp.write_eof()
                return resp
            await resp.write(message)
            sent += 1
            if event["type"] in ("RunCompleted", "RunFailed", "RunCancelled"):
                self.finished.add(run_id)
        await resp.write_eof()
        return resp

    async def patch_post(self, request: web.Request) -> web.Response:
        self._run(request)
        body = await request.json()
        if not body["ops"]:
            reasons = [{"code": "empty_patch", "message": "a patch needs at least one op", "pointer": "/ops"}]
            return web.json_response(_patch("p9", "rejected", reasons=reasons), status=201)
        return web.json_response(_patch("p2", "applied", reason=body.get("reason", "")), status=201)

    async def patch_list(self, request: web.Request) -> web.Response:
        self._run(request)
        return web.json_response([_patch("p1", "applied"), _patch("p2", "pending")])

    async def patch_show(self, request: web.Request) -> web.Response:
        if request.match_info["id"] not in ("p1", "p2"):
            return _error(404, "not_found", f"patch {request.match_info['id']} not found")
        return web.json_response(_patch(request.match_info["id"], "applied"))

    async def patch_decide(self, request: web.Request) -> web.Response:
        status = {"approve": "applied", "reject": "rejected", "rollback": "rolled_back"}[request.match_info["action"]]
        return web.json_response(_patch(request.match_info["id"], status, decided_by="admin"))

    async def approvals(self, request: web.Request) -> web.Response:
        return web.json_response([a for a in APPROVALS if request.query.get("status") in (None, a["status"])])

    async def approval_decide(self, request: web.Request) -> web.Response:
        body = await request.json()
        if request.match_info["ticket"] != "t-1":
            return _error(404, "not_found", f"ticket {request.match_info['ticket']} not found")
        status = "approved" if body["decision"] == "approve" else "rejected"
        return web.json_response({**APPROVALS[0], "status": status, "decided_by": "admin"})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(STATUS)

    async def drain(self, request: web.Request) -> web.Response:
        return web.json_response({**STATUS, "draining": True})

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response(CONFIG)

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="fake-aobd", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake daemon did not start")

    def _serve(self, ready: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        runner = web.AppRunner(self.app(), access_log=None)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.UnixSite(runner, self.socket_path).start())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        self.port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    def stop(self) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class _NotFound(Exception):
    """A canned resource that does not exist: the middleware answers 404 in the daemon's error shape."""


@pytest.fixture(scope="module")
def fake_daemon() -> Iterator[FakeDaemon]:
    # Not tmp_path: AF_UNIX paths are limited to 107 bytes and pytest's can be longer.
    directory = tempfile.mkdtemp(prefix="aobctl-", dir="/tmp")
    daemon = FakeDaemon(os.path.join(directory, "aobd.sock"))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def daemon(fake_daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch) -> FakeDaemon:
    fake_daemon.reset()
    for name in ("AOBCTL_URL", "AOBCTL_TOKEN", "AOBD_DATA_DIR", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AOBD_ADMIN_SOCKET", fake_daemon.socket_path)
    return fake_daemon


def ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def ctl_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = ctl(capsys, *argv, "--json")
    assert code == 0, (out, err)
    return json.loads(out)


@pytest.fixture
def wf_file(tmp_path: Path) -> Path:
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(workflow([fn("a"), fn("b")], [edge("a", "b")], name="demo")))
    return path


# -- startup --------------------------------------------------------------------------------------------------


def test_importing_main_stays_light() -> None:
    code = (
        "import sys, aobd.ctl.main\n"
        "heavy = ('msgspec', 'aiohttp', 'orjson', 'granian', 'uvloop', 'aobd.engine', 'aobd.model', 'aobd.store')\n"
        "print(sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("workflow", "run", "logs", "approve", "approvals", "replay", "patch", "status", "drain", "config"):
        assert command in out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "aobctl" in capsys.readouterr().out


# -- workflows ------------------------------------------------------------------------------------------------


def test_workflow_validate_is_local(capsys: pytest.CaptureFixture[str], wf_file: Path, tmp_path: Path) -> None:
    assert ctl(capsys, "workflow", "validate", str(wf_file), "--socket", "/nonexistent/aobd.sock")[0] == 0
    assert ctl_json(capsys, "workflow", "validate", str(wf_file)) == {"valid": True, "problems": []}

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(workflow([fn("a"), fn("a")], [edge("a", "zz")])))
    code, out, _ = ctl(capsys, "workflow", "validate", str(bad))
    assert code == 1
    assert "problem" in out and "zz" in out
    code, out, _ = ctl(capsys, "workflow", "validate", str(bad), "--json")
    assert code == 1
    report = json.loads(out)
    assert report["valid"] is False and len(report["problems"]) >= 2
    assert all({"code", "message"} <= set(p) for p in report["problems"])

    code, _, err = ctl(capsys, "workflow", "validate", str(tmp_path / "missing.json"))
    assert code == 1 and "no such file" in err


def test_workflow_put_list_show(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str], wf_file: Path) -> None:
    ref = ctl_json(capsys, "workflow", "put", str(wf_file), "--tag", "main")
    assert ref == {"workflow": "demo", "version": V2, "tag": "main"}
    assert daemon.requests[-1]["body"]["tag"] == "main"
    assert daemon.requests[-1]["body"]["definition"]["name"] == "demo"
    code, out, _ = ctl(capsys, "workflow", "put", str(wf_file))
    assert code == 0 and "demo" in out and V2 in out
    assert "tag" not in daemon.requests[-1]["body"]

    assert ctl_json(capsys, "workflow", "list") == [WORKFLOW_INFO]
    code, out, _ = ctl(capsys, "workflow", "list")
    assert code == 0 and out.splitlines()[0].split() == ["workflow", "latest", "tags", "versions", "updated"]
    assert "demo" in out.splitlines()[1]

    info = ctl_json(capsys, "workflow", "show", "demo", "--tag", "main")
    assert info["definition"]["nodes"][0]["id"] == "a"
    assert daemon.requests[-1]["query"] == {"tag": "main"}
    code, out, _ = ctl(capsys, "workflow", "show", "demo")
    assert code == 0 and '"nodes"' in out and "workspace" in out


# -- runs -----------------------------------------------------------------------------------------------------


def test_run_start_file_or_name(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str], wf_file: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "inputs.json"
    inputs.write_text('{"ticket": 7}')
    summary = ctl_json(
        capsys,
        "run",
        "start",
        str(wf_file),
        "--inputs",
        f"@{inputs}",
        "--priority",
        "high",
        "--idempotency-key",
        "k1",
        "--patch-set",
        "p1, p2",
    )
    assert summary["run_id"] == "r1" and summary["status"] == "running"
    body = daemon.requests[-1]["body"]
    assert body["definition"]["name"] == "demo" and "workflow" not in body
    assert body == {**body, "inputs": {"ticket": 7}, "priority": "high", "idempotency_key": "k1"}
    assert body["patch_set"] == ["p1", "p2"]

    ctl_json(capsys, "run", "start", "demo", "--inputs", '{"x": 1}', "--tag", "main")
    assert daemon.requests[-1]["body"] == {"workflow": "demo", "inputs": {"x": 1}, "tag": "main"}

    code, out, _ = ctl(capsys, "run", "start", "demo")
    assert code == 0 and "run      r1" in out and "running" in out

    code, _, err = ctl(capsys, "run", "start", "demo", "--inputs", "{nope")
    assert code == 1 and "--inputs" in err
    code, _, err = ctl(capsys, "run", "start", "missing.json")
    assert code == 1 and "no such file" in err


def test_run_start_wait(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.finished.clear()
    summary = ctl_json(capsys, "run", "start", "demo", "--wait")
    assert summary["status"] == "completed" and summary["outputs"] == {"y": 2}
    assert daemon.stream_headers == [None]

    daemon.finished.clear()
    code, out, _ = ctl(capsys, "run", "start", "failing", "--wait")
    assert code == 1 and "failed" in out and "boom" in out

    daemon.finished.clear()
    code, out, _ = ctl(capsys, "run", "start", "demo", "--wait")
    assert code == 0 and "completed" in out and '{"y":2}' in out


def test_run_get_list_cancel(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    summary = ctl_json(capsys, "run", "get", "r1")
    assert summary["status"] == "completed" and set(summary) >= {"run_id", "nodes", "patches", "outputs", "error"}
    code, out, _ = ctl(capsys, "run", "get", "r1")
    assert code == 0 and "(patched)" in out and "p1" in out

    runs = ctl_json(capsys, "run", "list", "--status", "failed", "--limit", "5")
    assert [r["run_id"] for r in runs] == ["r2"]
    assert daemon.requests[-1]["query"] == {"status": "failed", "limit": "5"}
    code, out, _ = ctl(capsys, "run", "list")
    assert code == 0 and len(out.splitlines()) == 3 and "r2" in out

    assert ctl_json(capsys, "run", "cancel", "r1", "--reason", "enough")["status"] == "cancelled"
    assert daemon.requests[-1]["body"] == {"reason": "enough"}
    code, out, _ = ctl(capsys, "run", "cancel", "r1")
    assert code == 0 and "cancelled" in out


def test_run_timeline(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    events = ctl_json(capsys, "run", "timeline", "r1")
    assert isinstance(events, list) and [e["seq"] for e in events] == list(range(1, 8))
    code, out, _ = ctl(capsys, "run", "timeline", "r2")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 5
    assert "retrying" in lines[2] and "failed: boom" in lines[4]


# -- live events ----------------------------------------------------------------------------------------------


def _stream_seqs(capsys: pytest.CaptureFixture[str], *argv: str, expect: int = 0) -> list[int]:
    code, out, err = ctl(capsys, "logs", "stream", *argv, "--json")
    assert code == expect, err
    return [json.loads(line)["seq"] for line in out.splitlines()]


def test_logs_stream_follows_to_the_end(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.finished.clear()
    assert _stream_seqs(capsys, "r1") == list(range(1, 8))
    assert daemon.stream_headers == [None]
    daemon.finished.clear()
    assert _stream_seqs(capsys, "r2", expect=1) == list(range(1, 6))


def test_logs_stream_resumes_a_dropped_connection(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.finished.clear()
    # Dropped after 3 events, in the middle of the 4th; then again right away; then a sloppy resume that resends.
    daemon.stream_plans = [("drop", 3), ("drop", 0), ("overlap", 2)]
    assert _stream_seqs(capsys, "r1") == list(range(1, 8))
    assert daemon.stream_headers == [None, "3", "3"]


def test_logs_stream_takes_a_json_list_for_a_stream(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.finished.clear()
    daemon.stream_plans = [("json", 3)]
    assert _stream_seqs(capsys, "r1") == list(range(1, 8))
    # Whether the client then streams again or reads the rest as JSON depends on when the fake run ends (timing
    # under load); either way every event arrives once, in order, which is what the user relies on.
    assert daemon.stream_headers[0] is None


def test_logs_stream_reconnects_after_lagged(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.finished.clear()
    daemon.stream_plans = [("lagged", 2), ("lagged", 1)]
    assert _stream_seqs(capsys, "r1") == list(range(1, 8))
    assert daemon.stream_headers == [None, "2", "3"]


def test_logs_stream_node_filter(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    # The fake's node filter leaves out the run's own events, so the stream ends without RunCompleted: the
    # client sees the run is over and takes the end from the event list.
    assert _stream_seqs(capsys, "r1", "--node", "a") == [2, 3, 4]
    assert daemon.requests[0]["query"] == {"node": "a"}
    code, out, _ = ctl(capsys, "logs", "stream", "r2", "--node", "a")
    assert code == 1 and "retrying" in out


def test_logs_stream_human(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.finished.clear()
    daemon.stream_plans = [("drop", 4)]
    code, out, _ = ctl(capsys, "logs", "stream", "r1")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 7
    assert "run r1 of 'demo' started" in lines[0] and "✓ a" in lines[3] and "completed" in lines[6]
    assert "\x1b[" not in out


def test_follower_gives_up_when_the_daemon_goes_away(tmp_path: Path) -> None:
    target = ctl_client.Target(socket_path=str(tmp_path / "gone.sock"))
    with ctl_client.Client(target) as client:
        follower = ctl_client.EventFollower(client, "r1", max_failures=0)
        with pytest.raises(ctl_client.DaemonUnavailable, match=r"gone\.sock"):
            list(follower)


# -- approvals, replay, patches ---------------------------------------------------------------------------------


def test_approvals(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    approvals = ctl_json(capsys, "approvals", "list")
    assert [{k: a[k] for k in ("ticket", "run_id", "node_id", "status", "assignees", "deadline")} for a in approvals]
    assert approvals[0]["ticket"] == "t-1" and approvals[0]["assignees"] == ["alice", "bob"]
    assert daemon.requests[-1]["query"] == {"status": "pending"}
    ctl_json(capsys, "approvals", "list", "--status", "all")
    assert daemon.requests[-1]["query"] == {}
    code, out, _ = ctl(capsys, "approvals", "list")
    assert code == 0 and "t-1" in out and "alice, bob" in out

    info = ctl_json(capsys, "approve", "t-1", "approve", "--reason", "looks right")
    assert info["status"] == "approved"
    assert daemon.requests[-1]["body"] == {"decision": "approve", "reason": "looks right"}
    code, out, _ = ctl(capsys, "approve", "t-1", "reject", "--reason", "no")
    assert code == 0 and "rejected" in out
    code, _, err = ctl(capsys, "approve", "t-404", "approve", "--reason", "x")
    assert code == 1 and "ticket t-404 not found" in err
    with pytest.raises(SystemExit):
        main(["approve", "t-1", "approve"])  # --reason is required
    capsys.readouterr()


def test_replay(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    summary = ctl_json(capsys, "replay", "r1", "--from", "a", "--mode", "live")
    assert summary["run_id"] == "r3"
    assert daemon.requests[-1]["body"] == {"from": "a", "mode": "live"}
    daemon.finished.discard("r3")
    code, out, _ = ctl(capsys, "replay", "r1", "--from", "a", "--wait")
    assert code == 0 and "completed" in out
    replays = [r["body"] for r in daemon.requests if r["path"].endswith("/replay")]
    assert replays[-1] == {"from": "a", "mode": "freeze"}
    code, _, err = ctl(capsys, "replay", "r1", "--from", "zz")
    assert code == 1 and "unknown_node" in err


def test_patches(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert [p["patch_id"] for p in ctl_json(capsys, "patch", "list", "r1")] == ["p1", "p2"]
    code, out, _ = ctl(capsys, "patch", "list", "r1")
    assert code == 0 and "pending" in out and "applied" in out
    assert ctl_json(capsys, "patch", "show", "p1")["ops"][0]["op"] == "add"
    code, out, _ = ctl(capsys, "patch", "show", "p1")
    assert code == 0 and '"op":"add"' in out

    ops = [{"op": "add", "path": "/nodes/-", "value": {"id": "c", "type": "function"}}]
    as_object, bare = tmp_path / "patch.json", tmp_path / "ops.json"
    as_object.write_text(json.dumps({"ops": ops, "reason": "more"}))
    bare.write_text(json.dumps(ops))
    assert ctl_json(capsys, "patch", "apply", "r1", str(as_object))["status"] == "applied"
    assert daemon.requests[-1]["body"] == {"ops": ops, "reason": "more"}
    code, out, _ = ctl(capsys, "patch", "apply", "r1", str(bare), "--reason", "why")
    assert code == 0 and "added c" in out
    assert daemon.requests[-1]["body"] == {"ops": ops, "reason": "why"}

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    code, out, _ = ctl(capsys, "patch", "apply", "r1", str(empty))
    assert code == 1 and "empty_patch" in out
    not_a_patch = tmp_path / "nope.json"
    not_a_patch.write_text('{"op": "add"}')
    assert ctl(capsys, "patch", "apply", "r1", str(not_a_patch))[0] == 1

    assert ctl_json(capsys, "patch", "approve", "p2")["status"] == "applied"
    assert daemon.requests[-1]["path"] == "/v1/patches/p2/approve"
    code, out, _ = ctl(capsys, "patch", "reject", "p2", "--reason", "no")
    assert code == 0 and "rejected" in out
    assert daemon.requests[-1]["body"] == {"reason": "no"}
    assert ctl_json(capsys, "patch", "rollback", "p1")["status"] == "rolled_back"
    assert daemon.requests[-1]["path"] == "/v1/patches/p1/rollback"


# -- admin ----------------------------------------------------------------------------------------------------


def test_admin(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl_json(capsys, "status") == STATUS
    code, out, _ = ctl(capsys, "status")
    assert code == 0 and "pid 4242" in out and "1h 2m" in out and "plane control.workers" in out
    assert ctl_json(capsys, "drain")["draining"] is True
    code, out, _ = ctl(capsys, "drain")
    assert code == 0 and "draining" in out
    assert ctl_json(capsys, "config", "show") == CONFIG
    code, out, _ = ctl(capsys, "config", "show")
    assert code == 0 and "api.listen" in out and "127.0.0.1:7070" in out


def test_options_before_or_after_the_command(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert json.loads(ctl(capsys, "--json", "--socket", daemon.socket_path, "status")[1]) == STATUS
    assert json.loads(ctl(capsys, "run", "--json", "get", "r1")[1])["run_id"] == "r1"


def test_tcp_with_token(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"http://127.0.0.1:{daemon.port}"
    assert ctl_json(capsys, "status", "--url", url, "--token", TOKEN) == STATUS
    assert daemon.requests[-1]["tcp"] is True
    monkeypatch.setenv("AOBCTL_URL", url + "/")
    monkeypatch.setenv("AOBCTL_TOKEN", TOKEN)
    assert ctl_json(capsys, "run", "get", "r1")["run_id"] == "r1"
    assert daemon.requests[-1]["tcp"] is True
    # --socket beats the URL from the environment.
    assert ctl_json(capsys, "status", "--socket", daemon.socket_path) == STATUS
    assert daemon.requests[-1]["tcp"] is False
    daemon.finished.clear()
    daemon.stream_plans = [("drop", 2)]
    assert _stream_seqs(capsys, "r1") == list(range(1, 8))

    monkeypatch.delenv("AOBCTL_TOKEN")
    code, out, err = ctl(capsys, "status", "--json")
    assert code == 1 and "unauthorized" in err and "HTTP 401" in err
    assert json.loads(out)["error"]["code"] == "unauthorized"


# -- errors ---------------------------------------------------------------------------------------------------


def test_daemon_down(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AOBCTL_URL", "AOBCTL_TOKEN", "AOBD_ADMIN_SOCKET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AOBD_DATA_DIR", str(tmp_path / "data"))
    code, out, err = ctl(capsys, "status")
    expected = str(tmp_path / "data" / "aobd.sock")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and expected in err and "aobd serve" in err

    # A socket file nobody listens on (a daemon that died): refused, same exit status.
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    code, out, err = ctl(capsys, "run", "list", "--socket", str(stale), "--json")
    assert code == 2 and "refused" in err and str(stale) in err
    assert json.loads(out)["error"]["code"] == "daemon_unavailable"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = ctl(capsys, "status", "--url", f"http://127.0.0.1:{port}")
    assert code == 2 and f"http://127.0.0.1:{port}" in err and "aobd serve" in err

    code, _, err = ctl(capsys, "status", "--url", "ftp://example.com")
    assert code == 2 and "not an http" in err


def test_not_found(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = ctl(capsys, "run", "get", "nope")
    assert code == 1 and out == ""
    assert err.strip() == "aobctl: not_found: run nope not found (HTTP 404)"
    code, out, _ = ctl(capsys, "logs", "stream", "nope", "--json")
    assert code == 1 and json.loads(out)["error"] == {
        "code": "not_found",
        "message": "run nope not found",
        "details": [],
        "status": 404,
    }
    code, _, err = ctl(capsys, "workflow", "show", "other")
    assert code == 1 and "workflow other not found" in err
    code, _, err = ctl(capsys, "patch", "show", "p/../x")
    assert code == 1 and "HTTP 404" in err


# -- terminal output ------------------------------------------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_and_spinner_only_on_a_terminal(daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    out, err = _Tty(), _Tty()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["run", "list"]) == 0
    assert "\x1b[32mcompleted\x1b[0m" in out.getvalue()

    daemon.finished.clear()
    daemon.stream_plans = [("drop", 2)]
    assert main(["logs", "stream", "r1"]) == 0
    assert "⠋" in err.getvalue() and err.getvalue().endswith("\r\x1b[K")

    monkeypatch.setenv("NO_COLOR", "1")
    out.seek(0)
    out.truncate()
    assert main(["run", "get", "r1"]) == 0
    assert "\x1b[" not in out.getvalue()


# -- rendering pieces -----------------------------------------------------------------------------------------


def test_event_lines_cover_every_event_type() -> None:
    lines = EventLines(color=False)
    events = [
        _event("r", 1, "RunCreated", workflow="w", base_version=V1, parent_run_id="r0", replay_from="a"),
        _event("r", 2, "NodeScheduled", node_id="a", attempt=2),
        _event("r", 3, "NodeStarted", node_id="a", attempt=2),
        _event("r", 4, "NodeCompleted", node_id="a", output_ref=V1, output="x" * 200, inline=True, duration_ms=3.5),
        _event("r", 5, "NodeCompleted", node_id="a", output_ref=V1, reused_from="r0"),
        _event("r", 6, "NodeSkipped", node_id="b"),
        _event("r", 7, "PatchProposed", patch_id="p", author="agent:plan", ops=[{}]),
        _event("r", 8, "PatchApplied", patch_id="p", version=V2, added_nodes=["c"]),
        _event("r", 9, "PatchRejected", patch_id="p", reasons=[{"code": "cycle", "message": "a cycle"}]),
        _event("r", 10, "PatchRolledBack", patch_id="p", version=V1),
        _event("r", 11, "ApprovalRequested", node_id="g", ticket="t"),
        _event("r", 12, "ApprovalDecided", node_id="g", ticket="t", decision="approve", by="alice"),
        _event("r", 13, "TimerSet", node_id="t", fire_at=1_700_000_060.0),
        _event("r", 14, "TimerFired", node_id="t"),
        _event("r", 15, "RunCancelled", reason="enough"),
        _event("r", 16, "SomethingNew", detail=1),
    ]
    rendered = [lines(e) for e in events]
    assert "replay of r0" in rendered[0] and "(attempt 2)" in rendered[2]
    assert "…" in rendered[3] and "✓ a 3.5ms" in rendered[3] and "reused from r0" in rendered[4]
    assert "added c" in rendered[7] and "cycle: a cycle" in rendered[8] and "ticket t" in rendered[10]
    assert "cancelled: enough" in rendered[14] and 'SomethingNew {"detail":1}' in rendered[15]
    assert all("\x1b[" not in line for line in rendered)
    assert "\x1b[" in EventLines(color=True)(events[0])


def test_run_progress_and_tables() -> None:
    progress = RunProgress("r1", ["a", "b"])
    for e in _events_ok("r1")[:5]:
        progress.update(e)
    assert progress.text() == "run r1 · 1/2 nodes done · running b"
    progress.update({"type": "PatchApplied", "added_nodes": ["c"]})
    progress.update({"type": "ApprovalRequested", "node_id": "c", "ticket": "t"})
    assert "1/3" in progress.text() and "ticket t" in progress.text()
    assert table(["a", "bb"], [["\x1b[31mxyz\x1b[0m", "1"]], right=[1]).splitlines()[1] == "\x1b[31mxyz\x1b[0m   1"
    assert flatten({"a": {"b": 1, "c": [1]}, "d": "x", "e": {}}) == [
        ("a.b", "1"),
        ("a.c", "[1]"),
        ("d", "x"),
        ("e", "{}"),
    ]
    silent = Spinner(io.StringIO())
    assert not silent.enabled
    silent.start("x")
    silent.stop()
