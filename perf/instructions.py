"""Instructions per W6 run on the engine, counted by callgrind: ``python -m perf.instructions``.

Wall-clock figures on a shared VM move by 20-30% between identical runs (docs/performance.md), which hides any
change of a few percent. An instruction count does not: the same tree gives the same count within about 0.3%
(timestamps and random run ids vary a little). This runs ``--runs`` W6 runs of ``Engine.run`` on the in-memory
log and CAS, ``--concurrency`` in flight, under ``valgrind --tool=callgrind``, counting only the measured runs
(the warm-up and the imports are not instrumented) with ``PYTHONHASHSEED=0``, because string hashing changes
dict probing, and prints one JSON line with ``instructions_per_run``. Compare two trees with
``cd <tree> && PYTHONPATH=<tree> python -m perf.instructions``. It needs valgrind (Debian's ``valgrind``).

An instruction is not a nanosecond (cache misses and branch mispredictions count for nothing here), so a
change this shows should still be checked with the wall-clock benchmarks when the machine is quiet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

WARM_UP = 50


def _instrument(state: str) -> None:
    """Switch callgrind's instrumentation of this process on or off. It blocks the loop on purpose: nothing may
    run between the switch and the measured runs."""
    subprocess.run(["callgrind_control", f"--instr={state}", str(os.getpid())], check=True, capture_output=True)


def _stores(store: str, data_dir: Path) -> tuple[Any, Any]:
    """The event log and CAS of the measured runs."""
    if store == "sqlite":
        from aobd.store.local_cas import LocalCas
        from aobd.store.sqlite_log import SqliteEventLog

        return SqliteEventLog(data_dir / "events.db"), LocalCas(data_dir / "cas")
    from aobd.store.memory import MemoryCas, MemoryEventLog

    return MemoryEventLog(), MemoryCas()


async def _one_run(layer: str, log: Any, cas: Any, fidelity: str, data_dir: Path) -> tuple[Any, Any]:
    """(a coroutine function running one W6 run through ``layer``, a coroutine function closing what it opened).

    - ``engine``: ``Engine.run``, the engine alone;
    - ``service``: ``Service.start_run(wait)`` of a daemon (its listeners: metrics, live streams, the log lines),
      what an orchestrator does for a run an accept worker forwards;
    - ``api``: ``POST /v1/runs?wait=60`` through the daemon's ASGI app, called directly (no socket, no HTTP/2
      framing): routing, auth, body decoding and the response, over the service.
    """
    from perf.w6 import w6_document

    doc = w6_document()
    if layer == "engine":
        from aobd.engine.driver import Engine

        engine = Engine(log, cas, fidelity=fidelity)
        return (lambda: engine.run(doc, {"x": 1})), engine.close

    import msgspec

    from aobd.api.schemas import RunStart
    from aobd.config import Config, EngineConfig, LimitsConfig, SecurityConfig
    from aobd.daemon.server import Daemon
    from aobd.daemon.service import Caller
    from aobd.store.factory import Stores
    from aobd.store.meta import SqliteMetaStore

    config = Config(
        data_dir=str(data_dir),
        engine=EngineConfig(fidelity=fidelity),  # type: ignore[arg-type]
        limits=LimitsConfig(run_starts_per_s=0),
        security=SecurityConfig(handler_modules=["perf.w6_handlers"]),
    )
    daemon = Daemon(
        config, Stores(log, cas, SqliteMetaStore(data_dir / "meta.db")), serve_http=False, serve_admin=False
    )
    service = daemon.service

    async def close() -> None:
        await service.engine.close()
        await service.meta.close()

    if layer == "service":
        caller = Caller("default", "admin", "bench")
        return (lambda: service.start_run(caller, RunStart(definition=doc, inputs={"x": 1}), wait_s=60)), close

    body = msgspec.json.encode({"definition": doc, "inputs": {"x": 1}})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "method": "POST", "path": "/v1/runs", "query_string": b"wait=60", "headers": headers}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def post() -> None:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await daemon.api(scope, receive, send)
        if sent[0].get("status") != 201:
            raise SystemExit(f"POST /v1/runs answered {sent}")

    return post, close


async def _measure(runs: int, concurrency: int, fidelity: str, store: str, layer: str) -> None:
    """The instrumented part: runs W6 after a warm-up, with callgrind's instrumentation on only for the runs."""
    data_dir = Path(tempfile.mkdtemp(prefix="aobd-instructions-"))
    log, cas = _stores(store, data_dir)
    try:
        run_one, close = await _one_run(layer, log, cas, fidelity, data_dir)
        for _ in range(WARM_UP):
            await run_one()
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate:
                await run_one()

        _instrument("on")
        await asyncio.gather(*(one() for _ in range(runs)))
        _instrument("off")
        await close()
    finally:
        await cas.close()
        await log.close()
        shutil.rmtree(data_dir, ignore_errors=True)


class Counted(NamedTuple):
    total: int
    """Instructions of every thread."""
    loop: int
    """Instructions of the main thread, the one running the event loop (the SQLite log's writer has its own)."""
    engine: str
    """Which form of the engine's modules ran: "compiled", "source" or "mixed"."""


def _thread_totals(directory: str) -> dict[int, int]:
    """Instructions per thread (1 is the main thread) from callgrind's ``--separate-threads`` output files."""
    totals = {}
    for name in os.listdir(directory):
        numbered = re.fullmatch(r"callgrind\.out-(\d+)", name)
        if numbered is None:
            continue
        text = Path(directory, name).read_text()
        found = re.search(r"^totals: (\d+)", text, re.MULTILINE)
        totals[int(numbered.group(1))] = int(found.group(1)) if found else 0
    return totals


def count(runs: int, concurrency: int, fidelity: str, store: str = "memory", layer: str = "engine") -> Counted:
    """Instructions callgrind counted for ``runs`` W6 runs (in a child process under valgrind), in all and on the
    event loop's thread, and which form of the engine's modules ran."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("perf.instructions needs valgrind: apt-get install valgrind")
    with tempfile.TemporaryDirectory(prefix="aobd-callgrind-") as tmp:
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            "--separate-threads=yes",
            f"--callgrind-out-file={tmp}/callgrind.out",
            sys.executable,
            "-m",
            "perf.instructions",
            "--inner",
            f"--runs={runs}",
            f"--concurrency={concurrency}",
            f"--fidelity={fidelity}",
            f"--store={store}",
            f"--layer={layer}",
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        threads = _thread_totals(tmp)
    found = re.search(r"Collected : ([\d,]+)", done.stderr)
    if done.returncode != 0 or found is None or 1 not in threads:
        raise SystemExit(f"callgrind failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return Counted(int(found.group(1).replace(",", "")), threads[1], done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m perf.instructions", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--fidelity", choices=["full", "fast"], default="full")
    parser.add_argument(
        "--store",
        choices=["memory", "sqlite"],
        default="memory",
        help="the engine's stores: in memory (the default: the engine alone), or the embedded SQLite log and CAS"
        " directory (the loop's share of the durable path; the writer thread's instructions depend on how the"
        " threads interleave under valgrind, so compare loop_instructions_per_run)",
    )
    parser.add_argument(
        "--layer",
        choices=["engine", "service", "api"],
        default="engine",
        help="what a run goes through: the engine alone (the default); an orchestrator's Service (start and wait,"
        " with the daemon's listeners); or POST /v1/runs through the daemon's ASGI app, called directly",
    )
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)  # the process under valgrind
    args = parser.parse_args(argv)
    from aobd.gctune import tune_gc

    tune_gc()  # as aobd's own processes do
    if args.inner:
        import importlib

        import uvloop

        from aobd import _impl

        uvloop.run(_measure(args.runs, args.concurrency, args.fidelity, args.store, args.layer))
        # Which form of the engine's modules ran: a stale build silently runs the source under AOBD_IMPL=auto.
        forms = {_impl.loaded_compiled(importlib.import_module(name)) for name in _impl.COMPILED_MODULES}
        print("compiled" if forms == {True} else "source" if forms == {False} else "mixed")
        return
    from aobd import _fast

    counted = count(args.runs, args.concurrency, args.fidelity, args.store, args.layer)
    print(
        json.dumps(
            {
                "impl": _fast.__impl__,
                "engine": counted.engine,
                "fidelity": args.fidelity,
                "store": args.store,
                "layer": args.layer,
                "runs": args.runs,
                "concurrency": args.concurrency,
                "instructions": counted.total,
                "instructions_per_run": round(counted.total / args.runs),
                "loop_instructions_per_run": round(counted.loop / args.runs),
            }
        )
    )


if __name__ == "__main__":
    main()
