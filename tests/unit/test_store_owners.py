"""CAS ownership on its way to the metadata store (aobd.store.owners): gathered once, held while written."""

from __future__ import annotations

from pathlib import Path

from aobd.store.meta import SqliteMetaStore
from aobd.store.owners import OwnerBuffer
from tests.conftest import run_async


def test_pairs_written_lately_are_not_written_again_and_a_failed_write_keeps_its_pairs() -> None:
    owners = OwnerBuffer(written_max=3)
    assert owners.add("ws", ["sha256:a", "sha256:b"])
    batch = owners.take()
    assert batch == {("sha256:a", "ws"), ("sha256:b", "ws")}
    assert owners.holds("ws", "sha256:a") and not owners.pending()  # held while being written
    owners.done(batch, stored=False)
    assert owners.pending() and owners.take() == batch  # the next write takes them again
    owners.done(batch, stored=True)

    assert not owners.add("ws", ["sha256:a", "sha256:b"])  # written: nothing to write
    assert owners.add("team", ["sha256:a"])  # another workspace's ownership is its own pair
    assert not owners.holds("other", "sha256:a")
    owners.done(owners.take(), stored=True)
    assert owners.holds("team", "sha256:a")
    owners.done({("sha256:c", "ws")}, stored=True)  # past written_max: forgotten, so written again if seen
    assert owners.add("ws", ["sha256:a"])


def test_the_sqlite_meta_store_records_each_pair_once_and_answers_from_the_buffer(tmp_path: Path) -> None:
    async def go() -> tuple[bool, bool, bool]:
        meta = SqliteMetaStore(tmp_path / "meta.db")
        meta.own_refs("ws", ["sha256:a"])
        await meta.flush_refs()
        meta.own_refs("ws", ["sha256:a"])  # known: nothing more to write
        nothing_pending = not meta._owners.pending()
        await meta.close()
        reopened = SqliteMetaStore(tmp_path / "meta.db")  # what was written is in the file
        try:
            return nothing_pending, await reopened.owns_ref("ws", "sha256:a"), await reopened.owns_ref("x", "sha256:a")
        finally:
            await reopened.close()

    assert run_async(go()) == (True, True, False)
