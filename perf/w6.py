"""W6 (DESIGN.md section 10) through aobd: one JSON line of figures.

    python -m perf.w6 --mode inprocess --runs 2000 --concurrency 200 --json
        [--store sqlite|memory] [--fidelity full|fast]

``inprocess`` drives the engine in this process on the embedded stores (SQLite with synchronous=FULL and the
local CAS in a temporary data dir, unless ``--store memory``). Hop latency is the time from the end of one
node's handler to the start of the next one's (s1->s2, s2->s3, s3->b1, s3->b2, b1->j / b2->j, whichever
finished last), measured with perf_counter stamps taken inside the handlers. It also says where the time went:
``loop_busy`` (the event loop thread's CPU over the wall time) and, on SQLite, ``log_in_commit`` (the writer's
time inside transactions over the wall time) and ``appends_per_commit``: near 1.0 on both, the two cores are
the bound.

``http`` starts ``aobd serve --single-process`` on a temporary data dir (or uses ``--url``) and keeps
``--concurrency`` clients each starting a W6 run with ``POST /v1/runs?wait=60`` (the answer comes when the
run finished) over keep-alive HTTP/1.1; latency is start-to-completion per run. Hops come from the events of a
sample of runs (a node's start is its completion time minus its duration).

``http2`` drives the daemon (``--processes``: single, multi, or the default layout multi-accept) with h2load,
each request ``POST /v1/runs?wait=60``, ``--concurrency`` connections of 4 streams each. ``cluster`` runs N
daemons on Postgres, Kafka (Tansu), S3 and Redis (perf/cluster.py).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aobd.gctune import DEFAULT_SWITCH_INTERVAL_MS, tune_gc, tune_switch_interval
from perf import w6_handlers
from perf.peers._common import HOPS, hops_ms

ROOT = Path(__file__).resolve().parents[1]


def w6_document() -> dict[str, Any]:
    doc = json.loads((ROOT / "examples" / "w6" / "workflow.json").read_text())
    doc = copy.deepcopy(doc)
    for node in doc["nodes"]:
        node["config"]["handler"] = node["config"]["handler"].replace("w6_handlers:", "perf.w6_handlers:")
    return doc


def cpu_seconds() -> float:
    """CPU time of this process (all threads: the SQLite commits run on a worker thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc: the planes run in their own sessions, so no process group)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def process_cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU time of one process, as /proc counts them; zeros for a process that is gone."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick  # utime, stime


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of one process, as /proc counts it; 0 for a process that is gone."""
    return sum(process_cpu_split(pid))


def tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system) of a process tree, as /proc counts it."""
    return sum(process_cpu_seconds(pid) for pid in _tree(root))


def plane_of(pid: int, *, with_index: bool = False) -> str:
    """Which part of a daemon a process is: its plane's role (``python -m aobd.planes.child ROLE INDEX``, as
    "ROLE-INDEX" ``with_index``), or "supervisor" for any other process of the tree (the supervisor, or a
    single-process daemon)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    if b"aobd.planes.child" in argv:
        at = argv.index(b"aobd.planes.child")
        role = argv[at + 1].decode()
        return f"{role}-{argv[at + 2].decode()}" if with_index else role
    return "supervisor"


def tree_cpu_by_plane(root: int) -> dict[str, float]:
    """CPU time (user + system) of a process tree, summed by :func:`plane_of`."""
    split: dict[str, float] = {}
    for pid in _tree(root):
        plane = plane_of(pid)
        split[plane] = split.get(plane, 0.0) + process_cpu_seconds(pid)
    return split


def tree_peak_rss_mb(root: int) -> float:
    """The sum of every process's peak RSS (VmHWM) in a process tree."""
    total_kb = 0
    for pid in _tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total_kb += int(line.split()[1])
    return round(total_kb / 1024.0, 1)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_inprocess(
    runs: int, concurrency: int, store: str, fidelity: str, data_dir: Path, max_computing_runs: int | None = None
) -> dict[str, Any]:
    from aobd import _fast
    from aobd.engine.admission import DEFAULT_LIMIT
    from aobd.engine.driver import Engine

    if store == "memory":
        from aobd.store.memory import MemoryCas, MemoryEventLog

        log: Any = MemoryEventLog()
        cas: Any = MemoryCas()
    else:
        from aobd.store.local_cas import LocalCas
        from aobd.store.sqlite_log import SqliteEventLog

        log = SqliteEventLog(data_dir / "events.db")
        cas = LocalCas(data_dir / "cas")
    limit = DEFAULT_LIMIT if max_computing_runs is None else max_computing_runs
    engine = Engine(log, cas, fidelity=fidelity, max_computing_runs=limit)
    doc = w6_document()
    await engine.run(doc, {"x": 1})  # warm-up: imports, IR compile, first CAS writes
    w6_handlers.STAMPS.clear()
    gate = asyncio.Semaphore(concurrency)
    statuses: list[str] = []
    latencies: list[float] = []  # ms from a run's start call to its end (waiting for admission included)

    async def one() -> None:
        async with gate:
            since = time.perf_counter()
            summary = await engine.run(doc, {"x": 1})
            latencies.append((time.perf_counter() - since) * 1000.0)
            statuses.append(summary["status"] if summary["outputs"] == {"x": 20} else "wrong")

    metrics = getattr(log, "metrics", None)  # the SQLite log's group commit figures
    commits_before, commit_s_before, appends_before = (
        (metrics.commits, metrics.commit_seconds_total, metrics.appends) if metrics else (0, 0.0, 0)
    )
    cpu_before, loop_cpu_before = cpu_seconds(), time.thread_time()
    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(runs)))
    elapsed = time.perf_counter() - started
    cpu, loop_cpu = cpu_seconds() - cpu_before, time.thread_time() - loop_cpu_before
    where: dict[str, float] = {"loop_busy": round(loop_cpu / elapsed, 3)}  # the event loop's thread's CPU share
    if metrics:
        commits = metrics.commits - commits_before
        # Time inside transactions (BEGIN to COMMIT, fsync included) as a share of the run: the writer's load.
        where["log_in_commit"] = round((metrics.commit_seconds_total - commit_s_before) / elapsed, 3)
        where["appends_per_commit"] = round((metrics.appends - appends_before) / max(commits, 1), 1)
    await engine.close()
    await cas.close()
    await log.close()

    hops = hops_ms(w6_handlers.STAMPS)
    return {
        "mode": "inprocess",
        "store": store,
        "fidelity": fidelity,
        "impl": _fast.__impl__,
        "runs": runs,
        "concurrency": concurrency,
        "max_computing_runs": engine.admission.limit,
        "completed": statuses.count("completed"),
        "seconds": round(elapsed, 3),
        "workflows_per_s": round(runs / elapsed, 1),
        "node_executions_per_s": round(6 * runs / elapsed, 1),
        "run_latency_mean_ms": round(sum(latencies) / len(latencies), 3),
        "run_latency_p50_ms": round(percentile(latencies, 0.50), 3),
        "run_latency_p99_ms": round(percentile(latencies, 0.99), 3),
        "hop_p50_ms": round(percentile(hops, 0.50), 3),
        "hop_p99_ms": round(percentile(hops, 0.99), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "cpu_ms_per_1000_nodes": round(cpu * 1000.0 / (6 * runs) * 1000.0, 1),
        **where,
    }


def add_inline_argument(parser: argparse.ArgumentParser) -> None:
    """``--inline [auto|true|false]``: ``[planes] inline_sync_handlers`` of the benchmark's daemon."""
    parser.add_argument(
        "--inline",
        nargs="?",
        const="true",
        default="auto",
        choices=["auto", "true", "false"],
        help="multi and multi-accept: [planes] inline_sync_handlers. auto (the default, as the daemon's): the"
        " orchestrators run the sync W6 handlers inline while each call stays under the budget; true (--inline"
        " alone): always inline; false: always on the runner plane",
    )


async def start_bench_daemon(
    data_dir: Path,
    fidelity: str,
    processes: str,
    inline: str = "auto",
    orchestrators: int = 0,
    *,
    max_computing_runs: int | None = None,
) -> Any:
    """A fresh daemon for the HTTP benchmarks, in the process layout ``processes`` names:

    - ``single``: ``aobd serve --single-process``;
    - ``multi``: the supervisor, one orchestrator serving HTTP, runners executing the nodes (accept plane off);
    - ``multi-accept``: the default layout, accept workers on the port calling the orchestrator over zmq.

    ``inline`` is ``planes.inline_sync_handlers``: "auto" (the daemon's default: the orchestrators run the sync W6
    handlers themselves while each call stays under the budget), "true" or "false" (always on the runner plane);
    ``orchestrators`` is ``planes.orchestrators`` of ``multi-accept`` (the other layouts have one; 0 is the
    daemon's default, one per CPU); ``max_computing_runs`` is ``engine.max_computing_runs`` (None: the default).
    The benchmark measures the engine, not the limiter; its handlers are its own module.
    """
    from tests.integration.daemon import Daemon, free_port

    config = data_dir.parent / "bench.toml"
    planes = {
        "multi": "[planes]\naccept_workers = 0\n",
        "multi-accept": f"[planes]\naccept_workers = 2\norchestrators = {orchestrators}\n",
    }.get(processes, "")
    if inline != "auto":
        setting = f"inline_sync_handlers = {inline}\n"
        planes += setting if planes else f"[planes]\n{setting}"
    engine = "" if max_computing_runs is None else f"[engine]\nmax_computing_runs = {max_computing_runs}\n"
    config.write_text(
        f'[limits]\nrun_starts_per_s = 0\n[security]\nhandler_modules = ["perf.w6_handlers"]\n{engine}{planes}'
    )
    daemon = Daemon(data_dir, free_port(), config=config, single_process=processes == "single")
    await asyncio.to_thread(daemon.start, extra_env={"AOBD_FIDELITY": fidelity, "AOBD_LOG_LEVEL": "warning"})
    return daemon


async def run_http(
    runs: int,
    concurrency: int,
    url: str | None,
    data_dir: Path,
    fidelity: str,
    processes: str = "single",
    inline: str = "auto",
    orchestrators: int = 0,
    max_computing_runs: int | None = None,
) -> dict[str, Any]:
    import aiohttp

    daemon = None
    if url is None:
        daemon = await start_bench_daemon(
            data_dir, fidelity, processes, inline, orchestrators, max_computing_runs=max_computing_runs
        )
        url = daemon.url
    body = json.dumps({"definition": w6_document(), "inputs": {"x": 1}}).encode()
    latencies: list[float] = []
    statuses: list[str] = []
    run_ids: list[str] = []
    try:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, headers={"content-type": "application/json"}) as http:
            async with http.post(f"{url}/v1/runs?wait=60", data=body) as resp:  # warm-up
                await resp.read()
            queue = iter(range(runs))

            async def client() -> None:
                for _ in queue:
                    t0 = time.perf_counter()
                    async with http.post(f"{url}/v1/runs?wait=60", data=body) as resp:
                        summary = await resp.json()
                    latencies.append((time.perf_counter() - t0) * 1000.0)
                    ok = summary.get("status") == "completed" and summary.get("outputs") == {"x": 20}
                    statuses.append("completed" if ok else str(summary.get("status") or summary))
                    run_ids.append(summary.get("run_id", ""))

            root = daemon.proc.pid if daemon is not None and daemon.proc is not None else None
            cpu_before = tree_cpu_seconds(root) if root else 0.0
            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            daemon_cpu = tree_cpu_seconds(root) - cpu_before if root else None
            daemon_rss = tree_peak_rss_mb(root) if root else None
            hops = await _hops_of(http, url, [r for r in run_ids if r])
    finally:
        if daemon is not None:
            await asyncio.to_thread(daemon.stop)
    return {
        "mode": "http",
        "processes": processes,
        "inline_sync_handlers": inline,
        "fidelity": fidelity,
        "runs": runs,
        "concurrency": concurrency,
        "completed": statuses.count("completed"),
        "seconds": round(elapsed, 3),
        "workflows_per_s": round(runs / elapsed, 1),
        "node_executions_per_s": round(6 * runs / elapsed, 1),
        "run_latency_p50_ms": round(percentile(latencies, 0.5), 3),
        "run_latency_p99_ms": round(percentile(latencies, 0.99), 3),
        "hop_p50_ms": round(percentile(hops, 0.5), 3),
        "hop_p99_ms": round(percentile(hops, 0.99), 3),
        # the daemon's whole process tree (supervisor and children); None against --url
        "peak_rss_mb": daemon_rss,
        "cpu_ms_per_1000_nodes": None if daemon_cpu is None else round(daemon_cpu * 1000.0 / (6 * runs) * 1000.0, 1),
    }


async def run_h2load(
    runs: int,
    concurrency: int,
    data_dir: Path,
    fidelity: str,
    processes: str = "multi-accept",
    inline: str = "auto",
    orchestrators: int = 0,
    streams: int = 4,
    max_computing_runs: int | None = None,
) -> dict[str, Any]:
    """W6 runs started and completed over HTTP/2 (h2c, prior knowledge) by h2load, against a fresh daemon.

    Each request is ``POST /v1/runs?wait=60``, answered when the run finished; ``concurrency`` connections carry
    ``streams`` concurrent streams each. Latency percentiles come from h2load's per-request log.
    """
    import shutil

    if shutil.which("h2load") is None:
        raise SystemExit("h2load is missing: apt-get install nghttp2-client")
    daemon = await start_bench_daemon(
        data_dir, fidelity, processes, inline, orchestrators, max_computing_runs=max_computing_runs
    )
    root = daemon.proc.pid
    cpu_before = tree_cpu_by_plane(root)
    body = data_dir.parent / "w6-body.json"
    body.write_text(json.dumps({"definition": w6_document(), "inputs": {"x": 1}}))
    log_file = data_dir.parent / "h2load.log"
    try:
        proc = await asyncio.create_subprocess_exec(
            "h2load",
            "-n",
            str(runs),
            "-c",
            str(concurrency),
            "-m",
            str(streams),
            "-d",
            str(body),
            "-H",
            "content-type: application/json",
            "--log-file",
            str(log_file),
            f"{daemon.url}/v1/runs?wait=60",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out = (await proc.communicate())[0].decode()
        cpu_after = tree_cpu_by_plane(root)
        daemon_rss = tree_peak_rss_mb(root)
        hops = await _sampled_hops(daemon.url, runs)
    finally:
        await asyncio.to_thread(daemon.stop)
    rows = [line.split("\t") for line in log_file.read_text().splitlines() if line.strip()]
    ok = [r for r in rows if r[1].startswith("2")]
    per_node = 1e6 / (6 * max(1, len(ok)))  # CPU seconds -> ms per 1,000 node executions
    by_plane = {plane: (cpu_after[plane] - cpu_before.get(plane, 0.0)) * per_node for plane in sorted(cpu_after)}
    latencies = [int(r[2]) / 1000.0 for r in ok]
    seconds = _h2load_seconds(out)
    return {
        "mode": "http2",
        "client": "h2load",
        "processes": processes,
        "inline_sync_handlers": inline,
        "orchestrators": orchestrators or "auto",
        "fidelity": fidelity,
        "runs": runs,
        "concurrency": concurrency * streams,
        "max_computing_runs": "default" if max_computing_runs is None else max_computing_runs,
        "completed": len(ok),
        "seconds": round(seconds, 3),
        "workflows_per_s": round(len(ok) / seconds, 1),
        "node_executions_per_s": round(6 * len(ok) / seconds, 1),
        "run_latency_p50_ms": round(percentile(latencies, 0.5), 3),
        "run_latency_p99_ms": round(percentile(latencies, 0.99), 3),
        # from the events of 200 runs spread over the whole load (their commit times, see _event_hops)
        "hop_p50_ms": round(percentile(hops, 0.5), 3) if hops else None,
        "hop_p99_ms": round(percentile(hops, 0.99), 3) if hops else None,
        "peak_rss_mb": daemon_rss,
        "cpu_ms_per_1000_nodes": round(sum(by_plane.values()), 1),
        # Where that CPU went, by plane (a restarted child's CPU before the restart is not counted).
        "cpu_ms_per_1000_nodes_by_plane": {plane: round(ms, 1) for plane, ms in by_plane.items()},
    }


def _h2load_seconds(output: str) -> float:
    """h2load prints "finished in 884.62ms, ..." or "finished in 2.31s, ..."."""
    if "finished in " not in output:
        raise SystemExit(f"h2load failed:\n{output}")
    text = output.split("finished in ")[1].split(",")[0].strip()
    for unit, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


async def _sampled_hops(url: str, runs: int) -> list[float]:
    """Hop latencies of runs spread evenly over the daemon's last ``runs`` runs (see :func:`_hops_of`)."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/v1/runs?limit={min(runs, 10_000)}") as resp:
            run_ids = [r["run_id"] for r in await resp.json()]
        return await _hops_of(http, url, run_ids)


async def _hops_of(http: Any, url: str, run_ids: list[str], sample: int = 200) -> list[float]:
    """Hop latencies from the events of ``sample`` of ``run_ids``, spread evenly over them."""
    hops: list[float] = []
    for run_id in run_ids[:: max(1, len(run_ids) // sample)]:
        async with http.get(f"{url}/v1/runs/{run_id}/events") as resp:
            hops.extend(_event_hops(await resp.json()))
    return hops


def _event_hops(events: list[dict[str, Any]]) -> list[float]:
    done = {e["node_id"]: e for e in events if e["type"] == "NodeCompleted"}
    start = {n: e["ts"] - e.get("duration_ms", 0.0) / 1000.0 for n, e in done.items()}
    hops = [(start[b] - done[a]["ts"]) * 1000.0 for a, b in HOPS if a in done and b in start]
    if {"b1", "b2", "j"} <= done.keys():
        hops.append((start["j"] - max(done["b1"]["ts"], done["b2"]["ts"])) * 1000.0)
    return hops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.w6", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["inprocess", "http", "http2", "cluster"], default="inprocess")
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    parser.add_argument("--fidelity", choices=["full", "fast"], default="full")
    parser.add_argument("--data-dir", help="keep the stores here (default: a temporary directory)")
    parser.add_argument(
        "--default-gc",
        action="store_true",
        help="inprocess mode: keep CPython's collector thresholds instead of the ones aobd's own processes set "
        "(aobd/gctune.py)",
    )
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=DEFAULT_SWITCH_INTERVAL_MS,
        help="inprocess mode: the GIL switch interval, as aobd's processes set it (0: CPython's 5 ms)",
    )
    parser.add_argument("--url", help="http mode: an already running daemon (default: start one)")
    parser.add_argument(
        "--processes",
        choices=["single", "multi", "multi-accept"],
        default="single",
        help="http and http2 modes: start the daemon with --single-process; as the supervisor with one orchestrator "
        "serving "
        "HTTP and the runner plane (multi); or in the default layout with accept workers (multi-accept)",
    )
    add_inline_argument(parser)
    parser.add_argument(
        "--orchestrators",
        type=int,
        default=0,
        help="multi-accept: orchestrator processes ([planes] orchestrators; 0, the default: one per CPU, at most 4)",
    )
    parser.add_argument(
        "--streams", type=int, default=4, help="http2 mode: concurrent streams per connection (h2load -m)"
    )
    parser.add_argument(
        "--max-computing-runs",
        type=int,
        help="[engine] max_computing_runs of the engine or daemon measured (0: no limit; default: the daemon's)",
    )
    parser.add_argument("--daemons", type=int, default=3, help="cluster mode: how many daemons share the services")
    parser.add_argument(
        "--execution",
        choices=["bus", "local"],
        default="local",
        help="cluster mode: node attempts over node.jobs.* to any daemon's runner, or in the run's owner",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    import uvloop

    with tempfile.TemporaryDirectory(prefix="aobd-w6-") as tmp:
        data_dir = Path(args.data_dir) if args.data_dir else Path(tmp)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            if args.mode == "cluster":
                from perf.cluster import run_cluster

                result = runner.run(run_cluster(args.runs, args.concurrency, args.daemons, data_dir, args.execution))
            elif args.mode == "http2":
                result = runner.run(
                    run_h2load(
                        args.runs,
                        args.concurrency,
                        data_dir / "data",
                        args.fidelity,
                        args.processes,
                        args.inline,
                        args.orchestrators,
                        args.streams,
                        max_computing_runs=args.max_computing_runs,
                    )
                )
            elif args.mode == "http":
                result = runner.run(
                    run_http(
                        args.runs,
                        args.concurrency,
                        args.url,
                        data_dir / "data",
                        args.fidelity,
                        args.processes,
                        args.inline,
                        args.orchestrators,
                        max_computing_runs=args.max_computing_runs,
                    )
                )
            else:
                if not args.default_gc:
                    tune_gc()  # as `aobd run` and the daemon do
                tune_switch_interval(args.switch_interval_ms)
                result = runner.run(
                    run_inprocess(
                        args.runs,
                        args.concurrency,
                        args.store,
                        args.fidelity,
                        data_dir,
                        max_computing_runs=args.max_computing_runs,
                    )
                )
                result["gc"] = "default" if args.default_gc else "aobd"
                result["switch_interval_ms"] = round(sys.getswitchinterval() * 1000.0, 3)
    if not args.json:
        for key, value in result.items():
            print(f"{key:>22}  {value}", file=sys.stderr)
    print(json.dumps(result))
    return 0 if result["completed"] == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
