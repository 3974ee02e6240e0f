"""W6 on the cluster configuration: N daemons sharing Postgres, a Kafka-protocol broker (Tansu, started here),
S3 (moto's server) and Redis; used by ``python -m perf.w6 --mode cluster --daemons N``.

Clients keep ``concurrency`` W6 runs in flight, spread round-robin over the daemons, each started with
``POST /v1/runs?wait=60``; a daemon that does not own a run answers once the run's status in the shared log is
final, so latency includes that polling (50 ms steps). Hops come from the events of a sample of runs. ``outbox``
tells how the daemons' relays kept up: how long after the last run the outbox was drained, each daemon's count of
relayed rows, and the lag from an event's commit to its publication on the events topic (p50/p99).
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any


async def run_cluster(
    runs: int, concurrency: int, daemons: int, base: Path, execution: str = "local"
) -> dict[str, Any]:
    import aiohttp

    from perf.w6 import _event_hops, percentile, w6_document
    from tests.cluster_services import AWS_ENV, cluster_config, shared_services
    from tests.integration.daemon import Daemon, free_port

    env_extra = {**AWS_ENV, "AOBD_LOG_LEVEL": "warning"}
    with ExitStack() as stack:
        # The broker keeps its log in memory: a benchmark never restarts it, and its S3 storage would be served by
        # the test S3 server in this very process, three requests per produce, which the measurement then waits on.
        env = stack.enter_context(shared_services(kafka=True, broker_storage="memory"))
        nodes = [
            Daemon(
                base / f"d{i}",
                free_port(),
                config=cluster_config(env, base / f"d{i}.toml", daemon_id=f"d{i}", execution=execution),
            )
            for i in range(daemons)
        ]
        for node in nodes:
            await asyncio.to_thread(node.start, extra_env=env_extra)
            stack.callback(node.stop)
        await asyncio.sleep(3)  # let the group's rebalances settle before measuring
        body = json.dumps({"definition": w6_document(), "inputs": {"x": 1}}).encode()
        latencies: list[float] = []
        run_ids: list[str] = []
        done: list[bool] = []
        # A connection per client: aiohttp's default pool of 100 left the clients beyond 100 waiting for a
        # connection the whole measurement (their first run "took" its whole length), so C = 200 measured 100.
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, headers={"content-type": "application/json"}) as http:
            queue = iter(range(runs))

            async def client(k: int) -> None:
                for i in queue:
                    url = nodes[(i + k) % len(nodes)].url
                    t0 = time.perf_counter()
                    async with http.post(f"{url}/v1/runs?wait=60", data=body) as resp:
                        summary = await resp.json()
                    latencies.append((time.perf_counter() - t0) * 1000.0)
                    run_ids.append(summary.get("run_id", ""))
                    done.append(summary.get("status") == "completed")

            started = time.perf_counter()
            await asyncio.gather(*(client(k) for k in range(concurrency)))
            elapsed = time.perf_counter() - started
            relay = await asyncio.to_thread(outbox_relay, env["dsn"], [r for r in run_ids if r])
            relay["relayed_by_daemon"] = [
                (await asyncio.to_thread(node.request, "GET", "/v1/admin/status")).body["planes"]["cluster"][
                    "outbox_relayed"
                ]
                for node in nodes
            ]
            hops: list[float] = []
            for run_id in [r for r in run_ids if r][:: max(1, len(run_ids) // 200)]:
                async with http.get(f"{nodes[0].url}/v1/runs/{run_id}/events") as resp:
                    hops.extend(_event_hops(await resp.json()))
    return {
        "mode": "cluster",
        "execution": execution,
        "daemons": daemons,
        "runs": runs,
        "concurrency": concurrency,
        "completed": sum(done),
        "seconds": round(elapsed, 3),
        "workflows_per_s": round(runs / elapsed, 1),
        "node_executions_per_s": round(6 * runs / elapsed, 1),
        "run_latency_p50_ms": round(percentile(latencies, 0.5), 3),
        "run_latency_p99_ms": round(percentile(latencies, 0.99), 3),
        "hop_p50_ms": round(percentile(hops, 0.5), 3),
        "hop_p99_ms": round(percentile(hops, 0.99), 3),
        "peak_rss_mb": None,
        "outbox": relay,
    }


def outbox_relay(dsn: str, run_ids: list[str], timeout: float = 60.0) -> dict[str, Any]:
    """How the daemons' relays kept up: seconds after the last run until the outbox was drained, and how long the
    runs' events waited between their commit (the event's ``ts``) and their publication, p50 and p99 in ms."""
    import psycopg

    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() - started < timeout:
            left = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
            if left is not None and left[0] == 0:
                break
            time.sleep(0.05)
        drained = round(time.monotonic() - started, 3)
        row = conn.execute(
            "SELECT count(*),"
            " percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM published_at) - ts),"
            " percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM published_at) - ts)"
            " FROM outbox WHERE run_id = ANY(%s) AND published_at IS NOT NULL",
            (run_ids,),
        ).fetchone()
    events, p50, p99 = row if row is not None else (0, None, None)
    return {
        "events": events,
        "drained_after_s": drained,
        "lag_p50_ms": None if p50 is None else round(p50 * 1000, 1),
        "lag_p99_ms": None if p99 is None else round(p99 * 1000, 1),
    }
