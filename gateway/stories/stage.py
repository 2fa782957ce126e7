"""The stage a story runs on: the demo repository, a real sidecar and a real gateway, each its
own process on a free loopback port, stopped when the story ends (however it ends).

Requests go over gRPC as any OIP client sends them (raw contents, request parameters for
segments, tenant and surface), built with the gateway's own protobuf messages.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml

from gateway.api.v1 import events_pb2 as ev
from gateway.api.v1 import inference_pb2 as pb
from gateway.demo import build_demo_repository
from gateway.errors import SettingsError
from gateway.evaluation.client import send_labels
from gateway.lifeline import Lifeline

__all__ = ["Stage", "label_all", "wait_for"]

_GATEWAY_READY = re.compile(r"gateway ready grpc=(\S+) metrics=(\S+)")
_SIDECAR_READY = re.compile(r"sidecar ready grpc=(\S+) metrics=(\S+) http=(\S+)")
_START_S = 90.0
_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Stage:
    """``with Stage(work, gateway=..., sidecar=...) as stage:`` the demo, served and judged."""

    def __init__(
        self,
        work: Path,
        *,
        gateway: Mapping[str, Any] | None = None,
        evaluation: Mapping[str, Any] | None = None,
    ) -> None:
        self.work = work
        self.repository = work / "repo"
        self._gateway_settings = dict(gateway or {})
        self._evaluation = dict(evaluation or {})
        self._processes: list[subprocess.Popen[bytes]] = []
        self.sidecar = ""
        self.gateway = ""
        self.report_url = ""
        self._channel: grpc.Channel | None = None
        # The children stop once this process is gone, however it ends (a story killed midway).
        self._lifeline = Lifeline()

    def __enter__(self) -> Stage:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        if not (self.repository / "fraud").exists():
            build_demo_repository(self.repository, seed=7, rows=4000)
        port = _free_port()
        sidecar_config = self.work / "sidecar.yaml"
        evaluation = {"metrics_port": 0, "http_port": 0, **self._evaluation}
        sidecar_config.write_text(yaml.safe_dump({"evaluation": evaluation}))
        ready = self._spawn(
            "sidecar",
            ["sidecar", "--store", str(self.work / "store"), "--port", str(port)],
            ["--repository", str(self.repository), "--config", str(sidecar_config)],
            pattern=_SIDECAR_READY,
        )
        self.sidecar = ready.group(1)
        self.report_url = f"http://{ready.group(3)}/report/fraud"
        gateway_config = self.work / "gateway.yaml"
        gateway_config.write_text(
            yaml.safe_dump({"audit": {"path": None}, **self._gateway_settings})
        )
        ready = self._spawn(
            "gateway",
            ["serve", "--repository", str(self.repository), "--port", "0"],
            [
                "--metrics-port",
                "0",
                "--config",
                str(gateway_config),
                "--sidecar",
                self.sidecar,
                "--events-dir",
                str(self.work / "events"),
            ],
            pattern=_GATEWAY_READY,
        )
        self.gateway = ready.group(1)
        self._lifeline.started()
        self._channel = grpc.insecure_channel(self.gateway)

    def _spawn(
        self, name: str, command: list[str], more: list[str], pattern: re.Pattern[str]
    ) -> Any:
        log_path = self.work / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "gateway", *command, *more],
                stdout=log,
                stderr=log,
                cwd=self.work,
                env=self._lifeline.env({**os.environ, "XDG_STATE_HOME": str(self.work / "state")}),
                pass_fds=(self._lifeline.fd,),
                start_new_session=True,
            )
        self._processes.append(process)
        deadline = time.monotonic() + _START_S
        while True:
            found = pattern.search(log_path.read_text(errors="replace"))
            if found:
                return found
            if process.poll() is not None or time.monotonic() > deadline:
                raise SettingsError(f"the story's {name} did not start; its log: {log_path}")
            time.sleep(0.05)

    def infer(
        self,
        model: str,
        columns: Mapping[str, np.ndarray],
        *,
        version: str = "",
        request_id: str = "",
        parameters: Mapping[str, str] | None = None,
    ) -> pb.ModelInferResponse:
        """One request of raw feature columns (BYTES for text), as an OIP client sends it."""
        message = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
        for key, value in (parameters or {}).items():
            message.parameters[key].string_param = value
        for name, values in columns.items():
            if values.dtype == object:
                encoded = [str(v).encode() for v in values]
                raw = b"".join(len(v).to_bytes(4, "little") + v for v in encoded)
                datatype = "BYTES"
            else:
                array = np.ascontiguousarray(values)
                kind = {"f": "FP", "i": "INT", "u": "UINT", "b": "BOOL"}[array.dtype.kind]
                datatype = "BOOL" if kind == "BOOL" else f"{kind}{array.dtype.itemsize * 8}"
                raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
            message.inputs.add(name=name, datatype=datatype, shape=[len(values)])
            message.raw_input_contents.append(raw)
        assert self._channel is not None
        call = self._channel.unary_unary(
            _MODEL_INFER,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        response: pb.ModelInferResponse = call(message, timeout=30)
        return response

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        for process in reversed(self._processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self._processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self._processes.clear()
        self._lifeline.close()


def wait_for(check: Any, what: str, timeout_s: float = 60.0) -> Any:
    """What ``check`` returns once it is something, polled; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the story never showed {what}")
        time.sleep(0.2)
    return found


def label_all(sidecar: str, labels: list[ev.Label], timeout_s: float = 60.0) -> None:
    """Labels join once their events are stored: send them until every one joins."""
    deadline = time.monotonic() + timeout_s
    while send_labels(sidecar, labels)[1]:
        if time.monotonic() > deadline:
            raise TimeoutError("the story's events never all reached the sidecar")
        time.sleep(0.2)
