"""Settings: defaults < YAML < environment < flags, and errors that name the bad key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.errors import SettingsError
from gateway.runtime.session import resolve_device
from gateway.settings import (
    RouteSpec,
    VersionPolicy,
    bounded_yaml,
    load_model_config,
    load_settings,
)


def test_defaults():
    settings = load_settings(environ={})
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8001
    assert settings.runtime.device == "auto"
    assert settings.telemetry.tracing == "off"


def test_layers_override_in_order(tmp_path: Path):
    path = tmp_path / "gateway.yaml"
    path.write_text("server:\n  port: 9000\n  host: 127.0.0.2\nruntime:\n  device: cpu\n")
    settings = load_settings(
        path,
        environ={"GATEWAY_SERVER__PORT": "9100", "GATEWAY_TELEMETRY__METRICS_PORT": "null"},
        overrides={"server": {"host": "127.0.0.3"}},
    )
    assert settings.server.port == 9100  # env beats file
    assert settings.server.host == "127.0.0.3"  # flag beats file
    assert settings.runtime.device == "cpu"  # file beats default
    assert settings.telemetry.metrics_port is None


def test_unknown_key_is_named(tmp_path: Path):
    path = tmp_path / "gateway.yaml"
    path.write_text("server:\n  prot: 9000\n")
    with pytest.raises(SettingsError, match=r"server\.prot.*Extra inputs"):
        load_settings(path, environ={})


def test_bad_value_is_named_with_the_value():
    with pytest.raises(SettingsError, match=r"runtime\.device.*'tpu'"):
        load_settings(environ={"GATEWAY_RUNTIME__DEVICE": "tpu"})
    with pytest.raises(SettingsError, match=r"server\.port"):
        load_settings(environ={"GATEWAY_SERVER__PORT": "70000"})


def test_unknown_section_is_named():
    with pytest.raises(SettingsError, match=r"batcher"):
        load_settings(environ={"GATEWAY_BATCHER__SIZE": "4"})


def test_settings_are_frozen():
    settings = load_settings(environ={})
    with pytest.raises(ValidationError, match="frozen"):
        settings.server.port = 1  # type: ignore[misc]


def test_invalid_yaml_is_reported(tmp_path: Path):
    path = tmp_path / "gateway.yaml"
    path.write_text("server: [unclosed\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(path, environ={})


def test_model_config_names_the_file_and_key(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text("max_batch_size: -3\n")
    with pytest.raises(SettingsError, match=rf"{path}: max_batch_size"):
        load_model_config(path)


@pytest.mark.parametrize(
    ("policy", "available", "selected"),
    [
        ({}, [1, 3, 2], [3]),
        ({"latest": 2}, [1, 3, 2], [2, 3]),
        ({"all": True}, [2, 1], [1, 2]),
        ({"specific": [1, 5]}, [1, 2, 3], [1]),
    ],
)
def test_version_policy_selects(policy, available, selected):
    assert VersionPolicy(**policy).select(available) == selected


def test_version_policy_takes_one_choice():
    with pytest.raises(ValueError, match="choose one"):
        VersionPolicy(latest=1, all=True)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_serve_with_a_bad_key_stops_with_a_message(tmp_path: Path):
    path = tmp_path / "gateway.yaml"
    path.write_text("runtime:\n  threads: 4\n")
    result = run_cli("serve", "--config", str(path), "--repository", str(tmp_path))
    assert result.returncode == 2
    assert "runtime.threads" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_a_bad_env_value_stops_with_a_message(tmp_path: Path):
    result = run_cli(
        "serve", "--repository", str(tmp_path), env={"GATEWAY_SERVER__SHUTDOWN_GRACE_S": "soon"}
    )
    assert result.returncode == 2
    assert "server.shutdown_grace_s" in result.stderr


def test_serve_without_a_repository_says_so():
    result = run_cli("serve", "--port", "0")
    assert result.returncode == 2
    assert "repository.path" in result.stderr


@pytest.mark.skipif(
    resolve_device("auto") == "cuda", reason="a working GPU is present: this error cannot occur"
)
def test_serve_on_cuda_without_a_gpu_stops_with_a_message(tmp_path: Path):
    result = run_cli("serve", "--repository", str(tmp_path), "--device", "cuda", "--port", "0")
    assert result.returncode == 2
    assert "runtime.device is 'cuda' but" in result.stderr


def _route(**extra: object) -> RouteSpec:
    return RouteSpec.model_validate(
        {
            "variants": [
                {"name": "stable", "model": "fraud", "weight": 1},
                {"name": "default", "output": {"probability": [0.5]}},
            ],
            **extra,
        }
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"fallbacks": ["nope"]}, "fallbacks: no variant named 'nope'"),
        ({"shadows": [{"variant": "default"}]}, "static; shadow a model"),
        ({"match": [{"when": {"x": "y"}, "variant": "ghost"}]}, "match: no variant"),
    ],
)
def test_route_specs_name_what_is_wrong(extra: dict, message: str):
    with pytest.raises(ValueError, match=message):
        _route(**extra)


def test_settings_errors_name_the_route_key():
    with pytest.raises(SettingsError, match=r"routing\.routes\.scorer\.variants\.0\.weight"):
        negative = {"name": "a", "model": "m", "weight": -1}
        routes = {"scorer": {"variants": [negative]}}
        load_settings(environ={}, overrides={"routing": {"routes": routes}})
    with pytest.raises(SettingsError, match="exactly one of tenant, surface"):
        neither = {"name": "b", "limit": 1, "policy": "alert"}
        load_settings(environ={}, overrides={"costs": {"budgets": [neither]}})


def test_bounded_yaml_loads_what_is_within_its_bounds_aliases_included():
    text = "a: &p {x: 1}\nb: *p\nc: [1, 2]\n"
    assert bounded_yaml(text, "routes") == {"a": {"x": 1}, "b": {"x": 1}, "c": [1, 2]}
    assert bounded_yaml("[" * 32 + "]" * 32, "routes", max_depth=32) is not None


@pytest.mark.parametrize(
    ("text", "bounds", "words"),
    [
        ("[" * 33 + "]" * 33, {"max_depth": 32}, "nested deeper than 32 levels"),
        ("{a: " * 5000 + "1" + "}" * 5000, {}, "nested deeper than 32 levels"),
        ("a: &a [1, 1, 1]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]\n", {"max_nodes": 30}, "30 nodes"),
        ("x" * 101, {"max_bytes": 100}, "101 bytes of YAML, over the 100 accepted"),
    ],
)
def test_bounded_yaml_refuses_past_a_bound_before_building_it(text, bounds, words):
    with pytest.raises(ValueError, match=r"^routes: ") as info:
        bounded_yaml(text, "routes", **bounds)
    assert words in str(info.value)


def test_a_static_variant_is_bounded():
    too_big = {"name": "s", "output": {"p": [0.5] * 4097}}
    with pytest.raises(ValidationError, match="at most 4096 values"):
        RouteSpec.model_validate({"variants": [too_big]})
    with pytest.raises(ValidationError, match="variants"):
        RouteSpec.model_validate(
            {"variants": [{"name": f"v{i}", "model": "m", "weight": 1} for i in range(65)]}
        )
