"""The paper-shaped comparison: ATOD vs. OPD vs. GRPO (and ATOD ablations) on the built-in envs.

    python benchmarks/compare.py --envs household,shop,searchqa --algos atod,opd,grpo \\
        --seeds 0,1,2 --ablations no-anneal,uniform,token --steps N --eval-episodes 200 \\
        --out benchmarks/results [--set key=value ...] [--report-only] [--commit]

For each env the teacher and the cold-start student come from the env's recipe
(pipeline.ensure_model: bootstrapped by SFT once, cached) and are shared by every method and
seed. Each (env, method, seed) trains into OUT/runs/{env}-{method}-s{seed}; ablations
(no-anneal: schedule.anneal=false, uniform: weights=uniform, token: weights=token, adaptive:
schedule.shape=adaptive) run on household only. Every run, the teacher and the cold-start
student are then evaluated on the eval and unseen splits (--splits; --eval-episodes episodes,
temperature 0.4), and OUT gets results.md,
results.json and PNG plots (benchmarks/compare_report.py).

Every final evaluation (each run's, the teacher's, the cold start's) plays the same tasks with
the same sampling seed (--eval-seed) and keeps its per-episode outcomes, so the report pairs
methods task by task (benchmarks/compare_report.py: paired bootstrap intervals per claim).

Resumable and safe to run in the background (`nohup ... &`): every file is written atomically,
a run with done.json is skipped, a run with metrics but no done.json resumes from its last
checkpoint (kill -9 loses at most the steps since it), and evaluations are cached per model.
Re-running the same command continues. Runs go seed-major (all envs and methods of seed 0
first), so a partial benchmark already gives a complete one-seed table. Progress: runs done
of the total and an ETA from the finished runs' cost, after every run.

--commit: after the teacher/cold-start evaluations and after each run, rebuild the report and
`git commit` only the small result files (compare.result_files: the report, PNGs, model
evaluations, each run's run.json, config.yaml, metrics.jsonl, done.json, final_eval.json); a
failed commit is retried and never stops the grid. Checkpoints and samples stay out of git
(.gitignore rules under benchmarks/results/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # compare_report sits beside this file

import compare_report as report

from atod_edge.config import load_config, resolve_recipe
from atod_edge.errors import ConfigError, UserError
from atod_edge.io import atomic_write_json, atomic_write_text

EVAL_TEMPERATURE = 0.4


def log(message: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="household,shop,searchqa", help="comma-separated env names")
    parser.add_argument("--algos", default="atod,opd,grpo", help="comma-separated: atod, opd, grpo")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--ablations", default="no-anneal,uniform,token",
                        help="comma-separated ATOD ablations on household: no-anneal, uniform, token, adaptive "
                             "('' = none)")
    parser.add_argument("--splits", default="eval,unseen",
                        help="splits every final model is evaluated and reported on (eval, unseen)")
    parser.add_argument("--recipe", default=None,
                        help="the recipe of every env's teacher, cold start and runs (default: each env's "
                             "own, e.g. household); its env must be the one env in --envs")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the recipe's)")
    parser.add_argument("--eval-episodes", type=int, default=200, help="final evaluation episodes per split")
    parser.add_argument("--eval-seed", type=int, default=0,
                        help="sampling seed of every final evaluation (runs, teacher, cold start: paired tasks)")
    parser.add_argument("--curve-episodes", type=int, default=50,
                        help="episodes per in-training evaluation (the success-vs-step curve)")
    parser.add_argument("--curve-points", type=int, default=5,
                        help="in-training evaluations per run at least (eval_every = steps // this)")
    parser.add_argument("--out", default="benchmarks/results", help="output directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="[ENV:]KEY=VALUE",
                        help="config override for every run (repeatable), e.g. --set tasks_per_step=8; "
                             "ENV:KEY=VALUE for one env only, e.g. --set shop:bootstrap.teacher_noise=0.4")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--budget-note", default="", help="why this step budget (quoted in results.md)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from OUT")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--commit", action="store_true",
                        help="git-commit the small result files (JSON, metrics, report, PNGs; never checkpoints "
                             "or samples) after the teacher/cold-start evaluations and after each run")
    return parser.parse_args(argv)


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


# --- configs ---------------------------------------------------------------------------------

def overrides_for(env: str, overrides: list[str]) -> list[str]:
    """The --set items for `env`: plain KEY=VALUE for every env, ENV:KEY=VALUE for that env only
    (e.g. household:bootstrap.teacher_noise=0.4 to place one env's teacher)."""
    chosen = []
    for item in overrides:
        key, sep, value = item.partition("=")
        scope, colon, bare_key = key.partition(":")
        if not colon:
            chosen.append(item)
        elif scope.strip() == env:
            chosen.append(f"{bare_key.strip()}{sep}{value}")
    return chosen


def _user_sets(key: str, env: str, args: argparse.Namespace) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides_for(env, args.overrides))


def base_config(env: str, args: argparse.Namespace):
    """The env's recipe (when there is a built-in one) with the user's overrides and the step
    budget: what the teacher, the cold start and every run of this env share."""
    from atod_edge.train.config import TrainConfig

    if args.recipe:
        recipe = args.recipe
    else:
        try:
            recipe = env if resolve_recipe(env) else None
        except ConfigError:
            recipe = None  # a plug-in env without a recipe: defaults with env=NAME
    overrides = overrides_for(env, args.overrides) + ([f"env={env}"] if recipe is None else [])
    if args.steps:
        overrides.append(f"steps={args.steps}")
    cfg = load_config(TrainConfig, recipe, overrides)
    if cfg.env != env:
        if args.recipe:
            raise UserError(f"--recipe {args.recipe} trains on {cfg.env}, not on --envs {env}")
        raise UserError(f"--set env={cfg.env} conflicts with --envs (env {env}); drop the --set")
    return cfg, recipe


def run_config(env: str, method: str, seed: int, args: argparse.Namespace):
    """The config of one run: the env's base config, the method (and ablation), the seed, and
    in-training evaluations often enough for a curve."""
    from atod_edge.train.config import TrainConfig

    cfg, recipe = base_config(env, args)
    algo, _, ablation = method.partition("-")
    overrides = overrides_for(env, args.overrides) + ([f"env={env}"] if recipe is None else [])
    overrides += [f"steps={cfg.steps}", f"algo={algo}", f"seed={seed}", "compare=false"]
    overrides += report.ABLATIONS.get(ablation, [])
    if not _user_sets("eval_every", env, args):
        overrides.append(f"eval_every={max(1, cfg.steps // max(1, args.curve_points))}")
    if not _user_sets("eval_episodes", env, args):
        overrides.append(f"eval_episodes={args.curve_episodes}")
    return load_config(TrainConfig, recipe, overrides)


def plan_runs(envs: list[str], algos: list[str], seeds: list[int], ablations: list[str]) -> list[tuple[str, str, int]]:
    """(env, method, seed), seed-major; ablations only on household."""
    plan = []
    for seed in seeds:
        for env in envs:
            plan += [(env, algo, seed) for algo in report.MAIN_METHODS if algo in algos]
            if env == "household":
                plan += [(env, f"atod-{a}", seed) for a in ablations]
    return plan


# --- evaluation, cached per model ------------------------------------------------------------

def evaluate_cached(cache_file: Path, model_path: str, cfg, split: str, episodes: int, seed: int) -> dict:
    """Summary of `model_path` on `split` (temperature 0.4, the run's max_turns) and its
    per-episode outcomes, stored in cache_file[split] under a key of everything it depends on."""
    from atod_edge.evaluate.evaluate import EvalConfig, evaluate, format_summary
    from atod_edge.engine.policy import TorchPolicy

    ecfg = EvalConfig(env=cfg.env, split=split, episodes=episodes, temperature=EVAL_TEMPERATURE, seed=seed,
                      history_turns=cfg.history_turns, max_new_tokens=cfg.max_new_tokens,
                      max_turns=cfg.max_turns, device=cfg.device,  # the training horizon, as the curves
                      precision=cfg.precision)
    key = json.dumps({"model": str(model_path), **asdict(ecfg)}, sort_keys=True)
    stored = _read_json(cache_file)
    if stored.get(split, {}).get("key") == key and "episodes" in stored[split]:
        return stored[split]["summary"]
    summary, episodes = evaluate(TorchPolicy.load(str(model_path), device=cfg.device, precision=ecfg.precision),
                                 ecfg)
    log("  " + format_summary(summary) + f" ({summary.get('seconds', 0):.0f} s)")
    stored = _read_json(cache_file)  # re-read: keep the other split's entry
    stored.update({"path": str(model_path), split: {"key": key, "summary": summary,
                                                   "episodes": episode_outcomes(episodes)}})
    atomic_write_json(cache_file, stored)
    return summary


def episode_outcomes(episodes) -> dict:
    """Per episode, in task order: task id, success (0/1), turns, invalid turns. Every model is
    evaluated on the same tasks with the same sampling seed (--eval-seed), so the report pairs
    these lists task by task (a few KB per split)."""
    return {"task_id": [ep.task_id for ep in episodes], "success": [int(ep.success) for ep in episodes],
            "turns": [ep.num_turns for ep in episodes], "invalid": [ep.num_invalid for ep in episodes]}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def prepare_env(env: str, args: argparse.Namespace, out: Path) -> dict[str, str]:
    """Teacher and cold-start student of `env` (bootstrapped once, cached), evaluated on both splits."""
    from atod_edge.train.pipeline import ensure_model

    cfg, _ = base_config(env, args)
    models = {"teacher": ensure_model(cfg, "teacher", log=lambda m: log(f"  {m}")),
              "cold-start": ensure_model(cfg, "student", log=lambda m: log(f"  {m}"))}
    for role, path in models.items():
        for split in report.SPLITS:
            log(f"{env} {role}: evaluating on {split} ({args.eval_episodes} episodes)")
            evaluate_cached(out / "models" / env / f"{role}.json", path, cfg, split, args.eval_episodes,
                            args.eval_seed)
    return models


# --- one run ---------------------------------------------------------------------------------

def run_one(env: str, method: str, seed: int, models: dict[str, str], args: argparse.Namespace,
            out: Path) -> bool:
    """Train (or resume, or skip) one run, then evaluate its final model. True if it trained."""
    from atod_edge.train.checkpoint import latest_checkpoint
    from atod_edge.train.trainer import train

    cfg = run_config(env, method, seed, args)
    run_dir = out / "runs" / report.run_name(env, method, seed)
    identity = {"env": env, "method": method, "seed": seed, "config": asdict(cfg),
                "teacher": models["teacher"], "student": models["cold-start"]}
    previous = _read_json(run_dir / "run.json")
    if previous:
        changed = sorted(k for k in _flatten(identity) if _flatten(previous).get(k) != _flatten(identity)[k])
        if changed:
            raise UserError(f"{run_dir} was started with other settings ({', '.join(changed[:5])}); "
                            f"use another --out or delete that run")
    else:
        atomic_write_json(run_dir / "run.json", identity)
    trained = False
    done = _read_json(run_dir / "done.json")
    if not done:
        found = latest_checkpoint(run_dir) if run_dir.exists() else None
        resumed_from = found[0] if found else 0
        log(f"  training {method} on {env}, seed {seed}: {cfg.steps} steps x {cfg.tasks_per_step} tasks x "
            f"{cfg.group_size} rollouts" + (f" (resuming after step {resumed_from})" if resumed_from else ""))
        _reset_peak_rss()
        started = time.perf_counter()
        teacher = models["teacher"] if cfg.algo != "grpo" else None
        final = train(cfg, run_dir, models["cold-start"], teacher, resume=True, log=lambda m: log(f"  {m}"))
        found = latest_checkpoint(run_dir)
        if not found or found[0] != cfg.steps:
            raise RuntimeError(f"{run_dir}: training ended without a checkpoint of step {cfg.steps}")
        done = {"final_checkpoint": str(final), "wall_s": time.perf_counter() - started,
                "resumed_from_step": resumed_from, "peak_rss_mb": _peak_rss_mb(),
                "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_json(run_dir / "done.json", done)
        trained = True
    for split in report.SPLITS:
        evaluate_cached(run_dir / "final_eval.json", done["final_checkpoint"], cfg, split, args.eval_episodes,
                        args.eval_seed)
    return trained


def _flatten(obj: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _reset_peak_rss() -> None:
    """Linux: reset this process's peak RSS (VmHWM), so each run reports its own peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- bookkeeping -----------------------------------------------------------------------------

# what --commit adds, by name: everything small the report is built from, never a model
RUN_FILES = ("run.json", "config.yaml", "metrics.jsonl", "done.json", "final_eval.json", "error.txt")
TOP_FILES = ("results.md", "results.json", "wall.json", "machine.json")
COMMIT_MAX_BYTES = 2_000_000


def result_files(out: Path) -> list[Path]:
    """The small result files under OUT that --commit adds (the report, the plots, the model
    evaluations, each run's records); checkpoints and samples are never among them."""
    files = [out / name for name in (*TOP_FILES, *report.PLOTS)] + sorted(out.glob("models/*/*.json"))
    for run_dir in sorted(p for p in (out / "runs").glob("*") if p.is_dir()):
        files += [run_dir / name for name in RUN_FILES]
    chosen = []
    for path in files:
        if not path.is_file():
            continue
        if path.stat().st_size > COMMIT_MAX_BYTES:
            log(f"--commit: leaving out {path} ({path.stat().st_size / 1e6:.1f} MB, over the "
                f"{COMMIT_MAX_BYTES / 1e6:.0f} MB limit)")
            continue
        chosen.append(path)
    return chosen


def _git(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=check)


def commit_results(out: Path, message: str, attempts: int = 5, delay_s: float = 3.0) -> bool:
    """git add the result files by name and commit only them (`git commit -- PATHS`: whatever
    else is staged in a shared index stays staged and out of this commit). A failure (another
    git holding .git/index.lock, say) is retried `attempts` times, then logged: it never stops
    the grid, and the next commit picks the files up. True when the files are committed (or
    nothing changed)."""
    try:
        _git(["rev-parse", "--show-toplevel"], cwd=out)
    except (OSError, subprocess.SubprocessError) as error:
        log(f"--commit: {out} is not in a git work tree ({_short(error)}); results stay on disk only")
        return False
    files = [str(path.resolve()) for path in result_files(out)]
    if not files:
        return True
    last = ""
    for attempt in range(1, attempts + 1):
        try:
            # -f: a --out under an ignored folder still commits its listed files (and only them)
            _git(["add", "-f", "--", *files], cwd=out)
            if _git(["diff", "--cached", "--quiet", "--", *files], cwd=out, check=False).returncode == 0:
                return True   # nothing new since the last commit
            _git(["commit", "-q", "-m", message, "--", *files], cwd=out)
            log(f"--commit: {message}")
            return True
        except (OSError, subprocess.SubprocessError) as error:
            last = _short(error)
            if attempt < attempts:
                time.sleep(delay_s * attempt)
    log(f"--commit: giving up on '{message}' after {attempts} tries ({last}); results stay on disk "
        "and the next commit includes them")
    return False


def _short(error: BaseException) -> str:
    text = getattr(error, "stderr", None) or str(error)
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def run_seconds(out: Path, name: str) -> float | None:
    """A finished run's training plus final-evaluation seconds, from its files (None if unknown)."""
    done = _read_json(out / "runs" / name / "done.json")
    if not done.get("wall_s"):
        return None
    evals = _read_json(out / "runs" / name / "final_eval.json")
    return float(done["wall_s"]) + sum(float(evals.get(split, {}).get("summary", {}).get("seconds", 0.0))
                                       for split in report.SPLITS)


def eta_seconds(out: Path, plan: list[tuple[str, str, int]]) -> tuple[int, float | None]:
    """(runs finished, seconds left): the mean cost of the finished runs that ran in one go, per
    method where known, times the runs left."""
    names = [report.run_name(*item) for item in plan]
    finished = [n for n in names if (out / "runs" / n / "done.json").exists()
                and all(split in _read_json(out / "runs" / n / "final_eval.json") for split in report.SPLITS)]
    costs: dict[str, list[float]] = {}
    for (env, method, seed), name in zip(plan, names):
        done = _read_json(out / "runs" / name / "done.json")
        seconds = run_seconds(out, name)
        if seconds and not done.get("resumed_from_step"):
            costs.setdefault(method, []).append(seconds)
    if not costs:
        return len(finished), None
    every = [c for values in costs.values() for c in values]
    left = sum(sum(costs.get(method, every)) / len(costs.get(method, every))
               for (env, method, seed), name in zip(plan, names) if name not in finished)
    return len(finished), left



def machine_info() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average_at_start": os.getloadavg()}


class WallClock:
    """Adds this invocation's wall time to OUT/wall.json as it goes (so a killed invocation
    loses at most the piece since the last flush)."""

    def __init__(self, out: Path):
        self.path = out / "wall.json"
        self.mark = time.perf_counter()

    def flush(self) -> float:
        now = time.perf_counter()
        total = float(_read_json(self.path).get("seconds", 0.0)) + (now - self.mark)
        self.mark = now
        atomic_write_json(self.path, {"seconds": total})
        return total


@contextlib.contextmanager
def exclusive(out: Path):
    """One compare.py per OUT at a time (two would train into the same run dirs)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another compare.py is already running on {out}") from None
        yield


def _fmt(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _success_text(summaries: dict) -> str:
    return ", ".join(f"{split} {summaries[split]['summary']['success']:.1%}" for split in report.SPLITS
                     if isinstance(summaries.get(split), dict) and "summary" in summaries[split])


def _model_line(out: Path, env: str) -> str:
    """'teacher eval 64.0%, unseen 1.0%; cold-start eval ...' for a commit message."""
    parts = []
    for role in ("teacher", "cold-start"):
        text = _success_text(_read_json(out / "models" / env / f"{role}.json"))
        if text:
            parts.append(f"{role} {text}")
    return "; ".join(parts) or "no evaluations"


def _run_line(out: Path, name: str) -> str:
    """'eval 45.0%, unseen 3.0%, 60 steps, 8m10s' for a commit message."""
    text = _success_text(_read_json(out / "runs" / name / "final_eval.json")) or "no final evaluation"
    steps = _read_json(out / "runs" / name / "run.json").get("config", {}).get("steps")
    seconds = run_seconds(out, name)
    return text + (f", {steps} steps" if steps else "") + (f", {_fmt(seconds)}" if seconds else "")


def write_report(out, envs, algos, seeds, ablations, args, machine) -> dict:
    configs = {env: run_config(env, "atod", seeds[0] if seeds else 0, args) for env in envs}

    def per_env(field: str):
        """One value when every env shares it, else 'household 20, shop 10'."""
        values = {env: getattr(cfg, field) for env, cfg in configs.items()}
        if len(set(values.values())) <= 1:
            return next(iter(values.values()), None)
        return ", ".join(f"{env} {value}" for env, value in values.items())

    settings = {"steps": per_env("steps"), "tasks_per_step": per_env("tasks_per_step"),
                "group_size": per_env("group_size"), "eval_every": per_env("eval_every"),
                "eval_episodes": args.eval_episodes, "eval_temperature": EVAL_TEMPERATURE,
                "curve_episodes": per_env("eval_episodes"), "overrides": args.overrides,
                "configs": {env: asdict(cfg) for env, cfg in configs.items()},
                "expected_runs": len(plan_runs(envs, algos, seeds, ablations))}
    return report.build_report(out, envs, algos, seeds, ablations, settings=settings, machine=machine,
                               budget_note=args.budget_note, plots=not args.no_plots)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    envs, algos = _split(args.envs), _split(args.algos)
    seeds = [int(s) for s in _split(args.seeds)]
    ablations = _split(args.ablations)
    bad = [a for a in algos if a not in report.MAIN_METHODS] + [a for a in ablations if a not in report.ABLATIONS]
    if bad:
        raise UserError(f"unknown algo or ablation {', '.join(bad)} (algos: {', '.join(report.MAIN_METHODS)}; "
                        f"ablations: {', '.join(report.ABLATIONS)})")
    try:
        report.use_splits(_split(args.splits))
    except ValueError as error:
        raise UserError(f"--splits: {error}") from None
    if ablations and "household" not in envs:
        log("ablations run on household only, and household is not in --envs: no ablations")
        ablations = []
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    machine = machine_info()
    if args.report_only:
        recorded = _read_json(out / "machine.json").get("invocations")
        machine = recorded[-1] if recorded else machine
        write_report(out, envs, algos, seeds, ablations, args, machine)
        log(f"report written: {out / 'results.md'}")
        return 0

    plan = plan_runs(envs, algos, seeds, ablations)
    for env in envs:  # config errors now, not an hour in
        base_config(env, args)
    with exclusive(out):
        clock = WallClock(out)
        # the machine of the training invocations, not of a later --report-only
        history = _read_json(out / "machine.json").get("invocations", [])
        atomic_write_json(out / "machine.json", {"invocations": history + [
            {**machine, "started_at": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]}]})
        log(f"{len(plan)} runs into {out}: envs {envs}, methods {algos} + ablations {ablations}, seeds {seeds}; "
            f"machine: {machine['cpus_usable']} CPUs, {machine['torch_threads']} torch threads")
        finished, _ = eta_seconds(out, plan)
        log(f"{finished}/{len(plan)} runs already finished (skipped, or resumed where they stopped)")
        models: dict[str, dict[str, str]] = {}
        failed: list[str] = []
        for i, (env, method, seed) in enumerate(plan, 1):
            name = report.run_name(env, method, seed)
            if env not in models:
                evaluated_before = _model_line(out, env)
                models[env] = prepare_env(env, args, out)
                clock.flush()
                if args.commit:
                    write_report(out, envs, algos, seeds, ablations, args, machine)
                    line = _model_line(out, env)
                    commit_results(out, f"compare: {env} teacher and cold start evaluated ({line})"
                                   if line != evaluated_before else
                                   f"compare: resumed ({finished}/{len(plan)} runs done; {env}: {line})")
            log(f"run {i}/{len(plan)}: {name}")
            started = time.perf_counter()
            outcome = "finished"
            try:
                if not run_one(env, method, seed, models[env], args, out):
                    outcome = "already finished"
            except (UserError, KeyboardInterrupt):
                raise
            except Exception:  # noqa: BLE001 - one broken run must not cost the night's other runs
                failed.append(name)
                outcome = "FAILED"
                error_file = out / "runs" / name / "error.txt"
                atomic_write_text(error_file, traceback.format_exc())
                log(f"run {i}/{len(plan)} FAILED ({traceback.format_exc().strip().splitlines()[-1]}); "
                    f"traceback in {error_file}; going on (re-run the command to retry it)")
            total = clock.flush()
            finished, left = eta_seconds(out, plan)
            eta = f"ETA {_fmt(left)}" if left is not None else "ETA ?"
            log(f"run {i}/{len(plan)} {outcome} in {_fmt(time.perf_counter() - started)}; "
                f"{finished}/{len(plan)} runs done, {eta}; wall so far {_fmt(total)}")
            if outcome == "already finished":
                continue   # nothing new to report (anything left over goes into the next commit)
            write_report(out, envs, algos, seeds, ablations, args, machine)
            if args.commit:
                commit_results(out, f"compare: {name} {outcome.lower()} ({_run_line(out, name)}; "
                                    f"{finished}/{len(plan)} runs done)")
        clock.flush()
        write_report(out, envs, algos, seeds, ablations, args, machine)
        if args.commit:
            commit_results(out, f"compare: report of {len(plan) - len(failed)}/{len(plan)} runs "
                                f"(wall {_fmt(clock.flush())})")
    if failed:
        log(f"finished with {len(failed)} failed runs: {', '.join(failed)}; report in {out / 'results.md'}")
        return 1
    log(f"done: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        print(f"compare.py: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("\ncompare.py: interrupted (re-run the same command to continue)", file=sys.stderr)
        sys.exit(130)
