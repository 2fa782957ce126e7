"""Stage 6, the model repository: versions on disk, version policy, load and unload at run time.

Layout::

    <root>/<model>/config.yaml          how it is served (gateway.settings.ModelConfig)
    <root>/<model>/features.yaml        optional feature contracts (gateway.features)
    <root>/<model>/<version>/model.onnx one directory per integer version

A version that fails to load is reported (state and reason) while every version already
loaded, of this model or another, keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from gateway.errors import (
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    SettingsError,
)
from gateway.runtime.session import OnnxRuntimeSession, SessionOptions
from gateway.runtime.warmup import warm_up
from gateway.settings import ModelConfig, RuntimeSettings, load_model_config
from gateway.telemetry.statistics import ModelStatistics
from gateway.types import (
    OUTCOMES,
    FeatureContract,
    ModelIndexEntry,
    ModelRuntime,
    ModelState,
    TensorSpec,
    ascii_int,
)

__all__ = ["Admission", "ContractSource", "LoadedVersion", "ModelRepository", "RuntimeFactory"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.yaml"

RuntimeFactory = Callable[[Path, SessionOptions], ModelRuntime]
# A model directory's feature contracts by version, and the file they came from (None: the
# model has none). gateway.features.model_contracts reads features.yaml; it is handed in by
# whoever builds the repository, so this stage never imports another.
ContractSource = Callable[[Path], tuple[Mapping[str, FeatureContract], Path] | None]
# Why a version directory may not serve (None: it may): the validation gate's check when
# adaptation.gate.required is on, handed in like the contracts. Runs on the loader's thread.
Admission = Callable[[Path], str | None]

_LOADS = itertools.count(1)


@dataclass(eq=False)
class LoadedVersion:
    """A servable model version: its runtime instances, config and counters."""

    name: str
    version: int
    config: ModelConfig
    runtimes: tuple[ModelRuntime, ...]
    file_stamp: tuple[object, ...]
    contract: FeatureContract | None = None
    stats: ModelStatistics = field(default_factory=ModelStatistics)
    # Unique per load in this process: cached responses of an earlier load never match it.
    generation: int = field(default_factory=lambda: next(_LOADS))
    # SHA-256 of the model file: the same model on every replica, another file never (what
    # rows cached for other replicas are keyed on, beside name, version and contract).
    digest: str = ""

    def __post_init__(self) -> None:
        # Feature coverage since load, per contract feature: present, defaulted, out of range,
        # out of vocabulary. Added to on the event loop; read by the metrics endpoint.
        rows = len(self.contract.feature_names) if self.contract is not None else 0
        self.coverage: NDArray[np.int64] = np.zeros((rows, len(OUTCOMES)), dtype=np.int64)

    @functools.cached_property
    def input_specs(self) -> dict[str, TensorSpec]:
        return {spec.name: spec for spec in self.runtimes[0].inputs}

    @functools.cached_property
    def output_specs(self) -> dict[str, TensorSpec]:
        return {spec.name: spec for spec in self.runtimes[0].outputs}

    @property
    def runtime(self) -> ModelRuntime:
        """The first instance: every instance has the same signature."""
        return self.runtimes[0]

    @functools.cached_property
    def version_label(self) -> str:
        return str(self.version)


@dataclass(slots=True)
class _Model:
    name: str
    config: ModelConfig | None = None
    versions: dict[int, LoadedVersion] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    held: dict[int, str] = field(default_factory=dict)  # kept out of traffic by `admission`
    reason: str = ""  # model-level: bad config, no versions, unloaded
    busy: str = ""  # "LOADING" / "UNLOADING" while a change is in progress
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def _check_contract(contract: FeatureContract, runtime: ModelRuntime) -> None:
    """The contract must build exactly the model's input: same name, FP32, same width."""
    inputs = runtime.inputs
    names = ", ".join(f"'{s.name}' {s.datatype} {list(s.shape)}" for s in inputs)
    target = contract.input_name or (inputs[0].name if len(inputs) == 1 else "?")
    where = f"contract {contract.version} ({contract.source})"
    if len(inputs) != 1 or inputs[0].name != target:
        raise ModelLoadError(
            f"{where} builds input '{target}' but the ONNX model takes {names}; a model under a "
            "feature contract has exactly one input, the one its contract builds"
        )
    spec = inputs[0]
    if spec.datatype != "FP32" or len(spec.shape) != 2 or spec.shape[1] not in (-1, contract.width):
        raise ModelLoadError(
            f"{where} builds '{target}' as FP32 [-1,{contract.width}] from "
            f"{len(contract.feature_names)} features, but the ONNX model takes {names}"
        )


class ModelRepository:
    """Owns every loaded model version; safe to query from the event loop at any time."""

    def __init__(
        self,
        root: Path,
        settings: RuntimeSettings,
        executor: Executor,
        runtime_factory: RuntimeFactory = OnnxRuntimeSession,
        on_retire: Callable[[LoadedVersion], None] | None = None,
        contracts: ContractSource | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.root = root
        self._settings = settings
        self._executor = executor
        self._factory = runtime_factory
        self._contract_source = contracts
        self._admission = admission
        self.on_retire = on_retire
        self._models: dict[str, _Model] = {}

    # -- discovery ---------------------------------------------------------------------------

    def discover(self) -> list[str]:
        """Model directories under the root (those holding a config or a version directory)."""
        if not self.root.is_dir():
            return []
        names = []
        for child in sorted(self.root.iterdir()):
            if not child.is_dir() or child.name.startswith("."):
                continue
            if (child / CONFIG_FILE).exists() or any(self._version_dirs(child)):
                names.append(child.name)
        return names

    @staticmethod
    def _version_dirs(model_dir: Path) -> Iterator[tuple[int, Path]]:
        for child in model_dir.iterdir():
            number = ascii_int(child.name)
            if number is not None and child.is_dir():
                yield number, child

    # -- load / unload -----------------------------------------------------------------------

    async def load_all(self) -> None:
        for name in self.discover():
            try:
                await self.load(name)
            except ModelLoadError as err:
                log.error("model %r did not load: %s", name, err)

    async def load(self, name: str) -> None:
        """(Re)load ``name`` from disk under its version policy.

        New and changed versions load first; versions the policy no longer selects are
        unloaded only when every selected version loaded. Raises ModelLoadError listing the
        failures (after keeping whatever did load).
        """
        model_dir = self.root / _checked_name(name)
        if not name or os.sep in name or name.startswith(".") or not model_dir.is_dir():
            raise ModelNotFound(f"model '{name}' is not in the repository {self.root}")
        model = self._models.setdefault(name, _Model(name))
        async with model.lock:
            model.busy = "LOADING"
            try:
                await self._load_locked(model, model_dir)
            finally:
                model.busy = ""

    async def _load_locked(self, model: _Model, model_dir: Path) -> None:
        try:
            config = load_model_config(model_dir / CONFIG_FILE)
        except SettingsError as err:
            model.reason = f"invalid config: {err}"
            log.error("model %r: %s", model.name, model.reason)
            raise ModelLoadError(f"model '{model.name}': {model.reason}") from None
        try:
            contracts, contract_stamp = self._contracts(model_dir, config)
        except SettingsError as err:
            model.reason = f"invalid feature contract: {err}"
            log.error("model %r: %s", model.name, model.reason)
            raise ModelLoadError(f"model '{model.name}': {model.reason}") from None
        available = dict(self._version_dirs(model_dir))
        loop = asyncio.get_running_loop()
        # A version the policy would serve but the gate holds back: out of traffic, with its
        # reason; the policy chooses among the others (the version serving now stays).
        wanted = config.version_policy.select(list(available))
        held: dict[int, str] = {}
        if self._admission is not None:
            held = await loop.run_in_executor(
                self._executor, self._held, model.name, {v: available[v] for v in wanted}
            )
        model.held = held
        selected = config.version_policy.select([v for v in available if v not in held])
        if not selected:
            model.reason = f"no version directory matches its version policy in {model_dir}"
            if held:
                model.reason = "; ".join(f"version {v}: {r}" for v, r in sorted(held.items()))
            raise ModelLoadError(f"model '{model.name}': {model.reason}")

        failures: dict[int, str] = {}
        loaded: dict[int, LoadedVersion] = {}
        for version in selected:
            path = available[version] / MODEL_FILE
            current = model.versions.get(version)
            try:
                contract = self._pick_contract(contracts, config, version)
                stamp = (_stamp(path), contract_stamp)
                if current is not None and current.file_stamp == stamp and current.config == config:
                    loaded[version] = current
                    continue
                loaded[version] = await loop.run_in_executor(
                    self._executor,
                    self._create,
                    model.name,
                    version,
                    config,
                    path,
                    stamp,
                    contract,
                )
            except FileNotFoundError:
                failures[version] = f"{path} does not exist"
            except ModelLoadError as err:
                failures[version] = str(err)
        for version, reason in failures.items():
            log.error("model %r version %d did not load: %s", model.name, version, reason)

        # A failure anywhere keeps every version that was serving, the failed ones included
        # (their last good load), as Triton does; only a clean load retires what the policy
        # no longer selects.
        keep = (
            {}
            if not failures
            else {v: lv for v, lv in model.versions.items() if v not in loaded and v not in held}
        )
        previous = model.versions
        model.versions = {**keep, **loaded}
        self._retire(previous, model.versions)
        model.failures = failures
        model.config = config
        model.reason = ""
        for version in sorted(loaded):
            log.info(
                "model %r version %d ready on %s",
                model.name,
                version,
                loaded[version].runtime.provider,
            )
        if failures:
            detail = "; ".join(f"version {v}: {r}" for v, r in sorted(failures.items()))
            raise ModelLoadError(f"model '{model.name}' failed to load: {detail}")

    def _held(self, name: str, version_dirs: Mapping[int, Path]) -> dict[int, str]:
        assert self._admission is not None
        held = {v: why for v, d in version_dirs.items() if (why := self._admission(d))}
        for version, why in sorted(held.items()):
            log.warning("model %r version %d is kept out of traffic: %s", name, version, why)
        return held

    def _retire(
        self, previous: dict[int, LoadedVersion], current: dict[int, LoadedVersion]
    ) -> None:
        """Tell the owner which version objects no longer serve (replaced or unloaded)."""
        live = {id(lv) for lv in current.values()}
        for old in previous.values():
            if id(old) not in live and self.on_retire is not None:
                self.on_retire(old)

    def _contracts(
        self, model_dir: Path, config: ModelConfig
    ) -> tuple[Mapping[str, FeatureContract] | None, tuple[int, int] | None]:
        found = None if self._contract_source is None else self._contract_source(model_dir)
        if found is None:
            if config.contract.version or config.contract.by_model_version:
                raise SettingsError(
                    f"config.yaml names contract versions but {model_dir} has no features.yaml"
                )
            return None, None
        contracts, file = found
        return contracts, _stamp(file)

    @staticmethod
    def _pick_contract(
        contracts: Mapping[str, FeatureContract] | None, config: ModelConfig, version: int
    ) -> FeatureContract | None:
        if contracts is None:
            return None
        wanted = config.contract.for_version(version) or list(contracts)[-1]
        if wanted not in contracts:
            raise ModelLoadError(
                f"contract version '{wanted}' is not in features.yaml "
                f"(it has {', '.join(contracts)})"
            )
        return contracts[wanted]

    def _create(
        self,
        name: str,
        version: int,
        config: ModelConfig,
        path: Path,
        stamp: tuple[object, ...],
        contract: FeatureContract | None,
    ) -> LoadedVersion:
        # NOTE: instances run concurrently, one thread each; by default their intra-op threads
        # share the cores rather than each taking all of them.
        intra_op = config.intra_op_threads or self._settings.intra_op_threads
        if not intra_op:
            intra_op = max(1, (os.cpu_count() or 1) // config.instances)
        options = SessionOptions(
            device=config.device or self._settings.device,
            intra_op_threads=intra_op,
            inter_op_threads=self._settings.inter_op_threads,
            graph_optimization=config.graph_optimization or self._settings.graph_optimization,
        )
        runtimes = tuple(self._factory(path, options) for _ in range(config.instances))
        runtime = runtimes[0]
        if config.max_batch_size > 0:
            for spec in runtime.inputs + runtime.outputs:
                if not spec.shape or spec.shape[0] != -1:
                    raise ModelLoadError(
                        f"max_batch_size is {config.max_batch_size} but tensor '{spec.name}' "
                        f"has no dynamic first dimension (shape {list(spec.shape)})"
                    )
        if contract is not None:
            _check_contract(contract, runtime)
        if config.warmup:
            for instance in runtimes:
                warm_up(instance)
        with path.open("rb") as model_file:
            digest = hashlib.file_digest(model_file, "sha256").hexdigest()
        return LoadedVersion(name, version, config, runtimes, stamp, contract, digest=digest)

    async def unload(self, name: str) -> None:
        model = self._models.get(name)
        if model is None:
            if (self.root / _checked_name(name)).is_dir() and name in self.discover():
                return
            raise ModelNotFound(f"model '{name}' is not in the repository {self.root}")
        async with model.lock:
            self._retire(model.versions, {})
            model.versions = {}
            model.failures = {}
            model.held = {}
            model.reason = "unloaded"
        log.info("model %r unloaded", name)

    # -- queries -----------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> LoadedVersion:
        """The version to serve: the one asked for, or the highest loaded."""
        model = self._models.get(name)
        if model is None:
            if name and name in self.discover():
                raise ModelNotReady(f"model '{name}' is not loaded")
            raise ModelNotFound(f"model '{name}' is not known")
        if not version:
            if not model.versions:
                why = model.reason or "; ".join(model.failures.values()) or "not loaded"
                raise ModelNotReady(f"model '{name}' has no ready version ({why})")
            return model.versions[max(model.versions)]
        number = ascii_int(version)
        loaded = model.versions.get(number) if number is not None else None
        if loaded is None and number in model.held:
            raise ModelNotReady(f"model '{name}' version '{version}': {model.held[number]}")
        if loaded is None:
            raise ModelNotFound(f"model '{name}' version '{version}' is not loaded")
        return loaded

    def versions(self, name: str) -> list[LoadedVersion]:
        model = self._models.get(name)
        return [model.versions[v] for v in sorted(model.versions)] if model else []

    def output_names(self, name: str) -> set[str]:
        """The outputs any loaded version of ``name`` has."""
        return {output for lv in self.versions(name) for output in lv.output_specs}

    def loaded(self) -> list[LoadedVersion]:
        return [lv for name in sorted(self._models) for lv in self.versions(name)]

    def is_unloaded(self, name: str) -> bool:
        """``name`` was unloaded (RepositoryModelUnload) and not loaded since."""
        model = self._models.get(name)
        return model is not None and not model.versions and model.reason == "unloaded"

    def held(self) -> list[tuple[str, int, str]]:
        """(model, version, reason) of each version ``admission`` keeps out of traffic now."""
        return [
            (model.name, version, reason)
            for model in list(self._models.values())
            for version, reason in sorted(model.held.items())
        ]

    def index(self, ready_only: bool = False) -> list[ModelIndexEntry]:
        entries: list[ModelIndexEntry] = []
        for name in sorted(set(self.discover()) | set(self._models)):
            model = self._models.get(name)
            if model is None:
                if not ready_only:
                    entries.append(ModelIndexEntry(name, "", "UNAVAILABLE", "not loaded"))
                continue
            for version in sorted(model.versions):
                state: ModelState = "LOADING" if model.busy == "LOADING" else "READY"
                failed = model.failures.get(version) or model.reason
                why = f"the last load failed, the version loaded before serves: {failed}"
                entries.append(ModelIndexEntry(name, str(version), state, why if failed else ""))
            if ready_only:
                continue
            for version, reason in sorted({**model.held, **model.failures}.items()):
                if version not in model.versions:
                    entries.append(ModelIndexEntry(name, str(version), "UNAVAILABLE", reason))
            if not model.versions and not model.failures and not model.held:
                state = "LOADING" if model.busy else "UNAVAILABLE"
                entries.append(ModelIndexEntry(name, "", state, model.reason))
        return entries


MAX_NAME_BYTES = 255  # a model's directory name (NAME_MAX)


def _checked_name(name: str) -> str:
    """A model name a client sent, before it touches the file system: one that no directory
    could have is INVALID_ARGUMENT, not the OSError looking it up would raise."""
    size = len(name.encode("utf-8", errors="surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise InvalidRequest(
            f"model name has {size} bytes; a model's directory name has at most {MAX_NAME_BYTES}"
        )
    if "\x00" in name:
        raise InvalidRequest("model name contains a NUL character")
    return name
