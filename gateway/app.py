"""Gateway: builds every stage from Settings and owns start, drain and stop."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import ipaddress
import json
import logging
import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from grpc_health.v1 import health, health_pb2
from numpy.typing import NDArray

from gateway._extensions import native_modules
from gateway.accounting import Ledger
from gateway.adaptation._rollout_io import (
    FileRollouts,
    MemoryRollouts,
    RedisRollouts,
    RolloutLeases,
    RolloutRecords,
    SidecarVerdicts,
)
from gateway.adaptation.auto_gate import AutoGate
from gateway.adaptation.gate_result import refusal as gate_refusal
from gateway.adaptation.rollout import RolloutController
from gateway.api.v1 import inference_pb2 as pb
from gateway.auth import AuditLog, Gatekeeper, KeyEntry
from gateway.cache import ResponseCache
from gateway.errors import SettingsError
from gateway.events import EventRecorder
from gateway.features import model_contracts, redact
from gateway.pipeline import Pipeline
from gateway.routing import (
    LocalRoutes,
    RateLimiter,
    RemoteModels,
    RouteTable,
    SharedRouteTable,
    decision_problems,
)
from gateway.runtime.repository import ModelRepository
from gateway.runtime.session import installed_flavours, resolve_device
from gateway.server import convert, transports
from gateway.server.admin import AdminServicer
from gateway.server.guard import Guard
from gateway.server.rest.app import RestApp
from gateway.server.rest.servers import (
    Certificate,
    HttpServer,
    HttpTransport,
    make_http_server,
)
from gateway.server.servicer import InferenceServicer
from gateway.settings import Budget, RateLimit, Settings
from gateway.state import RedisState
from gateway.telemetry import GatewayMetrics, LoopLag, Tracing
from gateway.telemetry.statistics import ModelStatistics
from gateway.workers import READY_FILE_ENV

__all__ = ["Gateway"]

log = logging.getLogger(__name__)

_GC_GEN0_THRESHOLD = 20_000
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class Gateway:
    """One gateway process: gRPC server, model repository, runtime threads, telemetry."""

    def __init__(self, settings: Settings) -> None:
        if settings.repository.path is None:
            raise SettingsError("repository.path: a model repository is required (--repository)")
        self.settings = settings
        # Loading creates sessions off the event loop; runs happen on each instance's own thread.
        self._loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="loader")
        self.metrics = GatewayMetrics()
        self.tracing = Tracing(settings.telemetry)
        # adaptation.gate.auto: what the gate holds for want of a gate.json is judged by itself
        auto = (
            AutoGate.from_settings(settings, self.metrics)
            if settings.adaptation.gate.auto
            else None
        )
        self.auto_gate = auto
        self.repository = ModelRepository(
            Path(settings.repository.path),
            settings.runtime,
            self._loader,
            contracts=model_contracts,
            # adaptation.gate.required: a version serves only once `gateway validate` passed it
            admission=(auto.admission if auto else gate_refusal)
            if settings.adaptation.gate.required
            else None,
        )
        self.events: EventRecorder | None = None
        if settings.events.enabled:
            self.events = EventRecorder(
                settings.events, self.metrics, redact, settings.server.max_message_bytes
            )
        rate_limited = self.metrics.limited.labels("rate")
        self.state: RedisState | None = None
        self._ledger_sync: asyncio.Task[None] | None = None
        if settings.state.backend == "redis":
            self.state = RedisState(settings.state)
        self.loop_lag = LoopLag()
        routes = RouteTable(settings.routing.routes, settings.routing.history)
        self.pipeline = Pipeline(
            self.repository,
            self.metrics,
            routes=routes,
            limiter=RateLimiter(
                settings.routing.rate_limits,
                settings.routing.max_tenants,
                rate_limited.inc,
                shared=self.state.limits if self.state is not None else None,
                on_error=settings.state.limits_on_error,
                on_state_error=self.metrics.state_errors.labels("limits").inc,
            ),
            ledger=Ledger(
                settings.costs,
                self.metrics,
                shared=self.state.budgets if self.state is not None else None,
                on_error=settings.state.budgets_on_error,
                sync_interval_s=settings.state.sync_interval_ms / 1000,
                shared_lines=self.state.ledger if self.state is not None else None,
            ),
            cache=ResponseCache(
                settings.cache,
                self.metrics,
                shared=self.state.rows if self.state is not None else None,
            )
            if settings.cache.enabled
            else None,
            events=self.events,
            remote=RemoteModels(
                settings.routing.remote,
                self.metrics,
                convert.encode_remote_request,
                convert.decode_remote_response,
                in_use=lambda: _endpoints(routes),
            ),
            max_input_bytes=settings.server.max_message_bytes,
            loop_lag=self.loop_lag,
            tracer=self.tracing.tracer if self.tracing.enabled else None,
        )
        self.repository.on_retire = self.pipeline.retire
        self.gate = Gatekeeper(
            settings.auth,
            settings.admin.resolve_token(),
            on_refused=lambda rpc, reason: self.metrics.auth_refused.labels(rpc, reason).inc(),
            on_reload=lambda outcome: self.metrics.auth_reloads.labels(outcome).inc(),
        )
        if self.gate.keys is not None:
            self._apply_key_limits(self.gate.keys.entries)
            self.gate.keys.on_change.append(self._apply_key_limits)
        self.audit = AuditLog(
            settings.audit,
            lambda rpc, outcome: self.metrics.admin_actions.labels(rpc, outcome).inc(),
        )
        self.shared_routes: SharedRouteTable | None = None
        if self.state is not None:
            self.shared_routes = SharedRouteTable(
                self.pipeline.routes,
                self.state.routes,
                settings.routing.history,
                on_error=self.metrics.state_errors.labels("routes").inc,
            )
        worker = bool(os.environ.get(READY_FILE_ENV))
        # A worker of several runs no rollouts: each would drive its own copy of the routes.
        self.rollouts = None if worker else _rollout_controller(self)
        self.admin = AdminServicer(
            self.pipeline,
            self.repository,
            worker=worker,
            routes=self.shared_routes,
            rollouts=self.rollouts,
        )
        versions = self._versions_of
        self.guard = Guard(
            self.gate,
            self.audit,
            {
                "RepositoryModelLoad": versions,
                "RepositoryModelUnload": versions,
                **dict.fromkeys(
                    ("SetRoutes", "Promote", "Rollback", "SetThreshold"), self.admin.revisions
                ),
                **dict.fromkeys(
                    ("RolloutStart", "RolloutPause", "RolloutResume", "RolloutAbort"),
                    self.admin.revisions,
                ),
            },
        )
        self.servicer = InferenceServicer(
            self.pipeline, settings.server, self.metrics, self.tracing, self.guard
        )
        self._health = health.aio.HealthServicer()
        self._transport: transports.Transport | None = None
        self._http: HttpServer | None = None
        self.port = 0
        self.metrics_port: int | None = None

    async def start(self) -> None:
        settings = self.settings
        flavours = installed_flavours()
        if len(flavours) > 1:
            raise SettingsError(
                f"{' and '.join(flavours)} are both installed; they provide the same module "
                "and break each other: uninstall one (the `cpu` or `gpu` extra picks one)"
            )
        device = resolve_device(settings.runtime.device)
        log.info(
            "execution provider: %s (runtime.device=%s)",
            "CUDA" if device == "cuda" else "CPU",
            settings.runtime.device,
        )
        for module, native in native_modules().items():
            log.info("%s: %s", module, "native" if native else "pure-Python twin")
            self.metrics.native.labels(module=module).set(1 if native else 0)
        if self.events is not None:
            await self.events.start()
        if self.state is not None:
            await self.state.start()
            if self.pipeline.ledger.settings.enabled:
                await self.pipeline.ledger.sync()
                self._ledger_sync = asyncio.create_task(self.pipeline.ledger.run_sync())
        self.loop_lag.start()
        self.metrics.loop_lag.set_function(self.loop_lag)
        if self.shared_routes is not None:  # the replicas' table, if one was written before
            await self.shared_routes.start()
        if self.auto_gate is not None:
            self.auto_gate.start(self.repository)
        if settings.repository.load_at_start:
            await self.repository.load_all()
            self._check_routes()
        if self.rollouts is not None:  # each active rollout back at its step
            await self.rollouts.start()
        self.metrics.models_ready.set_function(lambda: len(self.repository.loaded()))
        self.metrics.watch_coverage(self._coverage)
        self.metrics.watch_versions(self._version_statistics, settings.cache.enabled)
        # NOTE: what start-up built lives as long as the process: move it out of the cyclic
        # collector's sight, and collect the young generation less often. Serving allocates
        # many short-lived objects per request and creates few cycles.
        gc.collect()
        gc.freeze()
        gc.set_threshold(_GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])

        if self.gate.mode == "none":
            log.warning("%s", self.gate.describe())
        else:
            log.info("%s", self.gate.describe())
        if not settings.tls.enabled and not _loopback(settings.server.host):
            log.warning(
                "server.host %s is reachable from other machines and tls.cert_file is not set: "
                "keys, the admin token and requests cross the network in clear",
                settings.server.host,
            )
        name, why = transports.choose(settings.server, settings.tls)
        log.info("transport: %s (%s)", name, why)
        transport = transports.create(
            name,
            settings.server,
            transports.Services(self.servicer, self.admin, self._health, self.guard),
            settings.tls,
        )
        await transport.start()
        self._transport = transport
        self.port = transport.port
        if settings.server.http_port is not None:
            self._http = await _http_server(self, settings)
        if settings.telemetry.metrics_port is not None:
            self.metrics_port = self.metrics.serve(
                settings.telemetry.metrics_host, settings.telemetry.metrics_port
            )
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.servicer.is_ready = True
        ready_file = os.environ.get(READY_FILE_ENV)
        if ready_file:
            state = {"pid": os.getpid(), "port": self.port, "metrics": self.metrics_port}
            await asyncio.to_thread(_write_atomically, Path(ready_file), json.dumps(state))
        log.info(
            "%s ready grpc=%s:%d metrics=%s http=%s models=%d transport=%s",
            "worker" if os.environ.get(READY_FILE_ENV) else "gateway",
            settings.server.host,
            self.port,
            f"{settings.telemetry.metrics_host}:{self.metrics_port}"
            if self.metrics_port
            else "off",
            f"{settings.server.host}:{self._http.port}" if self._http is not None else "off",
            len(self.repository.loaded()),
            transport.name,
        )

    def _check_routes(self) -> None:
        """A route naming a model the repository does not serve: said at start, not at the
        first request (its attempts would fail over to the route's fallbacks)."""
        for name, route in self.pipeline.routes.all().items():
            for variant in route.spec.variants:
                model = variant.required_model
                if model is not None and not self.repository.versions(model):
                    log.warning(
                        "route %s: variant %s names model '%s', which is not loaded",
                        name,
                        variant.name,
                        model,
                    )
        routes = {name: route.spec for name, route in self.pipeline.routes.all().items()}
        for problem in decision_problems(routes, self.repository.output_names):
            log.warning("routes: %s (no decision is added)", problem)

    def _version_statistics(self) -> list[tuple[str, str, ModelStatistics]]:
        return [(lv.name, lv.version_label, lv.stats) for lv in self.repository.loaded()]

    def _versions_of(self, request: object) -> list[str]:
        """The loaded versions of the model a repository call names (its audit state)."""
        name = getattr(request, "model_name", "")
        return [v.version_label for v in self.repository.versions(name)] if name else []

    def _apply_key_limits(self, entries: tuple[KeyEntry, ...]) -> None:
        """The keys file's rate limits and budgets, as their tenants' (after each reload)."""
        limits: dict[str, RateLimit] = {}
        budgets: dict[str, Budget] = {}
        for entry in entries:
            tenant = entry.tenant_name
            if entry.rate_limit is not None:
                limits[tenant] = entry.rate_limit
            if entry.budget is not None and tenant not in budgets:
                budgets[tenant] = Budget(
                    name=_budget_name(tenant),
                    tenant=tenant,
                    limit=entry.budget.limit,
                    window_s=entry.budget.window_s,
                    policy=entry.budget.policy,
                )
        self.pipeline.limiter.set_key_limits(limits)
        self.pipeline.ledger.set_key_budgets(list(budgets.values()))

    def _coverage(self) -> list[tuple[str, str, str, list[str], NDArray[np.int64]]]:
        return [
            (lv.name, lv.version_label, lv.contract.version, lv.contract.feature_names, lv.coverage)
            for lv in self.repository.loaded()
            if lv.contract is not None
        ]

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (up to the grace period), then close."""
        if self._transport is None:
            return
        grace = self.settings.server.shutdown_grace_s if grace_s is None else grace_s
        log.info("draining: no new requests, %.1f s for in-flight ones", grace)
        self.servicer.is_ready = False
        await self._health.enter_graceful_shutdown()
        if self._http is not None:
            await self._http.stop()
            self._http = None
        await self._transport.stop(grace)
        self._transport = None
        if self.rollouts is not None:
            await self.rollouts.close()
        if self.auto_gate is not None:
            await self.auto_gate.close()
        await self.pipeline.close()
        if self.pipeline.remote is not None:
            await self.pipeline.remote.close()
        self.loop_lag.close()
        if self.events is not None:
            await self.events.close(grace_s=min(grace, 5.0))
        self._loader.shutdown(wait=True)
        self.audit.close()
        if self.shared_routes is not None:
            await self.shared_routes.close()
        if self.pipeline.cache is not None:
            await self.pipeline.cache.close()  # its last rows, for the other replicas
        if self.state is not None:
            if self._ledger_sync is not None:
                self._ledger_sync.cancel()
                await asyncio.gather(self._ledger_sync, return_exceptions=True)
                await self.pipeline.ledger.sync()  # the last spend, for the other replicas
            await self.state.close()
        self.metrics.close()
        self.tracing.shutdown()
        log.info("gateway stopped")

    async def serve_until_signal(self) -> None:
        """Run until SIGTERM or SIGINT, then drain gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        await self.stop()


# server.http_transport auto: aiohttp and uvicorn measured side by side (benchmarks/bench_http.py).
_HTTP_AUTO: HttpTransport = "uvicorn"


async def _http_server(gateway: Gateway, settings: Settings) -> HttpServer:
    """KServe v2 REST on server.http_port, on the servicer and guard gRPC uses."""
    if settings.auth.mode == "mtls" or settings.tls.client_ca_file is not None:
        raise SettingsError(
            "server.http_port: the HTTP front end takes no client certificates (auth.mode "
            "mtls, tls.client_ca_file): serve gRPC alone, or use api keys over HTTPS"
        )
    app = RestApp(gateway.servicer, gateway.guard, settings.server.max_message_bytes)
    kind = settings.server.http_transport
    tls = settings.tls
    certificate = None
    if tls.enabled:  # HTTPS with the certificate gRPC presents
        assert tls.cert_file is not None and tls.key_file is not None
        certificate = Certificate(tls.cert_file, tls.key_file)
    server = make_http_server(
        _HTTP_AUTO if kind == "auto" else kind,
        app,
        settings.server.host,
        settings.server.http_port or 0,
        certificate,
        reuse_port=settings.server.reuse_port,  # a worker of several: they share the port
    )
    await server.start()
    log.info("http: KServe v2 REST on %s:%d (%s)", settings.server.host, server.port, server.name)
    return server


def _rollout_controller(gateway: Gateway) -> RolloutController:
    """Rollouts judged by adaptation.rollout.sidecar (else events.sidecar), kept in Redis with
    the shared routes, else in adaptation.rollout.state_file."""
    settings = gateway.settings.adaptation.rollout
    sidecar = settings.sidecar or gateway.settings.events.sidecar
    records: RolloutRecords
    if gateway.state is not None:
        records = RedisRollouts(gateway.state)
    elif settings.state_file is not None:
        records = FileRollouts(settings.state_file)
    else:
        records = MemoryRollouts()
    controller = RolloutController(
        settings,
        gateway.pipeline.routes,
        gateway.shared_routes or LocalRoutes(gateway.pipeline.routes),
        records,
        SidecarVerdicts(sidecar, settings) if sidecar else None,
        gateway.audit,
        health=gateway.pipeline.router,
        leases=None if gateway.state is None else RolloutLeases(gateway.state, settings.lease_s),
    )
    gateway.metrics.gauge_function(
        "gateway_rollout_traffic",
        "Per rollout (route, candidate, step, state): the share of the route's traffic its "
        "candidate answers now (0 at the shadow step and once rolled back; 1 once stable).",
        ["route", "candidate", "step", "state"],
        controller.samples,
    )
    return controller


def _endpoints(routes: RouteTable) -> set[str]:
    """The endpoints of the remote variants of the routes in force."""
    return {
        variant.endpoint
        for route in routes.all().values()
        for variant in route.spec.variants
        if variant.endpoint is not None
    }


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _budget_name(tenant: str) -> str:
    """The ledger's name for the budget the keys file gives ``tenant``: the tenant's, so a
    key rotated keeps its tenant's spend (a tenant not fit for a name goes by its hash)."""
    name = f"tenant.{tenant}"
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name):
        return name
    return f"tenant.{hashlib.sha256(tenant.encode()).hexdigest()[:16]}"


def _write_atomically(path: Path, text: str) -> None:
    """Write then rename, so a reader polling for ``path`` never sees it half written."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)
