"""The reference external agent runner: claims agent jobs from a daemon over HTTP and answers them.

``python -m aobd.agents.runner --url URL --token TOKEN [--runner-name N] [--once] [--lease-s 30]``

Loop: claim a job (a long poll), run the agent locally while heartbeating the lease every third of its length,
post the answer (output and patch) or the error, repeat. ``--once`` stops after one job (exit status 0 iff its
result was accepted). SIGTERM or SIGINT while a job runs lets that job finish and post before exiting; while idle,
the runner exits at once. Every flag also has an ``AOBD_RUNNER_*`` environment variable, which keeps the token off
the command line.

Providers: ``scripted`` always; ``openai`` when :mod:`aobd.agents.openai` is installed. The runner resolves
``config.api_key_env`` in its own environment (the key never passes through the daemon) and judges
``config.base_url`` with its own ``--http-allow`` (``AOBD_HTTP_ALLOW``).

Exit status: 0 done, 1 the ``--once`` job's result was refused or could not be posted, 2 bad usage or a token the
daemon refuses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from aobd.errors import NodeError
from aobd.nodes.base import NodeContext

from .base import AgentAnswer
from .scripted import scripted_answer

log = structlog.get_logger("aobd.agents.runner")

#: Seconds between claims after a transport error or a 5xx, doubling up to the maximum.
_BACKOFF_S = 0.5
_BACKOFF_MAX_S = 30.0
#: Posting a result is retried on transport errors and 5xx for this long: the answer is the runner's whole work.
_POST_PATIENCE_S = 30.0


class RunnerStop(Exception):
    """The daemon refused the runner's token: no point in trying again."""


@dataclass(frozen=True, slots=True)
class Options:
    url: str
    token: str | None
    name: str
    once: bool = False
    lease_s: float = 30.0
    wait_s: float = 20.0
    http_allow: tuple[str, ...] = ()


@dataclass(slots=True)
class Outcome:
    """What a job came to: the answer to post, or the error body (code, message, retryable)."""

    answer: AgentAnswer | None = None
    error: dict[str, Any] | None = None


class _LeaseLost(Exception):
    pass


class Runner:
    """One runner: claims jobs of its token's workspace one at a time."""

    def __init__(self, options: Options, session: aiohttp.ClientSession) -> None:
        self.options = options
        self.http = session
        self.base = options.url.rstrip("/")
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        backoff = _BACKOFF_S
        while not self.stopping.is_set():
            try:
                job = await self._until_stopped(self.claim())
            except (aiohttp.ClientError, TimeoutError, _ServerError) as exc:
                log.warning("claim failed; retrying", error=str(exc), retry_in_s=backoff)
                await self._until_stopped(asyncio.sleep(backoff))
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                continue
            backoff = _BACKOFF_S
            if job is None:
                continue
            # A stop request from here on waits for this job: its answer is already paid for.
            accepted = await self.handle(job)
            if self.options.once:
                return 0 if accepted else 1
        log.info("runner stopped")
        return 0

    async def _until_stopped(self, work: Any) -> Any:
        """``work``'s result, or None as soon as a stop is requested (``work`` is then cancelled)."""
        work_task = asyncio.ensure_future(work)
        stop_task = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait((work_task, stop_task), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_task.cancel()
            if not work_task.done():
                work_task.cancel()
            await asyncio.gather(work_task, stop_task, return_exceptions=True)
        return None if work_task.cancelled() else work_task.result()

    # ------------------------------------------------------------------ protocol

    async def _post(self, path: str, body: Mapping[str, Any], timeout_s: float) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.options.token}"} if self.options.token else {}
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with self.http.post(self.base + path, json=body, headers=headers, timeout=timeout) as resp:
            raw = await resp.read()
            try:
                data = json.loads(raw) if raw else None
            except ValueError:
                data = raw.decode(errors="replace")  # a proxy's error page, say
            if resp.status in (401, 403):
                raise RunnerStop(f"the daemon refused this runner's token ({resp.status}): {_message(data)}")
            if resp.status >= 500:
                raise _ServerError(f"{path}: {resp.status} {_message(data)}")
            return resp.status, data

    async def claim(self) -> dict[str, Any] | None:
        body = {"runner": self.options.name, "wait_s": self.options.wait_s, "lease_s": self.options.lease_s}
        status, data = await self._post("/v1/agent-jobs/claim", body, self.options.wait_s + 30.0)
        if status == 204:
            return None
        if status != 200:
            raise RunnerStop(f"claim refused ({status}): {_message(data)}")
        job: dict[str, Any] = data
        log.info("claimed", job_id=job["job_id"], lease_s=job["lease_expires_in_s"])
        return job

    async def handle(self, job: dict[str, Any]) -> bool:
        """Run one job under its lease and post its result; True iff the daemon accepted the result."""
        work = asyncio.ensure_future(execute_job(job, self.options.http_allow))
        beat = asyncio.ensure_future(self._heartbeat(job, work))
        try:
            outcome = await work
        except asyncio.CancelledError:
            if beat.done() and isinstance(beat.exception(), _LeaseLost):
                log.warning("lease lost; the job was abandoned", job_id=job["job_id"], reason=str(beat.exception()))
                return False
            raise
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
        return await self._post_result(job, outcome)

    async def _heartbeat(self, job: dict[str, Any], work: asyncio.Future[Any]) -> None:
        interval = max(0.05, float(job["lease_expires_in_s"]) / 3.0)
        path = f"/v1/agent-jobs/{job['job_id']}/heartbeat"
        while True:
            await asyncio.sleep(interval)
            try:
                status, data = await self._post(path, {"lease_id": job["lease_id"]}, interval)
            except (aiohttp.ClientError, TimeoutError, _ServerError) as exc:
                # The lease may still be alive: keep working and try again at the next beat.
                log.warning("heartbeat failed", job_id=job["job_id"], error=str(exc))
                continue
            if status in (404, 409):
                # The attempt gave up or another runner took the job: its answer would be refused anyway.
                work.cancel()
                raise _LeaseLost(_message(data))

    async def _post_result(self, job: dict[str, Any], outcome: Outcome) -> bool:
        body: dict[str, Any] = {"lease_id": job["lease_id"]}
        if outcome.error is not None:
            body["error"] = outcome.error
        else:
            assert outcome.answer is not None
            body["output"] = outcome.answer.output
            if outcome.answer.patch is not None:
                patch = outcome.answer.patch
                body["patch"] = {"ops": patch.ops, "reason": patch.reason, "base": patch.base or job.get("version")}
            if outcome.answer.usage is not None:
                body["usage"] = outcome.answer.usage
            exchange = json.loads(outcome.answer.exchange) if outcome.answer.exchange else None
            if isinstance(exchange, dict):
                body["exchange"] = exchange
        path = f"/v1/agent-jobs/{job['job_id']}/result"
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _POST_PATIENCE_S
        delay = _BACKOFF_S
        while True:
            try:
                status, data = await self._post(path, body, 30.0)
                break
            except (aiohttp.ClientError, TimeoutError, _ServerError) as exc:
                if loop.time() + delay > give_up:
                    log.error("could not post the result", job_id=job["job_id"], error=str(exc))
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX_S)
        if status == 200:
            log.info("result accepted", job_id=job["job_id"], error=outcome.error is not None)
            return True
        log.warning("result refused", job_id=job["job_id"], status=status, reason=_message(data))
        return False


class _ServerError(Exception):
    pass


def _message(data: Any) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message", ""))
    return "" if data is None else str(data)[:200]


# ---------------------------------------------------------------------------------------------- execution


async def execute_job(job: Mapping[str, Any], http_allow: Sequence[str] = ()) -> Outcome:
    """Run the agent a claimed job describes, as the daemon would have run it inline."""
    config: dict[str, Any] = job.get("config") or {}
    author = f"agent:{job['node_id']}"
    provider = config.get("provider", "scripted")
    try:
        if provider == "scripted":
            return Outcome(answer=scripted_answer(config, int(job["attempt"]), author=author, base=job.get("version")))
        if provider == "openai":
            return Outcome(answer=await _openai(job, config, http_allow))
        raise NodeError(f"this runner has no agent provider {provider!r}", code="no_provider", retryable=False)
    except NodeError as exc:
        return Outcome(error={"code": exc.code, "message": exc.message, "retryable": exc.retryable})
    except Exception as exc:
        # A provider bug is this attempt's failure, not the runner's end: report it and take the next job.
        log.exception("agent raised", job_id=job.get("job_id"))
        return Outcome(error={"code": "runner_error", "message": f"{type(exc).__name__}: {exc}", "retryable": True})


async def _openai(job: Mapping[str, Any], config: dict[str, Any], http_allow: Sequence[str]) -> AgentAnswer:
    try:
        from aobd.agents.openai import openai_answer
    except ImportError:
        raise NodeError(
            "this runner has no openai provider (aobd.agents.openai is not installed)",
            code="no_provider",
            retryable=False,
        ) from None
    deadline = job.get("deadline_in_s")
    ctx = NodeContext(
        run_id=job["run_id"],
        node_id=job["node_id"],
        attempt=int(job["attempt"]),
        idempotency_key=f"{job['run_id']}:{job['node_id']}",
        timeout_s=float(deadline) if deadline else 0.0,
        services={"version": job.get("version")},
    )
    return await openai_answer(
        config,
        job.get("inputs") or {},
        ctx,
        document=job.get("document") or {},
        http_allow=http_allow,
        env=os.environ,
        node_status=job.get("node_status"),
    )


# ---------------------------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m aobd.agents.runner", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=env("AOBD_RUNNER_URL"), help="daemon API base URL (AOBD_RUNNER_URL)")
    p.add_argument("--token", default=env("AOBD_RUNNER_TOKEN"), help="a write token (AOBD_RUNNER_TOKEN)")
    p.add_argument(
        "--runner-name",
        default=env("AOBD_RUNNER_NAME") or f"{socket.gethostname()}:{os.getpid()}",
        help="shown in leases and job listings (AOBD_RUNNER_NAME; default host:pid)",
    )
    p.add_argument("--once", action="store_true", help="exit after one job")
    p.add_argument("--lease-s", type=float, default=float(env("AOBD_RUNNER_LEASE_S", "30")), help="lease length")
    p.add_argument("--wait-s", type=float, default=float(env("AOBD_RUNNER_WAIT_S", "20")), help="long-poll length")
    p.add_argument(
        "--http-allow",
        default=env("AOBD_HTTP_ALLOW", ""),
        help="comma-separated host:port or CIDR the openai provider may reach (AOBD_HTTP_ALLOW)",
    )
    return p


def options_from(argv: Sequence[str] | None = None) -> Options:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.url:
        parser.error("--url (or AOBD_RUNNER_URL) is required")
    if not 0 < args.lease_s <= 3600:
        parser.error(f"--lease-s must be in (0, 3600], not {args.lease_s}")
    if not 0 <= args.wait_s <= 60:
        parser.error(f"--wait-s must be in [0, 60], not {args.wait_s}")
    allow = tuple(a.strip() for a in args.http_allow.split(",") if a.strip())
    return Options(args.url, args.token, args.runner_name, args.once, args.lease_s, args.wait_s, allow)


async def serve(options: Options) -> int:
    async with aiohttp.ClientSession() as session:
        runner = Runner(options, session)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runner.stopping.set)
        try:
            return await runner.run()
        except RunnerStop as exc:
            log.error("runner stopped", reason=str(exc))
            return 2
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    options = options_from(argv)
    log.info("runner starting", url=options.url, runner=options.name, once=options.once)
    return asyncio.run(serve(options))


if __name__ == "__main__":
    sys.exit(main())
