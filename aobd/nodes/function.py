"""``function`` nodes: ``module:attr`` handlers (sync or async) and the builtins.

Handlers are imported once per reference and cached. A handler taking two parameters is called as
``handler(inputs, ctx)``. Sync handlers run on the event loop, which is the cheapest path for the short,
CPU-light glue functions workflows are made of (a thread hop costs ~35 us, measured for the SQLite log's
reader pool: a tenth of a whole W6 hop at concurrency 1, paid by every node);
a handler that blocks declares ``"blocking": true`` in its config and runs in a worker thread instead.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any

from aobd.errors import NodeError
from aobd.model.workflow import Node

from .base import NodeContext

InlineCall = Callable[[dict[str, Any], NodeContext], Any]


def _ignore_ctx(func: Callable[[dict[str, Any]], Any]) -> InlineCall:
    return lambda inputs, ctx: func(inputs)


class HandlerRef:
    """A resolved handler with its calling convention worked out once."""

    __slots__ = ("func", "inline", "is_async", "ref", "takes_ctx")

    def __init__(self, ref: str, func: Callable[..., Any]) -> None:
        self.ref = ref
        self.func = func
        self.is_async = inspect.iscoroutinefunction(func)
        try:
            params = [
                p
                for p in inspect.signature(func).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            self.takes_ctx = len(params) >= 2
        except (TypeError, ValueError):
            self.takes_ctx = False
        #: The handler as ``call(inputs, ctx)`` whatever its own signature (used by the inline path).
        self.inline: InlineCall = func if self.takes_ctx else _ignore_ctx(func)


@lru_cache(maxsize=4096)
def resolve_handler(ref: str) -> HandlerRef:
    """Import ``module:attr``. Raises NodeError (not retryable) saying what could not be found."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise NodeError(f"handler {ref!r} must be 'module:attr'", code="bad_handler", retryable=False)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise NodeError(
            f"handler {ref!r}: cannot import module {module_name!r}: {exc}",
            code="bad_handler",
            retryable=False,
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise NodeError(
                f"handler {ref!r}: module {module_name!r} has no attribute {attr!r}",
                code="bad_handler",
                retryable=False,
            ) from None
    if not callable(obj):
        raise NodeError(f"handler {ref!r} is not callable", code="bad_handler", retryable=False)
    return HandlerRef(ref, obj)


def module_allowed(module: str, allowed: Iterable[str]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in allowed)


def check_handler(ref: str) -> str | None:
    """For ``aobd validate``: None if ``ref`` resolves, else why not."""
    if ref.startswith("builtin:"):
        return None
    try:
        resolve_handler(ref)
    except NodeError as exc:
        return exc.message
    return None


async def _builtin(name: str, config: Mapping[str, Any], inputs: dict[str, Any], ctx: NodeContext) -> Any:
    if name == "noop":
        return None
    if name == "echo":
        return inputs
    if name == "sleep":
        await asyncio.sleep(float(config.get("ms", 0)) / 1000.0)
        return inputs
    if name == "fail":
        times = int(config.get("times", 1))
        if ctx.attempt <= times:
            raise NodeError(
                f"builtin:fail failing attempt {ctx.attempt} of {times}",
                code="deliberate_failure",
                retryable=True,
            )
        return inputs
    raise NodeError(f"unknown builtin {name!r}", code="bad_handler", retryable=False)


_INLINE_BUILTINS: dict[str, InlineCall] = {
    "builtin:noop": lambda inputs, ctx: None,
    "builtin:echo": lambda inputs, ctx: inputs,
}


def inline_call(node: Node, allowed: Iterable[str] | None) -> InlineCall | None:
    """The handler of a function node as a plain ``call(inputs, ctx)``, when it may run inline; else None.

    Inline means called by the driver inside the step that made the node ready, with no task, timeout or lock of
    its own (see ``Engine._run_inline``). Only a handler that cannot await qualifies: a sync handler not marked
    ``blocking``, or the trivial builtins. A timeout could not interrupt it anyway: a sync handler holds the event
    loop until it returns, on either path. Everything else (async handlers, ``blocking``, ``builtin:sleep`` and
    ``builtin:fail``, a handler that cannot be imported or is not allowed) returns None and goes through
    :func:`execute_function`, which runs it or reports the error.
    """
    config = node.config
    ref = config.get("handler")
    if not isinstance(ref, str) or config.get("blocking"):
        return None
    if ref.startswith("builtin:"):
        return _INLINE_BUILTINS.get(ref)
    if allowed is not None and not module_allowed(ref.partition(":")[0], allowed):
        return None
    try:
        handler = resolve_handler(ref)
    except NodeError:
        return None
    if handler.is_async:
        return None
    return handler.inline


async def execute_function(node: Node, inputs: dict[str, Any], ctx: NodeContext) -> Any:
    ref = node.config["handler"]
    if ref.startswith("builtin:"):
        return await _builtin(ref[8:], node.config, inputs, ctx)
    allowed = ctx.services.get("handler_modules")
    if allowed is not None and not module_allowed(ref.partition(":")[0], allowed):
        raise NodeError(
            f"handler {ref!r} is not allowed here: its module is not in security.handler_modules",
            code="handler_not_allowed",
            retryable=False,
        )
    handler = resolve_handler(ref)
    args = (inputs, ctx) if handler.takes_ctx else (inputs,)
    if handler.is_async:
        return await handler.func(*args)
    if node.config.get("blocking"):
        return await asyncio.to_thread(handler.func, *args)
    result = handler.func(*args)
    if inspect.isawaitable(result):
        result = await result
    return result
