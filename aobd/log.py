"""Structured logging: structlog for aobd's own code, with the standard library's loggers routed through it.

Nothing is configured at import; the daemon calls :func:`configure_logging` once at start (each worker process
again, since logging configuration does not cross ``fork``/``spawn``). Then every record, whether it comes
from ``structlog.get_logger()`` in aobd or ``logging.getLogger()`` in granian, asyncio or aiohttp, leaves
through one stdlib handler and one renderer:

* ``json=True`` (the daemon, journald, log shippers): one JSON object per line with ``timestamp`` (ISO 8601,
  UTC), ``level``, ``logger``, ``event`` and the bound keys; exceptions as structured ``exception`` lists.
* ``json=False`` (a terminal): structlog's console renderer, coloured when the stream is a TTY.

Run, node and patch ids travel in :mod:`contextvars` (:func:`log_context`, :func:`bind_log_context`), so a
log line inside a node attempt carries its ``run_id`` without passing loggers around. Contextvars are copied
into an asyncio task when it is created, so tasks started inside a bound block keep those ids.
"""

from __future__ import annotations

import json as _json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final, TextIO

import orjson
import structlog
from structlog.typing import Processor

from aobd.errors import ConfigError

LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# Marks the root handler this module installs, so a second configure_logging replaces it instead of doubling lines.
_HANDLER_NAME: Final = "aobd"
# The loggers granian configures for itself; see granian_log_config.
GRANIAN_LOGGERS: Final = ("_granian", "granian.access")


def configure_logging(json: bool, level: str = "info", *, stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to ``stream`` (default: ``sys.stderr``, which journald captures).

    Args:
        json: JSON lines (True) or the human console format (False).
        level: the least severe level written: debug, info, warning, error or critical.
        stream: where lines go.

    Raises:
        ConfigError: ``level`` is not a level name.
    """
    threshold = LEVELS.get(level.strip().lower())
    if threshold is None:
        raise ConfigError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    out = sys.stderr if stream is None else stream

    # Run for structlog events and for stdlib records alike, so both kinds carry the same keys.
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: list[Processor]
    if json:
        renderer = [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer(serializer=_dumps)]
    else:
        renderer = [structlog.dev.ConsoleRenderer(colors=_isatty(out))]
    formatter = structlog.stdlib.ProcessorFormatter(
        # ExtraAdder: fields passed as ``extra=`` to a stdlib logger become keys, not lost attributes.
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)

    structlog.configure(
        processors=[
            # First, so a filtered-out debug call costs one level check and nothing else.
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def granian_log_config(level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for granian's ``log_dictconfig`` that sends its loggers to ours.

    Left alone, granian installs its own stdout handlers with propagation off, which bypasses the JSON
    renderer. This keeps its loggers (server and access log) and lets them propagate to the root handler.
    """
    threshold = LEVELS.get(level.strip().lower(), logging.INFO)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {},
        "handlers": {},
        "loggers": {name: {"handlers": [], "level": threshold, "propagate": True} for name in GRANIAN_LOGGERS},
    }


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """A structlog logger named ``name`` (the ``logger`` key), with ``initial`` keys bound."""
    return structlog.stdlib.get_logger(name, **initial)


@contextmanager
def log_context(
    *, run_id: str | None = None, node_id: str | None = None, patch_id: str | None = None, **more: Any
) -> Iterator[None]:
    """Add these ids to every log line written in this context until the block ends (None ids are left out)."""
    with structlog.contextvars.bound_contextvars(**_present(run_id=run_id, node_id=node_id, patch_id=patch_id, **more)):
        yield


def bind_log_context(
    *, run_id: str | None = None, node_id: str | None = None, patch_id: str | None = None, **more: Any
) -> None:
    """Add these ids to the rest of the current context: for a task that serves one run or node for its life."""
    structlog.contextvars.bind_contextvars(**_present(run_id=run_id, node_id=node_id, patch_id=patch_id, **more))


def clear_log_context() -> None:
    """Remove every bound id from the current context."""
    structlog.contextvars.clear_contextvars()


def _present(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _dumps(obj: Any, **_: Any) -> str:
    # orjson: ~5x faster than json for log lines; repr() for values it cannot encode, so logging never raises.
    try:
        return orjson.dumps(obj, default=repr, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # e.g. an integer beyond 64 bits
        return _json.dumps(obj, default=repr)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream
        return False
