"""The demo model repository, built from code alone: a fraud scorer on synthetic transactions.

``gateway demo-repo DIR`` writes ``DIR/fraud`` with two versions trained with numpy on the same
synthetic data (deterministic given the seed) and exported to ONNX with ``onnx.helper``:

* version 1: logistic regression;
* version 2: a one-hidden-layer MLP (tanh), a little better on held-out rows.

Raw transactions have numeric and categorical features. ``features.yaml`` holds the two
contract versions that turn them into the dense ``features`` matrix (v1 for model version 1,
v2 for version 2); ``training.yaml`` records the seed and each version's held-out AUC.

Beside the model it writes ``DIR/gateway.yaml``, the settings ``make serve`` runs with: a route
``fraud-live`` (version 2 stable, version 1 as a 10% canary, a static last resort), prices, a
rate limit and a budget for tenant ``demo``, and the admin service's token in
``DIR/admin.token`` (random, readable by the owner only); and ``DIR/perf_analyzer_data.json``,
raw transactions for ``perf_analyzer --input-data`` (its default random data breaks the
contract: an hour of -1e18 is refused).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
import yaml
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from gateway.evaluation.profile import (
    REFERENCE_FILE,
    categorical_profile,
    numeric_profile,
    write_reference,
)
from gateway.features import CONTRACT_FILE, assemble, load_contracts

__all__ = [
    "CATEGORIES",
    "NUMERIC",
    "PERF_ANALYZER_DATA",
    "build_demo_repository",
    "contract_file",
    "synthetic_transactions",
    "write_demo_settings",
    "write_perf_analyzer_data",
]

NUMERIC: Final = ("amount", "hour", "account_age_days", "tx_count_24h", "distance_km")
CATEGORIES: Final[dict[str, tuple[str, ...]]] = {
    "merchant_category": ("grocery", "electronics", "travel", "gaming", "fuel", "fashion"),
    "channel": ("pos", "web", "app"),
    "country": ("US", "BR", "DE", "IN", "NG"),
}
MODEL_NAME: Final = "fraud"
OPSET: Final = 17
PERF_ANALYZER_DATA: Final = "perf_analyzer_data.json"
PERF_ANALYZER_ROWS: Final = 256
DEMO_TENANT: Final = "demo"

Columns = dict[str, NDArray[Any]]


def synthetic_transactions(rows: int, seed: int) -> tuple[Columns, NDArray[np.float32]]:
    """Raw transaction columns and fraud labels (about 6% positive)."""
    rng = np.random.default_rng(seed)
    cols: Columns = {
        "amount": rng.lognormal(3.5, 1.2, rows),
        "hour": rng.integers(0, 24, rows),
        "account_age_days": rng.gamma(2.0, 300.0, rows),
        "tx_count_24h": rng.poisson(3.0, rows),
        "distance_km": rng.exponential(20.0, rows),
    }
    for name, vocab in CATEGORIES.items():
        weights = np.linspace(2.0, 1.0, len(vocab))
        cols[name] = rng.choice(np.array(vocab, dtype=object), rows, p=weights / weights.sum())
    night = (cols["hour"] < 5).astype(np.float64)
    logit = (
        -4.2
        + 0.55 * (np.log1p(cols["amount"]) - 3.5)
        + 1.1 * night
        - 0.9 * np.log1p(cols["account_age_days"] / 100.0)
        + 0.25 * cols["tx_count_24h"] * night
        + 0.6 * np.log1p(cols["distance_km"] / 50.0)
        + 1.2 * (cols["merchant_category"] == "electronics")
        + 0.9 * (cols["merchant_category"] == "gaming")
        + 0.8 * (cols["channel"] == "web")
        + 1.0 * (cols["country"] == "NG")
    )
    labels = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return cols, labels


def _log_stats(values: NDArray[Any]) -> dict[str, float]:
    logged = np.log1p(np.asarray(values, dtype=np.float64))
    return {"mean": round(float(logged.mean()), 6), "std": round(float(logged.std()) + 1e-6, 6)}


def _stats(values: NDArray[Any]) -> dict[str, float]:
    raw = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(raw.mean()), 6), "std": round(float(raw.std()) + 1e-6, 6)}


def contract_file(train: Columns) -> dict[str, Any]:
    """features.yaml: two contract versions, with statistics from the training rows.

    v2 differs from v1 in how it sees the hour (day-part buckets instead of a standardised
    hour) and clips amounts instead of flagging them: the two model versions are trained on
    different matrices, and served side by side.
    """

    def numeric(*, name: str, kind: str, description: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "kind": kind,
            "owner": "risk-data",
            "description": description,
            **extra,
        }

    def categorical(*, name: str, description: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "kind": "categorical",
            "owner": "risk-data",
            "description": description,
            "vocabulary": list(CATEGORIES[name]),
            "encoding": "one_hot",
            **extra,
        }

    amount = _log_stats(train["amount"])
    age = _log_stats(train["account_age_days"])
    distance = _log_stats(train["distance_km"])

    def version(amount_policy: str, hour: dict[str, Any], description: str) -> dict[str, Any]:
        return {
            "description": description,
            "input": "features",
            "unknown_features": "reject",
            "features": [
                numeric(
                    name="amount",
                    kind="float",
                    description="Transaction amount, USD.",
                    range={"min": 0, "max": 50_000, "policy": amount_policy},
                    transform=["log1p", {"standardize": {**amount}}],
                ),
                numeric(
                    name="hour",
                    kind="int",
                    description="Local hour of the transaction, 0-23.",
                    range={"min": 0, "max": 23, "policy": "reject"},
                    transform=[hour],
                ),
                numeric(
                    name="account_age_days",
                    kind="float",
                    description="Days since the account opened.",
                    null_policy={"default": 0.0},
                    range={"min": 0, "policy": "flag"},
                    transform=["log1p", {"standardize": {**age}}],
                ),
                numeric(
                    name="tx_count_24h",
                    kind="int",
                    description="Card transactions in the previous 24 hours.",
                    null_policy={"default": 0},
                    range={"min": 0, "max": 500, "policy": "clip"},
                    transform=[{"standardize": _stats(train["tx_count_24h"])}],
                ),
                numeric(
                    name="distance_km",
                    kind="float",
                    description="Distance from the cardholder's home.",
                    null_policy={"default": 0.0},
                    range={"min": 0, "policy": "flag"},
                    transform=["log1p", {"standardize": {**distance}}],
                ),
                categorical(
                    name="merchant_category",
                    description="Merchant category group.",
                    null_policy={"default": None},
                ),
                categorical(name="channel", description="Where the card was used."),
                categorical(
                    name="country",
                    description="Issuing country of the card.",
                    null_policy={"default": None},
                    sensitive=True,
                ),
            ],
        }

    return {
        "versions": {
            "v1": version(
                "flag",
                {"standardize": _stats(train["hour"])},
                "Standardised numerics (log scale for heavy tails), one-hot categories.",
            ),
            "v2": version(
                "clip",
                {"bucketize": {"boundaries": [5, 12, 18]}},
                "As v1, with the hour as day-part buckets and amounts clipped at 50,000.",
            ),
        }
    }


def _sigmoid(z: NDArray[np.float64]) -> NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-z))


def train_logistic(
    x: NDArray[np.float32], y: NDArray[np.float32], steps: int = 400
) -> dict[str, NDArray[np.float32]]:
    w = np.zeros((x.shape[1], 1))
    b = np.zeros(1)
    for _ in range(steps):
        p = _sigmoid(x @ w + b)[:, 0]
        grad = p - y
        w -= 0.5 * (x.T @ grad)[:, None] / len(y)
        b -= 0.5 * grad.mean()
    return {"w": w.astype(np.float32), "b": b.astype(np.float32)}


def train_mlp(
    x: NDArray[np.float32], y: NDArray[np.float32], seed: int, hidden: int = 16, steps: int = 600
) -> dict[str, NDArray[np.float32]]:
    rng = np.random.default_rng(seed + 1)
    w1 = rng.normal(0, 1 / np.sqrt(x.shape[1]), (x.shape[1], hidden))
    b1 = np.zeros(hidden)
    w2 = rng.normal(0, 1 / np.sqrt(hidden), (hidden, 1))
    b2 = np.zeros(1)
    lr = 0.5
    for _ in range(steps):
        h = np.tanh(x @ w1 + b1)
        p = _sigmoid(h @ w2 + b2)[:, 0]
        g = (p - y)[:, None] / len(y)
        gw2, gb2 = h.T @ g, g.sum(axis=0)
        gh = (g @ w2.T) * (1 - h**2)
        gw1, gb1 = x.T @ gh, gh.sum(axis=0)
        w1 -= lr * gw1
        b1 -= lr * gb1
        w2 -= lr * gw2
        b2 -= lr * gb2
    return {k: v.astype(np.float32) for k, v in {"w1": w1, "b1": b1, "w2": w2, "b2": b2}.items()}


def predict(params: dict[str, NDArray[np.float32]], x: NDArray[np.float32]) -> NDArray[np.float32]:
    """The numpy forward pass the exported ONNX graph computes (a reference for tests)."""
    if "w" in params:
        z = x @ params["w"] + params["b"]
    else:
        z = np.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
    return np.asarray(1.0 / (1.0 + np.exp(-z)), dtype=np.float32)


def to_onnx(params: dict[str, NDArray[np.float32]], width: int, doc: str) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(v, name=k) for k, v in sorted(params.items())]
    if "w" in params:
        nodes = [
            helper.make_node("MatMul", ["features", "w"], ["z0"]),
            helper.make_node("Add", ["z0", "b"], ["logit"]),
        ]
    else:
        nodes = [
            helper.make_node("MatMul", ["features", "w1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Tanh", ["h1"], ["h"]),
            helper.make_node("MatMul", ["h", "w2"], ["z0"]),
            helper.make_node("Add", ["z0", "b2"], ["logit"]),
        ]
    nodes.append(helper.make_node("Sigmoid", ["logit"], ["probability"]))
    graph = helper.make_graph(
        nodes,
        MODEL_NAME,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="gateway-demo",
        doc_string=doc,
    )
    model.ir_version = 8  # readable by every ONNX Runtime this project supports
    onnx.checker.check_model(model)
    return model


def _auc(y: NDArray[np.float32], score: NDArray[np.float32]) -> float:
    order = np.argsort(score)
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    pos = y == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def build_demo_repository(root: Path, seed: int = 7, rows: int = 20_000) -> Path:
    """Write the demo repository under ``root`` and return the model directory.

    Each version is trained on the matrix its contract version builds through the offline
    feature API: the one the gateway builds when serving the same raw rows.
    """
    cols, labels = synthetic_transactions(rows, seed)
    split = int(rows * 0.8)
    train = {k: v[:split] for k, v in cols.items()}
    held = {k: v[split:] for k, v in cols.items()}
    y_train, y_held = labels[:split], labels[split:]
    model_dir = root / MODEL_NAME
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / CONTRACT_FILE).write_text(yaml.safe_dump(contract_file(train), sort_keys=False))
    contracts = load_contracts(model_dir)
    summary = {}
    # The drift reference: the training rows' raw features, and per version its input
    # columns and output, as the sidecar will see them in prediction events.
    reference: dict[str, Any] = {
        "model": MODEL_NAME,
        "source": f"demo training data: {split} rows, seed {seed}",
        "features": {
            name: categorical_profile(values) if values.dtype == object else numeric_profile(values)
            for name, values in train.items()
        },
        "versions": {},
    }
    for version, contract_version, kind in (
        (1, "v1", "logistic regression"),
        (2, "v2", "MLP, 16 tanh units"),
    ):
        contract = contracts[contract_version]
        x_train, x_held = assemble(contract, train), assemble(contract, held)
        if version == 1:
            params = train_logistic(x_train, y_train)
        else:
            params = train_mlp(x_train, y_train, seed)
        auc = _auc(y_held, predict(params, x_held)[:, 0])
        reference["versions"][str(version)] = {
            "inputs": {
                f"features[{j}]": numeric_profile(x_train[:, j]) for j in range(contract.width)
            },
            "outputs": {"probability": numeric_profile(predict(params, x_train)[:, 0])},
        }
        summary[version] = {
            "kind": kind,
            "contract": contract_version,
            "held_out_auc": round(auc, 4),
        }
        target = model_dir / str(version)
        target.mkdir(parents=True, exist_ok=True)
        model = to_onnx(params, contract.width, f"fraud scorer v{version}: {kind}")
        (target / "model.onnx").write_bytes(model.SerializeToString())
        np.savez(target / "params.npz", **params)  # type: ignore[arg-type]
    config = {
        "description": "Fraud scorer on synthetic card transactions (demo).",
        "max_batch_size": 1024,
        "version_policy": {"all": True},
        "instances": 2,
        "dynamic_batching": {"max_queue_delay_us": 0},
        "contract": {"by_model_version": {1: "v1", 2: "v2"}},
        # What a second of this CPU and a request cost, in dollars: the ledger's unit.
        "price": {"compute_second": 0.0001, "request": 0.000001},
    }
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_reference(model_dir / REFERENCE_FILE, reference)
    training = {"seed": seed, "rows": rows, "versions": summary}
    (model_dir / "training.yaml").write_text(yaml.safe_dump(training, sort_keys=False))
    write_demo_settings(root)
    write_perf_analyzer_data(root / PERF_ANALYZER_DATA, held)
    return model_dir


def write_perf_analyzer_data(path: Path, cols: Columns, rows: int = PERF_ANALYZER_ROWS) -> Path:
    """``path``: the first ``rows`` transactions of ``cols`` as perf_analyzer's ``--input-data``
    JSON, one request of one row per entry (``{"data": [{"amount": {"content": [12.5],
    "shape": [1]}, ...}, ...]}``), sent round-robin. Numbers as JSON numbers, categories
    (BYTES) as strings; every row is valid under both contract versions."""
    count = min(rows, *(len(values) for values in cols.values()))

    def value(values: NDArray[Any], i: int) -> float | int | str:
        item = values[i]
        if values.dtype == object:
            return str(item)
        if values.dtype.kind in "iu":
            return int(item)
        return round(float(item), 4)

    data = [
        {name: {"content": [value(values, i)], "shape": [1]} for name, values in cols.items()}
        for i in range(count)
    ]
    path.write_text(json.dumps({"data": data}) + "\n")
    return path


def write_demo_settings(root: Path) -> Path:
    """``root/gateway.yaml``: the demo's routes, limits, budget and admin token file."""
    token = root / "admin.token"
    if not token.exists():
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(24) + "\n")
    settings = {
        "routing": {
            "routes": {
                "fraud-live": {
                    "variants": [
                        {
                            "name": "stable",
                            "model": MODEL_NAME,
                            "version": "2",
                            "weight": 90,
                            "deterministic": True,
                        },
                        {
                            "name": "canary",
                            "model": MODEL_NAME,
                            "version": "1",
                            "weight": 10,
                            "arm": "canary",
                            "deterministic": True,
                        },
                        {"name": "safe-default", "output": {"probability": [0.0]}},
                    ],
                    "fallbacks": ["stable", "safe-default"],
                    "timeout_ms": 250,
                }
            },
            # The budget's tenant, not "*" (every tenant, the anonymous one included): a load
            # test without a tenant (the README's perf_analyzer commands) measures the gateway,
            # not this limit.
            "rate_limits": {DEMO_TENANT: {"rate": 2000, "burst": 4000}},
        },
        "costs": {
            "budgets": [
                {
                    "name": "demo-tenant",
                    "tenant": DEMO_TENANT,
                    "limit": 0.01,
                    "window_s": 3600,
                    "policy": "alert",
                },
            ]
        },
        "admin": {"token_file": str(token.resolve())},
        # Read by the sidecar `serve --with-sidecar` starts: `gateway verdict fraud` judges
        # the route's canary (version 1) against its stable variant (version 2).
        "evaluation": {
            "canaries": [{"model": MODEL_NAME, "stable": "2", "candidate": "1"}],
        },
    }
    path = root / "gateway.yaml"
    header = "# The demo's settings (gateway demo-repo writes them; make serve uses them).\n"
    path.write_text(header + yaml.safe_dump(settings, sort_keys=False))
    return path
