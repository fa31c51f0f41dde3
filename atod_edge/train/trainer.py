"""The ATOD training loop. train() reads top to bottom: the setup (where to compute, the student,
the teacher, the optimizer, the run directory), then for every step: roll out, score with the
teacher, build the batch, update, log, evaluate, checkpoint. The arithmetic lives in schedule.py,
tdur.py, advantages.py and loss.py, the step's stages in batch.py, update.py, run_log.py and
checkpoint.py, the ranks' plumbing in distributed.py; this module only moves data between them.

Distributed: under torchrun each rank rolls out its share of the step's tasks (whole GRPO groups),
and gradients are summed across ranks before the optimizer step (the loss is already divided by
the global token count, so the sum is the token mean over the whole batch). Metrics are summed
over ranks too; only rank 0 writes files. A periodic evaluation is shared out among the ranks
(evaluate_now); a rank that waits for the others (rank 0's writes, a longer share of an
evaluation) waits in a gloo group with a long timeout, not in NCCL's 10-minute watchdog.
Two ways to hold the student (config `distributed`):
    ddp    every rank holds the whole student and its optimizer state; gradients are all-reduced
    fsdp   FSDP2 (torch.distributed.fsdp.fully_shard, per decoder layer and the whole model):
           parameters, gradients and AdamW state are sharded across ranks for the update, which
           calls the model's own forward and runs the same number of micro-batches on every rank
           (each is a collective). Rollouts and checkpoints use a full, unsharded copy of the
           weights on every rank, refreshed after each update (all-gather): the student must fit
           one device for inference, not for training. Checkpoints hold the full weights and the
           full optimizer state (gathered to rank 0). Tested on CPU (gloo); CUDA (NCCL) runs the
           same code but has not been run on GPUs yet.
LoRA (config `lora.rank` > 0, see lora.py): only adapter weights train; checkpoints hold the merged
plain model plus the adapter (CHECKPOINT/adapter/), and resume loads the adapter onto the student.

Two environment variables exist for tests only (they cannot monkeypatch a subprocess):
    ATOD_EDGE_TEST_KILL_IN_CHECKPOINT=N   SIGKILL this process while it writes the checkpoint of
                                          step N, after the weights, before the atomic rename
                                          (checkpoint.py)
    ATOD_EDGE_TEST_DUMP_WEIGHTS=DIR       at the end, every rank saves its state dict to
                                          DIR/rank<R>.pt (to check that ranks stay identical)
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from atod_edge.config import dump_yaml
from atod_edge.errors import UserError
from atod_edge.io import append_line, atomic_write_text, read_jsonl
from atod_edge.train.batch import build_batch
from atod_edge.train.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from atod_edge.train.config import TrainConfig
from atod_edge.train.distributed import (DistInfo, barrier, gather_full_weights, gather_to_main, init_distributed,
                                         optimizer_state, rank_device, shard_fsdp)
from atod_edge.train.lora import ADAPTER_DIR, add_adapters, load_adapter, require_peft
from atod_edge.train.precision import compute_precision, recomputes_old_logprobs
from atod_edge.train.run_log import (json_line, print_progress, step_row, sync, tensorboard, truncate_metrics,
                                     write_step_records)
from atod_edge.train.schedule import AdaptiveProgress
from atod_edge.train.update import correct_for_rollout, recompute_old_logprobs, update


# --- the loop --------------------------------------------------------------------------------

def train(cfg: TrainConfig, run_dir: str | Path, student_src: str, teacher_src: str | None,
          resume: bool = False, log=print) -> Path:
    """Train the student; returns the final checkpoint dir. Writes into run_dir:
    config.yaml, metrics.jsonl, samples/step_XXXXXX.jsonl, checkpoints/step_XXXXXX/."""
    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.engine.rollout_copy import refresh_rollout_copy, rollout_copy
    from atod_edge.engine.sampling import SamplingParams
    from atod_edge.envs import env_class, env_tasks
    from atod_edge.rollout.runner import run_episodes
    from atod_edge.scoring.teacher import score_episodes   # a torch model or a .gguf in llama.cpp

    run_dir = Path(run_dir)
    where = placement(cfg)
    info, device, fsdp = where.info, where.device, where.fsdp
    torch.manual_seed(cfg.seed)
    found = latest_checkpoint(run_dir, log=log) if resume else None   # the newest intact one
    done_steps, checkpoint = found or (0, None)
    student = make_student(cfg, student_src, checkpoint, where)
    teacher = make_teacher(cfg, teacher_src, student.tokenizer, where.teacher_device, where.precision)
    pad_id = student.tokenizer.pad_token_id or 0
    optimizer, scheduler = make_optimizer(cfg, student.model)
    if done_steps:
        load_trainer_state(checkpoint, student.model, optimizer, scheduler, fsdp)
        log(f"resuming {run_dir} after step {done_steps}")
    metrics_path = open_run_dir(cfg, run_dir, done_steps, info)
    tb = tensorboard(run_dir) if info.main else None
    adaptive = adaptive_progress(cfg, metrics_path, done_steps)
    env_cls = env_class(cfg.env)
    # Rollouts under bf16 decode a bf16 copy of the student (bf16 weights and KV cache: half the bytes a
    # decode step reads), refreshed after every update; lp_S then comes from the training forward
    # (where.recompute), so the copy's rounding never enters the ratio.
    rollout_model = student.full
    if where.rollout_bf16:   # config rollout_precision
        rollout_model = rollout_copy(student.full)
    policy = TorchPolicy(rollout_model, student.tokenizer, name=f"student@{run_dir.name}",
                         precision="bf16" if where.rollout_bf16 else where.precision)
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    train_tasks = env_tasks(env_cls, "train", cfg.tasks_per_step * cfg.steps)

    started = time.perf_counter()
    for step in range(done_steps, cfg.steps):
        # roll out: this rank's share of the step's tasks
        t0 = time.perf_counter()
        step_tasks = train_tasks[step * cfg.tasks_per_step:(step + 1) * cfg.tasks_per_step]
        rollout_timings: dict[str, float] = {}
        episodes = run_episodes(policy, env_cls, step_tasks[info.rank::info.world], group_size=cfg.group_size,
                                sampling=sampling, seed=cfg.seed * 100_003 + step * info.world + info.rank,
                                history_turns=cfg.history_turns, max_turns=cfg.max_turns or None, step=step,
                                timings=rollout_timings, chat_template_kwargs=cfg.chat_template_kwargs,
                                env_step_timeout=cfg.env_step_timeout or None,
                                max_prompt_tokens=cfg.max_prompt_tokens or None)
        refuse_if_every_episode_failed(episodes, step)
        # score with the teacher: lp_T of every response token
        t1 = time.perf_counter()
        if teacher is not None:
            score_episodes(teacher, episodes, pad_id=pad_id, micro_batch=cfg.micro_batch,
                           prefix_reuse=cfg.prefix_reuse, precision=where.precision,
                           token_budget=cfg.score_token_budget or None)
        sync(device)
        t2 = time.perf_counter()
        rollout_lp = None
        if where.recompute:   # lp_S from the update's own forward (precision.py)
            rollout_lp = recompute_old_logprobs(student.model, episodes, cfg, info, pad_id, fsdp=fsdp,
                                                precision=where.precision)
            sync(device)
        # batch and update
        t_old = time.perf_counter()
        batch = build_batch(episodes, cfg, step, progress=adaptive.p if adaptive else None)
        correct_for_rollout(batch, rollout_lp, cfg)
        update_stats = update(student.model, optimizer, batch, cfg, info, pad_id, fsdp=fsdp,
                              grad_terms=bool(cfg.grad_norm_every) and step % cfg.grad_norm_every == 0)
        if fsdp:
            gather_full_weights(student.model, student.full)
        if rollout_model is not student.full:
            refresh_rollout_copy(student.full, rollout_model)
        lr = scheduler.get_last_lr()[0]   # the rate this step used (step() moves to the next one)
        scheduler.step()
        sync(device)
        t3 = time.perf_counter()

        # log
        timings = {"time_rollout": t1 - t0, "time_teacher": t2 - t1, "time_recompute": t_old - t2,
                   "time_update": t3 - t_old, **{f"time_rollout_{k}": v for k, v in rollout_timings.items()}}
        row = step_row(step, episodes, {**batch.stats, **update_stats}, lr, timings, info, device)
        if adaptive:
            adaptive.observe(row["success"], row["mean_abs_log_ratio"])
        done = step + 1
        # Records first, checkpoint last: a complete checkpoint of step N implies the metrics
        # rows of every step before N are on disk (resume drops the rows after it).
        if info.main:
            write_step_records(run_dir, row, episodes, cfg.sample_episodes, tb)
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps and cfg.eval_episodes:
            evaluate_now(policy, cfg, metrics_path, step, info)   # every rank plays its share
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            checkpoint_now(run_dir, done, student, optimizer, scheduler, cfg, where)
        barrier(info)
        if info.main:
            print_progress(done, cfg.steps, done_steps, row, started)
    if tb:
        tb.close()
    dump_weights_for_tests(student.full, info)
    final = latest_checkpoint(run_dir)
    return final[1] if final else run_dir


# --- setup -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """Where and how this process computes."""

    info: DistInfo       # this rank under torchrun (rank 0 of 1 without)
    device: str          # the student's device; under torchrun with CUDA, this rank's GPU
    teacher_device: str  # the teacher's (teacher_device, or the student's); "cuda" is this rank's GPU too
    fsdp: bool           # the student is sharded for the update (distributed=fsdp under torchrun)
    precision: str       # bf16 or fp32 compute (precision.py)
    recompute: bool      # lp_S is recomputed by the update's forward before the update (precision.py)
    rollout_bf16: bool = False   # rollouts decode a bf16 copy of the student (config rollout_precision)


def placement(cfg: TrainConfig) -> Placement:
    """Check the device names, join the process group under torchrun and pick this rank's device,
    the compute precision, and whether the update shards the student and recomputes lp_S."""
    from atod_edge.engine.precision import torch_device

    for name in filter(None, (cfg.device, cfg.teacher_device)):
        torch_device(name)  # a one-line error for a bad device name, before loading anything
    info = init_distributed(cfg.device)
    if cfg.tasks_per_step < info.world:
        raise UserError(f"tasks_per_step={cfg.tasks_per_step} gives some of the {info.world} ranks no task; "
                        f"use at least {info.world}")
    device = rank_device(cfg.device, info)  # torchrun's LOCAL_RANK: right on several machines too
    # a bare "cuda" teacher sits on the rank's GPU; an explicit index (cuda:1) is taken as given
    teacher_device = rank_device(cfg.teacher_device, info) if cfg.teacher_device == "cuda" else cfg.teacher_device
    precision = compute_precision(cfg.precision, device)
    recompute = recomputes_old_logprobs(cfg.recompute_old_logprobs, precision)
    # bf16 rollouts need lp_S from the training forward: on unless recompute_old_logprobs=never
    # (which validate() refuses with an explicit rollout_precision=bf16)
    rollout = precision if cfg.rollout_precision == "auto" and precision == "bf16" else compute_precision(
        cfg.rollout_precision, device)      # auto: bf16 on CUDA, and wherever the run computes in bf16
    rollout_bf16 = rollout == "bf16" and cfg.recompute_old_logprobs != "never"
    return Placement(info=info, device=device, teacher_device=teacher_device or device,
                     fsdp=cfg.distributed == "fsdp" and info.world > 1, precision=precision,
                     recompute=recompute or rollout_bf16, rollout_bf16=rollout_bf16)


@dataclass
class Student:
    """The student being trained, in the two roles it plays."""

    model: torch.nn.Module   # what the optimizer updates (sharded under fsdp; with LoRA, carrying the adapters)
    full: torch.nn.Module    # what rollouts, evaluation and checkpoints use: `model` itself, or under
                             # fsdp a full copy, refreshed after every update
    tokenizer: object
    adapter: object = None   # LoRA: the PeftModel (checkpoints save its adapter)


def make_student(cfg: TrainConfig, student_src: str, checkpoint: Path | None, where: Placement) -> Student:
    """The student in fp32, from `student_src` or the checkpoint being resumed, with LoRA
    adapters when asked for, and sharded under fsdp."""
    from atod_edge.models.loading import load_model

    if cfg.lora.rank:
        require_peft()
    # LoRA resumes from the original student plus the saved adapter (the checkpoint's own weights
    # are merged); full fine-tuning from the checkpoint's weights
    start_path = str(checkpoint) if checkpoint and not cfg.lora.rank else student_src
    # fp32 master weights whatever the checkpoint's dtype: bf16 weights would round lr-1e-6 steps away
    model, tokenizer = load_model(start_path, device=where.device, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        # non-reentrant (transformers defaults to reentrant): FSDP2 and DDP need it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapter = None
    if cfg.lora.rank:
        lora = cfg.lora
        adapter = add_adapters(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
        model = adapter.get_base_model()
        if checkpoint:
            load_adapter(adapter, checkpoint)
    elif checkpoint and (checkpoint / ADAPTER_DIR).is_dir():
        raise UserError(f"{checkpoint} was trained with LoRA (it has {ADAPTER_DIR}/): resume it with its "
                        "lora.* settings")
    model.eval()
    # the model rollouts, evaluation and checkpoints use: the student itself, or under fsdp a full
    # copy (the student gets sharded), refreshed after every update
    full = model
    if where.fsdp:
        full = copy.deepcopy(model)
        shard_fsdp(model, where.device, where.info, where.precision)
    return Student(model, full, tokenizer, adapter)


def make_teacher(cfg: TrainConfig, teacher_src: str | None, student_tokenizer, device: str, precision: str = "auto"):
    """The frozen teacher (a torch model or a .gguf in llama.cpp) on `device` (Placement's
    teacher_device), or None for algo grpo."""
    from atod_edge.scoring.teacher import load_teacher

    if cfg.algo == "grpo":
        return None
    if not teacher_src:
        raise UserError(f"algo {cfg.algo} needs a teacher (set teacher=DIR or a preset)")
    return load_teacher(teacher_src, device=device, student_tokenizer=student_tokenizer, precision=precision)


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module):
    """AdamW over what trains (all weights, or the LoRA adapters) and its linear warmup."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    return optimizer, scheduler


def open_run_dir(cfg: TrainConfig, run_dir: Path, done_steps: int, info: DistInfo) -> Path:
    """Rank 0 creates the run directory, cuts metrics.jsonl back to the resumed step and writes
    config.yaml (once: a resume keeps the first). Returns the metrics path."""
    metrics_path = run_dir / "metrics.jsonl"
    if info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(metrics_path, done_steps)
        if not (run_dir / "config.yaml").exists():
            atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    return metrics_path


def adaptive_progress(cfg: TrainConfig, metrics_path: Path, done_steps: int) -> AdaptiveProgress | None:
    """schedule.shape=adaptive: p(s) follows a measured signal; on resume, replayed from the metrics."""
    if not (cfg.algo == "atod" and cfg.schedule.shape == "adaptive"):
        return None
    rows = read_jsonl(metrics_path)[0] if metrics_path.is_file() else []
    return AdaptiveProgress.replay(cfg.schedule, rows, before_step=done_steps)


# --- the step's evaluation and checkpoint ----------------------------------------------------

def evaluate_now(policy, cfg: TrainConfig, metrics_path: Path, step: int, info: DistInfo = DistInfo()) -> None:
    """A periodic evaluation (eval split, eval_temperature) of the student, appended to metrics by
    rank 0. Every rank calls it and plays its share: the task list's batches of
    eval_batch_episodes go round the ranks, each played with the seed it has in one process, and
    rank 0 gathers them in task order, so the row is the one-process row. The ranks wait for one
    another in the long-wait gloo group (distributed.wait_group), not in NCCL's 10-minute watchdog."""
    from atod_edge.evaluate.evaluate import EvalConfig, evaluate, summarize

    started = time.perf_counter()
    size = cfg.eval_batch_episodes
    mine = []
    for start in range(info.rank * size, cfg.eval_episodes, info.world * size):
        part = EvalConfig(env=cfg.env, episodes=min(size, cfg.eval_episodes - start), start=start,
                          temperature=cfg.eval_temperature, seed=cfg.seed + start, history_turns=cfg.history_turns,
                          max_new_tokens=cfg.max_new_tokens, max_turns=cfg.max_turns, batch_episodes=size,
                          chat_template_kwargs=cfg.chat_template_kwargs, env_step_timeout=cfg.env_step_timeout,
                          max_prompt_tokens=cfg.max_prompt_tokens)
        mine.append((start, evaluate(policy, part)[1]))
    gathered = gather_to_main(mine, info)
    if not info.main:
        return
    eval_episodes = [ep for _, part in sorted((p for parts in gathered for p in parts), key=lambda p: p[0])
                     for ep in part]
    summary = summarize(eval_episodes)
    # eval_outcomes: success per task, in task order (the same tasks every run: paired curves)
    row = {"step": step, "eval_success": summary["success"], "eval_score": summary["score"],
           "eval_turns": summary["turns"], "eval_outcomes": [int(ep.success) for ep in eval_episodes],
           "time_eval": time.perf_counter() - started}
    if summary["errors"]:   # episodes ended by an env error (raised, hung past env_step_timeout)
        row.update(eval_errors=summary["errors"], eval_first_error=summary["first_error"])
    append_line(metrics_path, json_line(row))


def checkpoint_now(run_dir: Path, done: int, student: Student, optimizer, scheduler, cfg: TrainConfig,
                   where: Placement) -> None:
    """The checkpoint after `done` steps: rank 0 writes it; under fsdp every rank first takes part
    in gathering the optimizer state."""
    info = where.info
    state = optimizer_state(student.model, optimizer, where.fsdp) if where.fsdp or info.main else {}  # fsdp: collective
    if info.main:
        save_checkpoint(run_dir, done, student.full, student.tokenizer, state, scheduler, cfg.keep_checkpoints,
                        adapter=student.adapter)


def dump_weights_for_tests(model, info: DistInfo) -> None:
    """The ATOD_EDGE_TEST_DUMP_WEIGHTS hook (see the module docstring)."""
    dump_dir = os.environ.get("ATOD_EDGE_TEST_DUMP_WEIGHTS")
    if dump_dir:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                   Path(dump_dir) / f"rank{info.rank}.pt")


def refuse_if_every_episode_failed(episodes, step: int) -> None:
    """A step whose every episode ended in an env error has nothing to learn from: stop in one line
    (the checkpoints written so far stay; the run resumes once the env is fixed)."""
    from atod_edge.rollout.runner import env_errors

    failed = env_errors(episodes)
    if episodes and failed == len(episodes):
        first = next(ep.meta["error"] for ep in episodes if "error" in ep.meta)
        raise UserError(f"step {step + 1}: every one of its {failed} episodes ended in an env error "
                        f"(first: {' '.join(str(first).split())[:300]})")
