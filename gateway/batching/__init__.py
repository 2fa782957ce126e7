"""Stage 5: per model version queues, dynamic batches, admission control."""

from gateway.batching.batcher import BatcherConfig, MicroBatcher

__all__ = ["BatcherConfig", "MicroBatcher"]
