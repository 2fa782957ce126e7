"""The validation gate run by itself (``adaptation.gate.auto``): a version the repository holds
back because no gate.json judged its model file is replayed in the background on the recent
labelled window from the sidecar; gate.json is written and the model reloaded, so a version
that passes serves without anyone typing anything.

One run at a time, on a thread of its own; at most ``max_pending`` versions queued or being
judged, none twice (across the workers of ``--workers`` too: a lock file per version). A run
that cannot judge (the sidecar unreachable, too few labels, an error) writes no gate.json: it
is tried again ``retry_s`` later, or at the first load after that, never sooner. A version that
failed is not judged again until its model file changes.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc

from gateway.adaptation.gate import LabelledWindow, read_window, validate
from gateway.adaptation.gate_result import (
    MODEL_FILE,
    GateResult,
    Standing,
    file_digest,
    standing,
    write_result,
)
from gateway.api.v1 import events_pb2 as ev
from gateway.auth import ClientCredentials
from gateway.errors import GatewayError, ModelLoadError, ModelNotFound, SettingsError
from gateway.evaluation.client import export
from gateway.runtime.repository import ModelRepository
from gateway.settings import GateSettings, RuntimeSettings, Settings
from gateway.telemetry import GatewayMetrics

__all__ = ["AutoGate", "SidecarWindows", "WindowSource"]

log = logging.getLogger(__name__)

# A model's labelled window, read on the gate's thread (SidecarWindows; a table in tests).
WindowSource = Callable[[str], LabelledWindow]
RunOutcome = Literal["pass", "fail", "not_enough_data", "error"]
HeldState = Literal["judging", "retrying", "failed", "unreadable", "unjudged"]
_Key = tuple[str, int]  # (model, version)
LOCK_FILE = ".gate.lock"


class SidecarWindows:
    """The labelled rows of the last ``window_s`` of a model, exported from the sidecar
    (ExportFile, ``labelled``) into a scratch file and read back."""

    def __init__(
        self,
        address: str,
        credentials: ClientCredentials,
        window_s: int,
        max_rows: int,
        timeout_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.address = address
        self._credentials = credentials
        self._window_s = window_s
        self._max_rows = max_rows
        self._timeout_s = timeout_s
        self._clock = clock

    def __call__(self, model: str) -> LabelledWindow:
        start_us = int((self._clock() - self._window_s) * 1_000_000)
        request = ev.ExportRequest(
            model=model, labelled=True, start_us=start_us, max_rows=self._max_rows
        )
        with tempfile.TemporaryDirectory(prefix="gateway-gate-") as scratch:
            out = Path(scratch) / "window.parquet"
            try:
                export(self.address, request, out, self._credentials, self._timeout_s)
            except grpc.RpcError as err:
                details = err.details() if isinstance(err, grpc.Call) else str(err)
                code = err.code().name if isinstance(err, grpc.Call) else "error"
                raise _NoWindow(f"the sidecar at {self.address}: {code}: {details}") from None
            return read_window(out, f"sidecar {self.address}, last {_span(self._window_s)}")


class _NoWindow(Exception):
    """The window could not be had (the sidecar did not answer, or refused)."""


@dataclass(frozen=True)
class _Trouble:
    """Why the last automatic run of a version judged nothing, and when it is tried again."""

    message: str
    digest: str  # of the model file it was about: a new file is tried at once
    retry_at: float  # on the AutoGate's clock


class AutoGate:
    """Judges held versions in the background; ``admission`` is the repository's check."""

    def __init__(
        self,
        settings: GateSettings,
        runtime: RuntimeSettings,
        windows: WindowSource,
        source: str,
        metrics: GatewayMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._runtime = runtime
        self._windows = windows
        self.source = source  # where windows come from, as the held reason says it
        self._clock = clock
        # NOTE: admission runs on the repository's loader threads, runs on the gate's thread,
        # the metrics on the scrape thread; this lock keeps what they share consistent.
        self._lock = threading.Lock()
        self._pending: set[_Key] = set()  # queued or being judged
        self._trouble: dict[_Key, _Trouble] = {}
        self._states: dict[_Key, HeldState] = {}  # as admission last saw each held version
        self._runs: Counter[tuple[str, RunOutcome]] = Counter()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gate")
        self._repository: ModelRepository | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Key] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        self._retries: set[asyncio.Task[None]] = set()
        self._closing = False
        if metrics is not None:
            metrics.counter_function(
                "gateway_gate_runs",
                "Automatic runs of the validation gate (adaptation.gate.auto) by model and "
                "outcome: pass and fail wrote gate.json; not_enough_data (too few labels in the "
                "window) and error (the sidecar unreachable, a model that does not load) wrote "
                "nothing and are tried again after adaptation.gate.retry_s.",
                ["model", "outcome"],
                self._run_samples,
            )
            metrics.gauge_function(
                "gateway_gate_held",
                "1 per version the validation gate keeps out of traffic now, by state: judging "
                "(an automatic run is queued or under way), retrying (the last run could not "
                "judge; tried again after adaptation.gate.retry_s), failed (its gate.json says "
                "fail for this model file), unreadable (gate.json or the model file cannot be "
                "read: a person must look), unjudged (no gate.json, and the gate is stopping).",
                ["model", "version", "state"],
                self._held_samples,
            )

    @classmethod
    def from_settings(cls, settings: Settings, metrics: GatewayMetrics | None = None) -> AutoGate:
        """Windows from adaptation.rollout.sidecar (else events.sidecar), with the rollout's
        credentials: the key that reads verdicts reads exports too (the sidecar's read role)."""
        rollout = settings.adaptation.rollout
        address = rollout.sidecar or settings.events.sidecar
        if not address:
            raise SettingsError(
                "adaptation.gate.auto: the labelled window comes from the sidecar; set "
                "adaptation.rollout.sidecar or events.sidecar"
            )
        gate = settings.adaptation.gate
        credentials = ClientCredentials(rollout.resolve_token(), rollout.tls)
        windows = SidecarWindows(
            address, credentials, gate.window_s, gate.max_rows, gate.export_timeout_s
        )
        source = (
            f"the last {_span(gate.window_s)} of labelled traffic from the sidecar at {address}"
        )
        return cls(gate, settings.runtime, windows, source, metrics)

    # -- life ------------------------------------------------------------------------------

    def start(self, repository: ModelRepository) -> None:
        """Judge from now on (before the repository's first load: it asks ``admission``)."""
        self._repository = repository
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._work(self._queue), name="gate")

    async def join(self) -> None:
        """Until every queued run is done and its model reloaded."""
        if self._queue is not None:
            await self._queue.join()

    async def close(self) -> None:
        """Stop judging. A run under way finishes on its thread (its gate.json is still
        written; the process exits once it ends, an export within export_timeout_s), but
        nothing here waits for it and no model is reloaded."""
        self._closing = True
        for timer in self._timers:
            timer.cancel()
        tasks = [t for t in (self._worker, *self._retries) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the repository's check (on a loader thread) -----------------------------------------

    def admission(self, version_dir: Path) -> str | None:
        """Why the version in ``version_dir`` may not serve (None: it may); a version never
        judged on its model file is queued for a run, unless its next try is due later."""
        word = standing(version_dir)
        key = (version_dir.parent.name, int(version_dir.name))
        if word.standing != "unjudged" or self._loop is None or self._closing:
            with self._lock:
                self._note(key, _held_state(word.standing))
            return word.reason
        with self._lock:
            trouble = None if key in self._pending else self._trouble.get(key)
        # NOTE: the model file is hashed only where its digest is read (a failed try to compare
        # with, a full queue to record): a version queued at once is hashed by its run.
        digest = word.digest
        if trouble is not None:
            digest = digest or _digest(version_dir)
            if trouble.digest == digest:
                wait_s = trouble.retry_at - self._clock()
                if wait_s > 0:
                    with self._lock:
                        self._note(key, "retrying")
                    return _could_not(trouble.message, wait_s)
        with self._lock:
            if key in self._pending:
                self._note(key, "judging")
                return self._judging()
            full = len(self._pending) >= self._settings.max_pending
            if not full:
                self._pending.add(key)
                assert self._queue is not None
                self._loop.call_soon_threadsafe(self._queue.put_nowait, key)
                self._note(key, "judging")
        if full:
            return self._queue_full(key, digest or _digest(version_dir))
        log.info(
            "model %r version %d: no gate.json judged its model file; the validation gate "
            "judges it in the background",
            *key,
        )
        return self._judging()

    def _queue_full(self, key: _Key, digest: str) -> str:
        """Refuse the version for now (too many wait to be judged); its retry is scheduled."""
        assert self._loop is not None
        with self._lock:
            message = (
                f"{len(self._pending)} other versions wait to be judged "
                f"(adaptation.gate.max_pending)"
            )
            self._trouble[key] = self._trouble_of(message, digest)
            self._note(key, "retrying")
        self._loop.call_soon_threadsafe(self._retry_later, key[0])
        return _could_not(message, self._settings.retry_s)

    def _judging(self) -> str:
        return f"the validation gate is judging it (an automatic run on {self.source})"

    def _note(self, key: _Key, state: HeldState | None) -> None:
        if state is None:
            self._states.pop(key, None)
        else:
            self._states[key] = state

    # -- runs (the worker on the loop, the judging on the gate's thread) ----------------------

    async def _work(self, queue: asyncio.Queue[_Key]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key = await queue.get()
            model, version = key
            try:
                outcome = await loop.run_in_executor(
                    self._executor, self._judge, model, version, self._serving_below(key)
                )
                if outcome in ("not_enough_data", "error"):
                    self._retry_later(model)
                await self._reload(model)
            except Exception:  # the next version is judged all the same
                log.exception("model %r version %d: the validation gate's worker", *key)
            finally:
                queue.task_done()

    def _serving_below(self, key: _Key) -> int | None:
        """The version compared with: the highest serving below; None (the gate's default,
        the highest on disk below) when none serves."""
        assert self._repository is not None
        model, version = key
        below = [lv.version for lv in self._repository.versions(model) if lv.version < version]
        return max(below, default=None)

    def _judge(self, model: str, version: int, against: int | None) -> RunOutcome | None:
        """One run, on the gate's thread: gate.json written (pass / fail), or the trouble
        recorded; None when there was nothing to judge any more."""
        assert self._repository is not None
        key = (model, version)
        version_dir = self._repository.root / model / str(version)
        outcome: RunOutcome | None = None
        trouble: _Trouble | None = None
        digest = ""
        try:
            if not version_dir.is_dir():
                return None  # removed meanwhile: nothing to judge
            with _exclusive(version_dir):  # another worker may be judging it
                word = standing(version_dir)
                if word.standing != "unjudged":
                    return None  # `gateway validate` or another worker judged it meanwhile
                digest = word.digest or file_digest(version_dir / MODEL_FILE)
                window = self._windows(model)
                if self._closing:
                    return None
                short = self._short_of_labels(window)
                if short:
                    # NOTE: no verdict for want of labels, not a fail for good: the window fills.
                    outcome, trouble = "not_enough_data", self._trouble_of(short, digest)
                    log.info("model %r version %d: the validation gate waits: %s", *key, short)
                    return outcome
                result = validate(
                    self._repository.root,
                    model,
                    version,
                    window,
                    self._settings,
                    self._runtime,
                    against,
                    digest,
                )
                write_result(version_dir, result)
                outcome = "pass" if result.passed else "fail"
                _log_result(result)
        except (_NoWindow, GatewayError, SettingsError, OSError) as err:
            outcome, trouble = "error", self._trouble_of(str(err), digest)
            log.warning("model %r version %d: the validation gate could not run: %s", *key, err)
        except Exception as err:  # a background run must not end the worker
            message = f"{type(err).__name__}: {err}"
            outcome, trouble = "error", self._trouble_of(message, digest)
            log.exception("model %r version %d: the validation gate failed to run", *key)
        finally:
            with self._lock:
                self._pending.discard(key)
                if outcome is not None:
                    self._runs[model, outcome] += 1
                if trouble is not None:
                    self._trouble[key] = trouble
                else:
                    self._trouble.pop(key, None)
        return outcome

    def _short_of_labels(self, window: LabelledWindow) -> str:
        """What the window lacks for the gate's primary metric to be judged; empty: nothing."""
        positives = int(window.labels.sum())
        negatives = window.rows - positives
        wanted = (self._settings.min_positives, self._settings.min_negatives)
        if positives >= wanted[0] and negatives >= wanted[1]:
            return ""
        return (
            f"too few labels in {window.source}: {positives} positives and {negatives} "
            f"negatives (the gate needs {wanted[0]} and {wanted[1]})"
        )

    def _trouble_of(self, message: str, digest: str) -> _Trouble:
        return _Trouble(message, digest, self._clock() + self._settings.retry_s)

    async def _reload(self, model: str) -> None:
        """Load ``model`` again, as RepositoryModelLoad would (the run's word shows, a pass
        serves); not once it was unloaded."""
        assert self._repository is not None
        if self._closing or self._repository.is_unloaded(model):
            return
        try:
            await self._repository.load(model)
        except (ModelLoadError, ModelNotFound) as err:
            log.warning("model %r: reloaded after the validation gate's run: %s", model, err)

    def _retry_later(self, model: str) -> None:
        """Reload ``model`` once retry_s passed: admission then queues what is due."""
        assert self._loop is not None

        def due() -> None:
            self._timers.discard(timer)
            if not self._closing:
                task = asyncio.create_task(self._reload(model))
                self._retries.add(task)
                task.add_done_callback(self._retries.discard)

        timer = self._loop.call_later(self._settings.retry_s, due)
        self._timers.add(timer)

    # -- metrics (on the scrape thread) -------------------------------------------------------

    def _run_samples(self) -> Iterable[tuple[Sequence[str], float]]:
        with self._lock:
            runs = list(self._runs.items())
        return [((model, outcome), count) for (model, outcome), count in runs]

    def _held_samples(self) -> Iterable[tuple[Sequence[str], float]]:
        if self._repository is None:
            return []
        held = self._repository.held()
        with self._lock:
            pending, states = set(self._pending), dict(self._states)
        samples = []
        for model, version, _reason in held:
            key = (model, version)
            state = "judging" if key in pending else states.get(key, "unjudged")
            samples.append(((model, str(version), state), 1.0))
        return samples


def _held_state(verdict: Standing) -> HeldState | None:
    if verdict == "pass":
        return None
    if verdict == "fail":
        return "failed"
    return "unreadable" if verdict == "unreadable" else "unjudged"


def _digest(version_dir: Path) -> str:
    """The model file's SHA-256; empty when it cannot be read (the run says why)."""
    try:
        return file_digest(version_dir / MODEL_FILE)
    except OSError:
        return ""


def _could_not(message: str, wait_s: float) -> str:
    return f"the validation gate could not judge it: {message}; it tries again in {wait_s:.0f} s"


def _log_result(result: GateResult) -> None:
    against = f" against version {result.against}" if result.against is not None else ""
    if result.passed:
        log.info(
            "model %r version %d: the validation gate passed it%s on %d rows",
            result.model,
            result.version,
            against,
            result.rows,
        )
        return
    log.warning(
        "model %r version %d: the validation gate failed it%s on %d rows: %s",
        result.model,
        result.version,
        against,
        result.rows,
        "; ".join(f"{c.name}: {c.reason}" for c in result.failures),
    )


@contextmanager
def _exclusive(version_dir: Path) -> Iterator[None]:
    """Hold the version's lock file: one run per version among this repository's gateways."""
    fd = os.open(version_dir / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _span(seconds: int) -> str:
    """``window_s`` as a person says it: 7 days, 1 hour, 90 s."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count > 1 else ''}"
    return f"{seconds} s"
