"""Playbooks on a real DuckDB store, round by round with our own clock: human_review queues
an alert once with an export of its rows, rollback and tighten_thresholds without a gateway
are recorded with what they could (not) do, retrain without a trigger says so, and a
restarted sidecar does not act twice on the same incident."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from gateway.evaluation.playbooks import describe
from tests.unit.evaluation import test_triggers
from tests.unit.evaluation.test_triggers import NOW, Loop, alert, traffic

make_loop = test_triggers.make_loop  # the same fixture: a store and playbooks over it


async def test_human_review_queues_an_incident_once_with_an_export_of_its_rows(make_loop):
    loop = make_loop()
    traffic(loop.store, 0, 40)
    review = alert("oov-merchant", action="human_review", metric="oov", feature="merchant")
    for minute in range(3):  # one incident over three rounds
        await loop.round(NOW + 60 * minute, review)
    [queued] = loop.playbooks.journal.reviews()
    assert (queued["alert"], queued["model"], queued["version"]) == ("oov-merchant", "m", "1")
    assert (queued["segment"], queued["feature"], queued["status"]) == ("all", "merchant", "open")
    assert queued["rows"] == 40 and pq.read_metadata(queued["export"]).num_rows == 40
    assert Path(queued["export"]).parent == loop.store.path.parent / "reviews"
    [action] = loop.actions(kind="human_review")
    assert action["outcome"] == "queued" and action["ran"] == f"review {queued['id']}"
    assert (
        loop.count(
            "sidecar_playbook_actions_total", model="m", action="human_review", outcome="queued"
        )
        == 1
    )
    assert loop.playbooks.journal.resolve(queued["id"], "new merchant category", NOW + 600)
    assert not loop.playbooks.journal.resolve(queued["id"], "again", NOW + 601)
    assert loop.playbooks.journal.reviews() == []
    [done] = loop.playbooks.journal.reviews("resolved")
    assert done["note"] == "new merchant category" and done["resolved_time"] == NOW + 600


async def test_a_segment_review_exports_only_that_segments_rows(make_loop):
    loop = make_loop()
    traffic(loop.store, 0, 10)
    review = alert(action="human_review", segment="geo=BR")
    await loop.round(NOW, review)
    [queued] = loop.playbooks.journal.reviews()
    assert queued["segment"] == "geo=BR" and queued["rows"] == 5
    exported = pq.read_table(queued["export"]).column("segments").to_pylist()
    assert {tuple(s) for s in exported} == {(("geo", "BR"),)}


async def test_a_restarted_sidecar_does_not_act_twice_on_one_incident(tmp_path: Path):
    review = alert(action="human_review")
    first = Loop(tmp_path / "store")
    await first.round(NOW, review)
    first.close()
    second = Loop(tmp_path / "store")
    try:
        await second.round(NOW + 60, review)  # a restart: the alert starts firing again
        assert len(second.playbooks.journal.reviews()) == 1
        assert len(second.actions(kind="human_review")) == 1
    finally:
        second.close()


async def test_rollback_without_a_gateway_is_recorded_as_skipped_saying_why(make_loop):
    loop = make_loop()
    traffic(loop.store, 0, 5)
    await loop.round(NOW, alert("auc-drop", action="rollback", metric="auc"))
    [action] = loop.actions(kind="rollback")
    assert action["outcome"] == "skipped"
    assert "playbooks.gateway is not set" in action["detail"]["why"]
    assert action["detail"]["routes"] == ["m-live"]


async def test_tighten_thresholds_without_a_gateway_is_recorded_as_skipped(make_loop):
    loop = make_loop(playbooks={"threshold_step": 0.1})
    traffic(loop.store, 0, 4)
    await loop.round(NOW, alert(action="tighten_thresholds"))
    [action] = loop.actions(kind="tighten_thresholds")
    assert action["outcome"] == "skipped"
    assert "evaluation.playbooks.gateway is not set" in action["detail"]["why"]
    assert action["detail"]["routes"] == ["m-live"]  # the route it would have raised


async def test_retrain_without_a_trigger_for_the_model_says_so(make_loop):
    loop = make_loop()
    await loop.round(NOW, alert(action="retrain"))
    [action] = loop.actions(kind="retrain")
    assert action["outcome"] == "skipped"
    assert "no evaluation.triggers entry for model m" in action["detail"]["why"]


async def test_actions_not_enabled_are_not_taken(make_loop):
    loop = make_loop(playbooks={"enabled": ["retrain"]})
    await loop.round(NOW, alert(action="human_review"), alert("t", action="tighten_thresholds"))
    assert loop.actions() == []


def test_an_alert_reads_as_one_line():
    text = describe(alert(value=0.31))
    assert text == "alert drift: psi(amount) 0.31 above 0.2 on version 1 segment all"
