"""Alert rules on replayed demo traffic, in process (no gateway, no store): how often each
default rule fires when nothing changed, and how many rows after a change it takes to fire,
with 1x and 10x the traffic before the change.

    .venv/bin/python benchmarks/bench_alerts.py [--replays 200] [--seeds 10]

Traffic is the demo's generator (``synthetic_transactions``) scored by the demo model's
version 2 (its numpy forward pass, as served), 10 rows per event at 10 rows/s, in four
segments (``part=0..3``, events in turn), every row labelled; the sensitive ``country`` is
hashed as the gateway hashes it, and each event carries the contract's counts
(``assemble_columns``), as the gateway's events do. The windows go through the same code as
the sidecar's (``evaluate_rules``) against the demo's reference profile.

1. False alarms: ``--replays`` seeded replays of 4,000 reference rows, checked every 500
   rows; per rule, the share of replays in which it fired at any check (any segment), and
   the share of (check, version and segment) evaluations that fired.
2. Rows to alert: 2,000 or 20,000 reference rows, then changed traffic, checked every 50
   rows; the changed rows (of the changed segment) until the rule fires, median over
   ``--seeds``.

Both for the default rules and for the rules as they were before recent windows (one window
of everything in window_s, min_samples rows, point estimates, values only): ``legacy``.

Writes ``benchmarks/results/alerts.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.demo import build_demo_repository, predict, synthetic_transactions  # noqa: E402
from gateway.evaluation.alerts import evaluate_rules  # noqa: E402
from gateway.evaluation.profile import REFERENCE_FILE, load_reference  # noqa: E402
from gateway.evaluation.windows import Window, build_window  # noqa: E402
from gateway.features import assemble_columns, load_contracts, redact  # noqa: E402
from gateway.settings import AlertRule, EvaluationSettings  # noqa: E402

ROWS_PER_EVENT = 10
ROWS_PER_S = 10
SEGMENTS = 4
HASH_KEY = b"bench-alerts"
CHANGED = "0"  # the segment a segment's change is made in

Columns = dict[str, np.ndarray]


@dataclass
class Demo:
    reference: dict[str, Any]
    contract: Any
    params: dict[str, np.ndarray]


_DEMO: Demo | None = None


def demo(root: Path) -> Demo:
    """The demo repository as ``make serve`` builds it (seed 7, 20,000 rows), once."""
    global _DEMO
    if _DEMO is None:
        if not (root / "fraud").exists():
            build_demo_repository(root, seed=7, rows=20_000)
        model = root / "fraud"
        _DEMO = Demo(
            reference=load_reference(model / REFERENCE_FILE),
            contract=load_contracts(model)["v2"],
            params=dict(np.load(model / "2" / "params.npz")),
        )
    return _DEMO


@dataclass
class Traffic:
    """Rows and events as arrays (appendable), and the window of any prefix of events."""

    columns: Columns
    scores: np.ndarray
    labels: np.ndarray
    coverage: dict[str, np.ndarray]

    @property
    def events(self) -> int:
        return len(self.scores) // ROWS_PER_EVENT

    def window(self, events: int) -> Window:
        rows = events * ROWS_PER_EVENT
        return build_window(
            {k: v[:rows] for k, v in self.columns.items()},
            self.scores[:rows],
            np.full(events, ROWS_PER_EVENT),
            np.arange(events, dtype=np.int64) * (ROWS_PER_EVENT * 1_000_000 // ROWS_PER_S),
            ["2"] * events,
            [{"part": str(e % SEGMENTS)} for e in range(events)],
            hashed={"country"},
            coverage={k: v[:events] for k, v in self.coverage.items()},
            labels=self.labels[:rows],
        )

    def now_us(self, events: int) -> int:
        return events * ROWS_PER_EVENT * 1_000_000 // ROWS_PER_S


def traffic(d: Demo, rows: int, seed: int, first_event: int, change: str = "") -> Traffic:
    """``rows`` rows of reference traffic (events numbered from ``first_event``), changed."""
    columns, labels = synthetic_transactions(rows, seed)
    event = first_event + np.arange(rows) // ROWS_PER_EVENT
    in_changed = (event % SEGMENTS).astype(str) == CHANGED
    rng = np.random.default_rng(seed + 1)
    if change == "amount_x8":
        columns["amount"] = columns["amount"] * 8
    elif change == "new_channel":
        third = in_changed & (np.arange(rows) % 3 == 0)
        columns["channel"] = np.where(third, "crypto", columns["channel"]).astype(object)
    elif change == "new_country":
        picked = in_changed & (rng.random(rows) < 0.3)
        columns["country"] = np.where(picked, "ZZ", columns["country"]).astype(object)
    scores = predict(d.params, assemble_columns(d.contract, columns).matrix)[:, 0]
    scores = scores.astype(np.float64)
    if change == "uninformative":
        scores = rng.permutation(scores)  # the model's scores no longer follow the labels
    events = rows // ROWS_PER_EVENT
    coverage = {f.name: np.zeros((events, 4), np.int64) for f in d.contract.features}
    for e in range(events):
        part = {k: v[e * ROWS_PER_EVENT : (e + 1) * ROWS_PER_EVENT] for k, v in columns.items()}
        counts = assemble_columns(d.contract, part).counts
        for f, row in zip(d.contract.features, counts, strict=True):
            coverage[f.name][e] = row
    columns["country"] = np.array(
        [redact(str(v), HASH_KEY) for v in columns["country"]], dtype=object
    )
    return Traffic(columns, scores, labels.astype(np.float64), coverage)


def joined(a: Traffic, b: Traffic) -> Traffic:
    return Traffic(
        {k: np.concatenate([a.columns[k], b.columns[k]]) for k in a.columns},
        np.concatenate([a.scores, b.scores]),
        np.concatenate([a.labels, b.labels]),
        {k: np.concatenate([a.coverage[k], b.coverage[k]]) for k in a.coverage},
    )


def legacy(rule: AlertRule) -> AlertRule:
    """The rule as the sidecar checked it before recent windows: one window of everything in
    the last hour, min_samples rows only, the point estimate, values in clear only."""
    return rule.model_copy(
        update={
            "window_s": 3600,
            "window_rows": 10**9,
            "change_detector": "none",
            "min_positives": 1,
            "min_negatives": 1,
            "confidence": 0.5,
            "source": "values",
        }
    )


RULESETS: dict[str, Callable[[AlertRule], AlertRule]] = {
    "default": lambda rule: rule,
    "legacy": legacy,
}


def false_alarm_replay(args: tuple[Path, int, int, int]) -> dict[str, Any]:
    """One replay of reference traffic: per rule set and rule, whether it fired at any check,
    and (fired, checked) (check, version and segment) evaluations."""
    root, seed, rows, every = args
    d = demo(root)
    t = traffic(d, rows, seed, 0)
    rules = EvaluationSettings().rules
    out: dict[str, Any] = {}
    for name, make in RULESETS.items():
        ruleset = [make(r) for r in rules]
        fired: dict[str, int] = {r.name: 0 for r in ruleset}
        groups: dict[str, list[int]] = {r.name: [0, 0] for r in ruleset}
        for events in range(every // ROWS_PER_EVENT, t.events + 1, every // ROWS_PER_EVENT):
            evaluation = evaluate_rules(
                t.window(events), ruleset, d.reference, "fraud", t.now_us(events)
            )
            firing = {(a["rule"], a["segment"]) for a in evaluation.firing}
            checked = {(c["rule"], c["segment"]) for c in evaluation.checked.values()}
            for rule in ruleset:
                mine = {s for r, s in firing if r == rule.name}
                fired[rule.name] |= bool(mine)
                groups[rule.name][0] += len(mine)
                groups[rule.name][1] += sum(1 for r, _ in checked if r == rule.name)
        out[name] = {"fired": fired, "groups": groups}
    return out


SCENARIOS: dict[str, tuple[str, str, str, str]] = {
    # change: (rule, segment, feature, what changed)
    "amount_x8": ("feature_drift", "all", "amount", "amount x 8, all traffic"),
    "new_channel": (
        "new_categories",
        f"part={CHANGED}",
        "channel",
        "channel 'crypto' in 1/3 of one segment",
    ),
    "new_country": (
        "new_categories",
        f"part={CHANGED}",
        "country",
        "sensitive country 'ZZ' in 30% of one segment",
    ),
    "uninformative": ("quality_drop", "all", "", "scores shuffled (AUC 0.5), all labelled"),
}


def rows_to_alert(args: tuple[Path, str, str, int, int, int]) -> int | None:
    """Changed rows (of the changed segment, for a segment's change) until the rule fires."""
    root, change, ruleset, before, seed, most = args
    d = demo(root)
    rule_name, segment, feature, _ = SCENARIOS[change]
    rule = next(RULESETS[ruleset](r) for r in EvaluationSettings().rules if r.name == rule_name)
    pre = traffic(d, before, seed, 0)
    t = joined(pre, traffic(d, most, seed + 10_000, pre.events, change))
    share = 1 / SEGMENTS if segment != "all" else 1.0
    step = 5  # events: 50 rows
    added = step
    while added * ROWS_PER_EVENT <= most:
        events = pre.events + added
        evaluation = evaluate_rules(
            t.window(events), [rule], d.reference, "fraud", t.now_us(events)
        )
        if any(a["segment"] == segment and a["feature"] == feature for a in evaluation.firing):
            return round(added * ROWS_PER_EVENT * share)
        added += step if added < 200 else 50
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rows", type=int, default=4000, help="rows per no-change replay")
    parser.add_argument("--every", type=int, default=500, help="rows between checks")
    parser.add_argument("--most", type=int, default=30_000, help="changed rows at most")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(args.workers) as pool:
        root = Path(tmp)
        build_demo_repository(root, seed=7, rows=20_000)
        replays = list(
            pool.map(
                false_alarm_replay,
                [(root, 100_000 + i, args.rows, args.every) for i in range(args.replays)],
            )
        )
        false_alarms: dict[str, dict[str, Any]] = {}
        for name in RULESETS:
            for rule in EvaluationSettings().rules:
                fired = sum(r[name]["fired"][rule.name] for r in replays)
                groups = np.sum([r[name]["groups"][rule.name] for r in replays], axis=0)
                false_alarms.setdefault(rule.name, {})[name] = {
                    "replays_fired": fired / len(replays),
                    "checks_fired": float(groups[0] / groups[1]) if groups[1] else None,
                    "checks": int(groups[1]),
                }
        delays: dict[str, dict[str, Any]] = {}
        for change in SCENARIOS:
            for ruleset in RULESETS:
                for before in (2000, 20_000):
                    jobs = [
                        (root, change, ruleset, before, 500 + s, args.most)
                        for s in range(args.seeds)
                    ]
                    found = list(pool.map(rows_to_alert, jobs))
                    fired = [f for f in found if f is not None]
                    delays.setdefault(change, {}).setdefault(ruleset, {})[str(before)] = {
                        "median": statistics.median(fired) if fired else None,
                        "max": max(fired) if fired else None,
                        "not_fired": len(found) - len(fired),
                    }
    meta = {
        "machine": f"{platform.machine()}, {args.workers} workers",
        "python": platform.python_version(),
        "minutes": round((time.monotonic() - started) / 60, 1),
        "replays": args.replays,
        "rows_per_replay": args.rows,
        "check_every_rows": args.every,
        "seeds": args.seeds,
    }
    result = {"meta": meta, "false_alarms": false_alarms, "rows_to_alert": delays}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "alerts.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "alerts.md").write_text(markdown(result, args.most))
    print(markdown(result, args.most))


def markdown(result: dict[str, Any], most: int) -> str:
    meta = result["meta"]
    lines = [
        "# Alert rules benchmark",
        "",
        f"`{json.dumps(meta)}`",
        "",
        f"False alarms under no change: {meta['replays']} seeded replays of "
        f"{meta['rows_per_replay']:,} reference rows in {SEGMENTS} segments, checked every "
        f"{meta['check_every_rows']} rows (fired: replays in which the rule fired at any check "
        "for any version and segment; per check: the share of (check, version and segment) "
        "evaluations with enough data that fired).",
        "",
        "| rule | fired (default) | per check (default) | fired (legacy) | per check (legacy) |",
        "| --- | --- | --- | --- | --- |",
    ]

    def share(x: float | None, digits: int = 1) -> str:
        return "-" if x is None else f"{100 * x:.{digits}f}%"

    for rule, by in result["false_alarms"].items():
        d, legacy_ = by["default"], by["legacy"]
        lines.append(
            f"| {rule} | {share(d['replays_fired'])} | {share(d['checks_fired'], 2)} "
            f"({d['checks']}) | {share(legacy_['replays_fired'])} | "
            f"{share(legacy_['checks_fired'], 2)} ({legacy_['checks']}) |"
        )
    lines += [
        "",
        f"Rows to alert: changed rows (of the changed segment) until the rule fires, checked "
        f"every 50 rows; median (max) over {meta['seeds']} seeds; '>{most:,}' where it never "
        "fired.",
        "",
        "| change | rule | default, 2,000 before | default, 20,000 before | legacy, 2,000 "
        "before | legacy, 20,000 before |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def rows(entry: dict[str, Any]) -> str:
        if entry["median"] is None:
            return f">{most:,}"
        text = f"{entry['median']:,.0f} ({entry['max']:,})"
        return text + (f", {entry['not_fired']} never" if entry["not_fired"] else "")

    for change, by in result["rows_to_alert"].items():
        rule, _, _, what = SCENARIOS[change]
        cells = [rows(by[r][b]) for r in RULESETS for b in ("2000", "20000")]
        lines.append(f"| {what} | {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
