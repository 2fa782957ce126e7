"""Stage 5: per model version queues, dynamic batches, admission control."""

from gateway.batching.batcher import MicroBatcher, Outcome

__all__ = ["MicroBatcher", "Outcome"]
