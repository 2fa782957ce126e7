"""Undecodable request messages are counted and reported at most once per interval, on a clock
the test controls: a client sending garbage cannot flood the log."""

from __future__ import annotations

import logging

import pytest
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from gateway.errors import InvalidRequest
from gateway.server.codec import BadMessages


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bad_messages_are_reported_once_per_interval_with_their_count(caplog):
    clock = Clock()
    bad = BadMessages(interval_s=60.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="gateway.server.codec"):
        first = bad.note("ModelReady", "ModelReadyRequest", DecodeError("truncated"))
        for _ in range(9):
            bad.note("ModelInfer", "ModelInferRequest", DecodeError("truncated"))
        clock.now += 59.9
        bad.note("ModelInfer", "ModelInferRequest", DecodeError("truncated"))
        assert len(caplog.records) == 1  # the first, at once; the rest held back
        clock.now += 0.1
        bad.note("ModelMetadata", "ModelMetadataRequest", DecodeError("bad tag"))
    assert isinstance(first, InvalidRequest)
    assert str(first) == "request: not a valid ModelReadyRequest message (truncated)"
    reports = [r.getMessage() for r in caplog.records]
    assert len(reports) == 2
    assert "1 since the last report" in reports[0] and "on ModelReady" in reports[0]
    assert "11 since the last report" in reports[1]
    assert "on ModelMetadata" in reports[1] and "(bad tag)" in reports[1]
    assert bad.total == 12
    assert all(r.exc_info is None for r in caplog.records)  # never a traceback


@pytest.mark.parametrize("interval_s", [0.0, 1.0])
def test_a_bad_message_is_always_answered_invalid_argument(interval_s):
    bad = BadMessages(interval_s=interval_s, clock=Clock())
    err = bad.note("ModelInfer", "ModelInferRequest", DecodeError("x"))
    assert err.grpc_status.name == "INVALID_ARGUMENT"
