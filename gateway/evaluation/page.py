"""The sidecar's HTML report: one self-contained page per model (inline SVG charts, no
scripts or styles from elsewhere), served on localhost by ``gateway sidecar --http-port``."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["format_number", "render_index", "render_page"]

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")
_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
h3{font-size:15px}table{border-collapse:collapse;margin:8px 0}
td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}.fire{color:#b00;font-weight:600}
.verdict{font-size:18px;font-weight:700}.promote{color:#080}.rollback{color:#b00}
.hold{color:#a60}svg{background:#fafafa;border:1px solid #eee;margin:6px 0}
"""
# Marks the page rendered once every chart has drawn marks, or records the first error: a
# headless browser reads both back from the DOM.
_CHECK = """
window.addEventListener('error', e => { document.body.dataset.error = String(e.message); });
window.addEventListener('load', () => {
  const charts = Array.from(document.querySelectorAll('svg.chart'));
  const empty = charts.filter(c => !c.querySelector('path,rect,circle'));
  document.body.dataset.charts = String(charts.length);
  document.body.dataset.rendered = empty.length ? 'empty:' + empty.map(c => c.id) : 'ok';
});
"""


def render_index(models: Sequence[str]) -> str:
    items = "".join(f'<li><a href="/report/{_e(m)}">{_e(m)}</a></li>' for m in models)
    return _document("Evaluation sidecar", f"<h1>Models with events</h1><ul>{items}</ul>")


def render_page(
    report: dict[str, Any], timeline: dict[str, Any], verdicts: Sequence[dict[str, Any]]
) -> str:
    model = report["model"]
    parts = [
        f"<h1>{_e(model)}: evaluation</h1>",
        f"<p>Last {report['window_s']} s: {report['events']} events; reference profile "
        f"{'found' if report['reference'] else '<b>missing</b>'}.</p>",
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
        parts += ["<h3>Segments</h3>", _segments(version, segments)]
    for verdict in verdicts:
        parts.append(_canary(verdict))
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
        "<tr><th>segment</th><th>rows</th><th>labelled</th><th>AUC</th><th>log loss</th>"
        "<th>accuracy</th><th>ECE</th><th>largest PSI</th></tr>"
    )
    rows, aucs = [], []
    for segment, m in sorted(segments.items()):
        q = m.get("quality", {})
        drifts = [(f.get("psi", 0.0), name) for name, f in m.get("features", {}).items()]
        psi, feature = max(drifts, default=(0.0, "-"))
        rows.append(
            f"<tr><td>{_e(segment)}</td><td>{m['rows']}</td><td>{q.get('labelled', 0)}</td>"
            + "".join(
                f"<td>{format_number(q.get(k))}</td>"
                for k in ("auc", "log_loss", "accuracy", "ece")
            )
            + f"<td>{format_number(psi)} ({_e(feature)})</td></tr>"
        )
        if "auc" in q:
            aucs.append((segment, float(q["auc"])))
    table = f"<table>{head}{''.join(rows)}</table>"
    if aucs:
        table += "<h3>AUC per segment</h3>" + _bar_chart(f"auc-{version}", aucs, 1.0)
    return table


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
        path, pen_up = [], True
        for i, v in enumerate(points):
            if v is None or not math.isfinite(v):
                pen_up = True
                continue
            x, y = xy(i, v)
            path.append(f"{'M' if pen_up else 'L'}{x:.1f},{y:.1f}")
            pen_up = False
        if path:
            marks.append(f'<path d="{" ".join(path)}" fill="none" stroke="{colour}"/>')
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


def format_number(value: object) -> str:
    """A metric for people: ints as they are, other numbers to 3 decimals, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.3f}"  # type: ignore[arg-type]


def _e(value: object) -> str:
    return html.escape(str(value))
