"""Every native module is reported (start-up log, ``gateway_native_extension`` gauge): one entry
per native/*.pyx, each what its selector chose; and every module shares native/_wire.pxd's
wire helpers instead of its own copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway import _hotloops
from gateway._extensions import native_modules
from gateway.events import _encoder
from gateway.features import kernel
from gateway.server import codec
from gateway.telemetry import GatewayMetrics

NATIVE = Path(__file__).resolve().parents[2] / "native"


def test_each_native_module_is_reported():
    sources = {f"gateway.{pyx.stem}" for pyx in NATIVE.glob("*.pyx")}
    assert sources
    assert set(native_modules()) == sources


def test_each_report_is_its_selectors_choice(monkeypatch: pytest.MonkeyPatch):
    selectors = {
        "gateway._hotloops_c": _hotloops,
        "gateway._features_c": kernel,
        "gateway._events_c": _encoder,
        "gateway._oip_c": codec,
    }
    for selector in [None, *selectors.values()]:
        if selector is not None:  # flip one: only its own report follows
            monkeypatch.setattr(selector, "USING_EXTENSION", not selector.USING_EXTENSION)
        assert native_modules() == {n: s.USING_EXTENSION for n, s in selectors.items()}
        monkeypatch.undo()


def test_the_selectors_choose_as_the_environment_says():
    if os.environ.get("GATEWAY_EXPECT_EXTENSIONS"):
        assert all(native_modules().values()), native_modules()
    if os.environ.get("GATEWAY_NO_EXTENSIONS"):
        assert not any(native_modules().values()), native_modules()


def test_the_gauge_has_a_sample_per_module():
    metrics = GatewayMetrics()
    for module, native in native_modules().items():
        metrics.native.labels(module=module).set(1 if native else 0)
    for module, native in native_modules().items():
        value = metrics.registry.get_sample_value("gateway_native_extension", {"module": module})
        assert value == (1 if native else 0)


def test_each_native_module_cimports_the_shared_wire_helpers():
    assert (NATIVE / "_wire.pxd").exists()
    for pyx in NATIVE.glob("*.pyx"):
        assert "from _wire cimport " in pyx.read_text(), pyx.name
