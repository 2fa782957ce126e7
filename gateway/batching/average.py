"""Stage 5: the moving average the scheduler keeps of its measured times (batch wall, CPU)."""

from __future__ import annotations

__all__ = ["MovingAverage"]

# Weight of the newest sample: an average follows a change within a few dozen batches.
_ALPHA = 0.2


class MovingAverage:
    """An exponentially weighted moving average; 0.0 until the first sample, which it takes as is.

    ``value`` is a plain attribute (read per request on the scheduler's path, not a property).
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def add(self, sample: float) -> None:
        # NOTE: an average of exactly 0.0 counts as empty: the next sample replaces it.
        average = self.value
        self.value = sample if not average else _ALPHA * sample + (1 - _ALPHA) * average
