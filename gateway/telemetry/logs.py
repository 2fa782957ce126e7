"""Logging set-up: one line per record on stderr, timestamps in UTC."""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["configure_logging"]


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
