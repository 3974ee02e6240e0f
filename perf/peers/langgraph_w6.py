"""W6 on LangGraph, durable: a StateGraph with a fan-out/fan-in, checkpointed by AsyncSqliteSaver.

Runs inside .peers/langgraph (``python -m perf.peers.langgraph_w6 --runs N --concurrency C --json``).

s1 -> s2 -> s3 -> (b1 || b2) -> j as six async nodes; b1 and b2 run in the same superstep (LangGraph's parallel
branches) and j waits for both (``add_edge(["b1", "b2"], "j")``). Every run is its own thread (``thread_id``)
and is invoked with ``durability="sync"``: each superstep's checkpoint is written to SQLite (WAL, the saver's
own setting; synchronous left at SQLite's default, FULL) before the next superstep starts. Concurrency: up to C
``graph.ainvoke`` coroutines on one asyncio loop, sharing the saver's single aiosqlite connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypedDict

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import END, START, StateGraph

from perf.peers import _common

STAMPS = _common.Stamps()


class W6State(TypedDict, total=False):
    x: int
    a: int
    b: int


def _run(config: RunnableConfig) -> str:
    return str(config["configurable"]["thread_id"])


async def s1(state: W6State, config: RunnableConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = {"x": state["x"] + 1}
    STAMPS.put(_run(config), "s1", t0)
    return out


async def s2(state: W6State, config: RunnableConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = {"x": state["x"] + 1}
    STAMPS.put(_run(config), "s2", t0)
    return out


async def s3(state: W6State, config: RunnableConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = {"x": state["x"] + 1}
    STAMPS.put(_run(config), "s3", t0)
    return out


async def b1(state: W6State, config: RunnableConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = {"a": state["x"] * 2}
    STAMPS.put(_run(config), "b1", t0)
    return out


async def b2(state: W6State, config: RunnableConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = {"b": state["x"] * 3}
    STAMPS.put(_run(config), "b2", t0)
    return out


async def j(state: W6State, config: RunnableConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = {"x": state["a"] + state["b"]}
    STAMPS.put(_run(config), "j", t0)
    return out


def build_graph() -> StateGraph:
    g = StateGraph(W6State)
    for name, fn in (("s1", s1), ("s2", s2), ("s3", s3), ("b1", b1), ("b2", b2), ("j", j)):
        g.add_node(name, fn)
    g.add_edge(START, "s1")
    g.add_edge("s1", "s2")
    g.add_edge("s2", "s3")
    g.add_edge("s3", "b1")
    g.add_edge("s3", "b2")
    g.add_edge(["b1", "b2"], "j")
    g.add_edge("j", END)
    return g


def handler_bodies() -> list[Any]:
    """The node bodies without LangGraph around them (stamps included), for the handler's own cost."""
    cfg: RunnableConfig = {"configurable": {"thread_id": "bench"}}
    st: W6State = {"x": 3, "a": 8, "b": 12}

    def drive(fn: Any) -> Any:
        def call() -> Any:
            coro = fn(st, cfg)
            try:
                coro.send(None)
            except StopIteration as stop:
                return stop.value
            raise RuntimeError("node body awaited")

        return call

    return [drive(fn) for fn in (s1, s2, s3, b1, b2, j)]


async def bench(args: Any, db: Path) -> dict[str, Any]:
    sampler = _common.RssSampler().start()
    async with contextlib.AsyncExitStack() as stack:
        # --no-checkpointer: LangGraph with nothing durable at all (the "about 230/s" reference).
        saver = (
            None
            if args.no_checkpointer
            else await stack.enter_async_context(AsyncSqliteSaver.from_conn_string(str(db)))
        )
        graph = build_graph().compile(checkpointer=saver)
        counter = 0

        async def one() -> bool:
            nonlocal counter
            counter += 1
            config: RunnableConfig = {"configurable": {"thread_id": f"w6-{counter}"}}
            out = await graph.ainvoke({"x": 1}, config, durability="sync" if saver is not None else None)
            return out.get("x") == 20

        phases = await _common.measure_async(one, args, STAMPS)
    STAMPS.enabled = False
    return _common.result(
        peer="langgraph-no-checkpointer" if args.no_checkpointer else "langgraph",
        version=f"langgraph {version('langgraph')} + checkpoint-sqlite {version('langgraph-checkpoint-sqlite')}",
        args=args,
        phases=phases,
        handler_us=_common.handler_cost_us(handler_bodies()),
        peak_rss_mb=sampler.stop(),
        config={
            "checkpointer": "none (not durable)"
            if args.no_checkpointer
            else "AsyncSqliteSaver (aiosqlite, journal_mode=WAL, synchronous=FULL default)",
            "durability": "none" if args.no_checkpointer else "sync",
            "thread_per_run": True,
            "concurrency_model": "asyncio: C graph.ainvoke coroutines on one loop, async nodes",
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = _common.parser("python -m perf.peers.langgraph_w6", __doc__)
    parser.add_argument("--no-checkpointer", action="store_true", help="no persistence at all (not durable)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="peer-langgraph-") as tmp:
        res = asyncio.run(bench(args, Path(tmp) / "checkpoints.sqlite"))
    return _common.emit(res, args.json)


if __name__ == "__main__":
    sys.exit(main())
