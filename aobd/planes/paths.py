"""Where each plane's sockets are, and which orchestrator owns a run. One place, so every role agrees."""

from __future__ import annotations

from pathlib import Path

import xxhash

from aobd.config import Config


def socket_dir(config: Config) -> Path:
    return Path(config.planes.socket_dir or Path(config.data_dir) / "planes")


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


def shard_of(run_id: str, orchestrators: int) -> int:
    """The orchestrator that drives ``run_id`` (stable across restarts: a hash of the id, not of the process)."""
    if orchestrators <= 1:
        return 0
    return xxhash.xxh3_64_intdigest(run_id.encode()) % orchestrators
