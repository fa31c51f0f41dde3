"""The ATOD training loop. It reads top to bottom: roll out, score with the teacher, compute
advantages, update, log, checkpoint. The arithmetic lives in schedule.py, tdur.py,
advantages.py and loss.py; this module only moves data between them.

Distributed: under torchrun each rank rolls out its share of the step's tasks (whole GRPO groups),
and gradients are summed across ranks before the optimizer step (the loss is already divided by
the global token count, so the sum is the token mean over the whole batch). Metrics are summed
over ranks too; only rank 0 writes files. Two ways to hold the student (config `distributed`):
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
    ATOD_EDGE_TEST_DUMP_WEIGHTS=DIR       at the end, every rank saves its state dict to
                                          DIR/rank<R>.pt (to check that ranks stay identical)
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from atod_edge.config import dump_yaml
from atod_edge.rollout.episode import Episode, Turn, write_episodes
from atod_edge.errors import UserError
from atod_edge.io import append_line, atomic_path, atomic_write_text, read_jsonl
from atod_edge.train.advantages import broadcast_to_tokens, combine, grpo_advantages, grpo_signal_stats, opd_advantages
from atod_edge.train.config import TrainConfig
from atod_edge.train.lora import ADAPTER_DIR, add_adapters, load_adapter, merged_state_dict, require_peft, save_adapter
from atod_edge.train.loss import clipped_surrogate
from atod_edge.train.precision import compute_precision, fsdp_mixed_precision, recomputes_old_logprobs, truncated_is_weights
from atod_edge.train.schedule import AdaptiveProgress, ScheduleConfig, coefficients
from atod_edge.train.tdur import token_weights, turn_statistics

CHECKPOINT_RE = re.compile(r"^step_(\d{6})$")


# --- distributed helpers ---------------------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0   # the rank on this machine: which GPU this process drives

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(),
                    int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def _all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _all_reduce_max(value: int, info: DistInfo, device) -> int:
    if info.world == 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor(value, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


def _barrier(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as dist

        dist.barrier()


def shard_fsdp(model, device: str, info: DistInfo, precision: str = "fp32") -> None:
    """FSDP2 in place: each decoder layer is its own shard group, the rest (embeddings, final norm,
    LM head) the root's. Gradients are summed, not averaged, like the ddp path (the loss is already
    a global token mean), with plain SUM collectives (gloo has no AVG/PREMUL_SUM). precision bf16:
    a MixedPrecisionPolicy (bf16 parameters in forward and backward, fp32 gradient reduction; the
    fp32 shards stay the master weights, see precision.py)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(f"distributed=fsdp: {type(model).__name__} has no model.layers to shard "
                        "(supported: Llama/Qwen/Mistral-style decoders); use distributed=ddp")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (info.world,))
    mixed = fsdp_mixed_precision(precision)
    options = {"mp_policy": mixed} if mixed is not None else {}
    for layer in layers:
        fully_shard(layer, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


@torch.no_grad()
def gather_full_weights(sharded, full) -> None:
    """Copy the sharded model's parameters into the unsharded copy `full` (an all-gather per
    parameter: every rank must call this, in the same order)."""
    targets = dict(full.named_parameters())
    for name, param in sharded.named_parameters():
        targets[name].copy_(param.full_tensor() if hasattr(param, "full_tensor") else param)


def optimizer_state(student, optimizer, fsdp: bool) -> dict:
    """The optimizer state to save. fsdp: the full (unsharded) state, gathered to rank 0 (every rank
    must call this; the others get an empty dict)."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(student, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(student, optimizer, state: dict, fsdp: bool, where: Path) -> None:
    try:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(student, optimizer, optim_state_dict=state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{where}: its optimizer state does not fit this run (were distributed or lora.* "
                        f"changed since?): {first}") from None


# --- batch: advantages for every response token --------------------------------------------

@dataclass
class TokenBatch:
    """The step's trainable turns and their tokens, flattened."""

    prompts: list[list[int]]          # per turn
    responses: list[list[int]]        # per turn
    token_offsets: list[int]          # per turn: start of its tokens in the flat tensors
    old_logprobs: torch.Tensor        # [tokens] lp_S
    advantages: torch.Tensor          # [tokens] A_t
    stats: dict[str, float]
    rollout_logprobs: torch.Tensor | None = None   # [tokens] the rollout engine's, where lp_S was recomputed
    loss_weights: torch.Tensor | None = None       # [tokens] per-token loss weights (TIS); None: all 1


def episode_rewards(episodes: list[Episode], invalid_penalty: float) -> torch.Tensor:
    """r_i: the env's episode reward minus the invalid-action penalty per invalid turn."""
    return torch.tensor([ep.reward - invalid_penalty * ep.num_invalid for ep in episodes],
                        dtype=torch.float32)


def build_batch(episodes: list[Episode], cfg: TrainConfig, step: int, progress: float | None = None) -> TokenBatch:
    """Advantages for every response token (ATOD.md sections 1-4), and T-DUR values written
    back onto the turns (for the records and the TUI). progress: the schedule's p(s) when it is
    measured rather than the clock's (schedule.shape=adaptive)."""
    kappa, rho = coefficients(step, cfg.algo, _schedule(cfg), progress)
    prompts, responses, offsets, where = [], [], [], []
    student_lp, teacher_lp, token_turn, turn_traj = [], [], [], []
    n_tokens = 0
    for e, ep in enumerate(episodes):
        for t, turn in enumerate(ep.turns):
            if not trains_turn(turn, cfg):
                continue
            k = len(prompts)
            prompts.append(turn.prompt_ids)
            responses.append(turn.response_ids)
            offsets.append(n_tokens)
            where.append((e, t))
            turn_traj.append(e)
            if turn.teacher_logprobs is None and kappa != 0:
                # silently using lp_S would zero the OPD term
                raise ValueError(f"episode {e} turn {t}: no teacher log-probs, but kappa={kappa}")
            student_lp += turn.student_logprobs
            teacher_lp += turn.teacher_logprobs if turn.teacher_logprobs is not None else turn.student_logprobs
            token_turn += [k] * len(turn.response_ids)
            n_tokens += len(turn.response_ids)
    lp_s = torch.tensor(student_lp, dtype=torch.float32)
    lp_t = torch.tensor(teacher_lp, dtype=torch.float32)
    turn_index = torch.tensor(token_turn, dtype=torch.long)
    traj_of_turn = torch.tensor(turn_traj, dtype=torch.long)

    weight_mode = "uniform" if cfg.algo == "opd" else cfg.weights
    level = "token" if weight_mode == "token" else "turn"
    mode = "tdur" if weight_mode == "token" else weight_mode
    weights = token_weights(lp_s, lp_t, turn_index, traj_of_turn, mode=mode, level=level)
    opd = opd_advantages(lp_t, lp_s, weights) if kappa != 0 else None
    grpo = None
    if rho != 0:
        rewards = episode_rewards(episodes, cfg.invalid_penalty)
        groups = torch.tensor([ep.group if ep.group is not None else i for i, ep in enumerate(episodes)])
        grpo = broadcast_to_tokens(grpo_advantages(rewards, groups), traj_of_turn[turn_index])
        grpo_stats = grpo_signal_stats(torch.tensor([ep.reward for ep in episodes]), rewards,
                                       torch.tensor([bool(ep.success) for ep in episodes]), groups, grpo,
                                       traj_of_turn[turn_index])
    advantages = combine(opd, grpo, kappa, rho)

    # T-DUR quantities per turn, for the records
    stats_per_turn = turn_statistics(lp_s, lp_t, turn_index, num_turns=len(prompts))
    per_turn_weight = weights[torch.tensor(offsets, dtype=torch.long)] if offsets else weights
    for k, (e, t) in enumerate(where):
        turn = episodes[e].turns[t]
        turn.disagreement = float(stats_per_turn.disagreement[k])
        turn.uncertainty = float(stats_per_turn.uncertainty[k])
        turn.weight = float(per_turn_weight[k]) if level == "turn" else None
    # the mean over turns (token-level weights: over tokens), not weighted by turn length
    mean_weight = per_turn_weight.mean() if level == "turn" else weights.mean()
    stats = {
        "kappa": kappa, "rho": rho, "tokens": n_tokens,
        "mean_turn_weight": float(mean_weight) if n_tokens else 0.0,
        "mean_abs_log_ratio": float((lp_t - lp_s).abs().mean()) if n_tokens else 0.0,
    }
    if progress is not None:
        stats["schedule_progress"] = progress
    if grpo is not None:   # all-fail groups and the penalty's share of the signal (ATOD.md section 6)
        stats.update(grpo_stats)
    return TokenBatch(prompts, responses, offsets, lp_s, advantages, stats)


def _schedule(cfg: TrainConfig) -> ScheduleConfig:
    s = cfg.schedule
    return ScheduleConfig(anneal_steps=s.anneal_steps, kappa_init=s.kappa_init, kappa_min=s.kappa_min,
                          rho_init=s.rho_init, rho_max=s.rho_max, shape=s.shape, anneal=s.anneal,
                          signal=s.signal, teacher_success=s.teacher_success, target=s.target,
                          smoothing=s.smoothing, plateau_tol=s.plateau_tol)


# --- the update ------------------------------------------------------------------------------

def update(student, optimizer, batch: TokenBatch, cfg: TrainConfig, info: DistInfo, pad_id: int,
           fsdp: bool = False) -> dict:
    """ppo_epochs passes of the clipped surrogate over the batch in micro-batches, then one
    optimizer step per pass. Losses stay on the device until the end (no host sync per
    micro-batch). Under torchrun the returned stats cover every rank's tokens. fsdp: `student`
    is sharded with FSDP2, which reduces the gradients itself. cfg.prefix_reuse: each micro-batch
    encodes the prompt prefixes its turns share once (see _turn_logprobs)."""
    from atod_edge.scoring.logprobs import response_logprobs

    device = next(student.parameters()).device
    precision = compute_precision(cfg.precision, str(device))
    parameters = [p for p in student.parameters() if p.requires_grad]
    local_tokens = float(len(batch.old_logprobs))
    total_tokens = _all_reduce_sum(torch.tensor(local_tokens, device=device), info)
    old = batch.old_logprobs.to(device)
    adv = batch.advantages.to(device)
    rollout = batch.rollout_logprobs.to(device) if batch.rollout_logprobs is not None else old
    weights = batch.loss_weights.to(device) if batch.loss_weights is not None else torch.ones_like(old)
    student.train()
    reuse = _reuses_prefixes(student, cfg, fsdp)
    if reuse:   # sorted by tokens: a micro-batch holds turns of one task, which share the most
        order = sorted(range(len(batch.prompts)), key=lambda k: batch.prompts[k] + batch.responses[k])
    else:       # by length: little padding
        order = sorted(range(len(batch.prompts)), key=lambda k: len(batch.prompts[k]) + len(batch.responses[k]))
    # summed over micro-batches and epochs: loss, ratio, clipped tokens; over the first epoch:
    # |lp_new - lp_rollout| (the training forward under the rollout's weights: the mismatch)
    sums = torch.zeros(4, device=device)
    mismatch_max = torch.zeros((), device=device)
    grad_norm = torch.zeros((), device=device)
    micro_batches = math.ceil(len(order) / cfg.micro_batch)
    if fsdp:  # each forward/backward is a collective: every rank runs as many as the busiest one
        micro_batches = _all_reduce_max(micro_batches, info, device)
    # each micro-batch's token positions, copied to the device once (not one blocking copy each)
    token_index = micro_batch_token_index(batch, order, cfg.micro_batch, device)
    for epoch in range(cfg.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        for m in range(0, micro_batches * cfg.micro_batch, cfg.micro_batch):
            turns = order[m:m + cfg.micro_batch]
            if not turns:   # fsdp only: a zero-loss micro-batch to match the other ranks
                new = torch.cat(response_logprobs(student, [[pad_id]], [[pad_id]], pad_id=pad_id, whole_model=True,
                                                  precision=precision))
                (new.sum() * 0.0).backward()
                continue
            new_lp = _turn_logprobs(student, [batch.prompts[k] for k in turns], [batch.responses[k] for k in turns],
                                    pad_id, reuse, fsdp, precision)
            index = token_index[m // cfg.micro_batch]
            new = torch.cat(new_lp)
            loss, _ = clipped_surrogate(new, old[index], adv[index], weights[index],
                                        eps_clip=cfg.eps_clip, num_tokens=total_tokens,
                                        with_stats=False)
            loss.backward()
            with torch.no_grad():
                ratio = torch.exp(new.detach() - old[index])
                clipped = (ratio < 1 - cfg.eps_clip) | (ratio > 1 + cfg.eps_clip)
                sums[:3] += torch.stack([loss.detach(), ratio.sum(), clipped.sum().to(ratio.dtype)])
                if epoch == 0:
                    gap = (new.detach() - rollout[index]).abs()
                    sums[3] += gap.sum()
                    mismatch_max = torch.maximum(mismatch_max, gap.max())
        if info.world > 1 and not fsdp:
            for p in parameters:
                # every rank must reduce the same tensors, also where its batch gave no gradient
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                _all_reduce_sum(p.grad, info)
        # max_norm inf: report the norm without clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.max_grad_norm or float("inf"))
        if hasattr(grad_norm, "full_tensor"):   # fsdp: a DTensor
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
    student.eval()
    sums = _all_reduce_sum(sums, info).cpu()
    mismatch_max = _all_reduce_max_tensor(mismatch_max, info).cpu()
    counted = max(1.0, float(total_tokens) * cfg.ppo_epochs)
    return {"loss": float(sums[0]) / cfg.ppo_epochs, "grad_norm": float(grad_norm),
            "mean_ratio": float(sums[1]) / counted, "clip_fraction": float(sums[2]) / counted,
            "tokens": int(total_tokens),
            "rollout_mismatch_mean": float(sums[3]) / max(1.0, float(total_tokens)),
            "rollout_mismatch_max": float(mismatch_max)}


def _reuses_prefixes(student, cfg: TrainConfig, fsdp: bool) -> bool:
    """The update's shared-prefix path applies: asked for, not under FSDP (every rank must run the
    same number of forwards, and the tree's depth differs between ranks), and a model it runs
    exactly (full attention, a cache: not under gradient checkpointing)."""
    from atod_edge.scoring.prefix_tree import prefix_reuse_applies

    return cfg.prefix_reuse and not fsdp and prefix_reuse_applies(student)


def _turn_logprobs(student, prompts, responses, pad_id: int, reuse: bool, fsdp: bool,
                   precision: str = "auto") -> list[torch.Tensor]:
    """One micro-batch's log-probs of its response tokens, with gradients: every turn on its own
    (right-padded rows), or one prefix tree whose shared prompt prefixes are encoded once."""
    from atod_edge.scoring.logprobs import response_logprobs
    from atod_edge.scoring.prefix_tree import shared_response_logprobs

    if reuse:
        return shared_response_logprobs(student, prompts, responses, pad_id=pad_id, micro_batch=len(prompts),
                                        precision=precision)
    return response_logprobs(student, prompts, responses, pad_id=pad_id, micro_batch=len(prompts), whole_model=fsdp,
                             precision=precision)


def micro_batch_token_index(batch: TokenBatch, order: list[int], micro_batch: int, device) -> list[torch.Tensor]:
    """For each micro-batch of `order` (turn indices, micro_batch at a time), the positions of its
    turns' tokens in the batch's flat tensors: built on the host, copied to the device in one go."""
    groups = [order[m:m + micro_batch] for m in range(0, len(order), micro_batch)]
    pieces = [torch.cat([torch.arange(batch.token_offsets[k], batch.token_offsets[k] + len(batch.responses[k]))
                         for k in turns]) for turns in groups]
    if not pieces:
        return []
    flat = torch.cat(pieces)
    flat = flat.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else flat.to(device)
    return list(flat.split([len(p) for p in pieces]))


def _all_reduce_max_tensor(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


# --- old log-probs and truncated turns (the numerics are in precision.py) ---------------------

def trains_turn(turn: Turn, cfg: TrainConfig) -> bool:
    """Whether a turn's response tokens enter the update: it has some, and it is not a response
    cut at max_new_tokens under truncated_turns=mask."""
    return bool(turn.response_ids) and not (cfg.truncated_turns == "mask" and turn.truncated)


@torch.no_grad()
def recompute_old_logprobs(student, episodes: list[Episode], cfg: TrainConfig, info: DistInfo, pad_id: int,
                           fsdp: bool = False, precision: str = "auto") -> torch.Tensor:
    """Replace the student_logprobs of every trained turn (the rollout engine's) with the update
    forward's log-probs under the current weights, before the first epoch (verl's old log-probs,
    see precision.py). Returns the rollout's log-probs, flat in build_batch's token order. Runs the
    update's forward (_turn_logprobs) on the update's micro-batches; under fsdp every rank runs as
    many forwards as the busiest one (each is a collective)."""
    turns = [turn for ep in episodes for turn in ep.turns if trains_turn(turn, cfg)]
    rollout = torch.tensor([lp for turn in turns for lp in turn.student_logprobs], dtype=torch.float32)
    device = next(student.parameters()).device
    reuse = _reuses_prefixes(student, cfg, fsdp)
    prompts = [turn.prompt_ids for turn in turns]
    responses = [turn.response_ids for turn in turns]
    if reuse:   # the update's order (see update)
        order = sorted(range(len(turns)), key=lambda k: prompts[k] + responses[k])
    else:
        order = sorted(range(len(turns)), key=lambda k: len(prompts[k]) + len(responses[k]))
    micro_batches = math.ceil(len(order) / cfg.micro_batch)
    if fsdp:
        micro_batches = _all_reduce_max(micro_batches, info, device)
    recomputed: list[torch.Tensor | None] = [None] * len(turns)
    student.eval()
    for m in range(0, micro_batches * cfg.micro_batch, cfg.micro_batch):
        chunk = order[m:m + cfg.micro_batch]
        # fsdp: a rank out of turns runs a one-token forward to match the others
        logprobs = _turn_logprobs(student, [prompts[k] for k in chunk] or [[pad_id]],
                                  [responses[k] for k in chunk] or [[pad_id]], pad_id, reuse, fsdp, precision)
        for k, lp in zip(chunk, logprobs):
            recomputed[k] = lp
    if turns:
        flat = torch.cat(recomputed).cpu().tolist()   # one copy to the host
        offset = 0
        for turn in turns:
            turn.student_logprobs = flat[offset:offset + len(turn.response_ids)]
            offset += len(turn.response_ids)
    return rollout


def correct_for_rollout(batch: TokenBatch, rollout_logprobs: torch.Tensor | None, cfg: TrainConfig) -> None:
    """With recomputed old log-probs: keep the rollout's on the batch (the update reports the
    mismatch against them) and, with tis_cap, weight each token's loss by the truncated
    importance ratio pi_old / pi_rollout."""
    if rollout_logprobs is None:
        return
    batch.rollout_logprobs = rollout_logprobs
    if cfg.tis_cap:
        batch.loss_weights, truncated = truncated_is_weights(batch.old_logprobs, rollout_logprobs, cfg.tis_cap)
        batch.stats["tis_truncated_fraction"] = truncated


# --- checkpoints -----------------------------------------------------------------------------

def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint (temporary dirs of a killed write start with a dot)."""
    found = []
    for p in (run_dir / "checkpoints").glob("step_*"):
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / "trainer_state.pt").is_file():
            found.append((int(m.group(1)), p))
    return max(found) if found else None


def save_checkpoint(run_dir: Path, done_steps: int, student, tokenizer, optimizer_state: dict, scheduler,
                    keep: int, adapter=None) -> Path:
    """A plain transformers checkpoint plus trainer_state.pt. With LoRA (`adapter`: the PeftModel)
    the weights saved are the merged ones, and the adapter goes to adapter/ for resume."""
    path = run_dir / "checkpoints" / f"step_{done_steps:06d}"
    with atomic_path(path) as tmp:
        if adapter is not None:
            student.save_pretrained(tmp, state_dict=merged_state_dict(student), safe_serialization=True)
            save_adapter(adapter, tmp / ADAPTER_DIR)
        else:
            student.save_pretrained(tmp, safe_serialization=True)
        if os.environ.get("ATOD_EDGE_TEST_KILL_IN_CHECKPOINT") == str(done_steps):
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die mid-write (see module docstring)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": done_steps, "optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()},
                   tmp / "trainer_state.pt")
    old = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if CHECKPOINT_RE.match(p.name))
    for stale in old[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    for tmp_dir in (run_dir / "checkpoints").glob(".step_*"):   # left by a killed write
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def _truncate_metrics(path: Path, done_steps: int) -> None:
    """Drop metric lines of steps after the checkpoint being resumed (they will be redone)."""
    if not path.exists():
        return
    records, _ = read_jsonl(path)
    kept = [r for r in records if int(r.get("step", 0)) < done_steps]
    atomic_write_text(path, "".join(_json(r) + "\n" for r in kept))


# --- the loop --------------------------------------------------------------------------------

def train(cfg: TrainConfig, run_dir: str | Path, student_src: str, teacher_src: str | None,
          resume: bool = False, log=print) -> Path:
    """Train the student; returns the final checkpoint dir. Writes into run_dir:
    config.yaml, metrics.jsonl, samples/step_XXXXXX.jsonl, checkpoints/step_XXXXXX/."""
    from atod_edge.envs import env_class
    from atod_edge.evaluate.evaluate import EvalConfig, evaluate
    from atod_edge.models.loading import load_model
    from atod_edge.engine.sampling import SamplingParams
    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.engine.precision import torch_device
    from atod_edge.rollout.runner import run_episodes
    from atod_edge.scoring.teacher import load_teacher, score_episodes   # a torch model or a .gguf in llama.cpp

    run_dir = Path(run_dir)
    for name in filter(None, (cfg.device, cfg.teacher_device)):
        torch_device(name)  # a one-line error for a bad device name, before loading anything
    info = init_distributed(cfg.device)
    if cfg.tasks_per_step < info.world:
        raise UserError(f"tasks_per_step={cfg.tasks_per_step} gives some of the {info.world} ranks no task; "
                        f"use at least {info.world}")
    device = cfg.device
    if device.startswith("cuda") and info.world > 1:
        device = f"cuda:{info.local_rank}"  # torchrun's LOCAL_RANK: right on several machines too
    fsdp = cfg.distributed == "fsdp" and info.world > 1
    precision = compute_precision(cfg.precision, device)   # bf16 or fp32 compute (precision.py)
    recompute = recomputes_old_logprobs(cfg.recompute_old_logprobs, precision)
    if cfg.lora.rank:
        require_peft()
    torch.manual_seed(cfg.seed)
    done_steps, checkpoint = 0, None
    if resume:
        found = latest_checkpoint(run_dir)
        if found:
            done_steps, checkpoint = found
    # LoRA resumes from the original student plus the saved adapter (the checkpoint's own weights
    # are merged); full fine-tuning from the checkpoint's weights
    start_path = str(checkpoint) if checkpoint and not cfg.lora.rank else student_src
    # fp32 master weights whatever the checkpoint's dtype: bf16 weights would round lr-1e-6 steps away
    student, tokenizer = load_model(start_path, device=device, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    adapter = None
    if cfg.lora.rank:
        lora = cfg.lora
        adapter = add_adapters(student, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
        student = adapter.get_base_model()
        if checkpoint:
            load_adapter(adapter, checkpoint)
    elif checkpoint and (checkpoint / ADAPTER_DIR).is_dir():
        raise UserError(f"{checkpoint} was trained with LoRA (it has {ADAPTER_DIR}/): resume it with its "
                        "lora.* settings")
    student.eval()
    # the model rollouts, evaluation and checkpoints use: the student itself, or under fsdp a full
    # copy (the student gets sharded), refreshed after every update
    full_student = student
    if fsdp:
        import copy

        full_student = copy.deepcopy(student)
        shard_fsdp(student, device, info, precision)
    teacher = None
    if cfg.algo != "grpo":
        if not teacher_src:
            raise UserError(f"algo {cfg.algo} needs a teacher (set teacher=DIR or a preset)")
        teacher = load_teacher(teacher_src, device=cfg.teacher_device or device, student_tokenizer=tokenizer)
    pad_id = tokenizer.pad_token_id or 0

    # only what trains: all weights, or the LoRA adapters
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    if done_steps:
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=True, map_location="cpu")
        load_optimizer_state(student, optimizer, state["optimizer"], fsdp, checkpoint)
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        log(f"resuming {run_dir} after step {done_steps}")
    metrics_path = run_dir / "metrics.jsonl"
    if info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, done_steps)
        if not (run_dir / "config.yaml").exists():
            atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    tb = _tensorboard(run_dir) if info.main else None
    # schedule.shape=adaptive: p(s) follows a measured signal; on resume, replayed from the metrics
    adaptive = None
    if cfg.algo == "atod" and cfg.schedule.shape == "adaptive":
        rows = read_jsonl(metrics_path)[0] if metrics_path.is_file() else []
        adaptive = AdaptiveProgress.replay(_schedule(cfg), rows, before_step=done_steps)

    env_cls = env_class(cfg.env)
    policy = TorchPolicy(full_student, tokenizer, name=f"student@{run_dir.name}", precision=precision)
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    train_tasks = env_cls().tasks("train", cfg.tasks_per_step * cfg.steps)
    started = time.perf_counter()
    for step in range(done_steps, cfg.steps):
        t0 = time.perf_counter()
        step_tasks = train_tasks[step * cfg.tasks_per_step:(step + 1) * cfg.tasks_per_step]
        rollout_timings: dict[str, float] = {}
        episodes = run_episodes(policy, env_cls, step_tasks[info.rank::info.world], group_size=cfg.group_size,
                                sampling=sampling, seed=cfg.seed * 100_003 + step * info.world + info.rank,
                                history_turns=cfg.history_turns, max_turns=cfg.max_turns or None, step=step,
                                timings=rollout_timings)
        t1 = time.perf_counter()
        if teacher is not None:
            score_episodes(teacher, episodes, pad_id=pad_id, micro_batch=cfg.micro_batch,
                           prefix_reuse=cfg.prefix_reuse, precision=precision)
        _sync(device)
        t2 = time.perf_counter()
        rollout_lp = None
        if recompute:   # lp_S from the update's own forward (precision.py)
            rollout_lp = recompute_old_logprobs(student, episodes, cfg, info, pad_id, fsdp=fsdp, precision=precision)
            _sync(device)
        t_old = time.perf_counter()
        batch = build_batch(episodes, cfg, step, progress=adaptive.p if adaptive else None)
        correct_for_rollout(batch, rollout_lp, cfg)
        update_stats = update(student, optimizer, batch, cfg, info, pad_id, fsdp=fsdp)
        if fsdp:
            gather_full_weights(student, full_student)
        lr = scheduler.get_last_lr()[0]   # the rate this step used (step() moves to the next one)
        scheduler.step()
        _sync(device)
        t3 = time.perf_counter()

        row = {
            "step": step,
            **_episode_metrics(episodes, info, device),
            **batch.stats, **update_stats,
            "lr": lr,
            **_peak_memory(device),
            "time_rollout": t1 - t0, "time_teacher": t2 - t1, "time_recompute": t_old - t2, "time_update": t3 - t_old,
            **{f"time_rollout_{k}": v for k, v in rollout_timings.items()},
            "generated_tokens": sum(len(t.response_ids or []) for ep in episodes for t in ep.turns),
            "truncated_rate": sum(ep.num_truncated for ep in episodes) / max(1, sum(ep.num_turns for ep in episodes)),
            "prompt_tokens": sum(len(t.prompt_ids or []) for ep in episodes for t in ep.turns),
        }
        if adaptive:
            adaptive.observe(row["success"], row["mean_abs_log_ratio"])
        done = step + 1
        # Records first, checkpoint last: a complete checkpoint of step N implies the metrics
        # rows of every step before N are on disk (resume drops the rows after it).
        if info.main and cfg.sample_episodes:
            (run_dir / "samples").mkdir(exist_ok=True)
            sample_path = run_dir / "samples" / f"step_{step:06d}.jsonl"
            sample_path.unlink(missing_ok=True)
            write_episodes(sample_path, episodes[:cfg.sample_episodes])
        if info.main:
            append_line(metrics_path, _json(row))
            if tb:
                for key, value in row.items():
                    if isinstance(value, (int, float)) and key != "step":
                        tb.add_scalar(key, value, step)
        if info.main and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps and cfg.eval_episodes:
            t5 = time.perf_counter()
            summary, eval_episodes = evaluate(policy, EvalConfig(env=cfg.env, episodes=cfg.eval_episodes,
                                                                 temperature=cfg.eval_temperature, seed=cfg.seed,
                                                                 history_turns=cfg.history_turns,
                                                                 max_new_tokens=cfg.max_new_tokens,
                                                                 max_turns=cfg.max_turns))
            # eval_outcomes: success per task, in task order (the same tasks every run: paired curves)
            append_line(metrics_path, _json({"step": step, "eval_success": summary["success"],
                                             "eval_score": summary["score"], "eval_turns": summary["turns"],
                                             "eval_outcomes": [int(ep.success) for ep in eval_episodes],
                                             "time_eval": time.perf_counter() - t5}))
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            state = optimizer_state(student, optimizer, fsdp) if fsdp or info.main else {}   # fsdp: collective
            if info.main:
                save_checkpoint(run_dir, done, full_student, tokenizer, state, scheduler, cfg.keep_checkpoints,
                                adapter=adapter)
        _barrier(info)
        if info.main:
            _progress(step + 1, cfg.steps, done_steps, row, started)
    if tb:
        tb.close()
    dump_dir = os.environ.get("ATOD_EDGE_TEST_DUMP_WEIGHTS")
    if dump_dir:  # test hook (see module docstring)
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in full_student.state_dict().items()},
                   Path(dump_dir) / f"rank{info.rank}.pt")
    final = latest_checkpoint(run_dir)
    return final[1] if final else run_dir


def _episode_metrics(episodes: list[Episode], info: DistInfo, device) -> dict[str, float]:
    """Rollout means over every rank's episodes: success, reward, score, turns, invalid rate."""
    sums = torch.tensor([len(episodes), sum(ep.success for ep in episodes), sum(ep.reward for ep in episodes),
                         sum(ep.score for ep in episodes), sum(ep.num_turns for ep in episodes),
                         sum(ep.num_invalid for ep in episodes)], dtype=torch.float64, device=device)
    n, success, reward, score, turns, invalid = _all_reduce_sum(sums, info).tolist()
    episodes_total, n = int(n), max(n, 1.0)
    return {"episodes": episodes_total, "success": success / n, "reward": reward / n, "score": score / n,
            "episode_len": turns / n, "invalid_rate": invalid / max(1.0, turns)}


def _json(row: dict) -> str:
    import json

    return json.dumps(row, sort_keys=True)


def _peak_memory(device: str) -> dict[str, float]:
    """CUDA: the student device's peak allocated memory since the last call (this step), in MiB."""
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return {}
    peak = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    torch.cuda.reset_peak_memory_stats(torch.device(device))
    return {"cuda_peak_mib": peak}


def _sync(device: str) -> None:
    # Phase timings need the GPU's queue drained; once per phase, never inside the loops.
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def _progress(done: int, total: int, first: int, row: dict, started: float) -> None:
    elapsed = time.perf_counter() - started
    per_step = elapsed / max(1, done - first)
    eta = per_step * (total - done)
    print(f"\rstep {done}/{total} | success {row['success']:.2f} | reward {row['reward']:.2f} | "
          f"kappa {row['kappa']:.2f} rho {row['rho']:.2f} | w {row['mean_turn_weight']:.2f} | "
          f"{row.get('episodes', 0) / max(row['time_rollout'], 1e-9):.1f} episodes/s | "
          f"{per_step:.1f}s/step | ETA {_fmt_time(eta)}   ", end="" if done < total else "\n",
          file=sys.stderr, flush=True)


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
