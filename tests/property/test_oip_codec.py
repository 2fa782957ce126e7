"""The native ModelInferRequest decoder agrees with the protobuf path: oip_codec_parity.py,
run in a child pytest without this suite's conftest (its twin needs the gateway's generated
``inference`` messages, which cannot share a process with tritonclient's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PARITY = Path(__file__).with_name("oip_codec_parity.py")


def test_native_decoder_answers_as_protobuf_does():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--noconftest", "-q", "-p", "no:cacheprovider", PARITY],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]
