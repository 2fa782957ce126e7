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
_ATTEMPTS = 3  # compare-and-set tries of a change that asked for no generation


class RouteStore(Protocol):
    shared: bool

    async def change(self, mutate: Callable[[RouteTable], T], expected_generation: int) -> T: ...


class LocalRoutes:
    """This process's table, changed in place."""

    shared = False

    def __init__(self, table: RouteTable) -> None:
        self._table = table

    async def change(self, mutate: Callable[[RouteTable], T], expected_generation: int) -> T:
        self._table.expect(expected_generation)
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
            await self._follow(at_start=True)
        except StateUnavailable as err:
            self._on_error()
            log.warning("routes: the shared table cannot be read (%s); serving the settings'", err)
        self._watcher = asyncio.create_task(self._watch())

    async def _follow(self, at_start: bool = False) -> None:
        """Adopt the shared table when it is newer than this one (at start: whatever it is,
        since every process starts its own at generation 1)."""
        document = await self._shared.read()
        if document is None:
            if await self._shared.write(0, self._table.document()):
                log.info("routes: this replica's table is now the shared one")
                return
            document = await self._shared.read()
        if document is None:
            return
        generation = int(document["generation"])
        if at_start or generation > self._table.generation:
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

    async def change(self, mutate: Callable[[RouteTable], T], expected_generation: int) -> T:
        """``mutate`` applied to the latest shared table and written back by compare-and-set.
        With ``expected_generation`` 0 a conflict with another replica's change is retried
        (on the newer table) a few times; otherwise it is RevisionConflict."""
        for attempt in range(_ATTEMPTS):
            draft, result, written = await self._attempt(mutate, expected_generation)
            if written:
                if draft.generation > self._table.generation:  # not overtaken meanwhile
                    self._table.adopt(draft.document())
                return result
            if expected_generation or attempt == _ATTEMPTS - 1:
                raise RevisionConflict(
                    f"another replica changed the routes while this change was made (from "
                    f"generation {draft.generation - 1}): read them again, then retry"
                )
        raise AssertionError("unreachable")

    async def _attempt(
        self, mutate: Callable[[RouteTable], T], expected_generation: int
    ) -> tuple[RouteTable, T, bool]:
        try:
            await self._follow()  # the latest first: another replica may have changed it
        except StateUnavailable as err:
            self._on_error()
            raise SharedStateDown(
                f"the routes are kept in Redis, which does not answer ({err}): nothing changed"
            ) from None
        self._table.expect(expected_generation)
        draft = RouteTable({}, self._history)
        draft.adopt(self._table.document())
        base = draft.generation
        result = mutate(draft)
        try:
            written = await self._shared.write(base, draft.document())
        except StateUnavailable as err:
            self._on_error()
            raise SharedStateDown(
                f"Redis did not confirm the change ({err}): it may or may not have been made; "
                "read the routes before trying again"
            ) from None
        return draft, result, written

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
