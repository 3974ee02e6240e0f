"""Metadata beside the event log: the workflow registry, run-start idempotency keys, CAS ownership.

Embedded default: one SQLite file (``meta.db``, WAL, synchronous=FULL). Calls are few and small (a workflow
put, a run start), so each runs in a worker thread on one connection guarded by a lock; the hot path (node
completions) never touches this store except through the batched CAS-ownership writer.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import msgspec

from aobd.store.owners import OwnerBuffer

SCHEMA = """
CREATE TABLE IF NOT EXISTS workflow_versions (
    workspace TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    doc_ref TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (workspace, name, version)
);
CREATE TABLE IF NOT EXISTS workflow_tags (
    workspace TEXT NOT NULL,
    name TEXT NOT NULL,
    tag TEXT NOT NULL,
    version TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (workspace, name, tag)
);
CREATE TABLE IF NOT EXISTS idempotency (
    workspace TEXT NOT NULL,
    key TEXT NOT NULL,
    run_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (workspace, key)
);
CREATE TABLE IF NOT EXISTS cas_owners (
    ref TEXT NOT NULL,
    workspace TEXT NOT NULL,
    PRIMARY KEY (ref, workspace)
) WITHOUT ROWID;
"""


class WorkflowVersion(msgspec.Struct, frozen=True):
    workspace: str
    name: str
    version: str
    doc_ref: str
    created_at: float


class WorkflowEntry(msgspec.Struct, frozen=True):
    workspace: str
    name: str
    latest_version: str
    tags: dict[str, str]
    versions: list[str]
    updated_at: float


class MetaStore(Protocol):
    async def put_workflow(self, workspace: str, name: str, version: str, doc_ref: str, tag: str | None) -> None: ...

    async def resolve_workflow(self, workspace: str, name: str, tag: str | None = None) -> WorkflowVersion | None: ...

    async def list_workflows(self, workspace: str) -> list[WorkflowEntry]: ...

    async def claim_idempotency(self, workspace: str, key: str, run_id: str) -> str | None:
        """Record ``key -> run_id`` unless the key is taken; returns the run id that already holds it."""
        ...

    def own_refs(self, workspace: str, refs: Iterable[str]) -> None:
        """Note that ``workspace`` may read these CAS refs (batched, written in the background)."""
        ...

    async def owns_ref(self, workspace: str, ref: str) -> bool: ...

    async def close(self) -> None: ...


class SqliteMetaStore:
    """The embedded MetaStore."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._owners = OwnerBuffer()
        self._flush_task: asyncio.Task[None] | None = None
        self._closed = False

    def _run(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    def _tx(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    self._conn.execute(sql, params)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    async def put_workflow(self, workspace: str, name: str, version: str, doc_ref: str, tag: str | None) -> None:
        now = time.time()
        statements = [
            (
                "INSERT OR IGNORE INTO workflow_versions VALUES (?, ?, ?, ?, ?)",
                (workspace, name, version, doc_ref, now),
            ),
            ("INSERT OR REPLACE INTO workflow_tags VALUES (?, ?, 'latest', ?, ?)", (workspace, name, version, now)),
        ]
        if tag and tag != "latest":
            statements.append(
                ("INSERT OR REPLACE INTO workflow_tags VALUES (?, ?, ?, ?, ?)", (workspace, name, tag, version, now))
            )
        await asyncio.to_thread(self._tx, statements)

    async def resolve_workflow(self, workspace: str, name: str, tag: str | None = None) -> WorkflowVersion | None:
        def query() -> WorkflowVersion | None:
            rows = self._run(
                "SELECT v.workspace, v.name, v.version, v.doc_ref, v.created_at FROM workflow_tags t "
                "JOIN workflow_versions v ON v.workspace = t.workspace AND v.name = t.name AND v.version = t.version "
                "WHERE t.workspace = ? AND t.name = ? AND t.tag = ?",
                (workspace, name, tag or "latest"),
            )
            if not rows and tag and tag.startswith("sha256:"):
                rows = self._run(
                    "SELECT workspace, name, version, doc_ref, created_at FROM workflow_versions "
                    "WHERE workspace = ? AND name = ? AND version = ?",
                    (workspace, name, tag),
                )
            return WorkflowVersion(*rows[0]) if rows else None

        return await asyncio.to_thread(query)

    async def list_workflows(self, workspace: str) -> list[WorkflowEntry]:
        def query() -> list[WorkflowEntry]:
            tags: dict[str, dict[str, str]] = {}
            updated: dict[str, float] = {}
            for name, tag, version, at in self._run(
                "SELECT name, tag, version, updated_at FROM workflow_tags WHERE workspace = ? ORDER BY name",
                (workspace,),
            ):
                tags.setdefault(name, {})[tag] = version
                updated[name] = max(updated.get(name, 0.0), at)
            versions: dict[str, list[str]] = {}
            for name, version in self._run(
                "SELECT name, version FROM workflow_versions WHERE workspace = ? ORDER BY created_at", (workspace,)
            ):
                versions.setdefault(name, []).append(version)
            return [
                WorkflowEntry(workspace, name, tags[name]["latest"], tags[name], versions.get(name, []), updated[name])
                for name in sorted(tags)
            ]

        return await asyncio.to_thread(query)

    async def claim_idempotency(self, workspace: str, key: str, run_id: str) -> str | None:
        def claim() -> str | None:
            with self._lock:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    row = self._conn.execute(
                        "SELECT run_id FROM idempotency WHERE workspace = ? AND key = ?", (workspace, key)
                    ).fetchone()
                    if row is None:
                        self._conn.execute(
                            "INSERT INTO idempotency VALUES (?, ?, ?, ?)", (workspace, key, run_id, time.time())
                        )
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            return None if row is None else str(row[0])

        return await asyncio.to_thread(claim)

    def own_refs(self, workspace: str, refs: Iterable[str]) -> None:
        if self._owners.add(workspace, refs) and self._flush_task is None and not self._closed:
            # One background write per burst of events: ownership is needed only when someone reads a blob.
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(0.05)
            await self.flush_refs()
        finally:
            self._flush_task = None

    async def flush_refs(self) -> None:
        batch = self._owners.take()
        if not batch:
            return
        stored = False
        try:
            await asyncio.to_thread(
                self._tx, [("INSERT OR IGNORE INTO cas_owners VALUES (?, ?)", row) for row in batch]
            )
            stored = True
        finally:
            self._owners.done(batch, stored=stored)

    async def owns_ref(self, workspace: str, ref: str) -> bool:
        if self._owners.holds(workspace, ref):
            return True
        rows = await asyncio.to_thread(
            self._run, "SELECT 1 FROM cas_owners WHERE ref = ? AND workspace = ?", (ref, workspace)
        )
        return bool(rows)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._flush_task is not None:
            await asyncio.gather(self._flush_task, return_exceptions=True)
        await self.flush_refs()
        with self._lock:
            self._conn.close()
