"""The text report (``gateway report MODEL``) from report dicts: the model's trigger runs,
playbook actions and open reviews, a few lines each, bounded, and safe for a terminal."""

from __future__ import annotations

from gateway.evaluation.client import format_report
from tests.unit.evaluation.test_page import HOSTILE, action, journal_report, report, review


def section(text: str, title: str) -> list[str]:
    """The lines from the one starting with ``title`` to the next blank line."""
    lines = text.splitlines()
    [start] = [i for i, line in enumerate(lines) if line.startswith(title)]
    end = next((i for i in range(start, len(lines)) if not lines[i]), len(lines))
    return lines[start:end]


def test_the_text_report_lists_trigger_runs_playbook_actions_and_reviews():
    text = format_report(journal_report())
    runs = section(text, "trigger runs:")
    assert runs[0] == "trigger runs: 2"
    assert runs[1] == "  2 2023-11-14 22:11:20 performance m-retrain: failed, exit 3, 4.2 s"
    assert runs[2] == f"    fired: a reason {HOSTILE}"
    assert runs[3] == '    ran: ["python", "train.py"]'
    assert runs[4] == "    training data: 300 rows in /store/training/m-retrain-1.parquet"
    assert runs[5] == "    output:"
    assert runs[6:] == [  # the failed run's output: the last lines of its bounded tail
        "      ..." + "x" * (300 - len(f"\nTraceback: {HOSTILE}\n")),
        f"      Traceback: {HOSTILE}",
        "  1 2023-11-14 22:12:20 performance m-retrain: ok, exit 0, 4.2 s",
        "    fired: quality alert accuracy-low: accuracy 0.5 below 0.9 on version 2 segment all",
        '    ran: ["python", "train.py"]',
        "    training data: 300 rows in /store/training/m-retrain-1.parquet",
        "    output:",
        "      trained on 300 rows",
    ]
    actions = section(text, "playbook actions:")
    assert actions[:3] == [
        "playbook actions: 2",
        "  4 2023-11-14 22:09:20 rollback rollback: ok",
        "    fired: quality alert accuracy-low: accuracy 0.5 below 0.9 on version 2 segment all",
    ]
    assert "    ran: Rollback m-live at 127.0.0.1:5000" in actions
    assert "  3 2023-11-14 22:10:20 tighten_thresholds tighten_thresholds: recorded" in actions
    assert "    suggests threshold 0.55 (now 0.5)" in actions
    reviews = section(text, "open reviews:")
    assert reviews == [
        "open reviews: 1",
        f"  7 2023-11-14 22:11:20 accuracy-low on version 2 segment {HOSTILE}",
        "    300 rows to review in /store/reviews/7.parquet",
    ]


def test_the_text_report_shows_a_bounded_tail_of_a_runs_output():
    output = "\n".join(f"line {i}" for i in range(100)) + "\n"
    text = format_report(report(triggers=[action(1, outcome="failed", output=output)]))
    runs = section(text, "trigger runs:")
    assert runs[runs.index("    output:") + 1 :] == [f"      line {i}" for i in range(95, 100)]
    long = format_report(report(triggers=[action(1, output="y" * 5000)]))
    [tail] = [line for line in long.splitlines() if line.startswith("      ")]
    assert tail == "      ..." + "y" * 300


def test_the_text_report_escapes_control_characters_a_run_recorded():
    hostile = action(1, reason="why \x1b[2J\x1b]0;owned\x07", output="done\x1b[31m red\r\n")
    text = format_report(report(triggers=[hostile]))
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert "    fired: why \\x1b[2J\\x1b]0;owned\\x07" in text
    assert "      done\\x1b[31m red" in text


def test_the_text_report_counts_what_it_leaves_out():
    totals = {"triggers": 27, "playbook_actions": 0, "open_reviews": 23}
    text = format_report(
        report(
            triggers=[action(i) for i in range(20, 0, -1)],
            playbook_actions=[],
            reviews=[review(i) for i in range(4, 24)],
            journal_totals=totals,
        )
    )
    runs = section(text, "trigger runs:")
    assert (
        runs[0] == "trigger runs: 27 (the latest 20; `gateway actions m --limit N` lists the rest)"
    )
    assert sum(line.startswith("  ") and not line.startswith("   ") for line in runs) == 20
    assert section(text, "playbook actions:") == ["playbook actions: 0"]
    reviews = section(text, "open reviews:")
    assert reviews[0] == (
        "open reviews: 23 (the latest 20; `gateway review list --model m` lists the rest)"
    )
    assert len(reviews) == 1 + 2 * 20
