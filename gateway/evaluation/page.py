"""The sidecar's HTML report: one self-contained page per model (inline SVG charts, no
scripts or styles from elsewhere), served on localhost by ``gateway sidecar --http-port``."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from gateway.evaluation.labels import label_notes

__all__ = [
    "action_notes",
    "describe_labels",
    "describe_window",
    "format_number",
    "journal_sections",
    "output_tail",
    "render_index",
    "render_page",
]

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")
_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
h3{font-size:15px}table{border-collapse:collapse;margin:8px 0}
td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}.fire{color:#b00;font-weight:600}
.verdict{font-size:18px;font-weight:700}.promote{color:#080}.rollback{color:#b00}
.hold{color:#a60}svg{background:#fafafa;border:1px solid #eee;margin:6px 0}
.warn{background:#fff4d6;border-left:4px solid #d90;padding:6px 10px}
.journal td,.journal th{text-align:left;vertical-align:top}.good{color:#080}
.bad{color:#b00;font-weight:600}.journal i{color:#555}
pre{white-space:pre-wrap;max-width:420px;margin:2px 0;font-size:12px}
"""
_TAIL_CHARS = 2000  # of a run's output, on the page (the journal keeps up to output_bytes)
_OUTCOME_CLASS = {"ok": "good", "failed": "bad", "timeout": "bad", "error": "bad"}
# Measures what each chart drew, once laid out: a mark counts only if it has geometry inside
# the chart (a path of non-zero length, a circle of non-zero radius, a rect of non-zero area);
# a line chart's every series must draw one. A headless browser reads the verdict
# (data-rendered: "ok" or the blank charts and series), the drawn marks per chart
# (data-marks) and the first script error (data-error) back from the DOM.
_CHECK = """
window.addEventListener('error', e => { document.body.dataset.error = String(e.message); });
window.addEventListener('load', () => {
  const inside = (m, svg) => {
    const b = m.getBBox(), w = svg.width.baseVal.value, h = svg.height.baseVal.value;
    return b.x <= w && b.y <= h && b.x + b.width >= 0 && b.y + b.height >= 0;
  };
  const drawn = (m, svg) => inside(m, svg) && (
    m.tagName === 'path' ? m.getTotalLength() > 0
    : m.tagName === 'circle' ? m.r.baseVal.value > 0
    : m.width.baseVal.value > 0 && m.height.baseVal.value > 0);
  const marks = (node, svg) =>
    Array.from(node.querySelectorAll('path,rect,circle')).filter(m => drawn(m, svg));
  const charts = Array.from(document.querySelectorAll('svg.chart'));
  const blank = [], counts = [];
  for (const svg of charts) {
    const n = marks(svg, svg).length;
    counts.push(svg.id + '=' + n);
    if (!n) blank.push(svg.id);
    for (const g of svg.querySelectorAll('g.series')) {
      if (!marks(g, svg).length) blank.push(svg.id + '/' + g.dataset.series);
    }
  }
  document.body.dataset.charts = String(charts.length);
  document.body.dataset.marks = counts.join(' ');
  document.body.dataset.rendered = blank.length ? 'blank:' + blank.join(',') : 'ok';
});
"""


def render_index(models: Sequence[str]) -> str:
    items = "".join(f'<li><a href="/report/{_e(m)}">{_e(m)}</a></li>' for m in models)
    return _document("Evaluation sidecar", f"<h1>Models with events</h1><ul>{items}</ul>")


def render_page(
    report: dict[str, Any], timeline: dict[str, Any], verdicts: Sequence[dict[str, Any]]
) -> str:
    model = report["model"]
    window, *truncated = describe_window(report)
    parts = [
        f"<h1>{_e(model)}: evaluation</h1>",
        f'<p id="window">{_e(window)}; reference profile '
        f"{'found' if report['reference'] else '<b>missing</b>'}.</p>",
        *(f'<p class="warn" id="truncated">{_e(line)}</p>' for line in truncated),
        f'<p id="labels">{_e(describe_labels(report.get("labels")))}</p>',
        _alerts(report.get("alerts", [])),
    ]
    for version, segments in sorted(report["versions"].items()):
        parts.append(f"<h2>Version {_e(version)}</h2>")
        series = timeline.get(version, {})
        if series.get("features"):
            parts += [
                "<h3>Drift over time (PSI per feature; the line at 0.2 is the usual alarm)</h3>",
                _line_chart(f"drift-{version}", series["features"], series["labels"], 0.2),
            ]
        overall = segments.get("all", {})
        coverage = [
            (name, m.get("defaulted", 0.0) + m.get("oov", 0.0))
            for name, m in sorted(overall.get("features", {}).items())
        ]
        if coverage:
            parts += [
                "<h3>Coverage: share of values defaulted or out of vocabulary</h3>",
                _bar_chart(f"coverage-{version}", coverage, 1.0),
            ]
        parts += ["<h3>Segments</h3>", _segments(version, segments), _notes(segments)]
    for verdict in verdicts:
        parts.append(_canary(verdict))
    parts.append(_adaptation(report))
    return _document(f"{model}: evaluation", "".join(parts))


def _alerts(alerts: Sequence[dict[str, Any]]) -> str:
    if not alerts:
        return "<p>No alert fires.</p>"
    rows = "".join(
        f'<tr class="fire"><td>{_e(a["rule"])}</td><td>{_e(a["version"])}</td>'
        f"<td>{_e(a['segment'])}</td><td>{_e(a['feature'] or '-')}</td>"
        f"<td>{a['value']:.3f}</td><td>{_e(a['direction'])} {a['threshold']}</td>"
        f"<td>{_e(a['action'])}</td></tr>"
        for a in alerts
    )
    return (
        f"<h2>Alerts firing ({len(alerts)})</h2><table><tr><th>rule</th><th>version</th>"
        "<th>segment</th><th>feature</th><th>value</th><th>threshold</th><th>action</th></tr>"
        f"{rows}</table>"
    )


def _segments(version: str, segments: dict[str, Any]) -> str:
    head = (
        "<tr><th>segment</th><th>rows</th><th>labelled</th><th>label delay p50 / p90</th>"
        "<th>labels replaced (changed)</th><th>AUC</th><th>log loss</th><th>accuracy</th>"
        "<th>ECE</th><th>largest PSI</th></tr>"
    )
    rows, aucs, shares = [], [], []
    for segment, m in sorted(segments.items()):
        q = m.get("quality", {})
        labels = m.get("labels", {})
        delay = labels.get("delay_s", {})
        drifts = [(f.get("psi", 0.0), name) for name, f in m.get("features", {}).items()]
        psi, feature = max(drifts, default=(0.0, "-"))
        rows.append(
            f"<tr><td>{_e(segment)}</td><td>{m['rows']}</td>"
            f"<td>{q.get('labelled', 0)} ({labels.get('share', 0.0):.1%})</td>"
            f"<td>{_duration(delay.get('p50'))} / {_duration(delay.get('p90'))}</td>"
            f"<td>{labels.get('replaced', 0)} ({labels.get('disagreeing', 0)})</td>"
            + "".join(
                f"<td>{format_number(q.get(k))}</td>"
                for k in ("auc", "log_loss", "accuracy", "ece")
            )
            + f"<td>{format_number(psi)} ({_e(feature)})</td></tr>"
        )
        if "auc" in q:
            aucs.append((segment, float(q["auc"])))
        if labels.get("labelled"):
            shares.append((segment, float(labels["share"])))
    table = f"<table>{head}{''.join(rows)}</table>"
    if shares:
        table += "<h3>Labelled share per segment</h3>" + _bar_chart(
            f"labelled-{version}", shares, 1.0
        )
    if aucs:
        table += "<h3>AUC per segment</h3>" + _bar_chart(f"auc-{version}", aucs, 1.0)
    return table


def _notes(segments: dict[str, Any]) -> str:
    """What the labels of each segment say about its quality metrics."""
    items = [
        f"<li><b>{_e(segment)}</b>: {_e(note)}</li>"
        for segment, m in sorted(segments.items())
        for note in label_notes(m.get("labels", {}), m.get("output"))
    ]
    return f'<h3>About the labels</h3><ul class="notes">{"".join(items)}</ul>' if items else ""


def _canary(verdict: dict[str, Any]) -> str:
    kind = verdict["verdict"]
    evidence = verdict["evidence"]
    keys = ("labelled", "auc", "log_loss", "accuracy", "p95_total_ms", "cost_per_row")
    rows = "".join(
        f"<tr><td>{k}</td><td>{format_number(evidence['stable'].get(k))}</td>"
        f"<td>{format_number(evidence['candidate'].get(k))}</td></tr>"
        for k in keys
    )
    reasons = "".join(f"<li>{_e(r)}</li>" for r in verdict["reasons"])
    metric = verdict["primary_metric"]
    bars = [
        (f"stable {verdict['stable']}", float(evidence["stable"].get(metric) or 0.0)),
        (f"candidate {verdict['candidate']}", float(evidence["candidate"].get(metric) or 0.0)),
    ]
    return (
        f"<h2>Canary: version {_e(verdict['candidate'])} against {_e(verdict['stable'])}</h2>"
        f'<p class="verdict {kind}">{kind.upper()}</p><ul>{reasons}</ul>'
        f"<table><tr><th>measure</th><th>stable</th><th>candidate</th></tr>{rows}</table>"
        + _bar_chart(f"canary-{verdict['candidate']}", bars, max(1.0, *(v for _, v in bars)))
    )


def journal_sections(report: dict[str, Any]) -> list[tuple[str, str, list[Any], int, str]]:
    """What the adaptation loop did for the report's model, for the page and the CLI alike:
    ``(key, title, entries, total, command)`` for its trigger runs, playbook actions and open
    reviews, where ``entries`` are the latest the report holds of ``total`` and ``command``
    lists them all."""
    model = report["model"]
    totals = report.get("journal_totals") or {}
    journal = f"gateway actions {model} --limit N"
    sections = []
    for key, field, title, command in (
        ("triggers", "triggers", "Trigger runs", journal),
        ("playbook_actions", "playbook_actions", "Playbook actions", journal),
        ("open_reviews", "reviews", "Open reviews", f"gateway review list --model {model}"),
    ):
        entries = report.get(field, [])
        sections.append((key, title, entries, int(totals.get(key, len(entries))), command))
    return sections


def _adaptation(report: dict[str, Any]) -> str:
    """What the adaptation loop did for the model: its latest trigger runs and playbook
    actions, and its open reviews; each list is bounded, and a note says what it leaves out."""
    parts = ['<h2 id="adaptation">Adaptation: retraining triggers, playbook actions, reviews</h2>']
    for key, title, entries, total, command in journal_sections(report):
        parts.append(f"<h3>{title} ({total})</h3>")
        if not entries:
            parts.append("<p>None.</p>")
            continue
        parts.append(_reviews(entries) if key == "open_reviews" else _actions(key, entries))
        if total > len(entries):
            parts.append(
                f'<p class="more" id="more-{key}">{total - len(entries)} more not shown (the '
                f"latest {len(entries)} are): <code>{_e(command)}</code> lists them.</p>"
            )
    return "".join(parts)


def _actions(table_id: str, entries: Sequence[dict[str, Any]]) -> str:
    """Trigger runs or playbook actions, newest first: what fired and why, what ran, how it
    ended, and the tail of its output."""
    rows = []
    for a in entries:
        notes = "".join(f"<br><i>{_e(note)}</i>" for note in action_notes(a))
        tail = output_tail(a.get("output"), _TAIL_CHARS)
        output = f"<details><summary>tail</summary><pre>{_e(tail)}</pre></details>" if tail else "-"
        outcome = str(a.get("outcome") or "-")
        exit_code = a.get("exit_code")
        rows.append(
            f"<tr><td>{_e(a['id'])}</td><td>{_time(int(a['time'] * 1e6))}</td>"
            f"<td>{_e(a['kind'])}</td><td>{_e(a['name'])}</td><td>{_e(a['reason'] or '-')}</td>"
            f"<td>{_e(a['ran'] or '-')}{notes}</td>"
            f'<td class="{_OUTCOME_CLASS.get(outcome, "")}">{_e(outcome)}</td>'
            f"<td>{_e('-' if exit_code is None else exit_code)}</td>"
            f"<td>{_duration(a.get('duration_s'))}</td><td>{output}</td></tr>"
        )
    return (
        f'<table class="journal" id="{table_id}"><tr><th>id</th><th>time</th><th>kind</th>'
        "<th>name</th><th>what fired, why</th><th>what ran</th><th>outcome</th><th>exit</th>"
        f"<th>took</th><th>output</th></tr>{''.join(rows)}</table>"
    )


def _reviews(reviews: Sequence[dict[str, Any]]) -> str:
    """Open reviews: the alert each answers, and the rows exported for a person to look at."""
    rows = "".join(
        f"<tr><td>{_e(r['id'])}</td><td>{_time(int(r['time'] * 1e6))}</td><td>{_e(r['alert'])}</td>"
        f"<td>{_e(r['version'])}</td><td>{_e(r['segment'])}</td><td>{_e(r['feature'] or '-')}</td>"
        f"<td>{format_number(r.get('value'))}</td><td>{_e(r['rows'])}</td>"
        f"<td><code>{_e(r['export'])}</code></td></tr>"
        for r in reviews
    )
    return (
        '<table class="journal" id="reviews"><tr><th>id</th><th>created</th><th>alert</th>'
        "<th>version</th><th>segment</th><th>feature</th><th>value</th><th>rows to review</th>"
        f"<th>export</th></tr>{rows}</table>"
        "<p>Resolve one with <code>gateway review resolve ID --note TEXT</code>.</p>"
    )


def _line_chart(
    chart_id: str,
    series: dict[str, list[float | None]],
    labels: Sequence[str],
    threshold: float,
    width: int = 720,
    height: int = 240,
) -> str:
    pad_left, pad_bottom, pad_top = 48, 28, 10
    values = [v for points in series.values() for v in points if v is not None]
    top = max([threshold * 1.5, *values]) if values else 1.0
    steps = max(len(labels) - 1, 1)
    plot_w, plot_h = width - pad_left - 150, height - pad_bottom - pad_top

    def xy(i: int, v: float) -> tuple[float, float]:
        return pad_left + plot_w * i / steps, pad_top + plot_h * (1 - min(v, top) / top)

    marks = [
        f'<line x1="{pad_left}" y1="{pad_top + plot_h}" x2="{pad_left + plot_w}" '
        f'y2="{pad_top + plot_h}" stroke="#999"/>',
        f'<text x="4" y="{pad_top + 10}" font-size="11">{top:.2f}</text>',
        f'<text x="4" y="{pad_top + plot_h}" font-size="11">0</text>',
    ]
    _, ty = xy(0, threshold)
    marks.append(
        f'<line x1="{pad_left}" y1="{ty:.1f}" x2="{pad_left + plot_w}" y2="{ty:.1f}" '
        'stroke="#b00" stroke-dasharray="4 3"/>'
    )
    for i in (0, len(labels) - 1):
        x, _ = xy(i, 0)
        marks.append(
            f'<text x="{x:.1f}" y="{height - 8}" font-size="11" text-anchor="middle">'
            f"{_e(labels[i])}</text>"
        )
    for k, (name, points) in enumerate(series.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        shown = [v is not None and math.isfinite(v) for v in points]
        path, dots = [], []
        for i, v in enumerate(points):
            if v is None or not shown[i]:
                continue
            x, y = xy(i, v)
            joined_before = i > 0 and shown[i - 1]
            path.append(f"{'L' if joined_before else 'M'}{x:.1f},{y:.1f}")
            if not joined_before and not (i + 1 < len(points) and shown[i + 1]):
                # NOTE: a point with no neighbour (a window of one bucket) is a path of no
                # length, which draws nothing: it gets a dot.
                dots.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}"/>')
        line = f'<path d="{" ".join(path)}" fill="none" stroke="{colour}"/>' if path else ""
        marks.append(f'<g class="series" data-series="{_e(name)}">{line}{"".join(dots)}</g>')
        marks.append(
            f'<text x="{pad_left + plot_w + 10}" y="{pad_top + 14 * (k + 1)}" font-size="11" '
            f'fill="{colour}">{_e(name)}</text>'
        )
    return (
        f'<svg class="chart" id="{_e(chart_id)}" width="{width}" height="{height}" '
        f'role="img">{"".join(marks)}</svg>'
    )


def _bar_chart(
    chart_id: str, items: Sequence[tuple[str, float]], top: float, width: int = 720
) -> str:
    row_h, label_w = 18, 200
    height = row_h * len(items) + 10
    marks = []
    for i, (label, value) in enumerate(items):
        y = 5 + i * row_h
        w = max(1.0, (width - label_w - 60) * min(max(value, 0.0), top) / (top or 1.0))
        marks.append(
            f'<text x="4" y="{y + 12}" font-size="11">{_e(label)}</text>'
            f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row_h - 5}" '
            f'fill="{_COLOURS[0]}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 12}" font-size="11">{value:.3f}</text>'
        )
    return (
        f'<svg class="chart" id="{_e(chart_id)}" width="{width}" height="{height}" '
        f'role="img">{"".join(marks)}</svg>'
    )


def _document(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{body}<script>{_CHECK}</script></body></html>"
    )


def describe_window(report: dict[str, Any]) -> list[str]:
    """The window a report covers and what it read of it; a second line when
    ``max_report_events`` cut the window short."""
    lines = [
        f"Last {_duration(report['window_s'])} ({_time(report['start_us'])} to "
        f"{_time(report['end_us'])}): {report['events']} events"
    ]
    in_window = report.get("events_in_window", report["events"])
    if report.get("truncated"):
        start_us = report.get("read_start_us", report["start_us"])
        lines.append(
            f"Read only the latest {report['events']} of {in_window} events in the window "
            f"(max_report_events {report.get('max_events', report['events'])}): every figure "
            f"covers {_time(start_us)} to {_time(report['end_us'])}, the last "
            f"{_duration((report['end_us'] - start_us) / 1e6)} of the window"
        )
    return lines


def describe_labels(labels: dict[str, Any] | None) -> str:
    """How a report's rows are labelled, in one line."""
    if not labels or not labels.get("labelled"):
        rows = (labels or {}).get("rows", 0)
        return f"No labels joined the {rows} rows read: quality metrics need labels."
    line = f"Labelled {labels['labelled']} of {labels['rows']} rows ({labels['share']:.1%})"
    delay = labels.get("delay_s")
    if delay:
        line += (
            f"; labels came {_duration(delay['p50'])} after the prediction (median), "
            f"p90 {_duration(delay['p90'])}, at most {_duration(delay['max'])}"
        )
    line += f"; {labels['replaced']} labels replaced"
    if labels["replaced"]:
        line += f" ({labels['disagreeing']} with another value)"
    return line + "."


def action_notes(entry: dict[str, Any]) -> list[str]:
    """What a trigger run's or playbook action's detail adds, in words: the training data a
    run read, the threshold it would raise to, why it did nothing."""
    detail = entry.get("detail") or {}
    notes = []
    if "training_data" in detail:
        notes.append(f"training data: {detail.get('rows', 0)} rows in {detail['training_data']}")
    if "suggested" in detail:
        notes.append(
            f"suggests threshold {detail['suggested']} (now {detail.get('threshold')})"
            + (f": {detail['note']}" if detail.get("note") else "")
        )
    if detail.get("why"):
        notes.append(str(detail["why"]))
    return notes


def output_tail(output: str | None, max_chars: int) -> str:
    """The last ``max_chars`` of a run's output, marked when cut."""
    if not output:
        return ""
    return output if len(output) <= max_chars else "..." + output[-max_chars:]


def _time(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float | None) -> str:
    """Seconds for people: 0.04 s, 45 s, 12.5 min, 1 h, 2.5 d; None as '-'."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if abs(seconds) >= size:
            return f"{seconds / size:.1f}".removesuffix(".0") + f" {unit}"
    digits = 1 if abs(seconds) >= 1 else 3
    return f"{seconds:.{digits}f}".rstrip("0").rstrip(".") + " s"


def format_number(value: object) -> str:
    """A metric for people: ints as they are, other numbers to 3 decimals, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.3f}"  # type: ignore[arg-type]


def _e(value: object) -> str:
    return html.escape(str(value))
