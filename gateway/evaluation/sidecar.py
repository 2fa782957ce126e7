"""``gateway sidecar --store DIR``: the evaluation sidecar process."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import grpc

from gateway.api.v1 import events_pb2_grpc as ev_grpc
from gateway.evaluation.service import EvaluationServicer
from gateway.evaluation.store import EventStore
from gateway.evaluation.web import PageServer
from gateway.settings import EvaluationSettings

__all__ = ["run_sidecar"]

log = logging.getLogger(__name__)

_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
ALERT_LOG = "alerts.jsonl"


async def run_sidecar(
    store_dir: Path,
    host: str,
    port: int,
    settings: EvaluationSettings,
    repository: Path | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; then finish the batch in hand and close the store.

    ``repository`` is the model repository: its ``<model>/reference.json`` profiles are the
    drift references.
    """
    store = await asyncio.to_thread(
        EventStore, store_dir, settings.store_threads, settings.store_memory_limit_bytes
    )
    servicer = EvaluationServicer(store, settings, repository)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    ev_grpc.add_EvaluationServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    metrics = pages = "off"
    if settings.metrics_port is not None:
        metrics = f"{host}:{servicer.metrics.serve(host, settings.metrics_port)}"
    web = None
    if settings.http_port is not None:
        web = PageServer(servicer, host, settings.http_port)
        pages = f"{host}:{web.port}"
    watch = asyncio.get_running_loop().create_task(servicer.watch(store_dir / ALERT_LOG))
    log.info(
        "sidecar ready grpc=%s:%d metrics=%s http=%s store=%s",
        host,
        bound,
        metrics,
        pages,
        store.path,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    watch.cancel()
    if web is not None:
        web.close()
    await server.stop(5)
    await asyncio.to_thread(servicer.close)
    log.info("sidecar stopped: %d events stored this run", servicer.stored)
