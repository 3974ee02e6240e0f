"""Commands that work on a data dir in this process: run, resume, show, runs."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson

from aobd.config import Config, load_config
from aobd.engine.driver import Engine, file_workflow_resolver
from aobd.errors import AobdError
from aobd.gctune import tune_gc, tune_switch_interval
from aobd.model.validate import load_workflow
from aobd.nodes.function import check_handler
from aobd.store.local_cas import LocalCas
from aobd.store.sqlite_log import SqliteEventLog

from .main import EXIT_FAILED, EXIT_OK, config_path, read_json_file
from .render import render_runs, render_summary
from .timeline import Timeline


def _config(args: argparse.Namespace) -> Config:
    return load_config(config_path(args), overrides={"data_dir": getattr(args, "data_dir", None)})


@asynccontextmanager
async def open_engine(config: Config, **kwargs: Any) -> AsyncIterator[Engine]:
    """The embedded stores under ``data_dir`` and an engine on them; everything closed on the way out."""
    data = config.data_path
    data.mkdir(parents=True, exist_ok=True)
    log = SqliteEventLog(data / "events.db")
    cas = LocalCas(data / "cas")
    engine = Engine(log, cas, http_allow=list(config.security.http_allow), fidelity=config.engine.fidelity, **kwargs)
    try:
        yield engine
    finally:
        await engine.close()
        await cas.close()
        await log.close()


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value).decode() + "\n")


def _inputs(text: str) -> Any:
    if text.startswith("@"):
        return read_json_file(Path(text[1:]))
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise AobdError(f"--inputs is not valid JSON: {exc}") from None


async def cmd_run(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.fast:
        config = load_config(config_path(args), overrides={"data_dir": args.data_dir, "engine.fidelity": "fast"})
    path = Path(args.file)
    document = read_json_file(path)
    # Blocking path calls are fine here: nothing else runs on the loop before the run starts.
    source_dir = os.path.dirname(os.path.abspath(path))  # noqa: ASYNC240
    sys.path.insert(0, source_dir)  # handlers next to the workflow file are importable as top-level modules
    load_workflow(document, handler_check=check_handler, source=str(path))
    inputs = _inputs(args.inputs)
    tune_gc(config.daemon.gc_thresholds)
    tune_switch_interval(config.daemon.switch_interval_ms)
    async with open_engine(config, workflow_resolver=file_workflow_resolver(Path(source_dir))) as engine:
        engine.listeners.append(Timeline(sys.stderr if args.json else sys.stdout))
        run_id = await engine.start_run(document, inputs, source_dir=source_dir)
        summary = await engine.wait(run_id)
    if args.json:
        _print_json(summary)
    else:
        print(render_summary(summary, color=sys.stdout.isatty()))
    return EXIT_OK if summary["status"] == "completed" else EXIT_FAILED


async def cmd_resume(args: argparse.Namespace) -> int:
    config = _config(args)
    async with open_engine(config) as engine:
        if not args.json:
            engine.listeners.append(Timeline(sys.stdout))
        run_ids = await engine.resume_all()
        summaries = [await engine.wait(run_id) for run_id in run_ids]
    for summary in summaries:
        if args.json:
            _print_json(summary)
        else:
            print(render_summary(summary, color=sys.stdout.isatty()))
    if not args.json:
        print(f"resumed {len(run_ids)} unfinished run{'s' if len(run_ids) != 1 else ''}")
    return EXIT_OK if all(s["status"] == "completed" for s in summaries) else EXIT_FAILED


async def cmd_show(args: argparse.Namespace) -> int:
    config = _config(args)
    async with open_engine(config) as engine:
        machine = await engine.load(args.run_id)
        events = None
        if args.events:
            events = [orjson.loads(r.data) for r in await engine.log.read(args.run_id)]
        summary = machine.summary(events=events)
    if args.json:
        _print_json(summary)
    else:
        print(render_summary(summary, color=sys.stdout.isatty()))
        for event in events or []:
            print(orjson.dumps(event).decode())
    return EXIT_OK


async def cmd_runs(args: argparse.Namespace) -> int:
    config = _config(args)
    async with open_engine(config) as engine:
        runs = await engine.log.list_runs(status=args.status, limit=args.limit)
    if args.json:
        import msgspec

        _print_json([msgspec.to_builtins(r) for r in runs])
    else:
        print(render_runs(runs))
    return EXIT_OK
