"""The one configuration object: a frozen msgspec Struct tree from TOML plus ``AOBD_*`` environment variables.

Loaded once at start (``load_config``) and passed down; nothing else reads the environment (except the
``aobd._fast`` implementation chooser, which must decide at import). Errors name the offending key.
Every key is documented in ``configs/aobd.toml``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from aobd.errors import ConfigError
from aobd.gctune import DEFAULT_SWITCH_INTERVAL_MS, DEFAULT_THRESHOLDS


class ApiConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: host:port of the HTTP API (env AOBD_API_LISTEN).
    listen: str = "127.0.0.1:7070"
    #: Request bodies larger than this are refused with 413 before they are read whole.
    max_body_bytes: int = 1_048_576
    #: Serve /metrics without a token (for a Prometheus on a trusted network).
    metrics_public: bool = False
    #: TLS: certificate and key files (PEM); when set, the API speaks HTTPS with ALPN h2/http1.1.
    tls_cert: str = ""
    tls_key: str = ""
    #: Seconds between SSE/WebSocket heartbeats on idle streams.
    heartbeat_s: float = 15.0
    #: Events buffered per stream subscriber before a slow one is disconnected.
    stream_buffer: int = 1024
    #: Listen backlog of the API's socket: connections the kernel holds until a worker accepts them (the kernel
    #: caps it at net.core.somaxconn, see tuning/90-aobd.conf). Beyond it, new connections are dropped and their
    #: clients retry after 1, 3, 7, 15... seconds.
    backlog: Annotated[int, msgspec.Meta(ge=128)] = 1024
    #: Requests each HTTP worker serves at once (granian's backpressure); further connections wait in the backlog.
    #: A long-poll (POST /v1/runs?wait=) and a stream (SSE, WebSocket) hold theirs for as long as they last, so
    #: this bounds waiting clients plus stream subscribers, not the request rate. granian's own default (128 for
    #: an embedded server) let 128 open streams make the API unreachable.
    max_concurrent_requests: Annotated[int, msgspec.Meta(ge=1)] = 8192


class AdminConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: Unix socket of the admin API used by aobctl; empty means ``<data_dir>/aobd.sock`` (env AOBD_ADMIN_SOCKET).
    socket: str = ""


class SecurityConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: Outbound HTTP targets allowed despite the SSRF guard: "host:port", "host" or CIDR (env AOBD_HTTP_ALLOW).
    http_allow: list[str] = msgspec.field(default_factory=list)
    #: Python modules whose functions workflows submitted to the daemon may call as handlers (`module:attr`);
    #: a module allows its submodules. Builtins are always allowed. Empty: builtins only. A handler runs with
    #: the daemon's privileges, so list only modules written to be called by workflows.
    handler_modules: list[str] = msgspec.field(default_factory=list)


class TokenConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: The bearer secret. Never logged; `aobctl config show` masks it.
    token: str
    workspace: str = "default"
    role: Literal["read", "write", "admin"] = "read"
    #: Who this token is, recorded as the author of patches and decisions (defaults to "token:<workspace>").
    name: str = ""


class AuthConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tokens: list[TokenConfig] = msgspec.field(default_factory=list)


class LimitsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: Per-workspace token buckets (requests per second, burst); 0 disables a limit.
    run_starts_per_s: float = 200.0
    run_starts_burst: int = 400
    patches_per_s: float = 20.0
    patches_burst: int = 40


class DaemonConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: On SIGTERM, how long in-flight node attempts may run before the daemon exits anyway.
    drain_grace_s: float = 20.0
    #: "json" (one object per line, for journald and log shippers) or "console".
    log_format: Literal["json", "console"] = "json"
    log_level: str = "info"
    #: The garbage collector's thresholds in aobd's processes (gc.set_threshold); [] keeps CPython's (700, 10, 10).
    #: Why: aobd/gctune.py.
    gc_thresholds: Annotated[list[Annotated[int, msgspec.Meta(ge=1)]], msgspec.Meta(max_length=3)] = msgspec.field(
        default_factory=lambda: list(DEFAULT_THRESHOLDS)
    )
    #: How long a thread waits for the GIL before the running one must drop it (sys.setswitchinterval), in ms;
    #: 0 keeps CPython's 5 ms. Why: aobd/gctune.py.
    switch_interval_ms: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = DEFAULT_SWITCH_INTERVAL_MS


class ApprovalsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: Webhooks that approval escalations name in ``notify`` (name -> URL; the SSRF guard applies).
    webhooks: dict[str, str] = msgspec.field(default_factory=dict)


class WorkspacePolicyConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Patch governance for every run of a workspace; merged with each workflow's policy, the stricter wins."""

    patches: Literal["auto", "approve", "deny"] = "auto"
    max_spawned_nodes: int | None = None
    max_patches: int | None = None
    allowed_node_types: list[str] | None = None
    max_agent_depth: int | None = None


class StorageConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: "sqlite" (embedded, <data_dir>/events.db) or "postgres" (shared by several daemons).
    event_log: Literal["sqlite", "postgres"] = "sqlite"
    #: "local" (<data_dir>/cas) or "s3".
    cas: Literal["local", "s3"] = "local"
    #: Postgres connection string (env AOBD_POSTGRES_DSN), for event_log = "postgres".
    postgres_dsn: str = ""
    #: Apply schema migrations at start (otherwise run `aobd migrate` first).
    migrate_on_start: bool = False


class S3Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: The bucket (it must exist); credentials come from the standard AWS chain, never from this file.
    bucket: str = ""
    prefix: str = "cas/"
    #: An S3-compatible endpoint (MinIO, Ceph); empty: AWS.
    endpoint_url: str = ""
    region: str = ""
    #: Local read cache of blobs (verified on every read); empty: <data_dir>/s3-cache.
    cache_dir: str = ""
    cache_bytes: int = 1 << 30


class RedisConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: redis:// URL (env AOBD_REDIS_URL); when set, rate limits are shared by every daemon through Redis.
    url: str = ""


class ClusterConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: Several daemons share the runs: ownership by Kafka partition (needs [kafka], Postgres and S3).
    enabled: bool = False
    #: This daemon's name in the cluster (recorded as the writer of its events); empty: hostname:pid.
    daemon_id: str = ""
    #: Where node attempts of function and http nodes execute: "bus" publishes them on node.jobs.<priority>
    #: for any daemon's runners; "local" runs them in the daemon that owns the run.
    execution: Literal["bus", "local"] = "local"
    #: The URL other daemons reach this one's API at, to forward commands for runs it drives; empty: from
    #: api.listen (with this host's name when it listens on every address).
    advertise_url: str = ""
    #: With execution = "bus": node jobs this daemon's runner executes at once (taken from node.jobs.*; a job
    #: waits on Kafka, not in memory, while every slot is busy). 0: this daemon runs no jobs, it only orchestrates.
    runner_concurrency: Annotated[int, msgspec.Meta(ge=0)] = 256
    #: The secret every daemon of the cluster shares (env AOBD_PEER_TOKEN), at least 32 printable ASCII characters.
    #: With it, a command sent over the admin socket for a run another daemon drives is forwarded to that daemon,
    #: which accepts it as the admin socket's caller; without it, such a command gets a 409 naming the owner.
    #: Never logged; `aobctl config show` masks it.
    peer_token: str = ""
    #: A file holding peer_token (e.g. a systemd credential), read at start and on reload; set one of the two.
    peer_token_file: str = ""


#: The most orchestrators ``[planes] orchestrators = 0`` starts.
AUTO_ORCHESTRATORS_MAX = 4


class PlanesConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The multi-process daemon (``aobd serve`` without ``--single-process``): process groups and their cores."""

    #: Orchestrator processes; each drives the runs whose hash of run_id falls in its shard. 0: one on the embedded
    #: SQLite log, one per CPU (at most 4) on Postgres (env AOBD_PLANES_ORCHESTRATORS); see orchestrator_count().
    orchestrators: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: Runner processes executing function and http node attempts.
    runners: int = 1
    #: HTTP accept workers sharing the API port (SO_REUSEPORT).
    accept_workers: int = 2
    #: Cores per group (os.sched_setaffinity); empty: no pinning.
    control_cpus: list[int] = msgspec.field(default_factory=list)
    runner_cpus: list[int] = msgspec.field(default_factory=list)
    fanout_cpus: list[int] = msgspec.field(default_factory=list)
    #: Restart backoff of a crashed child: doubles from the first value up to the second.
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 30.0
    #: Jobs one runner executes at once for each orchestrator (its credit); 0: the default (256).
    runner_credit: int = 0
    #: Where sync function handlers not marked ``blocking`` run. true: in the orchestrator, inline in the step
    #: that made them ready (two zmq hops less per attempt, but a slow handler stalls its orchestrator's shard);
    #: false: on the runner plane; "auto": inline until a handler proves slow (a call over inline_budget_ms, or a
    #: hang or crash while it ran), then on the runner plane (aobd.engine.inline_policy). See tuning/planes.md.
    inline_sync_handlers: bool | Literal["auto"] = "auto"
    #: "auto": the longest inline call a handler may take before its attempts go to the runner plane.
    inline_budget_ms: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    #: Where the planes' ipc sockets live; empty: <data_dir>/planes. A path too long for a unix socket
    #: (107 bytes) falls back to $XDG_RUNTIME_DIR or /tmp, under aobd-<hash of the directory>.
    socket_dir: str = ""


class EngineConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: "full" records every event; "fast" leaves out NodeScheduled/NodeStarted (env AOBD_FIDELITY).
    fidelity: Literal["full", "fast"] = "full"
    #: Node attempts executing at once in this process.
    max_inflight: int = 10_000
    #: Runs this process computes at once (0: no limit); more new runs wait to start, by priority, and a run
    #: waiting on a runner, an HTTP call, an approval or a timer does not count (aobd.engine.admission, whose
    #: DEFAULT_LIMIT is the same number: a literal here, so that loading the config does not import asyncio).
    max_computing_runs: Annotated[int, msgspec.Meta(ge=0)] = 128
    #: How long a new run may wait to start before ``POST /v1/runs`` answers 503 (nothing recorded: safe to
    #: retry). In the planes an accept worker waits this much longer for the orchestrator's answer.
    start_wait_s: Annotated[float, msgspec.Meta(gt=0.0)] = 5.0


class KafkaConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``[kafka]`` table: where the brokers are, the topic names and how the clients are tuned."""

    #: Comma-separated ``host:port`` list of brokers to bootstrap from.
    bootstrap: str = "127.0.0.1:9092"
    #: Run events, keyed by run_id, with a ``seq`` header.
    events_topic: str = "workflow.events"
    #: Node jobs by priority; consumers serve high before medium before low without starving low.
    jobs_high_topic: str = "node.jobs.high"
    jobs_medium_topic: str = "node.jobs.medium"
    jobs_low_topic: str = "node.jobs.low"
    #: Node attempt results, back to the orchestrator that owns the run.
    results_topic: str = "node.results"
    #: Agent jobs for external runners and their results.
    agent_jobs_topic: str = "agent.jobs"
    agent_results_topic: str = "agent.results"
    #: Partitions of every topic ensure_topics creates. The partition of a run follows from it, so it cannot
    #: change while runs are in flight; it also caps how many orchestrators share the runs.
    partitions: int = 12
    #: Replicas of every topic; -1 takes the broker's ``default.replication.factor``.
    replication_factor: int = -1
    #: Consumer group of the orchestrators (the planes that own runs).
    group_id: str = "aobd"
    #: librdkafka settings for every client (e.g. ``"security.protocol"``, ``"sasl.mechanisms"``).
    client: dict[str, str | int | float | bool] = msgspec.field(default_factory=dict)
    #: librdkafka settings for producers only (e.g. ``"linger.ms"``, ``"compression.type"``).
    producer: dict[str, str | int | float | bool] = msgspec.field(default_factory=dict)
    #: librdkafka settings for consumers only (e.g. ``"session.timeout.ms"``, ``"fetch.max.bytes"``).
    consumer: dict[str, str | int | float | bool] = msgspec.field(default_factory=dict)

    @property
    def job_topics(self) -> tuple[str, str, str]:
        """Node job topics from the highest priority to the lowest."""
        return (self.jobs_high_topic, self.jobs_medium_topic, self.jobs_low_topic)

    @property
    def topics(self) -> tuple[str, ...]:
        return (
            self.events_topic,
            *self.job_topics,
            self.results_topic,
            self.agent_jobs_topic,
            self.agent_results_topic,
        )


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: Where the embedded stores live (env AOBD_DATA_DIR).
    data_dir: str = "./.aobd"
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    daemon: DaemonConfig = msgspec.field(default_factory=DaemonConfig)
    approvals: ApprovalsConfig = msgspec.field(default_factory=ApprovalsConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    s3: S3Config = msgspec.field(default_factory=S3Config)
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    planes: PlanesConfig = msgspec.field(default_factory=PlanesConfig)
    #: The Kafka bus: brokers, topic names, partitions, client settings.
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    #: Per-workspace patch governance: ``[workspaces.acme] patches = "approve"``.
    workspaces: dict[str, WorkspacePolicyConfig] = msgspec.field(default_factory=dict)

    def workspace_policy(self, workspace: str) -> dict[str, Any] | None:
        policy = self.workspaces.get(workspace)
        return None if policy is None else {k: v for k, v in msgspec.to_builtins(policy).items() if v is not None}

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def admin_socket(self) -> Path:
        return Path(self.admin.socket) if self.admin.socket else self.data_path / "aobd.sock"


#: Environment variable -> (dotted key, parser).
_ENV: dict[str, tuple[str, Any]] = {
    "AOBD_DATA_DIR": ("data_dir", str),
    "AOBD_API_LISTEN": ("api.listen", str),
    "AOBD_ADMIN_SOCKET": ("admin.socket", str),
    "AOBD_HTTP_ALLOW": ("security.http_allow", lambda v: [x.strip() for x in v.split(",") if x.strip()]),
    "AOBD_FIDELITY": ("engine.fidelity", str),
    "AOBD_LOG_FORMAT": ("daemon.log_format", str),
    "AOBD_LOG_LEVEL": ("daemon.log_level", str),
    "AOBD_POSTGRES_DSN": ("storage.postgres_dsn", str),
    "AOBD_REDIS_URL": ("redis.url", str),
    "AOBD_KAFKA_BOOTSTRAP": ("kafka.bootstrap", str),
    "AOBD_DAEMON_ID": ("cluster.daemon_id", str),
    "AOBD_PEER_TOKEN": ("cluster.peer_token", str),
    "AOBD_PLANES_ORCHESTRATORS": ("planes.orchestrators", int),
}


def orchestrator_count(config: Config) -> int:
    """How many orchestrators the multi-process daemon runs: ``planes.orchestrators``, or for 0:

    - on the embedded SQLite log, one. Every orchestrator commits to the same file, and SQLite takes one writer at
      a time: a second orchestrator halves each group commit, and measured on 2 cores it cost 40% more CPU per
      node and a worse hop p99 at 64 runs in flight, for 10% more throughput only at 800 (docs/performance.md);
    - on Postgres, one per CPU this process may run on, at most :data:`AUTO_ORCHESTRATORS_MAX`: their commits do
      not serialize, and the orchestrator's loop is the daemon's busiest.

    The supervisor resolves it once and exports it to its children (``AOBD_PLANES_ORCHESTRATORS``), whose own
    CPU sets may be narrower.
    """
    if config.planes.orchestrators > 0:
        return config.planes.orchestrators
    if config.storage.event_log != "postgres":
        return 1
    return max(1, min(AUTO_ORCHESTRATORS_MAX, len(os.sched_getaffinity(0))))


def masked(config: Config) -> dict[str, Any]:
    """The effective configuration with secrets replaced, for `aobctl config show` and logs."""
    tree: dict[str, Any] = msgspec.to_builtins(config)
    for token in tree.get("auth", {}).get("tokens", []):
        token["token"] = "***"
    if tree.get("cluster", {}).get("peer_token"):
        tree["cluster"]["peer_token"] = "***"
    return tree


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """TOML file (optional), then environment, then explicit overrides (CLI flags), validated once."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    environ = os.environ if env is None else env
    for name, (key, parse) in _ENV.items():
        if name in environ:
            _set(raw, key, parse(environ[name]))
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(raw, key, value)
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}: {exc}") from None
    return _with_peer_token(config)


#: The fewest characters of cluster.peer_token: 32 hex digits are 128 bits, beyond guessing over the network.
PEER_TOKEN_MIN = 32


def _with_peer_token(config: Config) -> Config:
    """``config`` with ``cluster.peer_token`` read from ``cluster.peer_token_file`` when that is set, checked."""
    cluster = config.cluster
    token = cluster.peer_token
    if cluster.peer_token_file:
        if token:
            raise ConfigError("set cluster.peer_token or cluster.peer_token_file, not both")
        try:
            token = Path(cluster.peer_token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"cluster.peer_token_file {cluster.peer_token_file} cannot be read: {exc.strerror or exc}"
            ) from None
        if not token:
            raise ConfigError(f"cluster.peer_token_file {cluster.peer_token_file} is empty")
        config = msgspec.structs.replace(config, cluster=msgspec.structs.replace(cluster, peer_token=token))
    key = "cluster.peer_token_file" if cluster.peer_token_file else "cluster.peer_token"
    if token and (len(token) < PEER_TOKEN_MIN or not (token.isascii() and token.isprintable()) or " " in token):
        # It travels as an HTTP header and grants admin: printable ASCII without spaces, and long enough.
        raise ConfigError(
            f"{key} must be at least {PEER_TOKEN_MIN} printable ASCII characters without spaces "
            f"(e.g. the output of `openssl rand -hex 32`), the same on every daemon of the cluster"
        )
    return config


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value
