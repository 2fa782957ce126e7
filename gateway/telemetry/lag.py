"""How far behind the event loop runs: a timer every ``interval_s``, and how late it fires.

A saturated loop answers every request late, whatever the model queues say, so admission reads
this beside the batchers' expected waits: a request whose deadline leaves less time than the
loop is behind is refused at once (RESOURCE_EXHAUSTED) instead of being answered late. The
estimate rises at once with a late timer and falls back with a half-life (``half_life_s``), so
one late tick under sustained overload is not forgotten at the next.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

__all__ = ["LoopLag"]


class LoopLag:
    """Create anywhere; ``start()`` inside the running loop, ``close()`` at the end."""

    def __init__(
        self,
        interval_s: float = 0.01,
        half_life_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self._half_life_s = half_life_s
        self._clock = clock
        self.value = 0.0  # seconds behind, the estimate
        self._before = 0.0  # when the last tick fired
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self) -> float:
        return self.value

    def observe(self, late_s: float, elapsed_s: float) -> None:
        """A tick fired ``late_s`` late, ``elapsed_s`` after the one before."""
        if late_s >= self.value:
            self.value = late_s
        else:
            keep = math.exp2(-elapsed_s / self._half_life_s)
            self.value = self.value * keep + late_s * (1 - keep)

    def start(self) -> None:
        self._before = self._clock()
        self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._tick)

    def _tick(self) -> None:
        """A timer callback (no task to step): measure, then set the next one."""
        now = self._clock()
        elapsed = now - self._before
        self.observe(max(0.0, elapsed - self.interval_s), elapsed)
        self._before = now
        self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
