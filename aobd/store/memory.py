"""Complete in-memory backends: the executable reference of the store contract.

``MemoryEventLog`` and ``MemoryCas`` keep everything in dicts and lose it on exit; they are what unit tests
use and what the other backends must agree with (``tests/unit/test_store_contract.py`` runs the same suite
over all of them). The append checks shared by every event log live here too, so that the rules are written
down once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence

import msgspec

from aobd.errors import ConflictError, IntegrityError, NotFound, StoreError
from aobd.store.protocols import TERMINAL_STATUSES, EventRecord, RunIndex, RunInfo, cas_ref

#: Status of a run whose appends never named one (its first event starts it).
DEFAULT_STATUS = "running"
#: Workspace of a run whose appends never named one.
DEFAULT_WORKSPACE = "default"

_HEX = frozenset("0123456789abcdef")


def validate_append(run_id: str, records: Sequence[EventRecord]) -> None:
    """Reject an append that no store could accept, whatever the run's state.

    Raises:
        ValueError: ``records`` is empty, names another run, or its seqs are not consecutive.
    """
    if not records:
        raise ValueError(f"append to run {run_id!r} has no records")
    expected = records[0].seq
    for record in records:
        if record.run_id != run_id:
            raise ValueError(f"append to run {run_id!r} holds a record of run {record.run_id!r}")
        if record.seq != expected:
            raise ValueError(
                f"append to run {run_id!r} has seq {record.seq} where {expected} was expected "
                "(the records of one append must have consecutive seqs)"
            )
        expected += 1


def conflict(run_id: str, first_seq: int, last_seq: int) -> ConflictError:
    """The error of an append whose first seq does not follow the run's last stored seq."""
    return ConflictError(
        f"run {run_id!r}: append starts at seq {first_seq} but the last stored seq is {last_seq} "
        f"(expected {last_seq + 1}); another writer appended first or this writer's view is stale",
        details=[{"run_id": run_id, "seq": first_seq, "last_seq": last_seq}],
    )


def settle_append(future: asyncio.Future[None], outcome: Exception | None) -> None:
    """Resolve a queued append's future with its outcome (None: committed), unless its caller gave up waiting."""
    if future.done():  # the caller was cancelled
        return
    if outcome is None:
        future.set_result(None)
    else:
        future.set_exception(outcome)


def parse_ref(ref: str) -> str:
    """The hex digest of a CAS ref.

    Raises:
        NotFound: ``ref`` is not ``sha256:`` and 64 lowercase hex digits, so it names no blob. Checked
            strictly because file-backed stores build paths from it.
    """
    digest = ref[7:] if ref.startswith("sha256:") else ""
    if len(digest) != 64 or not _HEX.issuperset(digest):
        raise NotFound(f"{ref!r} is not a CAS ref (expected 'sha256:' and 64 lowercase hex digits)")
    return digest


class MemoryEventLog:
    """An :class:`~aobd.store.protocols.EventLog` in process memory."""

    def __init__(self) -> None:
        self._events: dict[str, list[EventRecord]] = {}
        # Insertion order breaks ties between runs created at the same ts, as rowid does in SQLite.
        self._runs: dict[str, RunInfo] = {}
        self._closed = False

    async def append(self, run_id: str, records: Sequence[EventRecord], *, index: RunIndex | None = None) -> None:
        self._check_open()
        validate_append(run_id, records)
        events = self._events.get(run_id)
        last_seq = len(events) if events else 0
        first, final = records[0], records[-1]
        if first.seq != last_seq + 1:
            raise conflict(run_id, first.seq, last_seq)
        idx = index or RunIndex()
        info = self._runs.get(run_id)
        if info is None:
            self._events[run_id] = list(records)
            self._runs[run_id] = RunInfo(
                run_id=run_id,
                workflow=idx.workflow or "",
                status=idx.status or DEFAULT_STATUS,
                created_at=first.ts,
                updated_at=final.ts,
                last_seq=final.seq,
                parent_run_id=idx.parent_run_id,
                workspace=idx.workspace or DEFAULT_WORKSPACE,
            )
            return
        assert events is not None
        events.extend(records)
        self._runs[run_id] = msgspec.structs.replace(
            info,
            workflow=info.workflow if idx.workflow is None else idx.workflow,
            status=info.status if idx.status is None else idx.status,
            parent_run_id=info.parent_run_id if idx.parent_run_id is None else idx.parent_run_id,
            workspace=info.workspace if idx.workspace is None else idx.workspace,
            updated_at=final.ts,
            last_seq=final.seq,
        )

    async def read(self, run_id: str, after_seq: int = 0, limit: int | None = None) -> list[EventRecord]:
        self._check_open()
        events = self._events.get(run_id, [])
        # Seqs are 1..n with no gaps, so seq s sits at index s - 1.
        start = max(after_seq, 0)
        stop = len(events) if limit is None else min(len(events), start + max(limit, 0))
        return events[start:stop]

    async def last_seq(self, run_id: str) -> int:
        self._check_open()
        return len(self._events.get(run_id, ()))

    async def get_run(self, run_id: str) -> RunInfo | None:
        self._check_open()
        return self._runs.get(run_id)

    async def list_runs(
        self, *, status: str | None = None, workspace: str | None = None, limit: int = 1000
    ) -> list[RunInfo]:
        self._check_open()
        selected = [
            (info.created_at, order, info)
            for order, info in enumerate(self._runs.values())
            if status in (None, info.status) and workspace in (None, info.workspace)
        ]
        selected.sort(key=lambda item: item[:2], reverse=True)
        return [info for _, _, info in selected[: max(limit, 0)]]

    async def unfinished_runs(self, *, partitions: Collection[int] | None = None) -> list[str]:
        self._check_open()  # partitions: this store records none, so it lists every run (see the protocol)
        selected = [
            (info.created_at, order, info.run_id)
            for order, info in enumerate(self._runs.values())
            if info.status not in TERMINAL_STATUSES
        ]
        selected.sort(key=lambda item: item[:2])
        return [run_id for _, _, run_id in selected]

    async def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the in-memory event log is closed")


class MemoryCas:
    """A :class:`~aobd.store.protocols.Cas` in process memory; ``get`` still verifies what it returns."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}
        self._closed = False

    async def put(self, data: bytes) -> str:
        self._check_open()
        ref = cas_ref(data)
        self._blobs.setdefault(ref, bytes(data))
        return ref

    async def put_many(self, blobs: Sequence[bytes]) -> list[str]:
        self._check_open()
        refs = []
        for data in blobs:
            ref = cas_ref(data)
            self._blobs.setdefault(ref, bytes(data))
            refs.append(ref)
        return refs

    async def get(self, ref: str) -> bytes:
        self._check_open()
        parse_ref(ref)
        data = self._blobs.get(ref)
        if data is None:
            raise NotFound(f"blob {ref} is not in the CAS")
        if cas_ref(data) != ref:
            raise IntegrityError(f"blob {ref} is corrupt: its content hashes to {cas_ref(data)}")
        return data

    async def has(self, ref: str) -> bool:
        self._check_open()
        return ref in self._blobs

    async def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the in-memory CAS is closed")
