"""Throughput of the embedded stores: ``python -m perf.bench_store [--help]``.

SqliteEventLog: N coroutines each append to their own run in a loop for a fixed time (group commit lets many
appends share one fsync, so appends/s should grow with N). With ``--appends-per-run K`` each coroutine moves to a
new run after K appends, as the engine's steps do (W6: seven appends of about three records per run), so the
run index keeps growing instead of holding N runs. LocalCas: small blobs stored one ``put`` at a time,
as concurrent ``put`` calls, and by ``put_many``. Every figure is the median of a few repeats on fresh files.
Results depend on the disk's fsync latency, so the data directory is printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aobd.store.local_cas import LocalCas
from aobd.store.protocols import EventRecord, RunIndex
from aobd.store.sqlite_log import SqliteEventLog


async def bench_log(
    work: Path, *, appenders: int, duration: float, records: int, appends_per_run: int = 0
) -> dict[str, float]:
    payload, per_append = b"x" * 200, records
    async with SqliteEventLog(work / "events.db") as log:
        counts = [0] * appenders
        deadline = time.perf_counter() + duration

        async def appender(i: int) -> None:
            run_id, seq, runs = f"run{i}", 0, 0
            while time.perf_counter() < deadline:
                if appends_per_run and seq == appends_per_run * per_append:
                    runs += 1
                    run_id, seq = f"run{i}.{runs}", 0
                batch = [
                    EventRecord(run_id, s, "NodeCompleted", time.time(), payload)
                    for s in range(seq + 1, seq + 1 + per_append)
                ]
                await log.append(run_id, batch, index=RunIndex(workflow="bench") if seq == 0 else None)
                seq += per_append
                counts[i] += 1

        started = time.perf_counter()
        await asyncio.gather(*(appender(i) for i in range(appenders)))
        elapsed = time.perf_counter() - started
        m = log.metrics
        return {
            "appends/s": sum(counts) / elapsed,
            "records/s": sum(counts) * per_append / elapsed,
            "appends/commit": m.appends / max(m.commits, 1),
            "commit ms": 1000 * m.commit_seconds_total / max(m.commits, 1),
        }


async def bench_cas(root: Path, *, mode: str, count: int) -> dict[str, float]:
    blobs = [os.urandom(200) for _ in range(count)]
    async with LocalCas(root) as cas:
        started = time.perf_counter()
        if mode == "put":
            for blob in blobs:
                await cas.put(blob)
        elif mode == "put x16":
            sem = asyncio.Semaphore(16)

            async def put(blob: bytes) -> None:
                async with sem:
                    await cas.put(blob)

            await asyncio.gather(*(put(blob) for blob in blobs))
        else:
            await cas.put_many(blobs)
        elapsed = time.perf_counter() - started
        # A known blob costs a hash and a set lookup: what a repeated node output pays.
        started = time.perf_counter()
        for blob in blobs:
            await cas.put(blob)
        known = time.perf_counter() - started
    return {"blobs/s": count / elapsed, "known put/s": count / known}


def median_of(
    repeats: int,
    data_dir: Path,
    make: Callable[[Path], Coroutine[Any, Any, dict[str, float]]],
    run: Callable[..., Any],
) -> dict[str, float]:
    results = []
    for _ in range(repeats):
        work = Path(tempfile.mkdtemp(dir=data_dir))
        try:
            results.append(run(make(work)))
        finally:
            shutil.rmtree(work)
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def table(title: str, rows: list[tuple[str, dict[str, float]]]) -> str:
    columns = list(rows[0][1])
    first = max(len(title), *(len(name) for name, _ in rows))
    width = max(12, *(len(c) for c in columns))
    lines = [f"{title:<{first}}" + "".join(f"{c:>{width + 2}}" for c in columns)]
    for name, values in rows:
        lines.append(f"{name:<{first}}" + "".join(f"{values[c]:>{width + 2},.1f}" for c in columns))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m perf.bench_store", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to create the data (default: system temp)")
    parser.add_argument("--duration", type=float, default=1.5, help="seconds per event log measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--appenders", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--records", type=int, default=2, help="records (200 B each) per append")
    parser.add_argument(
        "--appends-per-run", type=int, default=0, help="start a new run after this many appends (0: one run each)"
    )
    parser.add_argument("--blobs", type=int, default=1000, help="200 B blobs per CAS measurement")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio's loop")
    args = parser.parse_args(argv)
    data_dir = Path(tempfile.mkdtemp(prefix="aobd-bench-", dir=args.dir))
    if args.uvloop:
        import uvloop

        run: Callable[..., Any] = uvloop.run
    else:
        run = asyncio.run
    try:
        print(f"data in {data_dir}; medians of {args.repeats}; loop: {'uvloop' if args.uvloop else 'asyncio'}\n")
        log_rows = [
            (
                f"{n} appender{'s' if n > 1 else ''}",
                median_of(
                    args.repeats,
                    data_dir,
                    functools.partial(
                        bench_log,
                        appenders=n,
                        duration=args.duration,
                        records=args.records,
                        appends_per_run=args.appends_per_run,
                    ),
                    run,
                ),
            )
            for n in args.appenders
        ]
        print(table(f"SqliteEventLog ({args.records} rec/append)", log_rows))
        print()
        cas_rows = [
            (
                mode,
                median_of(args.repeats, data_dir, functools.partial(bench_cas, mode=mode, count=args.blobs), run),
            )
            for mode in ("put", "put x16", "put_many")
        ]
        print(table(f"LocalCas ({args.blobs} x 200 B)", cas_rows))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
