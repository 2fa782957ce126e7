"""Where the key that hashes sensitive feature values comes from, and where it may not live."""

from __future__ import annotations

import logging
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import SecretStr

from gateway.errors import SettingsError
from gateway.events.recorder import EventRecorder, default_hash_key_file, hash_key
from gateway.features import redact
from gateway.settings import EventsSettings, load_settings
from gateway.telemetry import GatewayMetrics


@pytest.fixture
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """XDG_STATE_HOME in the test's directory: the default key file is made there."""
    home = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    return home


def events(tmp_path: Path, **kw: object) -> EventsSettings:
    return EventsSettings(sidecar="127.0.0.1:1", directory=tmp_path / "events", **kw)


def key_file(path: Path, key: bytes = b"k" * 32, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key)
    path.chmod(mode)
    return path


def test_the_default_key_is_made_once_0600_in_the_state_directory(state_home: Path, tmp_path):
    settings = events(tmp_path)
    key = hash_key(settings)
    path = state_home / "gateway" / "hash.key"
    assert default_hash_key_file() == path
    assert len(key) == 32 and path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not settings.directory.exists()  # nothing beside the log
    assert hash_key(settings) == key  # a restart reads it again
    assert [p.name for p in path.parent.iterdir()] == ["hash.key"]  # no partial file left


def test_without_xdg_state_home_the_default_is_under_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_hash_key_file() == tmp_path / ".local" / "state" / "gateway" / "hash.key"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/state")  # invalid by the XDG spec: ignored
    assert default_hash_key_file() == tmp_path / ".local" / "state" / "gateway" / "hash.key"


def test_gateways_starting_together_make_one_key(state_home: Path, tmp_path):
    settings = events(tmp_path)
    start = threading.Barrier(16)

    def one(_: int) -> bytes:
        start.wait()
        return hash_key(settings)

    with ThreadPoolExecutor(16) as pool:
        keys = set(pool.map(one, range(16)))
    assert keys == {(state_home / "gateway" / "hash.key").read_bytes()}


def test_the_hash_key_setting_wins_over_any_file(state_home: Path, tmp_path):
    path = key_file(tmp_path / "keys" / "hash.key")
    settings = events(tmp_path, hash_key=SecretStr("an inline key of 32 characters.."))
    assert hash_key(settings) == b"an inline key of 32 characters.."
    settings = events(tmp_path, hash_key="inline key, 24 bytes....", hash_key_file=path)
    assert hash_key(settings) == b"inline key, 24 bytes...."
    assert not state_home.exists()


def test_the_key_comes_from_the_environment(state_home: Path, tmp_path):
    secret = "a key from the environment, 41 bytes long"
    environ = {
        "GATEWAY_EVENTS__SIDECAR": "127.0.0.1:1",
        "GATEWAY_EVENTS__DIRECTORY": str(tmp_path / "events"),
        "GATEWAY_EVENTS__HASH_KEY": secret,
    }
    settings = load_settings(environ=environ).events
    assert hash_key(settings) == secret.encode()
    assert secret not in repr(settings) and secret not in str(settings)
    assert not state_home.exists()


def test_a_key_file_is_its_raw_bytes(tmp_path):
    raw = bytes(range(256))[::8] + b"\n"  # not text; the newline is part of it
    path = key_file(tmp_path / "keys" / "hash.key", raw)
    assert hash_key(events(tmp_path, hash_key_file=path)) == raw


def test_a_key_file_inside_the_log_directory_is_refused(tmp_path):
    path = key_file(tmp_path / "events" / "keys" / "hash.key")
    with pytest.raises(
        SettingsError, match=r"events\.hash_key_file: .* is inside events\.directory"
    ):
        hash_key(events(tmp_path, hash_key_file=path))


def test_a_link_to_a_key_inside_the_log_directory_is_refused(tmp_path):
    inside = key_file(tmp_path / "events" / "hash.key")
    link = tmp_path / "keys" / "hash.key"
    link.parent.mkdir()
    link.symlink_to(inside)
    with pytest.raises(SettingsError, match=r"events\.hash_key_file: .* is inside"):
        hash_key(events(tmp_path, hash_key_file=link))
    # and a log directory reached through a link holds the key all the same
    (tmp_path / "log-link").symlink_to(tmp_path / "events")
    settings = EventsSettings(
        sidecar="127.0.0.1:1", directory=tmp_path / "log-link", hash_key_file=inside
    )
    with pytest.raises(SettingsError, match=r"events\.hash_key_file: .* is inside"):
        hash_key(settings)


def test_a_default_key_file_inside_the_log_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "events" / "state"))
    with pytest.raises(SettingsError, match=r"events\.hash_key_file: .* is inside"):
        hash_key(events(tmp_path))
    assert not (tmp_path / "events" / "state").exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_key_file_open_to_group_or_others_is_refused(tmp_path, mode: int):
    path = key_file(tmp_path / "keys" / "hash.key", mode=mode)
    with pytest.raises(SettingsError) as refused:
        hash_key(events(tmp_path, hash_key_file=path))
    message = str(refused.value)
    assert message.startswith("events.hash_key_file: ")
    assert f"mode {mode:04o}" in message and f"chmod 600 {path}" in message


def test_a_default_key_file_made_readable_is_refused(state_home: Path, tmp_path):
    hash_key(events(tmp_path))
    (state_home / "gateway" / "hash.key").chmod(0o644)
    with pytest.raises(SettingsError, match=r"events\.hash_key_file: .* mode 0644"):
        hash_key(events(tmp_path))


def test_a_named_key_file_is_not_made(tmp_path):
    path = tmp_path / "keys" / "hash.key"
    with pytest.raises(SettingsError, match=r"events\.hash_key_file: .* does not exist"):
        hash_key(events(tmp_path, hash_key_file=path))
    assert not path.exists()


def test_an_empty_key_is_refused(tmp_path):
    path = key_file(tmp_path / "keys" / "hash.key", b"")
    with pytest.raises(SettingsError, match=r"events\.hash_key_file: .* is empty"):
        hash_key(events(tmp_path, hash_key_file=path))
    with pytest.raises(SettingsError, match=r"events\.hash_key is empty"):
        hash_key(events(tmp_path, hash_key=""))


def test_a_short_key_is_said_without_showing_it(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert hash_key(events(tmp_path, hash_key="tiny-secret")) == b"tiny-secret"
    assert "events.hash_key: a 11-byte key" in caplog.text
    assert "tiny-secret" not in caplog.text


def test_the_key_an_older_version_kept_in_the_log_directory_is_left_unused_and_said(
    state_home: Path, tmp_path, caplog
):
    old_key = b"an old key beside the log, 32 b."
    old = key_file(tmp_path / "events" / "hash.key", old_key)
    with caplog.at_level(logging.WARNING):
        key = hash_key(events(tmp_path))
    new = state_home / "gateway" / "hash.key"
    assert key != old_key and new.read_bytes() == key
    assert f"{old} is the hash key an older version kept beside the event log" in caplog.text
    assert f"mv {old} {new}" in caplog.text
    assert old_key.decode() not in caplog.text
    old.replace(new)  # what the warning says to do: the old hashes again
    assert hash_key(events(tmp_path)) == old_key
    assert redact("DE", hash_key(events(tmp_path))) == redact("DE", old_key)


async def test_the_recorder_refuses_to_start_with_a_misplaced_key(tmp_path):
    path = key_file(tmp_path / "events" / "hash.key")
    recorder = EventRecorder(
        events(tmp_path, hash_key_file=path), GatewayMetrics(), redact, 1 << 20
    )
    with pytest.raises(SettingsError, match=r"events\.hash_key_file: .* is inside"):
        await recorder.start()
    assert sorted(p.name for p in (tmp_path / "events").iterdir()) == ["hash.key"]  # no log
