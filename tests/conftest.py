"""Shared fixtures: workflow builders and an engine on the in-memory stores."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    from aobd.config import Config
    from aobd.daemon.service import Service

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT.parent / "shared" / "testdata"
EXAMPLES = ROOT / "examples"


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a fresh loop (pytest-asyncio is deliberately not a dependency)."""
    return asyncio.run(coro)


def fn(node_id: str, handler: str = "builtin:echo", **extra: Any) -> dict[str, Any]:
    return {"id": node_id, "type": "function", "config": {"handler": handler}, **extra}


def edge(a: str, b: str, when: str | None = None) -> dict[str, Any]:
    return {"from": a, "to": b, **({"when": when} if when else {})}


def workflow(nodes: list[dict[str, Any]], edges: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": extra.pop("name", "test"), "nodes": nodes, "edges": edges or [], **extra}


def compiled_twin(name: str) -> ModuleType:
    """The Cython twin ``aobd._fast.<name>``, imported directly. Without a built extension the test skips, unless
    ``AOBD_IMPL=c`` demands the compiled twins: then it fails."""
    try:
        return importlib.import_module(f"aobd._fast.{name}")
    except ImportError as exc:
        if os.environ.get("AOBD_IMPL", "").strip().lower() == "c":
            pytest.fail(f"AOBD_IMPL=c but aobd._fast.{name} cannot be imported: {exc}")
        pytest.skip(f"aobd._fast.{name} is not built ({exc}); run `make build`")


@contextlib.asynccontextmanager
async def started_service(config: Config) -> AsyncIterator[Service]:
    """A daemon's Service on the stores ``config`` names: started (unfinished runs resumed) before the block,
    closed after it."""
    from aobd.daemon.service import Service
    from aobd.store.factory import open_stores

    service = Service(config, await open_stores(config))
    await service.start()
    try:
        yield service
    finally:
        await service.close()


def require_services() -> bool:
    return os.environ.get("AOBD_REQUIRE_SERVICES") == "1"


@pytest.fixture
def run() -> Callable[[Coroutine[Any, Any, T]], T]:
    return run_async
