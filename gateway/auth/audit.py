"""The audit log: every admin action (who, what, outcome, state before and after) as one JSON
line, in a file bounded by rotation (``audit.max_bytes`` x ``audit.backups + 1``), and
counted (``gateway_admin_actions_total``). Refused attempts are actions too."""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from collections.abc import Callable
from typing import Any

from gateway.settings import AuditSettings

__all__ = ["AuditLog"]

log = logging.getLogger(__name__)

_MAX_FIELD_CHARS = 2048  # a client-supplied value (a model name, a route's YAML) is cut here


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
        if settings.path is not None:
            handler = logging.handlers.RotatingFileHandler(
                settings.path,
                maxBytes=settings.max_bytes,
                backupCount=settings.backups,
                encoding="utf-8",
            )
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger = logging.getLogger(f"gateway.audit.{id(self)}")
            logger.propagate = False
            logger.setLevel(logging.INFO)
            logger.addHandler(handler)
            self._logger = logger
            self.path = settings.path

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
        try:
            self._logger.info(json.dumps(_bounded(line), default=str))
        except Exception:  # an audit line that cannot be written must not fail the action
            log.exception("audit log: cannot write")

    def close(self) -> None:
        if self._logger is not None:
            for handler in list(self._logger.handlers):
                handler.close()
                self._logger.removeHandler(handler)
