"""Stage 1, the admin service: routes (get, set, promote, rollback), staged rollouts (start,
status, pause, resume, abort: ``gateway.adaptation.rollout``), the cost ledger, the cache.

Guarded like every RPC (``server.guard``): each needs admin rights by default (the bearer
token of ``admin.token`` or an admin key; ``auth.rpc_access`` may say otherwise), and each is
written to the audit log with the routes' revisions before and after. Every change is logged
with what changed.

Routes, the cache and the ledger live in each gateway process. In multi-process mode
(``server.workers`` > 1) a call reaches whichever worker its connection landed on, so every
call but GetRoutes is refused there (FAILED_PRECONDITION) rather than changing or reporting
one worker of several.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import asdict
from typing import TYPE_CHECKING, NoReturn

import grpc
import yaml
from pydantic import TypeAdapter, ValidationError

from gateway.api.v1 import admin_pb2 as pb
from gateway.api.v1 import admin_pb2_grpc as pb_grpc
from gateway.auth import current_principal
from gateway.errors import GatewayError
from gateway.pipeline import Pipeline
from gateway.routing import LocalRoutes, RouteStore, decision_problems
from gateway.runtime.repository import ModelRepository
from gateway.settings import MAX_ROUTES, RouteSpec, bounded_yaml, describe_validation_error

if TYPE_CHECKING:
    from gateway.adaptation.rollout import Rollout, RolloutController

__all__ = ["AdminServicer", "routes_yaml"]

log = logging.getLogger(__name__)

_ROUTES = TypeAdapter(dict[str, RouteSpec])
_MAX_MESSAGE_CHARS = 4096


def routes_yaml(routes: dict[str, RouteSpec]) -> str:
    """The route table as the YAML of the ``routing.routes`` settings section."""
    tree = {
        name: spec.model_dump(mode="json", exclude_defaults=True) for name, spec in routes.items()
    }
    return yaml.safe_dump(tree, sort_keys=False) if tree else ""


class AdminServicer(pb_grpc.GatewayAdminServicer):
    def __init__(
        self,
        pipeline: Pipeline,
        repository: ModelRepository,
        worker: bool = False,
        routes: RouteStore | None = None,
        rollouts: RolloutController | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._repository = repository
        self._worker = worker  # one of several processes on the port
        # Where route changes go: this process's table, or the replicas' shared one.
        self._store: RouteStore = routes or LocalRoutes(pipeline.routes)
        self._rollouts = rollouts  # None in a worker of several: it runs no rollouts

    def revisions(self, _request: object = None) -> dict[str, int]:
        """The routes' revisions: the state an admin call's audit line shows before and after."""
        return {name: r.revision for name, r in self._pipeline.routes.all().items()}

    async def _routes_change(self, context: grpc.aio.ServicerContext) -> None:
        """Route changes reach every process: the routes are shared, or this is the only one."""
        if not self._store.shared:
            await self._whole(context)

    async def _whole(self, context: grpc.aio.ServicerContext) -> None:
        """This process is the whole gateway (not one worker of several)."""
        if self._worker:
            await _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "this gateway runs several worker processes (server.workers), each with its "
                "own routes, cache and ledger: change routes in the settings and restart; "
                "read costs and cache counters from each worker's metrics port",
            )

    def _routes(self) -> pb.Routes:
        routes = self._pipeline.routes.all()
        return pb.Routes(
            yaml=routes_yaml({name: r.spec for name, r in routes.items()}),
            revisions={name: r.revision for name, r in routes.items()},
            generation=self._pipeline.routes.generation,
        )

    async def GetRoutes(
        self, request: pb.GetRoutesRequest, context: grpc.aio.ServicerContext
    ) -> pb.Routes:
        return self._routes()

    async def SetRoutes(
        self, request: pb.SetRoutesRequest, context: grpc.aio.ServicerContext
    ) -> pb.Routes:
        await self._routes_change(context)
        try:
            # Off the loop: bounded (settings.bounded_yaml, the route limits), but still work
            # that requests should not wait behind.
            routes = await asyncio.to_thread(_parse_routes, request.yaml)
        except yaml.YAMLError as err:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"routes: not YAML: {err}")
        except ValidationError as err:
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, describe_validation_error(err, "routes")
            )
        except ValueError as err:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        unserved = sorted(
            {
                f"{name}.{v.name}: model '{v.required_model}'"
                for name, spec in routes.items()
                for v in spec.variants
                if v.required_model is not None and not self._repository.versions(v.required_model)
            }
        )
        if unserved:
            await _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"routes name models this gateway does not serve: {'; '.join(unserved)}",
            )
        wrong = decision_problems(routes, self._repository.output_names)
        if wrong:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "; ".join(wrong))
        try:
            changed = await self._store.change(
                lambda table: table.replace(routes), request.expected_generation
            )
        except GatewayError as err:
            await _abort(context, err.grpc_status, str(err))
        log.info("admin: routes set; changed: %s", ", ".join(changed) or "none")
        return self._routes()

    async def Promote(
        self, request: pb.PromoteRequest, context: grpc.aio.ServicerContext
    ) -> pb.Routes:
        await self._routes_change(context)
        try:
            await self._store.change(
                lambda table: table.promote(request.route, request.variant),
                request.expected_generation,
            )
        except GatewayError as err:
            await _abort(context, err.grpc_status, str(err))
        log.info("admin: route %s: %s promoted to 100%%", request.route, request.variant)
        return self._routes()

    async def SetThreshold(
        self, request: pb.ThresholdRequest, context: grpc.aio.ServicerContext
    ) -> pb.Routes:
        await self._routes_change(context)
        threshold = request.threshold if request.HasField("threshold") else None
        if (threshold is None) == (request.raise_by == 0):
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "give threshold or raise_by (not both)"
            )
        if not math.isfinite(request.raise_by) or request.raise_by < 0:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "raise_by: a number >= 0")
        if threshold is not None and not math.isfinite(threshold):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "threshold: a finite number")
        try:
            await self._store.change(
                lambda table: table.set_threshold(request.route, threshold, request.raise_by),
                request.expected_generation,
            )
        except GatewayError as err:
            await _abort(context, err.grpc_status, str(err))
        route = self._pipeline.routes.get(request.route)
        decision = route.spec.decision if route is not None else None
        log.info("admin: route %s: decision threshold %s", request.route, decision)
        return self._routes()

    async def Rollback(
        self, request: pb.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.Routes:
        await self._routes_change(context)
        rollouts = self._rollouts
        try:
            if rollouts is not None and await rollouts.active(request.route):
                # One command at any step: the route goes back to its spec from before the
                # rollout (the stable version at 100%), not to the step before this one.
                self._pipeline.routes.expect(request.expected_generation)
                await rollouts.abort(
                    request.route,
                    _actor(),
                    f"rolled back by {_actor()} (gateway rollback)",
                    state="rolled_back",
                )
            else:
                await self._store.change(
                    lambda table: table.rollback(request.route), request.expected_generation
                )
        except GatewayError as err:
            await _abort(context, err.grpc_status, str(err))
        log.info("admin: route %s rolled back to its previous spec", request.route)
        return self._routes()

    async def _rollout_call(
        self,
        context: grpc.aio.ServicerContext,
        act: str,
        route: str,
        candidate: str = "",
        steps: tuple[str, ...] = (),
    ) -> pb.Rollout:
        await self._whole(context)
        rollouts = self._rollouts
        if rollouts is None:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "rollouts are off here")
        try:
            if act == "start":
                rollout = await rollouts.begin(route, candidate, list(steps), _actor())
            elif act == "pause":
                rollout = await rollouts.pause(route, _actor())
            elif act == "resume":
                rollout = await rollouts.resume(route, _actor())
            elif act == "abort":
                rollout = await rollouts.abort(route, _actor())
            else:
                rollout = await rollouts.status(route)
        except GatewayError as err:
            await _abort(context, err.grpc_status, str(err))
        return _rollout_pb(rollout)

    async def RolloutStart(
        self, request: pb.RolloutStartRequest, context: grpc.aio.ServicerContext
    ) -> pb.Rollout:
        if not request.candidate:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "candidate: a version")
        route = self._pipeline.routes.get(request.route)
        stable = next((v for v in route.spec.variants if v.weight > 0), None) if route else None
        model = stable.local_model if stable is not None else None
        if model is not None and request.candidate not in {
            v.version_label for v in self._repository.versions(model)
        }:
            await _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model '{model}' version {request.candidate} is not loaded",
            )
        return await self._rollout_call(
            context, "start", request.route, request.candidate, tuple(request.steps)
        )

    async def RolloutStatus(
        self, request: pb.RolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.Rollout:
        return await self._rollout_call(context, "status", request.route)

    async def RolloutPause(
        self, request: pb.RolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.Rollout:
        return await self._rollout_call(context, "pause", request.route)

    async def RolloutResume(
        self, request: pb.RolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.Rollout:
        return await self._rollout_call(context, "resume", request.route)

    async def RolloutAbort(
        self, request: pb.RolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.Rollout:
        return await self._rollout_call(context, "abort", request.route)

    async def Costs(
        self, request: pb.CostsRequest, context: grpc.aio.ServicerContext
    ) -> pb.CostsResponse:
        ledger = self._pipeline.ledger
        if ledger.shared_lines is None:  # else every worker answers for all of them
            await self._whole(context)
        try:
            ledger_lines = await ledger.all_lines(request.since)
        except GatewayError as err:
            await _abort(context, err.grpc_status, str(err))
        lines = [
            pb.CostLine(
                window_start=line.window_start,
                tenant=line.tenant,
                route=line.route,
                variant=line.variant,
                surface=line.surface,
                requests=line.requests,
                rows=line.rows,
                cached_rows=line.cached_rows,
                compute_s=line.compute_s,
                cost=line.cost,
            )
            for line in ledger_lines
        ]
        budgets = [
            pb.BudgetState(
                name=b.name,
                subject="tenant" if b.tenant is not None else "surface",
                value=b.tenant if b.tenant is not None else (b.surface or ""),
                limit=b.limit,
                window_s=b.window_s,
                window_start=start,
                spent=spent,
                policy=b.policy,
            )
            for b, start, spent in ledger.budgets()
        ]
        return pb.CostsResponse(lines=lines, budgets=budgets, window_s=ledger.settings.window_s)

    async def Cache(
        self, request: pb.CacheRequest, context: grpc.aio.ServicerContext
    ) -> pb.CacheResponse:
        await self._whole(context)
        cache = self._pipeline.cache
        if cache is None:
            return pb.CacheResponse(enabled=False)
        stats = cache.stats()
        flushed = cache.flush() if request.flush else 0
        if request.flush:
            log.info("admin: response cache flushed (%d rows)", flushed)
        return pb.CacheResponse(
            enabled=True,
            entries=stats["entries"],
            bytes=stats["bytes"],
            max_bytes=stats["max_bytes"],
            hits=stats["hits"],
            misses=stats["misses"],
            coalesced=stats["coalesced"],
            evictions=stats["evictions"],
            collisions=stats["collisions"],
            flushed=flushed,
        )


def _actor() -> str:
    """The caller's name (as the audit log has it), for a rollout's reasons."""
    principal = current_principal.get(None)
    return principal.name if principal is not None else "admin"


def _rollout_pb(rollout: Rollout) -> pb.Rollout:
    return pb.Rollout(
        route=rollout.route,
        candidate=rollout.candidate,
        state=rollout.state,
        steps=rollout.steps,
        step=rollout.step,
        reason=rollout.reason,
        json=json.dumps(asdict(rollout), default=str),
    )


def _parse_routes(text: str) -> dict[str, RouteSpec]:
    tree = bounded_yaml(text, "routes") if text.strip() else {}
    if isinstance(tree, dict) and len(tree) > MAX_ROUTES:  # before pydantic builds them all
        raise ValueError(f"routes: {len(tree)} routes, over the {MAX_ROUTES} accepted")
    return _ROUTES.validate_python(tree or {})


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
) -> NoReturn:
    if len(message) > _MAX_MESSAGE_CHARS:  # a status echoes client input: bounded
        message = message[:_MAX_MESSAGE_CHARS] + " [...]"
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")
