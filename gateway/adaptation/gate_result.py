"""The validation gate's result: per criterion pass / fail / not enough data, with numbers,
stored as ``<repository>/<model>/<version>/gate.json`` beside the model file it judged.

The repository reads it (``refusal``) when ``adaptation.gate.required`` is on: a version is
served only while its gate.json says pass for the model file as it is now (its SHA-256).
``standing`` tells a version never judged (or judged on another model file) from one that
failed: what ``adaptation.gate.auto`` judges by itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

__all__ = [
    "GATE_FILE",
    "Criterion",
    "GateResult",
    "Word",
    "file_digest",
    "format_result",
    "refusal",
    "standing",
    "write_result",
]

GATE_FILE = "gate.json"
MODEL_FILE = "model.onnx"
Outcome = Literal["pass", "fail", "not_enough_data"]
Standing = Literal["pass", "fail", "unjudged", "unreadable"]


class Word(NamedTuple):
    """The gate's word on a version: its standing, why it may not serve (None: it may), and
    the model file's SHA-256 when reading the word took it ("" otherwise: no gate.json, or a
    file that cannot be read), so that a caller does not hash the file again."""

    standing: Standing
    reason: str | None
    digest: str = ""


Number = float | int | str | None


@dataclass(frozen=True)
class Criterion:
    """One check: its name (``auc``, ``segment.channel=web``, ``outputs``, ``contract``,
    ``latency.batch_1`` ...), outcome, a one-line reason and the numbers behind it."""

    name: str
    outcome: Outcome
    reason: str
    numbers: dict[str, Number] = field(default_factory=dict)


@dataclass(frozen=True)
class GateResult:
    model: str
    version: int
    against: int | None  # the serving version compared with (None: none)
    model_digest: str  # SHA-256 of the model file judged
    contract: str | None  # the contract version the candidate was replayed under
    data: str  # where the labelled rows came from
    rows: int
    criteria: tuple[Criterion, ...]
    checked_at: str  # ISO 8601, UTC

    @property
    def passed(self) -> bool:
        """Every criterion passes, or (segments only) lacks the data to be judged: the
        primary metric without enough labels fails, a gate passes on evidence only."""
        return not self.failures

    @property
    def failures(self) -> list[Criterion]:
        return [c for c in self.criteria if c.outcome != "pass" and not _tolerated(c)]

    def to_json(self) -> dict[str, object]:
        body = asdict(self)
        body["passed"] = self.passed
        body["criteria"] = [asdict(c) for c in self.criteria]
        return body


def _tolerated(criterion: Criterion) -> bool:
    return criterion.outcome == "not_enough_data" and criterion.name.startswith("segment")


def file_digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_result(version_dir: Path, result: GateResult) -> Path:
    """Write gate.json atomically (a repository load never reads half of it)."""
    path = version_dir / GATE_FILE
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    os.replace(partial, path)
    return path


def refusal(version_dir: Path) -> str | None:
    """Why the version in ``version_dir`` may not serve under a required gate; None: it may
    (its gate.json passed, for this very model file)."""
    return standing(version_dir).reason


def standing(version_dir: Path) -> Word:
    """The gate's word on the version in ``version_dir`` as its model file is now, and why it
    may not serve (None: it may). ``unjudged``: no gate.json judged this model file (there is
    none, or it judged a file since replaced); ``unreadable``: gate.json or the model file
    cannot be read."""
    path = version_dir / GATE_FILE
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        return Word(
            "unjudged",
            "the validation gate has not passed it (no gate.json: run `gateway validate`)",
        )
    except (OSError, ValueError) as err:
        return Word("unreadable", f"the validation gate's {path} cannot be read: {err}")
    if not isinstance(body, dict):
        return Word("unreadable", f"the validation gate's {path} is not a JSON object")
    try:
        digest = file_digest(version_dir / MODEL_FILE)
    except OSError as err:
        return Word("unreadable", f"the validation gate cannot check its model file: {err}")
    passed = bool(body.get("passed"))
    if body.get("model_digest") != digest:
        judged = "passed" if passed else "failed"
        return Word(
            "unjudged",
            f"the validation gate {judged} another model file (model.onnx changed since)",
            digest,
        )
    if passed:
        return Word("pass", None, digest)
    criteria = body.get("criteria")
    reasons = [
        f"{c.get('name')}: {c.get('reason')}"
        for c in (criteria if isinstance(criteria, list) else [])
        if isinstance(c, dict) and _failing(c)
    ]
    why = "the validation gate failed it: " + ("; ".join(reasons) or "see gate.json")
    return Word("fail", why, digest)


def _failing(criterion: dict[str, object]) -> bool:
    """A criterion as ``GateResult.failures`` counts it, read back from gate.json."""
    outcome, name = criterion.get("outcome"), str(criterion.get("name"))
    return outcome == "fail" or (outcome == "not_enough_data" and not name.startswith("segment"))


def format_result(result: GateResult) -> str:
    """The result as a person reads it: the verdict, then one line per criterion."""
    against = f" against version {result.against}" if result.against is not None else ""
    head = "PASS" if result.passed else "FAIL"
    lines = [f"{head} {result.model} version {result.version}{against} on {result.rows} rows"]
    for c in result.criteria:
        mark = {"pass": "pass", "fail": "FAIL", "not_enough_data": "n/a "}[c.outcome]
        lines.append(f"  {mark}  {c.name}: {c.reason}")
    return "\n".join(lines)
