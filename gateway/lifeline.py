"""Child processes that never outlive the process that started them, however it ends.

The gateway starts children of its own: the workers of ``serve --workers N`` and the sidecar
of ``serve --with-sidecar``. A parent that is SIGKILLed runs no cleanup, so each child watches
its parent itself, through two independent signs, so that neither a missed signal nor a
platform without ``prctl`` leaves an orphan holding a port:

- a lifeline: a pipe whose write end only the parent holds; the child holds the read end and
  reads EOF once the parent is gone (any platform);
- the kernel's parent-death signal (Linux ``PR_SET_PDEATHSIG``).

Either one sends the child SIGTERM, so it stops the way it always does (drain, then exit). A
parent that died before the child looked is noticed too: the child then has another parent.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping

__all__ = ["PARENT_FD_ENV", "PARENT_PID_ENV", "Lifeline", "watch_parent"]

log = logging.getLogger(__name__)

# How a child knows its parent: its pid, and the read end of the lifeline pipe.
PARENT_PID_ENV = "GATEWAY_PARENT_PID"
PARENT_FD_ENV = "GATEWAY_PARENT_FD"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class Lifeline:
    """The parent's side: start children with ``env()`` and ``pass_fds=(lifeline.fd,)``, then
    ``started()``; ``close()`` when the children should stop (or let the process end)."""

    def __init__(self) -> None:
        # os.pipe's ends are not inherited: a child gets only what pass_fds names.
        self.fd, self._writer = os.pipe()

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        return {**base, PARENT_PID_ENV: str(os.getpid()), PARENT_FD_ENV: str(self.fd)}

    def started(self) -> None:
        """Every child has its read end: the parent's copy goes, so EOF means the parent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.started()
        if self._writer >= 0:
            os.close(self._writer)
            self._writer = -1


def watch_parent(what: str) -> None:
    """In a child started with a Lifeline, send this process SIGTERM once its parent is gone;
    a no-op in any other process. Call it first thing, before serving. ``what`` names the
    child in the log (``worker``, ``sidecar``)."""
    pid_text = os.environ.pop(PARENT_PID_ENV, None)
    fd_text = os.environ.pop(PARENT_FD_ENV, None)  # not for this process's own children
    if pid_text is None or fd_text is None:
        return
    parent, lifeline = int(pid_text), int(fd_text)
    os.set_inheritable(lifeline, False)
    if sys.platform.startswith("linux"):
        _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # gone before the line above took effect
        raise SystemExit(f"gateway {what}: the process that started it (pid {parent}) is gone")

    def watch() -> None:
        try:
            while os.read(lifeline, 1):  # the parent never writes: this waits for EOF
                pass
        except OSError as err:
            log.warning("lifeline unreadable (%s): taking the parent as gone", err)
        log.warning("the process that started this %s (pid %d) is gone: stopping", what, parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _set_parent_death_signal(sig: int) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits. The parent *thread*,
    strictly: the gateway starts its children from its main thread, which lives as long as
    the process does."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0) != 0
    except (OSError, AttributeError):  # no prctl here: the lifeline pipe is enough
        return
    if failed:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
