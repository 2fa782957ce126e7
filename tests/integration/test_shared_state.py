"""Replicas sharing state through a real Redis: rate limits spent from one bucket across
gateways, and what happens while Redis is down (fail open or closed, then recovery)."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from redis import Redis
from tritonclient.utils import InferenceServerException

from gateway.api.v1 import admin_pb2
from gateway.server.admin_client import AdminClient
from gateway.settings import StateSettings
from gateway.state import RedisState
from tests.auth import ADMIN_HEADERS, ADMIN_TOKEN, wait_until
from tests.conftest import GatewayProcess, demo_input
from tests.services import RedisServer

pytestmark = pytest.mark.integration

TENANT = "acme"
BURST = 6


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop(signal.SIGKILL)


# NOTE: a Redis call past state.timeout_ms fails a limit open (one admit too many) and a budget
# closed for the breaker's second: tests of anything but the timeout give a loaded machine
# room, and those of the timeout set their own.
SLACK_MS = 2000


def replica_settings(path: Path, redis: RedisServer, **state: object) -> Path:
    """A tenant limit of BURST requests (refilled at one per 1,000 s: never within a test)."""
    settings = {
        "state": {"backend": "redis", "redis_url": redis.url, "timeout_ms": SLACK_MS, **state},
        "routing": {"rate_limits": {TENANT: {"rate": 0.001, "burst": BURST}}},
        "audit": {"path": None},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def outcome(client: triton_grpc.InferenceServerClient, **parameters: str) -> str:
    """The status of one request of TENANT's (with ``parameters`` too)."""
    try:
        client.infer(
            "fraud", [demo_input()], parameters={"tenant": TENANT, **parameters}, client_timeout=10
        )
    except InferenceServerException as err:
        return str(err.status()).removeprefix("StatusCode.")
    return "OK"


def test_two_replicas_spend_one_bucket(demo_repo: Path, start_gateway, redis_server, tmp_path):
    config = replica_settings(tmp_path / "gateway.yaml", redis_server)
    replicas: list[GatewayProcess] = [
        start_gateway(demo_repo, "--config", str(config)) for _ in range(2)
    ]
    clients = [r.client() for r in replicas]
    outcomes = [outcome(clients[i % 2]) for i in range(2 * BURST)]
    # Each replica alone would admit BURST: together they admit BURST, not twice that.
    assert outcomes.count("OK") == BURST, outcomes
    assert set(outcomes[BURST:]) == {"RESOURCE_EXHAUSTED"}
    assert all(r.metric("gateway_limited_total", reason="rate") > 0 for r in replicas)
    for client in clients:
        client.close()


def test_a_tenant_limited_to_r_per_second_gets_r_through_two_replicas(
    demo_repo: Path, start_gateway, redis_server, tmp_path
):
    """Both replicas offered far more than the limit at once, for a few seconds: together they
    admit the rate over that time (plus the burst), within 10%, not twice it. The bucket runs
    on Redis' clock; the window is the clients' (it contains Redis' window), so the count can
    only fall short of the expectation by what a replica offers late, never pass it: by more
    on a loaded machine (tokens past the burst are lost while neither client offers), so
    the floor is looser than the ceiling."""
    rate, burst, seconds = 25.0, 5, 4.0
    settings = {
        "state": {"backend": "redis", "redis_url": redis_server.url, "timeout_ms": SLACK_MS},
        "routing": {"rate_limits": {TENANT: {"rate": rate, "burst": burst}}},
        "audit": {"path": None},
    }
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(settings))
    replicas = [start_gateway(demo_repo, "--config", str(config)) for _ in range(2)]
    clients = [r.client() for r in replicas]
    for client in clients:  # connected and warm before the clock starts
        client.is_server_ready()
    admitted = [0, 0]
    refused = [0, 0]
    start = threading.Barrier(3)

    def offer(index: int, until: list[float]) -> None:
        start.wait()
        while time.monotonic() < until[0]:
            if outcome(clients[index]) == "OK":
                admitted[index] += 1
            else:
                refused[index] += 1

    until = [0.0]
    threads = [threading.Thread(target=offer, args=(i, until)) for i in range(2)]
    for thread in threads:
        thread.start()
    began = time.monotonic()
    until[0] = began + seconds
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    expected = burst + rate * elapsed
    total = sum(admitted)
    assert all(admitted) and all(refused)  # both replicas admitted and refused
    assert 0.75 * expected <= total <= 1.1 * expected, (total, expected, admitted, refused)
    for client in clients:
        client.close()


def test_redis_down_fails_open_by_default_and_recovers(
    demo_repo: Path, start_gateway, redis_server, tmp_path
):
    proc = start_gateway(
        demo_repo, "--config", str(replica_settings(tmp_path / "g.yaml", redis_server))
    )
    with proc.client() as client:
        assert [outcome(client) for _ in range(BURST + 1)][-1] == "RESOURCE_EXHAUSTED"
        redis_server.stop(signal.SIGKILL)
        # Down: served, unlimited, each within the request's time, and counted.
        started = time.monotonic()
        assert [outcome(client) for _ in range(10)] == ["OK"] * 10
        assert time.monotonic() - started < 10
        assert proc.metric("gateway_state_errors_total", concern="limits") >= 10
        # Back (empty, as a restarted Redis without persistence is): the limit holds again,
        # without a gateway restart (once the first call after the outage gets through).
        redis_server.start()
        wait_until(lambda: outcome(client) == "RESOURCE_EXHAUSTED", "the limit holding again")


def test_redis_down_fails_closed_when_asked(demo_repo: Path, start_gateway, redis_server, tmp_path):
    config = replica_settings(tmp_path / "g.yaml", redis_server, limits_on_error="fail_closed")
    proc = start_gateway(demo_repo, "--config", str(config))
    with proc.client() as client:
        assert outcome(client) == "OK"
        redis_server.stop(signal.SIGKILL)
        started = time.monotonic()
        assert [outcome(client) for _ in range(5)] == ["UNAVAILABLE"] * 5
        assert time.monotonic() - started < 10
        redis_server.start()
        deadline = time.monotonic() + 20
        while outcome(client) != "OK":
            assert time.monotonic() < deadline, "never recovered"
    assert "redis" in proc.stderr().lower() and redis_server.url not in proc.stderr()


# -- budgets ----------------------------------------------------------------------------------

# The demo model's price is 1e-6 a request (plus a little compute): this budget admits the
# request that crosses 2.5e-6, the third, and refuses every one after it.
LIMIT = 2.5e-6
BUDGET = {"name": "acme-day", "tenant": TENANT, "limit": LIMIT, "window_s": 3600}


def budget_settings(path: Path, redis: RedisServer, limit: float = LIMIT, **state: object) -> Path:
    settings = {
        "state": {"backend": "redis", "redis_url": redis.url, "timeout_ms": SLACK_MS, **state},
        "costs": {"budgets": [{**BUDGET, "limit": limit, "policy": "reject"}]},
        "admin": {"token": ADMIN_TOKEN},
        "audit": {"path": None},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def spent(proc: GatewayProcess) -> float:
    with AdminClient(proc.url, ADMIN_TOKEN) as admin:
        (budget,) = [b for b in admin.costs().budgets if b.name == BUDGET["name"]]
    return float(budget.spent)


def uncached(client: triton_grpc.InferenceServerClient, charges: list[float] | None = None) -> str:
    """One uncached request of TENANT's: its status; an answer's charge (its `cost`
    parameter) goes to ``charges``."""
    try:
        result = client.infer(
            "fraud",
            [demo_input()],
            parameters={"tenant": TENANT, "cache": "false"},
            client_timeout=10,
        )
    except InferenceServerException as err:
        return str(err.status()).removeprefix("StatusCode.")
    if charges is not None:
        charges.append(result.get_response().parameters["cost"].double_param)
    return "OK"


def test_a_budget_spent_through_two_replicas_rejects_on_both(
    demo_repo: Path, start_gateway, redis_server, tmp_path
):
    config = budget_settings(tmp_path / "gateway.yaml", redis_server)
    a, b = (start_gateway(demo_repo, "--config", str(config)) for _ in range(2))
    with a.client() as on_a, b.client() as on_b:
        charges: list[float] = []  # the cost on every answer, from either replica
        assert [uncached(on_a, charges), uncached(on_a, charges)] == ["OK", "OK"]
        # B learns A's spend at its next sync (every state.sync_interval_ms).
        wait_until(lambda: spent(b) >= 2e-6, "replica B seeing A's spend")
        # Alone, B would admit three: it admits the one that crosses the budget, then none.
        assert uncached(on_b, charges) == "OK"
        assert uncached(on_b, charges) == "RESOURCE_EXHAUSTED"
        # A admits at most one more (until its next sync shows it B's spend), then none.
        on_a_after: list[str] = []

        def a_refuses() -> bool:
            on_a_after.append(uncached(on_a, charges))
            return on_a_after[-1] == "RESOURCE_EXHAUSTED"

        wait_until(a_refuses, "replica A refusing too")
        assert on_a_after.count("OK") <= 1
    # Both see one total: every request answered, from either replica.
    wait_until(lambda: spent(a) == pytest.approx(spent(b)), "the replicas' views agreeing")
    assert spent(a) >= LIMIT
    # The cost ledger too: either replica reports every request either answered, and sums
    # exactly the charges on their responses.
    answered = 3 + on_a_after.count("OK")
    assert len(charges) == answered
    wait_until(lambda: ledger(a)[0] == ledger(b)[0] == answered, "the ledgers agreeing")
    assert ledger(a)[1] == pytest.approx(sum(charges), rel=1e-9)
    assert ledger(b)[1] == pytest.approx(sum(charges), rel=1e-9)


def ledger(proc: GatewayProcess) -> tuple[int, float]:
    """TENANT's requests and cost in a replica's ledger (every replica's lines)."""
    with AdminClient(proc.url, ADMIN_TOKEN) as admin:
        lines = [line for line in admin.costs().lines if line.tenant == TENANT]
    return sum(line.requests for line in lines), sum(line.cost for line in lines)


def test_budgets_fail_closed_while_redis_is_down(
    demo_repo: Path, start_gateway, redis_server, tmp_path
):
    # A budget far from spent: what refuses here is Redis being away, not the budget.
    config = budget_settings(tmp_path / "gateway.yaml", redis_server, 1.0, sync_interval_ms=100)
    proc = start_gateway(demo_repo, "--config", str(config))
    with proc.client() as client:
        assert uncached(client) == "OK"
        redis_server.stop(signal.SIGKILL)
        wait_until(lambda: uncached(client) == "UNAVAILABLE", "budgeted requests refused")
        # A tenant without a budget is served all along.
        client.infer("fraud", [demo_input()], parameters={"tenant": "other"}, client_timeout=10)
        assert proc.metric("gateway_state_errors_total", concern="budgets") >= 1
        redis_server.start()
        wait_until(lambda: uncached(client) == "OK", "budgets back once Redis answers")
        # What was spent until the refusals began (judged on this replica's own view) was
        # kept and added to the restarted Redis.
        assert spent(proc) >= 2e-6


# -- routes -----------------------------------------------------------------------------------


def route(name: str, version: str) -> str:
    variant = {"name": "v", "model": "fraud", "version": version, "weight": 1}
    spec = {name: {"variants": [variant]}}
    return yaml.safe_dump(spec)


def routes_settings(path: Path, redis: RedisServer, routes: str = "") -> Path:
    settings = {
        "state": {"backend": "redis", "redis_url": redis.url, "timeout_ms": SLACK_MS},
        "routing": {"routes": yaml.safe_load(routes) if routes else {}},
        "admin": {"token": ADMIN_TOKEN},
        "audit": {"path": None},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def routes_of(proc: GatewayProcess) -> admin_pb2.Routes:
    with AdminClient(proc.url, ADMIN_TOKEN) as admin:
        return admin.routes()


def set_routes(proc: GatewayProcess, text: str, expected: int = 0) -> str:
    with AdminClient(proc.url, ADMIN_TOKEN) as admin:
        try:
            admin.set_routes(text, expected_generation=expected)
        except grpc.RpcError as err:
            return err.code().name
    return "OK"


def test_a_route_set_on_one_replica_is_routed_by_all_and_outlives_them(
    demo_repo: Path, start_gateway, redis_server, tmp_path
):
    config = routes_settings(tmp_path / "gateway.yaml", redis_server)
    a = start_gateway(demo_repo, "--config", str(config))
    # B's settings name another route: the table in Redis wins (every process starts its
    # own table at generation 1, so the generation alone could not tell them apart).
    other = routes_settings(tmp_path / "other.yaml", redis_server, route("own", "2"))
    b = start_gateway(demo_repo, "--config", str(other))
    base = routes_of(a).generation
    assert routes_of(b).yaml == routes_of(a).yaml and "own" not in routes_of(b).yaml
    assert set_routes(a, route("scored", "1"), base) == "OK"
    wait_until(lambda: "scored" in routes_of(b).yaml, "replica B routing the new route")
    with b.client() as client:
        assert client.infer("scored", [demo_input()]).get_response().model_version == "1"
    # Two changes from the same generation, one on each replica: one wins.
    now = routes_of(a).generation
    assert routes_of(b).generation == now
    outcomes = sorted(
        [set_routes(a, route("scored", "2"), now), set_routes(b, route("x", "1"), now)]
    )
    assert outcomes == ["FAILED_PRECONDITION", "OK"]
    kept = routes_of(a)
    # Every replica restarted: the routes are Redis', not the settings'.
    for proc in (a, b):
        assert proc.stop() == 0
    c = start_gateway(demo_repo, "--config", str(config))
    assert routes_of(c).yaml == kept.yaml and routes_of(c).generation == kept.generation


def test_workers_take_route_changes_when_the_routes_are_shared(
    demo_repo: Path, start_gateway, redis_server, tmp_path
):
    config = routes_settings(tmp_path / "gateway.yaml", redis_server)
    proc = start_gateway(demo_repo, "--workers", "2", "--config", str(config))
    assert set_routes(proc, route("scored", "2")) == "OK"
    # Fresh connections land on either worker: each routes the change.
    wait_until(
        lambda: all("scored" in routes_of(proc).yaml for _ in range(6)), "every worker routing it"
    )


# -- the response cache -----------------------------------------------------------------------


def cache_settings(path: Path, redis: RedisServer) -> Path:
    variant = {"name": "v", "model": "fraud", "weight": 1, "deterministic": True}
    settings = {
        "state": {"backend": "redis", "redis_url": redis.url, "timeout_ms": SLACK_MS},
        "routing": {
            "routes": {
                "cached-v1": {"variants": [{**variant, "version": "1"}]},
                "cached-v2": {"variants": [{**variant, "version": "2"}]},
            }
        },
        "admin": {"token": ADMIN_TOKEN},
        "audit": {"path": None},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def cached_rows(client: triton_grpc.InferenceServerClient, model: str, seed: int) -> int:
    response = client.infer(model, [demo_input(seed=seed)], client_timeout=10).get_response()
    return int(response.parameters["cached_rows"].int64_param)


def test_a_row_cached_by_one_replica_is_a_hit_on_another(
    demo_repo: Path, start_gateway, redis_server, tmp_path
):
    config = cache_settings(tmp_path / "gateway.yaml", redis_server)
    a, b = (start_gateway(demo_repo, "--config", str(config)) for _ in range(2))
    with a.client() as on_a, b.client() as on_b:
        assert cached_rows(on_a, "cached-v1", seed=21) == 0  # computed on A, stored for all
        wait_until(lambda: shared_rows(redis_server) == 1, "A's row in Redis")
        # B loads the model again (another load in B's process, the same file): no matter.
        on_b.unload_model("fraud", headers=ADMIN_HEADERS)
        on_b.load_model("fraud", headers=ADMIN_HEADERS)
        # B's first sight of the row: a hit (B never computed it).
        assert cached_rows(on_b, "cached-v1", seed=21) == 1
        assert b.metric("gateway_cache_rows_total", outcome="hit") == 1
        # Another version of the model never meets the row.
        assert cached_rows(on_b, "cached-v2", seed=21) == 0
        # Redis away: a miss, computed and answered, counted; back: shared again.
        redis_server.stop(signal.SIGKILL)
        assert cached_rows(on_a, "cached-v1", seed=22) == 0
        assert a.metric("gateway_state_errors_total", concern="cache") >= 1
        redis_server.start()
        seeds = iter(range(100, 1000))

        def a_row_shared_again() -> bool:
            cached_rows(on_a, "cached-v1", seed=next(seeds))  # a new row each time
            return shared_rows(redis_server) > 0

        wait_until(a_row_shared_again, "A's rows stored in Redis again")


def test_rows_on_a_cache_redis_of_their_own_are_bounded_by_its_eviction(
    demo_repo: Path, start_gateway, redis_server, tmp_path
):
    """state.cache_redis_url: the rows go to a Redis run with maxmemory and allkeys-lru, which
    evicts rows to stay in its bound; the state's Redis holds none of them."""
    cache_redis = RedisServer(
        tmp_path / "cache-redis",
        options=("--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru"),
    )
    try:
        config = cache_settings(tmp_path / "gateway.yaml", redis_server)
        settings = yaml.safe_load(config.read_text())
        settings["state"]["cache_redis_url"] = cache_redis.url
        config.write_text(yaml.safe_dump(settings))
        proc = start_gateway(demo_repo, "--config", str(config))
        with contextlib.closing(Redis(port=cache_redis.port)) as rows:
            with proc.client() as client:
                for seed in range(40):  # 20,000 distinct rows, several MB of them
                    rows_input = demo_input(rows=500, seed=1000 + seed)
                    client.infer("cached-v1", [rows_input], client_timeout=30)
            wait_until(lambda: int(rows.info("stats")["evicted_keys"]) > 0, "rows evicted")
            memory = rows.info("memory")
            assert memory["used_memory"] <= memory["maxmemory"] * 1.05
            assert rows.dbsize() > 0  # the newest rows stay
        assert shared_rows(redis_server) == 0  # none on the state's Redis
        assert proc.metric("gateway_state_errors_total", concern="cache") == 0
    finally:
        cache_redis.stop(signal.SIGKILL)


def shared_rows(redis: RedisServer) -> int:
    """Rows the replicas have stored in Redis (a client of the test's own)."""
    with contextlib.closing(Redis(port=redis.port)) as client:
        return len(client.keys("gateway:rows:*"))


# -- the shared state's operations, against the real Redis ---------------------------------


async def test_redis_operations_are_exact_and_idempotent(redis_server):
    settings = StateSettings(backend="redis", redis_url=redis_server.url, timeout_ms=SLACK_MS)
    one, two = RedisState(settings), RedisState(settings)  # two replicas
    try:
        # GCRA: burst 1 at 0.5/s: the second request waits the whole interval (2 s), to the
        # microsecond's rounding, not a rounded timestamp's.
        assert await one.limits.take("t", 0.5, 1) is None
        wait_s = await two.limits.take("t", 0.5, 1)
        assert wait_s is not None and 1.9 < wait_s <= 2.0
        # Budgets: a replica's spend is set, not added: told twice (an answer that came too
        # late, then the next sync), it counts once; two replicas' spends add up.
        assert await one.budgets.sync([("b", 0, 1.5, 60)]) == [1.5]
        assert await one.budgets.sync([("b", 0, 1.5, 60)]) == [1.5]
        assert await two.budgets.sync([("b", 0, 0.25, 60)]) == [1.75]
        # Routes: a write based on a generation no longer current is refused by Redis itself.
        assert await one.routes.write(0, {"generation": 1, "routes": {}})
        assert not await two.routes.write(0, {"generation": 1, "routes": {"x": 1}})
        assert await two.routes.write(1, {"generation": 2, "routes": {}})
        assert (await one.routes.read() or {})["generation"] == 2
    finally:
        await one.close()
        await two.close()


def test_a_redis_that_hangs_costs_requests_a_bounded_wait(
    demo_repo: Path, start_gateway, redis_server, tmp_path
):
    """Redis stopped (SIGSTOP: connections stay open, nothing answers): each request is still
    answered (limits fail open, the cache misses), none waits for Redis past the state's
    timeout; once Redis runs again the limit holds again."""
    config = replica_settings(tmp_path / "g.yaml", redis_server, timeout_ms=200)
    proc = start_gateway(demo_repo, "--config", str(config))
    with proc.client() as client:
        assert outcome(client) == "OK"
        assert redis_server.process is not None
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            assert [outcome(client) for _ in range(20)] == ["OK"] * 20
            assert proc.metric("gateway_state_errors_total", concern="limits") >= 1
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        wait_until(lambda: outcome(client) == "RESOURCE_EXHAUSTED", "the limit holding again")


def test_a_request_waits_for_redis_no_longer_than_its_deadline(
    demo_repo: Path, start_gateway, redis_server, tmp_path
):
    """Redis hung and a state timeout (5 s) longer than the request's deadline (300 ms): the
    request is DEADLINE_EXCEEDED at its deadline, not served unlimited 5 s later, and Redis is
    not counted as failed for it (the request ran out of time, not Redis)."""
    config = replica_settings(tmp_path / "g.yaml", redis_server, timeout_ms=5000)
    proc = start_gateway(demo_repo, "--config", str(config))
    with proc.client() as client:
        assert outcome(client) == "OK"
        assert redis_server.process is not None
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(InferenceServerException) as refused:
                client.infer(
                    "fraud",
                    [demo_input()],
                    parameters={"tenant": TENANT, "timeout_ms": 300},
                    client_timeout=4,  # under the state's 5 s: only the deadline can answer
                )
            assert refused.value.status() == "StatusCode.DEADLINE_EXCEEDED"
            assert "Redis" in str(refused.value.message())
            assert proc.metric("gateway_state_errors_total", concern="limits") == 0
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        # No breaker tripped (Redis answered the abandoned call once running again): the
        # bucket in Redis is spent at once, not served unlimited for a second.
        assert [outcome(client) for _ in range(BURST + 1)][-1] == "RESOURCE_EXHAUSTED"


def test_short_deadlines_against_a_hung_redis_trip_the_breaker(
    demo_repo: Path, start_gateway, redis_server, tmp_path
):
    """Deadlines (100 ms) shorter than the state's timeout (300 ms) against a hung Redis: the
    first requests wait out their deadlines, but the calls they left run on to the timeout and
    trip the breaker, so the next ones are served at once (fail_open) and counted."""
    config = replica_settings(tmp_path / "g.yaml", redis_server, timeout_ms=300)
    proc = start_gateway(demo_repo, "--config", str(config))
    with proc.client() as client:
        assert outcome(client) == "OK"
        assert redis_server.process is not None
        redis_server.process.send_signal(signal.SIGSTOP)
        try:

            def served_open() -> bool:
                return outcome(client, timeout_ms="100") == "OK"

            wait_until(served_open, "requests served open once the breaker tripped")
            assert proc.metric("gateway_state_errors_total", concern="limits") >= 1
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
