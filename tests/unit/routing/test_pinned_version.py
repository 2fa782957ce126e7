"""A request that pins a model version talks to the model of that name; routes have no
versions, so pinning one on a route that is not also a model's name is NOT_FOUND saying so
(not "model 'fraud-live' is not known")."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from gateway.errors import ModelNotFound, ModelNotReady
from gateway.routing import Attempt, Router, RouteTable
from gateway.settings import RouteSpec
from gateway.telemetry import GatewayMetrics
from gateway.types import FREE, Answer, InferRequest, InferResponse, TensorSpec

ROUTE = RouteSpec.model_validate(
    {
        "variants": [
            {"name": "stable", "model": "fraud", "version": "2", "weight": 9},
            {"name": "canary", "model": "fraud", "version": "1", "weight": 1},
            {"name": "other", "model": "other", "weight": 0},
            {"name": "safe", "output": {"probability": [0.0]}},
        ]
    }
)
STATIC = RouteSpec.model_validate(
    {"variants": [{"name": "safe", "output": {"p": [0.0]}, "weight": 1}]}
)


def router(models: dict[str, str]) -> tuple[Router, list[Attempt]]:
    """A router over routes ``live``, ``static`` and ``fraud`` (a route named like a model),
    and the attempts it made; ``models``: name -> "ready" or "loading"."""
    attempts: list[Attempt] = []

    async def serve(request: InferRequest, attempt: Attempt) -> Answer:
        attempts.append(attempt)
        return Answer(InferResponse(attempt.model, attempt.version, request.id, []), FREE)

    def output_specs(model: str, version: str) -> Mapping[str, TensorSpec]:
        if model not in models:
            raise ModelNotFound(f"model '{model}' is not known")
        if models[model] != "ready":
            raise ModelNotReady(f"model '{model}' is not loaded")
        return {}

    table = RouteTable({"live": ROUTE, "static": STATIC, "fraud": ROUTE}, 4)
    return Router(table, GatewayMetrics(), serve, lambda *_: None, output_specs), attempts


async def test_a_version_on_a_route_is_not_found_naming_the_route_and_its_models():
    routes, attempts = router({"fraud": "ready", "other": "ready"})
    with pytest.raises(ModelNotFound) as info:
        await routes.answer(InferRequest("live", model_version="2"), None, None)
    message = str(info.value)
    assert message.startswith("'live' is a route, and routes have no versions")
    assert "without a model version" in message
    assert message.endswith("call model 'fraud' with version '2' or model 'other' with version '2'")
    with pytest.raises(ModelNotFound, match="routes have no versions: call it without a model "):
        await routes.answer(InferRequest("static", model_version="1"), None, None)
    assert attempts == []


async def test_without_a_version_the_route_answers():
    routes, attempts = router({"fraud": "ready"})
    answer = await routes.answer(InferRequest("live"), None, None)
    assert answer.route == "live" and attempts[0].model == "fraud"


@pytest.mark.parametrize("state", ["ready", "loading"])
async def test_a_version_on_a_name_that_is_also_a_model_goes_to_that_model(state: str):
    routes, attempts = router({"fraud": state})
    answer = await routes.answer(InferRequest("fraud", model_version="1"), None, None)
    assert answer.route == ""  # the model itself, not the route
    assert [(a.model, a.version) for a in attempts] == [("fraud", "1")]
