"""The validation gate run by itself (adaptation.gate.auto) over a real repository of the demo
model: a version no gate.json judged is judged in the background and serves once it passed; a
failure keeps it out with the criterion at fault and is not judged again until its model file
changes; a run that cannot judge writes nothing and is tried again only after the back-off;
runs go one at a time, a bounded few queued, never the same version twice."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.adaptation.auto_gate import AutoGate
from gateway.adaptation.gate import LabelledWindow, window_of
from gateway.adaptation.gate_result import GATE_FILE, GateResult, file_digest, write_result
from gateway.errors import ModelNotReady, SettingsError
from gateway.features import model_contracts
from gateway.runtime import ModelRepository
from gateway.settings import GateSettings, RuntimeSettings, load_settings
from gateway.telemetry import GatewayMetrics
from tests.fakes import FakeClock
from tests.unit.test_gate import COPY_VERSION, NAN_VERSION, add_gate_versions, labelled_table

RUNTIME = RuntimeSettings(device="cpu")
RETRY_S = 600.0


def accept_as_is(repo: Path, version: int) -> None:
    """A passing gate.json for a version as it is (what `gateway validate V --against V`
    records for the versions serving before the gate is required)."""
    model_file = repo / "fraud" / str(version) / "model.onnx"
    result = GateResult(
        "fraud", version, version, file_digest(model_file), None, "as is", 0, (), ""
    )
    write_result(model_file.parent, result)


@pytest.fixture
def repo(repo_copy: Path, tmp_path: Path) -> Path:
    """The demo's versions 1 and 2, accepted; the gate's test versions wait in ``staged``."""
    add_gate_versions(repo_copy)
    for version in (1, 2):
        accept_as_is(repo_copy, version)
    staged = tmp_path / "staged"
    staged.mkdir()
    for version in (NAN_VERSION, 4, COPY_VERSION):
        shutil.move(repo_copy / "fraud" / str(version), staged / str(version))
    return repo_copy


def bring(repo: Path, version: int) -> Path:
    """A staged version appears in the repository (as an operator copies one in)."""
    target = repo / "fraud" / str(version)
    shutil.move(repo.parent / "staged" / str(version), target)
    return target


class Windows:
    """The labelled window a run gets: ``fail`` raises instead; a cleared ``release`` holds
    each call (on the gate's thread) until the test sets it."""

    def __init__(self, rows: int = 2000) -> None:
        self.window = window_of(labelled_table(rows), "a test window")
        self.fail: Exception | None = None
        self.calls = 0
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, model: str) -> LabelledWindow:
        self.calls += 1
        self.started.set()
        assert self.release.wait(30), "the test never released the window"
        if self.fail is not None:
            raise self.fail
        return self.window


@dataclass
class Stack:
    gate: AutoGate
    repository: ModelRepository
    metrics: GatewayMetrics
    clock: FakeClock

    async def load(self) -> None:
        await self.repository.load("fraud")

    async def settle(self) -> None:
        """Until every queued run is done and the model reloaded after it."""
        await asyncio.wait_for(self.gate.join(), 120)

    def reason(self, version: int) -> str:
        with pytest.raises(ModelNotReady) as held:
            self.repository.get("fraud", str(version))
        return str(held.value)

    def runs(self, outcome: str) -> float:
        labels = {"model": "fraud", "outcome": outcome}
        return self.metrics.registry.get_sample_value("gateway_gate_runs_total", labels) or 0.0

    def held(self) -> dict[str, str]:
        """version -> state, from the gateway_gate_held gauge."""
        return {
            s.labels["version"]: s.labels["state"]
            for family in self.metrics.registry.collect()
            if family.name == "gateway_gate_held"
            for s in family.samples
            if s.value == 1
        }


@asynccontextmanager
async def gated(repo: Path, windows: Windows, **settings: float) -> AsyncIterator[Stack]:
    gate_settings = GateSettings(
        required=True,
        auto=True,
        retry_s=RETRY_S,
        # the test is about when runs happen, not about this host's speed
        latency_runs=5,
        latency_budget_ms=10_000,
        max_batch_latency_budget_ms=10_000,
        **settings,
    )
    clock = FakeClock(1000.0)
    metrics = GatewayMetrics()
    gate = AutoGate(gate_settings, RUNTIME, windows, "a test window", metrics, clock)
    executor = ThreadPoolExecutor(max_workers=1)
    repository = ModelRepository(
        repo, RUNTIME, executor, contracts=model_contracts, admission=gate.admission
    )
    gate.start(repository)
    try:
        yield Stack(gate, repository, metrics, clock)
    finally:
        windows.release.set()
        await gate.close()
        executor.shutdown()


async def test_a_new_version_is_judged_in_the_background_and_serves_once_it_passed(repo: Path):
    windows = Windows()
    async with gated(repo, windows) as stack:
        version_dir = bring(repo, COPY_VERSION)
        await stack.load()
        assert "the validation gate is judging it (an automatic run on a test window)" in (
            stack.reason(COPY_VERSION)
        )
        assert stack.repository.get("fraud").version == 2  # the serving version serves on
        await stack.settle()

        assert stack.repository.get("fraud", str(COPY_VERSION)).version == COPY_VERSION
        body = (version_dir / GATE_FILE).read_text()
        assert '"passed": true' in body and '"against": 2' in body
        assert stack.runs("pass") == 1 and stack.held() == {}

        # Its model file replaced by one with NaN outputs: judged again, and held for it.
        staged_nan = repo.parent / "staged" / str(NAN_VERSION) / "model.onnx"
        shutil.copyfile(staged_nan, version_dir / "model.onnx")
        await stack.load()
        await stack.settle()
        reason = stack.reason(COPY_VERSION)
        assert reason.startswith(
            "model 'fraud' version '5': the validation gate failed it: outputs: probability "
            "has 2000 NaN"
        )
        assert stack.runs("fail") == 1 and stack.held() == {"5": "failed"}

        # A failed version is not judged again for the same file, however often it loads ...
        await stack.load()
        await stack.settle()
        assert windows.calls == 2 and stack.runs("fail") == 1

        # ... but a new model file is.
        shutil.copyfile(repo / "fraud" / "2" / "model.onnx", version_dir / "model.onnx")
        await stack.load()
        await stack.settle()
        assert stack.repository.get("fraud", str(COPY_VERSION)).version == COPY_VERSION
        assert windows.calls == 3 and stack.runs("pass") == 2


async def test_a_run_that_cannot_judge_writes_nothing_and_is_tried_again_after_the_back_off(
    repo: Path,
):
    windows = Windows()
    windows.fail = OSError("the sidecar at 127.0.0.1:9: UNAVAILABLE: connection refused")
    async with gated(repo, windows) as stack:
        version_dir = bring(repo, COPY_VERSION)
        await stack.load()
        await stack.settle()
        assert not (version_dir / GATE_FILE).exists()
        reason = stack.reason(COPY_VERSION)
        assert "the validation gate could not judge it: the sidecar at 127.0.0.1:9" in reason
        assert f"it tries again in {RETRY_S:.0f} s" in reason
        assert stack.runs("error") == 1 and stack.held() == {"5": "retrying"}

        # loads within the back-off do not run it again
        stack.clock.advance(RETRY_S - 1)
        await stack.load()
        await stack.settle()
        assert windows.calls == 1 and "tries again in 1 s" in stack.reason(COPY_VERSION)

        windows.fail = None
        stack.clock.advance(1)
        await stack.load()
        await stack.settle()
        assert windows.calls == 2 and stack.runs("pass") == 1
        assert stack.repository.get("fraud", str(COPY_VERSION)).version == COPY_VERSION


async def test_too_few_labels_is_no_verdict_and_writes_no_gate_json(repo: Path):
    windows = Windows(rows=100)
    async with gated(repo, windows) as stack:
        version_dir = bring(repo, COPY_VERSION)
        await stack.load()
        await stack.settle()
        assert not (version_dir / GATE_FILE).exists()
        reason = stack.reason(COPY_VERSION)
        assert "could not judge it: too few labels in a test window: 3 positives and 97 " in reason
        assert "negatives (the gate needs 30 and 30); it tries again in 600 s" in reason
        assert stack.runs("not_enough_data") == 1 and stack.runs("fail") == 0


async def test_versions_are_judged_one_at_a_time_a_few_queued_none_twice(repo: Path):
    windows = Windows()
    windows.release.clear()
    async with gated(repo, windows, max_pending=2) as stack:
        for version in (NAN_VERSION, 4, COPY_VERSION):
            bring(repo, version)
        await stack.load()
        assert await asyncio.to_thread(windows.started.wait, 30)
        # 3 is being judged and 4 waits; 5 found the queue full
        assert "is judging it" in stack.reason(NAN_VERSION)
        assert "is judging it" in stack.reason(4)
        assert "could not judge it: 2 other versions wait to be judged" in (
            stack.reason(COPY_VERSION)
        )
        assert stack.held() == {"3": "judging", "4": "judging", "5": "retrying"}

        await stack.load()  # a load meanwhile queues nothing twice
        windows.release.set()
        await stack.settle()
        assert windows.calls == 2
        assert stack.runs("fail") == 2  # 3 has NaN outputs, 4 is worse on channel=web
        assert stack.held() == {"3": "failed", "4": "failed", "5": "retrying"}

        stack.clock.advance(RETRY_S)
        await stack.load()
        await stack.settle()
        assert windows.calls == 3 and stack.runs("pass") == 1
        assert stack.held() == {"3": "failed", "4": "failed"}


def test_auto_needs_the_gate_required_and_a_sidecar_to_export_from():
    with pytest.raises(SettingsError, match="auto judges the versions the gate holds back"):
        load_settings(environ={"GATEWAY_ADAPTATION__GATE__AUTO": "true"})
    gate_on = {"GATEWAY_ADAPTATION__GATE__AUTO": "true", "GATEWAY_ADAPTATION__GATE__REQUIRED": "1"}
    with pytest.raises(SettingsError, match=r"set adaptation\.rollout\.sidecar or events\.sidecar"):
        AutoGate.from_settings(load_settings(environ=gate_on))
    sidecar = {
        **gate_on,
        "GATEWAY_EVENTS__SIDECAR": "127.0.0.1:9",
        "GATEWAY_ADAPTATION__GATE__WINDOW_S": "3600",
    }
    gate = AutoGate.from_settings(load_settings(environ=sidecar))
    assert gate.source == "the last 1 hour of labelled traffic from the sidecar at 127.0.0.1:9"
