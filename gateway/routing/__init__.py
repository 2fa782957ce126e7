"""Stage 2: routes, rate limits and the traffic that follows them (fallbacks, shadows)."""

from gateway.routing.limits import ConcurrencyCap, RateLimiter
from gateway.routing.runner import Attempt, Router
from gateway.routing.table import Route, RouteTable, unit_hash

__all__ = ["Attempt", "ConcurrencyCap", "RateLimiter", "Route", "RouteTable", "Router", "unit_hash"]
