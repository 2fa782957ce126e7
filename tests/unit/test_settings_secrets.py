"""Settings errors never repeat a secret they refuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import SettingsError
from gateway.settings import load_settings

SECRET = "s3cr3t-0123"


@pytest.mark.parametrize(
    "environ",
    [
        {"GATEWAY_ADMIN__TOKN": SECRET},  # a misspelled key
        {"GATEWAY_EVENTS__HASHKEY": SECRET},
        {"GATEWAY_ADMIN__TOKEN": "[" + SECRET},  # not YAML, and not parsed as YAML either
    ],
)
def test_a_refused_setting_does_not_echo_a_secret(environ):
    if "GATEWAY_ADMIN__TOKEN" in environ:  # valid: a secret is its text
        assert load_settings(environ=environ).admin.resolve_token() == "[" + SECRET
        return
    with pytest.raises(SettingsError) as refused:
        load_settings(environ=environ)
    assert SECRET not in str(refused.value)


def test_a_secret_from_the_environment_stays_text():
    settings = load_settings(environ={"GATEWAY_ADMIN__TOKEN": "0123"})
    assert settings.admin.resolve_token() == "0123"
    assert "0123" not in repr(settings)


def test_broken_yaml_is_located_without_quoting_its_line(tmp_path: Path):
    path = tmp_path / "gateway.yaml"
    path.write_text(f'admin:\n  token: "{SECRET}\n')
    with pytest.raises(SettingsError) as refused:
        load_settings(path)
    assert "line" in str(refused.value) and SECRET not in str(refused.value)


def test_a_token_file_others_can_read_is_refused(tmp_path: Path):
    token = tmp_path / "admin.token"
    token.write_text(SECRET)
    token.chmod(0o644)
    settings = load_settings(environ={"GATEWAY_ADMIN__TOKEN_FILE": str(token)})
    with pytest.raises(SettingsError, match="chmod 600") as refused:
        settings.admin.resolve_token()
    assert SECRET not in str(refused.value)
    token.chmod(0o600)
    assert settings.admin.resolve_token() == SECRET
