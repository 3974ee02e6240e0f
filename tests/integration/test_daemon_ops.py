"""Operating the daemon: sd_notify, SIGHUP reload, TLS with ALPN, rate limits, WebSocket."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.daemon import ROOT, Daemon, free_port

pytestmark = pytest.mark.integration


def test_sd_notify_ready_and_stopping(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(20)
    try:
        d = Daemon(tmp_path / "data", free_port()).start(extra_env={"NOTIFY_SOCKET": str(path)})
        messages = [listener.recv(4096).decode()]
        assert d.stop() == 0
        while not any("STOPPING=1" in m for m in messages):
            messages.append(listener.recv(4096).decode())
    finally:
        listener.close()
    assert "READY=1" in messages[0] and "STATUS=" in messages[0]


def test_sighup_reloads_tokens(tmp_path: Path) -> None:
    config = tmp_path / "aobd.toml"
    config.write_text('[[auth.tokens]]\ntoken = "old-token"\nworkspace = "w"\nrole = "read"\n')
    d = Daemon(tmp_path / "data", free_port(), config=config).start()
    try:
        assert d.request("GET", "/v1/runs", token="new-token").status == 401
        config.write_text('[[auth.tokens]]\ntoken = "new-token"\nworkspace = "w"\nrole = "read"\n')
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if d.request("GET", "/v1/runs", token="new-token").status == 200:
                break
            time.sleep(0.05)
        assert d.request("GET", "/v1/runs", token="new-token").status == 200
        assert d.request("GET", "/v1/runs", token="old-token").status == 401
    finally:
        assert d.stop() == 0
    assert "configuration reloaded" in d.output()


def test_run_starts_are_rate_limited_per_workspace_with_retry_after(tmp_path: Path) -> None:
    config = tmp_path / "aobd.toml"
    config.write_text("[limits]\nrun_starts_per_s = 0.5\nrun_starts_burst = 2\n")
    d = Daemon(tmp_path / "data", free_port(), config=config).start()
    doc = {"name": "tiny", "nodes": [{"id": "a", "type": "function", "config": {"handler": "builtin:noop"}}]}
    try:
        statuses = [d.request("POST", "/v1/runs", {"definition": doc}) for _ in range(3)]
    finally:
        d.stop()
    assert [r.status for r in statuses] == [201, 201, 429]
    assert int(statuses[2].headers["retry-after"]) >= 1
    assert statuses[2].body["error"]["code"] == "rate_limited"


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("curl") is None, reason="needs openssl and curl")
def test_tls_with_alpn_negotiates_http2(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    config = tmp_path / "aobd.toml"
    config.write_text(f'[api]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    d = Daemon(tmp_path / "data", free_port(), config=config)
    # Daemon.start() polls plain HTTP; with TLS the readiness probe is curl itself.
    proc = subprocess.Popen(
        [sys.executable, "-m", "aobd.cli.main", "serve", "--single-process"],
        env=d.env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            out = subprocess.run(
                [
                    "curl",
                    "-sk",
                    "--http2",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_version} %{http_code}",
                    f"{d.url.replace('http:', 'https:')}/healthz",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if out.stdout.strip().endswith("200"):
                break
            time.sleep(0.05)
        assert out.stdout.strip() == "2 200"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_websocket_streams_a_run(tmp_path: Path) -> None:
    import asyncio

    import aiohttp

    d = Daemon(tmp_path / "data", free_port()).start()
    doc = {"name": "ws", "nodes": [{"id": "a", "type": "function", "config": {"handler": "builtin:sleep", "ms": 100}}]}
    run_id = d.request("POST", "/v1/runs", {"definition": doc}).body["run_id"]

    async def read() -> list[dict[str, object]]:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"ws://127.0.0.1:{d.port}/v1/runs/{run_id}/ws") as ws,
        ):
            return [json.loads(msg.data) async for msg in ws if msg.type == aiohttp.WSMsgType.TEXT]

    try:
        messages = asyncio.run(read())
    finally:
        d.stop()
    events = [m for m in messages if m.get("type") != "heartbeat"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "RunCompleted"


def test_two_daemons_share_one_rate_limit_through_redis(tmp_path: Path) -> None:
    import uuid

    from tests.services import redis_url

    url = redis_url()
    workspace = f"ws-{uuid.uuid4().hex[:8]}"  # a fresh bucket: runs of this test never share one
    config = tmp_path / "aobd.toml"
    config.write_text(
        f'[redis]\nurl = "{url}"\n[limits]\nrun_starts_per_s = 0.01\nrun_starts_burst = 2\n'
        f'[[auth.tokens]]\ntoken = "t"\nworkspace = "{workspace}"\nrole = "write"\n'
    )
    doc = {"name": "tiny", "nodes": [{"id": "a", "type": "function", "config": {"handler": "builtin:noop"}}]}
    first = Daemon(tmp_path / "a", free_port(), config=config).start()
    second = Daemon(tmp_path / "b", free_port(), config=config).start()
    try:
        statuses = [
            first.request("POST", "/v1/runs", {"definition": doc}, token="t").status,
            second.request("POST", "/v1/runs", {"definition": doc}, token="t").status,
            first.request("POST", "/v1/runs", {"definition": doc}, token="t").status,
            second.request("POST", "/v1/runs", {"definition": doc}, token="t").status,
        ]
    finally:
        first.stop()
        second.stop()
    assert statuses == [201, 201, 429, 429]
