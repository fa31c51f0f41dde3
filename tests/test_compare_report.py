"""The comparison benchmark's tables, time breakdown and plots, on synthetic run directories
(real files in the layout benchmarks/compare.py writes; no training)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCH))  # compare.py imports compare_report as a sibling
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


report = _load("compare_report")


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _summary(success: float, turns: float = 5.0) -> dict:
    return {"success": success, "success_ci95": [0.0, 1.0], "score": success, "turns": turns,
            "invalid_rate": 0.0, "episodes": 10}


def make_run(out: Path, env: str, method: str, seed: int, eval_success: float, unseen_success: float,
             steps: int = 4, turns: float = 5.0, done: bool = True, wall_s: float | None = None,
             resumed_from_step: int = 0) -> Path:
    """A run dir: per-step rows with fixed timings (gen 2, env 1, prompt 0.5, rollout 4,
    teacher 1, update 3, checkpoint 0.5 s), one curve eval (time 2 s) after step 2."""
    run_dir = out / "runs" / report.run_name(env, method, seed)
    _write_json(run_dir / "run.json", {"env": env, "method": method, "seed": seed, "config": {"steps": steps}})
    lines = []
    for step in range(steps):
        lines.append({"step": step, "success": 0.1 * step, "episode_len": 6.0 - step, "kappa": 1.0 - 0.2 * step,
                      "rho": 1.0 + 0.2 * step, "mean_abs_log_ratio": 0.5, "mean_turn_weight": 0.8,
                      "time_rollout": 4.0, "time_rollout_generate": 2.0, "time_rollout_env": 1.0,
                      "time_rollout_prompt": 0.5, "time_teacher": 1.0, "time_update": 3.0, "time_checkpoint": 0.5,
                      "generated_tokens": 100, "prompt_tokens": 300})
        if step == 1:
            lines.append({"step": step, "eval_success": eval_success / 2, "eval_score": 0.0, "eval_turns": 5.0,
                          "time_eval": 2.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 9, "torn')
    if done:
        _write_json(run_dir / "done.json", {"final_checkpoint": str(run_dir / "checkpoints" / "step_000004"),
                                            "wall_s": wall_s, "resumed_from_step": resumed_from_step,
                                            "peak_rss_mb": 500.0})
        _write_json(run_dir / "final_eval.json", {
            "eval": {"key": "k", "summary": _summary(eval_success, turns)},
            "unseen": {"key": "k", "summary": _summary(unseen_success, turns)}})
    return run_dir


def make_models(out: Path, env: str, teacher: float, cold: float) -> None:
    for role, success in (("teacher", teacher), ("cold-start", cold)):
        _write_json(out / "models" / env / f"{role}.json",
                    {"path": f"/m/{role}", "eval": {"key": "k", "summary": _summary(success, 8.0)},
                     "unseen": {"key": "k", "summary": _summary(success / 2, 8.0)}})


@pytest.fixture
def bench_dir(tmp_path):
    out = tmp_path / "results"
    for env, offset in (("household", 0.0), ("shop", 0.1)):
        make_models(out, env, teacher=0.6 + offset, cold=0.1 + offset)
        for seed, jitter in ((0, -0.05), (1, 0.05)):
            make_run(out, env, "atod", seed, 0.7 + offset + jitter, 0.5 + jitter, turns=4.0)
            make_run(out, env, "opd", seed, 0.6 + offset + jitter, 0.4, turns=5.0)
            make_run(out, env, "grpo", seed, 0.3 + offset, 0.2, turns=7.0)
    make_run(out, "household", "atod-no-anneal", 0, 0.5, 0.3)
    # an unfinished run: its training rows count, it has no final numbers
    make_run(out, "household", "atod-no-anneal", 1, 0.9, 0.9, done=False)
    _write_json(out / "wall.json", {"seconds": 7200.0})
    return out


def test_tables_mean_std_and_average_over_envs(bench_dir):
    results = report.build_report(bench_dir, ["household", "shop"], ["atod", "opd", "grpo"], [0, 1],
                                  ["no-anneal"], settings={"steps": 4, "eval_episodes": 10}, plots=False)
    eval_stats = results["tables"]["success"]["eval"]
    atod_household = eval_stats["atod"]["household"]
    assert atod_household["mean"] == pytest.approx(0.7)
    assert atod_household["std"] == pytest.approx(math.sqrt(2 * 0.05 ** 2))  # sample std of 0.65, 0.75
    assert atod_household["n"] == 2
    # average: per seed over envs (0.65+0.75)/2 and (0.75+0.85)/2 -> mean 0.75, std of 0.70, 0.80
    assert eval_stats["atod"]["average"]["mean"] == pytest.approx(0.75)
    assert eval_stats["atod"]["average"]["std"] == pytest.approx(math.sqrt(2 * 0.05 ** 2))
    assert eval_stats["teacher"]["average"]["mean"] == pytest.approx(0.65)
    assert results["tables"]["success"]["unseen"]["cold-start"]["shop"]["mean"] == pytest.approx(0.1)
    assert results["tables"]["turns"]["grpo"]["average"]["mean"] == pytest.approx(7.0)

    md = (bench_dir / "results.md").read_text()
    assert "| ATOD | 70.0 ± 7.1 | 80.0 ± 7.1 | 75.0 ± 7.1 |" in md
    assert "| teacher | 60.0 | 70.0 | 65.0 |" in md  # one model: no ± and no (n=...)
    # the ablation table: only seed 0 of no-anneal finished
    assert "| ATOD without annealing | 50.0 (n=1) | 30.0 (n=1) | 5.0 (n=1) |" in md
    assert "- ATOD > OPD: holds" in md
    assert "- OPD > GRPO: holds (" in md
    assert "the ATOD student passes its teacher: holds" in md
    assert "2.00 h" in md
    assert json.loads((bench_dir / "results.json").read_text())["runs"]["household-atod-no-anneal-s1"][
        "finished"] is False


def test_missing_env_leaves_the_average_empty(bench_dir):
    import shutil

    shutil.rmtree(bench_dir / "runs" / "shop-grpo-s0")
    shutil.rmtree(bench_dir / "runs" / "shop-grpo-s1")
    results = report.build_report(bench_dir, ["household", "shop"], ["atod", "opd", "grpo"], [0, 1], [],
                                  plots=False)
    assert "average" not in results["tables"]["success"]["eval"]["grpo"]
    assert "| GRPO | 30.0 ± 0.0 | — | — |" in (bench_dir / "results.md").read_text()


def test_time_breakdown_shares_and_rates():
    rows = [{"step": s, "time_rollout": 4.0, "time_rollout_generate": 2.0, "time_rollout_env": 1.0,
             "time_rollout_prompt": 0.5, "time_teacher": 1.0, "time_update": 3.0, "time_checkpoint": 0.5,
             "generated_tokens": 100, "prompt_tokens": 300} for s in range(4)]
    evals = [{"step": 1, "eval_success": 0.5, "time_eval": 2.0}]
    # measured per run: 4 x (4 + 1 + 3 + 0.5) + 2 = 36 s; wall 40 s leaves 4 s "other"
    b = report.time_breakdown(rows, evals, wall_s=40.0)
    assert b["step_seconds"] == pytest.approx(10.0)
    assert b["seconds_per_step"]["rollout_other"] == pytest.approx(0.5)
    assert b["seconds_per_step"]["eval"] == pytest.approx(0.5)
    assert b["share"]["generate"] == pytest.approx(0.2)
    assert b["share"]["other"] == pytest.approx(0.1)
    assert sum(b["share"].values()) == pytest.approx(1.0)
    assert b["tokens_per_s"]["generation"] == pytest.approx(50.0)
    assert b["tokens_per_s"]["teacher_scoring"] == pytest.approx(400.0)
    assert b["tokens_per_s"]["update"] == pytest.approx(400 / 3)
    # GRPO: a teacher phase of microseconds (a sync, no model) -> no rate; no wall -> no "other"
    grpo = report.time_breakdown([{**r, "time_teacher": 2e-5} for r in rows], [], None)
    assert grpo["tokens_per_s"]["teacher_scoring"] is None
    assert grpo["share"]["other"] == 0.0
    merged = report.merge_breakdowns([b, grpo])
    assert merged["seconds_per_step"]["teacher"] == pytest.approx(0.5, abs=1e-4)
    assert merged["tokens_per_s"]["teacher_scoring"] == pytest.approx(400.0)
    assert report.time_breakdown([], evals) is None


def test_resumed_run_gets_no_other_phase(tmp_path):
    fresh = report.load_run(make_run(tmp_path, "household", "atod", 0, 0.5, 0.5, wall_s=100.0))
    resumed = report.load_run(make_run(tmp_path, "household", "opd", 0, 0.5, 0.5, wall_s=100.0,
                                       resumed_from_step=2))
    assert report.run_breakdown(fresh)["seconds_per_step"]["other"] == pytest.approx((100.0 - 36.0) / 4)
    assert report.run_breakdown(resumed)["seconds_per_step"]["other"] == 0.0
    # the torn last line of metrics.jsonl is skipped, the eval row is told apart
    assert len(fresh.train_rows) == 4 and len(fresh.eval_rows) == 1


def test_curves_band_and_saturation(tmp_path):
    run = report.load_run(make_run(tmp_path, "household", "opd", 0, 0.8, 0.5))
    assert report.success_curve(run, 0.1) == [(0, 0.1), (2, 0.4), (4, 0.8)]
    xs, mean, low, high = report.band([[(0, 0.0), (2, 0.4)], [(0, 0.2), (2, 0.6), (4, 0.9)]])
    assert xs == [0, 2, 4]
    assert mean == pytest.approx([0.1, 0.5, 0.9])
    assert low == pytest.approx([0.0, 0.4, 0.9]) and high == pytest.approx([0.2, 0.6, 0.9])
    assert report.saturation_step([0, 5, 10, 15], [0.1, 0.5, 0.6, 0.6]) == 10
    assert report.saturation_step([0, 5], [0.5, 0.4]) == 0


def test_claim_verdicts():
    a = {"mean": 0.7, "std": 0.01, "n": 3}
    b = {"mean": 0.6, "std": 0.01, "n": 3}
    noisy = {"mean": 0.68, "std": 0.2, "n": 3}
    assert ": holds (" in report.compare_claim(a, b, "A > B")
    assert "does not hold" in report.compare_claim(b, a, "B > A")
    assert "within noise" in report.compare_claim(noisy, b, "noisy > B")
    assert "not measured" in report.compare_claim(a, None, "A > ?")
    assert ": holds (" in report.compare_claim({"mean": 4.0, "std": 0.0, "n": 1}, {"mean": 6.0, "std": 0.0, "n": 1},
                                               "fewer turns", larger_is_better=False)


def test_plots_are_written(bench_dir):
    report.build_report(bench_dir, ["household", "shop"], ["atod", "opd", "grpo"], [0, 1], ["no-anneal"])
    for name in ("success_vs_step.png", "kappa_rho.png", "turns_vs_step.png", "time_breakdown.png"):
        data = (bench_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert not list(bench_dir.glob(".*.tmp"))  # atomic writes leave no temporaries
    md = (bench_dir / "results.md").read_text()
    # time table: 8.5 s per step + 2 s of eval spread over 4 steps, no wall time given; peak RSS
    assert "| household ATOD | 9.0 | 500 |" in md


def test_plan_and_run_configs():
    compare = _load("compare")
    plan = compare.plan_runs(["household", "shop"], ["grpo", "atod"], [0, 1], ["no-anneal", "token"])
    assert plan[:5] == [("household", "grpo", 0), ("household", "atod", 0), ("household", "atod-no-anneal", 0),
                        ("household", "atod-token", 0), ("shop", "grpo", 0)]
    assert len(plan) == 12 and not any(env == "shop" and "-" in m for env, m, _ in plan)
    args = compare.parse_args(["--steps", "20", "--set", "tasks_per_step=3"])
    cfg = compare.run_config("household", "atod-no-anneal", 2, args)
    assert (cfg.algo, cfg.seed, cfg.steps, cfg.tasks_per_step) == ("atod", 2, 20, 3)
    assert cfg.schedule.anneal is False and cfg.weights == "tdur"
    assert cfg.eval_every == 4 and cfg.eval_episodes == 50
    token = compare.run_config("shop", "atod-token", 0, compare.parse_args(["--set", "eval_every=7"]))
    assert token.weights == "token" and token.env == "shop" and token.eval_every == 7
    assert compare.run_config("household", "opd", 0, args).schedule.anneal is True


def test_env_scoped_overrides():
    compare = _load("compare")
    sets = ["tasks_per_step=3", "shop:bootstrap.teacher_noise=0.4", "household:steps=7", "env=x.y:Z"]
    assert compare.overrides_for("shop", sets) == ["tasks_per_step=3", "bootstrap.teacher_noise=0.4", "env=x.y:Z"]
    args = compare.parse_args(["--set", "tasks_per_step=3", "--set", "shop:bootstrap.teacher_noise=0.4",
                               "--set", "household:eval_episodes=9"])
    shop, household = compare.run_config("shop", "grpo", 0, args), compare.run_config("household", "grpo", 0, args)
    from atod_edge.config import load_config
    from atod_edge.train.config import TrainConfig

    recipe_noise = load_config(TrainConfig, "household").bootstrap.teacher_noise
    assert shop.bootstrap.teacher_noise == 0.4 and household.bootstrap.teacher_noise == recipe_noise != 0.4
    assert household.eval_episodes == 9 and shop.eval_episodes == 50
    assert shop.tasks_per_step == household.tasks_per_step == 3
