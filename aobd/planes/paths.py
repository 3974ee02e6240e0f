"""Where each plane's sockets are, and which orchestrator owns a run. One place, so every role agrees."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import xxhash

from aobd.config import Config

#: sockaddr_un.sun_path is 108 bytes on Linux (107 characters and a NUL); "orch-NNN.jobs" and friends need ~16 more.
MAX_SOCKET_PATH = 107
_LONGEST_NAME = "orch-9999.jobs"


def socket_dir(config: Config) -> Path:
    """The directory of the planes' ipc sockets: ``planes.socket_dir``, else ``<data_dir>/planes``.

    A unix socket path longer than :data:`MAX_SOCKET_PATH` cannot be bound, and deep data directories (CI
    workspaces, pytest's tmp_path) exceed it. Then the sockets go to ``$XDG_RUNTIME_DIR`` (or the temporary
    directory) under ``aobd-<hash of the resolved data_dir>``: every process of one daemon computes the same
    name, and two daemons with different data directories never share one.
    """
    wanted = Path(config.planes.socket_dir) if config.planes.socket_dir else Path(config.data_dir) / "planes"
    wanted = wanted.resolve()
    if len(str(wanted / _LONGEST_NAME)) <= MAX_SOCKET_PATH:
        return wanted
    digest = hashlib.sha256(str(wanted).encode()).hexdigest()[:16]
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"aobd-{digest}"


def ensure_socket_dir(config: Config) -> Path:
    """Create the socket directory, private to this user (the sockets carry jobs and the daemon's health)."""
    path = socket_dir(config)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _ipc(config: Config, name: str) -> str:
    return f"ipc://{socket_dir(config) / name}"


def orchestrator_jobs(config: Config, index: int) -> str:
    """The orchestrator's ROUTER that runners connect to: jobs out, outcomes and heartbeats in."""
    return _ipc(config, f"orch-{index}.jobs")


def orchestrator_rpc(config: Config, index: int) -> str:
    """The orchestrator's ROUTER that accept workers call the Service through."""
    return _ipc(config, f"orch-{index}.rpc")


def fanout_in(config: Config) -> str:
    """The fanout plane's XSUB: orchestrators publish committed events here."""
    return _ipc(config, "fanout.in")


def fanout_out(config: Config) -> str:
    """The fanout plane's XPUB: accept workers subscribe to run events here."""
    return _ipc(config, "fanout.out")


def supervisor(config: Config) -> str:
    """The supervisor's ROUTER: children's heartbeats in, health queries answered."""
    return _ipc(config, "supervisor")


def rate_limits(config: Config) -> Path:
    """The file the accept workers share their rate-limit buckets in (:mod:`aobd.planes.ratelimit`)."""
    return socket_dir(config) / "rate-limits"


def watched_runs(config: Config, index: int) -> Path:
    """Accept worker ``index``'s table of the runs its live streams follow (:mod:`aobd.planes.watched`)."""
    return socket_dir(config) / f"watched-runs-{index}"


def shard_of(run_id: str, orchestrators: int) -> int:
    """The orchestrator that drives ``run_id`` (stable across restarts: a hash of the id, not of the process)."""
    if orchestrators <= 1:
        return 0
    return xxhash.xxh3_64_intdigest(run_id.encode()) % orchestrators
