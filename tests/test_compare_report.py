"""The comparison benchmark's tables, time breakdown and plots, on synthetic run directories
(real files in the layout benchmarks/compare.py writes; no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from bench_loader import load_benchmark

report = load_benchmark("compare_report")


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


def test_curve_points_are_scored_on_the_curves_tasks(tmp_path):
    # the in-training evals play the first 4 tasks; the final and cold-start evals play 8, the
    # first 4 of which are easier: the curve's end points must use those 4, not all 8
    run_dir = make_run(tmp_path, "household", "opd", 0, 0.5, 0.5)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()[:-1]]
    for row in rows:
        if "eval_success" in row:
            row["eval_outcomes"] = [1, 0, 0, 0]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = json.loads((run_dir / "final_eval.json").read_text())
    final["eval"]["episodes"] = {"task_id": [f"t{i}" for i in range(8)], "success": [1, 1, 1, 0, 0, 0, 0, 0]}
    _write_json(run_dir / "final_eval.json", final)
    run = report.load_run(run_dir)
    cold = {"task_id": [f"t{i}" for i in range(8)], "success": [1, 1, 0, 0, 0, 0, 0, 0]}
    assert report.curve_tasks(run) == 4
    assert report.success_curve(run, 0.1, cold) == [(0, 0.5), (2, 0.25), (4, 0.75)]
    assert report.success_curve(run, 0.1) == [(0, 0.1), (2, 0.25), (4, 0.75)]   # no cold-start outcomes


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
    for name in ("success_vs_step.png", "kappa_rho.png", "turns_vs_step.png", "log_ratio_vs_step.png",
                 "time_breakdown.png"):
        data = (bench_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert not list(bench_dir.glob(".*.tmp"))  # atomic writes leave no temporaries
    md = (bench_dir / "results.md").read_text()
    # time table: 8.5 s per step + 2 s of eval spread over 4 steps, no wall time given; peak RSS
    assert "| household ATOD | 9.0 | 500 |" in md


def test_plan_and_run_configs():
    compare = load_benchmark("compare")
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
    compare = load_benchmark("compare")
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



def test_recipe_flag_picks_the_recipe_and_checks_its_env():
    compare = load_benchmark("compare")
    from atod_edge.config import load_config
    from atod_edge.errors import UserError
    from atod_edge.train.config import TrainConfig

    recipe = load_config(TrainConfig, "smollm2-household")
    cfg = compare.run_config("household", "atod", 0, compare.parse_args(["--recipe", "smollm2-household"]))
    assert (cfg.teacher, cfg.precision, cfg.steps) == (recipe.teacher, "bf16", recipe.steps)
    assert cfg.bootstrap.student_from_teacher == "every:3" and cfg.lr == recipe.lr
    assert compare.run_config("household", "atod", 0, compare.parse_args([])).teacher == "household-teacher"
    with pytest.raises(UserError, match="--recipe smollm2-household trains on household, not on --envs shop"):
        compare.base_config("shop", compare.parse_args(["--recipe", "smollm2-household"]))

# --- paired comparisons, the paper's table, --commit -----------------------------------------

import numpy as np  # noqa: E402


def _outcomes(success: list[int], turns: list[int] | None = None, first_task: int = 0) -> dict:
    n = len(success)
    return {"task_id": [f"t{first_task + i}" for i in range(n)], "success": success,
            "turns": turns or [5] * n, "invalid": [0] * n}


def test_paired_bootstrap_interval_and_seeding():
    rng = np.random.default_rng(1)
    diffs = [rng.choice([-1.0, 0.0, 1.0], size=(3, 200), p=[0.1, 0.6, 0.3])]
    first, again = report.paired_bootstrap(diffs), report.paired_bootstrap(diffs)
    assert first == again                                      # seeded: the same interval every time
    low, high = first["ci95"]
    assert first["diff"] == pytest.approx(diffs[0].mean()) and low < first["diff"] < high
    assert first["per_seed"] == pytest.approx(list(diffs[0].mean(axis=1)))
    assert first["tasks"] == [200] and first["seeds"] == 3
    # the interval of a mean of 600 values in {-1, 0, 1} over 200 paired tasks: ~0.05 wide each side
    assert 0.02 < high - first["diff"] < 0.12
    # every task the same difference: no spread to resample
    assert report.paired_bootstrap([np.full((2, 50), 0.25)])["ci95"] == pytest.approx([0.25, 0.25])
    # two envs: the mean of the env means, each env resampled on its own
    two = report.paired_bootstrap([np.full((2, 10), 1.0), np.zeros((2, 40))])
    assert two["diff"] == pytest.approx(0.5) and two["ci95"] == pytest.approx([0.5, 0.5])


def test_verdicts():
    assert report.verdict([0.01, 0.2]) == "holds"
    assert report.verdict([-0.2, -0.01]) == "fails"
    assert report.verdict([-0.05, 0.1]) == "inconclusive"
    # "tracks": at most 5 points below
    assert report.verdict([-0.04, 0.02], threshold=-0.05) == "holds"
    assert report.verdict([-0.2, -0.06], threshold=-0.05) == "fails"
    assert report.verdict([-0.08, 0.0], threshold=-0.05) == "inconclusive"


def test_paired_differences_match_tasks_and_seeds():
    a = {0: _outcomes([1, 1, 0, 1]), 1: _outcomes([0, 1, 1, 1]), 2: _outcomes([1, 1, 1, 1])}
    b = {0: _outcomes([0, 1, 0, 0], first_task=1), 1: _outcomes([1, 1, 1, 0], first_task=1)}
    diff, seeds = report.paired_differences(a, b)
    # seeds both have: 0 and 1; tasks both played: t1..t3 (b starts at t1)
    assert seeds == [0, 1]
    assert diff.tolist() == [[1 - 0, 0 - 1, 1 - 0], [1 - 1, 1 - 1, 1 - 1]]
    teacher = {"-": _outcomes([1, 0, 0, 0])}
    diff, seeds = report.paired_differences(a, teacher)   # one model pairs with every seed
    assert seeds == [0, 1, 2] and diff[2].tolist() == [0, 1, 1, 1]
    flipped, _ = report.paired_differences(teacher, a)
    assert (flipped == -diff).all()
    turns, _ = report.paired_differences({0: _outcomes([0, 0], [3, 9])}, {"-": _outcomes([0, 0], [5, 5])}, "turns")
    assert turns.tolist() == [[-2.0, 4.0]]
    assert report.paired_differences(a, {}) is None
    # turns_won: NaN unless both sides won; a seed with no both-won task pairs nothing
    won, _ = report.paired_differences({0: _outcomes([1, 0, 1], [3, 9, 4])}, {"-": _outcomes([1, 1, 0], [5, 5, 5])},
                                       "turns_won")
    assert won[0, 0] == -2.0 and np.isnan(won[0, 1:]).all()
    assert report.paired_differences({0: _outcomes([0, 1], [3, 9])}, {"-": _outcomes([1, 0], [5, 5])},
                                     "turns_won") is None
    kept, seeds = report.paired_differences({0: _outcomes([0, 1], [3, 9]), 1: _outcomes([1, 1], [2, 9])},
                                            {"-": _outcomes([1, 0], [5, 5])}, "turns_won")
    assert seeds == [1] and kept[0, 0] == -3.0   # seed 0 won no task the other side won: left out
    boot = report.paired_bootstrap([np.array([[-2.0, np.nan, 1.0], [np.nan, np.nan, 3.0]])], resamples=200)
    assert boot["diff"] == pytest.approx((-0.5 + 3.0) / 2) and boot["tasks"] == [2]


def test_splits_can_be_narrowed_to_eval_and_the_adaptive_ablation_has_a_claim(monkeypatch):
    monkeypatch.setattr(report, "SPLITS", report.SPLITS)   # restored after the test
    report.use_splits(["eval"])
    claims = report.headline_claims(["atod", "opd", "grpo"], ["no-anneal", "adaptive"])
    assert {c.split for c in claims} == {"eval"}
    adaptive = [c for c in claims if c.a == "atod-adaptive"]
    assert len(adaptive) == 1 and adaptive[0].b == "atod" and "two-sided" in adaptive[0].name
    assert report.ABLATIONS["adaptive"] == ["schedule.shape=adaptive"]
    with pytest.raises(ValueError, match="subset of eval, unseen"):
        report.use_splits(["valid"])


def _add_outcomes(out: Path, run: str, eval_success: list[int], unseen_success: list[int], turns=None):
    path = out / "runs" / run / "final_eval.json"
    data = json.loads(path.read_text())
    data["eval"]["episodes"] = _outcomes(eval_success, turns)
    data["unseen"]["episodes"] = _outcomes(unseen_success, turns)
    path.write_text(json.dumps(data))


@pytest.fixture
def paired_dir(tmp_path):
    """household only: 3 seeds of every method on 40 tasks; ATOD wins 12 more tasks than OPD
    on eval, OPD beats GRPO, the teacher sits between; no-anneal equals ATOD (inconclusive);
    two curve evaluations with per-task outcomes in ATOD and OPD."""
    out = tmp_path / "results"
    n = 40
    make_models(out, "household", teacher=0.5, cold=0.1)
    for role, ok, turns in (("teacher", 20, 8), ("cold-start", 4, 12)):
        path = out / "models" / "household" / f"{role}.json"
        data = json.loads(path.read_text())
        for split in report.SPLITS:
            data[split]["episodes"] = _outcomes([1] * ok + [0] * (n - ok), [turns] * n)
        path.write_text(json.dumps(data))
    wins = {"atod": 32, "opd": 20, "grpo": 8, "atod-no-anneal": 32, "atod-uniform": 26}
    for method, ok in wins.items():
        for seed in (0, 1, 2):
            k = ok + (seed - 1)  # 31/32/33 etc.: a spread over seeds
            run_dir = make_run(out, "household", method, seed, k / n, (k - 5) / n, turns=4.0)
            _add_outcomes(out, run_dir.name, [1] * k + [0] * (n - k), [1] * (k - 5) + [0] * (n - k + 5),
                          turns=[4] * n)
            if method in ("atod", "opd"):
                rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()[:-1]]
                rows.append({"step": 1, "eval_success": 0.4, "eval_outcomes": [1] * 8 + [0] * 12})
                (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
                info = json.loads((run_dir / "run.json").read_text())
                info["config"].update(schedule={"anneal_steps": 2}, invalid_penalty=0.1)
                (run_dir / "run.json").write_text(json.dumps(info))
    return out


def test_claims_table_and_json_from_paired_outcomes(paired_dir):
    results = report.build_report(paired_dir, ["household"], ["atod", "opd", "grpo"], [0, 1, 2],
                                  ["no-anneal", "uniform"], settings={"eval_episodes": 40}, plots=False)
    claims = {(c["claim"], c["split"]): c for c in results["claims"]}
    atod_opd = claims[("ATOD > OPD", "eval")]
    assert atod_opd["diff"] == pytest.approx(12 / 40) and atod_opd["verdict"] == "holds"
    assert atod_opd["per_seed"] == pytest.approx([0.3, 0.3, 0.3]) and atod_opd["tasks"] == [40]
    assert claims[("OPD > GRPO", "unseen")]["verdict"] == "holds"
    assert claims[("ATOD >= teacher (the student passes its teacher)", "eval")]["diff"] == pytest.approx(12 / 40)
    assert claims[("annealing helps (ATOD > ATOD without annealing)", "eval")]["verdict"] == "inconclusive"
    assert claims[("T-DUR helps (ATOD > ATOD with uniform turn weights)", "eval")]["verdict"] == "holds"
    # curves: the same per-task outcomes in ATOD and OPD early -> difference 0, within 5 points
    tracks = claims[("ATOD tracks OPD early", "eval")]
    assert tracks["diff"] == 0.0 and tracks["verdict"] == "holds" and tracks["tasks"] == [20]
    # turns on episodes both sides won: the cold start wins tasks 0-3 (12 turns), ATOD wins them in 4
    shorten = claims[("ATOD's won episodes are shorter than the cold start's", "eval")]
    assert shorten["diff"] == pytest.approx(8.0) and shorten["verdict"] == "holds" and shorten["tasks"] == [4]
    assert claims[("GRPO's won episodes are longer than the cold start's", "eval")]["verdict"] == "fails"

    md = (paired_dir / "results.md").read_text()
    assert "- ATOD > OPD [eval]: **holds** — paired difference +30.0 points; seed-level 95% t interval [" in md
    assert "per seed +30.0, +30.0, +30.0 (3 of 3 above +0); 40 paired tasks" in md
    # the paper's table: rows in the paper's order, eval/unseen/average, per-seed values
    table = md.split("## Success rate (%)")[1].split("##")[0]
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows == ["cold-start student", "GRPO", "OPD", "ATOD", "ATOD without annealing",
                    "ATOD, uniform turn weights (no T-DUR)", "teacher"]
    assert "| ATOD | 80.0 ± 2.5 (77.5, 80.0, 82.5) | 67.5 ± 2.5 (65.0, 67.5, 70.0) | 73.8 ± 2.5 (71.2, 73.8, 76.2) |" in md
    assert "| teacher | 50.0 | 25.0 | 37.5 |" in md
    saved = json.loads((paired_dir / "results.json").read_text())
    assert saved["paper_table"]["cells"]["atod"]["average"]["values"] == pytest.approx([0.7125, 0.7375, 0.7625])
    assert saved["claims"][0]["ci95"][0] > 0


def test_grpo_signal_section(paired_dir):
    run_dir = paired_dir / "runs" / "household-grpo-s0"
    rows = [{"step": s, "time_rollout": 1.0, "success": 0.0, "reward": 0.0, "invalid_rate": 0.5, "episode_len": 10.0,
             "grpo_groups": 4, "grpo_all_fail_groups": 3, "grpo_penalty_only_groups": 2,
             "grpo_all_fail_penalty_only_groups": 2, "grpo_abs_adv": 10.0, "grpo_abs_adv_all_fail": 8.0,
             "grpo_abs_adv_all_fail_penalty_only": 6.0} for s in range(2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = json.loads((run_dir / "run.json").read_text())
    info["config"]["invalid_penalty"] = 0.1
    (run_dir / "run.json").write_text(json.dumps(info))
    runs = report.load_runs(paired_dir)
    signal = report.grpo_signal([r for r in runs if r.seed == 0], "household", "grpo")
    assert signal["all_fail_group_share"] == pytest.approx(0.75)
    assert signal["all_fail_penalty_only_share"] == pytest.approx(2 / 3)
    assert signal["abs_adv_share_all_fail"] == pytest.approx(0.8)
    assert signal["abs_adv_all_fail_from_penalty"] == pytest.approx(0.75)
    assert signal["penalty_per_episode"] == pytest.approx(0.5)   # 5 invalid turns x 0.1
    report.build_report(paired_dir, ["household"], ["grpo"], [0], [], plots=False)
    md = (paired_dir / "results.md").read_text()
    assert "| household GRPO | 0.10 / 1 | 0.500 (5.0 invalid turns) | 0.000 | 75% | 67% | 80% | 75% |" in md


def _git(repo: Path, *args: str) -> str:
    import subprocess

    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def git_results(tmp_path):
    """A real git repo with the project's .gitignore and a results dir holding one finished run
    with checkpoints and samples beside its small files."""
    import shutil

    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.com")
    _git(repo, "config", "user.name", "t")
    shutil.copy(Path(__file__).resolve().parents[1] / ".gitignore", repo / ".gitignore")
    _git(repo, "add", ".gitignore")
    _git(repo, "commit", "-q", "-m", "init")
    out = repo / "benchmarks" / "results"
    make_models(out, "household", teacher=0.6, cold=0.1)
    run_dir = make_run(out, "household", "atod", 0, 0.5, 0.2)
    (run_dir / "checkpoints" / "step_000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_000004" / "model.safetensors").write_bytes(b"\0" * 1000)
    (run_dir / "samples").mkdir()
    (run_dir / "samples" / "step_000000.jsonl").write_text("{}\n")
    (run_dir / "config.yaml").write_text("algo: atod\n")
    (out / ".lock").write_text("")
    (out / "success_vs_step.png").write_bytes(b"\x89PNG plot")
    (out / "someone_elses.png").write_bytes(b"\x89PNG other")
    report.build_report(out, ["household"], ["atod"], [0], [], plots=False)
    return repo, out


def test_commit_adds_only_the_small_result_files(git_results):
    compare = load_benchmark("compare")
    repo, out = git_results
    # someone else's staged change in the shared index stays staged and out of the commit
    (repo / "other.py").write_text("x = 1\n")
    _git(repo, "add", "other.py")
    assert compare.commit_results(out, "compare: household-atod-s0 finished (test)")
    assert _git(repo, "log", "-1", "--format=%s").strip() == "compare: household-atod-s0 finished (test)"
    committed = set(_git(repo, "show", "--name-only", "--format=", "HEAD").split())
    run = "benchmarks/results/runs/household-atod-s0"
    assert {f"{run}/{n}" for n in ("run.json", "config.yaml", "metrics.jsonl", "done.json", "final_eval.json")} \
        <= committed
    assert {"benchmarks/results/results.md", "benchmarks/results/results.json",
            "benchmarks/results/models/household/teacher.json", "benchmarks/results/success_vs_step.png"} <= committed
    assert "benchmarks/results/someone_elses.png" not in committed   # only the report's own plots
    assert not [f for f in committed if "checkpoints" in f or "samples" in f or f.endswith(".lock")]
    assert "other.py" not in committed and "other.py" in _git(repo, "diff", "--cached", "--name-only")
    # the .gitignore rules keep the models out of a careless `git add -A` too
    ignored = _git(repo, "status", "--porcelain", "--ignored")
    assert f"!! {run}/checkpoints/" in ignored and f"!! {run}/samples/" in ignored
    # nothing new: no empty commit
    head = _git(repo, "rev-parse", "HEAD")
    assert compare.commit_results(out, "again") and _git(repo, "rev-parse", "HEAD") == head


def test_commit_retries_a_busy_index_and_never_raises(git_results, monkeypatch):
    import threading

    compare = load_benchmark("compare")
    repo, out = git_results
    lock = repo / ".git" / "index.lock"
    lock.write_text("")
    # held for good: a few quick tries, then False (logged), no exception
    assert compare.commit_results(out, "blocked", attempts=2, delay_s=0.05) is False
    # released while the commit waits: the retry goes through
    timer = threading.Timer(0.5, lock.unlink)
    timer.start()
    try:
        assert compare.commit_results(out, "after the lock", attempts=6, delay_s=0.2) is True
    finally:
        timer.cancel()
    assert _git(repo, "log", "-1", "--format=%s").strip() == "after the lock"
    # outside a git work tree: False, no exception
    outside = out.parents[2] / "elsewhere"   # tmp_path, beside the repo
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(outside.parent))
    assert compare.commit_results(outside, "nowhere") is False


def test_eta_from_finished_runs(tmp_path):
    compare = load_benchmark("compare")
    out = tmp_path / "results"
    plan = [("household", "atod", 0), ("household", "opd", 0), ("household", "atod", 1), ("household", "opd", 1)]
    for method, wall in (("atod", 100.0), ("opd", 60.0)):
        make_run(out, "household", method, 0, 0.5, 0.5, wall_s=wall)
    data = json.loads((out / "runs" / "household-atod-s0" / "final_eval.json").read_text())
    data["eval"]["summary"]["seconds"] = 20.0
    (out / "runs" / "household-atod-s0" / "final_eval.json").write_text(json.dumps(data))
    finished, left = compare.eta_seconds(out, plan)
    assert finished == 2 and left == pytest.approx(120.0 + 60.0)   # per method: atod 100 + 20 s eval, opd 60


def test_a_split_no_model_solves_is_not_testable():
    """Every model at 0% (the tiny models on household's unseen split): no claim is testable there."""
    report = load_benchmark("compare_report")
    zeros = {"task_id": [f"t{i}" for i in range(20)], "success": [0] * 20, "turns": [15] * 20}
    runs = [report.RunRecord(name=f"household-{m}-s{s}", env="household", method=m, seed=s, steps=1,
                             outcomes={"unseen": zeros}) for m in ("atod", "opd") for s in (0, 1, 2)]
    [entry] = report.evaluate_claims([report.Claim("ATOD > OPD", "unseen", "atod", "opd")], runs, {}, ["household"])
    assert entry["verdict"].startswith("not testable here")
