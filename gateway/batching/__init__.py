"""Stage 5: scheduling model runs."""

from gateway.batching.scheduler import DirectScheduler, Outcome

__all__ = ["DirectScheduler", "Outcome"]
