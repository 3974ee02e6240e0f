"""Event log throughput, Postgres beside SQLite: ``python -m perf.bench_postgres [--help]``.

As in ``perf.bench_store``: N coroutines each append to their own run in a loop for a fixed time, and group
commit lets concurrent appends share a transaction. Each repeat runs on a fresh database (a scratch Postgres
database created on ``--dsn`` and dropped after; a fresh SQLite file), and every figure is the median of the
repeats. Postgres figures depend on its fsync latency and ``synchronous_commit``, so both are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aobd.store.postgres import PostgresEventLog, migrate
from aobd.store.protocols import EventRecord, RunIndex
from aobd.store.sqlite_log import SqliteEventLog
from perf.bench_store import table

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


async def bench_appends(log: Any, *, appenders: int, duration: float, records: int) -> dict[str, float]:
    payload = b"x" * 200
    counts = [0] * appenders
    deadline = time.perf_counter() + duration

    async def appender(i: int) -> None:
        run_id, seq = f"run{i}", 0
        while time.perf_counter() < deadline:
            batch = [
                EventRecord(run_id, s, "NodeCompleted", time.time(), payload) for s in range(seq + 1, seq + 1 + records)
            ]
            await log.append(run_id, batch, index=RunIndex(workflow="bench") if seq == 0 else None)
            seq += records
            counts[i] += 1

    started = time.perf_counter()
    await asyncio.gather(*(appender(i) for i in range(appenders)))
    elapsed = time.perf_counter() - started
    m = log.metrics
    return {
        "appends/s": sum(counts) / elapsed,
        "records/s": sum(counts) * records / elapsed,
        "appends/commit": m.appends / max(m.commits, 1),
        "commit ms": 1000 * m.commit_seconds_total / max(m.commits, 1),
    }


class ScratchDatabase:
    """A migrated Postgres database made on the admin DSN, dropped (even with connections left) on exit."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.name = f"aobd_bench_{secrets.token_hex(6)}"
        self.dsn = admin_dsn.rsplit("/", 1)[0] + "/" + self.name

    async def __aenter__(self) -> str:
        await self._admin(f'CREATE DATABASE "{self.name}"')
        await migrate(self.dsn)
        return self.dsn

    async def __aexit__(self, *exc_info: object) -> None:
        await self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    async def _admin(self, statement: str) -> None:
        import psycopg

        async with await psycopg.AsyncConnection.connect(self.admin_dsn, autocommit=True) as conn:
            await conn.execute(statement)


async def bench_postgres(admin_dsn: str, outbox: bool, **kwargs: Any) -> dict[str, float]:
    async with ScratchDatabase(admin_dsn) as dsn, PostgresEventLog(dsn, outbox=outbox) as log:
        return await bench_appends(log, **kwargs)


async def bench_sqlite(data_dir: Path, **kwargs: Any) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(dir=data_dir))
    try:
        async with SqliteEventLog(work / "events.db") as log:
            return await bench_appends(log, **kwargs)
    finally:
        shutil.rmtree(work)


async def postgres_settings(admin_dsn: str) -> str:
    import psycopg

    async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT current_setting('server_version'), current_setting('synchronous_commit'),"
            " current_setting('fsync'), current_setting('wal_sync_method')"
        )
        row = await cur.fetchone()
    assert row is not None
    return f"Postgres {row[0]}: synchronous_commit={row[1]}, fsync={row[2]}, wal_sync_method={row[3]}"


def median_of(repeats: int, make: Callable[[], Any], run: Callable[..., Any]) -> dict[str, float]:
    results = [run(make()) for _ in range(repeats)]
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m perf.bench_postgres", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dsn", default=DEFAULT_DSN, help=f"admin DSN to create scratch databases (default {DEFAULT_DSN})"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where SQLite files go (default: system temp)")
    parser.add_argument("--duration", type=float, default=1.5, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--appenders", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--records", type=int, default=2, help="records (200 B each) per append")
    parser.add_argument("--outbox", action="store_true", help="Postgres also writes the transactional outbox")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio's loop")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop

        run: Callable[..., Any] = uvloop.run
    else:
        run = asyncio.run
    data_dir = Path(tempfile.mkdtemp(prefix="aobd-bench-", dir=args.dir))
    try:
        print(run(postgres_settings(args.dsn)))
        print(f"SQLite in {data_dir}; medians of {args.repeats}; loop: {'uvloop' if args.uvloop else 'asyncio'}\n")
        rows = []
        for n in args.appenders:
            work = {"appenders": n, "duration": args.duration, "records": args.records}
            label = f"{n} appender{'s' if n > 1 else ''}"
            rows.append((f"sqlite, {label}", median_of(args.repeats, lambda w=work: bench_sqlite(data_dir, **w), run)))
            rows.append(
                (
                    f"postgres{' +outbox' if args.outbox else ''}, {label}",
                    median_of(args.repeats, lambda w=work: bench_postgres(args.dsn, args.outbox, **w), run),
                )
            )
        print(table(f"event log ({args.records} rec/append)", rows))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
