"""The command line's own text and flags, without running a command: what --help shows, and
what a flag sets."""

from __future__ import annotations

import argparse

import pytest

from gateway.cli import _overrides, _parser, _without_flags
from gateway.settings import load_settings


def _helps(parser: argparse.ArgumentParser, prog: str = "gateway") -> dict[str, str]:
    """Every command's --help text (sub-commands' too), by its command line."""
    texts = {prog: parser.format_help()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                texts |= _helps(sub, f"{prog} {name}")
    return texts


def test_no_help_text_shows_restructuredtext_markup():
    helps = _helps(_parser())
    assert len(helps) > 20 and "gateway routes" in helps and "gateway review list" in helps
    assert "gateway serve" in helps["gateway"]  # the description is there, as plain text
    marked = sorted(command for command, text in helps.items() if "`" in text)
    assert marked == []


def test_labels_help_names_each_column_it_reads():
    text = _helps(_parser())["gateway labels"]
    for column in ("label", "value", "request_id", "entity_key", "row", "event_time"):
        assert f"\n  {column} " in text or f" {column} " in text, column
    assert "columns" in text and "Unix microseconds" in text


def test_otlp_endpoint_flag_sets_telemetry_otlp_endpoint():
    args = _parser().parse_args(["serve", "--otlp-endpoint", "http://collector:4317"])
    overrides = _overrides(args)
    assert overrides == {"telemetry": {"otlp_endpoint": "http://collector:4317"}}
    settings = load_settings(None, environ={}, overrides=overrides)
    assert settings.telemetry.otlp_endpoint == "http://collector:4317"
    assert "telemetry" not in _overrides(_parser().parse_args(["serve"]))


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--workers", "2", "--port", "8001", "--metrics-port", "9100", "--http-port", "0"],
        ["serve", "--workers=2", "--port=8001", "--metrics-port=9100", "--http-port", "0"],
    ],
)
def test_workers_get_the_command_line_without_the_flags_the_supervisor_sets(argv):
    kept = _without_flags(argv, "--workers", "--port", "--metrics-port")
    assert kept == ["serve", "--http-port", "0"]
