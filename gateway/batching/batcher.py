"""Stage 5, the scheduler: a queue per model version feeding dynamic batches to its instances.

Dispatch is work-conserving: whenever an instance is free and rows are queued they run at once,
so batching adds no wait at low load; batches grow by themselves while every instance is busy.
``max_queue_delay_us`` is spent only to reach a preferred batch size. Requests larger than
``max_batch_size`` are cut into chunks and reassembled in order.

Admission is decided before queueing: a full queue (requests or rows), or an expected wait
(from measured batch times) longer than the request's deadline, is refused at once. A request
whose deadline passes while queued leaves the queue at that moment, before it costs compute.

Everything here runs on the event loop except the model run (and the merge that feeds it),
which runs on the instance's own thread; ONNX Runtime releases the GIL while it computes.
"""

from __future__ import annotations

import asyncio
import functools
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from opentelemetry import trace

from gateway.batching.average import MovingAverage
from gateway.batching.batch import chunk, join, merge, split
from gateway.batching.inline import InlinePolicy
from gateway.errors import DeadlineExceeded, InvalidRequest, Overloaded, RuntimeFailure
from gateway.settings import DynamicBatching, Execution, ModelConfig, QueuePolicy
from gateway.telemetry import GatewayMetrics
from gateway.telemetry.statistics import ModelStatistics
from gateway.types import Feeds, ModelRuntime, Outcome

__all__ = ["BatcherConfig", "MicroBatcher"]

# Below this the event loop is taken to keep up (timer slack, a scheduling hiccup); above it
# the measured lag counts in admission, with the expected queue wait.
_LAG_FLOOR_S = 0.02
# An idle model's run-time estimate older than this admits one request whatever it says.
_RENEW_S = 1.0


@dataclass(frozen=True, slots=True)
class BatcherConfig:
    """How one model version is scheduled (from its model config)."""

    name: str
    version: str
    max_batch_size: int  # rows per batch; 0: the model has no batch dim (validated >= 0)
    batching: DynamicBatching | None
    queue: QueuePolicy
    execution: Execution = "thread"
    inline_below_us: int = 0

    @classmethod
    def of(cls, name: str, version: str, config: ModelConfig) -> BatcherConfig:
        return cls(
            name=name,
            version=version,
            max_batch_size=config.max_batch_size,
            batching=config.dynamic_batching,
            queue=config.queue,
            execution=config.execution,
            inline_below_us=config.inline_below_us,
        )


# How long past its deadline a running request's result is still waited for.
_RUNNING_GRACE_S = 0.002


@dataclass(eq=False, slots=True)
class _Item:
    """One queued piece of a request (a whole request, or one chunk of an oversize one)."""

    feeds: Feeds
    rows: int
    priority: int
    deadline: float | None  # loop.time() seconds
    enqueued_ns: int
    future: asyncio.Future[Outcome]
    timer: asyncio.TimerHandle | None = None  # its deadline, queued or running
    queued: bool = True
    span: trace.SpanContext | None = None  # its request's span (tracing on): the batch links it


@dataclass(eq=False, slots=True)
class _Job:
    """One batch on its way through an instance thread and back."""

    batch: list[_Item]
    sizes: list[int]
    started_ns: int
    begin_ns: int = 0
    end_ns: int = 0
    outputs: list[NDArray[np.generic]] | None = None
    error: Exception | None = None
    inline: bool = False
    cpu_ns: int = 0  # the running thread's CPU time for the run


@dataclass(slots=True)
class _Instance:
    """A runtime and the one thread that runs it, fed through a queue (at most one job)."""

    runtime: ModelRuntime
    jobs: queue.SimpleQueue[_Job | None] = field(default_factory=queue.SimpleQueue)
    thread: threading.Thread | None = None
    busy: bool = False


@dataclass(slots=True)
class _Queue:
    levels: list[deque[_Item]]
    requests: int = 0
    rows: int = 0


class MicroBatcher:
    """The scheduler of one model version. Create and use it inside the running loop."""

    def __init__(
        self,
        config: BatcherConfig,
        runtimes: Sequence[ModelRuntime],
        stats: ModelStatistics,
        metrics: GatewayMetrics,
        loop_lag: Callable[[], float] = lambda: 0.0,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._config = config
        # Tracing on: each batch run is a span of its own, linked to the request spans in it.
        self._tracer = tracer
        self._epoch_ns = time.time_ns() - time.perf_counter_ns()  # perf_counter -> Unix
        self._loop_lag = loop_lag  # seconds the event loop runs behind (telemetry.LoopLag)
        self._loop = asyncio.get_running_loop()
        self._instances = [_Instance(rt) for rt in runtimes]
        self._output_names = [spec.name for spec in runtimes[0].outputs]
        self._queue = _Queue([deque() for _ in range(config.queue.priority_levels)])
        self._stats = stats
        self._batch_s = MovingAverage()  # one batch's wall time (for expected waits)
        self._row_s = MovingAverage()  # and per row of it (a lone request's own run)
        self._ran_at = 0.0  # loop.time() the last batch ended: an estimate's age
        self._inline = InlinePolicy(config.execution, config.inline_below_us)
        self._delay_timer: asyncio.TimerHandle | None = None
        self._pump_pending = False
        self._closed = False
        self._idle = asyncio.Event()  # set after every batch: lets close() wait for a drain
        labels = (config.name, config.version)
        self._m_queue = metrics.queue_seconds.labels(*labels)
        self._m_compute = metrics.compute_seconds.labels(*labels)
        self._m_batch = metrics.batch_rows.labels(*labels)
        # Read at scrape time: no metric lock taken twice per request.
        metrics.queue_depth.labels(*labels).set_function(lambda: self._queue.requests)
        self._m_rejected = {
            reason: metrics.rejections.labels(*labels, reason)
            for reason in ("queue_full", "expected_wait", "deadline", "loop_lag")
        }
        for i, instance in enumerate(self._instances):
            instance.thread = threading.Thread(
                target=self._work,
                args=(instance,),
                name=f"{config.name}-{config.version}-{i}",
                daemon=True,
            )
            instance.thread.start()

    # -- public ------------------------------------------------------------------------------

    async def infer(
        self, feeds: Feeds, rows: int, priority: int | None = None, deadline: float | None = None
    ) -> Outcome:
        """Queue a request (admission first) and wait for its rows' outputs."""
        config = self._config
        level = self.level(priority)
        max_rows = config.max_batch_size
        pieces = chunk(feeds, rows, max_rows) if max_rows else [(dict(feeds), rows)]
        self._admit(rows, len(pieces), deadline)
        now_ns = time.perf_counter_ns()
        span = None
        if self._tracer is not None:
            context = trace.get_current_span().get_span_context()
            span = context if context.is_valid else None
        items = [
            _Item(f, n, level, deadline, now_ns, self._loop.create_future(), span=span)
            for f, n in pieces
        ]
        for item in items:
            self._enqueue(item)
        if not self._pump_pending:
            # NOTE: dispatch at the end of this loop iteration, not now: requests that arrived
            # together join one batch instead of each taking the next free instance.
            self._pump_pending = True
            self._loop.call_soon(self._pump)
        try:
            outcomes = [await item.future for item in items]
        except BaseException:
            for item in items:  # the client left or a chunk failed: drop what is still queued
                item.future.cancel()
            raise
        if len(outcomes) == 1:
            return outcomes[0]
        return Outcome(
            join([o.outputs for o in outcomes]),
            max(o.queue_ns for o in outcomes),
            sum(o.compute_ns for o in outcomes),
            max(o.batch_rows for o in outcomes),
            sum(o.share_ns for o in outcomes),
        )

    def level(self, priority: int | None, lowest: bool = False) -> int:
        """The queue level of a request's ``priority`` (None: the default level; ``lowest``:
        the last, for a shadow copy); InvalidRequest for a level this queue does not have."""
        queue = self._config.queue
        if lowest:
            return queue.priority_levels
        if priority is None:
            return queue.default_level
        if 1 <= priority <= queue.priority_levels:
            return priority
        raise InvalidRequest(
            "parameter 'priority' must be an integer from 1 (first) to "
            f"{queue.priority_levels} for model '{self._config.name}', got {priority}"
        )

    @property
    def output_names(self) -> list[str]:
        return self._output_names

    @functools.cached_property
    def output_position(self) -> dict[str, int]:
        """Where each output is in an Outcome's ``outputs``."""
        return {name: i for i, name in enumerate(self._output_names)}

    async def close(self) -> None:
        """Finish what is queued and running, then release the instance threads."""
        self._closed = True
        self._pump()  # nothing waits for a preferred size any more
        while self._queue.requests or any(i.busy for i in self._instances):
            self._idle.clear()
            await self._idle.wait()
        for instance in self._instances:
            instance.jobs.put(None)

    # -- admission and queue -----------------------------------------------------------------

    def _admit(self, rows: int, pieces: int, deadline: float | None) -> None:
        config, q = self._config, self._queue
        policy = config.queue
        if rows > policy.max_rows or pieces > policy.max_requests:
            raise InvalidRequest(
                f"a request of {rows} rows can never fit the queue of model '{config.name}' "
                f"version {config.version} (queue.max_rows {policy.max_rows}, queue.max_requests "
                f"{policy.max_requests} batches of {config.max_batch_size} rows)"
            )
        if q.requests + pieces > policy.max_requests or q.rows + rows > policy.max_rows:
            self._m_rejected["queue_full"].inc()
            raise Overloaded(
                f"model '{config.name}' version {config.version} queue is full "
                f"({q.requests} requests, {q.rows} rows queued; limits {policy.max_requests} "
                f"requests, {policy.max_rows} rows)"
            )
        if deadline is None:
            return
        remaining = deadline - self._loop.time()
        lag = self._loop_lag()
        if lag < _LAG_FLOOR_S:
            lag = 0.0  # a loop that keeps up: timer slack and scheduling noise, not a backlog
        elif lag >= remaining:  # its answer would come back late, whatever the queue holds
            self._m_rejected["loop_lag"].inc()
            raise Overloaded(
                f"the gateway's event loop runs {lag * 1000:.0f} ms behind, more than the "
                f"{max(remaining, 0) * 1000:.0f} ms left of the request's deadline"
            )
        if self._queue.requests == 0 and not all(i.busy for i in self._instances):
            # It starts at once: only its own run can make it late, taken as the lesser of its
            # rows at the measured time per row and the batches it fills at the measured batch
            # time (a model's fixed cost per run keeps either from holding alone). An estimate
            # renews only when batches run: with every request refused, none would, and the
            # model would stay closed after the load has gone; so an estimate older than
            # _RENEW_S lets one request through to renew it.
            batches = math.ceil(rows / config.max_batch_size) if config.max_batch_size else 1
            own = min(self._row_s.value * rows, self._batch_s.value * batches) + lag
            if own <= remaining or self._loop.time() - self._ran_at >= _RENEW_S:
                return
            self._m_rejected["expected_wait"].inc()
            raise Overloaded(
                f"model '{config.name}' version {config.version}: expected wait "
                f"{own * 1000:.1f} ms (its own run of {rows} rows) exceeds the request's "
                f"remaining deadline {max(remaining, 0) * 1000:.1f} ms"
            )
        if self._batch_s.value > 0:
            expected = self.expected_wait_s(rows) + lag
            if expected > remaining:
                self._m_rejected["expected_wait"].inc()
                raise Overloaded(
                    f"model '{config.name}' version {config.version}: expected wait "
                    f"{expected * 1000:.1f} ms exceeds the request's remaining deadline "
                    f"{max(remaining, 0) * 1000:.1f} ms"
                )

    def expected_wait_s(self, rows: int) -> float:
        """Time until ``rows`` more rows would be answered: batches ahead, over the instances."""
        config = self._config
        if config.batching is None:
            batches = self._queue.requests + 1
        else:
            batches = math.ceil((self._queue.rows + rows) / config.max_batch_size)
        busy = sum(i.busy for i in self._instances)
        return math.ceil((batches + busy) / len(self._instances)) * self._batch_s.value

    def _enqueue(self, item: _Item) -> None:
        self._queue.levels[item.priority - 1].append(item)
        self._queue.requests += 1
        self._queue.rows += item.rows
        if item.deadline is not None:
            item.timer = self._loop.call_at(item.deadline, self._expire, item)
        item.future.add_done_callback(functools.partial(self._on_answered, item))

    def _on_answered(self, item: _Item, _future: asyncio.Future[Outcome]) -> None:
        self._dequeue(item)  # a no-op unless the caller left while it was queued
        if item.timer is not None:
            item.timer.cancel()
            item.timer = None

    def _dequeue(self, item: _Item) -> None:
        """An item leaves the queue (to run, expired, or its caller left): release its space.

        Its deque entry stays until batch formation reaches it and skips it: O(1) here. Its
        deadline timer stays: a running item is answered at its deadline too.
        """
        if not item.queued:
            return
        item.queued = False
        self._queue.requests -= 1
        self._queue.rows -= item.rows

    def _expire(self, item: _Item) -> None:
        """The item's deadline: the one timer that decides, so however late the loop wakes,
        an item still queued is reported as queued, and one running as running."""
        item.timer = None
        if item.future.done():
            return
        config = self._config
        if item.queued:
            self._m_rejected["deadline"].inc()
            waited_ms = (time.perf_counter_ns() - item.enqueued_ns) / 1e6
            self._dequeue(item)
            item.future.set_exception(
                DeadlineExceeded(
                    f"deadline passed after {waited_ms:.1f} ms in the queue of model "
                    f"'{config.name}' version {config.version}; no compute was spent on it"
                )
            )
            return
        # Running: a result landing just after the deadline is still taken (the grace), then
        # the wait ends and the result, when it comes, is dropped.
        if item.deadline is not None and self._loop.time() < item.deadline + _RUNNING_GRACE_S:
            item.timer = self._loop.call_at(item.deadline + _RUNNING_GRACE_S, self._expire, item)
            return
        item.future.set_exception(
            DeadlineExceeded(
                f"model '{config.name}' version {config.version} was still running the request "
                "at its deadline"
            )
        )

    # -- dispatch ----------------------------------------------------------------------------

    def _pump(self) -> None:
        """Start batches on free instances while there is queued work.

        Never blocks, except to run a batch inline when ``execution`` allows it for batches
        predicted to take less than ``inline_below_us``.
        """
        self._pump_pending = False
        while self._queue.requests:
            instance = next((i for i in self._instances if not i.busy), None)
            if instance is None:
                return
            if self._should_wait():
                return
            batch = self._take_batch()
            if not batch:
                return
            job = _Job(batch, [item.rows for item in batch], time.perf_counter_ns())
            if self._inline.should_run_inline(sum(job.sizes)):
                job.inline = True
                self._run(instance.runtime, job)
                self._finish(instance, job, pump=False)
                if self._queue.requests and not self._pump_pending:
                    # One inline batch per turn: the loop serves its other callbacks between.
                    self._pump_pending = True
                    self._loop.call_soon(self._pump)
                return
            instance.busy = True
            instance.jobs.put(job)

    def _should_wait(self) -> bool:
        """Wait (up to max_queue_delay_us from the oldest request) for a preferred size."""
        batching = self._config.batching
        if (
            batching is None
            or not batching.preferred_batch_sizes
            or not batching.max_queue_delay_us
        ):
            return False
        if self._closed or self._queue.rows >= min(batching.preferred_batch_sizes):
            return False
        oldest = min((level[0].enqueued_ns for level in self._queue.levels if level), default=None)
        if oldest is None:
            return False
        due_ns = oldest + batching.max_queue_delay_us * 1000
        now_ns = time.perf_counter_ns()
        if now_ns >= due_ns:
            return False
        if self._delay_timer is None:
            self._delay_timer = self._loop.call_later((due_ns - now_ns) / 1e9, self._delay_done)
        return True

    def _delay_done(self) -> None:
        self._delay_timer = None
        self._pump()

    def _take_batch(self) -> list[_Item]:
        """Highest priority first, FIFO within a level, up to max_batch_size rows."""
        config = self._config
        limit = config.max_batch_size if config.batching is not None else 0
        batch: list[_Item] = []
        rows = 0
        for level in self._queue.levels:
            while level:
                item = level[0]
                if not item.queued:
                    level.popleft()  # expired or cancelled while queued
                    continue
                if batch and (not limit or rows + item.rows > limit):
                    return batch
                level.popleft()
                self._dequeue(item)
                batch.append(item)
                rows += item.rows
        return batch

    def _run(self, runtime: ModelRuntime, job: _Job) -> None:
        """Merge and run one batch (on an instance thread, or inline); never raises."""
        try:
            feeds = merge([item.feeds for item in job.batch], sum(job.sizes))
            cpu_ns = time.thread_time_ns()
            job.begin_ns = time.perf_counter_ns()
            job.outputs = runtime.run(feeds, self._output_names)
            job.end_ns = time.perf_counter_ns()
            job.cpu_ns = time.thread_time_ns() - cpu_ns
        except Exception as err:  # reported to every request of the batch
            job.error = err

    def _work(self, instance: _Instance) -> None:
        """The instance's thread: run each job, hand it back to the loop; None stops."""
        loop = self._loop
        while (job := instance.jobs.get()) is not None:
            self._run(instance.runtime, job)
            try:
                loop.call_soon_threadsafe(self._finish, instance, job)
            except RuntimeError:  # the loop closed under us (process exit): nobody waits
                return

    def _batch_span(self, job: _Job, total: int) -> None:
        """The batch run as a span of its own (a root), linked to each request span in it."""
        assert self._tracer is not None
        links = [trace.Link(item.span) for item in job.batch if item.span is not None]
        span = self._tracer.start_span(
            "batch",
            context=trace.set_span_in_context(trace.INVALID_SPAN),  # no parent: its own trace
            links=links,
            start_time=self._epoch_ns + job.begin_ns,
            attributes={
                "gateway.model": self._config.name,
                "gateway.version": self._config.version,
                "gateway.batch_rows": total,
                "gateway.batch_requests": len(job.batch),
            },
        )
        span.end(end_time=self._epoch_ns + job.end_ns)

    def _finish(self, instance: _Instance, job: _Job, pump: bool = True) -> None:
        instance.busy = False
        finished_ns = time.perf_counter_ns()
        batch, total = job.batch, sum(job.sizes)
        if job.error is not None or job.outputs is None:
            config = self._config
            failure = RuntimeFailure(
                f"model '{config.name}' version {config.version} failed on a batch of {total} "
                f"rows: {job.error}"
            )
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(failure)
        else:
            compute_ns = job.end_ns - job.begin_ns
            wall_s = (finished_ns - job.started_ns) / 1e9
            self._batch_s.add(wall_s)
            self._row_s.add(wall_s / max(total, 1))
            self._ran_at = self._loop.time()
            if job.inline:
                self._inline.observe_inline(total, compute_ns)
            else:
                self._inline.observe_thread(total, job.cpu_ns)
            self._stats.record_execution(total, job.begin_ns - job.started_ns, compute_ns, 0)
            if self._tracer is not None:
                self._batch_span(job, total)
            self._m_compute.observe(compute_ns / 1e9)
            self._m_batch.observe(total)
            for item, piece in zip(batch, split(job.outputs, job.sizes), strict=True):
                queue_ns = job.started_ns - item.enqueued_ns
                self._m_queue.observe(queue_ns / 1e9)
                if not item.future.done():
                    share_ns = compute_ns * item.rows // max(total, 1)
                    item.future.set_result(Outcome(piece, queue_ns, compute_ns, total, share_ns))
        if pump:
            self._pump()
        self._idle.set()
