"""The sidecar's gRPC service: event batches in (acknowledged once stored), labels, reports."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from gateway.api.v1 import events_pb2 as ev
from gateway.api.v1 import events_pb2_grpc as ev_grpc
from gateway.evaluation.store import EventStore

__all__ = ["EvaluationServicer"]

log = logging.getLogger(__name__)


class EvaluationServicer(ev_grpc.EvaluationServiceServicer):
    def __init__(self, store: EventStore) -> None:
        self.store = store
        # DuckDB work happens on one thread: off the loop, and one writer at a time.
        self.db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self.stored = 0
        self.duplicates = 0

    async def Publish(
        self, request_iterator: AsyncIterator[ev.EventBatch], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ev.Ack]:
        loop = asyncio.get_running_loop()
        async for batch in request_iterator:
            arrival_us = time.time_ns() // 1000
            stored, duplicates = await loop.run_in_executor(
                self.db, self.store.ingest, batch.events, arrival_us
            )
            self.stored += stored
            self.duplicates += duplicates
            if duplicates:
                log.info("batch %d: %d events already held (a resend)", batch.sequence, duplicates)
            yield ev.Ack(sequence=batch.sequence, stored=stored, duplicates=duplicates)

    def close(self) -> None:
        self.db.submit(self.store.close).result()
        self.db.shutdown(wait=True)
