"""CAS ownership on its way to a metadata store: which workspace may read which blob.

The daemon records, for every blob a run makes durable, the workspace that owns it (``own_refs``, called for each
committed step). The pairs are written in the background, one write per burst, because ownership matters only
when someone reads a blob. The same blobs recur run after run (a workflow's document, the same inputs and
outputs), so pairs written lately are remembered and not written again: in-process W6 owns nine refs a run, all of
them known after the first. Ownership is never revoked, so a pair remembered is a pair stored.

Shared by the SQLite and the Postgres metadata stores (``aobd.store.meta``, ``aobd.store.postgres``), which do
the writing. Used from the event loop's thread only.
"""

from __future__ import annotations

from collections.abc import Iterable

#: (ref, workspace)
Pair = tuple[str, str]


class OwnerBuffer:
    """Pairs gathered (pending), being written (flushing) and written lately (at most ``written_max``)."""

    __slots__ = ("_flushing", "_pending", "_written", "written_max")

    def __init__(self, written_max: int = 65_536) -> None:
        self._pending: set[Pair] = set()
        self._flushing: set[Pair] = set()
        self._written: set[Pair] = set()
        self.written_max = written_max

    def add(self, workspace: str, refs: Iterable[str]) -> bool:
        """Gather the refs ``workspace`` owns; True when pairs wait to be written."""
        written, pending = self._written, self._pending
        for ref in refs:
            pair = (ref, workspace)
            if pair not in written:
                pending.add(pair)
        return bool(pending)

    def pending(self) -> bool:
        return bool(self._pending)

    def take(self) -> set[Pair]:
        """The pairs to write now; they count as held until :meth:`done`."""
        batch, self._pending = self._pending, set()
        self._flushing |= batch
        return batch

    def done(self, batch: set[Pair], *, stored: bool) -> None:
        """The write of ``batch`` ended: stored, or failed (its pairs wait for the next write)."""
        self._flushing -= batch
        if not stored:
            self._pending |= batch
            return
        if len(self._written) + len(batch) > self.written_max:
            self._written.clear()  # forgotten pairs are only written again, which changes nothing
        self._written |= batch

    def holds(self, workspace: str, ref: str) -> bool:
        """Whether ``workspace`` owns ``ref`` as far as this buffer knows (False: ask the store)."""
        pair = (ref, workspace)
        return pair in self._pending or pair in self._flushing or pair in self._written
