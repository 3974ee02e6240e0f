"""The files behind :class:`aobd.engine.inline_policy.InlinePolicy` in the planes: the running-set marker of each
orchestrator and the daemon's ledger of demoted handlers, both in the planes' socket directory.

The marker is a page of shared memory backed by ``inline-running-<index>``: a 4-byte length and the UTF-8 refs of
the ready set being called, one per line. Writing it is a memory copy, no system call (the page cache keeps it
after the process dies, which is all it needs to survive); it is written before each inline ready set and zeroed
after it, so it is non-empty only while handlers run inline. The ledger, ``inline-demoted``, is a text file of
refs, one per line, appended with ``O_APPEND`` (a short line is written whole).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Collection
from pathlib import Path

from aobd.config import Config

from . import paths

_SIZE = 4096
_HEADER = 4
_LEDGER = "inline-demoted"


def marker_path(config: Config, index: int) -> Path:
    return paths.socket_dir(config) / f"inline-running-{index}"


def ledger_path(config: Config) -> Path:
    return paths.socket_dir(config) / _LEDGER


class FileMarker:
    """The running-set marker of one orchestrator (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)

    def left_behind(self) -> list[str]:
        """The refs a previous process left in the marker: handlers that were running inline when it died."""
        size = int.from_bytes(self._map[:_HEADER], "little")
        if not 0 < size <= _SIZE - _HEADER:
            return []
        text = self._map[_HEADER : _HEADER + size].decode(errors="replace")
        return [ref for ref in text.split("\n") if ref]

    def running(self, refs: Collection[str]) -> None:
        # Refs past the page are left out whole (a set of that many distinct handlers is not a W6-like step).
        data = b""
        for ref in refs:
            line = ref.encode() + b"\n"
            if len(data) + len(line) > _SIZE - _HEADER:
                break
            data += line
        self._map[_HEADER : _HEADER + len(data)] = data
        self._map[:_HEADER] = len(data).to_bytes(_HEADER, "little")

    def idle(self) -> None:
        self._map[:_HEADER] = b"\0\0\0\0"

    def close(self) -> None:
        self.idle()
        self._map.close()


class FileLedger:
    """The daemon's demoted handlers (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> set[str]:
        try:
            return {line for line in self.path.read_text(errors="replace").splitlines() if line}
        except FileNotFoundError:
            return set()

    def record(self, ref: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, ref.encode() + b"\n")
        finally:
            os.close(fd)


def forget_demotions(config: Config) -> None:
    """Clear the ledger and the markers: the supervisor's start, when every handler is trusted again."""
    directory = paths.socket_dir(config)
    for path in [directory / _LEDGER, *directory.glob("inline-running-*")]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
