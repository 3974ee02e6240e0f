"""Rate limits shared by the accept workers of one daemon, through a memory-mapped file.

Each accept worker used to keep its own token buckets, so with N workers a workspace got N times its configured
rate (the kernel spreads connections over the workers' sockets). With Redis configured the buckets live there,
shared by every daemon; without it, :class:`SharedRateLimiter` keeps them in a small file under the planes'
socket directory that every accept worker maps: one bucket per (workspace, kind) in a fixed table of
:data:`SLOTS` slots, read and updated under an exclusive ``flock`` (a syscall pair, about 2 us, paid by run
starts and patch proposals only). The clock is ``CLOCK_MONOTONIC``, which all processes of a host share.

The semantics are :class:`aobd.api.auth.RateLimiter`'s exactly (a bucket starts full, refills at the rate up to the
burst); ``tests/unit/test_shared_ratelimit.py`` checks both against the same sequence.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog
import xxhash

from aobd.api.auth import RateLimiter
from aobd.config import LimitsConfig
from aobd.tokenbucket import rate_limited, rates_of, take_token

__all__ = ["SLOTS", "SharedRateLimiter"]

log = structlog.get_logger("aobd.planes.ratelimit")

#: Buckets the file holds; a (workspace, kind) beyond that is limited per process (logged once).
SLOTS = 4096
#: key hash (0: empty), tokens, last refill (monotonic seconds).
_SLOT = struct.Struct("<Qdd")


class SharedRateLimiter:
    """Token buckets per (workspace, kind) in the file at ``path``, shared by every process that opens it."""

    def __init__(self, path: str | Path, limits: LimitsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self._clock = clock
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        size = SLOTS * _SLOT.size
        with self._locked():
            if os.fstat(self._fd).st_size < size:
                os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size)
        # For keys that find the table full: limited in this process alone rather than not at all.
        self._overflow = RateLimiter(limits, clock=clock)
        self._warned = False
        self.reconfigure(limits)

    def reconfigure(self, limits: LimitsConfig) -> None:
        self._rates = rates_of(limits)
        self._overflow.reconfigure(limits)

    def check(self, workspace: str, kind: str) -> None:
        rate, burst = self._rates[kind]
        if rate <= 0:
            return
        key = xxhash.xxh64_intdigest(f"{workspace}\0{kind}".encode()) or 1  # 0 marks an empty slot
        with self._locked():
            offset = self._slot_of(key)
            if offset is None:
                if not self._warned:
                    self._warned = True
                    log.warning("shared rate-limit table full; limiting further workspaces per process", slots=SLOTS)
                self._overflow.check(workspace, kind)
                return
            stored, level, stamp = _SLOT.unpack_from(self._map, offset)
            now = self._clock()
            if stored != key or now < stamp:  # a new bucket, or one from before a reboot (the clock restarted)
                level, stamp = float(burst), now
            allowed, level = take_token(level, stamp, now, rate, burst)
            _SLOT.pack_into(self._map, offset, key, level, now)
        if not allowed:
            raise rate_limited(workspace, kind, rate, (1.0 - level) / rate)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def _slot_of(self, key: int) -> int | None:
        """The offset of ``key``'s slot, or of the empty slot it may take (linear probing); None: the table is full."""
        start = key % SLOTS
        for probe in range(SLOTS):
            offset = ((start + probe) % SLOTS) * _SLOT.size
            stored = _SLOT.unpack_from(self._map, offset)[0]
            if stored == key or stored == 0:
                return offset
        return None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
