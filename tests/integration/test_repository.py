"""Model repository over RPC: index with states and reasons, load and unload while serving."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from tritonclient.utils import InferenceServerException

from tests.auth import ADMIN_ENV, ADMIN_HEADERS
from tests.conftest import DEMO_WIDTH, GatewayProcess, demo_features

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """The demo gateway, with admin rights on the tests' token (load and unload need them)."""
    proc = GatewayProcess(demo_repo, tmp_path_factory.mktemp("gateway"), env=ADMIN_ENV)
    yield proc
    proc.stop()
    proc.kill_all()


def index(client) -> dict[tuple[str, str], tuple[str, str]]:
    entries = client.get_model_repository_index().models
    return {(m.name, m.version): (m.state, m.reason) for m in entries}


def infer(client, model: str = "fraud", version: str = "") -> np.ndarray:
    inp = triton_grpc.InferInput("features", [2, DEMO_WIDTH], "FP32")
    inp.set_data_from_numpy(demo_features(2))
    return client.infer(model, [inp], model_version=version).as_numpy("probability")


def status_of(err: InferenceServerException) -> str:
    return err.status().removeprefix("StatusCode.")


def test_broken_models_beside_a_healthy_one(repo_copy: Path, start_gateway):
    broken = repo_copy / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    badconfig = repo_copy / "badconfig"
    shutil.copytree(repo_copy / "fraud" / "1", badconfig / "1")
    (badconfig / "config.yaml").write_text("max_batch_size: 8\nmax_batchsize: 9\n")

    proc = start_gateway(repo_copy, env=ADMIN_ENV)
    client = proc.client()
    states = index(client)
    assert states[("fraud", "1")] == ("READY", "")
    assert states[("fraud", "2")] == ("READY", "")
    state, reason = states[("broken", "1")]
    assert state == "UNAVAILABLE" and "ONNX Runtime cannot load" in reason
    state, reason = states[("badconfig", "")]
    assert state == "UNAVAILABLE" and "max_batchsize" in reason
    assert "model 'broken' version 1 did not load" in proc.stderr()

    assert infer(client).shape == (2, 1)
    with pytest.raises(InferenceServerException) as info:
        infer(client, "broken")
    assert status_of(info.value) == "UNAVAILABLE"
    with pytest.raises(InferenceServerException) as info:
        client.load_model("badconfig", headers=ADMIN_HEADERS)
    assert status_of(info.value) == "FAILED_PRECONDITION"
    assert "max_batchsize" in info.value.message()
    client.close()
    assert proc.stop() == 0


def test_a_broken_new_version_leaves_the_loaded_one_serving(repo_copy: Path, start_gateway):
    config = repo_copy / "fraud" / "config.yaml"
    settings = yaml.safe_load(config.read_text())
    settings["version_policy"] = {"latest": 1}
    config.write_text(yaml.safe_dump(settings))
    proc = start_gateway(repo_copy, env=ADMIN_ENV)
    client = proc.client()
    assert set(index(client)) == {("fraud", "2")}

    (repo_copy / "fraud" / "3").mkdir()
    (repo_copy / "fraud" / "3" / "model.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(InferenceServerException) as info:
        client.load_model("fraud", headers=ADMIN_HEADERS)
    assert status_of(info.value) == "FAILED_PRECONDITION"
    assert "version 3" in info.value.message()

    states = index(client)
    assert states[("fraud", "2")] == ("READY", "")
    assert states[("fraud", "3")][0] == "UNAVAILABLE"
    assert client.get_model_metadata("fraud").versions == ["2"]
    assert infer(client).shape == (2, 1)

    # Fixing the file and loading again moves to version 3 and retires version 2.
    shutil.copy(repo_copy / "fraud" / "1" / "model.onnx", repo_copy / "fraud" / "3")
    client.load_model("fraud", headers=ADMIN_HEADERS)
    assert set(index(client)) == {("fraud", "3")}
    assert client.infer("fraud", [_input()]).get_response().model_version == "3"
    client.close()
    assert proc.stop() == 0


def test_a_failed_reload_keeps_the_version_serving_with_the_reason(repo_copy: Path, start_gateway):
    """Overwriting a serving version's model with garbage and loading again fails the load and
    keeps what was serving (clients pinned to it included); the index says why."""
    proc = start_gateway(repo_copy, env=ADMIN_ENV)
    client = proc.client()
    before = infer(client, version="2")
    (repo_copy / "fraud" / "2" / "model.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(InferenceServerException) as info:
        client.load_model("fraud", headers=ADMIN_HEADERS)
    assert status_of(info.value) == "FAILED_PRECONDITION"
    assert "version 2" in info.value.message()

    state, reason = index(client)[("fraud", "2")]
    assert state == "READY"
    assert "the last load failed" in reason and "ONNX Runtime cannot load" in reason
    assert index(client)[("fraud", "1")] == ("READY", "")
    np.testing.assert_array_equal(infer(client, version="2"), before)  # pinned: still served
    assert client.get_model_metadata("fraud").versions == ["1", "2"]

    # A config that no longer parses fails the load too, and changes nothing either.
    config = repo_copy / "fraud" / "config.yaml"
    good_config = config.read_text()
    config.write_text(good_config + "max_batchsize: 9\n")
    with pytest.raises(InferenceServerException) as info:
        client.load_model("fraud", headers=ADMIN_HEADERS)
    assert status_of(info.value) == "FAILED_PRECONDITION"
    state, reason = index(client)[("fraud", "1")]
    assert state == "READY" and "max_batchsize" in reason
    np.testing.assert_array_equal(infer(client, version="2"), before)

    # Fixed, it loads clean again.
    config.write_text(good_config)
    shutil.copy(repo_copy / "fraud" / "1" / "model.onnx", repo_copy / "fraud" / "2")
    client.load_model("fraud", headers=ADMIN_HEADERS)
    assert index(client)[("fraud", "2")] == ("READY", "")
    client.close()
    assert proc.stop() == 0


def _input() -> triton_grpc.InferInput:
    inp = triton_grpc.InferInput("features", [2, DEMO_WIDTH], "FP32")
    inp.set_data_from_numpy(demo_features(2))
    return inp


def test_specific_version_policy(repo_copy: Path, start_gateway):
    config = repo_copy / "fraud" / "config.yaml"
    settings = yaml.safe_load(config.read_text())
    settings["version_policy"] = {"specific": [1]}
    config.write_text(yaml.safe_dump(settings))
    proc = start_gateway(repo_copy, env=ADMIN_ENV)
    client = proc.client()
    assert set(index(client)) == {("fraud", "1")}
    config_pb = client.get_model_config("fraud").config
    assert list(config_pb.version_policy.specific.versions) == [1]
    client.close()
    assert proc.stop() == 0


def test_load_and_unload_while_a_client_keeps_sending(repo_copy: Path, start_gateway):
    shutil.copytree(repo_copy / "fraud", repo_copy / "other")
    proc = start_gateway(repo_copy, env=ADMIN_ENV)
    stop = threading.Event()
    sent: list[int] = []
    errors: list[BaseException] = []

    def keep_sending() -> None:
        client = proc.client()
        while not stop.is_set():
            try:
                infer(client)
                sent.append(1)
            except Exception as err:
                errors.append(err)
        client.close()

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        client = proc.client()
        for _ in range(3):
            client.unload_model("other", headers=ADMIN_HEADERS)
            assert ("other", "") in index(client)
            assert index(client)[("other", "")] == ("UNAVAILABLE", "unloaded")
            with pytest.raises(InferenceServerException) as info:
                infer(client, "other")
            assert status_of(info.value) == "UNAVAILABLE"
            client.load_model("other", headers=ADMIN_HEADERS)
            assert infer(client, "other").shape == (2, 1)
            # Reloading the model under traffic swaps versions without failing a request.
            client.load_model("fraud", headers=ADMIN_HEADERS)
        client.close()
    finally:
        stop.set()
        sender.join()
    assert not errors, errors[:3]
    assert len(sent) > 10
    assert proc.stop() == 0


def test_load_with_override_parameters_is_refused(client):
    with pytest.raises(InferenceServerException) as info:
        client.load_model("fraud", config='{"max_batch_size": 4}', headers=ADMIN_HEADERS)
    assert status_of(info.value) == "INVALID_ARGUMENT"
    assert "config" in info.value.message()


def test_unknown_model_load_is_not_found(client):
    with pytest.raises(InferenceServerException) as info:
        client.load_model("../etc", headers=ADMIN_HEADERS)
    assert status_of(info.value) == "NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        client.unload_model("nope", headers=ADMIN_HEADERS)
    assert status_of(info.value) == "NOT_FOUND"
