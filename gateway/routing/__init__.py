"""Stage 2: routes, rate limits and the traffic that follows them (fallbacks, shadows,
remote variants)."""

from gateway.routing.limits import ConcurrencyCap, RateLimiter
from gateway.routing.remote import RemoteCall, RemoteModels
from gateway.routing.runner import Attempt, Router, VariantHealth
from gateway.routing.shared import LocalRoutes, RouteStore, SharedRouteTable
from gateway.routing.table import Route, RouteTable, decision_problems, unit_hash

__all__ = [
    "Attempt",
    "ConcurrencyCap",
    "LocalRoutes",
    "RateLimiter",
    "RemoteCall",
    "RemoteModels",
    "Route",
    "RouteStore",
    "RouteTable",
    "Router",
    "SharedRouteTable",
    "VariantHealth",
    "decision_problems",
    "unit_hash",
]
