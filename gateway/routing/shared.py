"""Where route changes go: into this process's table (``LocalRoutes``, the embedded default),
or through the table the replicas share in Redis (``SharedRouteTable``), which every replica
follows: a change made on one is routed by all within about a second, and survives a restart
of every replica.

A change names the generation it was based on (0: whatever it is now); a table changed since
is RevisionConflict (FAILED_PRECONDITION), on one replica as across several.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol, TypeVar

from gateway.errors import RevisionConflict, SharedStateDown
from gateway.routing.table import RouteTable
from gateway.state import SharedRoutes, StateUnavailable

__all__ = ["LocalRoutes", "RouteStore", "SharedRouteTable"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_BACKSTOP_S = 1.0  # re-read at least this often, whatever the announcements
_RETRY_S = 1.0  # after Redis went away, listen again this much later


class RouteStore(Protocol):
    shared: bool

    async def change(self, mutate: Callable[[RouteTable], T], expected: int) -> T: ...


class LocalRoutes:
    """This process's table, changed in place."""

    shared = False

    def __init__(self, table: RouteTable) -> None:
        self._table = table

    async def change(self, mutate: Callable[[RouteTable], T], expected: int) -> T:
        self._table.expect(expected)
        return mutate(self._table)


class SharedRouteTable:
    """``table`` kept equal to the replicas' shared one; changes written through it."""

    shared = True

    def __init__(
        self, table: RouteTable, shared: SharedRoutes, history: int, on_error: Callable[[], None]
    ) -> None:
        self._table = table
        self._shared = shared
        self._history = history
        self._on_error = on_error
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Adopt the shared table, or offer this one as the first (the settings' routes);
        then follow it. Redis away at start: serve the settings' routes until it answers."""
        try:
            await self._follow()
        except StateUnavailable as err:
            self._on_error()
            log.warning("routes: the shared table cannot be read (%s); serving the settings'", err)
        self._watcher = asyncio.create_task(self._watch())

    async def _follow(self) -> None:
        document = await self._shared.read()
        if document is None:
            if await self._shared.write(0, self._table.document()):
                log.info("routes: this replica's table is now the shared one")
                return
            document = await self._shared.read()
        if document is not None and int(document["generation"]) != self._table.generation:
            changed = self._table.adopt(document)
            log.info(
                "routes: generation %d from the shared table; changed: %s",
                self._table.generation,
                ", ".join(changed) or "none",
            )

    async def _watch(self) -> None:
        while True:
            try:
                async for _ in self._shared.changes(_BACKSTOP_S):
                    await self._follow()
            except StateUnavailable:
                self._on_error()
            except Exception:  # the watch must go on: the routes would freeze without it
                log.exception("routes: following the shared table failed")
            await asyncio.sleep(_RETRY_S)

    async def change(self, mutate: Callable[[RouteTable], T], expected: int) -> T:
        try:
            await self._follow()  # the latest first: another replica may have changed it
            self._table.expect(expected)
            draft = RouteTable({}, self._history)
            draft.adopt(self._table.document())
            base = draft.generation
            result = mutate(draft)
            if not await self._shared.write(base, draft.document()):
                raise RevisionConflict(
                    f"another replica changed the routes while this change was made (from "
                    f"generation {base}): read them again, then retry"
                )
        except StateUnavailable as err:
            self._on_error()
            raise SharedStateDown(
                f"the routes are kept in Redis, which does not answer ({err}): nothing changed"
            ) from None
        self._table.adopt(draft.document())
        return result

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
