"""SIGTERM drains: no new work is accepted, requests in flight finish, the process exits 0."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from tests.models import write_slow_model

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_in_flight_requests_finish_on_shutdown(tmp_path: Path, start_gateway, sig: int):
    write_slow_model(tmp_path / "repo" / "slow")
    proc = start_gateway(tmp_path / "repo")
    x = np.ones((256, 512), np.float32)

    def one(_: int) -> tuple[int, ...]:
        client = triton_grpc.InferenceServerClient(proc.url)
        inp = triton_grpc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        shape = client.infer("slow", [inp], client_timeout=60).as_numpy("y").shape
        client.close()
        return shape

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(8)]
        # Signal only once the server holds all eight (each takes a while on two threads).
        proc.wait_in_flight(8, timeout_s=90)  # 4 MB of requests: slow on a loaded host
        proc.process.send_signal(sig)
        assert not any(f.done() for f in futures), "requests finished before the signal"
        shapes = [f.result(timeout=60) for f in futures]
    assert shapes == [(256, 512)] * 8
    assert proc.process.wait(30) == 0
    log = proc.stderr()
    assert "draining" in log and "gateway stopped" in log
    with grpc.insecure_channel(proc.url) as channel, pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(channel).result(timeout=1)
