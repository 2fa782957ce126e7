"""Playbooks act (``evaluation.playbooks``): each round of the watch, what the alerts firing ask
for, and the model's retraining triggers that are due (``triggers.py``).

An alert's incident is its key (rule, model, version, segment, feature, action) from the round
it starts firing until it stops. On an incident's first round its action acts, once:

- ``human_review``: appended to the review queue (``reviews``, while none is open for the same
  incident) with the latest events of its version and segment in its window exported to
  ``<store>/reviews/<id>.parquet``; ``gateway review list|resolve`` reads and closes it;
- ``rollback``: the gateway's admin Rollback (``playbooks.gateway``) for each route that
  served the version (not as a shadow) in the rule's window;
- ``tighten_thresholds``: the threshold it suggests is recorded. NOTE: the gateway has no
  decision threshold yet (its scores are returned as they are), so nothing is changed;
- ``retrain``: the model's triggers run (kind ``drift``) once it has fired ``drift_checks``
  consecutive rounds.

Besides, a quality alert on a trigger's ``primary_metric`` runs it (kind ``performance``),
whatever the alert's action. Every action is recorded in the journal's ``actions``; one taken
on the same incident within ``playbooks.cooldown_s`` (a restarted sidecar sees its alerts
start again) is not taken again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from gateway.api.v1 import admin_pb2 as admin_pb
from gateway.api.v1 import admin_pb2_grpc as admin_grpc
from gateway.auth import ClientCredentials
from gateway.evaluation.journal import Journal
from gateway.evaluation.metrics import SidecarMetrics
from gateway.evaluation.store import EventStore
from gateway.evaluation.triggers import Firing, Triggers
from gateway.settings import QUALITY_METRICS, EvaluationSettings, read_secret

__all__ = ["Playbooks", "describe"]

log = logging.getLogger(__name__)

Key = tuple[str, ...]
_T = TypeVar("_T")


class Playbooks:
    """The adaptation loop's side in the sidecar: playbook actions and retraining triggers,
    recorded in the store's journal. Store calls go through ``db`` (the store's thread)."""

    def __init__(
        self,
        store: EventStore,
        settings: EvaluationSettings,
        metrics: SidecarMetrics,
        db: Executor,
    ) -> None:
        self.settings = settings.playbooks
        self.metrics = metrics
        self.db = db
        self.journal = Journal(store)
        self.triggers = Triggers(settings.triggers, self.journal, db, metrics)
        self._streaks: dict[Key, int] = {}  # consecutive rounds each alert has fired

    async def round(self, firing: dict[Key, dict[str, Any]], now_s: float) -> None:
        """One round of the watch: ``firing`` is every alert firing now, by key."""
        self._streaks = {key: self._streaks.get(key, 0) + 1 for key in firing}
        ran: set[str] = set()  # a trigger fires at most once a round, whatever asks
        for key, alert in firing.items():
            incident = "|".join(key)
            streak = self._streaks[key]
            if streak == 1:
                await self._act(alert, incident, now_s)
            for wanted in self._asked(alert, incident, streak):
                if wanted.spec.label not in ran:
                    ran.add(wanted.spec.label)
                    await self.triggers.fire(wanted, now_s)
        for wanted in await self.triggers.due(now_s):
            if wanted.spec.label not in ran:
                ran.add(wanted.spec.label)
                await self.triggers.fire(wanted, now_s)

    async def close(self) -> None:
        await self.triggers.close()

    def _asked(self, alert: dict[str, Any], incident: str, streak: int) -> list[Firing]:
        """The triggers ``alert`` asks to run in this round of its incident."""
        out: list[Firing] = []
        metric = alert.get("metric")
        for spec in self.triggers.of(alert["model"]):
            if spec.primary_metric is not None and metric == spec.primary_metric:
                if streak == 1:
                    out.append(Firing(spec, "performance", describe(alert), incident))
            elif (
                alert["action"] == "retrain"
                and "retrain" in self.settings.enabled
                and spec.drift_checks is not None
                and streak == spec.drift_checks
            ):
                reason = f"{describe(alert)}, firing {streak} consecutive checks"
                out.append(Firing(spec, "drift", reason, incident))
        return out

    async def _act(self, alert: dict[str, Any], incident: str, now_s: float) -> None:
        action = str(alert["action"])
        if action not in self.settings.enabled:
            return
        if action == "retrain" and self.triggers.of(alert["model"]):
            return  # the triggers run it (_asked), recorded as their runs
        last = await self._in_db(self.journal.last_action_s, action, incident)
        if last is not None and now_s - last < self.settings.cooldown_s:
            log.info("%s on %s: taken %.0f s ago (cooldown)", action, incident, now_s - last)
            return
        entry: dict[str, Any] = {
            "time": now_s,
            "model": alert["model"],
            "kind": action,
            "name": action,
            "incident": incident,
            "reason": describe(alert),
            "ran": "",
        }
        try:
            if action == "human_review":
                entry |= await self._review(alert, incident, now_s)
            elif action == "rollback":
                entry |= await self._rollback(alert, now_s)
            elif action == "tighten_thresholds":
                entry |= await self._tighten(alert, now_s)
            else:  # retrain, with no trigger for the model
                entry |= {
                    "outcome": "skipped",
                    "detail": {"why": f"no evaluation.triggers entry for model {alert['model']}"},
                }
        except Exception as err:  # an action that fails is recorded; the watch goes on
            log.exception("playbook %s on %s failed", action, incident)
            entry |= {"outcome": "error", "output": f"{type(err).__name__}: {err}"}
        await self._in_db(self.journal.record, entry)
        self.metrics.playbook_actions.labels(alert["model"], action, entry["outcome"]).inc()
        log.warning("playbook %s %s: %s", action, entry["outcome"], entry["reason"])

    async def _review(self, alert: dict[str, Any], incident: str, now_s: float) -> dict[str, Any]:
        review = await self._in_db(
            self.journal.open_review, alert, incident, now_s, self.settings.review_rows
        )
        return {"outcome": "queued", "ran": f"review {review}", "detail": {"review": review}}

    async def _rollback(self, alert: dict[str, Any], now_s: float) -> dict[str, Any]:
        """Roll back each route that served the alert's version."""
        return await self._on_routes(
            alert,
            now_s,
            "Rollback",
            "Rollback",
            lambda route: admin_pb.RollbackRequest(route=route),
        )

    async def _tighten(self, alert: dict[str, Any], now_s: float) -> dict[str, Any]:
        """Raise the decision threshold of each route that served the alert's version by
        ``threshold_step`` (each route no higher than its own max_threshold)."""
        step = self.settings.threshold_step
        return await self._on_routes(
            alert,
            now_s,
            "SetThreshold",
            f"SetThreshold raise_by {step:g}:",
            lambda route: admin_pb.ThresholdRequest(route=route, raise_by=step),
        )

    async def _on_routes(
        self,
        alert: dict[str, Any],
        now_s: float,
        rpc: str,
        what: str,
        request: Callable[[str], Any],
    ) -> dict[str, Any]:
        """Call the gateway's admin ``rpc`` with ``request(route)`` on each route that served
        the alert's version (``what`` says it in the record)."""
        settings = self.settings
        since_us = int((now_s - float(alert.get("window_s") or 3600)) * 1_000_000)
        rows = await self._in_db(
            self.journal.store.query,
            "SELECT DISTINCT route FROM events WHERE model = ? AND version = ? "
            "AND arm <> 'shadow' AND event_time >= make_timestamp(?) ORDER BY route",
            [alert["model"], alert["version"], since_us],
        )
        routes = [str(route) for (route,) in rows if route]
        if settings.gateway is None or not routes:
            why = (
                "evaluation.playbooks.gateway is not set: no gateway to act on"
                if settings.gateway is None
                else f"no route served version {alert['version']} in the rule's window"
            )
            return {"outcome": "skipped", "detail": {"why": why, "routes": routes}}
        results = await asyncio.to_thread(
            self._call_gateway, settings.gateway, routes, rpc, request
        )
        failed = [route for route, error in results.items() if error]
        return {
            "outcome": "failed" if failed else "ok",
            "ran": f"{what} {', '.join(routes)} at {settings.gateway}",
            "output": "; ".join(f"{r}: {e}" for r, e in results.items() if e),
            "detail": {"routes": routes, "failed": failed},
        }

    def _call_gateway(
        self, address: str, routes: list[str], rpc: str, request: Callable[[str], Any]
    ) -> dict[str, str]:
        """Call the gateway's admin ``rpc`` (Rollback, SetThreshold) with ``request(route)``
        on each route (raw gRPC: the sidecar does not import the gateway's server package);
        route -> "" or the error."""
        settings = self.settings
        where = "evaluation.playbooks.admin_token_file"
        token = read_secret(None, settings.admin_token_file, where)
        credentials = ClientCredentials(token, settings.gateway_tls)
        out: dict[str, str] = {}
        with credentials.channel(address, "gateway") as channel:
            stub = admin_grpc.GatewayAdminStub(channel)  # type: ignore[no-untyped-call]
            for route in routes:
                try:
                    getattr(stub, rpc)(
                        request(route),
                        metadata=credentials.metadata,
                        timeout=settings.rollback_timeout_s,
                    )
                    out[route] = ""
                except grpc.RpcError as err:
                    code = err.code() if isinstance(err, grpc.Call) else None
                    details = err.details() if isinstance(err, grpc.Call) else str(err)
                    out[route] = f"{code.name if code else 'error'}: {details}"
        return out

    async def _in_db(self, call: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.db, call, *args)


def describe(alert: dict[str, Any]) -> str:
    """One line for an alert: ``rule psi(amount) 0.31 above 0.2 on version 2 segment all``."""
    metric = alert.get("metric", "")
    feature = f"({alert['feature']})" if alert.get("feature") else ""
    value = alert.get("value")
    shown = f"{value:.4g}" if isinstance(value, float | int) else str(value)
    kind = "quality alert" if metric in QUALITY_METRICS else "alert"
    return (
        f"{kind} {alert['rule']}: {metric}{feature} {shown} {alert.get('direction', '')} "
        f"{alert.get('threshold', '')} on version {alert['version']} segment {alert['segment']}"
    )
