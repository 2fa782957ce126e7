"""Traffic end to end, through tritonclient: routes, fallbacks, shadows, limits, the cache,
costs, budgets and the admin service, on one real gateway process."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.routing import RouteTable
from gateway.server.admin_client import AdminClient
from gateway.settings import RouteSpec
from gateway.types import RequestOptions
from tests.auth import wait_until
from tests.conftest import DEMO_WIDTH, GatewayProcess, demo_features, free_port
from tests.integration.test_events import acked_all, events_args
from tests.models import write_echo_model, write_scorer_model

pytestmark = pytest.mark.integration

TOKEN = "s3cret-admin-token"

ROUTES = {
    "scorer": {
        "variants": [
            {"name": "stable", "model": "fraud", "version": "1", "weight": 80},
            {"name": "canary", "model": "fraud", "version": "2", "weight": 20, "arm": "canary"},
        ],
        "match": [{"when": {"segment.geo": "BR"}, "variant": "canary"}],
    },
    "guarded": {
        "variants": [
            {"name": "flaky", "model": "broken", "weight": 1},
            {"name": "backup", "model": "fraud", "version": "2"},
            {"name": "default", "output": {"probability": [0.5]}},
        ],
        "fallbacks": ["backup", "default"],
    },
    "last-resort": {
        "variants": [
            {"name": "flaky", "model": "broken", "weight": 1},
            {"name": "default", "output": {"probability": [0.25]}},
        ],
        "fallbacks": ["default"],
    },
    "timed": {
        "variants": [
            {"name": "slow", "model": "slow", "weight": 1},
            {"name": "fast", "model": "fraud", "version": "1"},
        ],
        "fallbacks": ["fast"],
        # Each attempt's own: the slow model's 16 rows take far longer, the fallback's a few
        # ms (with room for a loaded machine).
        "timeout_ms": 200,
    },
    "cached": {
        "variants": [
            {"name": "v2", "model": "fraud", "version": "2", "weight": 1, "deterministic": True},
        ],
    },
    "decided": {
        "variants": [{"name": "v2", "model": "fraud", "version": "2", "weight": 1}],
        "decision": {"output": "probability", "threshold": 0.5, "max_threshold": 0.7},
    },
    "coalesced": {
        "variants": [{"name": "slow", "model": "slow", "weight": 1, "deterministic": True}],
    },
    "capped": {
        "variants": [{"name": "slow", "model": "slow", "weight": 1}],
        "max_concurrency": 1,
    },
    "priced": {
        "variants": [
            {
                "name": "v1",
                "model": "fraud",
                "version": "1",
                "weight": 1,
                "price": {"compute_second": 3.0, "request": 0.002},
            },
        ],
    },
    "budgeted": {
        "variants": [
            {
                "name": "main",
                "model": "fraud",
                "version": "2",
                "weight": 1,
                "price": {"request": 0.001},
            },
            {"name": "cheap", "model": "fraud", "version": "1"},
        ],
    },
}

SETTINGS = {
    "routing": {
        "routes": ROUTES,
        "rate_limits": {"limited": {"rate": 0.2, "burst": 3}},
    },
    "costs": {
        "budgets": [
            {"name": "acme-cap", "tenant": "acme-reject", "limit": 0.0025, "policy": "reject"},
            {
                "name": "web-cap",
                "surface": "web-degrade",
                "limit": 0.0025,
                "policy": "degrade",
                "degrade_to": "cheap",
            },
            {"name": "beta-watch", "tenant": "beta-alert", "limit": 0.0025, "policy": "alert"},
        ],
    },
    "admin": {"token": TOKEN},
}


def traffic_repo(root: Path, demo_repo: Path) -> Path:
    """The demo's fraud (versions 1 and 2) beside models of the same signature that are slow
    or broken, and an echo model (another signature: a request for fraud fails on it)."""
    import shutil

    shutil.copytree(demo_repo, root)
    # About 80 ms a row on one thread: past the 20 ms route timeout, and long enough for
    # identical rows to meet in flight.
    one_thread = {"intra_op_threads": 1, "graph_optimization": "disable"}
    write_scorer_model(
        root / "slow", width=DEMO_WIDTH, hidden=1024, repeats=1000, config=one_thread
    )
    write_scorer_model(root / "broken", width=DEMO_WIDTH, broken=True)
    write_echo_model(root / "echo")
    return root


@pytest.fixture(scope="module")
def repo(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return traffic_repo(tmp_path_factory.mktemp("traffic") / "repo", demo_repo)


def write_settings(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.fixture(scope="module")
def gateway(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("traffic-gateway")
    config = write_settings(workdir / "gateway.yaml", SETTINGS)
    proc = GatewayProcess(repo, workdir, "--config", str(config))
    yield proc
    assert proc.stop() == 0, proc.stderr()


@pytest.fixture
def admin(gateway: GatewayProcess):
    with AdminClient(gateway.url, TOKEN) as client:
        yield client


def features(rows: int, seed: int = 3) -> list[triton_grpc.InferInput]:
    tensor = triton_grpc.InferInput("features", [rows, DEMO_WIDTH], "FP32")
    tensor.set_data_from_numpy(demo_features(rows, seed))
    return [tensor]


def infer(client, model: str, rows: int = 2, seed: int = 3, **parameters):
    result = client.infer(model, features(rows, seed), parameters=parameters or None)
    return result, params(result)


def gateway_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m gateway <args>``, as an operator runs it, with exactly ``env``."""
    command = [sys.executable, "-m", "gateway", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def params(result) -> dict:
    """The response's parameters as plain values."""
    out = {}
    for key, value in result.get_response().parameters.items():
        out[key] = getattr(value, value.WhichOneof("parameter_choice"))
    return out


# -- routes ----------------------------------------------------------------------------------


def test_sticky_keys_land_on_the_arm_the_route_hashes_them_to(client):
    expected = RouteTable({"scorer": RouteSpec.model_validate(ROUTES["scorer"])}, 1).get("scorer")
    assert expected is not None
    seen: Counter[str] = Counter()
    for i in range(150):
        key = f"user-{i}"
        _, first = infer(client, "scorer", sticky_key=key)
        _, second = infer(client, "scorer", sticky_key=key)
        hashed_to = expected.choose(RequestOptions(sticky_key=key)).name
        assert first["variant"] == second["variant"] == hashed_to
        assert first["route"] == "scorer"
        arm = "canary" if first["variant"] == "canary" else "primary"
        assert first["arm"] == arm
        seen[first["variant"]] += 1
    assert set(seen) == {"stable", "canary"}


def test_a_match_rule_sends_a_segment_to_its_variant(client):
    for i in range(20):
        # "segment.geo" is no Python name, so these parameters go to the client as a dict.
        parameters = {"sticky_key": f"user-{i}", "segment.geo": "BR"}
        result = client.infer("scorer", features(2, 3), parameters=parameters)
        answered = params(result)
        assert answered["variant"] == "canary"
        assert result.get_response().model_version == "2"


def test_a_route_describes_itself_as_its_main_variant_for_oip_clients(client):
    assert client.is_model_ready("scorer")
    metadata = client.get_model_metadata("scorer")
    assert metadata.name == "scorer" and metadata.versions == ["1", "2"]
    stable = client.get_model_metadata("fraud", "1")  # the variant of most weight
    assert metadata.inputs == stable.inputs and metadata.outputs == stable.outputs
    config = client.get_model_config("scorer").config
    assert config.name == "scorer" and config.max_batch_size == 1024
    assert not client.is_model_ready("no-such-route")


def test_a_pinned_version_bypasses_the_route(client):
    with pytest.raises(InferenceServerException, match="scorer"):
        client.infer("scorer", features(1), model_version="1")  # a route is not a model
    result = client.infer("fraud", features(1), model_version="1")
    assert "route" not in params(result)


# -- fallbacks and timeouts ------------------------------------------------------------------


def test_a_failing_model_falls_back_to_the_next_variant_and_says_why(client, gateway):
    result, answered = infer(client, "guarded", rows=2)
    assert answered["variant"] == "backup" and answered["fallback"] == "backup"
    assert answered["fallback_reason"].startswith("flaky: INTERNAL")
    assert result.get_response().model_version == "2"
    np.testing.assert_allclose(
        result.as_numpy("probability"),
        client.infer("fraud", features(2), model_version="2").as_numpy("probability"),
    )
    assert gateway.metric("gateway_fallbacks_total", route="guarded", variant="flaky") >= 1


def test_when_every_model_fails_the_static_default_answers(client):
    result, answered = infer(client, "last-resort", rows=3)
    assert answered["variant"] == "default" and "INTERNAL" in answered["fallback_reason"]
    np.testing.assert_array_equal(result.as_numpy("probability"), np.full((3, 1), 0.25))


def test_a_route_timeout_falls_back_and_the_client_deadline_is_honoured(client, gateway):
    started = time.monotonic()
    result, answered = infer(client, "timed", rows=16)
    assert answered["variant"] == "fast" and "DEADLINE_EXCEEDED" in answered["fallback_reason"]
    assert result.get_response().model_version == "1"
    assert time.monotonic() - started < 5
    # A client deadline shorter than the route's chain: DEADLINE_EXCEEDED, not a late answer.
    with grpc.insecure_channel(gateway.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        message = service_pb2.ModelInferRequest(model_name="coalesced")
        message.inputs.add(name="features", datatype="FP32", shape=[1, DEMO_WIDTH])
        message.raw_input_contents.append(demo_features(1, seed=99).tobytes())
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(message, timeout=0.01)
        # Or refused at once, where a loaded host has the gateway's loop behind by more than
        # the 10 ms (admission, gateway.telemetry.lag): either way, no late answer.
        err = info.value
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED or (
            err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "event loop" in err.details()
        ), (err.code(), err.details())


# -- limits ----------------------------------------------------------------------------------


def test_rate_limits_are_per_tenant_with_a_retry_hint(gateway, client):
    for _ in range(3):
        infer(client, "fraud", tenant="limited")  # the burst
    with grpc.insecure_channel(gateway.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        message = service_pb2.ModelInferRequest(model_name="fraud")
        message.inputs.add(name="features", datatype="FP32", shape=[1, DEMO_WIDTH])
        message.raw_input_contents.append(demo_features(1).tobytes())
        message.parameters["tenant"].string_param = "limited"
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(message)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant 'limited' is over its rate limit" in info.value.details()
    trailers = dict(info.value.trailing_metadata())
    assert 0 < int(trailers["retry-after-ms"]) <= 5000
    if "transport=grpcio" in gateway.stderr():  # the native front keeps grpc-* keys to itself
        assert trailers["grpc-retry-pushback-ms"] == trailers["retry-after-ms"]
    for _ in range(10):  # another tenant, and no tenant: not limited by it
        infer(client, "fraud", tenant="someone-else")
        infer(client, "fraud")
    assert gateway.metric("gateway_limited_total", reason="rate") >= 1


def test_a_route_at_its_concurrency_cap_refuses_at_once(gateway):
    def send(rows: int):
        client = gateway.client()
        try:
            return infer(client, "capped", rows=rows)[1]
        finally:
            client.close()

    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(send, 8)  # a few hundred ms on the slow model
        gateway.wait_in_flight(1)
        with pytest.raises(InferenceServerException) as info:
            send(1)
        assert "RESOURCE_EXHAUSTED" in str(info.value.status())
        assert "route 'capped' has 1 requests in flight" in info.value.message()
        assert running.result()["variant"] == "slow"
    assert send(1)["variant"] == "slow"  # the slot is back
    assert gateway.metric("gateway_limited_total", reason="concurrency") == 1


# -- the cache -------------------------------------------------------------------------------


def test_partial_hits_compute_only_the_missing_rows_and_stitch_in_order(client, admin):
    admin.cache(flush=True)
    before = admin.cache()
    rows = demo_features(6, seed=41)

    def ask(matrix, **extra):
        tensor = triton_grpc.InferInput("features", list(matrix.shape), "FP32")
        tensor.set_data_from_numpy(matrix)
        result = client.infer("cached", [tensor], parameters=extra or None)
        return result.as_numpy("probability"), params(result)

    first, answered = ask(rows[[0, 1]])
    assert answered["cached_rows"] == 0
    mixed = rows[[2, 0, 3, 1, 2]]  # two cached rows, two new, one new row twice
    scores, answered = ask(mixed)
    assert answered["cached_rows"] == 3  # rows 0 and 1 from the cache, the repeat shared
    uncached, bypass = ask(mixed, cache="false")
    assert bypass["cached_rows"] == 0
    with pytest.raises(InferenceServerException, match="parameter 'cache' must be true or"):
        ask(mixed, cache="sometimes")
    np.testing.assert_array_equal(scores, uncached)
    np.testing.assert_array_equal(scores[[1, 3]], first)
    after = admin.cache()
    assert (after.hits - before.hits, after.coalesced - before.coalesced) == (2, 1)
    assert after.misses - before.misses == 4
    assert after.entries == 4


def test_identical_rows_in_flight_are_computed_once(gateway, admin):
    admin.cache(flush=True)
    before = admin.cache()
    runs_before = gateway.metric("gateway_compute_duration_seconds_count", model="slow")
    blocker = demo_features(32, seed=500)  # most of a second on the model's one instance
    row = demo_features(1, seed=501)

    def send(matrix):
        client = gateway.client()
        try:
            tensor = triton_grpc.InferInput("features", list(matrix.shape), "FP32")
            tensor.set_data_from_numpy(matrix)
            result = client.infer("coalesced", [tensor])
            return result.as_numpy("probability"), params(result)["cached_rows"]
        finally:
            client.close()

    with ThreadPoolExecutor(9) as pool:
        first = pool.submit(send, blocker)
        gateway.wait_in_flight(1)
        same = [pool.submit(send, row) for _ in range(8)]
        gateway.wait_in_flight(9)  # all eight wait behind the blocker
        answers = [f.result() for f in same]
        first.result()
    after = admin.cache()
    assert after.misses - before.misses == 32 + 1  # the blocker's rows, and the row once
    assert after.coalesced - before.coalesced == 7
    assert sorted(cached for _, cached in answers) == [0] + [1] * 7
    for scores, _ in answers:
        np.testing.assert_array_equal(scores, answers[0][0])
    runs = gateway.metric("gateway_compute_duration_seconds_count", model="slow") - runs_before
    assert runs == 2
    assert gateway.metric("gateway_cache_rows_total", outcome="coalesced") >= 7


def test_a_new_version_never_serves_an_old_entry(repo_copy: Path, start_gateway):
    newest = {"name": "newest", "model": "fraud", "weight": 1, "deterministic": True}
    settings = {
        "routing": {"routes": {"latest": {"variants": [newest]}}},
        "admin": {"token": TOKEN},
    }
    config = write_settings(repo_copy / "gateway.yaml", settings)
    proc = start_gateway(repo_copy, "--config", str(config))
    client = proc.client()
    infer(client, "latest", rows=2, seed=8)
    result, again = infer(client, "latest", rows=2, seed=8)
    assert result.get_response().model_version == "2" and again["cached_rows"] == 2
    # Version 3: version 1's model under version 2's contract; the newest now serves.
    (repo_copy / "fraud" / "3").mkdir()
    (repo_copy / "fraud" / "3" / "model.onnx").write_bytes(
        write_scorer_model(repo_copy / "tmp-scorer", DEMO_WIDTH, seed=5).read_bytes()
    )
    client.load_model("fraud", headers={"authorization": f"Bearer {TOKEN}"})
    result, newest = infer(client, "latest", rows=2, seed=8)
    assert result.get_response().model_version == "3" and newest["cached_rows"] == 0
    direct = client.infer("fraud", features(2, seed=8), model_version="3")
    np.testing.assert_array_equal(result.as_numpy("probability"), direct.as_numpy("probability"))
    client.close()


# -- costs and budgets -----------------------------------------------------------------------


def test_the_ledger_adds_up_per_request_costs_and_matches_batch_compute_times_price(gateway, admin):
    compute_before = gateway.metric(
        "gateway_compute_duration_seconds_sum", model="fraud", version="1"
    )

    def send(seed: int) -> float:
        client = gateway.client()
        try:
            total = 0.0
            for i in range(10):
                _, answered = infer(
                    client,
                    "priced",
                    rows=1 + i % 3,
                    seed=seed * 100 + i,
                    tenant="ledger-t",
                    surface="checkout",
                )
                assert answered["cost"] > 0.002  # the request price and some compute
                total += answered["cost"]
            return total
        finally:
            client.close()

    with ThreadPoolExecutor(6) as pool:
        answered_costs = sum(pool.map(send, range(6)))
    compute_s = (
        gateway.metric("gateway_compute_duration_seconds_sum", model="fraud", version="1")
        - compute_before
    )
    lines = [ln for ln in admin.costs().lines if ln.tenant == "ledger-t"]
    assert {(ln.route, ln.variant, ln.surface) for ln in lines} == {("priced", "v1", "checkout")}
    assert sum(ln.requests for ln in lines) == 60
    assert sum(ln.rows for ln in lines) == 6 * sum(1 + i % 3 for i in range(10))
    ledger_cost = sum(ln.cost for ln in lines)
    assert ledger_cost == pytest.approx(answered_costs, rel=1e-9)
    assert sum(ln.compute_s for ln in lines) == pytest.approx(compute_s, rel=1e-6, abs=1e-6)
    assert ledger_cost == pytest.approx(compute_s * 3.0 + 60 * 0.002, rel=1e-6)


def test_a_reject_budget_refuses_once_spent(client, gateway):
    for _ in range(3):  # 0.001 a request: the third reaches the 0.0025 limit
        infer(client, "budgeted", tenant="acme-reject")
    with pytest.raises(InferenceServerException) as info:
        infer(client, "budgeted", tenant="acme-reject")
    assert "RESOURCE_EXHAUSTED" in str(info.value.status())
    assert "budget 'acme-cap' is spent" in info.value.message()
    infer(client, "budgeted", tenant="another")  # its budget is acme-reject's alone
    assert gateway.metric("gateway_budget_exceeded", budget="acme-cap") == 1


def test_a_degrade_budget_serves_the_cheaper_variant_once_spent(client):
    answers = [infer(client, "budgeted", surface="web-degrade")[1] for _ in range(5)]
    assert [a["variant"] for a in answers] == ["main"] * 3 + ["cheap"] * 2
    assert "budget 'web-cap' spent" in answers[-1]["fallback_reason"]


def test_an_alert_budget_serves_and_raises_its_gauge(client, gateway):
    answers = [infer(client, "budgeted", tenant="beta-alert")[1] for _ in range(5)]
    assert [a["variant"] for a in answers] == ["main"] * 5
    assert gateway.metric("gateway_budget_exceeded", budget="beta-watch") == 1
    assert "budget 'beta-watch'" in gateway.stderr()


# -- the admin service -----------------------------------------------------------------------


def test_admin_calls_need_the_bearer_token(gateway):
    for token in ("", "wrong-token"):
        with AdminClient(gateway.url, token) as client, pytest.raises(grpc.RpcError) as info:
            client.routes()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with AdminClient(gateway.url, TOKEN) as client:
        assert "scorer" in yaml.safe_load(client.routes().yaml)


def test_set_routes_validates_and_names_what_is_wrong(admin):
    with pytest.raises(grpc.RpcError) as info:
        admin.set_routes("scorer: {variants: [{name: a, model: fraud, weight: -1}]}")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "scorer.variants.0.weight" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        admin.set_routes("scorer: {variants: [{name: a, model: nowhere, weight: 1}]}")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "nowhere" in info.value.details()
    assert "guarded" in yaml.safe_load(admin.routes().yaml)  # nothing changed


def test_promote_and_rollback_while_traffic_flows_fail_no_request(gateway, admin):
    stop = threading.Event()
    failures: list[str] = []
    answered: Counter[str] = Counter()

    def load(worker: int) -> None:
        client = gateway.client()
        i = 0
        try:
            while not stop.is_set():
                try:
                    _, got = infer(client, "scorer", sticky_key=f"w{worker}-{i % 40}")
                    answered[got["variant"]] += 1
                except InferenceServerException as err:
                    failures.append(str(err))
                i += 1
        finally:
            client.close()

    threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        revision = admin.routes().revisions["scorer"]
        reply = admin.promote("scorer", "canary")
        assert reply.revisions["scorer"] > revision
        client = gateway.client()
        promoted = {infer(client, "scorer", sticky_key=f"p{i}")[1]["variant"] for i in range(30)}
        assert promoted == {"canary"}
        time.sleep(0.3)
        # `gateway rollback` from the command line, as an operator would.
        operator_env = {"GATEWAY_ADMIN_TOKEN": TOKEN, "PATH": ""}
        done = gateway_cli("rollback", "scorer", "--url", gateway.url, env=operator_env)
        assert done.returncode == 0, done.stderr
        assert "rolled back" in done.stdout
        restored = {infer(client, "scorer", sticky_key=f"p{i}")[1]["variant"] for i in range(60)}
        assert restored == {"stable", "canary"}
        client.close()
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert sum(answered.values()) > 50
    served = yaml.safe_load(admin.routes().yaml)["scorer"]
    spec = RouteSpec.model_validate(ROUTES["scorer"]).model_dump(mode="json", exclude_defaults=True)
    assert served == yaml.safe_load(yaml.safe_dump(spec))


def test_the_costs_and_cache_commands_print_tables(gateway):
    env = {"GATEWAY_ADMIN_TOKEN": TOKEN, "PATH": ""}
    done = gateway_cli("costs", "--by", "route,variant", "--url", gateway.url, env=env)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split()[:3] == ["route", "variant", "requests"]
    assert any(row.split()[:2] == ["priced", "v1"] for row in rows)
    assert "acme-cap" in done.stdout  # the budgets table
    done = gateway_cli("cache", "--url", gateway.url, env=env)
    assert done.returncode == 0 and "hit rate" in done.stdout
    denied = gateway_cli(
        "costs", "--url", gateway.url, env={"GATEWAY_ADMIN_TOKEN": "nope", "PATH": ""}
    )
    assert denied.returncode == 1 and "wrong admin bearer token" in denied.stderr


def test_a_decision_threshold_turns_scores_into_decisions_and_rises_to_its_max(gateway, admin):
    client = gateway.client()
    result, got = infer(client, "decided", rows=16, seed=5)
    scores = result.as_numpy("probability")[:, 0]
    decided = result.as_numpy("decision")
    assert decided.dtype == np.bool_ and decided.shape == (16, 1)
    assert (decided[:, 0] == (scores >= 0.5)).all() and got["decision_threshold"] == 0.5
    middle = float(np.median(scores))  # half the rows either side
    before = admin.routes().revisions["decided"]
    reply = admin.set_threshold("decided", middle)
    assert reply.revisions["decided"] > before  # a route revision
    result, got = infer(client, "decided", rows=16, seed=5)
    assert (result.as_numpy("decision")[:, 0] == (scores >= middle)).all()
    assert got["decision_threshold"] == middle
    client.close()
    # raised, as the tighten_thresholds playbook does, no higher than max_threshold
    env = {"GATEWAY_ADMIN_TOKEN": TOKEN, "PATH": ""}
    done = gateway_cli("threshold", "decided", "--raise-by", "0.9", "--url", gateway.url, env=env)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(admin.routes().yaml)["decided"]["decision"]["threshold"] == 0.7
    done = gateway_cli("threshold", "decided", "--raise-by", "0.1", "--url", gateway.url, env=env)
    assert done.returncode == 1 and "at its max_threshold 0.7" in done.stderr
    with pytest.raises(grpc.RpcError) as info:
        admin.set_threshold("scorer", 0.3)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "route 'scorer' has no decision threshold" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        admin.set_threshold("decided", 0.3, raise_by=0.1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    admin.set_threshold("decided", 0.5)


# -- shadows (with the sidecar: their results live only in events) ---------------------------


def test_shadow_results_reach_events_never_responses_and_shadow_failures_fail_nothing(
    repo: Path, start_gateway, start_sidecar, tmp_path: Path
):
    price = {"compute_second": 1.0, "request": 0.5}
    shadowed = {
        "variants": [
            {"name": "live", "model": "fraud", "version": "1", "weight": 1, "price": price},
            {"name": "challenger", "model": "fraud", "version": "2"},
            {"name": "wrong", "model": "echo"},  # fails on every request: not its inputs
        ],
        "shadows": [{"variant": "challenger"}, {"variant": "wrong"}],
    }
    routes = {"shadowed": shadowed}
    config = write_settings(tmp_path / "gateway.yaml", {"routing": {"routes": routes}})
    port = free_port()
    sidecar = start_sidecar(tmp_path / "store", port)
    gateway = start_gateway(repo, "--config", str(config), *events_args(port, tmp_path / "ev"))
    client = gateway.client()
    ids = [f"req-{i}" for i in range(20)]
    costs = {}
    for request_id in ids:
        result = client.infer("shadowed", features(2), request_id=request_id)
        answered = params(result)
        assert result.get_response().model_version == "1"
        assert answered["variant"] == "live" and answered["arm"] == "primary"
        assert answered["cost"] > 0.5
        costs[request_id] = answered["cost"]
    client.close()
    wait_until(
        lambda: (
            gateway.metric("gateway_shadow_requests_total", outcome="ok") == 20
            and gateway.metric("gateway_shadow_requests_total", outcome="failed") == 20
        ),
        "the shadow copies",
    )
    wait_until(lambda: acked_all(gateway), "the events acknowledged")
    assert sidecar.stop() == 0
    with duckdb.connect(str(sidecar.store / "events.duckdb"), read_only=True) as db:
        stored = db.execute(
            "SELECT request_id, route, version, arm FROM events ORDER BY request_id, arm"
        ).fetchall()
        charged = dict(
            db.execute("SELECT request_id, cost FROM events WHERE arm = 'primary'").fetchall()
        )
    assert charged == pytest.approx(costs)  # the response's cost is the event's
    assert sorted(stored) == sorted(
        [(i, "shadowed", "1", "primary") for i in ids]
        + [(i, "shadowed", "2", "shadow") for i in ids]
    )


def test_the_demo_settings_serve_their_route_and_admin_token(demo_repo: Path, start_gateway):
    """What `make serve` runs: the demo builder's gateway.yaml and admin.token."""
    token_file = demo_repo / "admin.token"
    assert token_file.stat().st_mode & 0o077 == 0  # the owner's alone
    proc = start_gateway(demo_repo, "--config", str(demo_repo / "gateway.yaml"))
    client = proc.client()
    variants = {infer(client, "fraud-live", sticky_key=f"k{i}")[1]["variant"] for i in range(60)}
    assert variants == {"stable", "canary"}
    client.close()
    with AdminClient(proc.url, token_file.read_text().strip()) as admin:
        assert admin.costs().budgets[0].name == "demo-tenant"
        assert admin.cache().enabled
