"""`atod-edge train`: the whole job. Bootstraps the teacher and the cold-start student when they
are not given (SFT on demonstrations, cached by their settings), trains the student, evaluates
cold start, teacher and trained student the same way, and prints the comparison table."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from atod_edge.config import dump_yaml, load_config
from atod_edge.errors import UserError
from atod_edge.io import (DiskFullError, atomic_write_json, atomic_write_text, check_output, disk_full_error,
                          run_lock)
from atod_edge.train.config import BootstrapOptions, TrainConfig

DEFAULT_RECIPE = "household"
#: settings a resumed run may change (--resume DIR --set KEY=VALUE); any other change would make
#: the rest of the run differ from what its config.yaml and its first steps say
RESUME_CHANGEABLE = ("steps", "eval_every", "eval_episodes", "eval_temperature", "eval_batch_episodes",
                     "checkpoint_every", "keep_checkpoints", "sample_episodes", "compare", "device", "teacher_device")


_ADDED_LATER = {"teacher_batch_size", "teacher_prompt_loss_weight", "student_batch_size",
                "student_prompt_loss_weight", "student_from_teacher"}


def _bootstrap_dir(cfg: TrainConfig, role: str) -> Path:
    from atod_edge.models import zoo
    from atod_edge.io import cache_dir

    b = cfg.bootstrap
    # Options added after the first release count only when set, so existing caches stay valid.
    default = BootstrapOptions()
    keys = {k: v for k, v in asdict(b).items()
            if k.startswith(role) and not (k in _ADDED_LATER and v == getattr(default, k))}
    # everything the SFT run depends on (history_turns shapes its prompts)
    keys.update(env=cfg.env, seed=cfg.seed, history_turns=cfg.history_turns, version=1)
    if cfg.precision != "auto":   # the SFT's autocast (counted only when set: existing caches stay valid)
        keys["precision"] = cfg.precision
    if role == "student" and b.student_from_teacher:
        keys["teacher"] = str(_bootstrap_dir(cfg, "teacher")) if cfg.teacher == "auto" else cfg.teacher
        if zoo.is_zoo_name(cfg.teacher):  # a new zoo teacher makes a new cold start
            keys["teacher_sha256"] = zoo.weights_sha256(cfg.teacher)
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:10]
    name = cfg.env.replace(":", "_").replace(".", "_")
    return cache_dir() / "bootstrap" / f"{name}-{role}-{digest}"


def ensure_model(cfg: TrainConfig, role: str, log=print) -> str:
    """The teacher or student to use: as given, or bootstrapped by SFT (once, then cached)."""
    given = cfg.teacher if role == "teacher" else cfg.student
    if given != "auto":
        return given
    out = _bootstrap_dir(cfg, role)
    if (out / "config.json").is_file():
        log(f"{role}: cached {out}")
        return str(out)
    from atod_edge.train.config import SFTConfig
    from atod_edge.train.sft import train_sft

    b = cfg.bootstrap
    prefix = "teacher" if role == "teacher" else "student"
    start = getattr(b, f"{prefix}_preset")
    if role == "student" and b.student_from_teacher:
        start = _cut_from_teacher(cfg, out, log)
    sft = SFTConfig(env=cfg.env, model=start, demos=getattr(b, f"{prefix}_demos"),
                    noise=getattr(b, f"{prefix}_noise"), episodes=getattr(b, f"{prefix}_episodes"),
                    epochs=getattr(b, f"{prefix}_epochs"), lr=getattr(b, f"{prefix}_lr"),
                    batch_size=getattr(b, f"{prefix}_batch_size"),
                    micro_batch=min(16, getattr(b, f"{prefix}_batch_size")),
                    prompt_loss_weight=getattr(b, f"{prefix}_prompt_loss_weight"),
                    history_turns=cfg.history_turns, seed=cfg.seed, device=cfg.device, out=str(out),
                    eval_episodes=0, precision=cfg.precision)
    log(f"{role}: bootstrapping by SFT ({sft.demos} demos x{sft.episodes}) -> {out}")
    train_sft(sft, log=log, resume=True)   # an interrupted bootstrap continues from its checkpoint
    return str(out)


def _cut_from_teacher(cfg: TrainConfig, out: Path, log) -> str:
    """The cold-start student's starting point: the teacher with only some of its layers (a
    compact model that keeps the teacher's embeddings and tokenizer), cached beside `out`."""
    from atod_edge.models.surgery import shrink_model

    cut = out.with_name(out.name + "-cut")
    if not (cut / "config.json").is_file():
        teacher = ensure_model(cfg, "teacher", log)
        log(f"student: cutting teacher layers {cfg.bootstrap.student_from_teacher} -> {cut}")
        shrink_model(teacher, cfg.bootstrap.student_from_teacher, cut)
    return str(cut)


def evaluate_model(path: str, cfg: TrainConfig, cache: Path | None = None) -> dict:
    """Success/score/turns on the eval split at the eval temperature (cached per model dir), with
    every episode's outcome by task ("outcomes": task id -> 0/1), for paired comparisons: every
    model plays the same tasks with the same sampling seeds."""
    from atod_edge.evaluate.evaluate import EvalConfig, evaluate
    from atod_edge.engine.policy import TorchPolicy

    ecfg = EvalConfig(env=cfg.env, split="eval", episodes=cfg.eval_episodes, temperature=cfg.eval_temperature,
                      seed=cfg.seed, history_turns=cfg.history_turns, max_new_tokens=cfg.max_new_tokens,
                      max_turns=cfg.max_turns, device=cfg.device, chat_template_kwargs=cfg.chat_template_kwargs,
                      env_step_timeout=cfg.env_step_timeout, max_prompt_tokens=cfg.max_prompt_tokens,
                      precision=cfg.precision)   # the run's precision: bf16 weights when it trains in bf16
    fields = {k: v for k, v in asdict(ecfg).items() if k != "chat_template_kwargs" or v}   # earlier caches stay valid
    key = json.dumps(fields, sort_keys=True)
    cache_file = (cache / "eval_cache.json") if cache else None
    if cache_file and cache_file.is_file():
        stored = json.loads(cache_file.read_text())
        if stored.get("key") == key and "outcomes" in stored["summary"]:
            return stored["summary"]
    if path.lower().endswith(".gguf"):   # a GGUF teacher plays through llama.cpp
        from atod_edge.engine.backends.llamacpp import LlamaCppPolicy

        policy = LlamaCppPolicy.load(path)
    else:
        policy = TorchPolicy.load(path, device=cfg.device, precision=cfg.precision)
    summary, episodes = evaluate(policy, ecfg)
    summary["outcomes"] = {e.task_id: int(bool(e.success)) for e in episodes}
    if cache_file:
        atomic_write_json(cache_file, {"key": key, "summary": summary})
    return summary


def _cache_for(model: str) -> Path | None:
    """Evaluations of bootstrapped models are cached beside them, those of zoo models in the cache
    (keyed by the weights' sha256); user dirs are left untouched."""
    from atod_edge.models import zoo
    from atod_edge.io import cache_dir

    if zoo.is_zoo_name(model):
        return cache_dir() / "zoo-eval" / f"{model}-{zoo.weights_sha256(model)[:12]}"
    path = Path(model).resolve()
    return path if path.is_dir() and cache_dir().resolve() in path.parents else None


def comparison_table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| model | success | 95% CI | score | turns | invalid |", "|---|---|---|---|---|---|"]
    for name, s in rows:
        low, high = s["success_ci95"]
        lines.append(f"| {name} | {s['success']:.1%} | [{low:.1%}, {high:.1%}] | {s['score']:.3f} | "
                     f"{s['turns']:.1f} | {s['invalid_rate']:.1%} |")
    return "\n".join(lines)


def paired_lines(rows: list[tuple[str, dict]]) -> list[str]:
    """The last row (the trained student) against each earlier one, paired task by task: the mean
    difference in success with its 95% interval (evaluate.paired_difference). The honest test of
    "better than the cold start": two separate intervals can overlap while the paired one does not,
    or the reverse."""
    from atod_edge.evaluate.evaluate import paired_difference

    (name, last), lines = rows[-1], []
    for other, summary in rows[:-1]:
        a, b = last.get("outcomes") or {}, summary.get("outcomes") or {}
        tasks = [t for t in a if t in b]
        if not tasks:
            continue
        d = paired_difference([a[t] for t in tasks], [b[t] for t in tasks])
        low, high = d["ci95"]
        lines.append(f"- {name} - {other}: {100 * d['mean']:+.1f} points, 95% interval "
                     f"[{100 * low:+.1f}, {100 * high:+.1f}], paired over the same {len(tasks)} tasks")
    return lines


def train_command(recipe: str | None, overrides: list[str], out: str | None = None,
                  resume: str | None = None) -> int:
    """`atod-edge train`: a new run in `out` (checked first: io.check_output) or `resume` an
    interrupted one. Rank 0 holds the run lock (io.run_lock) for the whole run; an interrupt or a
    full disk once the run dir exists ends with a line saying how to resume."""
    where: dict = {}   # "run_dir" once the run dir holds a run that --resume can continue
    try:
        with contextlib.ExitStack() as held:
            return _train_command(recipe, overrides, out, resume, held.enter_context, where)
    except KeyboardInterrupt:
        if where.get("run_dir"):
            print(f"\ntrain: interrupted; {_resume_hint(where['run_dir'])}", file=sys.stderr)
        raise
    except DiskFullError as e:
        if not where.get("run_dir"):
            raise
        raise DiskFullError(f"{e}; free space, then {_resume_hint(where['run_dir'])}") from None
    except Exception as e:
        full = disk_full_error(e, where.get("run_dir"))
        if full is None:
            raise
        hint = f"; free space, then {_resume_hint(where['run_dir'])}" if where.get("run_dir") else ""
        raise DiskFullError(f"{full}{hint}") from None


def _resume_hint(run_dir: Path) -> str:
    from atod_edge.train.checkpoint import latest_checkpoint

    last = latest_checkpoint(run_dir)
    found = f"its last checkpoint is step {last[0]}" if last else "it has no checkpoint yet"
    return f"{found}: continue with `atod-edge train --resume {run_dir}`"


def _train_command(recipe: str | None, overrides: list[str], out: str | None, resume: str | None, hold,
                   where: dict) -> int:
    from atod_edge.train.distributed import barrier, init_distributed
    from atod_edge.train.trainer import train

    if resume:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume {resume}: not a run directory (no config.yaml)")
        _check_saved_config(run_dir, resume)
        saved = load_config(TrainConfig, str(run_dir / "config.yaml"), [])
        cfg = load_config(TrainConfig, str(run_dir / "config.yaml"), overrides)
        if init_distributed(cfg.device).main:
            hold(run_lock(run_dir))   # before anything is written: a second writer is refused
        changed = _resume_changes(saved, cfg, resume)
        _check_resume_steps(cfg, run_dir, resume)
        meta = _read_run_json(run_dir, resume)
        teacher, student = meta.get("teacher"), meta.get("student")
        if not meta:
            raise UserError(f"--resume {resume}: run.json is missing; cannot tell which student it started from")
        if not student or not isinstance(student, str) or not isinstance(teacher, (str, type(None))):
            raise UserError(f"--resume {resume}: run.json names no student (or not as text); cannot tell which "
                            "student it started from")
        where["run_dir"] = run_dir
    else:
        cfg = load_config(TrainConfig, recipe or DEFAULT_RECIPE, overrides)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(out) if out else Path("runs") / f"{Path(recipe or DEFAULT_RECIPE).stem}-{cfg.algo}-{stamp}"
        if (run_dir / "metrics.jsonl").exists():
            raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
        check_output(run_dir, "run")   # before any bootstrap: a file, a foreign dir, no write access
        _check_devices(cfg)
        info = init_distributed(cfg.device)
        run_dir = Path(_from_rank0(str(run_dir), info))  # the time stamp may differ between ranks
        want_teacher = cfg.algo != "grpo" or cfg.compare
        if info.main:  # rank 0 bootstraps; the others wait, then find the cached models
            teacher = ensure_model(cfg, "teacher") if want_teacher else None
            student = ensure_model(cfg, "student")
        barrier(info)
        if not info.main:
            teacher = ensure_model(cfg, "teacher", log=_quiet) if want_teacher else None
            student = ensure_model(cfg, "student", log=_quiet)
        if teacher and cfg.algo != "grpo":
            _check_tokenizers(teacher, student)  # before the run dir exists: nothing to clean up
        if info.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            hold(run_lock(run_dir))
            check_output(run_dir, "run")   # again, under the lock: another process may have begun there
            atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
            atomic_write_json(run_dir / "run.json", {"teacher": teacher, "student": student,
                                                     "recipe": recipe or DEFAULT_RECIPE})
            where["run_dir"] = run_dir
    info = init_distributed(cfg.device)
    if resume and changed and info.main:   # config.yaml keeps saying what the run does
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        print(f"resuming with {', '.join(changed)}")
    if info.main:
        print(f"training {cfg.algo} on {cfg.env}: {cfg.steps} steps x {cfg.tasks_per_step} tasks x "
              f"{cfg.group_size} rollouts -> {run_dir}")
    final = train(cfg, run_dir, student, teacher, resume=bool(resume), log=print if info.main else _quiet)
    if info.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if not info.main:
        return 0
    report = {"run_dir": str(run_dir), "final_checkpoint": str(final), "config": asdict(cfg)}
    if cfg.eval_episodes:
        rows = []
        if cfg.compare:
            rows.append(("cold-start student", evaluate_model(student, cfg, _cache_for(student))))
            if teacher:
                rows.append(("teacher", evaluate_model(teacher, cfg, _cache_for(teacher))))
        rows.append((f"{cfg.algo.upper()} student", evaluate_model(str(final), cfg)))
        table = comparison_table(rows)
        paired = "\n".join(paired_lines(rows))
        report["eval"] = {name: s for name, s in rows}
        report["table"] = table
        report["paired"] = paired
        atomic_write_text(run_dir / "report.md", f"# {run_dir.name}\n\n{cfg.env}, eval split, "
                          f"{cfg.eval_episodes} episodes, temperature {cfg.eval_temperature}\n\n{table}\n\n{paired}\n")
        print(f"\n{cfg.env}, eval split, {cfg.eval_episodes} episodes, temperature {cfg.eval_temperature}:")
        print(table)
        if paired:
            print(paired)
    try:
        from atod_edge.train.plots import plot_run

        plot_run(run_dir)
    except ImportError:
        pass
    atomic_write_json(run_dir / "report.json", report)
    print(f"\nrun saved in {run_dir}/ (final checkpoint: {final})")
    return 0


def _check_saved_config(run_dir: Path, resume: str) -> None:
    """A run's config.yaml must still be a mapping of settings (an empty or damaged one would
    silently resume with the defaults)."""
    import yaml

    path = run_dir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"--resume {resume}: {path} is damaged ({type(e).__name__}); restore it to resume") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"--resume {resume}: {path} is damaged (not a mapping of settings); restore it to resume")


def _read_run_json(run_dir: Path, resume: str) -> dict:
    """run.json (which teacher and student the run started from), or {} when there is none."""
    path = run_dir / "run.json"
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"--resume {resume}: {path} is damaged ({type(e).__name__}); it should name the run's "
                        f'teacher and student, e.g. {{"teacher": "DIR", "student": "DIR"}}') from None
    if not isinstance(meta, dict):
        raise UserError(f"--resume {resume}: {path} is damaged (not a JSON object)")
    return meta


def _check_resume_steps(cfg: TrainConfig, run_dir: Path, resume: str) -> None:
    """steps may grow on resume, or shrink down to the steps already done; below that the run's
    checkpoints and metrics would say more than its config.yaml."""
    from atod_edge.train.checkpoint import CHECKPOINT_RE

    done = [int(m.group(1)) for p in (run_dir / "checkpoints").glob("step_*") if (m := CHECKPOINT_RE.match(p.name))]
    if done and cfg.steps < max(done):
        raise UserError(f"--resume {resume}: steps={cfg.steps} is fewer than the {max(done)} steps this run has "
                        f"already done (checkpoint step_{max(done):06d}); give steps >= {max(done)}, or start a "
                        "new run")


def _resume_changes(saved: TrainConfig, cfg: TrainConfig, run_dir: str) -> list[str]:
    """The settings --set changes on resume, as "key old -> new"; UserError if one of them is not
    RESUME_CHANGEABLE (it would change the training of a run already under way)."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in d.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    before, after = flat(asdict(saved)), flat(asdict(cfg))
    changed = [k for k in after if after[k] != before.get(k)]
    fixed = [k for k in changed if k not in RESUME_CHANGEABLE]
    if fixed:
        raise UserError(f"--resume {run_dir}: cannot change {', '.join(fixed)} of a run under way "
                        f"(its config.yaml has {fixed[0]}={before.get(fixed[0])}); a resumed run may change "
                        f"only {', '.join(RESUME_CHANGEABLE)}")
    return [f"{k} {before.get(k)} -> {after[k]}" for k in changed]


def _check_devices(cfg: TrainConfig) -> None:
    """A one-line error for a device this machine lacks, before any bootstrap or run dir."""
    from atod_edge.engine.precision import torch_device

    for name in filter(None, (cfg.device, cfg.teacher_device)):
        torch_device(name)


def _check_tokenizers(teacher: str, student: str) -> None:
    from atod_edge.models.loading import check_same_tokenizer, load_tokenizer

    if teacher.lower().endswith(".gguf"):
        if not Path(teacher).is_file():
            raise UserError(f"no GGUF teacher at {teacher}")
        return   # train() checks the GGUF's own vocabulary when it loads the teacher

    check_same_tokenizer(load_tokenizer(teacher), load_tokenizer(student), "teacher", "student")


def _from_rank0(value: str, info) -> str:
    if info.world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _quiet(*_args, **_kwargs) -> None:
    """A log function for ranks other than 0."""
