"""Per model version counters in the shape of Triton's ModelStatistics (transport-free)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["FAILURE_REASONS", "BatchStats", "Duration", "ModelStatistics"]

# Why a request failed, as Triton's nv_inference_request_failure says it: turned away by the
# scheduler (queue full, its deadline), cancelled, the model runtime, anything else.
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStatistics:
    """Updated on the event loop only, so plain integers need no lock."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)
    cache_hit: Duration = field(default_factory=Duration)  # answered whole from the cache
    cache_miss: Duration = field(default_factory=Duration)  # looked up, then computed
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_REASONS, 0))

    def record_execution(self, rows: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One model run over ``rows`` rows (a batch)."""
        self.execution_count += 1
        batch = self.batches.get(rows)
        if batch is None:
            batch = self.batches[rows] = BatchStats()
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)

    def record_request(
        self,
        rows: int,
        total_ns: int,
        queue_ns: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        cached_rows: int = 0,
        lookup_ns: int = 0,
    ) -> None:
        """One successful request and its share of the time; one the cache answered whole is
        a cache hit and computed nothing (as Triton counts them)."""
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.success.add(total_ns)
        self.queue.add(queue_ns)
        if rows and cached_rows >= rows:
            self.cache_hit.add(lookup_ns)
            return
        if lookup_ns:
            self.cache_miss.add(lookup_ns)
        self.inference_count += rows
        self.compute_input.add(input_ns)
        self.compute_infer.add(infer_ns)
        self.compute_output.add(output_ns)

    def record_failure(self, total_ns: int, reason: str = "OTHER") -> None:
        self.fail.add(total_ns)
        self.failures[reason] = self.failures.get(reason, 0) + 1
