"""The scheduler with a runtime whose timing the test controls (a gate per model run).

The runtime computes real outputs (2x its input) so every test also checks that each request
gets exactly its own rows back, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
from numpy.typing import NDArray

from gateway.batching import BatcherConfig, MicroBatcher
from gateway.batching import batcher as batcher_module
from gateway.errors import DeadlineExceeded, InvalidRequest, Overloaded
from gateway.settings import DynamicBatching, Execution, QueuePolicy
from gateway.telemetry import GatewayMetrics
from gateway.telemetry.statistics import ModelStatistics
from gateway.types import TensorSpec


class GatedRuntime:
    """Doubles its input; each run waits until the test opens the gate (or the gate is open)."""

    inputs: tuple[TensorSpec, ...] = (TensorSpec("x", "FP32", (-1, 2)),)
    outputs: tuple[TensorSpec, ...] = (TensorSpec("y", "FP32", (-1, 2)),)
    provider = "CPUExecutionProvider"

    def __init__(self, log: list[int], gate: threading.Event) -> None:
        self.log = log
        self.gate = gate
        self.started = threading.Semaphore(0)

    def run(
        self, feeds: Mapping[str, NDArray[np.generic]], output_names: Sequence[str]
    ) -> list[NDArray[np.generic]]:
        self.log.append(len(feeds["x"]))
        self.started.release()
        assert self.gate.wait(10), "gate never opened"
        return [np.asarray(feeds["x"]) * 2]


BATCHING = DynamicBatching()
QUEUE = QueuePolicy()


class Harness:
    def __init__(
        self,
        instances: int = 1,
        max_batch_size: int = 16,
        batching: DynamicBatching | None = BATCHING,
        queue: QueuePolicy = QUEUE,
        open_gate: bool = False,
    ) -> None:
        self.log: list[int] = []
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()
        self.runtimes = [GatedRuntime(self.log, self.gate) for _ in range(instances)]
        self.stats = ModelStatistics()
        self.metrics = GatewayMetrics()
        config = BatcherConfig(
            name="m", version="1", max_batch_size=max_batch_size, batching=batching, queue=queue
        )
        self.batcher = MicroBatcher(config, self.runtimes, self.stats, self.metrics)

    def submit(self, rows: int, start: float = 0.0, **kwargs) -> tuple[asyncio.Task, np.ndarray]:
        x = (start + np.arange(rows * 2, dtype=np.float32)).reshape(rows, 2)
        task = asyncio.ensure_future(self.batcher.infer({"x": x}, rows, **kwargs))
        return task, x

    async def run_slow_batch(self, rows: int, seconds: float = 0.2) -> None:
        """Run one batch of ``rows`` that takes about ``seconds`` (the batch-time estimate);
        the gate is closed again afterwards."""
        first, _ = self.submit(rows)
        await self.wait_started()
        await asyncio.sleep(seconds)
        self.gate.set()
        await first
        self.gate.clear()

    async def wait_started(self, runs: int = 1) -> None:
        for _ in range(runs):
            await asyncio.to_thread(self.runtimes[0].started.acquire, True, 10)

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(
            name, {"model": "m", "version": "1", **labels}
        )
        return value or 0.0


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_idle_request_dispatches_at_once_without_waiting():
    h = Harness(batching=DynamicBatching(max_queue_delay_us=5_000_000))
    task, x = h.submit(3)
    await h.wait_started()  # started with the delay still far off: no idle waiting
    assert h.log == [3]
    h.gate.set()
    outcome = await task
    np.testing.assert_array_equal(outcome.outputs[0], x * 2)
    assert outcome.batch_rows == 3


async def test_batches_fill_while_every_instance_is_busy():
    h = Harness()
    first, _ = h.submit(1)
    await h.wait_started()
    queued = [h.submit(rows, start=100 * i) for i, rows in enumerate([2, 3, 1, 4], start=1)]
    await settle()
    assert h.log == [1]
    h.gate.set()
    outcomes = await asyncio.gather(first, *(t for t, _ in queued))
    assert h.log == [1, 10]  # the four queued requests ran as one batch
    for outcome, (_, x) in zip(outcomes[1:], queued, strict=True):
        np.testing.assert_array_equal(outcome.outputs[0], x * 2)
        assert outcome.batch_rows == 10
    assert h.stats.execution_count == 2
    assert h.stats.batches.keys() == {1, 10}


async def test_batches_stop_at_max_batch_size():
    h = Harness(max_batch_size=5)
    first, _ = h.submit(1)
    await h.wait_started()
    queued = [h.submit(2, start=10 * i) for i in range(5)]
    await settle()
    h.gate.set()
    results = await asyncio.gather(first, *(t for t, _ in queued))
    assert h.log == [1, 4, 4, 2]
    for outcome, (_, x) in zip(results[1:], queued, strict=True):
        np.testing.assert_array_equal(outcome.outputs[0], x * 2)


async def test_oversize_request_is_split_and_reassembled_in_order():
    h = Harness(max_batch_size=4, open_gate=True)
    task, x = h.submit(10)
    outcome = await task
    assert h.log == [4, 4, 2]
    np.testing.assert_array_equal(outcome.outputs[0], x * 2)


async def test_batching_off_runs_one_request_per_model_run():
    h = Harness(batching=None)
    first, _ = h.submit(1)
    await h.wait_started()
    queued = [h.submit(2, start=10 * i) for i in range(3)]
    await settle()
    h.gate.set()
    await asyncio.gather(first, *(t for t, _ in queued))
    assert h.log == [1, 2, 2, 2]


async def test_requests_arriving_together_share_one_batch():
    h = Harness(instances=2, open_gate=True)
    tasks = [h.submit(n, start=10 * n) for n in (1, 2, 3)]
    outcomes = await asyncio.gather(*(t for t, _ in tasks))
    assert h.log == [6]  # queued in the same loop iteration: one model run
    for outcome, (_, x) in zip(outcomes, tasks, strict=True):
        np.testing.assert_array_equal(outcome.outputs[0], x * 2)


async def test_two_instances_run_concurrently():
    h = Harness(instances=2)
    a, _ = h.submit(1)
    await h.wait_started()
    b, _ = h.submit(2)
    await asyncio.to_thread(h.runtimes[1].started.acquire, True, 10)
    assert sorted(h.log) == [1, 2]  # both running before either finished
    h.gate.set()
    await asyncio.gather(a, b)


async def test_deadline_passing_in_the_queue_answers_at_once_without_compute():
    h = Harness()
    first, _ = h.submit(1)
    await h.wait_started()
    loop = asyncio.get_running_loop()
    late, _ = h.submit(3, deadline=loop.time() + 0.05)
    with pytest.raises(DeadlineExceeded, match="in the queue"):
        await asyncio.wait_for(late, 5)  # answered while the first batch still runs
    assert not first.done()
    h.gate.set()
    await first
    assert h.log == [1]  # the expired rows never reached the model
    assert h.metric("gateway_rejections_total", reason="deadline") == 1
    assert h.metric("gateway_queue_depth") == 0


async def test_higher_priority_dequeues_first():
    h = Harness(batching=None, queue=QueuePolicy(priority_levels=2))
    first, _ = h.submit(1)
    await h.wait_started()
    low, _ = h.submit(2, priority=2)
    high, _ = h.submit(3, priority=1)
    await settle()
    h.gate.set()
    await asyncio.gather(first, low, high)
    assert h.log == [1, 3, 2]


async def test_full_queue_is_refused_at_once():
    h = Harness(batching=None, queue=QueuePolicy(max_requests=2, max_rows=100))
    first, _ = h.submit(1)
    await h.wait_started()
    queued = [h.submit(1)[0] for _ in range(2)]
    with pytest.raises(Overloaded, match="queue is full"):
        await h.submit(1)[0]
    with pytest.raises(Overloaded, match="queue is full"):
        await h.submit(1)[0]
    assert h.metric("gateway_rejections_total", reason="queue_full") == 2
    h.gate.set()
    await asyncio.gather(first, *queued)


async def test_rows_bound_the_queue_too():
    h = Harness(queue=QueuePolicy(max_requests=100, max_rows=5))
    first, _ = h.submit(1)
    await h.wait_started()
    ok, _ = h.submit(4)
    await settle()
    with pytest.raises(Overloaded, match="5 rows"):
        await h.submit(2)[0]
    h.gate.set()
    await asyncio.gather(first, ok)


async def test_a_request_larger_than_the_whole_queue_is_invalid():
    h = Harness(queue=QueuePolicy(max_requests=100, max_rows=5), open_gate=True)
    with pytest.raises(InvalidRequest, match="can never fit"):
        await h.submit(6)[0]
    assert h.metric("gateway_rejections_total", reason="queue_full") == 0


async def test_expected_wait_over_the_deadline_is_refused_at_once():
    h = Harness(batching=None)
    await h.run_slow_batch(1)  # one batch of about 200 ms
    running, _ = h.submit(1)
    await h.wait_started()
    loop = asyncio.get_running_loop()
    with pytest.raises(Overloaded, match="expected wait"):
        await h.submit(1, deadline=loop.time() + 0.05)[0]
    assert h.metric("gateway_rejections_total", reason="expected_wait") == 1
    h.gate.set()
    await running


async def test_an_idle_model_judges_a_request_by_its_own_rows_not_by_the_last_batch():
    """Slow batches of many rows do not refuse a small request the idle model can answer in
    time (after an overload of full batches, every request was refused at half the load)."""
    h = Harness(batching=None)
    await h.run_slow_batch(16)  # 16 rows in about 200 ms: 12.5 ms a row
    h.gate.set()
    loop = asyncio.get_running_loop()
    outcome = await h.submit(1, deadline=loop.time() + 0.05)[0]
    assert outcome.batch_rows == 1
    with pytest.raises(Overloaded, match=r"expected wait .*its own run of 16 rows"):
        await h.submit(16, deadline=loop.time() + 0.05)[0]
    assert h.metric("gateway_rejections_total", reason="expected_wait") == 1


async def test_an_idle_model_counts_a_runs_fixed_cost_once_for_a_request_of_many_rows():
    """One-row batches of a model whose run is mostly fixed cost do not make a 16-row request
    look 16 times as long: it fills one batch, and a batch took 200 ms."""
    h = Harness(batching=None)
    await h.run_slow_batch(1)  # one row in about 200 ms
    h.gate.set()
    loop = asyncio.get_running_loop()
    outcome = await h.submit(16, deadline=loop.time() + 1.0)[0]
    assert outcome.batch_rows == 16


async def test_an_idle_models_stale_estimate_lets_one_request_through_to_renew_it(monkeypatch):
    """An estimate renews only when batches run; refusing on it for good would keep the model
    closed after the load has gone. One request goes; the next waits behind it as usual."""
    monkeypatch.setattr(batcher_module, "_RENEW_S", 0.5)  # room for a stalled test process
    h = Harness(batching=None)
    await h.run_slow_batch(1)  # one row in about 200 ms
    loop = asyncio.get_running_loop()
    with pytest.raises(Overloaded, match="expected wait"):
        await h.submit(1, deadline=loop.time() + 0.05)[0]
    await asyncio.sleep(0.55)  # the estimate grows old: the condition itself
    probe, _ = h.submit(1, deadline=loop.time() + 0.05)  # refused before; now let through
    await h.wait_started()
    with pytest.raises(Overloaded, match="expected wait"):
        await h.submit(1, deadline=loop.time() + 0.05)[0]  # busy: judged by the queue
    h.gate.set()
    with contextlib.suppress(DeadlineExceeded):  # it ran; in time or not, it renewed
        await probe
    assert h.log == [1, 1]
    assert h.metric("gateway_rejections_total", reason="expected_wait") == 2


async def test_a_caller_that_leaves_frees_its_queue_space():
    h = Harness(batching=None)
    first, _ = h.submit(1)
    await h.wait_started()
    leaving, _ = h.submit(5)
    await settle()
    assert h.metric("gateway_queue_depth") == 1
    leaving.cancel()
    await settle()
    assert h.metric("gateway_queue_depth") == 0
    h.gate.set()
    await first
    assert h.log == [1]


async def test_preferred_size_is_awaited_up_to_the_delay():
    h = Harness(
        # NOTE: a delay a stalled test process does not run out before the rest are sent
        batching=DynamicBatching(max_queue_delay_us=1_000_000, preferred_batch_sizes=(4,)),
        open_gate=True,
    )
    a, _ = h.submit(1)
    await asyncio.sleep(0.02)
    assert h.log == []  # waiting for a batch of 4
    rest = [h.submit(1, start=i)[0] for i in range(3)]
    await asyncio.gather(a, *rest)
    assert h.log == [4]
    alone, _ = h.submit(1)
    await alone  # nobody else came: it runs when the delay is spent
    assert h.log == [4, 1]


async def test_statistics_add_up():
    h = Harness(open_gate=True)
    sizes = [1, 3, 5, 2, 7]
    await asyncio.gather(*(h.submit(n)[0] for n in sizes))
    assert sum(h.log) == sum(sizes)
    assert h.stats.execution_count == len(h.log)
    assert sum(b.compute_infer.count for b in h.stats.batches.values()) == len(h.log)
    assert h.metric("gateway_batch_rows_sum") == sum(sizes)
    assert h.metric("gateway_queue_duration_seconds_count") == len(sizes)


async def test_close_drains_the_queue_first():
    h = Harness()
    first, _ = h.submit(1)
    await h.wait_started()
    queued, _ = h.submit(2)
    closing = asyncio.ensure_future(h.batcher.close())
    await settle()
    assert not closing.done()
    h.gate.set()
    await asyncio.gather(first, queued, closing)
    assert h.log == [1, 2]


class TimedRuntime:
    """Doubles its input after ``delay_s``; records which thread ran each batch."""

    inputs: tuple[TensorSpec, ...] = GatedRuntime.inputs
    outputs: tuple[TensorSpec, ...] = GatedRuntime.outputs
    provider = "CPUExecutionProvider"

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.thread_delay_s = 0.0  # extra off the loop: as winning the GIL back costs there
        self.threads: list[str] = []
        self.loop_thread = threading.current_thread().name

    def run(
        self, feeds: Mapping[str, NDArray[np.generic]], output_names: Sequence[str]
    ) -> list[NDArray[np.generic]]:
        name = threading.current_thread().name
        self.threads.append(name)
        if self.delay_s:
            _spin(self.delay_s)  # CPU time, as a model run takes it
        if self.thread_delay_s and name != self.loop_thread:
            time.sleep(self.thread_delay_s)  # waiting, not computing
        return [np.asarray(feeds["x"]) * 2]


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def timed_batcher(
    execution: Execution, inline_below_us: int = 100
) -> tuple[MicroBatcher, TimedRuntime]:
    runtime = TimedRuntime()
    config = BatcherConfig(
        name="m",
        version="1",
        max_batch_size=16,
        batching=BATCHING,
        queue=QUEUE,
        execution=execution,
        inline_below_us=inline_below_us,
    )
    batcher = MicroBatcher(config, [runtime], ModelStatistics(), GatewayMetrics())
    return batcher, runtime


async def test_inline_execution_runs_on_the_event_loop_thread():
    batcher, runtime = timed_batcher("inline")
    x = np.ones((2, 2), np.float32)
    outcome = await batcher.infer({"x": x}, 2)
    np.testing.assert_array_equal(outcome.outputs[0], x * 2)
    assert runtime.threads == [threading.current_thread().name]


async def test_auto_runs_measured_fast_batches_inline_and_slow_ones_on_threads():
    batcher, runtime = timed_batcher("auto", inline_below_us=1000)
    loop_thread = threading.current_thread().name
    x = np.ones((1, 2), np.float32)
    await batcher.infer({"x": x}, 1)
    assert runtime.threads[0] != loop_thread  # nothing measured yet: a thread
    for _ in range(3):
        await batcher.infer({"x": x}, 1)
    assert runtime.threads[-1] == loop_thread  # measured far below 1 ms: inline
    runtime.delay_s = 0.02  # the model turns slow: one inline run shows it ...
    await batcher.infer({"x": x}, 1)
    await batcher.infer({"x": x}, 1)
    assert runtime.threads[-1] != loop_thread  # ... and the next goes back to a thread


async def test_auto_judges_threads_by_cpu_time_not_by_waiting():
    """A thread's wall time includes waiting for the GIL; its CPU time is the run."""
    batcher, runtime = timed_batcher("auto", inline_below_us=1000)
    runtime.thread_delay_s = 0.01  # 10 ms of waiting on a thread: 10x the 1 ms budget
    x = np.ones((1, 2), np.float32)
    await batcher.infer({"x": x}, 1)
    assert runtime.threads[0] != runtime.loop_thread
    for _ in range(3):
        await batcher.infer({"x": x}, 1)
    assert runtime.threads[1:] == [runtime.loop_thread] * 3  # probed, then kept inline


async def test_auto_does_not_probe_a_model_far_over_the_budget():
    batcher, runtime = timed_batcher("auto", inline_below_us=100)
    runtime.delay_s = 0.005  # 5 ms: 50x the budget
    x = np.ones((1, 2), np.float32)
    for _ in range(3):
        await batcher.infer({"x": x}, 1)
    assert runtime.loop_thread not in runtime.threads


async def test_thread_execution_never_blocks_the_loop():
    batcher, runtime = timed_batcher("thread", inline_below_us=10**9)
    x = np.ones((1, 2), np.float32)
    for _ in range(4):
        await batcher.infer({"x": x}, 1)
    assert threading.current_thread().name not in runtime.threads
