"""Pilot tests for the training dashboard: curves, a run still being written, config and samples."""

from __future__ import annotations

import json

import pytest
from tui_fixtures import until

from atod_edge.tui.app import AtodApp
from atod_edge.tui.screens.dashboard import DashboardScreen
from atod_edge.tui.screens.inspector import InspectorScreen
from atod_edge.tui.screens.text_view import TextViewScreen
from atod_edge.tui.widgets.curve_plot import CurvePlot

SIZE = (120, 36)
pytestmark = pytest.mark.asyncio


async def test_curves_follow_a_run_being_written(run_dir):
    app = AtodApp(str(run_dir), refresh_seconds=0.05)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, DashboardScreen)
        loss = screen.query_one("#curve-loss", CurvePlot)
        assert [step for step, _ in loss.points] == list(range(8))          # the trainer's steps 0..7
        assert [step for step, _ in screen.query_one("#curve-eval_success", CurvePlot).points] == [1, 3, 5]
        # kappa scales OPD and falls, rho scales GRPO and rises (train/schedule.py), as titled
        kappa = screen.query_one("#curve-kappa", CurvePlot)
        rho = screen.query_one("#curve-rho", CurvePlot)
        assert kappa.points[0][1] == 1.0 and kappa.points[-1][1] == pytest.approx(0.1)
        assert rho.points[0][1] == 1.0 and rho.points[-1][1] == pytest.approx(2.0)
        assert "OPD" in kappa.title and "GRPO" in rho.title
        assert any("skipped 1 corrupt" in n.message for n in app._notifications)
        # the trainer finishes the torn line and writes another step: the timer picks both up
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write('5, "loss": 0.01}\n' + json.dumps({"step": 9, "loss": 0.005}) + "\n")
        await until(pilot, lambda: loss.points[-1][0] == 9)
        assert loss.points[-2:] == ((8, 0.01), (9, 0.005))
        assert "step 9" in str(screen.query_one("#run-status").render())
        # pause following: new lines are not read until resumed or reloaded
        await pilot.press("space")
        assert "paused" in str(screen.query_one("#run-status").render())
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 10, "loss": 0.004}) + "\n")
        screen.refresh_tick()          # what the refresh timer does on its next tick
        assert loss.points[-1][0] == 9
        await pilot.press("r")
        assert loss.points[-1][0] == 10


async def test_config_and_samples_are_one_key_away(run_dir):
    app = AtodApp(str(run_dir), refresh_seconds=0)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("c")
        assert isinstance(app.screen, TextViewScreen)
        assert "group_size" in app.screen.text
        await pilot.press("escape")
        await pilot.press("s")
        inspector = app.screen
        assert isinstance(inspector, InspectorScreen)
        assert inspector.source_title.endswith("step_000007.jsonl")   # the trainer's last samples
        assert inspector.decoder.has_tokenizer        # found in the run's checkpoints
        await pilot.press("escape")                    # no filters set: back to the dashboard
        assert isinstance(app.screen, DashboardScreen)


async def test_empty_run_dir_waits_without_crashing(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "config.yaml").write_text("train: {steps: 3}\n")
    app = AtodApp(str(run), refresh_seconds=0.05)
    async with app.run_test(size=SIZE) as pilot:
        status = str(app.screen.query_one("#run-status").render())
        assert "waiting for metrics.jsonl" in status
        assert "no data yet" in str(app.screen.query_one("#curve-loss").render())
        await pilot.press("s")                         # no samples yet: a notice
        assert isinstance(app.screen, DashboardScreen)
        assert any("no sample episodes" in n.message for n in app._notifications)
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "success": 0}) + "\n")
        (run / "report.json").write_text("{}")
        loss = app.screen.query_one("#curve-loss", CurvePlot)
        await until(pilot, lambda: loss.points, "the refresh timer to read the new file")
        assert loss.points == ((1, 1.0),)
        assert "finished" in str(app.screen.query_one("#run-status").render())
