"""W6 on DBOS Transact, durable: one async workflow of six steps, checkpointed in the system database.

Runs inside .peers/dbos (``python -m perf.peers.dbos_w6 --backend postgres|sqlite --runs N --concurrency C``).

``w6`` is a ``@DBOS.workflow()``; s1, s2, s3, b1, b2 and j are ``@DBOS.step()`` coroutines, b1 and b2 awaited
together with ``asyncio.gather`` (DBOS supports concurrent async steps inside a workflow, each with its own
deterministic step id). Every workflow start and every step output is recorded in the system database before
the workflow goes on, which is DBOS's only mode (no durability knob). Backends:

* ``postgres`` (default): a database of its own, ``dbos_w6_<pid>``, created on 127.0.0.1:5432 (user postgres,
  trust) and dropped at the end; Postgres's own settings as found (``synchronous_commit`` is reported).
* ``sqlite``: DBOS's SQLite system database in a temporary directory (SQLite defaults: rollback journal,
  synchronous=FULL).

Concurrency: up to C workflows in flight, each called directly (``await w6(1)``) from coroutines on one asyncio
loop; DBOS runs its database calls in threads. Pool sizes and executor threads are DBOS's defaults.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from dbos import DBOS

from perf.peers import _common

STAMPS = _common.Stamps()
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _run() -> str:
    return str(DBOS.workflow_id)


@DBOS.step()
async def s1(x: int) -> int:
    t0 = time.perf_counter()
    out = x + 1
    STAMPS.put(_run(), "s1", t0)
    return out


@DBOS.step()
async def s2(x: int) -> int:
    t0 = time.perf_counter()
    out = x + 1
    STAMPS.put(_run(), "s2", t0)
    return out


@DBOS.step()
async def s3(x: int) -> int:
    t0 = time.perf_counter()
    out = x + 1
    STAMPS.put(_run(), "s3", t0)
    return out


@DBOS.step()
async def b1(x: int) -> int:
    t0 = time.perf_counter()
    out = x * 2
    STAMPS.put(_run(), "b1", t0)
    return out


@DBOS.step()
async def b2(x: int) -> int:
    t0 = time.perf_counter()
    out = x * 3
    STAMPS.put(_run(), "b2", t0)
    return out


@DBOS.step()
async def j(a: int, b: int) -> int:
    t0 = time.perf_counter()
    out = a + b
    STAMPS.put(_run(), "j", t0)
    return out


@DBOS.workflow()
async def w6(x: int) -> int:
    x = await s1(x)
    x = await s2(x)
    x = await s3(x)
    a, b = await asyncio.gather(b1(x), b2(x))
    return await j(a, b)


def handler_bodies() -> list[Any]:
    """The step bodies without DBOS around them (stamps included), for the handler's own cost."""

    def body(node: str, fn: Any) -> Any:
        def call() -> Any:
            t0 = time.perf_counter()
            out = fn()
            STAMPS.put("bench", node, t0)
            return out

        return call

    x, a, b = 3, 8, 12
    return [
        body("s1", lambda: x + 1),
        body("s2", lambda: x + 1),
        body("s3", lambda: x + 1),
        body("b1", lambda: x * 2),
        body("b2", lambda: x * 3),
        body("j", lambda: a + b),
    ]


def _pg(sql: str) -> list[Any]:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


async def bench(args: Any, url: str) -> dict[str, Any]:
    sampler = _common.RssSampler().start()
    DBOS(config={"name": "aobd-w6-peer", "system_database_url": url, "log_level": "WARNING"})
    DBOS.launch()
    try:

        async def one() -> bool:
            return await w6(1) == 20

        phases = await _common.measure_async(one, args, STAMPS)
    finally:
        DBOS.destroy()
    peak = sampler.stop()
    STAMPS.enabled = False
    config: dict[str, Any] = {
        "backend": args.backend,
        "durability": "every workflow start and step output checkpointed before proceeding (DBOS's only mode)",
        "concurrency_model": "asyncio: C async workflows on one loop (direct calls), b1/b2 via asyncio.gather",
    }
    if args.backend == "postgres":
        config["postgres"] = {
            "server": _pg("show server_version")[0][0],
            "synchronous_commit": _pg("show synchronous_commit")[0][0],
            "fsync": _pg("show fsync")[0][0],
        }
    else:
        config["sqlite"] = "DBOS defaults: rollback journal, synchronous=FULL"
    return _common.result(
        peer="dbos" if args.backend == "postgres" else "dbos-sqlite",
        version=f"dbos {version('dbos')}",
        args=args,
        phases=phases,
        handler_us=_common.handler_cost_us(handler_bodies()),
        peak_rss_mb=peak,
        config=config,
    )


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("python -m perf.peers.dbos_w6", __doc__)
    p.add_argument("--backend", choices=["postgres", "sqlite"], default="postgres")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="peer-dbos-") as tmp:
        if args.backend == "sqlite":
            res = asyncio.run(bench(args, f"sqlite:///{Path(tmp) / 'dbos_w6.sqlite'}"))
        else:
            db = f"dbos_w6_{os.getpid()}"
            _pg(f"drop database if exists {db}")
            _pg(f"create database {db}")
            try:
                res = asyncio.run(bench(args, f"postgresql://postgres@127.0.0.1:5432/{db}"))
            finally:
                _pg(f"drop database if exists {db} with (force)")
    return _common.emit(res, args.json)


if __name__ == "__main__":
    sys.exit(main())
