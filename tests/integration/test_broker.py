"""Prediction events through a durable broker (events.sink: broker, Redis Streams): gateways
publish their logs, sidecars consume their partitions and acknowledge after the DuckDB commit.
Every answered prediction is stored exactly once: across two publishing replicas, a sidecar
SIGKILLed and restarted, a batch read and never acknowledged, Redis down and back, a stream at
its bound, and two sidecars sharing the partitions."""

from __future__ import annotations

import functools
import shutil
import signal
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from redis import Redis

from tests.auth import wait_until
from tests.conftest import GatewayProcess, SidecarProcess, demo_input, free_port
from tests.services import RedisServer

pytestmark = pytest.mark.integration

STREAM = "test:events"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", durable=True)
    yield server
    server.stop(signal.SIGKILL)


def gateway_config(path: Path, redis: RedisServer, partitions: int = 1, **broker: Any) -> Path:
    """Small batches written often: a load of a few dozen requests makes many batches."""
    settings = {
        "events": {
            "sink": "broker",
            "broker": {"url": redis.url, "stream": STREAM, "partitions": partitions, **broker},
            "flush_interval_ms": 20,
            "batch_events": 4,
        },
        "audit": {"path": None},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def sidecar_config(path: Path, redis: RedisServer, partitions: int = 1, **broker: Any) -> Path:
    broker = {"url": redis.url, "stream": STREAM, "partitions": partitions, **broker}
    path.write_text(yaml.safe_dump({"evaluation": {"broker": broker, "metrics_port": 0}}))
    return path


def predict(client: triton_grpc.InferenceServerClient, model: str = "fraud") -> str:
    """One prediction; its request id (what its event is stored under)."""
    result = client.infer(model, [demo_input()], client_timeout=10)
    return str(result.get_response().parameters["request_id"].string_param)


def stored(store: Path) -> Counter[str]:
    """Events in a stopped sidecar's store, by request id."""
    with duckdb.connect(str(store / "events.duckdb"), read_only=True) as db:
        rows = db.execute("SELECT request_id, count(*) FROM events GROUP BY 1").fetchall()
    return Counter({request_id: count for request_id, count in rows})


def stored_models(store: Path) -> set[str]:
    with duckdb.connect(str(store / "events.duckdb"), read_only=True) as db:
        return {model for (model,) in db.execute("SELECT DISTINCT model FROM events").fetchall()}


def consumed(redis: Redis, partitions: int = 1) -> bool:
    """Nothing left in the streams: every batch stored, acknowledged and deleted."""
    return all(redis.xlen(f"{STREAM}:{p}") == 0 for p in range(partitions))


def has_stored(sidecar: SidecarProcess) -> bool:
    return sidecar.metric("sidecar_events_total", outcome="stored") > 0


def acked(replicas: list[GatewayProcess]) -> float:
    """Events the replicas handed to the broker (it confirmed the batch)."""
    return sum(r.metric("gateway_events_total", outcome="acked") for r in replicas)


def test_two_replicas_and_a_sidecar_killed_mid_load_store_each_event_once(
    demo_repo: Path, start_gateway, start_sidecar, redis_server, tmp_path
):
    config = gateway_config(tmp_path / "gateway.yaml", redis_server)
    replicas = [start_gateway(demo_repo, "--config", str(config)) for _ in range(2)]
    clients = [r.client() for r in replicas]
    store, port = tmp_path / "store", free_port()
    sidecar_args = ("--config", str(sidecar_config(tmp_path / "sidecar.yaml", redis_server)))
    sidecar = start_sidecar(store, port, *sidecar_args)
    answered = []
    for i in range(90):
        answered.append(predict(clients[i % 2]))
        if i == 30:
            wait_until(functools.partial(has_stored, sidecar), "the sidecar storing")
            sidecar.stop(signal.SIGKILL)  # mid-load: some stored, some read, some in Redis
        if i == 60:
            sidecar = start_sidecar(store, port, *sidecar_args)
    redis = Redis.from_url(redis_server.url)
    wait_until(lambda: acked(replicas) == len(answered), "every event in the broker")
    wait_until(lambda: consumed(redis), "every batch consumed")
    assert sidecar.stop() == 0
    counts = stored(store)
    assert set(counts) == set(answered)  # nothing lost
    assert set(counts.values()) == {1}  # nothing twice
    for client in clients:
        client.close()


def test_a_batch_read_and_never_acknowledged_is_stored_once_after_a_restart(
    demo_repo: Path, start_gateway, start_sidecar, redis_server, tmp_path
):
    """The crash window: a sidecar stored a batch and died before acknowledging it (here: read
    by its consumer name and left pending), and a gateway published a batch again (an XADD
    answered too late). The sidecar reads its own pending batches first; the store keeps one
    row per event."""
    redis = Redis.from_url(redis_server.url)
    key = f"{STREAM}:0"
    redis.xgroup_create(key, "sidecars", id="0", mkstream=True)
    proc = start_gateway(
        demo_repo, "--config", str(gateway_config(tmp_path / "g.yaml", redis_server))
    )
    with proc.client() as client:
        answered = [predict(client) for _ in range(12)]
    wait_until(lambda: acked([proc]) == len(answered), "every event in the broker")
    read: Any = redis.xreadgroup("sidecars", "crashed", {key: ">"})  # never acknowledged
    entries = read[0][1]
    assert entries
    for _entry_id, fields in entries:  # and each published a second time
        redis.xadd(key, fields)
    config = sidecar_config(tmp_path / "s.yaml", redis_server, consumer="crashed")
    sidecar = start_sidecar(tmp_path / "store", free_port(), "--config", str(config))
    wait_until(lambda: consumed(redis), "every batch consumed")
    assert sidecar.metric("sidecar_events_total", outcome="duplicate") == len(answered)
    assert sidecar.metric("sidecar_events_total", outcome="stored") == len(answered)
    assert redis.xpending(key, "sidecars")["pending"] == 0
    assert sidecar.stop() == 0
    assert stored(tmp_path / "store") == Counter(answered)


def test_broker_down_mid_load_keeps_serving_and_delivers_everything_after(
    demo_repo: Path, start_gateway, start_sidecar, redis_server, tmp_path
):
    proc = start_gateway(
        demo_repo, "--config", str(gateway_config(tmp_path / "g.yaml", redis_server))
    )
    config = sidecar_config(tmp_path / "s.yaml", redis_server)
    sidecar = start_sidecar(tmp_path / "store", free_port(), "--config", str(config))
    with proc.client() as client:
        answered = [predict(client) for _ in range(10)]
        wait_until(lambda: acked([proc]) == len(answered), "the first events in the broker")
        redis_server.stop(signal.SIGKILL)
        answered += [predict(client) for _ in range(20)]  # served: the events wait in the log
        wait_until(lambda: proc.metric("gateway_events_sidecar_connected") == 0)
        assert proc.metric("gateway_events_backlog", where="disk") > 0
        redis_server.start()  # its append-only file brings the streams and the group back
        answered += [predict(client) for _ in range(5)]
    redis = Redis.from_url(redis_server.url)
    wait_until(lambda: acked([proc]) == len(answered), "every event in the broker")
    wait_until(lambda: consumed(redis), "every batch consumed")
    assert proc.metric("gateway_events_sidecar_connected") == 1
    assert "publishing to the event broker" in proc.stderr()
    assert "consuming the event broker" in sidecar.stderr()
    assert sidecar.stop() == 0
    assert stored(tmp_path / "store") == Counter(answered)


def test_a_partition_at_its_bound_holds_events_in_the_log_until_consumed(
    demo_repo: Path, start_gateway, start_sidecar, redis_server, tmp_path
):
    config = gateway_config(tmp_path / "g.yaml", redis_server, max_batches=2)
    proc = start_gateway(demo_repo, "--config", str(config))
    redis = Redis.from_url(redis_server.url)
    with proc.client() as client:
        answered = [predict(client) for _ in range(24)]  # at least 6 batches of 4
    wait_until(lambda: proc.metric("gateway_events_broker_full_total") > 0, "the bound reached")
    assert redis.xlen(f"{STREAM}:0") == 2
    assert proc.metric("gateway_events_backlog", where="disk") > 0
    assert "max_batches" in proc.stderr()
    sidecar_args = ("--config", str(sidecar_config(tmp_path / "s.yaml", redis_server)))
    sidecar = start_sidecar(tmp_path / "store", free_port(), *sidecar_args)
    wait_until(lambda: acked([proc]) == len(answered), "every event in the broker")
    wait_until(lambda: consumed(redis), "every batch consumed")
    assert sidecar.metric("sidecar_broker_connected") == 1
    assert sidecar.stop() == 0
    assert stored(tmp_path / "store") == Counter(answered)


def _model_in(partition: int, name: str = "fraud") -> str:
    """A model name whose events go to ``partition`` of two."""
    candidates = (name, *(f"{name}-{i}" for i in range(100)))
    return next(n for n in candidates if zlib.crc32(n.encode()) % 2 == partition)


def test_two_sidecars_share_the_partitions_without_double_storing(
    repo_copy: Path, start_gateway, start_sidecar, redis_server, tmp_path
):
    models = [_model_in(0), _model_in(1)]
    for model in models:
        if not (repo_copy / model).exists():
            shutil.copytree(repo_copy / "fraud", repo_copy / model)
    config = gateway_config(tmp_path / "g.yaml", redis_server, partitions=2)
    replicas = [start_gateway(repo_copy, "--config", str(config)) for _ in range(2)]
    stores = [tmp_path / "store-0", tmp_path / "store-1"]
    sidecars: list[SidecarProcess] = []
    for p, store in enumerate(stores):
        settings = sidecar_config(tmp_path / f"s{p}.yaml", redis_server, 2, own=[p])
        sidecars.append(start_sidecar(store, free_port(), "--config", str(settings)))
    answered: dict[str, list[str]] = {model: [] for model in models}
    clients = [r.client() for r in replicas]
    for i in range(40):
        model = models[i % 2]
        answered[model].append(predict(clients[(i // 2) % 2], model))
    redis = Redis.from_url(redis_server.url)
    wait_until(lambda: acked(replicas) == 40, "every event in the broker")
    wait_until(lambda: consumed(redis, 2), "every batch consumed")
    for sidecar in sidecars:
        assert sidecar.stop() == 0
    for p, store in enumerate(stores):  # each sidecar holds its partition's model, all of it
        assert stored_models(store) == {models[p]}
        assert stored(store) == Counter(answered[models[p]])
    for client in clients:
        client.close()


def test_batches_a_gone_consumer_left_are_taken_over(
    demo_repo: Path, start_gateway, start_sidecar, redis_server, tmp_path
):
    """A consumer of the group read batches and vanished (another host, for good): a sidecar
    takes them over once they have been idle for claim_idle_s, and stores each event once."""
    redis = Redis.from_url(redis_server.url)
    key = f"{STREAM}:0"
    redis.xgroup_create(key, "sidecars", id="0", mkstream=True)
    config = gateway_config(tmp_path / "g.yaml", redis_server)
    proc = start_gateway(demo_repo, "--config", str(config))
    with proc.client() as client:
        answered = [predict(client) for _ in range(8)]
    wait_until(lambda: acked([proc]) == len(answered), "every event in the broker")
    assert redis.xreadgroup("sidecars", "gone", {key: ">"})  # read, never acknowledged
    settings = sidecar_config(tmp_path / "s.yaml", redis_server, claim_idle_s=0.5)
    sidecar = start_sidecar(tmp_path / "store", free_port(), "--config", str(settings))
    wait_until(lambda: consumed(redis), "the gone consumer's batches taken over")
    assert sidecar.metric("sidecar_broker_claimed_total") > 0
    assert sidecar.stop() == 0
    assert stored(tmp_path / "store") == Counter(answered)


def test_a_gateway_with_another_partition_count_keeps_its_events(
    demo_repo: Path, start_gateway, start_sidecar, redis_server, tmp_path
):
    """The first process records the partition count; a gateway that disagrees publishes
    nothing (its events wait in its log) and says why, rather than filling streams no
    sidecar reads."""
    settings = sidecar_config(tmp_path / "s.yaml", redis_server)  # one partition
    sidecar = start_sidecar(tmp_path / "store", free_port(), "--config", str(settings))
    wait_until(lambda: sidecar.metric("sidecar_broker_connected") == 1, "the sidecar consuming")
    config = gateway_config(tmp_path / "g.yaml", redis_server, partitions=2)
    proc = start_gateway(demo_repo, "--config", str(config))
    with proc.client() as client:
        [predict(client) for _ in range(4)]
    wait_until(lambda: "partitions is 2" in proc.stderr(), "the mismatch said")
    assert proc.metric("gateway_events_sidecar_connected") == 0
    wait_until(lambda: proc.metric("gateway_events_backlog", where="disk") == 4, "events kept")
    assert proc.metric("gateway_events_total", outcome="acked") == 0


def test_a_sidecar_refuses_partitions_outside_the_count(start_sidecar, redis_server, tmp_path):
    config = sidecar_config(tmp_path / "s.yaml", redis_server, partitions=2, own=[2])
    with pytest.raises(RuntimeError, match=r"own: distinct partitions of 0 \.\. 1"):
        start_sidecar(tmp_path / "store", free_port(), "--config", str(config))
