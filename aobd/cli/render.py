"""Human renderings of run summaries and run lists (plain tables; colour only on a terminal)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from aobd.store.protocols import RunInfo

_STATUS_COLOR = {
    "completed": "32",
    "failed": "31",
    "skipped": "2",
    "running": "34",
    "waiting": "33",
    "cancelled": "33",
}


def _paint(status: str, color: bool) -> str:
    code = _STATUS_COLOR.get(status)
    return f"\x1b[{code}m{status}\x1b[0m" if color and code else status


def _short(value: Any, limit: int = 60) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_summary(summary: dict[str, Any], *, color: bool = False) -> str:
    lines = [
        f"run      {summary['run_id']}",
        f"workflow {summary['workflow']}",
        f"status   {_paint(summary['status'], color)}",
        f"version  {summary['version']}" + ("" if summary["version"] == summary["base_version"] else "  (patched)"),
        "",
        f"  {'node':<20} {'status':<10} {'att':>3}  output",
    ]
    for node_id, node in summary["nodes"].items():
        detail = (
            _short(node.get("output"))
            if node["status"] == "completed"
            else (node.get("error") or {}).get("message", "")
        )
        status = _paint(f"{node['status']:<10}", color)
        lines.append(f"  {node_id:<20} {status} {node['attempts']:>3}  {detail}")
    if summary["patches"]:
        lines.append("")
        lines.append("  patches")
        for patch in summary["patches"]:
            reasons = "; ".join(r.get("message", "") for r in patch["reasons"])
            lines.append(
                f"  {patch['patch_id']:<28} {patch['status']:<11} {patch['author']}"
                + (f"  {reasons}" if reasons else "")
            )
    lines.append("")
    if summary["status"] == "completed":
        lines.append(f"outputs  {_short(summary['outputs'], 200)}")
    elif summary.get("error"):
        lines.append(f"error    {summary['error'].get('message')}")
    return "\n".join(lines)


def render_runs(runs: Sequence[RunInfo]) -> str:
    if not runs:
        return "no runs"
    lines = [f"{'run':<34} {'workflow':<20} {'status':<10} {'events':>6}  updated"]
    for run in runs:
        updated = datetime.fromtimestamp(run.updated_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"{run.run_id:<34} {run.workflow:<20} {run.status:<10} {run.last_seq:>6}  {updated}")
    return "\n".join(lines)
