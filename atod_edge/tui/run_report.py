"""A finished run's final evaluation, as the dashboard shows it: read from the report.json that
train/pipeline.py writes after the last step (the evaluation of the trained student on the eval
split, and with `compare` the cold-start student and the teacher on the same tasks). report.json
is written with sorted keys, so the rows take the order of the report's markdown table, the trained
student ("ATOD student", after the config's algo) last. metrics.jsonl holds only the evaluations
made during training.

Like data.py, it takes whatever the file holds: a report without an evaluation, or a row that is
not a summary with a finite success, gives None or drops the row; nothing here raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class EvalRow:
    """One model's final evaluation (evaluate.summarize's numbers); None where the report lacks one."""

    model: str
    success: float
    ci95: tuple[float, float] | None
    episodes: int | None
    score: float | None
    turns: float | None
    invalid_rate: float | None


@dataclass
class FinalEval:
    """The rows of the comparison table, the trained student last, and the paired differences."""

    rows: list[EvalRow]
    paired: list[str]            # "- ATOD student - teacher: +2.0 points, 95% interval [...], ..."
    env: str | None
    split: str | None
    temperature: float | None

    @property
    def student(self) -> EvalRow:
        return self.rows[-1]


def final_eval(report: Any) -> FinalEval | None:
    """The final evaluation in a run's report.json (RunDir.report()), or None if it has none."""
    if not isinstance(report, dict) or not isinstance(report.get("eval"), dict):
        return None
    rows, first = [], None
    for model, summary in report["eval"].items():
        if not isinstance(summary, dict) or (success := _finite(summary.get("success"))) is None:
            continue
        first = first or summary
        ci = summary.get("success_ci95")
        bounds = [_finite(v) for v in ci] if isinstance(ci, list) and len(ci) == 2 else [None]
        episodes = summary.get("episodes")
        rows.append(EvalRow(str(model), success, None if None in bounds else (bounds[0], bounds[1]),
                            episodes if isinstance(episodes, int) and not isinstance(episodes, bool) else None,
                            _finite(summary.get("score")), _finite(summary.get("turns")),
                            _finite(summary.get("invalid_rate"))))
    if not rows:
        return None
    config = report.get("config") if isinstance(report.get("config"), dict) else {}
    algo = config.get("algo")
    trained = f"{algo.upper()} student" if isinstance(algo, str) else None   # train/pipeline.py's name
    table = report.get("table")
    order = [cells[1].strip() for line in table.splitlines()
             if len(cells := line.split("|")) > 2] if isinstance(table, str) else []
    rows.sort(key=lambda row: (row.model == trained, order.index(row.model) if row.model in order else len(order)))
    paired = report.get("paired")
    return FinalEval(rows=rows,
                     paired=[line for line in paired.splitlines() if line.strip()] if isinstance(paired, str) else [],
                     env=_str(first.get("env")) or _str(config.get("env")),
                     split=_str(first.get("split")),
                     temperature=_finite(config.get("eval_temperature")))


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
