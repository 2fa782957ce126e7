"""Feature contracts and assembly: raw named features -> the model's dense input.

The offline API, for training pipelines and backfills, builds exactly the matrix the server
builds from the same rows::

    from gateway import features

    contract = features.load_contract("models/fraud", "v2")   # or features.yaml itself
    x = features.assemble(contract, {"amount": [12.5, None], "country": ["BR", "US"]})
    report = features.assemble_columns(contract, table)       # a pyarrow Table works too
    report.matrix, report.coverage()

``ContractViolation`` (an ``InvalidRequest``) names the feature and the first bad row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from gateway.features.assembly import Assembly, assemble_columns
from gateway.features.contract import (
    CONTRACT_FILE,
    Contract,
    ContractViolation,
    load_contract,
    load_contracts,
    model_contracts,
    redact,
)
from gateway.features.spec import FeatureSpec
from gateway.types import OUTCOMES

__all__ = [
    "CONTRACT_FILE",
    "OUTCOMES",
    "Assembly",
    "Contract",
    "ContractViolation",
    "FeatureSpec",
    "assemble",
    "assemble_columns",
    "load_contract",
    "load_contracts",
    "model_contracts",
    "redact",
]


def assemble(contract: Contract, columns: Any) -> NDArray[np.float32]:
    """The model input matrix (float32 [rows, contract.width]) for named raw columns."""
    return assemble_columns(contract, columns).matrix
