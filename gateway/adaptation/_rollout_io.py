"""What a rollout controller talks to: where its records persist (a JSON file beside the
gateway, Redis, or nowhere), which replica drives each rollout (a lease in Redis, and the
commands other replicas leave it), and the sidecar whose Verdict RPC judges each step."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, Protocol

import grpc

from gateway.api.v1 import events_pb2 as ev
from gateway.api.v1 import events_pb2_grpc as ev_grpc
from gateway.auth import bearer_metadata, channel_credentials, channel_options
from gateway.settings import RolloutSettings
from gateway.state import RedisState

__all__ = [
    "FileRollouts",
    "MemoryRollouts",
    "RedisRollouts",
    "RolloutLeases",
    "RolloutRecords",
    "SidecarVerdicts",
    "VerdictSource",
    "VerdictUnavailable",
]

Records = dict[str, dict[str, Any]]  # route -> its rollout, as JSON-able data


class RolloutRecords(Protocol):
    """Where the rollouts live between restarts: one record per route."""

    where: str

    async def load(self) -> Records: ...

    async def load_one(self, route: str) -> dict[str, Any] | None: ...

    async def save(self, route: str, record: dict[str, Any]) -> None: ...


class MemoryRollouts:
    """This process only (adaptation.rollout.state_file null): a restart forgets them."""

    where = "memory (not persisted)"

    def __init__(self) -> None:
        self._records: Records = {}

    async def load(self) -> Records:
        return json.loads(json.dumps(self._records))  # type: ignore[no-any-return]

    async def load_one(self, route: str) -> dict[str, Any] | None:
        record = self._records.get(route)
        return None if record is None else json.loads(json.dumps(record))

    async def save(self, route: str, record: dict[str, Any]) -> None:
        self._records[route] = json.loads(json.dumps(record))


class FileRollouts:
    """A JSON file of this gateway's, replaced whole (written aside, then renamed) at every
    change."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self.where = str(path)
        self._records: Records | None = None

    async def load(self) -> Records:
        self._records = await asyncio.to_thread(self._read)
        return json.loads(json.dumps(self._records))  # type: ignore[no-any-return]

    async def load_one(self, route: str) -> dict[str, Any] | None:
        return (await self.load()).get(route)

    def _read(self) -> Records:
        try:
            document = json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}
        return dict(document.get("rollouts", {}))

    async def save(self, route: str, record: dict[str, Any]) -> None:
        if self._records is None:
            self._records = await asyncio.to_thread(self._read)
        self._records[route] = json.loads(json.dumps(record))
        await asyncio.to_thread(self._write, self._records)

    def _write(self, records: Records) -> None:
        aside = self._path.with_name(self._path.name + ".partial")
        with aside.open("w") as handle:
            json.dump({"rollouts": records}, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())  # a SIGKILL right after must find the step taken
        aside.replace(self._path)


class RedisRollouts:
    """A hash in Redis (``<key_prefix>rollout-records``, a field per route) beside the shared
    routes: each route's record is written by the replica driving it alone."""

    def __init__(self, state: RedisState) -> None:
        self._state = state
        self._key = f"{state.settings.key_prefix}rollout-records"
        self.where = f"redis at {state.where()} ({self._key})"
        self._migrated = False  # the old document looked for (once per process)

    async def load(self) -> Records:
        raw = await self._state.call(self._state.client.hgetall(self._key))
        assert isinstance(raw, dict)
        if not raw and not self._migrated:
            records = await self._migrate()
            self._migrated = True
            return records
        self._migrated = True  # records in the hash: the old document is not looked at
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    async def load_one(self, route: str) -> dict[str, Any] | None:
        if not self._migrated:
            return (await self.load()).get(route)
        raw = await self._state.call(self._state.client.hget(self._key, route))
        return None if raw is None else json.loads(raw)  # type: ignore[arg-type]

    async def _migrate(self) -> Records:
        """The records as the gateway before wrote them (one document, ``<key_prefix>
        rollouts``): moved into the hash, so a rollout under way at the upgrade goes on."""
        before = f"{self._state.settings.key_prefix}rollouts"
        old = await self._state.call(self._state.client.get(before))
        if old is None:
            return {}
        records = dict(json.loads(old))  # type: ignore[arg-type]
        for route, record in records.items():
            await self.save(route, record)
        await self._state.call(self._state.client.delete(before))
        return records

    async def save(self, route: str, record: dict[str, Any]) -> None:
        await self._state.call(self._state.client.hset(self._key, route, json.dumps(record)))


# Take or renew the lease: this replica holds it, or nobody does.
_HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_TAKE = """
local commands = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
return commands
"""
_MAX_COMMANDS = 16  # waiting per route: each is a person's or a playbook's call
_COMMANDS_TTL_MS = 3_600_000


class RolloutLeases:
    """With several replicas on one Redis, one drives each rollout: the holder of the route's
    lease (``<key_prefix>rollout-lease:<route>``, ``ttl_s``, renewed as it goes). A replica
    that dies lets its lease lapse and another takes the rollout over; a command given to a
    replica that does not drive it is left for the one that does
    (``<key_prefix>rollout-commands:<route>``, a list of at most ``_MAX_COMMANDS``)."""

    def __init__(self, state: RedisState, ttl_s: float) -> None:
        self._state = state
        self.owner = state.replica
        self._ttl_ms = max(1, int(ttl_s * 1000))
        prefix = state.settings.key_prefix
        self._lease = f"{prefix}rollout-lease:"
        self._commands = f"{prefix}rollout-commands:"
        self._hold = state.client.register_script(_HOLD)
        self._release = state.client.register_script(_RELEASE)
        self._take = state.client.register_script(_TAKE)

    async def hold(self, route: str) -> bool:
        """Take the route's lease, or renew it: True while this replica holds it."""
        args: list[str | int] = [self.owner, self._ttl_ms]
        return bool(await self._state.call(self._hold(keys=[self._lease + route], args=args)))

    async def release(self, route: str) -> None:
        await self._state.call(self._release(keys=[self._lease + route], args=[self.owner]))

    async def post(self, route: str, command: dict[str, Any]) -> None:
        """Leave ``command`` for the replica driving the route, after any already waiting."""
        key = self._commands + route
        pipe = self._state.client.pipeline(transaction=True)
        _ = pipe.rpush(key, json.dumps(command))  # queued: the pipeline returns itself
        _ = pipe.ltrim(key, -_MAX_COMMANDS, -1)
        _ = pipe.pexpire(key, _COMMANDS_TTL_MS)
        await self._state.call(pipe.execute())

    async def take(self, route: str) -> list[dict[str, Any]]:
        """The commands left for this route, oldest first, once (removed as they are read)."""
        raw = await self._state.call(self._take(keys=[self._commands + route], args=[]))
        return [dict(json.loads(item)) for item in raw or []]  # type: ignore[attr-defined]

    async def clear(self, route: str) -> None:
        """Drop what was left for the route (a new rollout starts on it)."""
        await self._state.call(self._state.client.delete(self._commands + route))


class VerdictUnavailable(Exception):
    """No verdict this time: the sidecar did not answer, refused, or has no canary policy."""


class VerdictSource(Protocol):
    async def verdict(self, model: str, candidate: str, since_us: int = 0) -> dict[str, Any]: ...


class SidecarVerdicts:
    """The sidecar's Verdict RPC (its JSON: verdict, reasons, criteria, evidence)."""

    def __init__(self, address: str, settings: RolloutSettings) -> None:
        self.address = address
        self._settings = settings
        self._metadata = bearer_metadata(settings.resolve_token(), "adaptation.rollout.token")
        if settings.tls.enabled:  # bad files fail at start-up
            channel_credentials(settings.tls, "adaptation.rollout.tls")
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> ev_grpc.EvaluationServiceStub:
        if self._channel is None:
            tls = self._settings.tls
            if tls.enabled:
                self._channel = grpc.aio.secure_channel(
                    self.address,
                    channel_credentials(tls, "adaptation.rollout.tls"),
                    options=channel_options(tls),
                )
            else:
                self._channel = grpc.aio.insecure_channel(self.address)
        return ev_grpc.EvaluationServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def verdict(self, model: str, candidate: str, since_us: int = 0) -> dict[str, Any]:
        try:
            reply = await self._stub().Verdict(
                ev.VerdictRequest(model=model, candidate=candidate, since_us=since_us),
                timeout=self._settings.verdict_timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as err:
            raise VerdictUnavailable(
                f"the sidecar at {self.address}: {err.code().name}: {err.details()}"
            ) from None
        return dict(json.loads(reply.json))

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
