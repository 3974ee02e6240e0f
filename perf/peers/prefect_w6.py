"""W6 on Prefect 3, durable: a flow of six tasks on Prefect's ephemeral API server (SQLite), results persisted.

Runs inside .peers/prefect (``python -m perf.peers.prefect_w6 --runs N --concurrency C --json``).

``w6`` is a sync ``@flow``; s1, s2, s3, b1, b2 and j are ``@task``s. s1..s3 are called in turn, b1 and b2 are
``.submit()``ted to the flow's default ``ThreadPoolTaskRunner`` and j is called with both futures (Prefect
waits for them and records the dependency). Flow and tasks have ``persist_result=True``: each return value
is written to local result storage under a temporary ``PREFECT_HOME``, and every flow/task run and state
transition goes to the API. The API is Prefect's ephemeral server (``PREFECT_SERVER_ALLOW_EPHEMERAL_MODE``,
started by the client as a subprocess) on a SQLite database in the same temporary directory (Prefect's own
pragmas: journal_mode=WAL, synchronous=NORMAL). Logging level WARNING (fewer log records sent to the API).

Concurrency: up to C flow runs at once, each called in a thread of a ``ThreadPoolExecutor(max_workers=C)``;
within a run b1 and b2 run in the task runner's threads.
"""

from __future__ import annotations

import contextvars
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from perf.peers import _common

STAMPS = _common.Stamps()


def configure(home: Path) -> None:
    """Prefect reads its settings from the environment at import: set them first."""
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
            "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }
    )


def define() -> Any:
    from prefect import flow, task
    from prefect.context import TaskRunContext

    def run() -> str:
        ctx = TaskRunContext.get()
        return str(ctx.task_run.flow_run_id) if ctx else "?"

    @task(name="s1", persist_result=True)
    def s1(x: int) -> int:
        t0 = time.perf_counter()
        out = x + 1
        STAMPS.put(run(), "s1", t0)
        return out

    @task(name="s2", persist_result=True)
    def s2(x: int) -> int:
        t0 = time.perf_counter()
        out = x + 1
        STAMPS.put(run(), "s2", t0)
        return out

    @task(name="s3", persist_result=True)
    def s3(x: int) -> int:
        t0 = time.perf_counter()
        out = x + 1
        STAMPS.put(run(), "s3", t0)
        return out

    @task(name="b1", persist_result=True)
    def b1(x: int) -> int:
        t0 = time.perf_counter()
        out = x * 2
        STAMPS.put(run(), "b1", t0)
        return out

    @task(name="b2", persist_result=True)
    def b2(x: int) -> int:
        t0 = time.perf_counter()
        out = x * 3
        STAMPS.put(run(), "b2", t0)
        return out

    @task(name="j", persist_result=True)
    def j(a: int, b: int) -> int:
        t0 = time.perf_counter()
        out = a + b
        STAMPS.put(run(), "j", t0)
        return out

    @flow(name="w6", persist_result=True)
    def w6(x: int) -> int:
        x = s1(x)
        x = s2(x)
        x = s3(x)
        fa = b1.submit(x)
        fb = b2.submit(x)
        return j(fa, fb)

    return w6, (s1, s2, s3, b1, b2, j)


def handler_bodies(tasks: Any) -> list[Any]:
    """The task bodies without Prefect around them (``Task.fn``; stamps included), for the handler's own cost."""
    s1, s2, s3, b1, b2, j = tasks
    return [
        lambda: s1.fn(1),
        lambda: s2.fn(2),
        lambda: s3.fn(3),
        lambda: b1.fn(4),
        lambda: b2.fn(4),
        lambda: j.fn(8, 12),
    ]


def bench(args: Any) -> dict[str, Any]:
    from contextlib import nullcontext
    from importlib.metadata import version

    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    sampler = _common.RssSampler().start()
    w6, tasks = define()
    # Flow-run heartbeats (crash detection) are on by default; a sync flow run's end joins the heartbeat thread,
    # which sleeps in 1 s steps. --no-heartbeat measures without them (a variant, not the default row).
    settings = (
        temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}) if args.no_heartbeat else nullcontext()
    )
    with settings:
        return _measure(args, w6, tasks, sampler, version("prefect"))


def _safe(call: Any, *args: Any) -> bool:
    """True when the flow run returned 20; a failed run (e.g. the API's 503 after its retries) counts as not done."""
    try:
        return bool(call(*args) == 20)
    except Exception as exc:
        print(f"[prefect] run failed: {exc!r}", file=sys.stderr)
        return False


def _measure(args: Any, w6: Any, tasks: Any, sampler: _common.RssSampler, prefect_version: str) -> dict[str, Any]:
    assert w6(1) == 20  # warm-up (starts the ephemeral server)
    phases = _common.measure_c1(lambda: _safe(w6, 1), args.c1_runs, STAMPS)
    # Prefect's sync flows run in threads, one per run in flight (its own concurrency model).
    with ThreadPoolExecutor(max_workers=args.concurrency, thread_name_prefix="w6-flow") as pool:
        t0 = time.perf_counter()
        futures = [pool.submit(contextvars.copy_context().run, w6, 1) for _ in range(args.runs)]
        phases.ok = [_safe(f.result) for f in futures]
        phases.seconds = time.perf_counter() - t0
    phases.hops = STAMPS.hops_ms()
    peak = sampler.stop()
    STAMPS.enabled = False
    return _common.result(
        peer="prefect-no-heartbeat" if args.no_heartbeat else "prefect",
        version=f"prefect {prefect_version}",
        args=args,
        phases=phases,
        handler_us=_common.handler_cost_us(handler_bodies(tasks)),
        peak_rss_mb=peak,
        config={
            "api": "ephemeral server (subprocess), SQLite: journal_mode=WAL, synchronous=NORMAL (Prefect's pragmas)",
            "results": "persist_result=True on flow and tasks, local file storage",
            "task_runner": "ThreadPoolTaskRunner (default); b1/b2 via .submit(), j gets both futures",
            "concurrency_model": "C threads, each calling the sync flow",
            "logging_level": "WARNING",
            "flow_run_heartbeats": "off" if args.no_heartbeat else "on (default, every 180 s)",
        },
    )


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("python -m perf.peers.prefect_w6", __doc__)
    p.add_argument("--no-heartbeat", action="store_true", help="variant: flow-run heartbeats off")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="peer-prefect-") as tmp:
        configure(Path(tmp))
        res = bench(args)
    return _common.emit(res, args.json)


if __name__ == "__main__":
    sys.exit(main())
