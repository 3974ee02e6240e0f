"""Many clients waiting at once: N simultaneous ``POST /v1/runs?wait=60`` of a run that sleeps, on a fresh daemon.

    python -m perf.longpoll [--requests 300] [--sleep-ms 2000] [--processes single|multi] [--json]

Every request holds its connection until its run finishes, as long-polls and SSE subscribers do. With enough room
in the daemon every request takes about ``--sleep-ms``; a request the server cannot take waits in the listen
backlog, or, once the backlog is full, in the client kernel's SYN retransmits (1, 3, 7, 15, 31 s), and the latency
distribution shows it. On the multi-process daemon the runner plane's credit (``[planes] runner_credit``, 256 per
runner) bounds the sleeps running at once, and the run-start rate limit (``[limits] run_starts_burst``, 400) the
starts: keep ``--requests`` under the burst to measure the API alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any


async def measure(requests: int, sleep_ms: int, single_process: bool, base: Path) -> dict[str, Any]:
    import aiohttp

    from perf.w6 import percentile
    from tests.integration.daemon import Daemon, free_port

    daemon = Daemon(base / "data", free_port(), single_process=single_process)
    await asyncio.to_thread(daemon.start)
    try:
        document = {
            "name": "sleeper",
            "nodes": [{"id": "s", "type": "function", "config": {"handler": "builtin:sleep", "ms": sleep_ms}}],
        }
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

            async def one() -> tuple[float, int]:
                started = time.perf_counter()
                async with http.post(f"{daemon.url}/v1/runs?wait=60", json={"definition": document}) as resp:
                    await resp.read()
                return time.perf_counter() - started, resp.status

            results = await asyncio.gather(*(one() for _ in range(requests)))
    finally:
        daemon.stop()
    seconds = sorted(s for s, _ in results)
    return {
        "processes": "single" if single_process else "multi",
        "requests": requests,
        "sleep_ms": sleep_ms,
        "statuses": {str(code): sum(1 for _, c in results if c == code) for code in sorted({c for _, c in results})},
        "latency_p50_s": round(percentile(seconds, 0.5), 3),
        "latency_p99_s": round(percentile(seconds, 0.99), 3),
        "latency_max_s": round(seconds[-1], 3),
        "over_sleep_plus_1s": sum(1 for s in seconds if s > sleep_ms / 1000.0 + 1.0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.longpoll", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--sleep-ms", type=int, default=2000)
    parser.add_argument("--processes", choices=["single", "multi"], default="single")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="aobd-longpoll-") as tmp:
        result = asyncio.run(measure(args.requests, args.sleep_ms, args.processes == "single", Path(tmp)))
    if not args.json:
        print(
            f"{args.requests} long-polls of a {args.sleep_ms} ms run ({result['processes']}): "
            f"p50 {result['latency_p50_s']} s, p99 {result['latency_p99_s']} s, max {result['latency_max_s']} s"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
