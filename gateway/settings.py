"""Typed settings, one section per stage: defaults < YAML file < GATEWAY_* env < CLI flags.

``load_settings`` validates everything at start-up and raises ``SettingsError`` naming the
file, the key path and the value at fault. Model configs in the repository (``config.yaml``)
are validated by the same machinery (``load_model_config``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import SettingsError

__all__ = [
    "RPC_ACCESS",
    "AdminSettings",
    "AlertRule",
    "AuditSettings",
    "AuthSettings",
    "Budget",
    "CacheSettings",
    "CanaryPolicy",
    "ClientTlsSettings",
    "ContractBinding",
    "CostSettings",
    "DecisionSpec",
    "DynamicBatching",
    "EvaluationSettings",
    "EventsSettings",
    "MatchRule",
    "ModelConfig",
    "Price",
    "QueuePolicy",
    "RateLimit",
    "RemoteSettings",
    "RepositorySettings",
    "RouteSpec",
    "RoutingSettings",
    "RuntimeSettings",
    "ServerSettings",
    "Settings",
    "ShadowSpec",
    "SidecarAuthSettings",
    "StateSettings",
    "TelemetrySettings",
    "TlsSettings",
    "VariantSpec",
    "VersionPolicy",
    "describe_validation_error",
    "describe_yaml_error",
    "load_model_config",
    "load_settings",
    "read_secret",
    "read_yaml",
]

ENV_PREFIX = "GATEWAY_"
GraphOptimization = Literal["disable", "basic", "extended", "all"]
Device = Literal["auto", "cpu", "cuda"]
Execution = Literal["auto", "thread", "inline"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(_Section):
    """TLS on a server port. The files are read again when they change (a renewed certificate
    takes effect at the next handshake, without a restart)."""

    cert_file: Path | None = Field(
        None, description="PEM certificate chain the server presents; null: no TLS."
    )
    key_file: Path | None = Field(None, description="PEM private key of cert_file.")
    client_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle; when set, clients must present a certificate it signed "
        "(mTLS), and a handshake without one fails.",
    )

    @model_validator(mode="after")
    def _pairs(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file needs cert_file and key_file (mTLS is TLS)")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class ClientTlsSettings(_Section):
    """TLS for a connection this process opens: the server's certificate must chain to
    ``ca_file``; ``cert_file``/``key_file`` are this side's certificate, for mTLS."""

    ca_file: Path | None = Field(
        None, description="PEM CA bundle the server's certificate must chain to; null: no TLS."
    )
    cert_file: Path | None = Field(None, description="Client certificate (mTLS).")
    key_file: Path | None = Field(None, description="Private key of cert_file.")
    server_name: str | None = Field(
        None, description="Name to verify the server's certificate against, if not the host."
    )

    @model_validator(mode="after")
    def _pairs(self) -> ClientTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.cert_file is not None and self.ca_file is None:
            raise ValueError("cert_file needs ca_file (a client certificate rides on TLS)")
        return self

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None


def read_secret(value: SecretStr | None, file: Path | None, where: str) -> str | None:
    """A secret given inline (``value``) or in ``file``: the file must not be readable by
    group or others (0600), else SettingsError naming ``where``. Never logged."""
    if file is not None:
        try:
            mode = file.stat().st_mode
            if mode & 0o077:
                raise SettingsError(
                    f"{where}: {file} has mode {mode & 0o777:04o}: others can read it; "
                    f"chmod 600 {file}"
                )
            return file.read_text().strip() or None
        except OSError as err:
            raise SettingsError(f"{where}: cannot read {file}: {err.strerror}") from None
    return value.get_secret_value() if value is not None else None


class ServerSettings(_Section):
    transport: Literal["auto", "native", "grpcio"] = Field(
        "auto",
        description="gRPC transport: native (HTTP/2 in Rust, outside the GIL: pygrpc-native), "
        "grpcio (grpc.aio), or auto: native where it is installed and can serve these "
        "settings, grpcio otherwise (the log says why).",
    )
    host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    port: int = Field(8001, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    max_message_bytes: int = Field(
        64 * 1024 * 1024,
        gt=0,
        description="Largest request accepted; bigger requests get INVALID_ARGUMENT. The "
        "transport refuses anything over twice this with RESOURCE_EXHAUSTED unread.",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM/SIGINT, how long in-flight requests may finish."
    )
    workers: int = Field(
        1, ge=1, description="Gateway processes sharing the port (SO_REUSEPORT); see README."
    )
    reuse_port: bool = Field(
        False, description="Bind with SO_REUSEPORT (set for the workers of multi-process mode)."
    )
    max_concurrent_rpcs: int = Field(
        4096,
        gt=0,
        description="RPCs the server holds at once (a stream counts once); beyond it gRPC "
        "answers RESOURCE_EXHAUSTED before any request is read.",
    )
    stream_max_in_flight: int = Field(
        1024, gt=0, description="Requests one ModelStreamInfer stream may have running at once."
    )
    http_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="KServe v2 REST (with Triton's binary tensor extension) on this port, "
        "beside gRPC, on server.host (HTTPS with tls.cert_file); 0 picks a free one; null: "
        "no HTTP.",
    )
    http_transport: Literal["auto", "uvicorn", "aiohttp"] = Field(
        "auto",
        description="The HTTP server: uvicorn (httptools) or aiohttp; auto: the one measured "
        "fastest here (benchmarks/bench_http.py).",
    )


class RepositorySettings(_Section):
    path: Path | None = Field(None, description="Model repository directory.")
    load_at_start: bool = Field(True, description="Load every model found at start-up.")


class RuntimeSettings(_Section):
    device: Device = Field(
        "auto", description="Execution provider: cuda, cpu, or auto (CUDA when it really works)."
    )
    intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime threads per session run; 0 = cores / instances."
    )
    inter_op_threads: int = Field(1, ge=0, description="ONNX Runtime inter-op threads.")
    graph_optimization: GraphOptimization = Field("all", description="ORT graph optimisation.")


class TelemetrySettings(_Section):
    tracing: Literal["off", "console", "otlp"] = Field("off", description="Span exporter.")
    otlp_endpoint: str = Field("http://127.0.0.1:4317", description="OTLP/gRPC collector.")
    trace_sample_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of new traces recorded (by trace id: every span of a trace or none).",
    )
    trace_parent_based: bool = Field(
        True,
        description="A request whose caller's traceparent says sampled (or not) follows it; "
        "trace_sample_ratio decides only for traces that start here.",
    )
    service_name: str = Field("gateway", description="OpenTelemetry service.name.")
    metrics_host: str = Field("127.0.0.1", description="Prometheus endpoint address.")
    metrics_port: int | None = Field(
        8002, ge=0, le=65535, description="Prometheus HTTP port; 0 picks one, null disables."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def check_redis_url(url: SecretStr | None, field: str) -> None:
    """A Redis URL redis-py can use (redis://, rediss:// or unix://, a numeric port and db);
    the message names ``field`` and never repeats the URL (it may hold a password)."""
    if url is None:
        return
    parts = urlsplit(url.get_secret_value())
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"{field}: the scheme must be redis://, rediss:// or unix://")
    try:
        _ = parts.port  # ValueError when not a number in range
    except ValueError:
        raise ValueError(f"{field}: the port is not a number from 1 to 65535") from None
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise ValueError(f"{field}: the database is a number (redis://host:port/0)")


class BrokerSettings(_Section):
    """A durable broker between gateways and sidecars: Redis Streams. A model's events always
    go to one partition (a stream), so one sidecar can own a model's whole history."""

    url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="redis://[user:password@]host:port/db (a secret: it may hold a password). "
        "Durability is Redis': run it with appendonly yes (appendfsync always to lose no "
        "acknowledged batch when its machine fails).",
    )
    stream: str = Field(
        "gateway:events",
        pattern=r"^[A-Za-z0-9:_.-]{1,64}$",
        description="Stream key prefix; partition P is the stream '<stream>:<P>'.",
    )
    partitions: int = Field(
        1,
        ge=1,
        le=64,
        description="Streams the events are spread over, by model name (every gateway and "
        "sidecar of one deployment must agree).",
    )
    max_batches: int = Field(
        10_000,
        gt=0,
        description="Batches a partition holds unconsumed (a bound on Redis' memory). At the "
        "bound the gateway stops publishing to it and its write-ahead log keeps the events.",
    )
    timeout_ms: float = Field(
        5000.0, gt=0, le=60_000, description="A broker call that takes longer has failed."
    )

    @model_validator(mode="after")
    def _url(self) -> BrokerSettings:
        check_redis_url(self.url, "url")
        return self

    def stream_key(self, partition: int) -> str:
        return f"{self.stream}:{partition}"

    @property
    def address(self) -> str:
        """host:port/db of the URL, without its password (for logs)."""
        parts = urlsplit(self.url.get_secret_value())
        if parts.scheme == "unix":
            return f"unix:{parts.path}"
        return f"{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"


class EventsSettings(_Section):
    """Prediction events: write-ahead log on local disk, delivered to the evaluation sidecar
    (directly, or through a broker)."""

    sink: Literal["sidecar", "broker"] = Field(
        "sidecar",
        description="sidecar: stream the log to `sidecar`; broker: publish it to "
        "events.broker (Redis Streams), where sidecars consume it.",
    )
    sidecar: str | None = Field(
        None,
        description="The sidecar's gRPC address (host:port); with sink sidecar, null turns "
        "events off.",
    )
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    directory: Path = Field(
        Path(".gateway-events"), description="Write-ahead log directory (one per gateway)."
    )
    max_disk_bytes: int = Field(
        256 * 1024 * 1024, gt=0, description="Bound of the write-ahead log on disk."
    )
    segment_bytes: int = Field(
        8 * 1024 * 1024, gt=0, description="Log segment size; acknowledged segments are deleted."
    )
    on_full: Literal["shed", "drop_oldest"] = Field(
        "shed",
        description="At the disk or memory bound: 'shed' refuses new predictions with "
        "UNAVAILABLE until the sidecar catches up; 'drop_oldest' deletes the oldest "
        "unacknowledged events. Both are counted and logged.",
    )
    fsync: Literal["batch", "interval", "never"] = Field(
        "batch",
        description="fsync the log after every written batch, every fsync_interval_ms, or "
        "never (the OS decides). Events are written off the request path either way.",
    )
    fsync_interval_ms: int = Field(1000, gt=0)
    max_pending: int = Field(
        20_000, gt=0, description="Events answered and not yet in the log (memory bound)."
    )
    max_pending_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Request data those pending events hold."
    )
    # NOTE: every written batch costs a few thread handoffs (writer, log read, ack), and on a
    # busy gateway a handoff costs far more than its work; 250 ms keeps them to a few a second.
    flush_interval_ms: int = Field(
        250, gt=0, description="How often pending events are written, at the latest."
    )
    batch_events: int = Field(512, gt=0, description="Events per written and sent batch.")
    max_in_flight_batches: int = Field(
        32, gt=0, description="Batches sent to the sidecar and not yet acknowledged."
    )
    hash_key: SecretStr | None = Field(
        None,
        description="Key of the hash that stands in for sensitive feature values (or "
        "GATEWAY_EVENTS__HASH_KEY). Default: hash_key_file.",
    )
    hash_key_file: Path | None = Field(
        None,
        description="File holding that key (its raw bytes, a trailing newline included; a "
        "named file must exist), mode 0600, outside `directory` (whoever reads the log must "
        "not find the key beside it). Default: $XDG_STATE_HOME/gateway/hash.key "
        "(~/.local/state/...), made with a random key on first use.",
    )
    token: SecretStr | None = Field(
        None,
        description="Credential the gateway presents to the sidecar (a key of its keys file "
        "with the publish role); or GATEWAY_EVENTS__TOKEN.",
    )
    token_file: Path | None = Field(None, description="Read that credential from this file.")
    tls: ClientTlsSettings = Field(
        default_factory=ClientTlsSettings, description="TLS to the sidecar (ca_file turns it on)."
    )
    max_columns: int = Field(
        64,
        gt=0,
        description="A pass-through input, or a contract's assembled model input, wider than "
        "this is left out of events.",
    )
    model_input: Literal["all", "non_sensitive", "off"] = Field(
        "non_sensitive",
        description="What of the matrix a contract assembled an event carries (for the "
        "training-ready export): 'all' (training sees exactly what serving saw, a sensitive "
        "feature's one-hot columns included, in clear in the log, the store and exports); "
        "'non_sensitive' (the columns no sensitive feature fills: sensitive values stay "
        "hashed everywhere); 'off'.",
    )

    @property
    def enabled(self) -> bool:
        """Events are recorded: a sidecar to stream to, or the broker."""
        return self.sink == "broker" or self.sidecar is not None

    @property
    def destination(self) -> str:
        """Where the events go, for messages."""
        if self.sink == "broker":
            return f"the broker's streams {self.broker.stream}:*"
        return f"the sidecar at {self.sidecar}"


AlertMetric = Literal[
    "psi",
    "js",
    "wasserstein",
    "oov",
    "out_of_range",
    "missing",
    "defaulted",
    "output_psi",
    "auc",
    "log_loss",
    "accuracy",
    "ece",
]
PlaybookAction = Literal["retrain", "rollback", "human_review", "tighten_thresholds"]
QUALITY_METRICS: Final = frozenset({"auc", "log_loss", "accuracy", "ece"})


class AlertRule(_Section):
    """An alert of the evaluation sidecar: a metric over a recent window crossing a threshold.

    Each version and segment is checked over its recent window: the events of the last
    ``window_s`` seconds, of them the latest ``window_rows`` rows (labelled rows for quality
    metrics), so how soon a change shows does not depend on how much traffic came before it.
    Feature and output metrics also run a CUSUM over consecutive buckets of ``bucket_rows``
    rows (bucket ``t`` adds its metric minus ``cusum_k`` x the threshold; it fires past
    ``cusum_h`` x the threshold): a full shift fires within a bucket or two. Quality metrics
    fire on their interval (one-sided, ``confidence``), never on the point estimate, and need
    ``min_positives`` and ``min_negatives`` besides ``min_samples`` labelled rows. A version
    and segment under a minimum is reported as not enough data, never silently skipped.
    """

    name: str
    metric: AlertMetric = Field(
        description="Feature metrics (psi, js, wasserstein, oov, out_of_range, missing, "
        "defaulted) are checked per feature; output_psi on the model's first output; auc, "
        "log_loss, accuracy, ece on labelled predictions."
    )
    feature: str = Field("*", description="A feature name, or * for every feature.")
    segment: str = Field(
        "*", description="'name=value', 'all' (all traffic only) or * (all and each segment)."
    )
    above: float | None = None
    below: float | None = None
    window_s: int = Field(
        3600, gt=0, description="The recent window by time: events older than this never count."
    )
    window_rows: int = Field(
        2000,
        gt=0,
        description="The recent window by rows: of the window_s events of a version and "
        "segment, the latest this many rows (labelled rows for quality metrics).",
    )
    min_samples: int = Field(
        200,
        gt=0,
        description="Rows (a feature's present values; labelled rows for quality metrics) a "
        "window needs to be checked.",
    )
    min_positives: int = Field(
        20, ge=0, description="Quality metrics: positive labels a window needs to be checked."
    )
    min_negatives: int = Field(
        20, ge=0, description="Quality metrics: negative labels a window needs to be checked."
    )
    confidence: float = Field(
        0.95,
        ge=0.5,
        lt=1,
        description="Quality metrics fire when the one-sided interval at this level lies past "
        "the threshold (AUC: Hanley-McNeil; log loss: normal; accuracy: Wilson; ECE: "
        "bootstrap). 0.5 compares the point estimate.",
    )
    source: Literal["auto", "values", "contract"] = Field(
        "auto",
        description="oov, out_of_range, missing: from the values against the reference "
        "profile (values), or from the gateway's own contract counts, made before sensitive "
        "values are hashed (contract: outside the contract's vocabulary or range; missing is "
        "what its null policy defaulted). auto: values where the sidecar sees them in clear, "
        "else the contract's counts. defaulted is always the contract's.",
    )
    change_detector: Literal["cusum", "none"] | None = Field(
        None,
        description="cusum: also a CUSUM over buckets of the window (feature and output "
        "metrics with above only); none: the window alone. Null: cusum where it applies.",
    )
    bucket_rows: int = Field(
        200, gt=0, description="Rows per bucket of the CUSUM (consecutive events)."
    )
    cusum_k: float = Field(
        0.5, gt=0, description="The CUSUM's reference value, a fraction of the threshold."
    )
    cusum_h: float = Field(
        1.0, gt=0, description="The CUSUM's decision interval, a multiple of the threshold."
    )
    action: PlaybookAction = Field(description="What to do when it fires (the playbook).")

    @model_validator(mode="after")
    def _one_threshold(self) -> AlertRule:
        if (self.above is None) == (self.below is None):
            raise ValueError("give exactly one of above, below")
        if self.change_detector == "cusum" and not self.is_sequential:
            raise ValueError(
                "change_detector cusum watches rises of feature and output metrics (above); "
                f"metric {self.metric} with {'below' if self.above is None else 'above'} "
                "checks its window only"
            )
        return self

    @property
    def threshold(self) -> float:
        return self.above if self.above is not None else float(self.below or 0.0)

    @property
    def is_sequential(self) -> bool:
        """Whether the CUSUM can run: a rise of a feature or output metric."""
        return self.above is not None and self.metric not in QUALITY_METRICS

    @property
    def uses_cusum(self) -> bool:
        return self.change_detector != "none" and self.is_sequential


def _default_rules() -> tuple[AlertRule, ...]:
    """The sidecar's rules when none are configured.

    Each threshold's false alarms under no change, measured by benchmarks/bench_alerts.py:
    200 seeded replays of 4,000 rows of the demo's reference traffic in four segments,
    checked every 500 rows (benchmarks/results/alerts.md). Quoted per rule below as the share
    of replays in which it fired at least once, for any version and segment (of 200: 0% means
    below about 1.5% at 95% confidence), and the share of single checks.
    """
    return (
        # 0.5% of replays (1 of 200), 0.01% of checks. A full shift fires within ~100 rows.
        AlertRule(name="feature_drift", metric="psi", above=0.2, action="retrain"),
        # 0% of replays: reference traffic holds no new category (contract counts included).
        AlertRule(name="new_categories", metric="oov", above=0.05, action="human_review"),
        # 0% of replays.
        AlertRule(
            name="outside_training_range",
            metric="out_of_range",
            above=0.05,
            action="tighten_thresholds",
        ),
        # 0% of replays (on the point estimate with rows alone: 5.5%). Labels come late: a
        # day of events, the latest 2,000 labelled rows.
        AlertRule(
            name="quality_drop",
            metric="auc",
            below=0.6,
            window_s=24 * 3600,
            action="rollback",
        ),
    )


class CanaryPolicy(_Section):
    """Promotion criteria for a candidate version against the stable one.

    Each criterion (the primary metric, p95 latency, cost per row) is judged on an interval
    for the candidate's difference from the stable version at ``confidence``: promote when
    every interval excludes a regression beyond its allowed margin, rollback when one lies
    wholly beyond it, hold otherwise (with how much more evidence would likely decide)."""

    model: str
    stable: str = Field(description="The version serving now.")
    candidate: str = Field(description="The version asking for promotion.")
    primary_metric: Literal["auc", "log_loss", "accuracy"] = "auc"
    min_samples: int = Field(
        200, gt=0, description="Labelled rows each version needs before its quality is judged."
    )
    min_positives: int = Field(
        30,
        gt=0,
        description="Labelled positive rows (label > 0.5) each version needs before its quality "
        "is judged: with rare positives, a few hundred rows hold too few for an AUC interval "
        "to mean much (DeLong's variance is a large-sample one).",
    )
    min_negatives: int = Field(
        30, gt=0, description="Labelled negative rows each version needs, as min_positives."
    )
    min_requests: int = Field(
        100,
        gt=0,
        description="Requests each version needs before its p95 latency and cost per row are "
        "judged. The p95's distribution-free interval needs at least 86 per version at "
        "confidence 0.95 (more at a higher one) whatever this says.",
    )
    confidence: float = Field(
        0.95,
        gt=0.5,
        lt=1.0,
        description="Two-sided confidence of every criterion's interval. A version equal to "
        "the stable one is rolled back by a criterion at most (1 - confidence) / 2 of the "
        "time, and in practice far less (its interval must clear the margin).",
    )
    max_regression: float = Field(
        0.02,
        ge=0,
        description="Largest relative loss on the primary metric (a share of the stable "
        "version's value) the candidate's interval may reach to promote.",
    )
    max_latency_regression: float = Field(
        0.25, ge=0, description="Largest relative rise of p95 total latency to promote."
    )
    max_cost_regression: float = Field(
        0.10, ge=0, description="Largest relative rise of mean cost per row to promote."
    )
    window_s: int = Field(24 * 3600, gt=0)


class ConsumerSettings(BrokerSettings):
    """A sidecar's share of the broker: the partitions it stores, as one consumer of a
    consumer group. A batch is acknowledged (and deleted) only after the DuckDB commit that
    stores it; one read again after a crash is absorbed by the store's event_id key."""

    own: tuple[int, ...] | None = Field(
        None,
        description="Partitions this sidecar stores (0 .. partitions-1); null: all. Give each "
        "partition to one sidecar: its store then holds each event exactly once.",
    )
    group: str = Field("sidecars", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    consumer: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.:-]{1,128}$",
        description="This sidecar's name in the group; default: the host and the store's path, "
        "the same across restarts, so a restarted sidecar takes back what it had read.",
    )
    claim_idle_s: float = Field(
        60.0,
        gt=0,
        description="Batches another consumer of the group read and left unacknowledged this "
        "long are taken over (a consumer that is gone).",
    )
    read_batches: int = Field(
        16, gt=0, le=1024, description="Batches read (and stored in one statement) at most."
    )

    @model_validator(mode="after")
    def _own(self) -> ConsumerSettings:
        if self.own is not None:
            bad = [p for p in self.own if not 0 <= p < self.partitions]
            if bad or not self.own or len(set(self.own)) != len(self.own):
                raise ValueError(
                    f"own: distinct partitions of 0 .. {self.partitions - 1} (partitions "
                    f"{self.partitions}); got {list(self.own)}"
                )
        return self


class TriggerSpec(_Section):
    """A retraining trigger of one model, run by the sidecar (gateway.evaluation.triggers).

    It fires on any of its kinds: time (``cadence_s`` since its last run), data
    (``labelled_rows`` new labelled rows since its last run), drift (a rule with action
    ``retrain`` on the model firing for ``drift_checks`` consecutive checks) and performance
    (a quality alert on ``primary_metric``). Then it runs ``command`` (with GATEWAY_MODEL,
    GATEWAY_WINDOW_S and GATEWAY_TRAINING_DATA, a fresh labelled export, in its environment)
    or POSTs a JSON body to ``webhook``. One incident fires it once; runs are ``cooldown_s``
    apart whatever their outcome, so a failing command is recorded, never retried in a loop.
    """

    model: str
    name: str = Field("", description="Names it in records and metrics; default: the model.")
    cadence_s: float | None = Field(
        None, gt=0, description="Time: run this long after the last run; null: never by time."
    )
    labelled_rows: int | None = Field(
        None,
        gt=0,
        description="Data: run once this many labelled rows arrived since the last run "
        "(labels received since); null: never by data.",
    )
    drift_checks: int | None = Field(
        1,
        gt=0,
        description="Drift: run when a rule with action retrain fires on the model for this "
        "many consecutive checks (evaluation.evaluate_every_s apart); null: never by drift.",
    )
    primary_metric: Literal["auc", "log_loss", "accuracy", "ece"] | None = Field(
        "auc",
        description="Performance: run when a quality alert on this metric fires on the model "
        "(whatever its action); null: never by performance.",
    )
    command: tuple[str, ...] | None = Field(
        None, min_length=1, description="The training command, an argv list (no shell)."
    )
    webhook: str | None = Field(
        None, pattern=r"^https?://", description="Or: POST a JSON body to this URL."
    )
    window_s: int = Field(
        7 * 24 * 3600, gt=0, description="The training export's window, back from the run."
    )
    timeout_s: float = Field(
        3600.0, gt=0, description="The command is killed (its process group) past this."
    )
    webhook_timeout_s: float = Field(10.0, gt=0, le=300, description="The webhook's timeout.")
    min_rows: int = Field(
        0,
        ge=0,
        description="A run whose fresh export holds fewer labelled rows than this trains "
        "nothing: recorded with outcome too_few_rows and the count (a run: the cooldown "
        "counts from it).",
    )
    cooldown_s: float = Field(
        3600.0, ge=0, description="Least time between two runs (from a run's start)."
    )
    output_bytes: int = Field(
        8192, gt=0, le=1 << 20, description="The tail of its output (stdout and stderr) kept."
    )
    keep_exports: int = Field(
        3, gt=0, description="Training exports kept per trigger in the store's directory."
    )

    @model_validator(mode="after")
    def _one_action(self) -> TriggerSpec:
        if (self.command is None) == (self.webhook is None):
            raise ValueError(f"trigger of model {self.model!r}: give one of command or webhook")
        return self

    @property
    def label(self) -> str:
        return self.name or self.model


class PlaybookSettings(_Section):
    """What alert actions do when a rule starts firing (gateway.evaluation.playbooks): retrain
    runs the model's trigger (evaluation.triggers), human_review appends to the review queue
    with an export of the rows to review, rollback calls the gateway's admin Rollback for the
    routes that served the version, tighten_thresholds raises those routes' decision threshold.
    Each action is recorded once per incident."""

    enabled: tuple[PlaybookAction, ...] = Field(
        ("retrain", "human_review", "rollback", "tighten_thresholds"),
        description="The actions that act; the others are only logged with their alert.",
    )
    cooldown_s: float = Field(
        3600.0,
        ge=0,
        description="An action on the same alert (rule, model, version, segment, feature) is "
        "not taken again within this long: a sidecar restart does not repeat it.",
    )
    gateway: str | None = Field(
        None,
        description="rollback, tighten_thresholds: the gateway's admin address HOST:PORT; "
        "null: not acted.",
    )
    admin_token_file: Path | None = Field(
        None,
        description="rollback, tighten_thresholds: file (mode 0600) holding the gateway's "
        "admin token.",
    )
    gateway_tls: ClientTlsSettings = Field(
        default_factory=ClientTlsSettings, description="The gateway's TLS (rollback, tighten)."
    )
    rollback_timeout_s: float = Field(10.0, gt=0, le=120)
    review_rows: int = Field(
        100_000,
        gt=0,
        description="human_review: the export holds at most this many of the window's latest "
        "events.",
    )
    threshold_step: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="tighten_thresholds: how much the decision threshold of each route that "
        "served the version is raised (the gateway's SetThreshold, up to the route's "
        "decision.max_threshold).",
    )


class SidecarAuthSettings(_Section):
    """Who may call the sidecar: keys (bearer tokens) or mTLS subjects from ``keys_file``,
    each with roles: publish (Publish: the gateway), write (PutLabels), read (Report,
    Verdict, Export, ExportFile)."""

    mode: Literal["none", "api_key", "mtls"] = Field(
        "none",
        description="none: anyone who reaches the port may call (said at start-up); api_key: "
        "'authorization: Bearer <key>'; mtls: the client certificate's subject.",
    )
    keys_file: Path | None = Field(
        None, description="The keys file (see README); re-read on change."
    )

    @model_validator(mode="after")
    def _keys(self) -> SidecarAuthSettings:
        if self.mode != "none" and self.keys_file is None:
            raise ValueError(f"mode {self.mode} needs keys_file")
        return self


class EvaluationSettings(_Section):
    """The evaluation sidecar (``gateway sidecar``): windows, label joins, alert rules."""

    window_s: int = Field(3600, gt=0, description="Default report window.")
    label_window_s: int = Field(
        7 * 24 * 3600, gt=0, description="How far back an entity-key label looks for its event."
    )
    max_report_events: int = Field(
        200_000,
        gt=0,
        description="Most recent events a report reads per model (a bound). They are read a "
        "chunk at a time into columns of about 8 bytes per feature per row (~60 MB at 200,000 "
        "events of 32 features).",
    )
    threshold: float = Field(
        0.5, gt=0, lt=1, description="Score at or above which a prediction counts as positive."
    )
    store_threads: int = Field(
        1,
        gt=0,
        description="DuckDB threads. Ingestion is many small statements, where more threads "
        "cost CPU (about 15% per event with 2 than with 1); raise it for heavy queries.",
    )
    commit_interval_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="Events arriving within this long of the first are stored in one DuckDB "
        "statement (group commit), and acknowledged then. A statement costs milliseconds "
        "whatever its rows: longer groups cost less CPU per event and hold events longer in "
        "the gateway's log.",
    )
    commit_events: int = Field(
        8192, gt=0, description="A group is stored at once when it holds this many events."
    )
    max_pending_events: int = Field(
        16_384,
        gt=0,
        description="Events read from the publishers' streams and not yet stored, all streams "
        "together (a memory bound). At the bound no stream is read until a group is stored: "
        "HTTP/2 flow control stops the publishers, whose write-ahead logs keep the rest. A "
        "stream reads a whole batch, so this may be passed by one batch per stream.",
    )
    store_memory_limit_bytes: int = Field(
        256 * 1024 * 1024,
        ge=64 * 1024 * 1024,
        description="DuckDB's memory_limit: its buffer pool (table blocks, the event_id index, "
        "query state). Past it DuckDB evicts blocks and spills large queries to a temporary "
        "directory beside the store file; its default would be 80% of the machine's memory.",
    )
    export_directory: Path | None = Field(
        None,
        description="Where the Export RPC may write Parquet files: each path it is given is "
        "relative to this directory and must stay in it. Null: Export writes nothing "
        "(ExportFile, which `gateway export` uses, streams the file to the caller instead).",
    )
    rules: tuple[AlertRule, ...] = Field(default_factory=_default_rules)
    evaluate_every_s: float = Field(
        60.0,
        gt=0,
        description="How often the sidecar checks every rule (alert log, metrics); each check "
        "reads up to max_report_events events per model.",
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="The sidecar's Prometheus port; null: none."
    )
    http_port: int | None = Field(
        None, ge=0, le=65535, description="The sidecar's HTML report pages; null: none."
    )
    canaries: tuple[CanaryPolicy, ...] = Field(
        (), description="Candidate versions to judge (Verdict RPC, gateway verdict MODEL)."
    )
    auth: SidecarAuthSettings = Field(default_factory=SidecarAuthSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings, description="TLS on the sidecar's port.")
    broker: ConsumerSettings | None = Field(
        None,
        description="Also consume events from the broker (the gateways' events.sink: broker); "
        "null: only from gateways' streams.",
    )
    triggers: tuple[TriggerSpec, ...] = Field(
        (), description="Retraining triggers, per model (the adaptation loop)."
    )
    playbooks: PlaybookSettings = Field(
        default_factory=PlaybookSettings, description="What alert actions do."
    )


_VARIANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
# A route's size: what one route (and the admin service's SetRoutes) may hold.
MAX_VARIANTS: Final = 64
MAX_RULES: Final = 256
MAX_STATIC_VALUES: Final = 4096  # per static output: a row's values, repeated per row served
MAX_STATIC_OUTPUTS: Final = 64  # outputs of one static variant
MAX_ROUTES: Final = 1024


class Price(_Section):
    """What serving costs, in whatever unit the ledger should report (dollars, credits)."""

    compute_second: float = Field(
        0.0, ge=0, description="Per second of measured compute on the model's device."
    )
    request: float = Field(
        0.0, ge=0, description="Per request that reached the model (a full cache hit pays none)."
    )


_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"  # underscores: compose names
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")
_CONTRACT_REF = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}(@[0-9]{1,18})?$"


def _check_endpoint(endpoint: str) -> str:
    """``host:port`` (an IPv6 host in brackets), port 1-65535: else ValueError saying why."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host:
        raise ValueError(f"'{endpoint}' is not host:port")
    number = int(port) if port.isascii() and port.isdigit() and len(port) <= 5 else 0
    if not 1 <= number <= 65535:
        raise ValueError(f"'{endpoint}': the port must be 1-65535, got '{port}'")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"'{endpoint}': '{host}' is no IPv6 address") from None
    elif len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise ValueError(f"'{endpoint}': '{host}' is no host name or IPv4 address")
    elif host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"'{endpoint}': '{host}' is no IPv4 address") from None
    return endpoint


class RemoteSettings(_Section):
    """How this gateway calls the OIP gRPC servers behind remote variants (``endpoint``)."""

    tls: ClientTlsSettings = Field(
        default_factory=ClientTlsSettings,
        description="TLS to every endpoint (ca_file; cert_file/key_file for mTLS); "
        "default: plain TCP.",
    )
    token_file: Path | None = Field(
        None,
        description="A key presented to every endpoint as `authorization: Bearer` (another "
        "gateway with auth keys); mode 0600.",
    )
    timeout_ms: float = Field(
        10_000.0,
        gt=0,
        description="A remote attempt's deadline when neither the route's timeout_ms nor the "
        "client sets one: no remote call goes without one.",
    )
    max_endpoints: int = Field(
        64,
        gt=0,
        le=4096,
        description="Channels kept open at once (one per endpoint); past it the channels of "
        "endpoints no route names are closed.",
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Largest response taken from an endpoint."
    )


class VariantSpec(_Section):
    """One way a route can answer: a local model version, a model on a remote OIP gRPC
    server (``endpoint`` + ``model``), or a static output."""

    name: str = Field(pattern=_VARIANT_NAME)
    model: str | None = Field(
        None, description="The model serving this variant (the remote's, with endpoint)."
    )
    endpoint: str | None = Field(
        None,
        description="host:port of an OIP gRPC server (another gateway, Triton, KServe) "
        "serving `model`: a remote variant.",
    )
    contract: str | None = Field(
        None,
        pattern=_CONTRACT_REF,
        description="A remote variant's feature contract: that of the local model '<model>' "
        "or '<model>@<version>'. Raw features are assembled here and the model input is sent; "
        "without it the request's inputs go as sent.",
    )
    version: str = Field(
        "", pattern=r"^[0-9]{0,18}$", description="Its version; empty = the newest loaded."
    )
    weight: float = Field(0.0, ge=0, description="Share of the route's traffic (relative).")
    arm: Literal["primary", "canary"] = Field(
        "primary", description="How its predictions are labelled in events and responses."
    )
    deterministic: bool | None = Field(
        None, description="Cache its responses; default: the model config's `deterministic`."
    )
    price: Price | None = Field(None, description="Default: the model config's `price`.")
    output: dict[str, tuple[float, ...]] | None = Field(
        None,
        description="A static variant: these values for every row, per output name (the "
        "route's last resort when no model can answer).",
    )

    @model_validator(mode="after")
    def _model_or_output(self) -> VariantSpec:
        if (self.model is None) == (self.output is None):
            raise ValueError(
                f"variant '{self.name}': set exactly one of model (with or without endpoint), "
                "output"
            )
        if self.endpoint is not None and self.model is None:
            raise ValueError(f"variant '{self.name}': endpoint needs model (the remote's name)")
        if self.endpoint is None and self.contract is not None:
            raise ValueError(
                f"variant '{self.name}': contract is for a remote variant (with endpoint); a "
                "local model serves under its own"
            )
        if self.output is not None and any(not values for values in self.output.values()):
            raise ValueError(f"variant '{self.name}': each static output needs a value")
        if self.output is not None:
            sizes = {name: len(values) for name, values in self.output.items()}
            too_big = {name: n for name, n in sizes.items() if n > MAX_STATIC_VALUES}
            if too_big or len(sizes) > MAX_STATIC_OUTPUTS:
                raise ValueError(
                    f"variant '{self.name}': a static variant has at most {MAX_STATIC_OUTPUTS} "
                    f"outputs of at most {MAX_STATIC_VALUES} values each (got {len(sizes)} "
                    f"outputs, the largest of {max(sizes.values())} values)"
                )
        return self

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, endpoint: str | None) -> str | None:
        return None if endpoint is None else _check_endpoint(endpoint)

    @property
    def local_model(self) -> str | None:
        """The local model serving this variant (None: a remote or static variant)."""
        return self.model if self.endpoint is None else None

    @property
    def required_model(self) -> str | None:
        """The local model this variant needs loaded: its own, or its contract's."""
        if self.contract is not None:
            return self.contract.partition("@")[0]
        return self.local_model


class MatchRule(_Section):
    """Requests whose parameters all equal ``when`` go to ``variant`` (first match wins)."""

    when: dict[str, str] = Field(min_length=1, description='e.g. {"segment.geo": "BR"}')
    variant: str


class ShadowSpec(_Section):
    """A sampled copy of the route's requests runs on ``variant``; only events see it."""

    variant: str
    sample: float = Field(1.0, gt=0, le=1, description="Share of requests copied.")


class DecisionSpec(_Section):
    """A route's decision threshold: each response carries ``name``, true where the score
    output ``output`` (its first column) is at or above ``threshold``. Changed by `gateway
    threshold ROUTE` and raised by the sidecar's tighten_thresholds playbook, each a route
    revision."""

    output: str = Field(
        min_length=1, max_length=256, description="The score output it reads (first column)."
    )
    threshold: float = Field(0.5, allow_inf_nan=False, description="Decision: score >= threshold.")
    name: str = Field(
        "decision",
        pattern=r"^[A-Za-z0-9_.\-]{1,64}$",
        description="The BOOL output added to responses (not an output of the model: it is "
        "added whenever the score output is returned, and cannot be requested alone).",
    )
    max_threshold: float = Field(
        0.99,
        allow_inf_nan=False,
        description="How far a playbook may raise it (a person may set any value).",
    )

    @model_validator(mode="after")
    def _within(self) -> DecisionSpec:
        if self.name == self.output:
            raise ValueError(f"name '{self.name}' is the score output's own")
        return self


class RouteSpec(_Section):
    """A logical model name clients call, and how its requests are served."""

    variants: tuple[VariantSpec, ...] = Field(min_length=1, max_length=MAX_VARIANTS)
    match: tuple[MatchRule, ...] = Field((), max_length=MAX_RULES)
    shadows: tuple[ShadowSpec, ...] = Field((), max_length=MAX_VARIANTS)
    shadow_max_concurrency: int = Field(
        4, gt=0, description="Shadow copies running at once; past it a copy is skipped."
    )
    fallbacks: tuple[str, ...] = Field(
        (),
        max_length=MAX_VARIANTS,
        description="Variants tried in order when the chosen one fails, times out or is "
        "overloaded; a static variant last answers always.",
    )
    timeout_ms: float | None = Field(
        None, gt=0, description="Per attempt; the client's gRPC deadline wins when shorter."
    )
    max_concurrency: int | None = Field(
        None, gt=0, description="Requests in flight on the route; past it RESOURCE_EXHAUSTED."
    )
    decision: DecisionSpec | None = Field(
        None, description="Turn the score into a decision at a threshold, in every response."
    )

    @model_validator(mode="after")
    def _names_resolve(self) -> RouteSpec:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names repeat: {names}")
        if not any(v.weight > 0 for v in self.variants):
            raise ValueError("at least one variant needs a weight above 0")
        known = set(names)
        used = [
            *(("match", r.variant) for r in self.match),
            *(("shadows", s.variant) for s in self.shadows),
            *(("fallbacks", f) for f in self.fallbacks),
        ]
        for where, name in used:
            if name not in known:
                raise ValueError(f"{where}: no variant named '{name}' (variants: {names})")
        static = {v.name for v in self.variants if v.output is not None}
        for shadow in self.shadows:
            if shadow.variant in static:
                raise ValueError(f"shadows: '{shadow.variant}' is static; shadow a model")
        return self


class RateLimit(_Section):
    """A token bucket: ``rate`` requests per second on average, bursts up to ``burst``."""

    rate: float = Field(gt=0)
    burst: int = Field(gt=0)


class RoutingSettings(_Section):
    routes: dict[str, RouteSpec] = Field(
        default_factory=dict,
        max_length=MAX_ROUTES,
        description="Route name (what clients call) -> its spec.",
    )
    rate_limits: dict[str, RateLimit] = Field(
        default_factory=dict,
        description="Tenant (the `tenant` request parameter) -> its limit; `*` applies to "
        "each tenant not listed, one bucket each.",
    )
    max_tenants: int = Field(
        10_000, gt=0, description="Rate-limit buckets kept; the least recently used go first."
    )
    history: int = Field(16, gt=0, description="Earlier route specs kept for rollback.")
    remote: RemoteSettings = Field(
        default_factory=RemoteSettings, description="Calls to remote variants' endpoints."
    )


class CacheSettings(_Section):
    """Response rows of deterministic variants, keyed by model version, contract and row bytes."""

    enabled: bool = True
    max_bytes: int = Field(64 * 1024 * 1024, gt=0, description="Bound on cached rows' bytes.")
    ttl_s: float = Field(300.0, gt=0, description="How long a row stays cached.")


class Budget(_Section):
    """Spend allowed to one tenant or surface per window, and what happens past it."""

    name: str = Field(pattern=_VARIANT_NAME)
    tenant: str | None = None
    surface: str | None = None
    limit: float = Field(gt=0, description="Spend per window, in the prices' unit.")
    window_s: int = Field(3600, gt=0)
    policy: Literal["reject", "degrade", "alert"] = Field(
        description="reject: RESOURCE_EXHAUSTED; degrade: serve `degrade_to` on routes that "
        "have it; alert: serve, log and raise gateway_budget_exceeded."
    )
    degrade_to: str | None = Field(None, description="A variant name (degrade only).")

    @model_validator(mode="after")
    def _one_subject(self) -> Budget:
        if (self.tenant is None) == (self.surface is None):
            raise ValueError(f"budget '{self.name}': set exactly one of tenant, surface")
        if (self.policy == "degrade") != (self.degrade_to is not None):
            raise ValueError(f"budget '{self.name}': degrade_to goes with policy degrade")
        return self


class CostSettings(_Section):
    enabled: bool = Field(
        True,
        description="Keep the ledger and apply budgets (each request's cost is still "
        "computed and returned).",
    )
    window_s: int = Field(60, gt=0, description="The ledger's time bucket.")
    retain_windows: int = Field(1440, gt=0, description="Buckets kept (default: one day).")
    max_keys: int = Field(
        10_000, gt=0, description="Rows per bucket; past it new keys add to an `(other)` row."
    )
    max_lines: int = Field(
        200_000,
        gt=0,
        description="Rows in all the buckets kept together; past it new keys add to the "
        "bucket's `(other)` row. With keys of client text (tenant, surface: at most 1,024 "
        "characters each) this bounds the ledger's memory, whatever clients send.",
    )
    budgets: tuple[Budget, ...] = ()


class AdminSettings(_Section):
    """The admin service (routes, promote, rollback, costs, cache) on the gRPC port, and the
    token that grants admin rights on every guarded RPC (auth.rpc_access)."""

    token: SecretStr | None = Field(
        None,
        description="Bearer token of admin rights (or GATEWAY_ADMIN__TOKEN); unset and no "
        "admin key: admin calls are refused.",
    )
    token_file: Path | None = Field(
        None, description="Read the token from this file (mode 0600) instead."
    )

    def resolve_token(self) -> str | None:
        return read_secret(self.token, self.token_file, "admin.token_file")


Access = Literal["open", "authenticated", "admin"]
# What each RPC needs, unless auth.rpc_access says otherwise. ``open``: anyone; ``authenticated``:
# a known caller (with auth.mode none, anyone); ``admin``: the admin token or an admin key.
# Calls naming a model also need the caller's keys to allow it (auth.mode api_key or mtls).
RPC_ACCESS: Final[dict[str, Access]] = {
    "ServerLive": "open",
    "ServerReady": "open",
    "ServerMetadata": "open",
    "ModelReady": "authenticated",
    "ModelMetadata": "authenticated",
    "ModelConfig": "authenticated",
    "ModelInfer": "authenticated",
    "ModelStreamInfer": "authenticated",
    "ModelStatistics": "authenticated",
    "RepositoryIndex": "authenticated",
    "RepositoryModelLoad": "admin",
    "RepositoryModelUnload": "admin",
    # The admin service (GatewayAdmin).
    "GetRoutes": "admin",
    "SetRoutes": "admin",
    "Promote": "admin",
    "Rollback": "admin",
    "SetThreshold": "admin",
    "Costs": "admin",
    "Cache": "admin",
    "RolloutStart": "admin",
    "RolloutStatus": "admin",
    "RolloutPause": "admin",
    "RolloutResume": "admin",
    "RolloutAbort": "admin",
}


class AuthSettings(_Section):
    """Who is calling: the tenant comes from the caller's credential, never from a request
    parameter (with mode api_key or mtls)."""

    mode: Literal["none", "api_key", "mtls"] = Field(
        "none",
        description="none: no credentials, the `tenant` parameter is believed (the embedded "
        "demo; said at start-up); api_key: 'authorization: Bearer <key>' or 'x-api-key'; "
        "mtls: the client certificate's subject (needs tls.client_ca_file).",
    )
    keys_file: Path | None = Field(
        None,
        description="Keys (as SHA-256 hashes) and mTLS subjects, each naming its tenant, the "
        "models and routes it may call, and optionally its rate limit and budget (README, "
        "'Trust boundary'). Re-read when it changes.",
    )
    reload_interval_s: float = Field(
        1.0, gt=0, description="How often the keys file is checked for a change."
    )
    rpc_access: dict[str, Access] = Field(
        default_factory=dict,
        description="RPC name -> open | authenticated | admin, over the defaults (README).",
    )

    @model_validator(mode="after")
    def _check(self) -> AuthSettings:
        if self.mode != "none" and self.keys_file is None:
            raise ValueError(f"mode {self.mode} needs keys_file")
        unknown = sorted(set(self.rpc_access) - set(RPC_ACCESS))
        if unknown:
            raise ValueError(f"rpc_access: unknown RPC {unknown} (known: {sorted(RPC_ACCESS)})")
        return self

    def access(self, rpc: str) -> Access:
        return self.rpc_access.get(rpc) or RPC_ACCESS[rpc]


class AuditSettings(_Section):
    """Every admin action (who, what, before/after), as JSON lines, bounded by rotation."""

    path: Path | None = Field(
        Path(".gateway-audit.jsonl"), description="The audit log; null: counted, not written."
    )
    max_bytes: int = Field(16 * 1024 * 1024, gt=0, description="Size at which it rotates.")
    backups: int = Field(4, ge=0, description="Rotated files kept (path.1 ... path.N).")


OnError = Literal["fail_open", "fail_closed"]


class StateSettings(_Section):
    """Where state that replicas share lives: ``memory`` (this process only: the embedded
    default) or ``redis`` (every replica pointing at one Redis shares it)."""

    backend: Literal["memory", "redis"] = Field(
        "memory", description="memory: this process; redis: shared through state.redis_url."
    )
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="redis://[user:password@]host:port/db (a secret: it may hold a password).",
    )
    cache_redis_url: SecretStr | None = Field(
        None,
        description="A Redis of its own for the shared response cache's rows (a secret too), "
        "run with maxmemory and maxmemory-policy allkeys-lru: Redis' eviction then bounds the "
        "rows' bytes without touching limits, budgets or routes. Null: redis_url (whose Redis "
        "must not evict: noeviction).",
    )
    key_prefix: str = Field(
        "gateway:", max_length=64, description="Prefix of every key (several gateways, one Redis)."
    )
    timeout_ms: float = Field(
        50.0,
        gt=0,
        le=10_000,
        description="A Redis call that takes longer has failed: its concern's on_error applies.",
    )
    limits_on_error: OnError = Field(
        "fail_open",
        description="Redis unreachable or slow: fail_open serves the request unlimited (counted "
        "in gateway_state_errors_total); fail_closed refuses it with UNAVAILABLE.",
    )
    budgets_on_error: OnError = Field(
        "fail_closed",
        description="Budgets' spend not synced with Redis for over a second: fail_closed refuses "
        "requests of budgeted tenants and surfaces with UNAVAILABLE; fail_open judges them by "
        "this replica's view (its own spend since the last sync added).",
    )
    sync_interval_ms: float = Field(
        250.0,
        gt=0,
        le=1000,
        description="How often a replica adds its budgets' spend to Redis and reads the total "
        "back: a budget crossed on one replica is enforced on all within about twice this.",
    )

    @model_validator(mode="after")
    def _urls(self) -> StateSettings:
        check_redis_url(self.redis_url, "redis_url")
        check_redis_url(self.cache_redis_url, "cache_redis_url")
        return self


class OutputRange(_Section):
    """The values a model output may take (both ends included)."""

    min: float = Field(..., description="Lowest value allowed.")
    max: float = Field(..., description="Highest value allowed.")

    @model_validator(mode="after")
    def _ordered(self) -> OutputRange:
        if self.min > self.max:
            raise ValueError(f"min {self.min} is over max {self.max}")
        return self


class GateSettings(_Section):
    """The validation gate a new model version passes before it takes traffic
    (``gateway validate``; its result is ``<repository>/<model>/<version>/gate.json``)."""

    required: bool = Field(
        False,
        description="Serve only versions whose gate.json says pass for the model file as it "
        "is now; any other is UNAVAILABLE with the reason. Versions already serving need a "
        "pass too (`gateway validate MODEL V --against V` records one) before turning it on.",
    )
    auc_margin: float = Field(
        0.02,
        ge=0,
        le=1,
        description="The primary metric (AUC) passes when the low end of the interval for "
        "candidate - serving lies above -auc_margin (not worse beyond the margin, shown).",
    )
    segment_auc_margin: float = Field(
        0.05, ge=0, le=1, description="The same test for each segment (segment.* columns)."
    )
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Of every interval (DeLong).")
    min_positives: int = Field(
        30, ge=1, description="Positive labels a window or segment needs to be judged."
    )
    min_negatives: int = Field(
        30, ge=1, description="Negative labels a window or segment needs to be judged."
    )
    output_ranges: dict[str, OutputRange] = Field(
        default_factory=dict,
        description="Declared range per output name (e.g. probability: {min: 0, max: 1}); "
        "every output is checked for NaN and infinities whether named or not.",
    )
    latency_budget_ms: float = Field(
        20.0, gt=0, description="p95 latency of one run at batch 1, offline, on this host."
    )
    max_batch_latency_budget_ms: float = Field(
        200.0,
        gt=0,
        description="p95 latency of one run at the model's max_batch_size (when it has one).",
    )
    latency_runs: int = Field(
        30, ge=5, le=10_000, description="Timed runs per batch size (after one warm-up run)."
    )
    auto: bool = Field(
        False,
        description="Judge by itself each version the gate holds back because no gate.json "
        "judged its model file (a new version, at start-up or on RepositoryModelLoad; a "
        "model.onnx replaced): in the background, one at a time, the labelled window of the "
        "last window_s is exported from the sidecar (adaptation.rollout.sidecar, else "
        "events.sidecar, presenting adaptation.rollout's token and tls) and replayed against "
        "the highest version serving below it; gate.json is written and the model reloaded, "
        "so a pass serves without anyone typing anything. A version that failed is not judged "
        "again until its model file changes. Needs required.",
    )
    window_s: int = Field(
        7 * 86400, gt=0, description="How far back the labelled window of an automatic run goes."
    )
    max_rows: int = Field(
        200_000,
        gt=0,
        description="The newest this many labelled rows of that window (and of `gateway "
        "validate`'s export from the sidecar): bounds the memory and time a run takes in the "
        "serving process.",
    )
    retry_s: float = Field(
        600.0,
        gt=0,
        description="An automatic run that could not judge (the sidecar unreachable, too few "
        "labels in the window, an error, the queue full) writes no gate.json and is tried "
        "again this long after (or at the first load after that), never sooner unless its "
        "model file changes.",
    )
    max_pending: int = Field(
        4,
        ge=1,
        le=100,
        description="Versions queued or being judged at once by automatic runs (one runs at a "
        "time); one more is tried again retry_s later.",
    )
    export_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Deadline of an automatic run's export from the sidecar (a gateway stopping "
        "meanwhile exits once the export ends).",
    )

    @model_validator(mode="after")
    def _auto_needs_required(self) -> GateSettings:
        if self.auto and not self.required:
            raise ValueError(
                "auto judges the versions the gate holds back: it needs required: true"
            )
        return self


_ROLLOUT_STEP = re.compile(r"shadow|[0-9]{1,3}(\.[0-9]+)?")


def check_rollout_steps(steps: tuple[str, ...]) -> tuple[str, ...]:
    """``steps`` as a rollout takes them: ``shadow`` first if at all, then canary percentages
    rising strictly to 100 (the candidate stable); ValueError saying what is wrong."""
    if not steps:
        raise ValueError("a rollout needs at least one step (the last is 100)")
    percents: list[float] = []
    for i, step in enumerate(steps):
        if not _ROLLOUT_STEP.fullmatch(step):
            raise ValueError(f"step '{step}': 'shadow' or a percentage of traffic (0-100]")
        if step == "shadow":
            if i != 0:
                raise ValueError("'shadow' can only be the first step")
            continue
        percent = float(step)
        if not 0 < percent <= 100 or (percents and percent <= percents[-1]):
            raise ValueError(f"step '{step}': percentages rise strictly, within (0, 100]")
        percents.append(percent)
    if not percents or percents[-1] != 100:
        raise ValueError(f"the last step must be 100 (the candidate takes all traffic): {steps}")
    return steps


class RolloutSlo(_Section):
    """What a candidate must keep to at every step on the requests it answers (and scores in
    shadow), measured in the gateway itself: a breach rolls the rollout back at once, whatever
    the verdict. Each is a rate breached when as many failures would be unlikely at its limit
    (an exact binomial test at ``confidence``, repeated every second on the step's counts):
    one early failure is no breach, a candidate failing every attempt is one within
    ``min_requests``."""

    max_error_rate: float | None = Field(
        0.01,
        ge=0,
        lt=1,
        description="Share of the candidate's attempts that may fail (unavailable, overloaded, "
        "past its deadline, an internal error; never a client's bad request). Null: unchecked.",
    )
    max_latency_ms: float | None = Field(
        None,
        gt=0,
        description="The latency of one attempt on the candidate that counts as slow; with "
        "latency_quantile, the SLO 'latency_quantile of attempts within max_latency_ms'. "
        "Null: unchecked.",
    )
    latency_quantile: float = Field(
        0.99, gt=0.5, lt=1, description="Share of attempts that must be within max_latency_ms."
    )
    min_requests: int = Field(
        10, ge=1, description="Attempts a step needs on the candidate before either is judged."
    )
    confidence: float = Field(
        0.999,
        gt=0.5,
        lt=1,
        description="A breach: as many failures (or slow answers) at the limit have a chance "
        "below (1 - confidence) / 2. High by default: the counts are tested every second, "
        "and each test is another chance of a false rollback over a long step.",
    )


class RolloutSettings(_Section):
    """Staged rollouts driven by canary verdicts (the gateway runs them): a candidate version
    walks ``steps``, each a route revision, advancing on the sidecar's ``promote``."""

    sidecar: str | None = Field(
        None,
        description="The sidecar whose Verdict RPC judges each step (host:port); null: "
        "events.sidecar. It needs a canary policy (evaluation.canaries) for the model and "
        "candidate.",
    )
    token: SecretStr | None = Field(
        None,
        description="Credential presented to that sidecar (a key with its read role); or "
        "GATEWAY_ADAPTATION__ROLLOUT__TOKEN. Null: none.",
    )
    token_file: Path | None = Field(None, description="Read that credential from this file.")
    tls: ClientTlsSettings = Field(
        default_factory=ClientTlsSettings, description="TLS to the sidecar (ca_file turns it on)."
    )
    steps: tuple[str, ...] = Field(
        ("shadow", "5", "25", "50", "100"),
        description="Default steps: 'shadow' (the candidate scores a copy of every request) "
        "first if at all, then the candidate's share of traffic in percent, up to 100.",
    )
    poll_interval_s: float = Field(
        30.0, gt=0, le=3600, description="How often a running rollout asks for its verdict."
    )
    min_step_s: float = Field(
        0.0,
        ge=0,
        description="A step lasts at least this long, whatever its verdict says earlier (a "
        "rollback is never held back).",
    )
    hold_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="A step whose verdict stays 'hold' this long pauses the rollout for a "
        "person (gateway rollout resume|abort); the candidate keeps its share meanwhile.",
    )
    max_duration_s: float | None = Field(
        None,
        gt=0,
        description="A rollout not finished this long after it started is rolled back (a "
        "candidate that never earns its steps does not keep its share for ever); null: no "
        "limit.",
    )
    max_failures: int = Field(
        5,
        gt=0,
        description="Verdict calls that fail in a row (sidecar away, no canary policy) before "
        "the rollout is rolled back: a candidate nobody can judge does not keep its traffic.",
    )
    verdict_timeout_s: float = Field(60.0, gt=0, description="Deadline of one Verdict call.")
    slo: RolloutSlo = Field(
        default_factory=RolloutSlo,
        description="Error rate and latency the candidate keeps to at every step (checked by "
        "this gateway on its own traffic), or the rollout is rolled back at once.",
    )
    evidence: Literal["step", "window"] = Field(
        "step",
        description="What a step's verdict reads: 'step', only the traffic since the step "
        "began (each step earns its promotion on its own evidence); 'window', the canary "
        "policy's whole window (evidence from earlier steps and before the rollout counts).",
    )
    lease_s: float = Field(
        10.0,
        gt=1,
        le=600,
        description="With state.backend redis: the lease by which one replica drives each "
        "rollout, renewed every second; a replica that dies lets it lapse and another takes "
        "the rollout over after this long.",
    )
    state_file: Path | None = Field(
        Path(".gateway-rollouts.json"),
        description="With state.backend memory: the rollouts, written at every change so a "
        "restarted gateway resumes each at its step (with redis they live in Redis). Null: "
        "kept in memory only.",
    )

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: tuple[str, ...]) -> tuple[str, ...]:
        return check_rollout_steps(steps)

    def resolve_token(self) -> str | None:
        return read_secret(self.token, self.token_file, "adaptation.rollout.token_file")


class AdaptationSettings(_Section):
    """The adaptation loop on the gateway's side: the validation gate and staged rollouts."""

    gate: GateSettings = Field(default_factory=GateSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)


class Settings(_Section):
    server: ServerSettings = ServerSettings()
    repository: RepositorySettings = RepositorySettings()
    runtime: RuntimeSettings = RuntimeSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    events: EventsSettings = EventsSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    routing: RoutingSettings = RoutingSettings()
    cache: CacheSettings = CacheSettings()
    costs: CostSettings = CostSettings()
    admin: AdminSettings = AdminSettings()
    auth: AuthSettings = AuthSettings()
    tls: TlsSettings = TlsSettings()
    audit: AuditSettings = AuditSettings()
    state: StateSettings = StateSettings()
    adaptation: AdaptationSettings = AdaptationSettings()

    @model_validator(mode="after")
    def _mtls_needs_ca(self) -> Settings:
        if self.auth.mode == "mtls" and self.tls.client_ca_file is None:
            raise ValueError("auth.mode mtls needs tls.client_ca_file (clients' certificates)")
        if self.evaluation.auth.mode == "mtls" and self.evaluation.tls.client_ca_file is None:
            raise ValueError("evaluation.auth.mode mtls needs evaluation.tls.client_ca_file")
        return self


class VersionPolicy(_Section):
    """Which versions of a model to serve: latest N (default 1), all, or a specific list."""

    latest: int | None = Field(None, gt=0)
    all: bool = False
    specific: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionPolicy:
        chosen = [self.latest is not None, self.all, self.specific is not None]
        if sum(chosen) > 1:
            raise ValueError("choose one of latest, all, specific")
        return self

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.all:
            return ordered
        if self.specific is not None:
            return [v for v in ordered if v in self.specific]
        return ordered[-(self.latest or 1) :]


class QueuePolicy(_Section):
    """Admission control for one model version's scheduler queue."""

    max_requests: int = Field(1024, gt=0, description="Requests waiting at once.")
    max_rows: int = Field(65536, gt=0, description="Rows waiting at once.")
    priority_levels: int = Field(
        2, ge=1, description="Priorities 1 (served first) .. priority_levels."
    )
    default_priority: int | None = Field(
        None, ge=1, description="Priority of a request that names none; default the lowest."
    )

    @model_validator(mode="after")
    def _default_within_levels(self) -> QueuePolicy:
        if self.default_priority is not None and self.default_priority > self.priority_levels:
            raise ValueError(
                f"default_priority {self.default_priority} is over priority_levels "
                f"{self.priority_levels}"
            )
        return self

    @property
    def default_level(self) -> int:
        return self.default_priority or self.priority_levels


class DynamicBatching(_Section):
    """Merge queued requests into batches of up to max_batch_size rows."""

    max_queue_delay_us: int = Field(
        0,
        ge=0,
        description="How long the oldest request may wait for a batch to reach a preferred "
        "size while an instance is free; 0 = dispatch at once (batches still fill while "
        "every instance is busy).",
    )
    preferred_batch_sizes: tuple[int, ...] = Field(
        (), description="Row counts worth waiting for (up to max_queue_delay_us)."
    )


class ContractBinding(_Section):
    """Which feature contract version (in the model's features.yaml) each model version uses."""

    version: str | None = Field(
        None, pattern=r"^v[1-9][0-9]*$", description="Default: the highest in features.yaml."
    )
    by_model_version: dict[int, str] = Field(
        default_factory=dict, description="Model version -> contract version, e.g. {1: v1}."
    )

    def for_version(self, version: int) -> str | None:
        return self.by_model_version.get(version, self.version)


class ModelConfig(_Section):
    """``models/<model>/config.yaml``: how one model is served."""

    platform: Literal["onnxruntime"] = "onnxruntime"
    max_batch_size: int = Field(
        0, ge=0, description="Rows per request along dim 0; 0 = the model has no batch dim."
    )
    version_policy: VersionPolicy = VersionPolicy(latest=1)
    instances: int = Field(1, gt=0, description="Runtime instances (sessions) per version.")
    execution: Execution = Field(
        "auto",
        description="Where batches run: 'thread' (each instance's own thread, off the event "
        "loop), 'inline' (on the event loop), or 'auto': inline only for batches predicted, "
        "from measured runs, to take less than inline_below_us, where handing the batch to a "
        "thread would cost more than running it.",
    )
    inline_below_us: int = Field(
        100, ge=0, description="The 'auto' threshold; 0 keeps every run on the threads."
    )
    dynamic_batching: DynamicBatching | None = Field(
        None, description="Merge requests into batches; absent = one run per request."
    )
    queue: QueuePolicy = QueuePolicy()
    device: Device | None = Field(None, description="Overrides runtime.device for this model.")
    intra_op_threads: int | None = Field(None, ge=0)
    graph_optimization: GraphOptimization | None = None
    warmup: bool = Field(True, description="Run one request of zeros at load.")
    contract: ContractBinding = Field(
        ContractBinding(),
        description="Feature contract versions, when the model directory has features.yaml.",
    )
    description: str = ""
    price: Price = Field(Price(), description="Default prices of the variants serving it.")
    deterministic: bool = Field(
        False, description="The same row always gives the same output: responses may be cached."
    )

    @model_validator(mode="after")
    def _batching_needs_a_batch_dim(self) -> ModelConfig:
        if self.dynamic_batching is not None:
            if self.max_batch_size == 0:
                raise ValueError("dynamic_batching needs max_batch_size > 0")
            too_big = [
                s for s in self.dynamic_batching.preferred_batch_sizes if s > self.max_batch_size
            ]
            if too_big:
                raise ValueError(
                    f"preferred_batch_sizes {too_big} exceed max_batch_size {self.max_batch_size}"
                )
        return self


Section = TypeVar("Section", bound=BaseModel)


_SECRET_NAME = re.compile(r"token|key|secret|password", re.IGNORECASE)


def describe_validation_error(err: ValidationError, source: str) -> str:
    """One line per failure: the source, the key path, the message and the value at fault."""
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(root)"
        value = item.get("input")
        # A secret's value is never repeated, nor a misspelled key's (it may be a secret's).
        hidden = item["type"] == "extra_forbidden" or any(
            isinstance(p, str) and _SECRET_NAME.search(p) for p in item["loc"]
        )
        shown = "" if isinstance(value, dict) or hidden else f" (got {value!r})"
        lines.append(f"{source}: {key}: {item['msg']}{shown}")
    return "\n".join(lines)


# What YAML from a client (the admin service's routes) may be: bounded before it is built, so
# that neither a deep nesting (the composer recurses) nor an alias bomb (a few hundred bytes
# that expand to millions of nodes once validated or printed) can stall or grow the gateway.
MAX_YAML_BYTES: Final = 1024 * 1024
MAX_YAML_DEPTH: Final = 32
MAX_YAML_NODES: Final = 100_000


def bounded_yaml(
    text: str,
    what: str,
    *,
    max_bytes: int = MAX_YAML_BYTES,
    max_depth: int = MAX_YAML_DEPTH,
    max_nodes: int = MAX_YAML_NODES,
) -> Any:
    """``text`` loaded safely, once it is known to be at most ``max_bytes``, ``max_depth``
    levels deep and ``max_nodes`` nodes with every alias expanded; ValueError naming ``what``
    and the bound otherwise (yaml.YAMLError for what is not YAML)."""
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > max_bytes:
        raise ValueError(f"{what}: {size} bytes of YAML, over the {max_bytes} accepted")
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events: no recursion
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > max_depth:
                raise ValueError(f"{what}: YAML nested deeper than {max_depth} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        _expanded_nodes(root, {}, max_nodes, what)
    return yaml.safe_load(text)


def _expanded_nodes(node: yaml.Node, seen: dict[int, int], limit: int, what: str) -> int:
    """Nodes under ``node`` with aliases expanded (a shared node counts each time it is used;
    each is counted once, so a bomb is measured without being expanded)."""
    known = seen.get(id(node))
    if known is not None:
        return known
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_nodes(item, seen, limit, what) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            total += _expanded_nodes(key, seen, limit, what)
            total += _expanded_nodes(value, seen, limit, what)
    if total > limit:
        raise ValueError(f"{what}: YAML of more than {limit} nodes once its aliases expand")
    seen[id(node)] = total
    return total


def describe_yaml_error(err: yaml.YAMLError) -> str:
    """Where and what, without PyYAML's quote of the line (it may hold a secret)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(err, "problem", None) or type(err).__name__
    return f"not valid YAML{where}: {problem}"


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (empty file: {}); any problem is a SettingsError."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as err:
        raise SettingsError(f"{path}: cannot read: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise SettingsError(f"{path}: {describe_yaml_error(err)}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SettingsError(f"{path}: expected a mapping at the top level")
    return loaded


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    """``GATEWAY_SERVER__PORT=9000`` -> {"server": {"port": 9000}}; values parse as YAML."""
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        if _SECRET_NAME.search(path[-1]):  # a secret is its text: "0123" stays "0123"
            node[path[-1]] = raw
            continue
        try:
            node[path[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            node[path[-1]] = raw
    return tree


def load_settings(
    path: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from defaults, a YAML file, ``GATEWAY_<SECTION>__<FIELD>`` and flags."""
    data: dict[str, Any] = read_yaml(Path(path)) if path is not None else {}
    sources = [str(path) if path is not None else "defaults"]
    env_tree = _from_environ(os.environ if environ is None else environ)
    if env_tree:
        data = _merge(data, env_tree)
        sources.append("environment")
    if overrides:
        data = _merge(data, overrides)
        sources.append("flags")
    try:
        return Settings.model_validate(data)
    except ValidationError as err:
        raise SettingsError(describe_validation_error(err, " + ".join(sources))) from None


def load_model_config(path: Path) -> ModelConfig:
    """Read and validate a model's ``config.yaml`` (a missing file means all defaults)."""
    data = read_yaml(path) if path.exists() else {}
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as err:
        raise SettingsError(describe_validation_error(err, str(path))) from None
