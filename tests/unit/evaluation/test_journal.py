"""The adaptation journal on a real DuckDB store: trigger runs and playbook actions read apart,
the latest open reviews, the totals a bounded list leaves out, and the report and page the
sidecar builds from them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.evaluation.journal import Journal
from gateway.evaluation.service import EvaluationServicer
from gateway.evaluation.store import EventStore
from gateway.settings import EvaluationSettings
from tests.unit.evaluation.test_triggers import NOW, alert


def record(journal: Journal, kind: str, count: int, model: str = "m") -> None:
    for i in range(count):
        journal.record(
            {
                "time": NOW + i,
                "model": model,
                "kind": kind,
                "name": f"{kind}-{i}",
                "incident": "",
                "reason": f"{kind} {i}",
                "ran": "",
                "outcome": "ok",
            }
        )


def queue(journal: Journal, count: int, model: str = "m") -> None:
    for i in range(count):
        journal.open_review(alert(f"rule-{i}", "human_review", model=model), f"{model}|{i}", NOW, 5)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    store = EventStore(tmp_path / "store")
    yield Journal(store)
    store.close()


def test_trigger_runs_and_playbook_actions_are_read_apart_newest_first(journal: Journal):
    record(journal, "performance", 3)
    record(journal, "rollback", 2)
    record(journal, "time", 2)
    record(journal, "drift", 1, model="other")
    runs = journal.actions("m", 4, "triggers")
    assert [a["reason"] for a in runs] == ["time 1", "time 0", "performance 2", "performance 1"]
    assert [a["reason"] for a in journal.actions("m", 10, "playbooks")] == [
        "rollback 1",
        "rollback 0",
    ]
    assert len(journal.actions("m")) == 7 and len(journal.actions()) == 8
    assert journal.totals("m") == {"triggers": 5, "playbook_actions": 2, "open_reviews": 0}


def test_the_latest_open_reviews_are_read_oldest_first_and_counted(journal: Journal):
    queue(journal, 5)
    queue(journal, 1, model="other")
    latest = journal.reviews("open", "m", limit=3)
    assert [r["alert"] for r in latest] == ["rule-2", "rule-3", "rule-4"]
    assert len(journal.reviews("open", "m")) == 5
    assert journal.resolve(latest[0]["id"], "seen", NOW + 1)
    assert journal.totals("m")["open_reviews"] == 4


def test_the_report_and_page_list_each_kind_bounded_with_totals(tmp_path: Path):
    servicer = EvaluationServicer(EventStore(tmp_path / "store"), EvaluationSettings())

    def on_store(call: Any, *args: Any) -> Any:
        return servicer.db.submit(call, *args).result()

    try:
        journal = servicer.playbooks.journal
        on_store(record, journal, "performance", 25)
        on_store(record, journal, "tighten_thresholds", 3)
        on_store(queue, journal, 22)
        report = on_store(servicer.evaluate, "m", 3600)
        assert len(report["triggers"]) == 20 and report["triggers"][0]["reason"] == "performance 24"
        assert len(report["playbook_actions"]) == 3  # not crowded out by the trigger runs
        assert [r["alert"] for r in report["reviews"]][:2] == ["rule-2", "rule-3"]
        assert len(report["reviews"]) == 20
        assert report["journal_totals"] == {
            "triggers": 25,
            "playbook_actions": 3,
            "open_reviews": 22,
        }
        page = on_store(servicer.report_page, "m")
        assert "<h3>Trigger runs (25)</h3>" in page and "5 more not shown" in page
        assert "<h3>Open reviews (22)</h3>" in page and "2 more not shown" in page
        assert "<td>performance 24</td>" in page and "<td>performance 4</td>" not in page
    finally:
        servicer.close()
