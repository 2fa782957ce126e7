"""Command-line clients of the sidecar: ``gateway labels FILE``, ``gateway export MODEL``,
``gateway report MODEL``, ``gateway verdict MODEL``, ``gateway actions``, ``gateway review
list|resolve``; each presents ``ClientCredentials``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from gateway.api.v1 import events_pb2 as ev
from gateway.api.v1 import events_pb2_grpc as ev_grpc
from gateway.auth import ClientCredentials
from gateway.evaluation.labels import label_notes
from gateway.evaluation.page import (
    action_notes,
    describe_labels,
    describe_window,
    journal_sections,
    output_tail,
)
from gateway.evaluation.page import format_number as _num
from gateway.tables import format_table

__all__ = [
    "LabelFileError",
    "export",
    "fetch_actions",
    "fetch_report",
    "fetch_reviews",
    "fetch_verdict",
    "format_actions",
    "format_report",
    "format_reviews",
    "read_labels",
    "resolve_review",
    "send_labels",
]

_CHUNK = 10_000  # labels per PutLabels call
_TAIL_CHARS = 300  # of a run's output, in the text report (the last _TAIL_LINES lines of it)
_TAIL_LINES = 5


_OPEN = ClientCredentials()  # for a sidecar with evaluation.auth.mode none, without TLS


class LabelFileError(ValueError):
    """A label file that cannot be read as labels; the message names the file and column."""


def read_labels(path: Path) -> list[ev.Label]:
    """Labels from CSV or Parquet: ``label`` (or ``value``), and ``request_id`` and/or
    ``entity_key``; optional ``event_time`` (a timestamp, or microseconds) and ``row``."""
    try:
        table = pq.read_table(path) if path.suffix == ".parquet" else pa_csv.read_csv(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise LabelFileError(f"{path}: cannot read labels: {err}") from None
    names = set(table.column_names)
    value_column = "label" if "label" in names else "value" if "value" in names else None
    if value_column is None:
        raise LabelFileError(f"{path}: no 'label' (or 'value') column; columns: {sorted(names)}")
    if not names & {"request_id", "entity_key"}:
        raise LabelFileError(f"{path}: labels need a 'request_id' or an 'entity_key' column")
    count = table.num_rows

    def texts(name: str) -> list[str]:
        if name not in names:
            return [""] * count
        return ["" if v is None else str(v) for v in table.column(name).to_pylist()]

    try:
        values = np.asarray(table.column(value_column).to_pylist(), dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise LabelFileError(f"{path}: column '{value_column}' is not numeric: {err}") from None
    times = [0] * count
    if "event_time" in names:
        column = table.column("event_time")
        if pa.types.is_timestamp(column.type):
            column = column.cast(pa.timestamp("us")).cast(pa.int64())
        times = [int(t or 0) for t in column.to_pylist()]
    rows = [int(r or 0) for r in table.column("row").to_pylist()] if "row" in names else [0] * count
    return [
        ev.Label(request_id=r, entity_key=k, value=float(v), event_time_us=t, row=w)
        for r, k, v, t, w in zip(
            texts("request_id"), texts("entity_key"), values, times, rows, strict=True
        )
    ]


def send_labels(
    address: str,
    labels: list[ev.Label],
    window_s: int = 0,
    credentials: ClientCredentials = _OPEN,
) -> tuple[int, int]:
    """PutLabels in chunks; returns (joined, unmatched)."""
    joined = unmatched = 0
    with credentials.channel(address, "sidecar") as channel:
        stub = ev_grpc.EvaluationServiceStub(channel)  # type: ignore[no-untyped-call]
        for start in range(0, len(labels), _CHUNK):
            reply = stub.PutLabels(
                ev.PutLabelsRequest(labels=labels[start : start + _CHUNK], window_s=window_s),
                timeout=120,
                metadata=credentials.metadata,
            )
            joined += reply.joined
            unmatched += reply.unmatched
    return joined, unmatched


def export(
    address: str,
    request: ev.ExportRequest,
    out: Path,
    credentials: ClientCredentials = _OPEN,
    timeout_s: float = 600.0,
) -> int:
    """Stream the Parquet file from the sidecar (ExportFile) into ``out``; the rows it holds.

    Written aside and renamed into place once whole: a broken stream leaves no partial file.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    aside = out.with_name(out.name + ".part")
    rows = 0
    with credentials.channel(address, "sidecar") as channel:
        stub = ev_grpc.EvaluationServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            with aside.open("wb") as handle:
                for chunk in stub.ExportFile(
                    request, timeout=timeout_s, metadata=credentials.metadata
                ):
                    handle.write(chunk.data)
                    rows = chunk.rows or rows
            aside.replace(out)
        finally:
            aside.unlink(missing_ok=True)
    return rows


def fetch_report(
    address: str,
    model: str,
    window_s: int = 0,
    credentials: ClientCredentials = _OPEN,
) -> dict[str, Any]:
    with credentials.channel(address, "sidecar") as channel:
        stub = ev_grpc.EvaluationServiceStub(channel)  # type: ignore[no-untyped-call]
        reply = stub.Report(
            ev.ReportRequest(model=model, window_s=window_s),
            timeout=600,
            metadata=credentials.metadata,
        )
    report: dict[str, Any] = json.loads(reply.json)
    return report


def fetch_verdict(
    address: str,
    model: str,
    candidate: str = "",
    credentials: ClientCredentials = _OPEN,
) -> ev.VerdictResponse:
    with credentials.channel(address, "sidecar") as channel:
        stub = ev_grpc.EvaluationServiceStub(channel)  # type: ignore[no-untyped-call]
        reply: ev.VerdictResponse = stub.Verdict(
            ev.VerdictRequest(model=model, candidate=candidate),
            timeout=600,
            metadata=credentials.metadata,
        )
        return reply


def fetch_actions(
    address: str,
    model: str = "",
    limit: int = 0,
    credentials: ClientCredentials = _OPEN,
) -> list[dict[str, Any]]:
    """The adaptation journal: trigger runs and playbook actions, newest first."""
    with credentials.channel(address, "sidecar") as channel:
        stub = ev_grpc.EvaluationServiceStub(channel)  # type: ignore[no-untyped-call]
        reply = stub.Actions(
            ev.ActionsRequest(model=model, limit=limit), timeout=60, metadata=credentials.metadata
        )
    actions: list[dict[str, Any]] = json.loads(reply.json)
    return actions


def fetch_reviews(
    address: str,
    model: str = "",
    status: str = "open",
    credentials: ClientCredentials = _OPEN,
) -> list[dict[str, Any]]:
    """The human review queue, oldest first."""
    with credentials.channel(address, "sidecar") as channel:
        stub = ev_grpc.EvaluationServiceStub(channel)  # type: ignore[no-untyped-call]
        reply = stub.Reviews(
            ev.ReviewsRequest(model=model, status=status),
            timeout=60,
            metadata=credentials.metadata,
        )
    reviews: list[dict[str, Any]] = json.loads(reply.json)
    return reviews


def resolve_review(
    address: str, review: int, note: str = "", credentials: ClientCredentials = _OPEN
) -> None:
    """Close an open review (NOT_FOUND when none is open with that id)."""
    with credentials.channel(address, "sidecar") as channel:
        stub = ev_grpc.EvaluationServiceStub(channel)  # type: ignore[no-untyped-call]
        stub.ResolveReview(
            ev.ResolveReviewRequest(id=review, note=note),
            timeout=60,
            metadata=credentials.metadata,
        )


def run_trigger(
    address: str,
    model: str,
    name: str = "",
    reason: str = "",
    force: bool = False,
    credentials: ClientCredentials = _OPEN,
) -> dict[str, Any]:
    """Start a run of ``model``'s trigger now; its record as it started."""
    with credentials.channel(address, "sidecar") as channel:
        stub = ev_grpc.EvaluationServiceStub(channel)  # type: ignore[no-untyped-call]
        reply = stub.RunTrigger(
            ev.RunTriggerRequest(model=model, name=name, reason=reason, force=force),
            timeout=60,
            metadata=credentials.metadata,
        )
    started: dict[str, Any] = json.loads(reply.json)
    return started


def format_actions(actions: list[dict[str, Any]]) -> str:
    """The journal as a table, newest first; a failed run's output tail under it."""
    if not actions:
        return "no trigger runs or playbook actions recorded"
    rows = [("id", "time (UTC)", "model", "kind", "name", "outcome", "exit", "s", "reason")]
    notes: list[str] = []
    for a in actions:
        rows.append(
            (
                str(a["id"]),
                _utc(a["time"]),
                a["model"],
                a["kind"],
                a["name"],
                a["outcome"],
                "" if a["exit_code"] is None else str(a["exit_code"]),
                "" if a["duration_s"] is None else f"{a['duration_s']:.1f}",
                a["reason"],
            )
        )
        why = (a.get("detail") or {}).get("why")
        if why:
            notes.append(f"  {a['id']}: {why}")
        elif a["outcome"] in ("failed", "timeout", "error") and a["output"]:
            notes.append(f"  {a['id']}: ...{a['output'][-300:].strip()}")
    return "\n".join([*format_table(rows), *notes])


def format_reviews(reviews: list[dict[str, Any]]) -> str:
    if not reviews:
        return "no reviews"
    rows = [("id", "time (UTC)", "status", "alert", "model", "version", "segment", "feature")]
    rows += [
        (
            str(r["id"]),
            _utc(r["time"]),
            r["status"],
            r["alert"],
            r["model"],
            r["version"],
            r["segment"],
            r["feature"] or "-",
        )
        for r in reviews
    ]
    files = [f"  {r['id']}: {r['rows']} rows in {r['export']}" for r in reviews]
    return "\n".join([*format_table(rows), *files])


def _utc(seconds: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def format_report(report: dict[str, Any]) -> str:
    """The report as plain-text tables, under what it covers: its window, what it read of it,
    and how its rows are labelled."""
    window, *truncated = describe_window(report)
    lines = [
        f"{report['model']}: {window}, reference profile "
        f"{'found' if report['reference'] else 'missing'}",
        *(f"WARNING: {line}" for line in truncated),
        describe_labels(report.get("labels")),
    ]
    for version, segments in report["versions"].items():
        for segment, metrics in segments.items():
            lines += ["", f"version {version} · {segment} · {metrics['rows']} rows"]
            header = ("feature", "psi", "js|wass", "oov", "out_rng", "missing", "defaulted")
            rows = [header]
            for name, m in sorted(metrics["features"].items()):
                values = (
                    m.get("psi"),
                    m.get("js", m.get("wasserstein")),
                    *(m.get(k) for k in ("oov", "out_of_range", "missing", "defaulted")),
                )
                rows.append((name, *(_num(v) for v in values)))
            lines += format_table(rows, indent="  ")
            output = metrics.get("output")
            if output:
                lines.append(
                    f"  output: psi {_num(output.get('psi'))}, mean {_num(output.get('mean'))}"
                )
            q = metrics["quality"]
            labels = metrics.get("labels")
            if labels:
                lines.append(f"  labels: {describe_labels(labels)}")
                lines += [f"  note: {note}" for note in label_notes(labels, output)]
            if q.get("labelled"):
                lines.append(
                    "  quality: "
                    + ", ".join(
                        f"{k} {_num(q.get(k))}"
                        for k in ("labelled", "auc", "log_loss", "accuracy", "ece")
                        if k in q
                    )
                )
    alerts = report.get("alerts", [])
    lines += ["", f"alerts firing: {len(alerts)}"]
    if alerts:
        rows = [("rule", "version", "segment", "feature", "value", "threshold", "action")]
        rows += [
            (
                a["rule"],
                a["version"],
                a["segment"],
                a["feature"] or "-",
                _num(a["value"]),
                f"{a['direction']} {a['threshold']}",
                a["action"],
            )
            for a in alerts
        ]
        lines += format_table(rows, indent="  ")
    return "\n".join(lines + _journal_lines(report))


def _journal_lines(report: dict[str, Any]) -> list[str]:
    """The model's latest trigger runs and playbook actions, then its open reviews, a few lines
    each; what the report's bounded lists leave out is counted, with the command that shows
    it."""
    lines: list[str] = []
    for key, title, entries, total, command in journal_sections(report):
        lines += ["", _count(title.lower(), len(entries), total, command)]
        lines += _review_lines(entries) if key == "open_reviews" else _action_lines(entries)
    return [_printable(line) for line in lines]


def _review_lines(reviews: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for r in reviews:
        feature = f" feature {r['feature']}" if r["feature"] else ""
        lines += [
            f"  {r['id']} {_utc(r['time'])} {r['alert']} on version {r['version']} "
            f"segment {r['segment']}{feature}",
            f"    {r['rows']} rows to review in {r['export']}",
        ]
    return lines


def _action_lines(actions: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for a in actions:
        exit_code = "" if a["exit_code"] is None else f", exit {a['exit_code']}"
        took = "" if a["duration_s"] is None else f", {a['duration_s']:.1f} s"
        lines.append(
            f"  {a['id']} {_utc(a['time'])} {a['kind']} {a['name']}: "
            f"{a['outcome']}{exit_code}{took}"
        )
        if a["reason"]:
            lines.append(f"    fired: {a['reason']}")
        if a["ran"]:
            lines.append(f"    ran: {a['ran']}")
        lines += [f"    {note}" for note in action_notes(a)]
        tail = output_tail(a.get("output"), _TAIL_CHARS).splitlines()[-_TAIL_LINES:]
        if tail:
            lines += ["    output:", *(f"      {line}" for line in tail)]
    return lines


def _count(title: str, shown: int, total: int, command: str) -> str:
    more = f" (the latest {shown}; `{command}` lists the rest)" if total > shown else ""
    return f"{title}: {total}{more}"


def _printable(line: str) -> str:
    """A line with its control characters escaped: recorded output and reasons are data, and
    must not drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
