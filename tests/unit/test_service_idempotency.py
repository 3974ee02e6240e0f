"""An idempotency key names exactly one run, even when the attempt that claimed it died before recording it."""

from __future__ import annotations

from pathlib import Path

import msgspec

from aobd.api import schemas as s
from aobd.config import Config
from aobd.daemon.service import Caller
from aobd.engine.driver import new_run_id
from tests.conftest import fn, run_async, started_service, workflow


def test_a_retry_records_the_run_a_dead_attempt_claimed_under_the_same_id(tmp_path: Path) -> None:
    async def main() -> None:
        async with started_service(Config(data_dir=str(tmp_path))) as service:
            caller = Caller("default", "write", "test")
            claimed = new_run_id()
            # the first attempt claimed the key, then its process was killed before RunCreated was committed
            assert await service.meta.claim_idempotency("default", "order-1", claimed) is None
            body = msgspec.convert(
                {"definition": workflow([fn("a")]), "inputs": {"v": 1}, "idempotency_key": "order-1"}, s.RunStart
            )
            retried = await service.start_run(caller, body, wait_s=10)
            assert retried["run_id"] == claimed and retried["status"] == "completed"
            again = await service.start_run(caller, body)
            assert again["run_id"] == claimed
            assert [r.run_id for r in await service.log.list_runs(limit=10)] == [claimed]

    run_async(main())
