"""What a newcomer meets first, through the demo as ``make serve`` runs it (its settings: route
``fraud-live``, the admin token) and the command line as they type it: perf_analyzer's input
data, ``gateway routes`` and ``routes --set``, a version pinned on a route, ``gateway report``
on a misspelt model, output piped into ``head``, and the priority through tritonclient."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from tritonclient.utils import InferenceServerException

from gateway.demo import PERF_ANALYZER_DATA
from tests.conftest import DEMO_WIDTH, GatewayProcess, demo_input, free_port, serving

pytestmark = pytest.mark.integration

NUMPY_TYPES = {"FP32": np.float32, "INT64": np.int64}
PERF_ANALYZER = os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")


@pytest.fixture(scope="module")
def demo_gateway(
    demo_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """The demo with its own settings (as ``make serve`` runs it), and HTTP beside gRPC."""
    config = str(demo_repo / "gateway.yaml")
    workdir = tmp_path_factory.mktemp("demo-gateway")
    yield from serving(demo_repo, workdir, "--config", config, "--http-port", "0")


@pytest.fixture(scope="module")
def token(demo_repo: Path) -> str:
    return (demo_repo / "admin.token").read_text().strip()


def gateway_cli(
    *args: str, token: str | None = None, stdout: int = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    """``python -m gateway <args>``, with the admin key in its environment when given."""
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_ADMIN_TOKEN"}
    if token is not None:
        env["GATEWAY_ADMIN_TOKEN"] = token
    command = [sys.executable, "-m", "gateway", *args]
    return subprocess.run(
        command, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, timeout=120
    )


def failed_in_one_line(done: subprocess.CompletedProcess[str], code: int) -> bool:
    return (
        done.returncode == code
        and done.stdout == ""
        and len(done.stderr.strip().splitlines()) == 1
        and done.stderr.startswith("gateway: error: ")
    )


def perf_analyzer_inputs(step: dict, datatypes: dict[str, str]) -> list[triton_grpc.InferInput]:
    """One perf_analyzer step as the tritonclient inputs perf_analyzer sends: batch 1."""
    inputs = []
    for name, tensor in step.items():
        shape = [1, *tensor["shape"]]
        datatype = datatypes[name]
        if datatype == "BYTES":
            array = np.array([v.encode() for v in tensor["content"]], dtype=object)
        else:
            array = np.array(tensor["content"], dtype=NUMPY_TYPES[datatype])
        column = triton_grpc.InferInput(name, shape, datatype)
        column.set_data_from_numpy(array.reshape(shape))
        inputs.append(column)
    return inputs


def test_every_row_of_the_demos_perf_analyzer_data_is_served(demo_gateway, demo_repo):
    """perf_analyzer's default random data breaks the contract (an hour of -1e18); the rows
    the demo writes for its ``--input-data`` are all valid, as perf_analyzer sends them."""
    data = json.loads((demo_repo / PERF_ANALYZER_DATA).read_text())["data"]
    with demo_gateway.client() as client:
        metadata = client.get_model_metadata("fraud", as_json=True)
        datatypes = {tensor["name"]: tensor["datatype"] for tensor in metadata["inputs"]}
        assert len(data) == 256
        for step in data:
            assert set(step) == set(datatypes)  # perf_analyzer needs every input
            result = client.infer("fraud", perf_analyzer_inputs(step, datatypes))
            assert result.as_numpy("probability").shape == (1, 1)


@pytest.mark.skipif(PERF_ANALYZER is None, reason="perf_analyzer: set PERF_ANALYZER or PATH")
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_runs_on_the_demo_with_its_input_data(demo_gateway, demo_repo, protocol):
    """The README's command, shortened: a model with a contract, its rows from the file."""
    assert PERF_ANALYZER is not None
    url = demo_gateway.url if protocol == "grpc" else demo_gateway.http_url
    command = [PERF_ANALYZER, "-m", "fraud", "-i", protocol, "-u", url]
    command += ["--input-data", str(demo_repo / PERF_ANALYZER_DATA), "--concurrency-range", "4"]
    command += ["--measurement-interval", "500", "--stability-percentage", "100"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "error" not in output.lower() and "Concurrency: 4, throughput" in output


def test_routes_prints_the_generation_and_each_routes_revision(demo_gateway, token):
    from gateway.server.admin_client import AdminClient

    with AdminClient(demo_gateway.url, token) as admin:
        table = admin.routes()
    done = gateway_cli("routes", "--url", demo_gateway.url, token=token)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"# generation {table.generation}"
    assert f"# fraud-live: revision {table.revisions['fraud-live']}" in lines
    assert "fraud-live" in yaml.safe_load(done.stdout)


def test_routes_set_takes_a_settings_file_or_a_mapping_of_routes(
    demo_gateway, demo_repo, token, tmp_path
):
    url = ("--url", demo_gateway.url)
    settings = demo_repo / "gateway.yaml"
    done = gateway_cli("routes", *url, "--set", str(settings), token=token)
    assert done.returncode == 0, done.stderr
    assert "fraud-live" in yaml.safe_load(done.stdout)
    note = f"gateway: note: {settings}: only routing.routes is sent; routing.rate_limits, costs"
    assert done.stderr.startswith(note)

    printed = gateway_cli("routes", *url, token=token).stdout  # edited, then set again
    routes = yaml.safe_load(printed)
    for variant in routes["fraud-live"]["variants"]:
        if variant["name"] == "canary":
            variant["weight"] = 20
    edited = tmp_path / "routes.yaml"
    comments = [line for line in printed.splitlines(keepends=True) if line.startswith("#")]
    edited.write_text("".join(comments) + yaml.safe_dump(routes))
    done = gateway_cli("routes", *url, "--set", str(edited), token=token)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    weights = {
        v["name"]: v.get("weight") for v in yaml.safe_load(done.stdout)["fraud-live"]["variants"]
    }
    assert weights["canary"] == 20
    revision = [line for line in done.stdout.splitlines() if line.startswith("# fraud-live:")]
    assert revision != [line for line in printed.splitlines() if line.startswith("# fraud-live:")]

    listed = tmp_path / "list.yaml"
    listed.write_text("- fraud-live\n")
    done = gateway_cli("routes", *url, "--set", str(listed), token=token)
    assert failed_in_one_line(done, 2), done.stderr
    assert f"{listed}: a YAML list, not a mapping of routes" in done.stderr
    assert gateway_cli("routes", *url, "--set", str(settings), token=token).returncode == 0


def test_a_version_pinned_on_a_route_says_routes_have_no_versions(demo_gateway):
    with demo_gateway.client() as client:
        assert client.infer("fraud", [demo_input()], model_version="2")  # the model: pinned
        assert client.infer("fraud-live", [demo_input()])  # the route: no version
        with pytest.raises(InferenceServerException) as info:
            client.infer("fraud-live", [demo_input()], model_version="2")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    message = info.value.message()
    assert "'fraud-live' is a route, and routes have no versions" in message
    assert "model 'fraud' with version '2'" in message
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, DEMO_WIDTH]}]}
    body["inputs"][0]["data"] = [0.0] * DEMO_WIDTH
    request = urllib.request.Request(
        f"http://{demo_gateway.http_url}/v2/models/fraud-live/versions/2/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(request, timeout=30)
    assert http.value.code == 404
    assert "routes have no versions" in json.loads(http.value.read())["error"]


def test_report_on_a_model_the_sidecar_knows_nothing_of_fails_in_one_line(
    demo_repo, start_sidecar, tmp_path
):
    sidecar = start_sidecar(tmp_path / "store", free_port(), "--repository", str(demo_repo))
    where = ("--sidecar", sidecar.address)
    for extra in ((), ("--json",)):
        done = gateway_cli("report", "nosuchmodel", *where, *extra)
        assert failed_in_one_line(done, 1), (done.stdout, done.stderr)
        assert "nothing on model 'nosuchmodel'" in done.stderr
    known = gateway_cli("report", "fraud", *where)  # no events yet, but a reference profile
    assert known.returncode == 0, known.stderr
    assert known.stdout.startswith("fraud: ")


@pytest.mark.parametrize("command", ["routes", "demo-repo"])
def test_output_into_a_pipe_its_reader_closed_ends_quietly(demo_gateway, token, tmp_path, command):
    """``gateway routes | head -1``: no BrokenPipeError traceback, and the status of a writer
    SIGPIPE ended (128 + 13)."""
    args = ["--url", demo_gateway.url] if command == "routes" else [str(tmp_path), "--rows", "500"]
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = gateway_cli(command, *args, token=token, stdout=writer)
    finally:
        os.close(writer)
    assert (done.returncode, done.stderr) == (141, "")


def test_tritonclient_sends_the_priority_as_its_own_keyword(demo_gateway):
    """tritonclient refuses ``priority`` among ``parameters`` (reserved) and sends its
    ``priority=`` keyword as that request parameter, which the gateway reads."""
    with demo_gateway.client() as client:
        assert client.infer("fraud", [demo_input()], priority=1)
        with pytest.raises(InferenceServerException, match="reserved"):
            client.infer("fraud", [demo_input()], parameters={"priority": 1})
        with pytest.raises(InferenceServerException, match="'priority'") as info:
            client.infer("fraud", [demo_input()], priority=99)  # past queue.priority_levels
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
