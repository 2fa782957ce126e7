"""Redis URLs (state, cache, broker) are checked when settings load, by field, without the
URL (it may hold a password) in the message."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import SettingsError
from gateway.settings import load_settings


@pytest.mark.parametrize(
    ("section", "url", "wanted"),
    [
        ("events:\n  broker:\n    url", "http://u:hunter2@h:1/0", "url: the scheme"),
        ("state:\n  redis_url", "redis://u:hunter2@h:port/0", "redis_url: the port"),
        ("state:\n  cache_redis_url", "redis://u:hunter2@h:6379/zero", "cache_redis_url: the da"),
        ("evaluation:\n  broker:\n    url", "redis://u:hunter2@h:99999/0", "url: the port"),
    ],
)
def test_a_bad_redis_url_is_refused_by_field_without_its_password(
    tmp_path: Path, section: str, url: str, wanted: str
):
    config = tmp_path / "gateway.yaml"
    config.write_text(f'{section}: "{url}"\n')
    with pytest.raises(SettingsError) as refused:
        load_settings(config)
    assert wanted in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_good_redis_urls_load(tmp_path: Path):
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "state:\n  redis_url: redis://u:pw@h:6379/2\n  cache_redis_url: rediss://h:6380/0\n"
        "events:\n  broker:\n    url: unix:///run/redis.sock\n"
    )
    settings = load_settings(config)
    assert settings.events.broker.address == "unix:/run/redis.sock"  # logged: no password
    assert settings.state.cache_redis_url is not None
