"""Where state that replicas share lives (``state.backend``): in this process (the embedded
default: each stage keeps its own) or in Redis, shared by every replica pointing at it.

What is shared: the rate limits' buckets (``SharedLimits``), the budgets' spend and the
cost ledger's lines per window (``SharedBudgets``, ``SharedLedger``), the route table
(``SharedRoutes``) and the response cache's rows (``SharedRows``). Each concern says what
happens when Redis does not answer within ``state.timeout_ms`` (README, "Running more than
one replica")."""

from gateway.state.redis import (
    PastDeadline,
    RedisState,
    SharedBudgets,
    SharedLedger,
    SharedLimits,
    SharedRoutes,
    SharedRows,
    StateUnavailable,
)

__all__ = [
    "PastDeadline",
    "RedisState",
    "SharedBudgets",
    "SharedLedger",
    "SharedLimits",
    "SharedRoutes",
    "SharedRows",
    "StateUnavailable",
]
