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
