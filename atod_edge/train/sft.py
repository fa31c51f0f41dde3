"""Supervised fine-tuning on demonstration episodes: the teacher bootstrap and the cold start.

The loss is the mean negative log-likelihood of the response tokens (the prompt is masked out,
unless prompt_loss_weight adds a language-modelling loss on it);
prompts are built exactly as the rollout engine builds them, so the model is trained on what it
will see. Demonstrations (demos.py) come from the env's scripted expert, a noisy expert (imperfect demos),
DART-style demos (noisy execution, every state labelled with the expert's action: the model also
learns to recover from off-path states, which pure expert demos never show), DAgger demos (the
start model's own sampled episodes, every state labelled with the expert's action: the states its
own mistakes lead to, e.g. a loop of one invalid action), or an episodes JSONL file. The config
is config.SFTConfig; checkpoints and records are shared with RL training (checkpoint.py, run_log.py).

The final model goes to `out` (HF layout, written atomically); the run's records go beside it,
to `<out>.work/`:
    config.yaml        the resolved SFTConfig
    data.json          counts and a fingerprint of the training examples (checked on resume)
    dagger_demos.jsonl dagger demos only: the start model's labelled episodes (a resume reads them back)
    metrics.jsonl      loss rows every log_every steps, eval rows (periodic and final)
    checkpoints/       step_XXXXXX/: weights + trainer state, the newest only, for --resume;
                       removed once the final model is saved
    curves.png         the learning curve, drawn at the end
Scripted demonstrations are regenerated from the seed on resume, and the data order is replayed,
so an interrupted and resumed run ends with the same weights as an uninterrupted one.

LoRA (config `lora.rank` > 0, see lora.py): only adapter weights train; checkpoints and the final
model are the merged plain model with the adapter in adapter/ beside it (`atod-edge models publish
--adapter` reads it), and resume loads the saved adapter onto the start model. A demonstrated turn
longer than the model's context is cut to fit, or skipped, and counted (demos.build_examples).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from atod_edge.config import dump_yaml, load_config
from atod_edge.errors import UserError
from atod_edge.io import (DiskFullError, append_line, atomic_path, atomic_write_json, atomic_write_text,
                          check_output, disk_full_error, output_kind, run_lock)
from atod_edge.train.checkpoint import latest_checkpoint, save_checkpoint
from atod_edge.train.config import LR_SCHEDULES, SFTConfig
from atod_edge.train.demos import build_examples, dagger_episodes, demo_episodes
from atod_edge.train.lora import (ADAPTER_DIR, add_adapters, load_adapter, merged_state_dict, require_peft,
                                  save_adapter, trainable_parameters)
from atod_edge.train.run_log import format_duration, json_line, truncate_metrics


def lr_factor(step: int, total: int, warmup: int, schedule: str = "linear", min_ratio: float = 0.0) -> float:
    """The multiplier of the peak learning rate at optimizer step `step` (0-based) of `total`.

    Every shape ramps up linearly over `warmup` steps. linear: the ramp times a linear decay from
    1 at step 0 to 0 at step `total` (the original SFT schedule); constant: flat after the ramp;
    cosine: half a cosine from 1 at the end of warmup to 0 at step `total`. The decay is floored
    at min_ratio: factor = ramp * (min_ratio + (1 - min_ratio) * decay).
    """
    ramp = min(1.0, (step + 1) / max(1, warmup))
    if schedule == "linear":
        decay = max(0.0, 1 - step / total)
    elif schedule == "constant":
        decay = 1.0
    elif schedule == "cosine":
        progress = min(1.0, max(0, step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise UserError(f"lr_schedule '{schedule}' is unknown; choose one of {', '.join(LR_SCHEDULES)}")
    return ramp * (min_ratio + (1.0 - min_ratio) * decay)


def work_dir(out: str | Path) -> Path:
    """Where an SFT run keeps its metrics, checkpoints and curves: `<out>.work`, beside the model."""
    out = Path(out)
    return out.with_name(out.name + ".work")


def train_sft(cfg: SFTConfig, log=print, resume: bool = False, force: bool = False) -> Path:
    """Fine-tune cfg.model on demonstrations and save it (HF layout) to cfg.out, atomically.

    resume=True continues from the newest intact checkpoint in `<out>.work/checkpoints` (from the
    start when there is none). Without it, a leftover checkpoint of an interrupted run is an error.
    cfg.out must be new, empty or an earlier model (io.check_output; force: a foreign directory is
    replaced too), checked before any work; the work dir is locked for the run (io.run_lock).
    """
    out, work = Path(cfg.out), work_dir(cfg.out)
    check_sft_outputs(out, work, force)
    with run_lock(work):
        try:
            return _train_sft(cfg, log, resume, force)
        except DiskFullError as e:
            raise DiskFullError(f"{e}; free space, then continue with `atod-edge sft --resume {out}`") from None
        except Exception as e:
            full = disk_full_error(e, work)
            if full is None:
                raise
            raise DiskFullError(f"{full}; free space, then continue with `atod-edge sft --resume {out}`") from None


def check_sft_outputs(out: Path, work: Path, force: bool = False) -> None:
    """The output rule for an sft run: `out` new, empty or an earlier model (force: or a foreign
    directory), and its work dir `<out>.work` new, empty or an earlier sft run's."""
    check_output(out, "model", force=force)
    if work.exists() and not work.is_dir():
        raise UserError(f"{work} is a file, but sft keeps the records of --out {out} in a directory there: "
                        "move the file, or give another --out")
    found = output_kind(work) if work.is_dir() else "empty"
    if found not in ("empty", "sft-work") and not (force and found is None):
        held = "is a non-empty directory" if found is None else "holds another kind of output"
        raise UserError(f"{work} (where sft keeps the records of --out {out}) {held}; refusing to overwrite "
                        f"it: give another --out{', or add --force' if found is None else ''}")


def _train_sft(cfg: SFTConfig, log, resume: bool, force: bool) -> Path:
    from atod_edge.engine.context import model_context
    from atod_edge.engine.precision import torch_device
    from atod_edge.envs import env_class
    from atod_edge.models.loading import load_model

    torch_device(cfg.device)  # a one-line error for a bad device name
    out, work = Path(cfg.out), work_dir(cfg.out)
    found = latest_checkpoint(work, log=log)   # the newest intact one
    if found and not resume:
        raise UserError(f"{work} holds the checkpoint of an interrupted sft run (step {found[0]}): continue it "
                        f"with `atod-edge sft --resume {out}`, or remove {work} to start over")
    done_steps, start = found if (resume and found) else (0, cfg.model)
    if cfg.lora.rank:
        require_peft()
    elif done_steps and (Path(start) / ADAPTER_DIR).is_dir():
        raise UserError(f"{start} was trained with LoRA (it has {ADAPTER_DIR}/): resume it with its lora.* settings")
    torch.manual_seed(cfg.seed)
    # fp32 master weights whatever the checkpoint's dtype (as in RL training, precision.py): a bf16
    # checkpoint loaded as bf16 would train bf16 weights on CUDA; compute is bf16 autocast there.
    # LoRA resumes from the start model plus the saved adapter (the checkpoint's weights are merged)
    model, tokenizer = load_model(cfg.model if cfg.lora.rank else start, device=cfg.device, dtype=torch.float32)
    model.train()
    instructions = env_class(cfg.env).instructions
    # a resumed run's model is a checkpoint, not the start model: dagger_episodes reads its demos back
    start_model = (model, tokenizer) if not done_steps else (None, None)
    episodes = demo_episodes(cfg, lambda tasks: dagger_episodes(cfg, tasks, work, *start_model, log=log))
    fit: dict = {}   # turns over the model's context: cut to fit, or skipped
    examples = build_examples(episodes, tokenizer, instructions, cfg.history_turns, cfg.chat_template_kwargs,
                              context=model_context(model.config), counts=fit)
    if not examples:
        raise UserError("the demonstrations hold no valid turns to train on"
                        + (f" ({fit['skipped']} longer than the model's context)" if fit.get("skipped") else ""))
    data = {"demos": len(episodes), "successful": sum(e.success for e in episodes), "examples": len(examples),
            "cut_to_context": fit.get("cut", 0), "skipped_over_context": fit.get("skipped", 0),
            "sha256": _fingerprint(examples)}
    pad = tokenizer.pad_token_id or 0
    adapter = None
    if cfg.lora.rank:   # after the demos: dagger rolls out the start model itself
        lora = cfg.lora
        adapter = add_adapters(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
        model = adapter.get_base_model()   # the transformers model, LoRA layers inside
        if done_steps:
            load_adapter(adapter, Path(start))
        model.train()
    params = trainable_parameters(model)   # with LoRA, the adapters only
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr_ratio))
    metrics = work / "metrics.jsonl"
    if done_steps:
        _check_same_data(work, data)
        state = torch.load(Path(start) / "trainer_state.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        truncate_metrics(metrics, done_steps)
        log(f"resuming {work} after step {done_steps}")
    else:
        if resume and metrics.is_file():
            log(f"sft: no checkpoint in {work}: starting from the beginning")
        atomic_write_text(metrics, "")
    atomic_write_text(work / "config.yaml", dump_yaml(cfg))
    atomic_write_json(work / "data.json", data)
    log(f"sft: {len(episodes)} demos ({data['successful']} successful), "
        f"{len(examples)} turns, {cfg.epochs} epochs, {total} steps"
        + (f", LoRA rank {cfg.lora.rank} ({sum(p.numel() for p in params):,} trained weights)" if adapter else ""))
    if fit.get("cut") or fit.get("skipped"):
        log(f"sft: {fit['cut']} turns cut to the model's context, {fit['skipped']} skipped (too long even cut)")

    rng = random.Random(cfg.seed)
    started, train_seconds, trained, step = time.perf_counter(), 0.0, 0, 0
    try:
        for epoch in range(cfg.epochs):
            # every epoch's shuffle is replayed on resume, so the data order is the uninterrupted one
            order = list(range(len(examples)))
            rng.shuffle(order)
            for first in range(0, len(order), cfg.batch_size):
                if step < done_steps:
                    step += 1
                    continue
                t0 = time.perf_counter()
                batch = [examples[i] for i in order[first:first + cfg.batch_size]]
                # sorted by length, micro-batches pad little; by tokens, they share the most prefix
                batch.sort(key=(lambda ex: ex[0] + ex[1]) if cfg.prefix_reuse else (lambda ex: len(ex[0]) + len(ex[1])))
                n_tokens = sum(len(r) for _, r in batch)
                n_prompt = sum(len(p) - 1 for p, _ in batch)
                optimizer.zero_grad(set_to_none=True)
                loss_value = 0.0
                for m in range(0, len(batch), cfg.micro_batch):
                    chunk = batch[m:m + cfg.micro_batch]
                    loss = chunk_loss(model, chunk, pad, cfg, n_tokens, n_prompt)
                    loss.backward()
                    loss_value += float(loss.detach())
                grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                lr = scheduler.get_last_lr()[0]   # the rate this step used
                optimizer.step()
                scheduler.step()
                step += 1
                step_seconds = time.perf_counter() - t0
                train_seconds += step_seconds
                trained += len(batch)
                # Records first, checkpoint last: a checkpoint of step N implies every row before N is on
                # disk (resume drops the rows after it).
                if step % cfg.log_every == 0 or step == total:
                    append_line(metrics, json_line({"step": step - 1, "epoch": epoch, "loss": loss_value, "lr": lr,
                                                    "grad_norm": float(grad_norm), "examples": len(batch),
                                                    "tokens": n_tokens, "time_step": step_seconds}))
                _progress(step, total, done_steps, loss_value, trained / max(train_seconds, 1e-9),
                          time.perf_counter() - started)
                if (cfg.eval_every and step % cfg.eval_every == 0
                        and (step < total or not cfg.eval_episodes)):   # the final eval covers the end
                    if step < total:
                        print(file=sys.stderr)   # end the progress line
                    summary = _evaluate(model, tokenizer, cfg, cfg.eval_every_episodes, metrics, step)
                    log(f"sft: eval at step {step}: success {summary['success']:.1%}, score "
                        f"{summary['score']:.3f}, {summary['turns']:.1f} turns ({cfg.eval_every_episodes} episodes)")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                    save_checkpoint(work, step, model, tokenizer, optimizer.state_dict(), scheduler, keep=1,
                                    adapter=adapter)
    except KeyboardInterrupt:
        last = latest_checkpoint(work)
        where = f"its last checkpoint is step {last[0]}" if last else "it has no checkpoint yet"
        print(f"\nsft: interrupted after step {step}/{total}; {where}: continue with "
              f"`atod-edge sft --resume {out}`", file=sys.stderr)
        raise
    model.eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with atomic_path(out, kind=None if force else "model", need_bytes=weight_bytes) as tmp:
        if adapter is not None:   # the merged plain model, and the adapter for `models publish --adapter`
            model.save_pretrained(tmp, state_dict=merged_state_dict(model), safe_serialization=True)
            save_adapter(adapter, tmp / ADAPTER_DIR)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    # the checkpoints only served resuming; the final model replaces them
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    append_line(metrics, json_line({"step": total - 1, "saved": str(out),
                                    "time_total": time.perf_counter() - started}))
    log(f"sft: saved {out} ({time.perf_counter() - started:.0f}s)")
    if cfg.eval_episodes:
        from atod_edge.evaluate.evaluate import format_summary, save_eval

        summary, eval_episodes = _evaluate(model, tokenizer, cfg, cfg.eval_episodes, metrics, total, final=True)
        save_eval(out / "eval", summary, eval_episodes)
        log(format_summary(summary))
    try:
        from atod_edge.train.plots import plot_sft

        plot_sft(work)
    except ImportError:
        pass
    return out


def _evaluate(model, tokenizer, cfg: SFTConfig, episodes: int, metrics: Path, step: int, final: bool = False):
    """Evaluate the model being trained on the eval split (EvalConfig's temperature) and append
    an eval row to metrics. Returns the summary (and the episodes for the final evaluation)."""
    from atod_edge.evaluate.evaluate import EvalConfig, evaluate
    from atod_edge.engine.policy import TorchPolicy

    started = time.perf_counter()
    model.eval()
    policy = TorchPolicy(model, tokenizer, name=str(cfg.out))
    summary, eval_episodes = evaluate(policy, EvalConfig(env=cfg.env, episodes=episodes, seed=cfg.seed,
                                                         history_turns=cfg.history_turns, device=cfg.device,
                                                         chat_template_kwargs=cfg.chat_template_kwargs))
    model.train()
    append_line(metrics, json_line({"step": step - 1, "eval_success": summary["success"],
                                    "eval_score": summary["score"], "eval_turns": summary["turns"],
                                    "eval_episodes": episodes, "time_eval": time.perf_counter() - started}))
    return (summary, eval_episodes) if final else summary


def _fingerprint(examples: list[tuple[list[int], list[int]]]) -> str:
    return hashlib.sha256(json.dumps(examples, separators=(",", ":")).encode()).hexdigest()


def _check_same_data(work: Path, data: dict) -> None:
    """Resuming on other examples (a changed demos file, other settings) would not continue the run."""
    try:
        stored = json.loads((work / "data.json").read_text())
    except (OSError, ValueError):
        stored = {}
    if stored.get("sha256") != data["sha256"]:
        raise UserError(f"{work}: the demonstrations differ from the interrupted run's ({data['examples']} turns now, "
                        f"{stored.get('examples', '?')} then); resume with the same settings, or remove {work}")


def chunk_loss(model, chunk, pad: int, cfg: SFTConfig, n_tokens: int, n_prompt: int):
    """This micro-batch's share of the step's loss: the response tokens' mean NLL over the batch,
    plus prompt_loss_weight times the prompt tokens' mean NLL (a language-modelling loss on the
    observations and admissible lists: for a model trained from scratch, copying names from
    them is most of what acting needs, and the prompt holds ~20x more tokens than the response)."""
    from atod_edge.scoring.logprobs import response_logprobs
    from atod_edge.scoring.prefix_tree import prefix_reuse_applies, shared_prefix_logprobs

    if cfg.prefix_reuse and prefix_reuse_applies(model):
        # one prefix tree: the system text (and a task, where turns share one) is encoded once
        first = [1 if cfg.prompt_loss_weight else len(p) for p, _ in chunk]
        lps = shared_prefix_logprobs(model, [list(p) + list(r) for p, r in chunk], first, pad_id=pad,
                                     precision=cfg.precision)
        if not cfg.prompt_loss_weight:
            return -torch.cat(lps).sum() / n_tokens
    elif not cfg.prompt_loss_weight:
        lps = response_logprobs(model, [p for p, _ in chunk], [r for _, r in chunk], pad_id=pad,
                                micro_batch=cfg.micro_batch, precision=cfg.precision)
        return -torch.cat(lps).sum() / n_tokens
    else:
        # Score every token after the first: prompt[1:] and the response, in one forward.
        lps = response_logprobs(model, [p[:1] for p, _ in chunk], [list(p[1:]) + list(r) for p, r in chunk],
                                pad_id=pad, micro_batch=cfg.micro_batch, precision=cfg.precision)
    prompt_nll = -sum(lp[:len(p) - 1].sum() for lp, (p, _) in zip(lps, chunk))
    response_nll = -sum(lp[len(p) - 1:].sum() for lp, (p, _) in zip(lps, chunk))
    return response_nll / n_tokens + cfg.prompt_loss_weight * prompt_nll / max(n_prompt, 1)


def _progress(done: int, total: int, first: int, loss: float, examples_per_s: float, elapsed: float) -> None:
    eta = format_duration(elapsed / max(1, done - first) * (total - done))
    print(f"\rsft step {done}/{total} | loss {loss:.3f} | {examples_per_s:.1f} examples/s | ETA {eta}   ",
          end="" if done < total else "\n", file=sys.stderr, flush=True)


def resolve_resume(path: str) -> tuple[Path, Path]:
    """(work dir, output dir) of the SFT run to resume, given either of them."""
    given = Path(path)
    for work in (given, work_dir(given)):
        if work.name.endswith(".work") and (work / "config.yaml").is_file():
            return work, work.with_name(work.name[:-len(".work")])
    raise UserError(f"--resume {path}: not an sft run (no {work_dir(given)}/config.yaml)")


def sft_command(recipe: str | None, overrides: list[str], resume: str | None = None, force: bool = False) -> int:
    if resume:
        if recipe:
            raise UserError("--resume continues a run with its own config: give no recipe")
        work, out = resolve_resume(resume)
        cfg = load_config(SFTConfig, str(work / "config.yaml"), [*overrides, f"out={out}"])
        if latest_checkpoint(work) is None and _finished(work):
            raise UserError(f"{out} is complete (nothing to resume); evaluate it with "
                            f"`atod-edge eval --model {out}`")
    else:
        cfg = load_config(SFTConfig, recipe, overrides)
    train_sft(cfg, resume=bool(resume), force=force)
    return 0


def _finished(work: Path) -> bool:
    """The run saved its final model (a metrics row says so)."""
    from atod_edge.io import read_jsonl

    path = work / "metrics.jsonl"
    return path.is_file() and any("saved" in row for row in read_jsonl(path)[0])
