"""Start a real ``aobd serve`` subprocess for integration tests (``--single-process`` unless asked), and talk to it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Daemon:
    data_dir: Path
    port: int
    config: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    #: False: the multi-process daemon (supervisor, orchestrator, runners), as a plain ``aobd serve`` runs.
    single_process: bool = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def socket(self) -> Path:
        return self.data_dir / "aobd.sock"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["AOBD_DATA_DIR"] = str(self.data_dir)
        env["AOBD_API_LISTEN"] = f"127.0.0.1:{self.port}"
        env["AOBD_ADMIN_SOCKET"] = str(self.socket)
        env.pop("NOTIFY_SOCKET", None)
        if self.config is not None:
            env["AOBD_CONFIG"] = str(self.config)
        return env

    def start(self, *, extra_env: dict[str, str] | None = None) -> Daemon:
        self.log_path = self.data_dir.parent / f"daemon-{self.port}-{time.monotonic_ns()}.log"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aobd.cli.main", "serve", *(["--single-process"] if self.single_process else [])],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.env(), **(extra_env or {})},
            cwd=ROOT,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.request("GET", "/readyz").status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not become ready:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        timeout: float = 30,
    ) -> Reply:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return Reply(
                    resp.status, _decode(resp.read(), resp.headers.get("content-type", "")), dict(resp.headers)
                )
        except urllib.error.HTTPError as err:
            payload = err.read()
            err.close()
            headers = {k.lower(): v for k, v in err.headers.items()}
            return Reply(err.code, _decode(payload, err.headers.get("content-type", "")), headers)

    def wait_run(self, run_id: str, *, token: str | None = None, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self.request("GET", f"/v1/runs/{run_id}", token=token)
            assert reply.status == 200, reply.body
            if reply.body["status"] not in ("running", "waiting"):
                return dict(reply.body)
            time.sleep(0.05)
        raise AssertionError(f"run {run_id} did not finish: {reply.body}")


def _decode(payload: bytes, content_type: str) -> Any:
    if "json" in content_type:
        return json.loads(payload) if payload else None
    return payload
