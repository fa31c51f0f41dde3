"""`atod-edge train`: the whole job. Bootstraps the teacher and the cold-start student when they
are not given (SFT on demonstrations, cached by their settings), trains the student, evaluates
cold start, teacher and trained student the same way, and prints the comparison table."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

from atod_edge.config import dump_yaml, load_config
from atod_edge.errors import UserError
from atod_edge.io import atomic_write_json, atomic_write_text
from atod_edge.train.config import BootstrapOptions, TrainConfig

DEFAULT_RECIPE = "household"
#: settings a resumed run may change (--resume DIR --set KEY=VALUE); any other change would make
#: the rest of the run differ from what its config.yaml and its first steps say
RESUME_CHANGEABLE = ("steps", "eval_every", "eval_episodes", "eval_temperature", "checkpoint_every",
                     "keep_checkpoints", "sample_episodes", "compare", "device", "teacher_device")


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
                    eval_episodes=0)
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
                      max_turns=cfg.max_turns, device=cfg.device)
    key = json.dumps(asdict(ecfg), sort_keys=True)
    cache_file = (cache / "eval_cache.json") if cache else None
    if cache_file and cache_file.is_file():
        stored = json.loads(cache_file.read_text())
        if stored.get("key") == key and "outcomes" in stored["summary"]:
            return stored["summary"]
    if path.lower().endswith(".gguf"):   # a GGUF teacher plays through llama.cpp
        from atod_edge.engine.backends.llamacpp import LlamaCppPolicy

        policy = LlamaCppPolicy.load(path)
    else:
        policy = TorchPolicy.load(path, device=cfg.device)
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
    from atod_edge.train.distributed import barrier, init_distributed
    from atod_edge.train.trainer import train

    if resume:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume {resume}: not a run directory (no config.yaml)")
        saved = load_config(TrainConfig, str(run_dir / "config.yaml"), [])
        cfg = load_config(TrainConfig, str(run_dir / "config.yaml"), overrides)
        changed = _resume_changes(saved, cfg, resume)
        meta = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
        teacher, student = meta.get("teacher"), meta.get("student")
        if not student:
            raise UserError(f"--resume {resume}: run.json is missing; cannot tell which student it started from")
    else:
        cfg = load_config(TrainConfig, recipe or DEFAULT_RECIPE, overrides)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(out) if out else Path("runs") / f"{Path(recipe or DEFAULT_RECIPE).stem}-{cfg.algo}-{stamp}"
        if (run_dir / "metrics.jsonl").exists():
            raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
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
            atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
            atomic_write_json(run_dir / "run.json", {"teacher": teacher, "student": student,
                                                     "recipe": recipe or DEFAULT_RECIPE})
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
