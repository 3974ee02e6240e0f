"""``aobctl``: the admin client of the aobd daemon (DESIGN.md section 8).

Every command takes ``--json`` and the connection options (``--socket``, ``--url``, ``--token``), before or after
the command name. Exit status: 0 success, 1 a failure the daemon reported (or a run that did not complete when
waiting for it), 2 the daemon cannot be reached (or bad usage), 130 interrupted.

Startup cost is the point of this module's shape: it imports ``argparse``, ``os`` and ``sys`` only. The client
(``http.client``), renderers and anything from the engine are imported inside the command that needs them.
"""

from __future__ import annotations

import argparse
import os
import sys

# ``typing`` costs ~2 ms at start; mypy treats any name TYPE_CHECKING as the real one.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from aobd.ctl.client import Client

EXIT_OK, EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 1, 2, 130
_SUPPRESS = argparse.SUPPRESS


# -- command context ----------------------------------------------------------------------------------------


class Ctl:
    """What a command works with: its arguments, the output mode and (created on first use) the client."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json = bool(getattr(args, "json", False))
        self._client: Client | None = None
        self._color: bool | None = None

    @property
    def color(self) -> bool:
        if self._color is None:
            from aobd.ctl.render import use_color

            self._color = use_color(sys.stdout)
        return self._color

    @property
    def client(self) -> Client:
        if self._client is None:
            from aobd.ctl.client import Client, resolve_target

            target = resolve_target(
                socket_path=getattr(self.args, "socket", None),
                url=getattr(self.args, "url", None),
                token=getattr(self.args, "token", None),
                environ=os.environ,
            )
            self._client = Client(target, timeout=getattr(self.args, "timeout", None) or 30.0)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def emit(self, value: Any, human: Callable[[Any], str]) -> None:
        """Print ``value`` as one line of JSON with ``--json``, else ``human(value)``."""
        if self.json:
            print_json(value)
        else:
            sys.stdout.write(human(value) + "\n")


def print_json(value: Any) -> None:
    import json

    sys.stdout.write(json.dumps(value, separators=(",", ":"), ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _fail(message: str, code: str = "aobctl_error") -> Exception:
    from aobd.ctl.client import CtlError

    return CtlError(message, code=code)


def read_json_file(path: str) -> Any:
    import json

    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise _fail(f"{path}: no such file", "file_not_found") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise _fail(f"{path}: cannot read: {exc.strerror}", "file_unreadable") from None
    except ValueError as exc:
        raise _fail(f"{path}: not valid JSON: {exc}", "invalid_json") from None


def parse_inputs(text: str) -> Any:
    """``--inputs``: inline JSON, or ``@FILE``."""
    if text.startswith("@"):
        return read_json_file(text[1:])
    import json

    try:
        return json.loads(text)
    except ValueError as exc:
        raise _fail(f"--inputs is not valid JSON ({exc}); pass a JSON value or @FILE", "invalid_json") from None


def _seg(value: str) -> str:
    from aobd.ctl.client import segment

    return segment(value)


def _render_summary(summary: dict[str, Any], color: bool) -> str:
    from aobd.cli.render import render_summary

    return render_summary(summary, color=color)


# -- workflows ----------------------------------------------------------------------------------------------


def cmd_workflow_validate(ctl: Ctl) -> int:
    # Structure only: handlers are resolved by the daemon that runs them, whose import path is not ours.
    from aobd.model.validate import validate_document

    path = ctl.args.file
    _, problems = validate_document(read_json_file(path))
    if ctl.json:
        import msgspec

        print_json({"valid": not problems, "problems": [msgspec.to_builtins(p) for p in problems]})
    elif problems:
        from aobd.ctl.render import render_problems

        sys.stdout.write(render_problems(path, [str(p) for p in problems]) + "\n")
    else:
        sys.stdout.write(f"{path}: valid\n")
    return EXIT_FAILED if problems else EXIT_OK


def cmd_workflow_put(ctl: Ctl) -> int:
    body = {"definition": read_json_file(ctl.args.file)}
    if ctl.args.tag:
        body["tag"] = ctl.args.tag
    ref = ctl.client.post("/v1/workflows", body)

    def human(r: dict[str, Any]) -> str:
        tag = f" (tag {r['tag']})" if r.get("tag") else ""
        return f"workflow {r['workflow']} registered: version {r['version']}{tag}"

    ctl.emit(ref, human)
    return EXIT_OK


def cmd_workflow_list(ctl: Ctl) -> int:
    from aobd.ctl.render import render_workflows

    ctl.emit(ctl.client.get("/v1/workflows"), render_workflows)
    return EXIT_OK


def cmd_workflow_show(ctl: Ctl) -> int:
    from aobd.ctl.render import render_workflow

    ctl.emit(ctl.client.get(f"/v1/workflows/{_seg(ctl.args.name)}", tag=ctl.args.tag), render_workflow)
    return EXIT_OK


# -- runs ---------------------------------------------------------------------------------------------------


def cmd_run_start(ctl: Ctl) -> int:
    args = ctl.args
    body: dict[str, Any] = {"inputs": parse_inputs(args.inputs) if args.inputs is not None else {}}
    if os.path.isfile(args.workflow):
        body["definition"] = read_json_file(args.workflow)
    elif args.workflow.endswith(".json") or os.sep in args.workflow:
        raise _fail(f"{args.workflow}: no such file (a registered workflow is named without a path)", "file_not_found")
    else:
        body["workflow"] = args.workflow
    if args.tag:
        body["tag"] = args.tag
    if args.idempotency_key:
        body["idempotency_key"] = args.idempotency_key
    if args.priority:
        body["priority"] = args.priority
    if args.patch_set:
        body["patch_set"] = [p.strip() for p in args.patch_set.split(",") if p.strip()]
    summary = ctl.client.post("/v1/runs", body)
    return _show_run(ctl, summary, wait=args.wait)


def _show_run(ctl: Ctl, summary: dict[str, Any], *, wait: bool) -> int:
    if wait:
        summary = follow_run(ctl, summary)
    ctl.emit(summary, lambda s: _render_summary(s, ctl.color))
    if wait:
        return EXIT_OK if summary.get("status") == "completed" else EXIT_FAILED
    return EXIT_OK


def follow_run(ctl: Ctl, summary: dict[str, Any]) -> dict[str, Any]:
    """Wait for a run to end, with a progress line on a terminal; return its final summary."""
    from aobd.ctl.client import TERMINAL_STATUSES, EventFollower
    from aobd.ctl.render import RunProgress, Spinner

    run_id = summary["run_id"]
    if summary.get("status") in TERMINAL_STATUSES:
        return summary
    progress = RunProgress(run_id, list(summary.get("nodes") or {}))
    spinner = Spinner(sys.stderr)

    def reconnecting(why: str) -> None:
        spinner.update(f"{progress.text()} · reconnecting ({why})")

    follower = EventFollower(ctl.client, run_id, on_reconnect=reconnecting)
    spinner.start(progress.text())
    try:
        for event in follower:
            progress.update(event)
            spinner.update(progress.text())
    except KeyboardInterrupt:
        spinner.stop()
        sys.stderr.write(f"aobctl: stopped waiting; run {run_id} goes on (aobctl run get {run_id})\n")
        raise
    finally:
        spinner.stop()
    final: dict[str, Any] = ctl.client.get(f"/v1/runs/{_seg(run_id)}")
    return final


def cmd_run_get(ctl: Ctl) -> int:
    ctl.emit(ctl.client.get(f"/v1/runs/{_seg(ctl.args.run_id)}"), lambda s: _render_summary(s, ctl.color))
    return EXIT_OK


def cmd_run_list(ctl: Ctl) -> int:
    from aobd.ctl.render import render_runs

    runs = ctl.client.get("/v1/runs", status=ctl.args.status, limit=ctl.args.limit)
    ctl.emit(runs, lambda r: render_runs(r, color=ctl.color))
    return EXIT_OK


def cmd_run_cancel(ctl: Ctl) -> int:
    body = {"reason": ctl.args.reason} if ctl.args.reason else {}
    summary = ctl.client.post(f"/v1/runs/{_seg(ctl.args.run_id)}/cancel", body)
    ctl.emit(summary, lambda s: _render_summary(s, ctl.color))
    return EXIT_OK


def cmd_run_timeline(ctl: Ctl) -> int:
    from aobd.ctl.render import EventLines

    events = ctl.client.get(f"/v1/runs/{_seg(ctl.args.run_id)}/events")
    lines = EventLines(color=ctl.color)
    ctl.emit(events, lambda evs: "\n".join(lines(e) for e in evs) if evs else "no events")
    return EXIT_OK


def cmd_logs_stream(ctl: Ctl) -> int:
    from aobd.ctl.client import EventFollower
    from aobd.ctl.render import EventLines, Spinner

    run_id = ctl.args.run_id
    lines = EventLines(color=ctl.color)
    spinner = Spinner(sys.stderr)
    waiting = f"following run {run_id}" + (f" (node {ctl.args.node})" if ctl.args.node else "")

    def reconnecting(why: str) -> None:
        spinner.update(f"{waiting} · reconnecting ({why})")

    follower = EventFollower(ctl.client, run_id, node=ctl.args.node, on_reconnect=reconnecting)
    line: Callable[[dict[str, Any]], str] = lines
    if ctl.json:
        import json

        def line(event: dict[str, Any]) -> str:
            return json.dumps(event, separators=(",", ":"), ensure_ascii=False)

    spinner.start(waiting)
    try:
        for event in follower:
            spinner.echo(line(event), sys.stdout)
            spinner.update(waiting)
    except KeyboardInterrupt:
        spinner.stop()
        sys.stderr.write(f"aobctl: stopped following run {run_id}\n")
        raise
    finally:
        spinner.stop()
    return EXIT_OK if follower.status == "completed" else EXIT_FAILED


def cmd_replay(ctl: Ctl) -> int:
    body = {"from": ctl.args.from_node, "mode": ctl.args.mode}
    summary = ctl.client.post(f"/v1/runs/{_seg(ctl.args.run_id)}/replay", body)
    return _show_run(ctl, summary, wait=ctl.args.wait)


# -- approvals ----------------------------------------------------------------------------------------------


_APPROVAL_KEYS = ("ticket", "run_id", "node_id", "status", "assignees", "deadline")


def cmd_approve(ctl: Ctl) -> int:
    from aobd.ctl.render import render_approval

    body = {"decision": ctl.args.decision, "reason": ctl.args.reason}
    info = ctl.client.post(f"/v1/approvals/{_seg(ctl.args.ticket)}", body)
    ctl.emit(info, lambda a: render_approval(a, color=ctl.color))
    return EXIT_OK


def cmd_approvals_list(ctl: Ctl) -> int:
    from aobd.ctl.render import render_approvals

    status = None if ctl.args.status == "all" else ctl.args.status
    approvals = ctl.client.get("/v1/approvals", status=status) or []
    # The documented shape first (scripts rely on it), then whatever else the daemon says.
    shaped = [{**{k: a.get(k, [] if k == "assignees" else None) for k in _APPROVAL_KEYS}, **a} for a in approvals]
    ctl.emit(shaped, lambda rows: render_approvals(rows, color=ctl.color))
    return EXIT_OK


# -- patches ------------------------------------------------------------------------------------------------


def cmd_patch_list(ctl: Ctl) -> int:
    from aobd.ctl.render import render_patches

    patches = ctl.client.get(f"/v1/runs/{_seg(ctl.args.run_id)}/patches")
    ctl.emit(patches, lambda p: render_patches(p, color=ctl.color))
    return EXIT_OK


def cmd_patch_show(ctl: Ctl) -> int:
    from aobd.ctl.render import render_patch

    ctl.emit(ctl.client.get(f"/v1/patches/{_seg(ctl.args.patch_id)}"), lambda p: render_patch(p, color=ctl.color))
    return EXIT_OK


def cmd_patch_apply(ctl: Ctl) -> int:
    doc = read_json_file(ctl.args.file)
    if isinstance(doc, list):
        body: dict[str, Any] = {"ops": doc}
    elif isinstance(doc, dict) and isinstance(doc.get("ops"), list):
        body = {k: doc[k] for k in ("ops", "reason", "author", "base") if doc.get(k) is not None}
    else:
        raise _fail(f"{ctl.args.file}: expected a JSON array of operations or an object with 'ops'", "invalid_patch")
    if ctl.args.reason:
        body["reason"] = ctl.args.reason
    if ctl.args.author:
        body["author"] = ctl.args.author
    return _patch_result(ctl, ctl.client.post(f"/v1/runs/{_seg(ctl.args.run_id)}/patches", body))


def cmd_patch_decide(ctl: Ctl) -> int:
    body = {"reason": ctl.args.reason} if ctl.args.reason else {}
    return _patch_result(ctl, ctl.client.post(f"/v1/patches/{_seg(ctl.args.patch_id)}/{ctl.args.action}", body))


def _patch_result(ctl: Ctl, info: dict[str, Any]) -> int:
    from aobd.ctl.render import render_patch_result

    ctl.emit(info, lambda p: render_patch_result(p, color=ctl.color))
    # A patch the daemon judged and refused is a failure for whoever proposed or approved it.
    return EXIT_FAILED if info.get("status") == "rejected" and ctl.args.action != "reject" else EXIT_OK


# -- admin --------------------------------------------------------------------------------------------------


def cmd_status(ctl: Ctl) -> int:
    from aobd.ctl.render import render_status

    ctl.emit(ctl.client.get("/v1/admin/status"), lambda s: render_status(s, color=ctl.color))
    return EXIT_OK


def cmd_drain(ctl: Ctl) -> int:
    from aobd.ctl.render import render_status

    ctl.emit(ctl.client.post("/v1/admin/drain"), lambda s: render_status(s, color=ctl.color))
    return EXIT_OK


def cmd_config_show(ctl: Ctl) -> int:
    from aobd.ctl.render import render_config

    ctl.emit(ctl.client.get("/v1/admin/config"), render_config)
    return EXIT_OK


# -- arguments ----------------------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    # Defaults are SUPPRESS so that an option given before the command is not reset by the subparser's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=_SUPPRESS, help="machine-readable output (JSON)")
    conn = common.add_argument_group("connection")
    conn.add_argument(
        "--socket",
        metavar="PATH",
        default=_SUPPRESS,
        help="admin unix socket (env AOBD_ADMIN_SOCKET; default <data_dir>/aobd.sock, data_dir from AOBD_DATA_DIR"
        " or ./.aobd)",
    )
    conn.add_argument("--url", default=_SUPPRESS, help="remote daemon, http(s)://host:port (env AOBCTL_URL)")
    conn.add_argument("--token", default=_SUPPRESS, help="Bearer token for --url (env AOBCTL_TOKEN)")
    conn.add_argument("--timeout", type=float, metavar="S", default=_SUPPRESS, help="request timeout (default 30)")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="aobctl",
        parents=[common],
        description="Admin client of the aobd daemon (the admin unix socket by default, or --url/--token).",
        epilog="exit status: 0 ok, 1 failed (error from the daemon, run not completed), 2 daemon unreachable/usage",
    )
    from aobd import __version__

    parser.add_argument("--version", action="version", version=f"aobctl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def group(name: str, help: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        sub = commands.add_parser(name, help=help, parents=[common], description=help)
        return sub.add_subparsers(dest="action", metavar="ACTION", required=True)

    def leaf(
        where: argparse._SubParsersAction[argparse.ArgumentParser], name: str, func: Callable[[Ctl], int], help: str
    ) -> argparse.ArgumentParser:
        p = where.add_parser(name, help=help, parents=[common], description=help)
        p.set_defaults(func=func, action=name)
        return p

    wf = group("workflow", "register, list and inspect workflows")
    p = leaf(wf, "validate", cmd_workflow_validate, "check a workflow file locally; exit 1 listing every problem")
    p.add_argument("file")
    p = leaf(wf, "put", cmd_workflow_put, "register a workflow file (a new version)")
    p.add_argument("file")
    p.add_argument("--tag", help="a movable name for this version (e.g. main)")
    leaf(wf, "list", cmd_workflow_list, "list registered workflows")
    p = leaf(wf, "show", cmd_workflow_show, "show a workflow and its definition")
    p.add_argument("name")
    p.add_argument("--tag", help="the version with this tag (default latest)")

    run = group("run", "start, inspect and cancel runs")
    p = leaf(run, "start", cmd_run_start, "start a run of a workflow file or of a registered workflow")
    p.add_argument("workflow", metavar="FILE_OR_NAME", help="a workflow file (sent inline) or a registered name")
    p.add_argument("--inputs", metavar="JSON|@FILE", help="run inputs as JSON, or @FILE (default {})")
    p.add_argument("--tag", help="version tag of a registered workflow")
    p.add_argument("--idempotency-key", metavar="K", help="starting twice with the same key returns the first run")
    p.add_argument("--priority", choices=["high", "medium", "low"])
    p.add_argument("--patch-set", metavar="ID,ID", help="earlier patches to apply to the base at start (A/B)")
    p.add_argument("--wait", action="store_true", help="follow the run until it ends; exit 0 iff it completed")
    p = leaf(run, "get", cmd_run_get, "show a run summary")
    p.add_argument("run_id", metavar="RUN")
    p = leaf(run, "list", cmd_run_list, "list runs, newest first")
    p.add_argument("--status", choices=["running", "waiting", "completed", "failed", "cancelled"])
    p.add_argument("--limit", type=int, default=50)
    p = leaf(run, "cancel", cmd_run_cancel, "cancel a run")
    p.add_argument("run_id", metavar="RUN")
    p.add_argument("--reason", help="recorded in RunCancelled")
    p = leaf(run, "timeline", cmd_run_timeline, "the events of a run so far")
    p.add_argument("run_id", metavar="RUN")

    logs = group("logs", "follow a run's events live")
    p = leaf(logs, "stream", cmd_logs_stream, "follow a run's events until it ends; exit 0 iff it completed")
    p.add_argument("run_id", metavar="RUN")
    p.add_argument("--node", metavar="N", help="only the events of this node (and the run's end)")

    p = commands.add_parser("approve", parents=[common], help="decide an approval ticket")
    p.set_defaults(func=cmd_approve)
    p.add_argument("ticket", metavar="TICKET")
    p.add_argument("decision", choices=["approve", "reject"])
    p.add_argument("--reason", required=True, help="why (recorded with the decision)")

    approvals = group("approvals", "approval tickets")
    p = leaf(approvals, "list", cmd_approvals_list, "list approval tickets")
    p.add_argument("--status", choices=["pending", "approved", "rejected", "all"], default="pending")

    p = commands.add_parser("replay", parents=[common], help="replay a run from a node (a new run)")
    p.set_defaults(func=cmd_replay)
    p.add_argument("run_id", metavar="RUN")
    p.add_argument("--from", dest="from_node", metavar="NODE", required=True, help="the node to restart from")
    p.add_argument("--mode", choices=["freeze", "live"], default="freeze", help="freeze: reuse outputs before NODE")
    p.add_argument("--wait", action="store_true", help="follow the new run until it ends; exit 0 iff it completed")

    patch = group("patch", "propose and decide patches of a run's workflow")
    p = leaf(patch, "list", cmd_patch_list, "list a run's patches")
    p.add_argument("run_id", metavar="RUN")
    p = leaf(patch, "show", cmd_patch_show, "show one patch")
    p.add_argument("patch_id", metavar="ID")
    p = leaf(patch, "apply", cmd_patch_apply, "propose a patch to a run (exit 1 if it is rejected)")
    p.add_argument("run_id", metavar="RUN")
    p.add_argument("file", metavar="FILE", help='{"ops": [...], "reason": ...} or a bare array of RFC 6902 ops')
    p.add_argument("--reason")
    p.add_argument("--author")
    for name, help in (
        ("approve", "approve a pending patch"),
        ("reject", "reject a pending patch"),
        ("rollback", "roll an applied patch back"),
    ):
        p = leaf(patch, name, cmd_patch_decide, help)
        p.add_argument("patch_id", metavar="ID")
        p.add_argument("--reason")

    p = commands.add_parser("status", parents=[common], help="daemon status")
    p.set_defaults(func=cmd_status)
    p = commands.add_parser("drain", parents=[common], help="stop taking new runs; finish the running ones")
    p.set_defaults(func=cmd_drain)
    cfg = group("config", "the daemon's configuration")
    leaf(cfg, "show", cmd_config_show, "the effective configuration (secrets masked)")
    return parser


# -- entry point --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctl = Ctl(args)
    try:
        return int(args.func(ctl))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`aobctl ... | head`): say nothing more, and keep Python from failing at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as exc:
        from aobd.ctl.client import CtlError

        if not isinstance(exc, CtlError):
            raise
        if ctl.json:
            print_json({"error": exc.to_dict()})
        sys.stderr.write(f"aobctl: {exc}\n")
        return exc.exit_code
    finally:
        ctl.close()


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
