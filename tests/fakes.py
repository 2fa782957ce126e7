"""Fakes the unit tests inject: a clock the test moves, and a ModelRuntime it controls; and
``until``, which lets the event loop run until a condition holds."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from gateway.types import TensorSpec

__all__ = ["FakeClock", "FakeRuntime", "until"]


class FakeClock:
    """Seconds that pass only when the test says so: pass the instance as ``clock=``."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeRuntime:
    """A ModelRuntime: ``x`` FP32 [-1, 2] -> ``y`` = ``scale`` * x, ``total`` = the row sums.

    ``runs`` holds the rows of each run. ``fail`` makes every run raise it. A closed ``gate``
    holds each run (on its instance thread) until the test opens it; ``started`` is set when
    a run begins, so a test can wait for it.
    """

    inputs: tuple[TensorSpec, ...] = (TensorSpec("x", "FP32", (-1, 2)),)
    outputs: tuple[TensorSpec, ...] = (
        TensorSpec("y", "FP32", (-1, 2)),
        TensorSpec("total", "FP32", (-1, 1)),
    )
    provider = "CPUExecutionProvider"

    def __init__(self, scale: float = 2.0, fail: Exception | None = None) -> None:
        self.scale = scale
        self.fail = fail
        self.runs: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def run(
        self, feeds: Mapping[str, NDArray[np.generic]], output_names: Sequence[str]
    ) -> list[NDArray[np.generic]]:
        x = np.asarray(feeds["x"], dtype=np.float32)
        self.runs.append(len(x))
        self.started.set()
        assert self.gate.wait(10), "the test never opened the gate"
        if self.fail is not None:
            raise self.fail
        computed = {"y": x * np.float32(self.scale), "total": x.sum(axis=1, keepdims=True)}
        return [computed[name] for name in output_names]


async def until(condition: Callable[[], object], what: str) -> None:
    """Let the loop run until ``condition()``; the bound is a safety net, not a timing."""
    for _ in range(100_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never: {what}")
