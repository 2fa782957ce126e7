"""The route table: the weighted split, stickiness, match rules, promote and rollback."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from gateway.errors import FailedPrecondition, InvalidRequest, ModelNotFound
from gateway.routing import Route, RouteTable, unit_hash
from gateway.settings import RouteSpec, VariantSpec
from gateway.types import ParameterValue, RequestOptions


def options(parameters: dict[str, ParameterValue]) -> RequestOptions:
    return RequestOptions.parse(parameters)


def spec(**extra: object) -> RouteSpec:
    return RouteSpec.model_validate(
        {
            "variants": [
                {"name": "stable", "model": "fraud", "version": "1", "weight": 90},
                {"name": "canary", "model": "fraud", "version": "2", "weight": 10, "arm": "canary"},
                {"name": "default", "output": {"probability": [0.5]}},
            ],
            **extra,
        }
    )


def test_the_split_over_10000_sticky_keys_is_within_binomial_tolerance_and_sticky():
    route = RouteTable({"scorer": spec()}, history=4).get("scorer")
    assert route is not None
    n, p = 10_000, 0.10
    arms = [route.choose(options({"sticky_key": f"user-{i}"})).name for i in range(n)]
    canary = arms.count("canary")
    sigma = math.sqrt(n * p * (1 - p))  # 30 rows
    assert abs(canary - n * p) < 4 * sigma, canary
    assert set(arms) == {"stable", "canary"}  # a static variant has no weight: never drawn
    # The same key, asked again (and by a fresh table, as after a restart): the same arm.
    again = RouteTable({"scorer": spec()}, history=4).get("scorer")
    assert again is not None
    assert [again.choose(options({"sticky_key": f"user-{i}"})).name for i in range(n)] == arms
    # Integer keys are keys too; the hash is xxh3 of route and key, stable across runs.
    assert (
        route.choose(options({"sticky_key": 42})).name
        == route.choose(options({"sticky_key": "42"})).name
    )
    assert unit_hash("scorer", "user-1") == unit_hash("scorer", "user-1")
    assert 0.0 <= unit_hash("scorer", "user-1") < 1.0


def test_without_a_key_the_draw_is_random_with_the_weights():
    route = RouteTable({"scorer": spec()}, history=4).get("scorer")
    assert route is not None
    n = 10_000
    canary = sum(route.choose(options({})).name == "canary" for _ in range(n))
    assert abs(canary - 1000) < 4 * math.sqrt(n * 0.09)


def test_match_rules_come_first_and_compare_text():
    routes = RouteTable(
        {"scorer": spec(match=[{"when": {"segment.geo": "BR", "tier": "1"}, "variant": "canary"}])},
        history=4,
    )
    route = routes.get("scorer")
    assert route is not None
    assert (
        route.choose(options({"segment.geo": "BR", "tier": 1, "sticky_key": "k"})).name == "canary"
    )
    keys = [f"k{i}" for i in range(200)]
    others = {
        route.choose(options({"segment.geo": "US", "tier": 1, "sticky_key": k})).name for k in keys
    }
    assert others == {"stable", "canary"}  # no match: the weighted split
    with pytest.raises(InvalidRequest, match="sticky_key"):
        route.choose(options({"sticky_key": 1.5}))


def test_promote_then_rollback_restores_the_previous_spec():
    routes = RouteTable({"scorer": spec(match=[{"when": {"a": "b"}, "variant": "stable"}])}, 4)
    before = routes.get("scorer")
    assert before is not None
    promoted = routes.promote("scorer", "canary")
    assert {v.name: v.weight for v in promoted.spec.variants}["canary"] == 1.0
    assert all(
        promoted.choose(options({"sticky_key": f"k{i}", "a": "b"})).name == "canary"
        for i in range(100)
    )
    assert promoted.revision > before.revision
    with pytest.raises(InvalidRequest, match="static"):
        routes.promote("scorer", "default")
    with pytest.raises(ModelNotFound, match="no variant 'nope'"):
        routes.promote("scorer", "nope")
    restored = routes.rollback("scorer")
    assert restored is not None and restored.spec == before.spec
    with pytest.raises(ModelNotFound, match="no earlier spec"):
        routes.rollback("scorer")  # the starting table has nothing before it


def test_replace_keeps_history_and_a_new_route_rolls_back_to_nothing():
    routes = RouteTable({}, history=2)
    assert routes.replace({"scorer": spec()}) == ["scorer"]
    assert routes.replace({"scorer": spec()}) == []  # unchanged: no history entry
    assert routes.rollback("scorer") is None  # before it, there was no route
    assert routes.get("scorer") is None


def test_each_variant_falls_back_through_the_route_fallbacks_but_never_to_itself():
    route = RouteTable({"scorer": spec(fallbacks=["stable", "default"])}, 4).get("scorer")
    assert route is not None
    chains = {name: [v.name for v in chain] for name, chain in route.chains.items()}
    assert chains == {
        "stable": ["stable", "default"],
        "canary": ["canary", "stable", "default"],
        "default": ["default", "stable"],
    }


def test_rollback_history_keeps_only_the_last_specs():
    routes = RouteTable({}, history=2)
    for weight in (1, 2, 3):
        routes.replace({"scorer": spec(match=[{"when": {"w": str(weight)}, "variant": "stable"}])})
    latest = routes.get("scorer")
    assert latest is not None and latest.spec.match[0].when == {"w": "3"}
    first = routes.rollback("scorer")
    assert first is not None and first.spec.match[0].when == {"w": "2"}
    second = routes.rollback("scorer")
    assert second is not None and second.spec.match[0].when == {"w": "1"}
    with pytest.raises(ModelNotFound, match="no earlier spec"):
        routes.rollback("scorer")  # the first spec's "nothing before" was pushed out


def test_a_decision_threshold_is_set_raised_to_its_max_and_outlives_a_rollback():
    decided = {
        "variants": [{"name": "v", "model": "m", "weight": 1}],
        "decision": {"output": "probability", "threshold": 0.5, "max_threshold": 0.8},
    }
    table = RouteTable(
        {
            "d": RouteSpec.model_validate(decided),
            "plain": RouteSpec.model_validate({"variants": decided["variants"]}),
        },
        4,
    )

    def threshold(route: Route | None) -> float:
        assert route is not None and route.spec.decision is not None
        return route.spec.decision.threshold

    assert threshold(table.set_threshold("d", None, 0.2)) == pytest.approx(0.7)
    assert threshold(table.set_threshold("d", None, 0.2)) == 0.8  # capped
    with pytest.raises(FailedPrecondition, match=r"at its max_threshold 0\.8"):
        table.set_threshold("d", None, 0.1)
    assert threshold(table.set_threshold("d", 0.95, 0.0)) == 0.95  # a person's, any value
    # A rollback restores what serves, not a threshold: with only threshold changes there is
    # nothing to go back to; after a change of variants, those go back and the threshold stays.
    with pytest.raises(ModelNotFound, match="no earlier spec"):
        table.rollback("d")
    served = table.get("d")
    assert served is not None
    two = served.spec.model_copy(
        update={"variants": (*served.spec.variants, VariantSpec(name="w", model="m2", weight=1))}
    )
    table.replace({"d": two, "plain": RouteSpec.model_validate({"variants": decided["variants"]})})
    table.set_threshold("d", 0.6, 0.0)
    back = table.rollback("d")
    assert back is not None and [v.name for v in back.spec.variants] == ["v"]
    assert threshold(back) == 0.6
    with pytest.raises(FailedPrecondition, match="route 'plain' has no decision threshold"):
        table.set_threshold("plain", 0.4, 0.0)
    with pytest.raises(ValidationError, match="the score output's own"):
        RouteSpec.model_validate(
            {**decided, "decision": {"output": "probability", "name": "probability"}}
        )
