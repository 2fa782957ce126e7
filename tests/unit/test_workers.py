"""Multi-process mode's checks before any worker starts."""

from __future__ import annotations

import pytest

from gateway.errors import SettingsError
from gateway.settings import load_settings
from gateway.workers import supervise


def test_every_workers_metrics_port_must_be_a_port():
    """Worker i serves metrics on metrics_port + i: the last must be at most 65535."""
    overrides = {"server": {"workers": 3}, "telemetry": {"metrics_port": 65534}}
    settings = load_settings(None, environ={}, overrides=overrides)
    with pytest.raises(SettingsError, match="3 workers serve metrics on 65534 to 65536"):
        supervise(settings, ["serve"])
