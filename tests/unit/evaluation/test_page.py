"""The HTML report's text and geometry, from report dicts: what it says it covers, and what its
charts draw for one bucket, a gap, or a full line."""

from __future__ import annotations

import re

import pytest

from gateway.evaluation.page import describe_labels, describe_window, render_page

SECOND = 1_000_000
NOW = 1_700_000_000 * SECOND


def report(**fields) -> dict:
    return {
        "model": "m",
        "window_s": 3600,
        "start_us": NOW - 3600 * SECOND,
        "end_us": NOW,
        "events": 30,
        "events_in_window": 30,
        "max_events": 200_000,
        "truncated": False,
        "read_start_us": NOW - 600 * SECOND,
        "reference": True,
        "versions": {},
        **fields,
    }


def series_marks(page: str, chart: str) -> dict[str, tuple[list[int], int]]:
    """Per series of a chart: the point count of each path, and the count of dots."""
    svg = re.search(rf'<svg class="chart" id="{chart}".*?</svg>', page)
    assert svg, page
    out = {}
    for name, body in re.findall(r'<g class="series" data-series="([^"]*)">(.*?)</g>', svg[0]):
        paths = [len(re.findall(r"[ML]", d)) for d in re.findall(r' d="([^"]*)"', body)]
        out[name] = (paths, len(re.findall(r'<circle [^>]*r="3.5"', body)))
    return out


@pytest.mark.parametrize(
    ("points", "paths", "dots"),
    [
        ([None, None, 0.3], [1], 1),  # one bucket: a path of one point draws nothing; a dot does
        ([0.1, 0.2, 0.3], [3], 0),
        ([0.1, None, 0.3], [2], 2),  # two isolated points, each a dot
        ([0.1, 0.2, None, 0.4], [3], 1),
    ],
)
def test_every_point_of_the_drift_chart_is_drawn(points, paths, dots):
    timeline = {"1": {"labels": ["a", "b", "now"][: len(points)], "features": {"x": points}}}
    version = {"all": {"rows": 1, "features": {}, "quality": {"labelled": 0}}}
    page = render_page(report(versions={"1": version}), timeline, [])
    assert series_marks(page, "drift-1") == {"x": (paths, dots)}


def test_a_truncated_report_says_what_it_read_and_when_from():
    lines = describe_window(report(events=20, events_in_window=30, max_events=20, truncated=True))
    assert lines == [
        "Last 1 h (2023-11-14 21:13:20 UTC to 2023-11-14 22:13:20 UTC): 20 events",
        "Read only the latest 20 of 30 events in the window (max_report_events 20): every "
        "figure covers 2023-11-14 22:03:20 UTC to 2023-11-14 22:13:20 UTC, the last 10 min of "
        "the window",
    ]
    page = render_page(report(events=20, events_in_window=30, truncated=True), {}, [])
    assert 'class="warn" id="truncated">Read only the latest 20 of 30 events' in page
    assert "truncated" not in render_page(report(), {}, [])


def test_the_labels_line_says_share_delay_and_replacements():
    labels = {
        "rows": 200,
        "labelled": 50,
        "share": 0.25,
        "replaced": 4,
        "disagreeing": 1,
        "delay_s": {"p50": 90.0, "p90": 7200.0, "max": 0.5},
    }
    assert describe_labels(labels) == (
        "Labelled 50 of 200 rows (25.0%); labels came 1.5 min after the prediction (median), "
        "p90 2 h, at most 0.5 s; 4 labels replaced (1 with another value)."
    )
    assert describe_labels({"rows": 7, "labelled": 0}) == (
        "No labels joined the 7 rows read: quality metrics need labels."
    )


def test_segments_show_their_labels_and_what_the_labels_say():
    labels = {
        "rows": 100,
        "labelled": 80,
        "share": 0.8,
        "replaced": 6,
        "disagreeing": 2,
        "relabelled_rows": 6,
        "disagreeing_rows": 2,
        "disagreement": 2 / 6,
        "delay_s": {"p50": 30.0, "p90": 300.0, "max": 600.0},
    }
    segment = {"rows": 100, "features": {}, "quality": {"labelled": 80}, "labels": labels}
    page = render_page(report(versions={"1": {"all": segment}}), {}, [])
    assert "<td>80 (80.0%)</td><td>30 s / 5 min</td><td>6 (2)</td>" in page
    assert "2 of 6 relabelled rows were given a different label (33%)" in page
    assert series_marks(page, "labelled-1") == {}  # a bar chart: no series
    assert re.search(r'<svg class="chart" id="labelled-1".*?<rect ', page)


HOSTILE = "<script>alert('x')</script>"


def action(id: int, kind: str = "performance", **fields) -> dict:
    """A journal entry as the report carries it (``time`` in Unix seconds)."""
    return {
        "id": id,
        "time": NOW / SECOND - 60 * id,
        "model": "m",
        "kind": kind,
        "name": "m-retrain" if kind == "performance" else kind,
        "incident": "accuracy-low|m|2|all|",
        "reason": "quality alert accuracy-low: accuracy 0.5 below 0.9 on version 2 segment all",
        "ran": '["python", "train.py"]',
        "outcome": "ok",
        "exit_code": 0,
        "duration_s": 4.2,
        "output": "trained on 300 rows\n",
        "detail": {"training_data": "/store/training/m-retrain-1.parquet", "rows": 300},
        **fields,
    }


def review(id: int, **fields) -> dict:
    return {
        "id": id,
        "time": NOW / SECOND - 120,
        "alert": "accuracy-low",
        "incident": "accuracy-low|m|2|all|",
        "model": "m",
        "version": "2",
        "segment": "geo=BR",
        "feature": "",
        "value": 0.5,
        "export": f"/store/reviews/{id}.parquet",
        "rows": 300,
        "status": "open",
        "resolved_time": None,
        "note": "",
        **fields,
    }


def journal_report(**fields) -> dict:
    """A report whose model has a failed trigger run with hostile output, a rollback, a
    skipped action with hostile reasons, and an open review."""
    return report(
        triggers=[
            action(
                2,
                outcome="failed",
                exit_code=3,
                reason=f"a reason {HOSTILE}",
                output="x" * 5000 + f"\nTraceback: {HOSTILE}\n",
            ),
            action(1),
        ],
        playbook_actions=[
            action(
                4,
                "rollback",
                ran="Rollback m-live at 127.0.0.1:5000",
                exit_code=None,
                duration_s=None,
                output="",
                detail={"routes": ["m-live"], "failed": []},
            ),
            action(
                3,
                "tighten_thresholds",
                ran="",
                outcome="recorded",
                exit_code=None,
                duration_s=None,
                output=None,
                detail={"threshold": 0.5, "suggested": 0.55, "why": HOSTILE},
            ),
        ],
        reviews=[review(7, segment=HOSTILE)],
        journal_totals={"triggers": 2, "playbook_actions": 2, "open_reviews": 1},
        **fields,
    )


def table_rows(page: str, table: str) -> list[str]:
    found = re.search(rf'<table class="journal" id="{table}">(.*?)</table>', page, re.S)
    assert found, page
    return re.findall(r"<tr>(<td>.*?)</tr>", found[1], re.S)


def test_the_page_shows_trigger_runs_playbook_actions_and_open_reviews():
    page = render_page(journal_report(), {}, [])
    assert '<h2 id="adaptation">' in page
    assert "<h3>Trigger runs (2)</h3>" in page and "<h3>Open reviews (1)</h3>" in page
    failed, ok = table_rows(page, "triggers")
    assert "<td>2</td><td>2023-11-14 22:11:20 UTC</td><td>performance</td>" in failed
    assert '<td class="bad">failed</td><td>3</td><td>4.2 s</td>' in failed
    assert "<td>[&quot;python&quot;, &quot;train.py&quot;]<br><i>training data: 300 rows in " in ok
    assert "/store/training/m-retrain-1.parquet</i>" in ok
    assert '<td class="good">ok</td><td>0</td>' in ok
    assert "<details><summary>tail</summary><pre>trained on 300 rows\n</pre></details>" in ok
    rollback, tighten = table_rows(page, "playbook_actions")
    assert "<td>Rollback m-live at 127.0.0.1:5000</td>" in rollback
    assert rollback.endswith("<td>-</td><td>-</td><td>-</td>")  # no exit, time or output
    assert "<i>suggests threshold 0.55 (now 0.5)</i>" in tighten
    [queued] = table_rows(page, "reviews")
    assert queued.startswith("<td>7</td><td>2023-11-14 22:11:20 UTC</td><td>accuracy-low</td>")
    assert "<td>0.500</td><td>300</td><td><code>/store/reviews/7.parquet</code></td>" in queued
    assert 'class="more"' not in page  # every entry is shown


def test_the_page_escapes_what_triggers_and_reviews_recorded():
    page = render_page(journal_report(), {}, [])
    assert "<script>alert" not in page
    escaped = "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;"
    assert f"a reason {escaped}" in page  # the reason
    assert f"Traceback: {escaped}" in page  # the output's tail
    assert f"<i>{escaped}</i>" in page  # why the action did nothing
    assert f"<td>{escaped}</td>" in page  # the review's segment
    assert page.count("<script>") == 1  # the page's own check


def test_the_page_shows_a_bounded_tail_of_a_runs_output():
    page = render_page(journal_report(), {}, [])
    [tail] = re.findall(r"<pre>(\.\.\.x*)\nTraceback", page)
    assert len(tail) == 3 + 2000 - len(f"\nTraceback: {HOSTILE}\n")


def test_the_page_says_how_many_entries_it_leaves_out():
    shown = [action(i) for i in range(20, 0, -1)]
    totals = {"triggers": 27, "playbook_actions": 0, "open_reviews": 23}
    reviews = [review(i) for i in range(4, 24)]
    page = render_page(
        report(triggers=shown, playbook_actions=[], reviews=reviews, journal_totals=totals),
        {},
        [],
    )
    assert len(table_rows(page, "triggers")) == 20 and len(table_rows(page, "reviews")) == 20
    assert "<h3>Trigger runs (27)</h3>" in page
    assert "<h3>Playbook actions (0)</h3><p>None.</p>" in page
    assert (
        '<p class="more" id="more-triggers">7 more not shown (the latest 20 are): '
        "<code>gateway actions m --limit N</code> lists them.</p>"
    ) in page
    assert '<p class="more" id="more-open_reviews">3 more not shown' in page
    assert "gateway review list --model m" in page
    assert 'id="more-playbook_actions"' not in page


def test_a_model_with_no_trigger_or_review_says_so():
    page = render_page(report(), {}, [])
    assert "<h3>Trigger runs (0)</h3><p>None.</p>" in page
    assert "<h3>Open reviews (0)</h3><p>None.</p>" in page
