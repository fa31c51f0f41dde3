"""The dashboard of a finished run shows its final evaluation, which train/pipeline.py writes into
report.json (not metrics.jsonl): the trained student's success with its interval in the status line,
and the comparison table (cold start / teacher / trained student) with the paired differences."""

from __future__ import annotations

import json

import pytest

from atod_edge.tui.app import AtodApp
from atod_edge.tui.run_report import final_eval
from atod_edge.tui.screens.dashboard import DashboardScreen
from atod_edge.tui.widgets.curve_plot import CurvePlot

SIZE = (120, 36)


def summary(success: float, low: float, high: float, score: float, turns: float, invalid: float) -> dict:
    """evaluate.summarize's keys, as the pipeline stores each row of report["eval"]."""
    return {"episodes": 200, "success": success, "success_ci95": [low, high], "score": score, "turns": turns,
            "invalid_rate": invalid, "truncated_rate": 0.0, "errors": 0, "generated_tokens": 9000,
            "env": "household", "split": "eval", "policy": "model", "outcomes": {"household/eval/0": 1}}


# report.json of `atod-edge train` with compare=true (train/pipeline.py train_command), trimmed
REPORT = {
    "run_dir": "runs/household-atod", "final_checkpoint": "runs/household-atod/checkpoints/step_000200",
    "config": {"env": "household", "algo": "atod", "eval_episodes": 200, "eval_temperature": 0.4},
    "eval": {"cold-start student": summary(0.12, 0.082, 0.172, 0.21, 9.8, 0.031),
             "teacher": summary(0.64, 0.571, 0.704, 0.70, 6.1, 0.004),
             "ATOD student": summary(0.62, 0.551, 0.684, 0.68, 6.3, 0.006)},
    "table": "| model | success | 95% CI | score | turns | invalid |\n|---|---|---|---|---|---|\n"
             "| cold-start student | 12.0% | [8.2%, 17.2%] | 0.210 | 9.8 | 3.1% |\n"
             "| teacher | 64.0% | [57.1%, 70.4%] | 0.700 | 6.1 | 0.4% |\n"
             "| ATOD student | 62.0% | [55.1%, 68.4%] | 0.680 | 6.3 | 0.6% |",
    "paired": "- ATOD student - cold-start student: +50.0 points, 95% interval [+43.1, +56.9], paired over "
              "the same 200 tasks\n- ATOD student - teacher: -2.0 points, 95% interval [-6.1, +2.1], paired "
              "over the same 200 tasks",
}


def finished_run(root, report: dict) -> object:
    """A run that evaluated only at the end (eval_every=0): no eval rows in metrics.jsonl."""
    root.mkdir()
    (root / "config.yaml").write_text("algo: atod\nenv: household\n")
    rows = [{"step": s, "loss": 1.0 / (s + 1), "success": 0.5, "reward": 0.5} for s in range(4)]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))   # as atomic_write_json
    return root


@pytest.mark.asyncio
async def test_a_finished_run_shows_its_final_evaluation_and_table(tmp_path):
    app = AtodApp(str(finished_run(tmp_path / "run", REPORT)), refresh_seconds=0)
    async with app.run_test(size=SIZE):
        screen = app.screen
        assert isinstance(screen, DashboardScreen)
        status = str(screen.query_one("#run-status").render())
        assert "finished" in status and "final eval success 62.0% [55.1%, 68.4%]" in status
        panel = screen.query_one("#final-eval")
        assert panel.display
        assert panel.border_title == "final evaluation · household eval split · 200 episodes · temperature 0.4"
        lines = str(panel.render()).splitlines()
        table = {line.split("  ")[0]: line for line in lines[1:4]}
        assert list(table) == ["cold-start student", "teacher", "ATOD student"]   # the student last
        assert "12.0%" in table["cold-start student"] and "[8.2%, 17.2%]" in table["cold-start student"]
        assert "64.0%" in table["teacher"] and "0.700" in table["teacher"]
        assert "62.0%" in table["ATOD student"] and "[55.1%, 68.4%]" in table["ATOD student"]
        assert lines[4].startswith("- ATOD student - cold-start student: +50.0 points")
        # no empty "eval success: no data yet" plot beside the evaluation the run has
        assert not screen.query_one("#curve-eval_success", CurvePlot).display
        assert screen.query_one("#curve-loss", CurvePlot).points


@pytest.mark.asyncio
async def test_a_run_without_a_final_evaluation_shows_none(tmp_path):
    report = {k: v for k, v in REPORT.items() if k not in ("eval", "table", "paired")}   # eval_episodes=0
    app = AtodApp(str(finished_run(tmp_path / "run", report)), refresh_seconds=0)
    async with app.run_test(size=SIZE):
        screen = app.screen
        status = str(screen.query_one("#run-status").render())
        assert "finished" in status and "final eval" not in status
        assert not screen.query_one("#final-eval").display
        eval_curve = screen.query_one("#curve-eval_success", CurvePlot)
        assert eval_curve.display and "no data yet" in str(eval_curve.render())


@pytest.mark.asyncio
async def test_evaluations_during_training_keep_their_curve_beside_the_final_one(run_dir):
    (run_dir / "report.json").write_text(json.dumps(REPORT, sort_keys=True))
    app = AtodApp(str(run_dir), refresh_seconds=0)
    async with app.run_test(size=SIZE):
        screen = app.screen
        eval_curve = screen.query_one("#curve-eval_success", CurvePlot)
        assert eval_curve.display and [step for step, _ in eval_curve.points] == [1, 3, 5]
        assert screen.query_one("#final-eval").display


def test_the_reader_takes_a_damaged_report_without_raising():
    assert final_eval(None) is None and final_eval([]) is None and final_eval({"eval": "x"}) is None
    assert final_eval({"eval": {"a": {"success": "high"}, "b": None}}) is None
    one = final_eval({"eval": {"ATOD student": {"success": 0.5, "success_ci95": [0.4, None]}, "bad": {}},
                      "paired": 3, "config": []})
    assert [row.model for row in one.rows] == ["ATOD student"] and one.student.ci95 is None
    assert one.paired == [] and one.temperature is None and one.env is None


def test_the_trained_student_is_the_last_row_whatever_the_key_order():
    """report.json's keys are sorted: the table's order wins, or without a table the config's algo."""
    rows = final_eval(json.loads(json.dumps(REPORT, sort_keys=True))).rows
    assert [row.model for row in rows] == ["cold-start student", "teacher", "ATOD student"]
    two = final_eval({"eval": {"GRPO student": {"success": 0.5}, "teacher": {"success": 0.6}},
                      "config": {"algo": "grpo"}})
    assert [row.model for row in two.rows] == ["teacher", "GRPO student"] and two.student.success == 0.5
