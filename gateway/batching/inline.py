"""Stage 5: whether the scheduler runs a batch inline, on the event loop, or on a thread.

``execution: auto`` decides from inline runs, timed per batch size (powers of two): on an
instance thread a run's time, wall or CPU, includes handing the GIL back and forth with the
busy event loop (the demo model: 19 us inline, 230 us of thread CPU and 5 ms of wall under
load), and a small model's run is mostly fixed cost, not cost per row. So the first batches run
on threads; a size not yet measured inline is probed (run inline once) when its estimate, from
a smaller size measured inline or else from the threads, is within ``_PROBE_FACTOR`` of the
budget; a size measured too slow is probed again after ``_REPROBE_EVERY`` batches.
"""

from __future__ import annotations

from gateway.batching.average import MovingAverage
from gateway.settings import Execution

__all__ = ["InlinePolicy"]

_PROBE_FACTOR = 4
_REPROBE_EVERY = 1000


class InlinePolicy:
    """Inline only where a thread hop would cost more than the run itself.

    Fed every finished batch's measured time; asked once per batch, before it runs.
    """

    __slots__ = ("_budget_ns", "_execution", "_inline_ns", "_row_ns", "_since_probe")

    def __init__(self, execution: Execution, inline_below_us: int) -> None:
        self._execution = execution
        self._budget_ns = inline_below_us * 1000
        self._row_ns = MovingAverage()  # thread CPU time per row, on the threads
        self._inline_ns: dict[int, MovingAverage] = {}  # rows.bit_length() -> run time, inline
        self._since_probe = 0  # batches kept off a size measured too slow, since the last probe

    def should_run_inline(self, rows: int) -> bool:
        if self._execution == "thread":
            return False
        if self._execution == "inline":
            return True
        budget = self._budget_ns
        if budget <= 0 or not self._row_ns.value:
            return False
        size = rows.bit_length()
        known = self._inline_ns.get(size)
        if known is not None:
            if known.value < budget:
                return True
            self._since_probe += 1
            if self._since_probe < _REPROBE_EVERY:
                return False
            self._since_probe = 0
            return True
        smaller = [s for s in self._inline_ns if s < size]
        if smaller:
            nearest = max(smaller)
            # double per size step, as if all of a run cost per row
            estimate = self._inline_ns[nearest].value * (1 << (size - nearest))
        else:
            estimate = self._row_ns.value * rows
        return estimate < _PROBE_FACTOR * budget

    def observe_inline(self, rows: int, compute_ns: int) -> None:
        """A batch of ``rows`` ran inline in ``compute_ns``."""
        size = rows.bit_length()
        average = self._inline_ns.get(size)
        if average is None:
            average = self._inline_ns[size] = MovingAverage()
        average.add(compute_ns)

    def observe_thread(self, rows: int, cpu_ns: int) -> None:
        """A batch of ``rows`` ran on an instance thread, taking ``cpu_ns`` of its CPU time."""
        self._row_ns.add(max(cpu_ns, 1) / max(rows, 1))
