"""What a rollout controller talks to: where its records persist (a JSON file beside the
gateway, Redis, or nowhere) and the sidecar whose Verdict RPC judges each step."""

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
    "RolloutRecords",
    "SidecarVerdicts",
    "VerdictSource",
    "VerdictUnavailable",
]

Records = dict[str, dict[str, Any]]  # route -> its rollout, as JSON-able data


class RolloutRecords(Protocol):
    """Where the rollouts live between restarts."""

    where: str

    async def load(self) -> Records: ...

    async def save(self, records: Records) -> None: ...


class MemoryRollouts:
    """This process only (adaptation.rollout.state_file null): a restart forgets them."""

    where = "memory (not persisted)"

    def __init__(self) -> None:
        self._records: Records = {}

    async def load(self) -> Records:
        return json.loads(json.dumps(self._records))  # type: ignore[no-any-return]

    async def save(self, records: Records) -> None:
        self._records = json.loads(json.dumps(records))


class FileRollouts:
    """A JSON file, replaced whole (written aside, then renamed) at every change."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self.where = str(path)

    async def load(self) -> Records:
        return await asyncio.to_thread(self._read)

    def _read(self) -> Records:
        try:
            document = json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}
        return dict(document.get("rollouts", {}))

    async def save(self, records: Records) -> None:
        await asyncio.to_thread(self._write, records)

    def _write(self, records: Records) -> None:
        aside = self._path.with_name(self._path.name + ".partial")
        with aside.open("w") as handle:
            json.dump({"rollouts": records}, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())  # a SIGKILL right after must find the step taken
        aside.replace(self._path)


class RedisRollouts:
    """One JSON document in Redis (``<key_prefix>rollouts``), beside the shared routes."""

    def __init__(self, state: RedisState) -> None:
        self._state = state
        self._key = f"{state.settings.key_prefix}rollouts"
        self.where = f"redis at {state.where()} ({self._key})"

    async def load(self) -> Records:
        raw = await self._state.call(self._state.client.get(self._key))
        return {} if raw is None else dict(json.loads(raw))  # type: ignore[arg-type]

    async def save(self, records: Records) -> None:
        await self._state.call(self._state.client.set(self._key, json.dumps(records)))


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
