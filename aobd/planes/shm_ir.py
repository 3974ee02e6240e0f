"""Validated workflow documents in shared memory, by content: published once, read by every process.

A run's IR is a pure function of its materialized document, whose version (``sha256:<hex>`` of the canonical
JSON) already names it: a patched run has a new version, so a name derived from it can never serve stale content
and needs no invalidation. :class:`SharedDocuments` publishes the *validated* document (msgpack) into a
``multiprocessing.shared_memory`` segment named ``<namespace>-<hex prefix>``; other processes read it and compile
their IR without parsing and validating the document again. Compiled IRs hold Python objects (compiled JMESPath
expressions), which cannot live in shared memory; the document is the expensive-to-validate, cheap-to-share part.

Segment layout: an 8-byte little-endian length, then the msgpack bytes. The length is written last, so a reader
that opens a segment still being written sees length 0 and treats it as absent (it then compiles on its own).

Lifetime: segments outlive the processes that created them (POSIX shm), so the supervisor removes every segment
of its namespace on shutdown (:func:`cleanup`). Python's resource tracker would unlink a segment when *any*
process that touched it exits; it is told to forget each one, since ownership belongs to the daemon as a whole.

Use: an orchestrator's :class:`aobd.runner.remote.RemoteExecutor` publishes each run's current document
version before its first job naming it; jobs then carry ``(version, node_id)`` instead of the node, and runners
(:class:`aobd.runner.worker.Runner`) decode each node once per version. See docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import Any

import msgspec

_HEADER = struct.Struct("<Q")
_SHM_DIR = Path("/dev/shm")


def namespace_of(data_dir: str) -> str:
    """A short prefix per daemon (its data directory), so two daemons on one host never share segments."""
    return "aobd" + hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:8]


def _untrack(shm: shared_memory.SharedMemory) -> None:
    with contextlib.suppress(Exception):
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]


def _buffer(shm: shared_memory.SharedMemory) -> memoryview:
    buf = shm.buf
    assert buf is not None  # None only after close()
    return buf


class SharedDocuments:
    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._open: dict[str, shared_memory.SharedMemory] = {}
        self.published = 0
        self.reads = 0

    def name_of(self, version: str) -> str:
        # POSIX shm names are short on some systems (31 on macOS); 24 hex characters of a sha256 are plenty.
        return f"{self.namespace}-{version.removeprefix('sha256:')[:24]}"

    def publish(self, version: str, document: dict[str, Any]) -> bool:
        """Publish ``document`` under ``version``; False when it was there already (content-addressed: same bytes)."""
        data = msgspec.msgpack.encode(document)
        try:
            shm = shared_memory.SharedMemory(self.name_of(version), create=True, size=_HEADER.size + len(data))
        except FileExistsError:
            return False
        _untrack(shm)
        buf = _buffer(shm)
        buf[_HEADER.size : _HEADER.size + len(data)] = data
        buf[: _HEADER.size] = _HEADER.pack(len(data))
        self._open[version] = shm
        self.published += 1
        return True

    def get(self, version: str) -> dict[str, Any] | None:
        """The document published under ``version``, or None (not published, or still being written)."""
        shm = self._open.get(version)
        if shm is None:
            try:
                shm = shared_memory.SharedMemory(self.name_of(version))
            except FileNotFoundError:
                return None
            _untrack(shm)
        buf = _buffer(shm)
        (length,) = _HEADER.unpack(buf[: _HEADER.size])
        if length == 0:
            shm.close()
            return None
        self._open[version] = shm
        self.reads += 1
        document: dict[str, Any] = msgspec.msgpack.decode(buf[_HEADER.size : _HEADER.size + length])
        return document

    def node(self, version: str, node_id: str) -> dict[str, Any] | None:
        """One node of a published document: what a job naming ``(version, node_id)`` would run."""
        document = self.get(version)
        if document is None:
            return None
        return next((n for n in document.get("nodes", []) if n.get("id") == node_id), None)

    def close(self) -> None:
        """Detach this process's mappings (the segments stay for the others)."""
        for shm in self._open.values():
            with contextlib.suppress(BufferError):
                shm.close()
        self._open.clear()


def cleanup(namespace: str) -> int:
    """Remove every segment of ``namespace`` (the supervisor, on shutdown). Returns how many were removed."""
    removed = 0
    if not _SHM_DIR.is_dir():
        return removed
    for path in _SHM_DIR.glob(f"{namespace}-*"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed += 1
    return removed
