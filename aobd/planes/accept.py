"""An HTTP accept worker: the Api over a :class:`~aobd.planes.rpc.ServiceProxy`, on the shared API port.

Several accept workers listen on ``api.listen`` at once: granian binds its listener with SO_REUSEPORT (on every
platform but Windows), so the kernel spreads new connections over the workers' sockets with no shared accept
lock. Each worker forwards Service calls to the orchestrators over zmq, follows live events from the fanout
plane, and reads the event log itself to replay a stream's history (every process of the daemon shares the
stores; SQLite's WAL lets readers in other processes run beside the writer).
"""

from __future__ import annotations

import asyncio
import signal
from typing import cast

import structlog

from aobd.api.app import Api
from aobd.api.auth import make_limiter
from aobd.api.fanout import FanoutHub
from aobd.config import Config
from aobd.daemon.http import start_granian, stop_granian, wait_listening
from aobd.daemon.server import is_loopback, reload_api, split_listen
from aobd.daemon.service import Service
from aobd.errors import ConfigError
from aobd.metrics import Metrics
from aobd.planes import paths
from aobd.planes.fanout import FanoutSubscriber
from aobd.planes.health import ChildLink, planes_ready
from aobd.planes.rpc import ServiceProxy
from aobd.planes.watched import WatchedRuns
from aobd.store.factory import open_stores

__all__ = ["main", "serve"]

log = structlog.get_logger("aobd.planes.accept")


def main(config: Config, index: int, config_path: str | None = None) -> int:
    """Entry point of accept worker ``index``: serve until SIGTERM/SIGINT, then stop; returns the exit status.
    SIGHUP (forwarded by the supervisor: ``systemctl reload aobd``) rereads ``config_path``."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(config, index, config_path=config_path))


async def serve(
    config: Config, index: int, *, stop: asyncio.Event | None = None, config_path: str | None = None
) -> int:
    """Serve the API until ``stop`` is set (or a SIGTERM/SIGINT when none is given)."""
    host, port = split_listen(config.api.listen)
    if not config.auth.tokens and not is_loopback(host):
        raise ConfigError(
            f"api.listen is {config.api.listen} but no [[auth.tokens]] are configured: "
            "an open daemon serves loopback only. Configure tokens or listen on 127.0.0.1"
        )
    owns_signals = stop is None
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    stores = await open_stores(config)
    proxy = ServiceProxy(config, log=stores.log)
    paths.ensure_socket_dir(config)
    # Which runs this worker's streams follow, for the orchestrators: they publish only those.
    watched = WatchedRuns(paths.watched_runs(config, index))
    hub = FanoutHub(buffer_size=config.api.stream_buffer, tracker=watched)
    subscriber = FanoutSubscriber(config, hub)
    metrics = Metrics()
    metrics.track_subscribers(hub.subscriber_count)
    # ServiceProxy has the Service's call surface (tests/unit/test_planes_rpc.py compares the signatures); the
    # cast keeps Api typed against the real Service instead of a protocol listing forty members.
    limiter = make_limiter(config, shared_path=paths.rate_limits(config))  # one budget for all accept workers
    api = Api(cast(Service, proxy), listen=config.api.listen, hub=hub, metrics=metrics, limiter=limiter)
    if owns_signals:
        # Without a handler SIGHUP would end the process: a reload must not cut the requests in flight.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _reload, api, config_path)
    link = ChildLink(config, "accept", index, want_health=True)
    proxy.planes_ready = lambda: planes_ready(link.health)  # /readyz: ready when the daemon behind it is
    link.metrics_source = lambda: metrics.render()[0]  # its HTTP metrics join the daemon's /metrics via the beats
    link.start()
    await proxy.start()
    await subscriber.start()
    server, task = start_granian(api, config, host, port)
    try:
        await wait_listening(host, port, task)
        link.ready = True  # the supervisor tells systemd READY once every child said so
        await link.beat_now()
        log.info("accept worker ready", index=index, listen=config.api.listen)
        await stop.wait()
    finally:
        proxy.draining = True  # /readyz answers 503 while the listener closes
        hub.close()  # ends the live streams, so granian's shutdown does not wait on them
        await stop_granian(server, task)
        await subscriber.close()
        watched.close()
        await proxy.close()
        await api.close()
        await stores.close()
        await link.close()
        log.info("accept worker stopped", index=index)
    return 0


def _reload(api: Api, config_path: str | None) -> None:
    if config_path is None:
        log.info("reload requested; no config file to reread")
        return
    reload_api(api, config_path)
