"""The aobd showcase (``make run``): an agentic support-triage run on the embedded stores, shown live.

Without ``--llm-url`` it starts a local stub server that speaks the real OpenAI chat-completions protocol and
answers from ``stub_script.json``, so the demo needs no network and no key. With ``--llm-url`` the agents call
a real OpenAI-compatible endpoint (key from ``--api-key-env``, default OPENAI_API_KEY). A local webhook stands
in for the on-call pager that the approval's escalation notifies.

    python examples/showcase/run.py [--llm-url URL --model NAME] [--data-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


async def webhook_receiver() -> tuple[Any, str]:
    from aiohttp import web

    async def receive(request: web.Request) -> web.Response:
        payload = await request.json()
        print(f"           [webhook] on-call paged: ticket {payload['ticket']} of run {payload['run_id']}", flush=True)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/page", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/page"


async def main(args: argparse.Namespace) -> int:
    from aobd.agents.stub_server import StubLLM
    from aobd.cli.render import render_summary
    from aobd.cli.timeline import Timeline
    from aobd.config import load_config
    from aobd.engine.driver import Engine
    from aobd.store.local_cas import LocalCas
    from aobd.store.sqlite_log import SqliteEventLog

    document = json.loads((HERE / "workflow.json").read_text())
    inputs = json.loads((HERE / "inputs.json").read_text())
    stub = None
    if args.llm_url:
        base_url, model = args.llm_url.rstrip("/"), args.model
    else:
        stub = StubLLM(json.loads((HERE / "stub_script.json").read_text()))
        base_url, model = await stub.start(), "stub-model"
    for node in document["nodes"]:
        if node["type"] == "agent":
            node["config"].update({"base_url": base_url, "model": model})
            if args.llm_url:
                node["config"]["api_key_env"] = args.api_key_env
    hook_runner, hook_url = await webhook_receiver()
    allow = [hook_url.split("/")[2]] + ([base_url.split("/")[2]] if stub else [])
    config = load_config(overrides={"data_dir": args.data_dir})
    config.data_path.mkdir(parents=True, exist_ok=True)
    log = SqliteEventLog(config.data_path / "events.db")
    cas = LocalCas(config.data_path / "cas")
    engine = Engine(log, cas, http_allow=allow, webhooks={"oncall": hook_url})
    engine.listeners.append(Timeline(sys.stderr if args.json else sys.stdout))
    try:
        note = " (a local stub speaking the OpenAI protocol)" if stub else ""
        print(f"LLM endpoint: {base_url}{note}", file=sys.stderr if args.json else sys.stdout, flush=True)
        summary = await engine.run(document, inputs)
    finally:
        await engine.close()
        await cas.close()
        await log.close()
        await hook_runner.cleanup()
        if stub is not None:
            await stub.close()
    if args.json:
        print(json.dumps(summary))
    else:
        print(render_summary(summary, color=sys.stdout.isatty()))
        print(f"\nreplay it: .venv/bin/aobd show {summary['run_id']} --events --data-dir {args.data_dir}")
    return 0 if summary["status"] == "completed" else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm-url", help="a real OpenAI-compatible endpoint (default: the local stub)")
    parser.add_argument("--model", default="gpt-4o-mini", help="model name with --llm-url")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    parser.add_argument("--data-dir", default="./.aobd", help="where the embedded stores live")
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON (timeline on stderr)")
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        sys.exit(runner.run(main(parser.parse_args())))
