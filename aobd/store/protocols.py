"""The small storage interfaces every backend implements.

Each interface has an embedded default (SQLite, a local directory) and, in later issues, a scale-out backend
(Postgres, S3). One contract test suite (``tests/unit/test_store_contract.py``) runs over every backend.
Backends store events as opaque encoded records: the event schema lives in ``aobd.model.events`` and the
store never interprets payloads beyond the run index fields handed to it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from typing import Protocol

import msgspec


class EventRecord(msgspec.Struct, frozen=True, array_like=True):
    """One stored event: its position in the run, its type name, and the encoded event (JSON bytes)."""

    run_id: str
    seq: int
    type: str
    ts: float
    data: bytes


class RunIndex(msgspec.Struct, frozen=True, omit_defaults=True):
    """Index fields of a run kept beside its events so runs can be listed without folding them.

    Passed with an append; ``None`` fields leave the stored value unchanged.
    """

    workflow: str | None = None
    status: str | None = None
    parent_run_id: str | None = None
    workspace: str | None = None


class RunInfo(msgspec.Struct, frozen=True):
    run_id: str
    workflow: str
    status: str
    created_at: float
    updated_at: float
    last_seq: int
    parent_run_id: str | None = None
    workspace: str = "default"


#: Run statuses after which a run never changes again.
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})


class EventLog(Protocol):
    """Append-only, per-run ordered event log with an optimistic concurrency guard."""

    async def append(self, run_id: str, records: Sequence[EventRecord], *, index: RunIndex | None = None) -> None:
        """Append ``records`` (consecutive seqs) atomically.

        Raises:
            ConflictError: the run's last stored seq is not ``records[0].seq - 1`` (another writer appended
                first, or this writer's view is stale). Nothing of this append is stored.
        """
        ...

    async def read(self, run_id: str, after_seq: int = 0, limit: int | None = None) -> list[EventRecord]:
        """Events of ``run_id`` with seq > ``after_seq``, in seq order."""
        ...

    async def last_seq(self, run_id: str) -> int:
        """The highest stored seq of the run, 0 when it has none."""
        ...

    async def get_run(self, run_id: str) -> RunInfo | None: ...

    async def list_runs(
        self, *, status: str | None = None, workspace: str | None = None, limit: int = 1000
    ) -> list[RunInfo]:
        """Runs, newest first."""
        ...

    async def unfinished_runs(self, *, partitions: Collection[int] | None = None) -> list[str]:
        """Ids of runs whose status is not terminal, oldest first (what ``aobd resume`` finishes).

        ``partitions`` narrows the listing for a cluster's daemon, as far as the store can: a store that records
        each run's partition (Postgres, once told ``partition_of``) leaves out runs recorded under other
        partitions; runs recorded without one, and every run of other stores, are listed regardless. So the
        caller still checks each id's partition.
        """
        ...

    async def close(self) -> None: ...


class Cas(Protocol):
    """Content-addressed blob store; refs are ``sha256:<hex>`` and every read is verified."""

    async def put(self, data: bytes) -> str:
        """Store ``data`` durably (before returning) and return its ref. Idempotent."""
        ...

    async def put_many(self, blobs: Sequence[bytes]) -> list[str]:
        """Store several blobs with the durability cost paid once where the backend allows."""
        ...

    async def get(self, ref: str) -> bytes:
        """The blob; NotFound if absent, IntegrityError if its content does not hash to ``ref``."""
        ...

    async def has(self, ref: str) -> bool: ...

    async def close(self) -> None: ...


def cas_ref(data: bytes) -> str:
    """The CAS ref of ``data``: ``sha256:`` and the hex digest."""
    return "sha256:" + hashlib.sha256(data).hexdigest()
