"""Where the multi-process daemon spends its CPU under W6 over HTTP/2: py-spy on every child, one summary per role.

    python -m perf.profile_planes [--runs 8000] [--inline [auto|true|false]] [--connections 64]
                                  [--orchestrators N] [--top 25] [--profiler py-spy|perf]

Starts the default layout (``perf.w6.start_bench_daemon``), attaches a sampling profiler to the supervisor and each
child, drives ``h2load`` as ``perf.w6 --mode http2`` does, and prints each process's CPU seconds beside its top
functions. ``make profile-planes`` runs it.

- ``py-spy`` (the default): ``py-spy record --nonblocking --gil``, Python frames (``perf.spy_top``). It cannot see
  into compiled modules: their time shows as the Python frame that called them.
- ``perf``: Linux ``perf record`` (Debian's ``linux-perf``), C symbols with their own time: the compiled engine's
  functions by name (``__pyx_pw_4aobd_6engine_7machine_...``), the interpreter, libzmq, msgspec, the kernel.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from perf.spy_top import summarize
from perf.w6 import _tree, add_inline_argument, plane_of, process_cpu_split, start_bench_daemon, w6_document


def _profiler_command(profiler: str, pid: int, out: Path) -> list[str]:
    if profiler == "perf":
        return ["perf", "record", "-F", "1999", "-p", str(pid), "-o", str(out)]
    spy = str(Path(sys.executable).parent / "py-spy")
    return [spy, "record", "--nonblocking", "--gil", "-r", "250", "-f", "raw", "-p", str(pid), "-o", str(out)]


def _perf_top(path: Path, top: int) -> list[str]:
    """The symbols with the most samples of their own in a ``perf record`` file, as ``perf report`` prints them."""
    report = subprocess.run(
        ["perf", "report", "-i", str(path), "--stdio", "--no-children", "--sort", "dso,sym", "--percent-limit", "0.5"],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in report.stdout.splitlines() if line.strip() and not line.startswith("#")]
    return lines[:top]


async def profile(
    runs: int,
    inline: str,
    top: int,
    work: Path,
    connections: int = 64,
    orchestrators: int = 0,
    profiler: str = "py-spy",
) -> None:
    daemon = await start_bench_daemon(work / "data", "full", "multi-accept", inline, orchestrators)
    try:
        pids = _tree(daemon.proc.pid)
        roles = {pid: plane_of(pid, with_index=True) for pid in pids}
        before = {pid: process_cpu_split(pid) for pid in pids}
        spies = {}
        for pid in pids:
            command = _profiler_command(profiler, pid, work / f"{roles[pid]}.{profiler}")
            # Started and left running until the load is over: nothing here waits on them.
            spies[pid] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
        await asyncio.sleep(1.0)
        body = work / "body.json"
        body.write_text(json.dumps({"definition": w6_document(), "inputs": {"x": 1}}))
        h2 = await asyncio.create_subprocess_exec(
            "h2load", "-n", str(runs), "-c", str(connections), "-m", "4", "-d", str(body),
            "-H", "content-type: application/json", f"{daemon.url}/v1/runs?wait=60",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out = (await h2.communicate())[0].decode()
        after = {pid: process_cpu_split(pid) for pid in pids}
        for proc in spies.values():
            proc.send_signal(signal.SIGINT)
        for proc in spies.values():
            proc.wait(timeout=30)
    finally:
        await asyncio.to_thread(daemon.stop)
    print(next((line for line in out.splitlines() if line.startswith("finished in")), out[-400:]))
    used = {p: (after[p][0] - before[p][0], after[p][1] - before[p][1]) for p in pids}
    total_cpu = sum(user + system for user, system in used.values())
    print(f"daemon CPU {total_cpu:.2f} s = {total_cpu * 1e6 / runs:.0f} us per run")
    for pid in sorted(pids, key=lambda p: -sum(used[p])):
        user, system = used[pid]
        print(
            f"\n=== {roles[pid]} (pid {pid}): {user + system:.2f} s CPU, {(user + system) * 1e6 / runs:.0f} us per run"
            f" ({user * 1e6 / runs:.0f} user, {system * 1e6 / runs:.0f} system)"
        )
        path = work / f"{roles[pid]}.{profiler}"
        if not path.exists():
            continue
        if profiler == "perf":
            print("\n".join(_perf_top(path, top)))
            continue
        samples, inclusive, own = summarize(path)
        for title, counts in (("inclusive", inclusive), ("self", own)):
            print(f"--- {title} ({samples} samples)")
            for frame, n in counts.most_common(top):
                print(f"{100.0 * n / max(1, samples):5.1f}%  {frame}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.profile_planes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8000)
    add_inline_argument(parser)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--connections", type=int, default=64, help="h2load connections, 4 streams each")
    parser.add_argument("--orchestrators", type=int, default=0, help="[planes] orchestrators (0: the default)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the raw profiles in this directory")
    parser.add_argument("--profiler", choices=["py-spy", "perf"], default="py-spy")
    args = parser.parse_args(argv)
    if shutil.which("h2load") is None:
        raise SystemExit("h2load is missing: apt-get install nghttp2-client")
    if args.profiler == "perf" and shutil.which("perf") is None:
        raise SystemExit("perf is missing: apt-get install linux-perf")
    options = (args.runs, args.inline, args.top)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        asyncio.run(profile(*options, args.keep, args.connections, args.orchestrators, args.profiler))
    else:
        with tempfile.TemporaryDirectory(prefix="aobd-prof-") as tmp:
            asyncio.run(profile(*options, Path(tmp), args.connections, args.orchestrators, args.profiler))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
