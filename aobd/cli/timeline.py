"""Live timeline of a run for humans: one line per event as it is committed, with timings."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from aobd.model import events as ev

_COLORS = {"green": "32", "red": "31", "yellow": "33", "blue": "34", "dim": "2", "magenta": "35", "bold": "1"}


class Timeline:
    """An engine listener printing events; ``only`` limits it to one run tree (the run and its children)."""

    def __init__(self, out: TextIO = sys.stdout, *, color: bool | None = None) -> None:
        self.out = out
        self.color = out.isatty() if color is None else color
        self.t0: float | None = None
        self.roots: set[str] = set()

    def _c(self, name: str, text: str) -> str:
        return f"\x1b[{_COLORS[name]}m{text}\x1b[0m" if self.color else text

    def __call__(self, events: list[ev.Event]) -> None:
        for event in events:
            line = self.render(event)
            if line is not None:
                self.out.write(line + "\n")
        self.out.flush()

    def render(self, e: ev.Event) -> str | None:
        if self.t0 is None:
            self.t0 = e.ts
        stamp = self._c("dim", f"{(e.ts - self.t0) * 1000:9.1f}ms")
        prefix = "" if not self.roots or e.run_id in self.roots else self._c("dim", f"[{e.run_id.rsplit('.', 2)[-2]}] ")
        body = self._body(e)
        return None if body is None else f"{stamp}  {prefix}{body}"

    def _body(self, e: ev.Event) -> str | None:
        c = self._c
        if isinstance(e, ev.RunCreated):
            if not self.roots:
                self.roots.add(e.run_id)  # the first run is the one asked for; others are its children
            return c("bold", f"run {e.run_id} of {e.workflow!r} started") + c("dim", f"  base {e.base_version[:19]}")
        if isinstance(e, ev.NodeStarted):
            return f"{c('blue', '▶')} {e.node_id}" + (c("yellow", f" (attempt {e.attempt})") if e.attempt > 1 else "")
        if isinstance(e, ev.NodeCompleted):
            out = _short(e.output) if e.inline else f"<{e.output_ref[:19]}>"
            return f"{c('green', '✓')} {e.node_id} {c('dim', f'{e.duration_ms:.1f}ms')}  → {out}"
        if isinstance(e, ev.NodeFailed):
            what = e.error.get("message", e.error)
            if e.retry_at is not None:
                delay_ms = (e.retry_at - e.ts) * 1000
                return (
                    f"{c('yellow', '↻')} {e.node_id} attempt {e.attempt} failed: {what}; retrying in {delay_ms:.0f}ms"
                )
            return f"{c('red', '✗')} {e.node_id} failed: {what}"
        if isinstance(e, ev.NodeSkipped):
            return c("dim", f"⤼ {e.node_id} skipped ({e.reason})")
        if isinstance(e, ev.PatchProposed):
            why = e.reason or "(no reason)"
            return f"{c('magenta', '✎')} patch {e.patch_id} proposed by {e.author}: {why} ({len(e.ops)} ops)"
        if isinstance(e, ev.PatchApplied):
            added = f", added {', '.join(e.added_nodes)}" if e.added_nodes else ""
            return f"{c('green', '✎')} patch {e.patch_id} applied{added}; version {e.version[:19]}"
        if isinstance(e, ev.PatchRejected):
            reasons = "; ".join(f"{r.get('code')}: {r.get('message')}" for r in e.reasons)
            return f"{c('red', '✎')} patch {e.patch_id} rejected: {reasons}"
        if isinstance(e, ev.PatchRolledBack):
            return f"{c('yellow', '✎')} patch {e.patch_id} rolled back; version {e.version[:19]}"
        if isinstance(e, ev.ApprovalRequested):
            return f"{c('yellow', '⏸')} {e.node_id} awaits approval (ticket {e.ticket})"
        if isinstance(e, ev.ApprovalDecided):
            return f"{c('green', '⏵')} {e.node_id} {e.decision} by {e.by}"
        if isinstance(e, ev.ApprovalEscalated):
            notified = f"notified {e.notify} ({e.result})" if e.notify else ""
            decided = f"decided {e.decision}" if e.decision else ""
            return f"{c('yellow', '⚑')} {e.node_id} escalation step {e.step + 1}: " + ", ".join(
                x for x in (notified, decided) if x
            )
        if isinstance(e, ev.TimerSet):
            return f"{c('yellow', '⏲')} {e.node_id} timer set for +{(e.fire_at - e.ts):.1f}s"
        if isinstance(e, ev.RunCompleted):
            return c("green", f"run {e.run_id} completed") + f"  outputs {_short(e.outputs)}"
        if isinstance(e, ev.RunFailed):
            return c("red", f"run {e.run_id} failed: {e.error.get('message')}")
        if isinstance(e, ev.RunCancelled):
            return c("yellow", f"run {e.run_id} cancelled: {e.reason}")
        return None


def _short(value: Any, limit: int = 80) -> str:
    import orjson

    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
