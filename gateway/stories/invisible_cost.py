"""invisible-cost: a new surface (search) quietly reuses the expensive route checkout pays
for. The per-surface ledger shows search's spend growing at the premium unit cost; its budget
crosses and, with policy degrade, the route serves search from the cheaper variant, at a tenth
of the unit cost, while checkout keeps the premium one."""

from __future__ import annotations

import secrets
from collections import defaultdict
from pathlib import Path
from typing import Any, TextIO

from gateway.demo import synthetic_transactions
from gateway.server.admin_client import AdminClient
from gateway.stories.stage import Stage

__all__ = ["run"]

PREMIUM, LITE = 0.001, 0.0001  # price per request of each variant
LIMIT = 0.02  # search's budget: 20 premium requests
ROUTE = {
    "variants": [
        {
            "name": "premium",
            "model": "fraud",
            "version": "2",
            "weight": 1,
            "price": {"request": PREMIUM},
        },
        {"name": "lite", "model": "fraud", "version": "1", "price": {"request": LITE}},
    ],
}


def run(work: Path, out: TextIO) -> dict[str, Any]:
    token = secrets.token_urlsafe(16)
    settings = {
        "admin": {"token": token},
        "routing": {"routes": {"scoring": ROUTE}},
        "costs": {
            "budgets": [
                {
                    "name": "search",
                    "surface": "search",
                    "limit": LIMIT,
                    "window_s": 3600,
                    "policy": "degrade",
                    "degrade_to": "lite",
                },
            ]
        },
    }
    with Stage(work, gateway=settings) as stage:
        for i, surface in enumerate(["checkout"] * 20 + ["search"] * 40):
            columns, _ = synthetic_transactions(1, seed=9000 + i)
            stage.infer("scoring", columns, parameters={"surface": surface})
        with AdminClient(stage.gateway, token) as admin:
            costs = admin.costs()
    ledger: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for line in costs.lines:
        if line.route == "scoring":
            ledger[line.surface][f"{line.variant}.requests"] += line.requests
            ledger[line.surface][f"{line.variant}.cost"] += line.cost
            ledger[line.surface]["requests"] += line.requests
            ledger[line.surface]["cost"] += line.cost
    budget = next(b for b in costs.budgets if b.name == "search")
    print("gateway costs --by surface,variant (route scoring):", file=out)
    print(f"  {'surface':9} {'requests':>8} {'cost':>8} {'unit cost':>10}  by variant", file=out)
    for surface, line in sorted(ledger.items()):
        unit = line["cost"] / line["requests"]
        parts = ", ".join(
            f"{v}: {int(line[f'{v}.requests'])}"
            for v in ("premium", "lite")
            if line[f"{v}.requests"]
        )
        print(
            f"  {surface:9} {int(line['requests']):>8} {line['cost']:>8.4f} {unit:>10.5f}  {parts}",
            file=out,
        )
    print(
        f"\nbudget search: spent {budget.spent:.4f} of {budget.limit:.4f} per hour, policy "
        f"{budget.policy}: past it, search is served by 'lite' (checkout keeps 'premium')",
        file=out,
    )
    return {
        "ledger": {s: dict(line) for s, line in ledger.items()},
        "budget": {"spent": budget.spent, "limit": budget.limit, "policy": budget.policy},
    }
