"""A route's decision threshold on a real router, the serving stage behind it scripted: the
decision is the score's first column at or above the threshold, BOOL [rows, 1], for any
number of rows (none included), and nothing is added where the score is not returned."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.routing import Attempt, Router, RouteTable
from gateway.settings import RouteSpec
from gateway.telemetry import GatewayMetrics
from gateway.types import FREE, Answer, InferRequest, InferResponse, Tensor

SPEC = RouteSpec.model_validate(
    {
        "variants": [{"name": "v", "model": "m", "weight": 1}],
        "decision": {"output": "probability", "threshold": 0.5},
    }
)


def router(scores: np.ndarray, name: str = "probability") -> Router:
    async def serve(request: InferRequest, attempt: Attempt) -> Answer:
        return Answer(InferResponse("m", "1", request.id, [Tensor(name, "FP32", scores)]), FREE)

    return Router(
        RouteTable({"d": SPEC}, 4), GatewayMetrics(), serve, lambda *_: None, lambda *_: {}
    )


@pytest.mark.parametrize("rows", [0, 1, 3])
async def test_the_decision_is_the_score_at_or_above_the_threshold(rows: int):
    scores = np.array([[0.2, 9.0], [0.5, 0.0], [0.9, 0.0]], np.float32)[:rows]
    response = (await router(scores).answer(InferRequest("d"), None, None)).response
    [_score, decision] = response.outputs
    assert decision.name == "decision" and decision.datatype == "BOOL"
    assert decision.data.shape == (rows, 1)
    assert decision.data[:, 0].tolist() == [False, True, True][:rows]  # first column only
    assert response.parameters["decision_threshold"] == 0.5


async def test_no_decision_without_its_score_in_the_response():
    scores = np.array([[0.7]], np.float32)
    response = (await router(scores, "other").answer(InferRequest("d"), None, None)).response
    assert [t.name for t in response.outputs] == ["other"]
