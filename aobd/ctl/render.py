"""Human output of ``aobctl``: tables, event lines, and a spinner for anything that waits.

Colour only when stdout is a terminal and ``NO_COLOR`` is unset or empty; the spinner only when stderr is a
terminal. Everything here works on the plain JSON values the daemon returns, never on engine types, so that
rendering imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence

TYPE_CHECKING = False  # ``typing`` costs ~2 ms at start; mypy treats any TYPE_CHECKING as the real one
if TYPE_CHECKING:
    from typing import Any, TextIO

_STATUS_COLOR = {
    "completed": "32",
    "applied": "32",
    "approved": "32",
    "approve": "32",
    "ok": "32",
    "failed": "31",
    "rejected": "31",
    "reject": "31",
    "running": "34",
    "waiting": "33",
    "pending": "33",
    "cancelled": "33",
    "rolled_back": "33",
    "draining": "33",
    "skipped": "2",
}
_COLORS = {"green": "32", "red": "31", "yellow": "33", "blue": "34", "magenta": "35", "dim": "2", "bold": "1"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def use_color(stream: TextIO) -> bool:
    return not os.environ.get("NO_COLOR") and _isatty(stream)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def paint(name: str, text: str, color: bool) -> str:
    return f"\x1b[{_COLORS[name]}m{text}\x1b[0m" if color else text


def paint_status(status: str, color: bool) -> str:
    code = _STATUS_COLOR.get(status)
    return f"\x1b[{code}m{status}\x1b[0m" if color and code else status


def compact(value: Any, limit: int = 80) -> str:
    """One-line JSON of ``value``, cut to ``limit`` characters."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def short_version(version: str | None) -> str:
    return (version or "")[:19]


def when(ts: float | None) -> str:
    """Unix seconds as local ``YYYY-MM-DD HH:MM:SS`` (empty for None)."""
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _width(cell: str) -> int:
    return len(_ANSI.sub("", cell))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell (ANSI colour codes do not count); ``right`` aligns columns right."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], _width(cell))

    def line(cells: Sequence[str]) -> str:
        padded = []
        for i, cell in enumerate(cells):
            pad = " " * (widths[i] - _width(cell))
            padded.append(pad + cell if i in right else cell + pad)
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def key_values(pairs: Sequence[tuple[str, str]]) -> str:
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in pairs)


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested objects as dotted keys (``api.listen``) with one-line JSON values; lists stay whole."""
    if isinstance(value, Mapping) and (value or not prefix):
        pairs: list[tuple[str, str]] = []
        for key, item in value.items():
            pairs.extend(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return pairs
    return [(prefix, value if isinstance(value, str) else compact(value, 200))]


# -- resources ----------------------------------------------------------------------------------------------


def render_workflows(workflows: Sequence[Mapping[str, Any]]) -> str:
    if not workflows:
        return "no workflows"
    rows = [
        [
            w["name"],
            short_version(w.get("latest_version")),
            ", ".join(f"{tag}={short_version(v)[7:15]}" for tag, v in (w.get("tags") or {}).items()),
            str(len(w.get("versions") or [])),
            when(w.get("updated_at")),
        ]
        for w in workflows
    ]
    return table(["workflow", "latest", "tags", "versions", "updated"], rows, right=[3])


def render_workflow(info: Mapping[str, Any]) -> str:
    pairs = [
        ("workflow", info["name"]),
        ("workspace", str(info.get("workspace", ""))),
        ("latest", str(info.get("latest_version", ""))),
        ("tags", ", ".join(f"{t}={v}" for t, v in (info.get("tags") or {}).items()) or "-"),
        ("versions", str(len(info.get("versions") or []))),
        ("updated", when(info.get("updated_at"))),
    ]
    text = key_values(pairs)
    definition = info.get("definition")
    if definition is not None:
        text += "\n\n" + json.dumps(definition, indent=2, ensure_ascii=False)
    return text


def render_runs(runs: Sequence[Mapping[str, Any]], *, color: bool) -> str:
    if not runs:
        return "no runs"
    rows = [
        [
            r["run_id"],
            r.get("workflow", ""),
            paint_status(r.get("status", ""), color),
            str(r.get("last_seq", "")),
            when(r.get("updated_at")),
            r.get("parent_run_id") or "",
        ]
        for r in runs
    ]
    return table(["run", "workflow", "status", "events", "updated", "parent"], rows, right=[3])


def render_approvals(approvals: Sequence[Mapping[str, Any]], *, color: bool) -> str:
    if not approvals:
        return "no approvals"
    now = time.time()
    rows = []
    for a in approvals:
        deadline = a.get("deadline")
        due = "" if deadline is None else (f"in {duration(deadline - now)}" if deadline > now else "overdue")
        rows.append(
            [
                a["ticket"],
                a.get("run_id", ""),
                a.get("node_id", ""),
                paint_status(a.get("status", ""), color),
                ", ".join(a.get("assignees") or []) or "-",
                due,
            ]
        )
    return table(["ticket", "run", "node", "status", "assignees", "deadline"], rows)


def render_approval(a: Mapping[str, Any], *, color: bool) -> str:
    by = f" by {a['decided_by']}" if a.get("decided_by") else ""
    status = paint_status(a.get("status", ""), color)
    return f"ticket {a['ticket']} {status}{by} (run {a.get('run_id')}, node {a.get('node_id')})"


def _reasons(reasons: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = []
    for r in reasons:
        where = f" at {r['pointer']}" if r.get("pointer") else ""
        lines.append(f"  - {r.get('code', '?')}: {r.get('message', '')}{where}")
    return lines


def render_patches(patches: Sequence[Mapping[str, Any]], *, color: bool) -> str:
    if not patches:
        return "no patches"
    rows = [
        [
            p["patch_id"],
            paint_status(p.get("status", ""), color),
            p.get("author", ""),
            str(len(p.get("ops") or [])),
            ", ".join(p.get("added_nodes") or []),
            p.get("reason", "") or "; ".join(r.get("code", "") for r in p.get("reasons") or []),
        ]
        for p in patches
    ]
    return table(["patch", "status", "author", "ops", "added", "reason"], rows, right=[3])


def render_patch(p: Mapping[str, Any], *, color: bool) -> str:
    pairs = [
        ("patch", p["patch_id"]),
        ("run", p.get("run_id", "")),
        ("status", paint_status(p.get("status", ""), color)),
        ("author", p.get("author", "")),
        ("reason", p.get("reason", "") or "-"),
        ("proposed", when(p.get("proposed_at"))),
    ]
    if p.get("node_id"):
        pairs.append(("node", p["node_id"]))
    if p.get("version"):
        pairs.append(("version", p["version"]))
    if p.get("added_nodes"):
        pairs.append(("added", ", ".join(p["added_nodes"])))
    if p.get("decided_by"):
        pairs.append(("decided by", p["decided_by"]))
    lines = [key_values(pairs), "", "ops"]
    lines.extend(f"  {compact(op, 200)}" for op in p.get("ops") or [])
    if p.get("reasons"):
        lines += ["", "reasons", *_reasons(p["reasons"])]
    return "\n".join(lines)


def render_patch_result(p: Mapping[str, Any], *, color: bool) -> str:
    """One line (plus the reasons of a rejection) after a patch was posted or decided."""
    status = p.get("status", "")
    head = f"patch {p['patch_id']} {paint_status(status, color)} (run {p.get('run_id')})"
    if status == "applied":
        added = f", added {', '.join(p['added_nodes'])}" if p.get("added_nodes") else ""
        head += f": version {short_version(p.get('version'))}{added}"
    elif status == "pending":
        head += ": waiting for approval (aobctl patch approve|reject " + p["patch_id"] + ")"
    return "\n".join([head, *_reasons(p.get("reasons") or [])])


def render_status(status: Mapping[str, Any], *, color: bool) -> str:
    draining = bool(status.get("draining"))
    pairs = [
        ("daemon", f"aobd {status.get('version', '?')} (impl {status.get('impl', '?')}), pid {status.get('pid', '?')}"),
        ("state", paint_status("draining", color) if draining else paint_status("ok", color)),
        ("uptime", duration(float(status.get("uptime_s") or 0))),
        ("runs active", str(status.get("runs_active", 0))),
        ("listen", str(status.get("listen", ""))),
        ("data dir", str(status.get("data_dir", ""))),
    ]
    pairs += [(f"plane {k}", v) for k, v in flatten(status.get("planes") or {}) if k]
    known = {"version", "impl", "pid", "uptime_s", "runs_active", "draining", "listen", "data_dir", "planes"}
    pairs += [(k, v) for k, v in flatten({k: v for k, v in status.items() if k not in known}) if k]
    return key_values(pairs)


def render_config(config: Mapping[str, Any]) -> str:
    return key_values(flatten(config)) or "(empty)"


def render_problems(path: str, problems: Sequence[str]) -> str:
    count = len(problems)
    return "\n".join([f"{path}: {count} problem{'s' if count != 1 else ''}", *(f"  {p}" for p in problems)])


# -- events -------------------------------------------------------------------------------------------------


class EventLines:
    """One human line per event, with the time since the first event (the same look as ``aobd run``)."""

    def __init__(self, *, color: bool) -> None:
        self.color = color
        self.t0: float | None = None

    def __call__(self, e: Mapping[str, Any]) -> str:
        ts = float(e.get("ts") or 0.0)
        if self.t0 is None:
            self.t0 = ts
        stamp = paint("dim", f"{(ts - self.t0) * 1000:9.1f}ms", self.color)
        seq = paint("dim", f"#{e.get('seq', '?')!s:<4}", self.color)
        return f"{stamp}  {seq} {self._body(e)}"

    def _body(self, e: Mapping[str, Any]) -> str:
        def c(name: str, text: str) -> str:
            return paint(name, text, self.color)

        kind = e.get("type", "?")
        node = e.get("node_id", "")
        patch = e.get("patch_id", "")
        version = short_version(e.get("version"))
        attempt = e.get("attempt", 1)
        if kind == "RunCreated":
            origin = (e.get("replay") or {}).get("from_node")
            parent = f" (replay of {e['parent_run_id']} from {origin})" if e.get("parent_run_id") else ""
            return c("bold", f"run {e.get('run_id')} of {e.get('workflow')!r} started{parent}") + c(
                "dim", f"  base {short_version(e.get('base_version'))}"
            )
        if kind == "NodeScheduled":
            return c("dim", f"· {node} scheduled" + (f" (attempt {attempt})" if attempt > 1 else ""))
        if kind == "NodeStarted":
            return f"{c('blue', '▶')} {node}" + (c("yellow", f" (attempt {attempt})") if attempt > 1 else "")
        if kind == "NodeCompleted":
            out = compact(e.get("output")) if e.get("inline") or "output" in e else f"<{e.get('output_ref', '')[:19]}>"
            reused = c("dim", f" (reused from {e['reused_from']})") if e.get("reused_from") else ""
            took = c("dim", f" {float(e['duration_ms']):.1f}ms") if e.get("duration_ms") is not None else ""
            return f"{c('green', '✓')} {node}{took}{reused}  → {out}"
        if kind == "NodeFailed":
            what = (e.get("error") or {}).get("message", e.get("error"))
            if e.get("retry_at") is not None:
                delay_ms = (e["retry_at"] - float(e.get("ts") or 0.0)) * 1000
                return f"{c('yellow', '↻')} {node} attempt {attempt} failed: {what}; retrying in {delay_ms:.0f}ms"
            return f"{c('red', '✗')} {node} failed: {what}"
        if kind == "NodeSkipped":
            return c("dim", f"⤼ {node} skipped ({e.get('reason', 'no_taken_edge')})")
        if kind == "PatchProposed":
            why = e.get("reason") or "(no reason)"
            ops = len(e.get("ops") or [])
            return f"{c('magenta', '✎')} patch {patch} proposed by {e.get('author')}: {why} ({ops} ops)"
        if kind == "PatchApplied":
            added = f", added {', '.join(e['added_nodes'])}" if e.get("added_nodes") else ""
            return f"{c('green', '✎')} patch {patch} applied{added}; version {version}"
        if kind == "PatchRejected":
            reasons = "; ".join(f"{r.get('code')}: {r.get('message')}" for r in e.get("reasons") or [])
            return f"{c('red', '✎')} patch {patch} rejected: {reasons}"
        if kind == "PatchRolledBack":
            return f"{c('yellow', '✎')} patch {patch} rolled back; version {version}"
        if kind == "ApprovalRequested":
            return f"{c('yellow', '⏸')} {node} awaits approval (ticket {e.get('ticket')})"
        if kind == "ApprovalDecided":
            return f"{c('green', '⏵')} {node} {e.get('decision')} by {e.get('by')}"
        if kind == "TimerSet":
            return f"{c('yellow', '⏲')} {node} timer set for +{float(e.get('fire_at', 0)) - float(e.get('ts', 0)):.1f}s"
        if kind == "TimerFired":
            return f"{c('green', '⏲')} {node} timer fired"
        if kind == "RunCompleted":
            return c("green", f"run {e.get('run_id')} completed") + f"  outputs {compact(e.get('outputs'))}"
        if kind == "RunFailed":
            return c("red", f"run {e.get('run_id')} failed: {(e.get('error') or {}).get('message')}")
        if kind == "RunCancelled":
            return c("yellow", f"run {e.get('run_id')} cancelled: {e.get('reason', '')}")
        rest = {k: v for k, v in e.items() if k not in ("run_id", "seq", "ts", "type")}
        return f"{kind} {compact(rest)}"


class RunProgress:
    """Folds events into the one-line progress a spinner shows while a run is followed."""

    def __init__(self, run_id: str, nodes: Sequence[str] = ()) -> None:
        self.run_id = run_id
        self.nodes: dict[str, str] = dict.fromkeys(nodes, "pending")
        self.note = ""

    def update(self, e: Mapping[str, Any]) -> None:
        kind, node = e.get("type"), e.get("node_id")
        if node and kind == "NodeStarted":
            self.nodes[node] = "running"
        elif node and kind == "NodeCompleted":
            self.nodes[node] = "completed"
        elif node and kind == "NodeSkipped":
            self.nodes[node] = "skipped"
        elif node and kind == "NodeFailed":
            self.nodes[node] = "failed" if e.get("retry_at") is None else "running"
        elif node and kind == "ApprovalRequested":
            self.nodes[node] = "waiting"
            self.note = f"awaiting approval of {node} (ticket {e.get('ticket')})"
        elif node and kind == "ApprovalDecided":
            self.note = ""
        elif node and kind == "TimerSet":
            self.nodes[node] = "waiting"
        elif kind == "PatchApplied":
            for added in e.get("added_nodes") or []:
                self.nodes.setdefault(added, "pending")

    def text(self) -> str:
        done = sum(1 for s in self.nodes.values() if s in ("completed", "skipped", "failed"))
        running = [n for n, s in self.nodes.items() if s == "running"]
        parts = [f"run {self.run_id}", f"{done}/{len(self.nodes)} nodes done"]
        if running:
            parts.append("running " + ", ".join(running[:4]) + ("…" if len(running) > 4 else ""))
        if self.note:
            parts.append(self.note)
        return " · ".join(parts)


class Spinner:
    """A progress line redrawn on stderr by a thread; does nothing unless ``enabled`` (stderr is a terminal).

    ``echo`` writes a line to any stream without tearing the spinner: it clears the line first and the next
    frame redraws it.
    """

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self.text = ""
        self._frame = 0
        self._drawn = False
        self._thread: Any = None
        self._stop: Any = None
        self._lock: Any = None

    def __enter__(self) -> Spinner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, text: str = "") -> None:
        self.text = text or self.text
        if not self.enabled or self._thread is not None:
            return
        import threading

        self._lock = threading.Lock()
        self._stop = threading.Event()
        # The first frame is drawn here rather than by the thread, so that even a short wait shows it.
        with self._lock:
            self._draw()
        self._thread = threading.Thread(target=self._run, name="aobctl-spinner", daemon=True)
        self._thread.start()

    def update(self, text: str) -> None:
        self.text = text

    def echo(self, line: str, stream: TextIO) -> None:
        if self._lock is None:
            stream.write(line + "\n")
            stream.flush()
            return
        with self._lock:
            self._clear()
            stream.write(line + "\n")
            stream.flush()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        with self._lock:
            self._clear()
        self._thread = None
        self._lock = None

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def _draw(self) -> None:
        frame = self.FRAMES[self._frame % len(self.FRAMES)]
        self._frame += 1
        self.stream.write(f"\r\x1b[K{frame} {self.text}")
        self.stream.flush()
        self._drawn = True

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            with self._lock:
                self._draw()
