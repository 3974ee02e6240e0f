"""``aobd serve``: the daemon's lifecycle in one process (``--single-process``).

Start: load config, refuse to listen beyond loopback without tokens, resume every unfinished run, then open
the HTTP API (granian, HTTP/1.1 + HTTP/2, TLS with ALPN when configured) and the admin unix socket, and tell
systemd READY. SIGTERM/SIGINT or ``aobctl drain``: stop taking runs (503), let in-flight node attempts finish
for ``daemon.drain_grace_s``, close the stores (every committed event is already durable; unfinished runs are
resumed by the next start) and exit 0. SIGHUP: reload tokens, rate limits and log level.

Without ``--single-process``, :func:`serve` starts the supervisor of the multi-process planes
(:mod:`aobd.planes.supervisor`); each orchestrator child runs this same :class:`Daemon`, with the hooks marked
``[planes]`` below: no HTTP listener when accept workers serve the API, a readiness event for its heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import ipaddress
import logging
import signal
import time
from pathlib import Path
from typing import Any

import structlog

from aobd import __version__, _fast
from aobd.api.app import Api
from aobd.api.fanout import FanoutHub
from aobd.config import Config, load_config
from aobd.daemon.admin import AdminServer
from aobd.daemon.http import start_granian, stop_granian, wait_listening
from aobd.daemon.sdnotify import Notifier, watchdog_interval
from aobd.daemon.service import Service
from aobd.errors import ConfigError
from aobd.gctune import tune_gc, tune_switch_interval
from aobd.log import configure_logging
from aobd.metrics import Metrics, MetricsListener
from aobd.model import events as ev
from aobd.store.factory import Stores, open_stores

log = structlog.get_logger("aobd.daemon")
#: The stdlib logger under ``log``: asking it whether a level is on costs a cached lookup, where a filtered-out
#: structlog call still binds its fields and runs the first processor.
_stdlib_log = logging.getLogger("aobd.daemon")


_LOGGED = {
    "RunCreated": "info",
    "RunCompleted": "info",
    "RunFailed": "warning",
    "RunCancelled": "info",
    "NodeFailed": "warning",
    "PatchProposed": "info",
    "PatchApplied": "info",
    "PatchRejected": "warning",
    "PatchRolledBack": "info",
    "ApprovalRequested": "info",
    "ApprovalDecided": "info",
    "ApprovalEscalated": "info",
}
_LEVELNO = {"info": logging.INFO, "warning": logging.WARNING}
#: _LOGGED by event class.
_LOGGED_BY_CLASS = {cls: _LOGGED[tag] for cls, tag in ev.EVENT_TAGS.items() if tag in _LOGGED}
_IDS = (
    "node_id",
    "patch_id",
    "ticket",
    "attempt",
    "workflow",
    "reason",
    "reasons",
    "error",
    "by",
    "decision",
    "version",
)


def log_events(events: list[ev.Event]) -> None:
    """Engine listener: one JSON log line per notable event, with run_id/node_id/patch_id bound.

    Node completions stay out of the log (the event log has them; logging them would double the hot path's I/O).
    """
    for event in events:
        level = _LOGGED_BY_CLASS.get(type(event))  # None for most events, found in one probe
        if level is None or not _stdlib_log.isEnabledFor(_LEVELNO[level]):
            continue
        kind = ev.event_type(event)
        fields = {k: getattr(event, k) for k in _IDS if getattr(event, k, None) not in (None, "", [])}
        getattr(log, level)(kind, run_id=event.run_id, seq=event.seq, **fields)


def reload_api(api: Api, config_path: str) -> bool:
    """SIGHUP: reread ``config_path``; tokens, rate limits, body limits and the log level change live. A file that
    does not load leaves the running configuration in place (logged). True when the new one took effect."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        log.error("reload failed; keeping the running configuration", error=exc.message)
        return False
    api.reload(config)
    configure_logging(json=config.daemon.log_format == "json", level=config.daemon.log_level)
    log.info("configuration reloaded", tokens=len(config.auth.tokens))
    return True


def make_coordinator(config: Config, service: Service) -> Any:
    """The cluster coordinator of ``[cluster] enabled = true``; the shared stores are a precondition."""
    import os
    import socket

    from aobd.cluster.coordinator import ClusterCoordinator
    from aobd.cluster.directory import Directory, advertised_url
    from aobd.cluster.jobs import install_bus_execution

    if config.storage.event_log != "postgres" or config.storage.cas != "s3":
        raise ConfigError("cluster.enabled needs shared stores: storage.event_log = 'postgres' and storage.cas = 's3'")
    daemon_id = config.cluster.daemon_id or f"{socket.gethostname()}:{os.getpid()}"
    service.engine.writer_id = daemon_id
    coordinator = ClusterCoordinator(service.engine, config.kafka, daemon_id)
    if config.cluster.execution == "bus":
        install_bus_execution(service.engine, coordinator, config)  # started and stopped by the coordinator
    url = advertised_url(config.cluster.advertise_url, config.api.listen, socket.gethostname())
    coordinator.directory = Directory(
        service.meta, daemon_id, url, coordinator.owned_partitions, config.kafka.partitions
    )
    coordinator.on_resumed = service.index_resumed
    service.cluster = coordinator
    return coordinator


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"api.listen must be host:port, not {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Daemon:
    def __init__(
        self,
        config: Config,
        stores: Stores,
        *,
        config_path: str | None = None,
        serve_http: bool = True,
        serve_admin: bool = True,
    ) -> None:
        self.config = config
        self.config_path = config_path
        # [planes] An orchestrator behind accept workers leaves the API port to them; only orchestrator 0
        # opens the admin socket (aobctl's way in, whatever serves HTTP).
        self.serve_http = serve_http
        self.serve_admin = serve_admin
        #: [planes] Set once runs are resumed and the listeners accept: the orchestrator child reports ready.
        self.serving = asyncio.Event()
        self.host, self.port = split_listen(config.api.listen)
        self.data_dir = str(Path(config.data_dir).resolve())
        if not config.auth.tokens and not is_loopback(self.host):
            raise ConfigError(
                f"api.listen is {config.api.listen} but no [[auth.tokens]] are configured: "
                "an open daemon serves loopback only. Configure tokens or listen on 127.0.0.1"
            )
        self.service = Service(config, stores)
        self.hub = FanoutHub(buffer_size=config.api.stream_buffer)
        self.metrics = Metrics()
        self.metrics.observe_store(self.service.log)
        self.metrics.track_subscribers(self.hub.subscriber_count)
        self.metrics.queue_depth.set_function(self.service.engine.inflight)
        self.metrics.track_admission(self.service.engine.admission)
        self.service.engine.listeners.append(self.hub.publish)
        self.metrics_listener = MetricsListener(self.metrics)
        self.service.engine.listeners.append(self.metrics_listener)
        self.service.engine.listeners.append(log_events)
        self.api = Api(self.service, listen=config.api.listen, hub=self.hub, metrics=self.metrics)
        self.admin = AdminServer(self.api, config.admin_socket, drain=self.request_stop)
        self.cluster: Any = None
        if config.cluster.enabled:
            self.cluster = make_coordinator(config, self.service)
        self.notifier = Notifier()
        self._stop = asyncio.Event()
        self._servers: list[tuple[Any, asyncio.Task[Any]]] = []
        self._tasks: list[asyncio.Task[Any]] = []

    def request_stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        if self.config_path is None:
            log.info("reload requested; no config file to reread")
            return
        self.notifier.reloading()
        reload_api(self.api, self.config_path)
        self.notifier.ready("reloaded")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        started = time.perf_counter()
        if self.cluster is not None:
            await self.cluster.start()
            self.cluster.directory.start()
            # Serve once this daemon knows its partitions (their runs are resumed by the assignment hook).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.cluster.ready.wait(), 60)
        resumed = await self.service.start()
        for run_id in resumed:
            # Gauges (active runs, pending approvals) and workflow labels of runs this start took over.
            self.metrics_listener.restore(await self.service.engine.events(run_id))
        await self._open_listeners()
        self.serving.set()
        if not self.config.auth.tokens:
            log.warning(
                "no auth tokens configured: the API is open, and serves loopback only", listen=self.config.api.listen
            )
        log.info(
            "aobd ready",
            version=__version__,
            impl=_fast.__impl__,
            listen=self.config.api.listen,
            admin_socket=str(self.config.admin_socket),
            data_dir=self.data_dir,
            resumed_runs=len(resumed),
            startup_s=round(time.perf_counter() - started, 3),
        )
        self.notifier.ready(f"serving on {self.config.api.listen}; {len(resumed)} runs resumed")
        interval = watchdog_interval()
        if interval:
            self._tasks.append(asyncio.create_task(self._watchdog(interval)))
        await self._stop.wait()
        return await self._shutdown()

    async def _open_listeners(self) -> None:
        if self.serve_admin:  # [planes]
            await self.admin.start()
        if not self.serve_http:  # [planes]
            return
        server, task = start_granian(self.api, self.config, self.host, self.port)
        self._servers.append((server, task))
        await wait_listening(self.host, self.port, task)

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _shutdown(self) -> int:
        self.notifier.stopping()
        grace = self.config.daemon.drain_grace_s
        log.info("draining", inflight=self.service.engine.inflight(), grace_s=grace)
        finished = await self.service.drain(grace)
        if self.cluster is not None:
            await self.cluster.directory.close()  # nobody forwards here any more
            await self.cluster.close()  # leave the group: the partitions move to the other daemons now
        if not finished:
            log.warning(
                "drain grace period over; unfinished attempts will run again on the next start",
                inflight=self.service.engine.inflight(),
            )
        self.hub.close()
        for server, task in self._servers:
            await stop_granian(server, task)
        if self.serve_admin:  # [planes] the admin socket is another process's when this one did not open it
            await self.admin.close()
        await self.api.close()
        for task in self._tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.service.close()
        log.info("stopped")
        return 0


def serve(config_path: str | None, *, single_process: bool = False, overrides: dict[str, Any] | None = None) -> int:
    config = load_config(config_path, overrides=overrides)
    # A watchdog kill (SIGABRT) or a fatal signal leaves every thread's stack in the journal.
    faulthandler.enable()
    configure_logging(json=config.daemon.log_format == "json", level=config.daemon.log_level)
    if not single_process:  # [planes] the default: a supervisor and its process groups
        from aobd.planes.supervisor import serve as serve_planes

        return serve_planes(config, config_path, overrides)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        daemon = runner.run(_make(config, config_path))
        tune_gc(config.daemon.gc_thresholds)  # after start-up: what it built stays out of every collection
        tune_switch_interval(config.daemon.switch_interval_ms)
        return runner.run(daemon.run())


async def _make(config: Config, config_path: str | None) -> Daemon:
    # Built inside the loop: the stores and the hub bind asyncio primitives to the running loop.
    return Daemon(config, await open_stores(config), config_path=config_path)
