"""Wall time of ``aobctl`` invocations, beside the interpreter's own start, measured in the same run.

Run with ``python -m perf.bench_ctl``. Each command runs ``--runs`` times (after ``--warmup`` untimed runs) as a
fresh process, as a user would run it:

* ``python -c pass``: the floor every command pays (interpreter, site, the editable-install finder);
* ``aobctl --help``: argument parsing only (goal: under 100 ms);
* ``aobctl status`` and ``aobctl status --json``: one request over the admin unix socket to a tiny stdlib HTTP
  server started here, which answers with a canned ``Status`` body (goal: under 150 ms).

Figures are the median and p90 in milliseconds; ``over floor`` is the median minus the floor's median. The
children run without ``PYTHONDONTWRITEBYTECODE``, so that they use ``.pyc`` files as an installed ``aobctl`` does
(the warm-up runs write them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

STATUS = {
    "version": "0.1.0",
    "impl": "c",
    "pid": 1,
    "uptime_s": 1.0,
    "data_dir": "./.aobd",
    "runs_active": 0,
    "draining": False,
    "listen": "127.0.0.1:7070",
    "planes": {},
}


class _StatusHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps(STATUS).encode() if self.path == "/v1/admin/status" else b'{"error":{"code":"not_found"}}'
        self.send_response(200 if self.path == "/v1/admin/status" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        return "unix"  # AF_UNIX peers have no (host, port) for the default log line

    def log_message(self, format: str, *args: object) -> None:
        pass


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _aobctl() -> list[str]:
    script = Path(sys.executable).parent / "aobctl"
    if script.exists():
        return [str(script)]
    found = shutil.which("aobctl")
    return [found] if found else [sys.executable, "-m", "aobd.ctl.main"]


def _time(argv: list[str], runs: int, warmup: int, env: dict[str, str]) -> list[float]:
    samples = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, check=False)
        elapsed = (time.perf_counter() - t0) * 1000
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.decode().strip()}")
        if i >= warmup:
            samples.append(elapsed)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    directory = tempfile.mkdtemp(prefix="aobctl-bench-", dir="/tmp")  # AF_UNIX paths are short
    sock = os.path.join(directory, "aobd.sock")
    server = _UnixServer(sock, _StatusHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AOBCTL_", "AOBD_"))}
    # An installed aobctl has its .pyc files: let the warm-up runs write them even where the environment says not to.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["AOBD_ADMIN_SOCKET"] = sock
    aobctl = _aobctl()
    cases = [
        ("python -c pass", [sys.executable, "-c", "pass"], None),
        ("aobctl --help", [*aobctl, "--help"], 100.0),
        ("aobctl status", [*aobctl, "status"], 150.0),
        ("aobctl status --json", [*aobctl, "status", "--json"], 150.0),
    ]
    try:
        results = [(name, _time(cmd, args.runs, args.warmup, env), goal) for name, cmd, goal in cases]
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(directory, ignore_errors=True)

    floor = statistics.median(results[0][1])
    print(f"{args.runs} runs each after {args.warmup} warm-up; {' '.join(aobctl)}; python {sys.version.split()[0]}")
    print(f"{'command':<22} {'median ms':>10} {'p90 ms':>8} {'over floor':>11} {'goal':>7}")
    for name, samples, goal in results:
        median = statistics.median(samples)
        p90 = statistics.quantiles(samples, n=10)[8] if len(samples) > 1 else samples[0]
        verdict = "" if goal is None else f"<{goal:.0f} {'ok' if median < goal else 'MISSED'}"
        over = "" if goal is None else f"{median - floor:+.1f}"
        print(f"{name:<22} {median:>10.1f} {p90:>8.1f} {over:>11} {verdict:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
