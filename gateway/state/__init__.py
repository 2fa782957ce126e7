"""Where state that replicas share lives (``state.backend``): in this process (the embedded
default: each stage keeps its own) or in Redis, shared by every replica pointing at it.

What is shared so far: the rate limits' buckets (``SharedLimits``) and the budgets' spend per
window (``SharedBudgets``), the route table (``SharedRoutes``). Each concern says what
happens when Redis does not answer in ``state.timeout_ms`` (``state.<concern>_on_error``)."""

from gateway.state.redis import (
    RedisState,
    SharedBudgets,
    SharedLimits,
    SharedRoutes,
    StateUnavailable,
)

__all__ = ["RedisState", "SharedBudgets", "SharedLimits", "SharedRoutes", "StateUnavailable"]
