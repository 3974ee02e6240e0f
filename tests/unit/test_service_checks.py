"""A run's document passes validation and the handler allow-list before it runs; the check is remembered per
version, and only for versions that passed it here."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from aobd.api import schemas as s
from aobd.config import Config, SecurityConfig
from aobd.daemon.service import Caller
from aobd.errors import WorkflowInvalid
from aobd.model.canonical import canonical_json, sha256_ref
from aobd.model.validate import load_workflow
from tests.conftest import run_async, started_service

CALLER = Caller("default", "write", "test")


def _start(document: dict[str, object]) -> s.RunStart:
    return msgspec.convert({"definition": document, "inputs": {}}, s.RunStart)


def test_a_version_compiled_for_a_resumed_run_is_still_checked_against_the_allow_list(tmp_path: Path) -> None:
    """The engine's IR cache also holds versions of runs resumed from the log, which may have started under a
    wider allow-list: a start with that document must still be refused, every time."""
    doc = {"name": "rce", "nodes": [{"id": "x", "type": "function", "config": {"handler": "subprocess:run"}}]}

    async def main() -> None:
        async with started_service(
            Config(data_dir=str(tmp_path), security=SecurityConfig(handler_modules=["perf"]))
        ) as service:
            version = sha256_ref(canonical_json(doc))
            service.engine.ir_cache.get(version, lambda: load_workflow(doc))  # as a resumed run compiles it
            for _ in range(2):
                with pytest.raises(WorkflowInvalid, match="subprocess"):
                    await service.start_run(CALLER, _start(doc))
            allowed = {"name": "ok", "nodes": [{"id": "x", "type": "function", "config": {"handler": "builtin:noop"}}]}
            for _ in range(2):  # the second start takes the remembered check
                summary = await service.start_run(CALLER, _start(allowed), wait_s=10)
                assert summary["status"] == "completed"
            assert len(await service.log.list_runs(limit=10)) == 2  # the refused starts recorded nothing

    run_async(main())
