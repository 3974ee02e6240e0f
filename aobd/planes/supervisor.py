"""``aobd serve``: the supervisor of the multi-process daemon.

It starts each child as ``python -m aobd.planes.child ROLE INDEX [--config PATH]`` (same interpreter, same
environment), pins each process group to its cores, restarts a child that exits with a backoff, keeps the health
table (pid, state, restarts, last heartbeat, uptime) that orchestrators serve in ``/v1/admin/status`` and
``/metrics``, tells systemd READY once every child reported ready, and drains in order on SIGTERM: the control
plane first (its in-flight attempts still need runners), then the runners, then the fanout plane.

The supervisor holds no run state and opens no store: a crash of any child loses nothing that the event log
does not have, and the supervisor's own work is small enough that it should not crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
import zmq
import zmq.asyncio

from aobd import __version__
from aobd.config import Config, orchestrator_count
from aobd.daemon.sdnotify import Notifier

from . import health, paths, shm_ir
from .inline_marker import forget_demotions

log = structlog.get_logger("aobd.planes.supervisor")

#: A child that stayed up this long had a good run: its next crash restarts after the initial backoff again.
STABLE_AFTER_S = 30.0
#: An up child silent this long is hung (a blocked event loop): it is killed and restarted.
HUNG_AFTER_S = 30.0
#: How long an orchestrator may take to resume its runs before the next one starts anyway.
STARTUP_TIMEOUT_S = 60.0
#: Drain order: each phase is signalled and awaited before the next one.
DRAIN_PHASES: tuple[tuple[str, ...], ...] = (("accept", "orchestrator"), ("runner",), ("fanout",))


# ---------------------------------------------------------------------------------------------- pure policy


@dataclass(slots=True)
class Backoff:
    """Restart delays: ``initial`` doubling up to ``maximum``; reset once a child stayed up ``stable_after`` s."""

    initial: float
    maximum: float
    stable_after: float = STABLE_AFTER_S
    _next: float = 0.0

    def after_exit(self, uptime_s: float) -> float:
        """The delay before restarting a child that exited after ``uptime_s`` seconds up."""
        if uptime_s >= self.stable_after or self._next <= 0:
            self._next = self.initial
        delay = self._next
        self._next = min(self.maximum, self._next * 2)
        return delay


@dataclass(frozen=True, slots=True)
class ChildSpec:
    role: str
    index: int
    cpus: tuple[int, ...] = ()


def accept_plane_enabled(config: Config) -> bool:
    """HTTP is served by accept workers (each call routed to its shard's orchestrator) when
    ``planes.accept_workers > 0``; with 0, orchestrator 0 serves the API and the admin socket itself, exactly
    as ``--single-process`` does, and is the only orchestrator."""
    return config.planes.accept_workers > 0


def plan(config: Config) -> list[ChildSpec]:
    """The children of this configuration, in start order."""
    p = config.planes
    control, runner, fanout = tuple(p.control_cpus), tuple(p.runner_cpus), tuple(p.fanout_cpus)
    accept = accept_plane_enabled(config)
    # Without accept workers there is nobody to route a call to another shard: one orchestrator owns every run.
    orchestrators = orchestrator_count(config) if accept else 1
    children = [ChildSpec("orchestrator", i, control) for i in range(orchestrators)]
    children += [ChildSpec("runner", i, runner) for i in range(p.runners)]
    if accept:
        children.append(ChildSpec("fanout", 0, fanout))
        children += [ChildSpec("accept", i, control) for i in range(p.accept_workers)]
    return children


# ---------------------------------------------------------------------------------------------- processes


@dataclass(slots=True)
class Child:
    spec: ChildSpec
    backoff: Backoff
    proc: asyncio.subprocess.Process | None = None
    state: str = "starting"  # starting | up | backoff | stopping | stopped
    ready: bool = False
    restarts: int = 0
    started_at: float = 0.0
    last_beat: float = 0.0
    exit_code: int | None = None
    cpus_applied: list[int] = field(default_factory=list)
    identity: bytes = b""
    became_ready: asyncio.Event = field(default_factory=asyncio.Event)
    #: Its metrics exposition as of its last beat (b"": it sends none).
    metrics: bytes = b""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    def view(self, now: float) -> dict[str, Any]:
        return {
            "role": self.spec.role,
            "index": self.spec.index,
            "pid": self.pid,
            "state": self.state,
            "ready": self.ready,
            "restarts": self.restarts,
            "uptime_s": round(now - self.started_at, 3) if self.pid else 0.0,
            "last_heartbeat_s": round(now - self.last_beat, 3) if self.last_beat else None,
            "exit_code": self.exit_code,
            "cpus": self.cpus_applied,
        }


class Supervisor:
    def __init__(self, config: Config, config_path: str | None, *, env: dict[str, str] | None = None) -> None:
        # Resolved here, once: a child counting its own CPUs would see only those it is pinned to.
        orchestrators = orchestrator_count(config)
        planes = msgspec.structs.replace(config.planes, orchestrators=orchestrators)
        config = msgspec.structs.replace(config, planes=planes)
        self.config = config
        self.config_path = config_path
        self.env = dict(os.environ if env is None else env)
        self.env["AOBD_PLANES_ORCHESTRATORS"] = str(orchestrators)
        p = config.planes
        self.children = [Child(spec, Backoff(p.restart_backoff_s, p.restart_backoff_max_s)) for spec in plan(config)]
        self.started_at = time.time()
        # The children must not notify systemd in the supervisor's name: the variables leave os.environ here.
        self.notifier = Notifier(unset_environment=True)
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            self.env.pop(key, None)
        self._stopping = asyncio.Event()
        self._ready_sent = False
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    def snapshot(self) -> dict[str, Any]:
        """The health table: what ``/v1/admin/status`` shows under ``planes``."""
        now = time.time()
        return {
            "mode": "multi-process",
            "supervisor_pid": os.getpid(),
            "uptime_s": round(now - self.started_at, 3),
            "accept_plane": accept_plane_enabled(self.config),
            "children": [c.view(now) for c in self.children],
        }

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward_hup)
        paths.ensure_socket_dir(self.config)
        # A new daemon trusts every handler again (a deploy may have fixed the slow ones): see inline_policy.
        forget_demotions(self.config)
        sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(paths.supervisor(self.config))
        self._sock = sock
        log.info(
            "supervisor starting",
            version=__version__,
            children=[f"{c.spec.role}-{c.spec.index}" for c in self.children],
        )
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._watch_hung())]
        interval = self.notifier.watchdog_interval()
        if interval:
            self._tasks.append(asyncio.create_task(self._watchdog(interval)))
        keepers = []
        for child in self.children:
            keepers.append(asyncio.create_task(self._keep(child)))
            if child.spec.role == "orchestrator":
                # One at a time: orchestrators opening the same SQLite stores at once race on their schema
                # setup ("database is locked"); the next starts once this one has resumed its runs.
                await self._first_ready(child)
        await self._stopping.wait()
        code = await self._drain()
        for task in [*keepers, *self._tasks]:
            task.cancel()
        await asyncio.gather(*keepers, *self._tasks, return_exceptions=True)
        sock.close(linger=0)
        # Shared-memory segments outlive their creators: the daemon as a whole owns them (aobd.planes.shm_ir).
        shm_ir.cleanup(shm_ir.namespace_of(self.config.data_dir))
        log.info("supervisor stopped", code=code)
        return code

    # ------------------------------------------------------------------ children

    async def _first_ready(self, child: Child) -> None:
        waits = {asyncio.create_task(child.became_ready.wait()), asyncio.create_task(self._stopping.wait())}
        _, pending = await asyncio.wait(waits, timeout=STARTUP_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()

    def _argv(self, spec: ChildSpec) -> list[str]:
        argv = [sys.executable, "-m", "aobd.planes.child", spec.role, str(spec.index)]
        return argv + (["--config", self.config_path] if self.config_path else [])

    async def _keep(self, child: Child) -> None:
        """Start the child, and start it again after each exit until the daemon stops."""
        while not self._stopping.is_set():
            child.state, child.ready, child.last_beat, child.exit_code = "starting", False, 0.0, None
            child.metrics = b""  # a new process counts from zero
            # A session of its own: a terminal's Ctrl-C or a signal to the process group reaches the supervisor
            # only, which then drains in order (children die with it anyway: PR_SET_PDEATHSIG in child.py).
            child.proc = await asyncio.create_subprocess_exec(
                *self._argv(child.spec), env=self.env, start_new_session=True
            )
            child.started_at = time.time()
            self._pin(child)
            code = await child.proc.wait()
            child.exit_code = code
            uptime = time.time() - child.started_at
            self._announce_gone(child, child.proc.pid)
            if self._stopping.is_set():
                break
            if child.spec.role == "orchestrator" and code == 0:
                # A clean exit nobody asked the supervisor for is `aobctl drain` on the admin socket: stop all.
                log.info("orchestrator drained on request; stopping the daemon", index=child.spec.index)
                self._stopping.set()
                break
            delay = child.backoff.after_exit(uptime)
            child.state = "backoff"
            log.warning(
                "child exited; restarting",
                role=child.spec.role,
                index=child.spec.index,
                code=code,
                uptime_s=round(uptime, 3),
                restart_in_s=delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if not self._stopping.is_set():
                child.restarts += 1
        child.state = "stopped"

    def _pin(self, child: Child) -> None:
        """Apply the group's cores right after the spawn, before the child starts threads (they inherit it)."""
        assert child.proc is not None
        if not child.spec.cpus:
            return
        pid = child.proc.pid
        try:
            os.sched_setaffinity(pid, child.spec.cpus)
            child.cpus_applied = sorted(os.sched_getaffinity(pid))
        except OSError as exc:
            log.error("could not pin child", role=child.spec.role, pid=pid, cpus=child.spec.cpus, error=str(exc))
            return
        if set(child.cpus_applied) != set(child.spec.cpus):
            log.error("child affinity differs", role=child.spec.role, wanted=child.spec.cpus, got=child.cpus_applied)

    def _forward_hup(self) -> None:
        for child in self.children:
            if child.pid is not None and child.spec.role in ("orchestrator", "accept"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGHUP)

    async def _drain(self) -> int:
        self.notifier.stopping()
        grace = self.config.daemon.drain_grace_s + 10.0
        for roles in DRAIN_PHASES:
            phase = [c for c in self.children if c.spec.role in roles]
            for child in phase:
                child.state = "stopping"
                if child.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGTERM)
            for child in phase:
                await self._reap(child, grace)
        failed = [c for c in self.children if c.exit_code not in (0, None)]
        return 1 if failed else 0

    async def _reap(self, child: Child, grace: float) -> None:
        proc = child.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            log.error("child did not drain in time; killing it", role=child.spec.role, pid=proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        child.exit_code = proc.returncode

    # ------------------------------------------------------------------ heartbeats and health

    def _find(self, beat: health.ChildBeat) -> Child | None:
        for child in self.children:
            if child.spec.role == beat.role and child.spec.index == beat.index:
                return child if child.pid == beat.pid else None  # a beat of a process already replaced
        return None

    async def _receive(self) -> None:
        assert self._sock is not None
        while True:
            identity, kind, payload = await self._sock.recv_multipart()
            if kind != health.BEAT:
                continue
            try:
                beat = health.beat_decoder.decode(payload)
            except msgspec.DecodeError:
                continue
            child = self._find(beat)
            if child is None:
                continue
            child.identity = identity
            child.last_beat = time.time()
            if child.state == "starting":
                child.state = "up"
            child.ready = beat.ready
            if beat.ready:
                child.became_ready.set()
            child.metrics = beat.metrics
            if beat.want_health:
                frames = [identity, health.HEALTH, health.encoder.encode(self.snapshot())]
                if child.spec.role == "orchestrator":  # they merge the daemon's /metrics; accept workers ask them
                    metrics = {f"{c.spec.role}-{c.spec.index}": c.metrics for c in self.children if c.metrics}
                    frames.append(health.encoder.encode(metrics))
                await self._sock.send_multipart(frames)
            self._maybe_ready()

    def _maybe_ready(self) -> None:
        if not self._ready_sent and all(c.ready for c in self.children):
            self._ready_sent = True
            pids = {f"{c.spec.role}-{c.spec.index}": c.pid for c in self.children}
            log.info("aobd ready (multi-process)", listen=self.config.api.listen, children=pids)
            self.notifier.ready(f"serving on {self.config.api.listen}; {len(self.children)} children")

    def _announce_gone(self, child: Child, pid: int) -> None:
        """Tell the orchestrators that a runner process is gone: they re-send its jobs without waiting."""
        if child.spec.role != "runner" or self._sock is None:
            return
        notice = health.encoder.encode(health.ChildGone(child.spec.role, child.spec.index, pid))
        for other in self.children:
            if other.spec.role == "orchestrator" and other.identity:
                with contextlib.suppress(zmq.ZMQError):
                    self._sock.send_multipart([other.identity, health.GONE, notice], flags=zmq.NOBLOCK)

    async def _watch_hung(self) -> None:
        while True:
            await asyncio.sleep(HUNG_AFTER_S / 6)
            now = time.time()
            for child in self.children:
                if child.state == "up" and child.pid is not None and now - child.last_beat > HUNG_AFTER_S:
                    log.error("child stopped heartbeating; killing it", role=child.spec.role, pid=child.pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGKILL)

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)


def serve(config: Config, config_path: str | None, overrides: dict[str, Any] | None = None) -> int:
    """Run the supervisor until SIGTERM; the command-line overrides reach the children as ``AOBD_*`` variables."""
    import uvloop

    from aobd.config import _ENV

    env = dict(os.environ)
    by_key = {key: name for name, (key, _) in _ENV.items()}
    for key, value in (overrides or {}).items():
        if value is not None and key in by_key:
            env[by_key[key]] = str(value)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(Supervisor(config, config_path, env=env).run())
