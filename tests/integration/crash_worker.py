"""Subprocess for the crash test: starts N concurrent runs on a data dir and drives them until killed.

Prints ``started <n>`` once every run has its RunCreated durable, so the test knows when killing it is fair.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from aobd.cli.local import open_engine
from aobd.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def slow_w6() -> dict:
    def node(node_id: str, ms: int, **extra: object) -> dict:
        return {"id": node_id, "type": "function", "config": {"handler": "builtin:sleep", "ms": ms}, **extra}

    return {
        "name": "slow_w6",
        "defaults": {"retry": {"max_attempts": 3, "initial_ms": 100, "max_ms": 200}},
        "nodes": [
            node("s1", 150),
            {
                "id": "s2",
                "type": "function",
                "config": {"handler": "builtin:fail", "times": 1},
                "in": {"x": "inputs.x"},
            },
            node("s3", 200),
            node("b1", 150),
            node("b2", 250),
            {"id": "j", "type": "join"},
        ],
        "edges": [
            {"from": "s1", "to": "s2"},
            {"from": "s2", "to": "s3"},
            {"from": "s3", "to": "b1"},
            {"from": "s3", "to": "b2"},
            {"from": "b1", "to": "j"},
            {"from": "b2", "to": "j"},
        ],
    }


async def main(data_dir: str, runs: int) -> None:
    agentic = json.loads((ROOT / "examples" / "agentic" / "workflow.json").read_text())
    inputs = json.loads((ROOT / "examples" / "agentic" / "inputs.json").read_text())
    config = load_config(overrides={"data_dir": data_dir})
    async with open_engine(config) as engine:
        ids = []
        for i in range(runs):
            if i % 5 == 4:
                ids.append(await engine.start_run(agentic, inputs))
            else:
                ids.append(await engine.start_run(slow_w6(), {"x": i}))
        print(f"started {len(ids)}", flush=True)
        for run_id in ids:
            await engine.wait(run_id)
        print("all done", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
