"""Serving the API with granian embedded: start, wait until the port accepts, stop. One place for the
single-process daemon, its orchestrator 0 and the accept workers of the multi-process daemon."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aobd.api.app import Api
from aobd.config import Config
from aobd.errors import ConfigError


def start_granian(api: Api, config: Config, host: str, port: int) -> tuple[Any, asyncio.Task[Any]]:
    """HTTP/1.1 and HTTP/2 (h2c by prior knowledge, or ALPN with TLS) on ``host:port``. granian's listener sets
    SO_REUSEPORT itself, which is what lets accept workers share the port."""
    from granian.constants import HTTPModes, Interfaces
    from granian.server.embed import Server

    tls: dict[str, Any] = {}
    if config.api.tls_cert:
        tls = {"ssl_cert": Path(config.api.tls_cert), "ssl_key": Path(config.api.tls_key)}
    server = Server(
        api,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        http=HTTPModes.auto,
        websockets=True,
        backlog=config.api.backlog,
        backpressure=config.api.max_concurrent_requests,
        log_enabled=False,
        **tls,
    )
    return server, asyncio.create_task(server.serve())


async def wait_listening(host: str, port: int, serving: asyncio.Task[Any], timeout_s: float = 10.0) -> None:
    """Until the port accepts connections (granian binds inside its serve task, and READY must not come before),
    or raise when granian's task ended (a bind error) or the port never answered.

    With SO_REUSEPORT another worker may be the one that answers: this proves that the port is served and that
    this server is running, not that its own socket is bound yet (granian reports no such event).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if serving.done():
            serving.result()  # its exception, if it failed
            break
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise ConfigError(f"could not listen on {host}:{port}")


async def stop_granian(server: Any, serving: asyncio.Task[Any], timeout_s: float = 10.0) -> None:
    server.stop()
    try:
        # Let granian finish its own shutdown; cancelling its task breaks its lifespan glue.
        await asyncio.wait_for(asyncio.shield(serving), timeout_s)
    except TimeoutError:
        serving.cancel()
