"""Stage 5: runs a request's feeds on its model version off the event loop.

One model run per request for now; the dynamic batcher replaces this behind the same
``infer`` call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from gateway.errors import RuntimeFailure
from gateway.runtime.repository import LoadedVersion

__all__ = ["DirectScheduler", "Outcome"]


@dataclass(frozen=True, slots=True)
class Outcome:
    outputs: list[NDArray[np.generic]]
    queue_ns: int
    compute_ns: int


class DirectScheduler:
    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    async def infer(
        self,
        loaded: LoadedVersion,
        feeds: Mapping[str, NDArray[np.generic]],
        output_names: Sequence[str],
        rows: int,
    ) -> Outcome:
        submitted = time.perf_counter_ns()

        def work() -> tuple[list[NDArray[np.generic]], int, int]:
            started = time.perf_counter_ns()
            outputs = loaded.runtime.run(feeds, output_names)
            return outputs, started, time.perf_counter_ns()

        loop = asyncio.get_running_loop()
        try:
            outputs, started, finished = await loop.run_in_executor(self._executor, work)
        except Exception as err:
            raise RuntimeFailure(
                f"model '{loaded.name}' version {loaded.version} failed: {err}"
            ) from err
        loaded.stats.record_execution(rows, 0, finished - started, 0)
        return Outcome(outputs, started - submitted, finished - started)
