"""``gateway sidecar --store DIR``: the evaluation sidecar process, with its own auth
(``evaluation.auth``) and TLS (``evaluation.tls``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import grpc

from gateway.api.v1 import events_pb2_grpc as ev_grpc
from gateway.auth import server_credentials
from gateway.errors import SettingsError
from gateway.evaluation.access import AccessInterceptor
from gateway.evaluation.consumer import BrokerConsumer
from gateway.evaluation.metrics import SidecarMetrics
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
    auth, tls = settings.auth, settings.tls
    if auth.mode != "none" and settings.http_port is not None:
        raise SettingsError(
            f"evaluation.http_port: the HTML report pages have no credentials; with "
            f"evaluation.auth.mode {auth.mode} they would show anyone what Report guards. "
            "Leave http_port unset (`gateway report` reads reports with a key)"
        )
    # Credentials first: a bad keys or certificate file fails before the store opens.
    credentials = server_credentials(tls, "evaluation.tls") if tls.enabled else None
    metrics = SidecarMetrics()
    access = AccessInterceptor(auth, metrics)
    store = await asyncio.to_thread(
        EventStore, store_dir, settings.store_threads, settings.store_memory_limit_bytes
    )
    servicer = EvaluationServicer(store, settings, repository, metrics)
    server = grpc.aio.server(
        interceptors=[access],
        options=[
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    ev_grpc.add_EvaluationServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    address = f"{host}:{port}"
    if credentials is not None:
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    await server.start()
    if auth.mode == "none":
        log.warning(
            "evaluation.auth.mode is none: anyone who reaches %s:%d may publish events, send "
            "labels and read reports (set evaluation.auth.mode api_key or mtls)",
            host,
            bound,
        )
    elif not tls.enabled:
        log.warning(
            "evaluation.tls is off: keys and events cross the network in clear to %s:%d "
            "(set evaluation.tls.cert_file and key_file)",
            host,
            bound,
        )
    scrape = pages = "off"
    if settings.metrics_port is not None:
        scrape = f"{host}:{metrics.serve(host, settings.metrics_port)}"
    web = None
    if settings.http_port is not None:
        web = PageServer(servicer, host, settings.http_port)
        pages = f"{host}:{web.port}"
    watch = asyncio.get_running_loop().create_task(servicer.watch(store_dir / ALERT_LOG))
    consuming = "off"
    consumer: asyncio.Task[None] | None = None
    if settings.broker is not None:
        broker = BrokerConsumer(servicer, settings.broker, store_dir)
        consumer = asyncio.get_running_loop().create_task(broker.run(), name="broker")
        consuming = f"{settings.broker.address}:{','.join(broker.keys)}"
    log.info(
        "sidecar ready grpc=%s:%d metrics=%s http=%s store=%s auth=%s tls=%s broker=%s",
        host,
        bound,
        scrape,
        pages,
        store.path,
        auth.mode,
        "mtls" if tls.client_ca_file is not None else "on" if tls.enabled else "off",
        consuming,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    watch.cancel()
    if consumer is not None:  # what it read and did not store is read again at the next start
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
    if web is not None:
        web.close()
    await server.stop(5)
    await asyncio.to_thread(servicer.close)
    log.info("sidecar stopped: %d events stored this run", servicer.stored)
