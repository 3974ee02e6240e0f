"""``python -m aobd.planes.child ROLE INDEX [--config PATH]``: one process of the multi-process daemon.

The supervisor (:mod:`aobd.planes.supervisor`) starts these; they are not meant to be started by hand. Roles:

- ``orchestrator``: the :class:`aobd.daemon.server.Daemon` of ``--single-process`` (Service, Engine, stores),
  whose function and http attempts go to the runner plane through a :class:`RemoteExecutor` over
  :class:`ZmqJobTransport`. Without the accept plane it also serves the HTTP API and the admin socket (there is
  then exactly one orchestrator); with it, it resumes only the runs of its shard and serves nothing itself.
- ``runner``: :class:`aobd.planes.jobs.RunnerLoop`.
- ``accept`` / ``fanout``: ``aobd.planes.accept.main(config, index, config_path)`` and
  ``aobd.planes.fanout.main(config)``.

Every child heartbeats to the supervisor and dies with it (PR_SET_PDEATHSIG): an orphaned orchestrator would
keep driving runs that a restarted daemon also drives.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import faulthandler
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

import structlog

from aobd.config import Config, load_config, orchestrator_count
from aobd.gctune import tune_gc, tune_switch_interval
from aobd.log import configure_logging

if TYPE_CHECKING:
    from aobd.engine.inline_policy import InlinePolicy
    from aobd.metrics import Metrics

log = structlog.get_logger("aobd.planes.child")

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux for SIGTERM when the supervisor dies, even by SIGKILL (children then drain as on a stop)."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the heartbeat timeouts still notice a dead supervisor's children
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _inline_policy(config: Config, index: int, metrics: Metrics) -> InlinePolicy:
    """The ``auto`` rule of this orchestrator: the daemon's demotions so far, plus the handlers the previous
    orchestrator of this index left running inline when it died (they hung or crashed it)."""
    from aobd.engine.inline_policy import InlinePolicy

    from . import inline_marker
    from .inline_marker import FileLedger, FileMarker

    marker = FileMarker(inline_marker.marker_path(config, index))
    ledger = FileLedger(inline_marker.ledger_path(config))

    def demoted(ref: str, reason: str, why: str) -> None:
        log.warning("a sync handler runs on the runner plane from now on", handler=ref, why=why, orchestrator=index)
        metrics.inline_demotions.labels(reason).inc()

    policy = InlinePolicy(
        config.planes.inline_budget_ms, demoted=ledger.read(), marker=marker, ledger=ledger, on_demote=demoted
    )
    for ref in marker.left_behind():
        policy.demote(ref, "died", "it was running inline when this orchestrator's predecessor died")
    marker.idle()
    return policy


#: How often an orchestrator reads the demotion ledger for its siblings' demotions (a file of a few lines).
DEMOTIONS_FOLLOW_S = 1.0


async def _follow_demotions(policy: InlinePolicy, index: int) -> None:
    """Learn the handlers sibling orchestrators demote while this one runs (see InlinePolicy.learn)."""
    while True:
        await asyncio.sleep(DEMOTIONS_FOLLOW_S)
        try:
            learned = policy.learn()
        except OSError as exc:  # the ledger is unreadable this time: the next read may do
            log.warning("cannot read the inline demotion ledger", error=str(exc), orchestrator=index)
            continue
        if learned:
            log.info("sync handlers demoted by another orchestrator", handlers=sorted(learned), orchestrator=index)


async def orchestrator(config: Config, index: int, config_path: str | None) -> int:
    from aobd.daemon.server import Daemon
    from aobd.metrics import merge_expositions
    from aobd.runner.remote import RemoteExecutor
    from aobd.store.factory import open_stores

    from . import paths
    from .health import ChildLink, planes_ready
    from .jobs import ZmqJobTransport
    from .shm_ir import SharedDocuments, namespace_of
    from .supervisor import accept_plane_enabled

    accept = accept_plane_enabled(config)
    stores = await open_stores(config)
    daemon = Daemon(config, stores, config_path=config_path, serve_http=not accept, serve_admin=index == 0)
    service = daemon.service
    n = orchestrator_count(config) if accept else 1
    if n > 1:
        service.owns_run = lambda run_id: paths.shard_of(run_id, n) == index
    transport = ZmqJobTransport(config, index)
    documents = SharedDocuments(namespace_of(config.data_dir))
    executor = RemoteExecutor(transport, origin=f"orch-{index}", documents=documents)
    transport.deliver = executor.deliver
    # Only these two types leave the process (wire.REMOTE_TYPES): agents, maps and composites need the live run.
    service.engine.executors["function"] = executor
    service.engine.executors["http"] = executor
    service.engine.inline_handlers = config.planes.inline_sync_handlers is not False
    following: asyncio.Task[None] | None = None
    if config.planes.inline_sync_handlers == "auto":
        policy = service.engine.inline_policy = _inline_policy(config, index, daemon.metrics)
        following = asyncio.create_task(_follow_demotions(policy, index))
    link = ChildLink(
        config, "orchestrator", index, want_health=True, on_gone=lambda g: transport.runner_gone(g.index, g.pid)
    )
    service.planes_status = lambda: {
        **link.health,
        "mode": "multi-process",
        "orchestrator": index,
        "jobs": transport.status(),
    }
    daemon.metrics.track_planes(lambda: link.health)
    if not accept:  # this orchestrator serves HTTP itself: /readyz waits for a runner as well
        service.planes_ready = lambda: planes_ready(link.health, orchestrators=False)
    own = f"orchestrator-{index}"
    link.metrics_source = lambda: daemon.metrics.render()[0]
    # The other processes' as of their last beat, this one's as of now (aobd.metrics.merge_expositions).
    service.planes_metrics = lambda accept: merge_expositions(
        [(own, daemon.metrics.render()[0]), *((n, t) for n, t in link.children_metrics.items() if n != own)], accept
    )
    await transport.start()
    link.start()
    rpc_server: Any = None
    publisher: Any = None
    watched: Any = None
    if accept:
        # Serve this Service to the accept workers, and publish committed events to the fanout plane for their
        # live streams.
        from .fanout import EventPublisher
        from .rpc import RpcServer
        from .watched import WatchedAnywhere

        rpc_server = RpcServer(service, paths.orchestrator_rpc(config, index))
        await rpc_server.start()
        watched = WatchedAnywhere.of_daemon(config)
        publisher = EventPublisher(config, watched=watched)
        service.engine.record_listeners.append(publisher)
        daemon.metrics.track_fanout(publisher)
    run = asyncio.create_task(daemon.run())
    serving = asyncio.create_task(daemon.serving.wait())
    await asyncio.wait({run, serving}, return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        link.ready = True
        await link.beat_now()
    else:
        serving.cancel()
    try:
        return await run
    finally:
        if following is not None:
            following.cancel()
        if rpc_server is not None:
            await rpc_server.close()
        if publisher is not None:
            publisher.close()
        if watched is not None:
            watched.close()
        await link.close()
        await transport.close()
        documents.close()


async def runner(config: Config, index: int) -> int:
    from .health import ChildLink
    from .jobs import RunnerLoop

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner_loop = RunnerLoop(config, index)
    link = ChildLink(config, "runner", index)
    await runner_loop.start()
    link.ready = True
    link.start()
    log.info("runner ready", index=index, credit=runner_loop.credit, orchestrators=orchestrator_count(config))
    await stop.wait()
    # The orchestrators drained first (the supervisor's order); what is left in hand finishes or is abandoned.
    await runner_loop.drain(config.daemon.drain_grace_s)
    await runner_loop.close()
    await link.close()
    log.info("runner stopped", index=index, executed=runner_loop.runner.executed)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aobd.planes.child")
    parser.add_argument("role", choices=["orchestrator", "runner", "accept", "fanout"])
    parser.add_argument("index", type=int)
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    die_with_parent()
    faulthandler.enable()
    config = load_config(args.config)
    configure_logging(json=config.daemon.log_format == "json", level=config.daemon.log_level)
    structlog.contextvars.bind_contextvars(plane=f"{args.role}-{args.index}")
    tune_gc(config.daemon.gc_thresholds)
    tune_switch_interval(config.daemon.switch_interval_ms)
    if args.role == "accept":
        from aobd.planes import accept

        return int(accept.main(config, args.index, args.config))
    if args.role == "fanout":
        from aobd.planes import fanout

        return int(fanout.main(config))
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop_runner:
        if args.role == "orchestrator":
            return loop_runner.run(orchestrator(config, args.index, args.config))
        return loop_runner.run(runner(config, args.index))


if __name__ == "__main__":
    sys.exit(main())
