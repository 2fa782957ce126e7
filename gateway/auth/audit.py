"""The audit log: every admin action (who, what, outcome, state before and after) as one JSON
line, in a file bounded by rotation (``audit.max_bytes`` x ``audit.backups + 1``), and
counted (``gateway_admin_actions_total``).

Refused attempts are actions too, but anyone who reaches the port can make them: they are
written at most once a second per (actor, RPC), the line saying how many were refused since
the last one written (``refused_since``), so a flood of them can neither rotate the real
actions out of the log nor hold the event loop on file writes. Each is still counted."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cachetools import LRUCache

from gateway.errors import SettingsError
from gateway.settings import AuditSettings

__all__ = ["AuditLog"]

log = logging.getLogger(__name__)

_MAX_FIELD_CHARS = 2048  # a client-supplied value (a model name, a route's YAML) is cut here
_REFUSED_EVERY_S = 1.0
_MAX_REFUSERS = 1024  # (actor, RPC) pairs whose refusals are being held back


def _bounded(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _MAX_FIELD_CHARS:
        return value[:_MAX_FIELD_CHARS] + " [...]"
    if isinstance(value, dict):
        return {str(k)[:_MAX_FIELD_CHARS]: _bounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_bounded(v) for v in value]
    return value


class AuditLog:
    def __init__(
        self,
        settings: AuditSettings,
        count: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._count = count
        self._clock = clock
        self._logger: logging.Logger | None = None
        # (actor, rpc) -> [when its last refusal was written, refusals since]
        self._refusals: LRUCache[tuple[str, str], list[float]] = LRUCache(_MAX_REFUSERS)
        if settings.path is not None:
            _check_writable(settings.path)
            handler = logging.handlers.RotatingFileHandler(
                settings.path,
                maxBytes=settings.max_bytes,
                backupCount=settings.backups,
                encoding="utf-8",
                delay=True,  # no file until there is a line to write
            )
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger = logging.getLogger(f"gateway.audit.{id(self)}")
            logger.propagate = False
            logger.setLevel(logging.INFO)
            logger.addHandler(handler)
            self._logger = logger

    def record(
        self,
        actor: str,
        rpc: str,
        outcome: str,
        target: str = "",
        before: Any = None,
        after: Any = None,
        peer: str = "",
        detail: str = "",
        refused_since: int = 0,
    ) -> None:
        """One action: ``actor`` (the credential's name, never the credential) did ``rpc`` on
        ``target`` with ``outcome`` (a gRPC status name)."""
        if self._count is not None:
            self._count(rpc, outcome)
        if self._logger is None:
            return
        line = {
            "ts": round(self._clock(), 3),
            "actor": actor,
            "peer": peer,
            "rpc": rpc,
            "target": target,
            "outcome": outcome,
            "before": before,
            "after": after,
        }
        if detail:
            line["detail"] = detail
        if refused_since:
            line["refused_since"] = refused_since
        try:
            self._logger.info(json.dumps(_bounded(line), default=str))
        except Exception:  # an audit line that cannot be written must not fail the action
            log.exception("audit log: cannot write")

    def refused(self, actor: str, rpc: str, outcome: str, peer: str) -> None:
        """A refused call of an RPC needing admin rights: counted, and written at most once a
        second per (actor, RPC)."""
        now = self._clock()
        held = self._refusals.get((actor, rpc))
        if held is not None and now - held[0] < _REFUSED_EVERY_S:
            held[1] += 1
            if self._count is not None:
                self._count(rpc, outcome)
            return
        since = int(held[1]) if held is not None else 0
        self._refusals[(actor, rpc)] = [now, 0.0]
        self.record(actor, rpc, outcome, peer=peer, refused_since=since)

    def close(self) -> None:
        if self._logger is not None:
            for handler in list(self._logger.handlers):
                handler.close()
                self._logger.removeHandler(handler)


def _check_writable(path: Path) -> None:
    """SettingsError naming ``audit.path`` unless its file can be written (checked at start:
    the file itself is made at the first line)."""
    directory = path.parent if str(path.parent) else Path(".")
    target = path if path.exists() else directory
    if not directory.is_dir() or not os.access(target, os.W_OK):
        raise SettingsError(
            f"audit.path: cannot write {path} (is {directory} a writable directory?)"
        )
