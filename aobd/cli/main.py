"""``aobd``: the daemon binary and its local commands (DESIGN.md section 8).

``run``, ``resume``, ``show``, ``runs`` and ``validate`` work directly on a data dir with the embedded stores,
in this process. ``serve`` is the daemon (HTTP API, admin socket), built in the daemon issue.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import orjson

from aobd.errors import AobdError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    # --config is accepted before or after the command (`aobd --config F serve`, `aobd serve --config F`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="TOML config file (env AOBD_CONFIG)")
    parser = argparse.ArgumentParser(
        prog="aobd", description="aobd: workflow orchestration for agentic workflows", parents=[common]
    )
    sub = parser.add_subparsers(dest="command")
    _add = sub.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return _add(name, parents=[common], **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    serve = sub.add_parser("serve", help="run the daemon (the default command)")
    serve.add_argument("--single-process", action="store_true", help="everything in one process (development, tests)")
    serve.add_argument("--data-dir", help="data directory (env AOBD_DATA_DIR, default ./.aobd)")
    serve.add_argument("--listen", help="host:port of the HTTP API (env AOBD_API_LISTEN)")

    def data_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", help="data directory (env AOBD_DATA_DIR, default ./.aobd)")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    run = sub.add_parser("run", help="run one workflow in this process, showing its timeline live")
    run.add_argument("file", help="workflow JSON file")
    run.add_argument("--inputs", default="{}", help="inputs as JSON, or @FILE")
    run.add_argument("--fast", action="store_true", help="fast-path mode: leave out NodeScheduled/NodeStarted")
    data_dir(run)

    resume = sub.add_parser("resume", help="finish every unfinished run of the data dir (after a crash)")
    data_dir(resume)

    show = sub.add_parser("show", help="show one run")
    show.add_argument("run_id")
    show.add_argument("--events", action="store_true", help="include the events")
    data_dir(show)

    runs = sub.add_parser("runs", help="list runs")
    runs.add_argument("--status", help="only runs with this status")
    runs.add_argument("--limit", type=int, default=50)
    data_dir(runs)

    from aobd.store import migrate_cli

    migrate = sub.add_parser("migrate", help="apply pending Postgres schema migrations (aobd[cluster])")
    migrate_cli.add_arguments(migrate)

    validate = sub.add_parser("validate", help="validate a workflow file; exit 1 listing every problem")
    validate.add_argument("file")
    validate.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "serve"
    try:
        if command == "validate":
            return _validate(args)
        if command == "serve":
            from aobd.daemon.server import serve

            overrides = {"data_dir": getattr(args, "data_dir", None), "api.listen": getattr(args, "listen", None)}
            single = getattr(args, "single_process", False) or os.environ.get("AOBD_SINGLE_PROCESS", "") in (
                "1",
                "true",
            )
            return serve(config_path(args), single_process=single, overrides=overrides)
        if command == "migrate":
            from aobd.store import migrate_cli

            return migrate_cli.run(args)
        from aobd.cli import local

        handler = {
            "run": local.cmd_run,
            "resume": local.cmd_resume,
            "show": local.cmd_show,
            "runs": local.cmd_runs,
        }[command]
        return _run_async(handler(args))
    except AobdError as exc:
        if getattr(args, "json", False):
            print(orjson.dumps({"error": exc.to_dict()}).decode())
        else:
            print(f"aobd: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def config_path(args: argparse.Namespace) -> str | None:
    """--config, else $AOBD_CONFIG, else none (embedded defaults)."""
    return getattr(args, "config", None) or os.environ.get("AOBD_CONFIG") or None


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _validate(args: argparse.Namespace) -> int:
    from aobd.model.validate import validate_document
    from aobd.nodes.function import check_handler

    path = Path(args.file)
    document = read_json_file(path)
    sys.path.insert(0, str(path.resolve().parent))
    _, problems = validate_document(document, handler_check=check_handler)
    if args.json:
        import msgspec

        print(orjson.dumps({"valid": not problems, "problems": [msgspec.to_builtins(p) for p in problems]}).decode())
    elif problems:
        print(f"{path}: {len(problems)} problem{'s' if len(problems) != 1 else ''}", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
    else:
        print(f"{path}: valid")
    return EXIT_FAILED if problems else EXIT_OK


def read_json_file(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise AobdError(f"{path}: no such file") from None
    except orjson.JSONDecodeError as exc:
        raise AobdError(f"{path}: not valid JSON: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
