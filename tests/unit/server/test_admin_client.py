"""What ``gateway routes`` prints and what ``gateway routes --set FILE`` sends: either a mapping
of routes (what it prints) or a settings file's ``routing.routes``, and a plain error naming
the file for anything else."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.api.v1 import admin_pb2 as pb
from gateway.demo import write_demo_settings
from gateway.errors import SettingsError
from gateway.server.admin_client import format_routes, read_routes_file

ROUTE = {"variants": [{"name": "only", "model": "fraud", "version": "2"}]}


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    return path


def test_printed_routes_show_the_generation_and_each_routes_revision():
    reply = pb.Routes(
        yaml=yaml.safe_dump({"b": ROUTE, "a": ROUTE}), revisions={"b": 3, "a": 1}, generation=7
    )
    text = format_routes(reply)
    assert text.splitlines()[:3] == ["# generation 7", "# a: revision 1", "# b: revision 3"]
    assert yaml.safe_load(text) == {"a": ROUTE, "b": ROUTE}  # comments: still the routes
    empty = format_routes(pb.Routes(generation=2))
    assert yaml.safe_load(empty) == {} and "no routes" in empty


def test_what_gateway_routes_prints_is_what_set_takes(tmp_path: Path):
    printed = format_routes(pb.Routes(yaml=yaml.safe_dump({"r": ROUTE}), revisions={"r": 1}))
    text, left_out = read_routes_file(_file(tmp_path, printed))
    assert yaml.safe_load(text) == {"r": ROUTE} and left_out == []


def test_a_settings_file_gives_its_routing_routes_and_names_the_rest(tmp_path: Path):
    settings = write_demo_settings(tmp_path)  # the demo's gateway.yaml
    text, left_out = read_routes_file(settings)
    assert list(yaml.safe_load(text)) == ["fraud-live"]
    tree = yaml.safe_load(settings.read_text())
    assert yaml.safe_load(text) == tree["routing"]["routes"]
    assert left_out == ["routing.rate_limits", "costs", "admin", "evaluation"]


def test_a_route_may_be_named_like_a_settings_section(tmp_path: Path):
    text, _ = read_routes_file(_file(tmp_path, yaml.safe_dump({"routing": ROUTE, "cache": ROUTE})))
    assert yaml.safe_load(text) == {"routing": ROUTE, "cache": ROUTE}
    removed, _ = read_routes_file(_file(tmp_path, "{}\n"))  # every route removed, explicitly
    assert yaml.safe_load(removed) == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty; to remove every route, give {}"),
        ("# nothing but a comment\n", "empty"),
        ("- fraud-live\n", "a YAML list, not a mapping of routes"),
        ("fraud-live\n", "a YAML string, not a mapping of routes"),
        ("server: {port: 8001}\ncache: {ttl_s: 1}\n", "settings (server, cache) without routing"),
        ("routing: {rate_limits: {}}\n", "routing has no routes mapping"),
        ("routing: {routes: [a, b]}\n", "routing has no routes mapping"),
        ("a: [\n", "not YAML"),
    ],
)
def test_anything_else_is_a_plain_error_naming_the_file(tmp_path: Path, text: str, message: str):
    path = _file(tmp_path, text)
    with pytest.raises(SettingsError) as info:
        read_routes_file(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
