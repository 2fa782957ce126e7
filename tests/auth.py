"""Credentials the tests give gateways and present to them, the keys files that hold them, and
polling for what a running process does with them."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ADMIN_TOKEN = "test-admin-token-3f9c"
# Environment for a gateway with admin rights on that token; headers for a tritonclient call.
ADMIN_ENV = {"GATEWAY_ADMIN__TOKEN": ADMIN_TOKEN}
ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN_TOKEN}"}
ADMIN_METADATA = [("authorization", f"Bearer {ADMIN_TOKEN}")]


def write_keys(path: Path, entries: list[dict[str, object]]) -> Path:
    """A keys file holding ``entries``, replaced at once (as an operator should: a new file
    renamed into place), so a process re-reading it never sees it half written."""
    fd, aside = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            yaml.safe_dump({"keys": entries}, handle)
        os.replace(aside, path)
    finally:
        Path(aside).unlink(missing_ok=True)  # left only when the write failed
    return path


def secret_file(path: Path, text: str) -> Path:
    """``text`` in a file only its owner may read (mode 0600), as a key file must be."""
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def wait_until(
    check: Callable[[], bool], what: str = "the condition", timeout_s: float = 60.0
) -> None:
    """Poll ``check`` until it holds; fail, naming ``what``, after ``timeout_s`` (a bound on a
    process that has stopped making progress, not a timing)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
