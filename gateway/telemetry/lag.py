"""How far behind the event loop runs: a timer every ``interval_s``, and how late it fires.

A saturated loop answers every request late, whatever the model queues say, so admission reads
this beside the batchers' expected waits: a request whose deadline leaves less time than the
loop is behind is refused at once (RESOURCE_EXHAUSTED) instead of being answered late. The
estimate rises at once with a late timer and falls back with a half-life (``half_life_s``), so
one late tick under sustained overload is not forgotten at the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable

__all__ = ["LoopLag"]


class LoopLag:
    """Create anywhere; ``start()`` inside the running loop, ``await close()`` at the end."""

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
        self._task: asyncio.Task[None] | None = None

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
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="loop-lag")

    async def _watch(self) -> None:
        interval = self.interval_s
        before = self._clock()
        while True:
            await asyncio.sleep(interval)
            now = self._clock()
            self.observe(max(0.0, now - before - interval), now - before)
            before = now

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
