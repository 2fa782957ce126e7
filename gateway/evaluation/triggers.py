"""Retraining triggers (``evaluation.triggers``): when a model's trigger is due, and one run of
it: a fresh labelled export, then the user's training command or a webhook, recorded.

A trigger fires on time (``cadence_s`` after its last run), data (``labelled_rows`` labels
received since its last run), drift (a ``retrain`` rule firing for ``drift_checks``
consecutive checks) or performance (a quality alert on its ``primary_metric``); the playbooks
(``playbooks.py``) say when an incident asks for it. Runs of a trigger are ``cooldown_s``
apart, from a run's start, whatever its outcome, and never overlap: a failing command is
recorded once, and runs again only on the next due time or incident past the cooldown.

A run is recorded as it starts (outcome ``running``) and again when it ends: ``ok``,
``failed`` (a non-zero exit, a webhook's error status), ``timeout`` (killed, with its process
group) or ``error`` (the export, or the command not found), with its exit status, duration
and the tail of its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

import grpc

from gateway.errors import GatewayError, InvalidRequest, ModelNotFound
from gateway.evaluation.journal import Journal
from gateway.evaluation.metrics import SidecarMetrics
from gateway.settings import TriggerSpec

__all__ = ["Firing", "TriggerBusy", "TriggerKind", "Triggers"]

log = logging.getLogger(__name__)

TriggerKind = Literal["time", "data", "drift", "performance", "manual"]
_KILLED_S: Final = 10.0  # how long a killed command is waited for
_T = TypeVar("_T")


class TriggerBusy(GatewayError):
    """A run of the trigger is in progress, or (without force) within its cooldown."""

    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True)
class Firing:
    """Why a trigger should run now: its kind, a sentence, and the alert it answers."""

    spec: TriggerSpec
    kind: TriggerKind
    reason: str
    incident: str = ""


class Triggers:
    """Runs ``specs``' triggers in the background, one run at a time per trigger, recording
    each in ``journal``. Store calls go through ``db`` (the store's one thread)."""

    def __init__(
        self,
        specs: tuple[TriggerSpec, ...],
        journal: Journal,
        db: Executor,
        metrics: SidecarMetrics,
    ) -> None:
        self.specs = specs
        self.journal = journal
        self.db = db
        self.metrics = metrics
        self._running: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._starting: set[str] = set()
        self._last_s: dict[str, float] = {}  # a trigger's last run, read from the journal once
        self._first_s: float | None = None  # the first round: time triggers count from it

    def of(self, model: str) -> list[TriggerSpec]:
        return [spec for spec in self.specs if spec.model == model]

    async def due(self, now_s: float) -> list[Firing]:
        """The time and data triggers due at ``now_s``."""
        if self._first_s is None:
            self._first_s = now_s
        out: list[Firing] = []
        for spec in self.specs:
            last = await self.last_run_s(spec)
            if spec.cadence_s is not None:
                since = last if last is not None else self._first_s
                if now_s - since >= spec.cadence_s:
                    out.append(Firing(spec, "time", f"{spec.cadence_s:g} s since the last run"))
                    continue
            if spec.labelled_rows is not None:
                rows = await self._in_db(
                    self.journal.labelled_since, spec.model, last if last is not None else 0.0
                )
                if rows >= spec.labelled_rows:
                    out.append(
                        Firing(
                            spec,
                            "data",
                            f"{rows} labelled rows since the last run "
                            f"(labelled_rows {spec.labelled_rows})",
                        )
                    )
        return out

    async def last_run_s(self, spec: TriggerSpec) -> float | None:
        if spec.label not in self._last_s:
            last = await self._in_db(self.journal.last_run_s, spec.model, spec.label)
            if last is None:
                return None
            self._last_s[spec.label] = last
        return self._last_s[spec.label]

    async def fire(self, firing: Firing, now_s: float) -> bool:
        """Start a run unless one is running or the last started within ``cooldown_s``; a
        firing for an incident that is refused is recorded (``skipped``), once, as incidents
        come once. True when a run started."""
        spec = firing.spec
        last = await self.last_run_s(spec)
        busy = self._busy(spec.label)
        cooling = last is not None and now_s - last < spec.cooldown_s
        if busy or cooling:
            if firing.incident:
                why = (
                    "a run is in progress"
                    if busy
                    else f"cooldown: the last run started {now_s - last:.0f} s ago "  # type: ignore[operator]
                    f"(cooldown_s {spec.cooldown_s:g})"
                )
                await self._record_skip(firing, now_s, why)
            return False
        await self._start(firing, now_s)
        return True

    async def run_now(
        self, model: str, name: str, reason: str, force: bool, now_s: float
    ) -> dict[str, Any]:
        """Start a run of ``model``'s trigger ``name`` (its only one when empty) by hand: its
        record as it started. ModelNotFound: no such trigger; TriggerBusy: a run in progress,
        or within its cooldown unless ``force``."""
        specs = self.of(model)
        if not specs:
            raise ModelNotFound(f"model '{model}' has no trigger (evaluation.triggers)")
        if name:
            specs = [spec for spec in specs if spec.label == name]
            if not specs:
                names = ", ".join(spec.label for spec in self.of(model))
                raise ModelNotFound(f"model '{model}' has no trigger '{name}' (it has: {names})")
        elif len(specs) > 1:
            names = ", ".join(spec.label for spec in specs)
            raise InvalidRequest(f"name: model '{model}' has several triggers: {names}")
        spec = specs[0]
        last = await self.last_run_s(spec)
        if self._busy(spec.label):
            raise TriggerBusy(f"trigger '{spec.label}': a run is in progress")
        if not force and last is not None and now_s - last < spec.cooldown_s:
            raise TriggerBusy(
                f"trigger '{spec.label}': its last run started {now_s - last:.0f} s ago "
                f"(cooldown_s {spec.cooldown_s:g}); force runs it anyway"
            )
        return await self._start(Firing(spec, "manual", reason or "run by hand"), now_s)

    def _busy(self, label: str) -> bool:
        return label in self._running or label in self._starting

    async def _start(self, firing: Firing, now_s: float) -> dict[str, Any]:
        """Record the run as started and run it in the background: that record."""
        spec = firing.spec
        self._last_s[spec.label] = now_s
        entry = _entry(firing, now_s) | {"outcome": "running", "ran": _what(spec)}
        self._starting.add(spec.label)  # busy while its record is written: no second run
        try:
            entry["id"] = await self._in_db(self.journal.record, entry)
        finally:
            self._starting.discard(spec.label)
        task = asyncio.get_running_loop().create_task(
            self._run(firing, dict(entry)), name=f"trigger {spec.label}"
        )
        self._running[spec.label] = task
        task.add_done_callback(lambda _t: self._running.pop(spec.label, None))
        return entry

    async def drain(self) -> list[dict[str, Any]]:
        """Wait for the runs in progress; their records."""
        return list(await asyncio.gather(*self._running.values()))

    async def close(self) -> None:
        """Stop the runs in progress (their commands killed); each is recorded as ``error``."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task  # a store already closed fails the record: the log has it

    async def _record_skip(self, firing: Firing, now_s: float, why: str) -> None:
        spec = firing.spec
        entry = _entry(firing, now_s) | {"outcome": "skipped", "detail": {"why": why}}
        await self._in_db(self.journal.record, entry)
        self.metrics.triggers.labels(spec.model, firing.kind, "skipped").inc()
        log.info("trigger %s (%s) not run: %s", spec.label, firing.kind, why)

    async def _run(self, firing: Firing, entry: dict[str, Any]) -> dict[str, Any]:
        spec = firing.spec
        started_s = float(entry["time"])
        log.warning("trigger %s fired (%s): %s", spec.label, firing.kind, firing.reason)
        clock = time.monotonic()
        try:
            path = await self._in_db(self.journal.export_path, spec.label, started_s)
            path, rows = await self._in_db(
                self.journal.store.export,
                path,
                spec.model,
                "",
                int((started_s - spec.window_s) * 1_000_000),
                0,
                True,
            )
            entry["detail"] = {"training_data": str(path), "rows": rows}
            if rows < spec.min_rows:  # a run (its cooldown counts), not a refusal
                code, outcome = None, "too_few_rows"
                output = (
                    f"{rows} labelled rows in the last {spec.window_s} s, fewer than min_rows "
                    f"{spec.min_rows}: nothing trained"
                )
            elif spec.command is not None:
                env = {
                    **os.environ,
                    "GATEWAY_MODEL": spec.model,
                    "GATEWAY_WINDOW_S": str(spec.window_s),
                    "GATEWAY_TRAINING_DATA": str(path),
                    "GATEWAY_TRIGGER_KIND": firing.kind,
                    "GATEWAY_TRIGGER_REASON": firing.reason,
                }
                code, output, outcome = await _run_command(spec, env)
            else:
                body = {
                    "model": spec.model,
                    "trigger": spec.label,
                    "kind": firing.kind,
                    "reason": firing.reason,
                    "incident": firing.incident,
                    "window_s": spec.window_s,
                    "training_data": str(path),
                    "rows": rows,
                    "time": started_s,
                }
                code, output, outcome = await asyncio.to_thread(_post, spec, body)
        except asyncio.CancelledError:
            code, output, outcome = None, "stopped: the sidecar stopped", "error"
            raise
        except Exception as err:  # recorded as the run's outcome, never raised
            code, output, outcome = None, f"{type(err).__name__}: {err}", "error"
        finally:
            entry.update(
                outcome=outcome,
                exit_code=code,
                duration_s=time.monotonic() - clock,
                output=output,
            )
            await self._in_db(self.journal.finish, entry)
            self.metrics.triggers.labels(spec.model, firing.kind, outcome).inc()
            # Keep the last keep_exports files of this trigger (this one included).
            await self._in_db(self.journal.prune_exports, spec.label, spec.keep_exports)
        (log.info if outcome == "ok" else log.error)(
            "trigger %s %s (exit %s) in %.1f s", spec.label, outcome, code, entry["duration_s"]
        )
        return entry

    async def _in_db(self, call: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.db, call, *args)


def _entry(firing: Firing, now_s: float) -> dict[str, Any]:
    return {
        "time": now_s,
        "model": firing.spec.model,
        "kind": firing.kind,
        "name": firing.spec.label,
        "incident": firing.incident,
        "reason": firing.reason,
        "ran": "",
    }


def _what(spec: TriggerSpec) -> str:
    return json.dumps(list(spec.command)) if spec.command is not None else f"POST {spec.webhook}"


async def _run_command(spec: TriggerSpec, env: dict[str, str]) -> tuple[int | None, str, str]:
    """Run the command in its own process group; (exit status, output tail, outcome).

    NOTE: started by CPython's ``subprocess`` (vfork: no fork handlers run in the child), not
    by the event loop: uvloop's spawn is a plain fork(), in which gRPC's fork handlers run
    while another thread is in a gRPC call (a playbook's admin call in the same round), and
    the child then died before its exec, by SIGSEGV or SIGABRT with no output: between 1
    start in 7 and 1 in 14 beside two threads calling a gRPC server here. It is started on
    the loop (about a millisecond, until the exec) so that no cancellation can come between
    its start and the code that kills it; a thread of its own waits for its exit, and the loop
    reads its output."""
    assert spec.command is not None
    process = subprocess.Popen(  # noqa: ASYNC220
        spec.command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group: a timeout kills its children too
        bufsize=0,
    )
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[int] = loop.create_future()
    args = (process, loop, exited)
    threading.Thread(target=_reap, args=args, name="trigger command", daemon=True).start()
    assert process.stdout is not None
    output = _Output(spec.output_bytes)
    try:
        transport, _ = await loop.connect_read_pipe(lambda: output, process.stdout)
    except BaseException:
        await _stopped(process, exited)
        raise
    try:
        async with asyncio.timeout(spec.timeout_s):
            await asyncio.shield(output.closed)
            code = await asyncio.shield(exited)
    except TimeoutError:
        await _stopped(process, exited)
        return None, output.text() + f"\n[killed after timeout_s {spec.timeout_s:g}]", "timeout"
    except asyncio.CancelledError:
        await _stopped(process, exited)
        raise
    finally:
        transport.close()  # a process that left the group may hold the pipe: read no more
    return code, output.text(), "ok" if code == 0 else "failed"


class _Output(asyncio.Protocol):
    """A command's output as it comes, its last ``limit`` bytes kept; ``closed`` once it
    ends."""

    def __init__(self, limit: int) -> None:
        self._tail = bytearray()
        self._limit = limit
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self._tail += data
        del self._tail[: max(0, len(self._tail) - self._limit)]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def text(self) -> str:
        return _text(self._tail)


def _reap(
    process: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop, exited: asyncio.Future[int]
) -> None:
    """(A thread of its own, as long as the process runs) wait for its exit status and hand
    it to the loop."""
    code = process.wait()
    with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
        loop.call_soon_threadsafe(_settle, exited, code)


def _settle(exited: asyncio.Future[int], code: int) -> None:
    if not exited.done():
        exited.set_result(code)


async def _stopped(process: subprocess.Popen[bytes], exited: asyncio.Future[int]) -> None:
    """SIGKILL the command's process group and wait (a bounded while) for its exit."""
    _kill(process.pid)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(exited), _KILLED_S)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _post(spec: TriggerSpec, body: dict[str, Any]) -> tuple[int | None, str, str]:
    """POST ``body`` as JSON; (HTTP status, response tail, outcome)."""
    assert spec.webhook is not None
    request = urllib.request.Request(
        spec.webhook,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    try:
        # NOTE: http(s) only: TriggerSpec.webhook's pattern refuses other schemes.
        with urllib.request.urlopen(request, timeout=spec.webhook_timeout_s) as reply:
            status = int(reply.status)
            text = reply.read(spec.output_bytes)
    except urllib.error.HTTPError as err:
        return err.code, _text(err.read(spec.output_bytes)), "failed"
    except (urllib.error.URLError, OSError) as err:
        return None, f"{type(err).__name__}: {err}", "failed"
    return status, _text(text), "ok" if 200 <= status < 300 else "failed"


def _text(data: bytes | bytearray) -> str:
    return bytes(data).decode("utf-8", errors="replace")
