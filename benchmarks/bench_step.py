"""One ATOD training step and one SFT step, the per-turn path (old) vs prefix reuse (new), side by
side on the same episodes and batches, measured interleaved in one run.

    python benchmarks/bench_step.py [--recipe household] [--steps 3] [--sft-steps 12]

Every step rolls out once (the same engine either way), then scores the episodes with the teacher
and runs the update both ways, alternating which goes first: the old update on a copy of the
student and its optimizer, the new one on the student that rolls out the next step. Per phase
(rollout = generation + prompt building, env, teacher, update) it reports seconds, the tokens the
model was run on (old: every turn's prompt and response; new: the prefix trees' tokens) and the
peak memory above the phase's start (CUDA: allocated bytes, in the run; CPU: the growth of the
peak resident set size of a fresh process that runs only that phase on the first step's
episodes, since a process's freed memory stays mapped and would hide the second path's peak). The SFT part times full optimizer steps of the recipe's teacher bootstrap
(its batch size, micro-batch and prompt-loss weight) on dart demos, old and new on the same
batches. Writes benchmarks/results/step.json (top-level "speedup": total step time old / new,
"sft_speedup": SFT step time old / new).

MFU: each phase's achieved FLOP/s against the matmul peak measured in the same run
(benchmarks/machine_bounds.py: torch.matmul of the student's and teacher's shapes and a large
square, float32 on CPU where the phases run in fp32, bfloat16 on CUDA). FLOPs are counted, not
measured: 2 per weight per token a forward runs on (the LM head only at the positions whose
log-probs or next token are needed), plus attention's 4 x layers x heads x head_dim per (query,
key) pair; the update is 3x its forward (forward + backward; the log-prob chunks' recomputation in
backward not counted). Tokens per path as above: the per-turn path runs every turn's prompt and
response, the prefix-tree path its trees' tokens (each at its own position, so its attention
pairs are exact). The rollout's prefill is an estimate: each generate call's distinct prompts
less the prefix store's hit share.

Models: the recipe's own teacher (the default recipe's is the zoo's household-teacher) and its
cold-start student, made the way `atod-edge train` makes them (train/pipeline.ensure_model: cut
from the teacher and SFT'd on the recipe's demos, cached), or `--student DIR`. The JSON names
which.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "step.json"


class PeakMemory:
    """Peak memory above the start of the `with` block, in MB."""

    def __init__(self, device):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.rss()
            self.peak, self.stop = self.start, threading.Event()
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def sample(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.rss())

    @staticmethod
    def rss() -> int:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.stop.set()
            self.thread.join()
            peak = max(self.peak, self.rss())
        self.peak_mb = (peak - self.start) / 2**20


def timed(device, fn):
    """(seconds, peak MB, result, CPU seconds of this process) of fn()."""
    import torch

    with PeakMemory(device) as memory:
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return seconds, memory.peak_mb, result, cpu


def tree_tokens(prompts, responses, micro_batch: int) -> int:
    """Tokens the prefix-reuse path runs the model on: its micro-batches' prefix trees (the last
    token of each sequence is only a target)."""
    return tree_work(prompts, responses, micro_batch)[0]


def tree_work(prompts, responses, micro_batch: int) -> tuple[int, int]:
    """(tokens, attended (query, key) pairs) of the prefix-reuse path: a tree node's token at
    position p attends to the p + 1 keys up to it."""
    from machine_bounds import trie_work

    sequences = [list(p) + list(r) for p, r in zip(prompts, responses) if r]
    order = sorted(range(len(sequences)), key=lambda i: sequences[i])
    total = pairs = 0
    for start in range(0, len(order), micro_batch):
        tokens, attended = trie_work([sequences[i][:-1] for i in order[start:start + micro_batch]])
        total, pairs = total + tokens, pairs + attended
    return total, pairs


def turn_work(prompts, responses) -> tuple[int, int]:
    """(tokens, attended pairs) of the per-turn path: every turn's prompt + response, causal."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    return sum(lengths), sum(n * (n + 1) // 2 for n in lengths)


def rollout_work(episodes, hit_share: float) -> dict:
    """Tokens the rollout engine runs the student on (an estimate): per generate call (turn
    index k, every live episode), its distinct prompts less the prefix store's hit share, then
    one decode forward per sampled token but the last of each turn; the LM head once per
    sampled token."""
    calls: dict[int, set] = {}
    decode = decode_pairs = head = 0
    for ep in episodes:
        for k, t in enumerate(ep.turns):
            if not t.response_ids:
                continue
            calls.setdefault(k, set()).add(tuple(t.prompt_ids))
            n, r = len(t.prompt_ids), len(t.response_ids)
            decode += r - 1
            decode_pairs += sum(n + j + 1 for j in range(1, r))
            head += r
    prefill = sum(len(p) for prompts in calls.values() for p in prompts) * (1 - hit_share)
    prefill_pairs = sum(len(p) ** 2 for prompts in calls.values() for p in prompts) * (1 - hit_share)
    return {"prefill_tokens": prefill, "decode_tokens": decode, "head_positions": head,
            "tokens": prefill + decode, "pairs": prefill_pairs + decode_pairs}


def add_flops(row: dict, student, teacher, prompts, responses, episodes, hit_share: float, cfg) -> None:
    """The FLOPs each phase ran (see the docstring), per path, into the step's row."""
    from machine_bounds import forward_flops

    response_tokens = sum(map(len, responses))
    work = rollout_work(episodes, hit_share)
    row["rollout"]["flops"] = forward_flops(student, work["tokens"], work["head_positions"], work["pairs"])
    row["rollout"]["work"] = {**work, "prefix_hit_share": hit_share}
    paths = {"old": turn_work(prompts, responses), "new": tree_work(prompts, responses, cfg.micro_batch)}
    for name, (tokens, pairs) in paths.items():
        row["teacher"][name]["flops"] = forward_flops(teacher, tokens, response_tokens, pairs)


def add_update_flops(row: dict, student, batch, cfg) -> None:
    from machine_bounds import forward_flops

    response_tokens = sum(map(len, batch.responses))
    paths = {"old": turn_work(batch.prompts, batch.responses),
             "new": tree_work(batch.prompts, batch.responses, cfg.micro_batch)}
    for name, (tokens, pairs) in paths.items():
        row["update"][name]["flops"] = 3 * cfg.ppo_epochs * forward_flops(student, tokens, response_tokens, pairs)


def models(cfg, log):
    """(teacher source, student source, what they are): the recipe's own, made the way
    `atod-edge train` makes them (ensure_model: a zoo teacher by name, a cold start cut from it and
    SFT'd on the recipe's demos, both cached, so a later `atod-edge train` reuses them)."""
    from atod_edge.train.pipeline import ensure_model

    teacher = ensure_model(cfg, "teacher", log)
    student = ensure_model(cfg, "student", log)
    b = cfg.bootstrap
    start = (f"the teacher cut to layers '{b.student_from_teacher}'" if b.student_from_teacher
             else f"the {b.student_preset} preset")
    return teacher, student, (f"teacher: {teacher}; student: the recipe's cold start ({start} + "
                              f"{b.student_episodes} {b.student_demos} demos, {student})")


def bench_train(args, cfg, teacher_src, student_src, device, log, matmul_peak: dict) -> dict:
    import dataclasses

    import torch

    from atod_edge.envs import env_class
    from atod_edge.models.loading import load_model
    from atod_edge.engine.sampling import SamplingParams
    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.rollout.runner import run_episodes
    from atod_edge.scoring.logprobs import score_episodes, turn_pairs
    from atod_edge.train.batch import build_batch
    from atod_edge.train.distributed import DistInfo
    from atod_edge.train.update import update

    student, tokenizer = load_model(student_src, device=str(device))
    teacher, _ = load_model(teacher_src, device=str(device))
    teacher.eval().requires_grad_(False)
    student.eval()
    pad_id = tokenizer.pad_token_id or 0
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    env_cls = env_class(cfg.env)
    policy = TorchPolicy(student, tokenizer)
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    tasks = env_cls().tasks("train", cfg.tasks_per_step * args.steps)
    paths = {"old": dataclasses.replace(cfg, prefix_reuse=False), "new": dataclasses.replace(cfg, prefix_reuse=True)}
    probe_dir = Path(args.work)
    steps = []
    for step in range(args.steps):
        row: dict = {"step": step}
        timings: dict[str, float] = {}
        with PeakMemory(device) as memory:
            t0, c0 = time.perf_counter(), time.process_time()
            episodes = run_episodes(policy, env_cls, tasks[step * cfg.tasks_per_step:(step + 1) * cfg.tasks_per_step],
                                    group_size=cfg.group_size, sampling=sampling, seed=cfg.seed * 100_003 + step,
                                    history_turns=cfg.history_turns, max_turns=cfg.max_turns or None, step=step,
                                    timings=timings)
            rollout_total, rollout_cpu = time.perf_counter() - t0, time.process_time() - c0
        prompts, responses, _ = turn_pairs(episodes)
        store = getattr(policy, "last_store", None)
        hit_share = store.hit_rate if store is not None else 0.0
        row["rollout"] = {"seconds": rollout_total - timings.get("env", 0.0), "peak_mb": memory.peak_mb,
                          "cpu_seconds": rollout_cpu - timings.get("env", 0.0),
                          "tokens": sum(map(len, responses))}
        row["env"] = {"seconds": timings.get("env", 0.0)}
        all_tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
        row["prompt_tokens"] = sum(map(len, prompts))
        row["turns"] = len(prompts)
        first, second = ("old", "new") if step % 2 == 0 else ("new", "old")
        scored = {}
        for name in (first, second):
            copies = copy.deepcopy(episodes)
            seconds, peak, _, cpu = timed(device, lambda: score_episodes(
                teacher, copies, pad_id=pad_id, micro_batch=cfg.micro_batch, prefix_reuse=paths[name].prefix_reuse))
            scored[name] = copies
            tokens = all_tokens if name == "old" else tree_tokens(prompts, responses, cfg.micro_batch)
            row.setdefault("teacher", {})[name] = {"seconds": seconds, "peak_mb": peak, "tokens": tokens,
                                                   "cpu_seconds": cpu}
        diff = max((abs(a - b) for ea, eb in zip(scored["old"], scored["new"]) for ta, tb in zip(ea.turns, eb.turns)
                    for a, b in zip(ta.teacher_logprobs or [], tb.teacher_logprobs or [])), default=0.0)
        row["teacher_max_abs_diff"] = diff
        add_flops(row, student, teacher, prompts, responses, episodes, hit_share, cfg)
        batch = build_batch(scored["new"], cfg, step)
        if step == 0 and device.type == "cpu":   # inputs of the memory probes (fresh processes)
            import pickle

            torch.save({"student": student.state_dict(), "optimizer": optimizer.state_dict()}, probe_dir / "state.pt")
            with open(probe_dir / "inputs.pkl", "wb") as f:
                pickle.dump({"episodes": episodes, "batch": batch, "cfg": cfg, "teacher": teacher_src,
                             "student": student_src, "pad_id": pad_id}, f)
        update_tokens = {"old": sum(len(p) + len(r) for p, r in zip(batch.prompts, batch.responses)),
                         "new": tree_tokens(batch.prompts, batch.responses, cfg.micro_batch)}
        losses = {}
        # the old path's copy of the weights and optimizer state, made before either update runs
        # (the new one updates `student` in place), thrown away after
        old_model = copy.deepcopy(student)
        old_opt = torch.optim.AdamW(old_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        old_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for name in (first, second):
            model, opt = (student, optimizer) if name == "new" else (old_model, old_opt)
            seconds, peak, stats, cpu = timed(device, lambda: update(model, opt, batch, paths[name], DistInfo(), pad_id))
            losses[name] = stats["loss"]
            row.setdefault("update", {})[name] = {"seconds": seconds, "peak_mb": peak, "tokens": update_tokens[name],
                                                  "cpu_seconds": cpu}
        row["update_loss"] = losses
        add_update_flops(row, student, batch, cfg)
        for name in ("old", "new"):
            row.setdefault("total", {})[name] = (row["rollout"]["seconds"] + row["env"]["seconds"]
                                                 + row["teacher"][name]["seconds"] + row["update"][name]["seconds"])
        log(f"step {step}: {row['turns']} turns, {row['prompt_tokens']} prompt tokens | teacher "
            f"{row['teacher']['old']['seconds']:.1f}s -> {row['teacher']['new']['seconds']:.1f}s | update "
            f"{row['update']['old']['seconds']:.1f}s -> {row['update']['new']['seconds']:.1f}s | total "
            f"{row['total']['old']:.1f}s -> {row['total']['new']:.1f}s")
        steps.append(row)
    summary = summarize(steps)
    summary["mfu"] = mfu(steps, matmul_peak)
    if device.type == "cpu":
        import subprocess

        for phase in ("teacher", "update"):
            for name in ("old", "new"):
                done = subprocess.run([sys.executable, __file__, "--probe", f"{phase}:{name}", "--work", str(probe_dir)],
                                      capture_output=True, text=True)
                try:
                    peak = json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]
                except (IndexError, ValueError, KeyError):
                    peak = None
                    log(f"memory probe {phase}:{name} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
                summary["phases"][phase][name]["peak_mb"] = peak
        summary["peak_mb_method"] = ("CPU: growth of the peak RSS (VmHWM, reset through /proc/self/clear_refs "
                                     "after a warm-up run) in a fresh process running only that phase on "
                                     "step 0's first GRPO group (its turns: one or two micro-batches; the "
                                     "peak is per micro-batch)")
    return summary


def probe(spec: str, work: Path) -> None:
    """One phase, one path, in this fresh process: print its peak RSS growth in MB (CPU)."""
    import dataclasses
    import os
    import pickle

    import torch

    from atod_edge.models.loading import load_model
    from atod_edge.scoring.logprobs import score_episodes
    from atod_edge.train.distributed import DistInfo
    from atod_edge.train.update import update

    phase, name = spec.split(":")
    with open(work / "inputs.pkl", "rb") as f:
        inputs = pickle.load(f)
    # the first GRPO group's episodes only: memory peaks per micro-batch (the forward's activations
    # live until its backward), so a group's turns show it at a quarter of the time
    group = inputs["cfg"].group_size
    inputs["episodes"] = inputs["episodes"][:group]
    batch = inputs["batch"]
    turns = sum(1 for ep in inputs["episodes"] for t in ep.turns if t.response_ids)
    tokens = sum(len(r) for r in batch.responses[:turns])
    inputs["batch"] = dataclasses.replace(batch, prompts=batch.prompts[:turns], responses=batch.responses[:turns],
                                          token_offsets=batch.token_offsets[:turns],
                                          old_logprobs=batch.old_logprobs[:tokens], advantages=batch.advantages[:tokens])
    for field in ("rollout_logprobs", "loss_weights"):   # per-token extras, where the trainer has them
        if getattr(inputs["batch"], field, None) is not None:
            setattr(inputs["batch"], field, getattr(inputs["batch"], field)[:tokens])
    cfg = dataclasses.replace(inputs["cfg"], prefix_reuse=name == "new")
    state = torch.load(work / "state.pt", weights_only=True)
    if phase == "teacher":
        model, _ = load_model(inputs["teacher"])
        model.eval().requires_grad_(False)
        run = lambda: score_episodes(model, inputs["episodes"], pad_id=inputs["pad_id"],  # noqa: E731
                                     micro_batch=cfg.micro_batch, prefix_reuse=cfg.prefix_reuse)
    else:
        model, _ = load_model(inputs["student"])
        model.load_state_dict(state["student"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        optimizer.load_state_dict(state["optimizer"])
        run = lambda: update(model, optimizer, inputs["batch"], cfg, DistInfo(), inputs["pad_id"])  # noqa: E731
    run()   # once untimed: the allocator's pools and the thread pools exist before the measured run
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    # the peak resident set size since here: writing 5 to clear_refs resets VmHWM to the current
    # RSS (ru_maxrss alone keeps loading's peak, which hid the phase's)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    print(json.dumps({"peak_mb": max(0, peak - before) / 2**20}))


def mfu(steps: list[dict], peak: dict) -> dict:
    """Each phase's FLOPs, seconds, achieved GFLOP/s and their share of the measured peak."""
    gflop_s = peak["gflop_s"][peak["dtype"]]

    def entry(parts):
        flops, seconds, cpu = (sum(p[k] for p in parts) for k in ("flops", "seconds", "cpu_seconds"))
        achieved = flops / seconds / 1e9 if seconds else 0.0
        by_cpu = flops / cpu / 1e9 if cpu else 0.0
        return {"gflop": flops / 1e9, "seconds": seconds, "gflop_s": achieved, "mfu": achieved / gflop_s,
                "cpu_seconds": cpu, "gflop_per_cpu_s": by_cpu, "mfu_cpu_time": by_cpu / gflop_s}

    out = {"peak_gflop_s": gflop_s, "peak_dtype": peak["dtype"], "peak_shapes": peak["shapes"],
           "cpu_time_note": "CPU time of this process (all its threads; the 5 ms memory sampler included): "
                            "on a shared machine, FLOP/s by CPU time is what the phase does while it runs",
           "rollout": entry([s["rollout"] for s in steps])}
    for phase in ("teacher", "update"):
        out[phase] = {name: entry([s[phase][name] for s in steps]) for name in ("old", "new")}
    return out


def summarize(steps: list[dict]) -> dict:
    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else 0.0

    phases = {}
    for phase in ("rollout", "env"):
        phases[phase] = {"seconds": mean(s[phase]["seconds"] for s in steps),
                         "note": "the same engine on both paths: measured once per step, counted in both totals"}
        if phase == "rollout":
            phases[phase]["generated_tokens"] = mean(s[phase]["tokens"] for s in steps)
            phases[phase]["peak_mb"] = max(s[phase]["peak_mb"] for s in steps)
    for phase in ("teacher", "update"):
        entry = {}
        for name in ("old", "new"):
            entry[name] = {"seconds": mean(s[phase][name]["seconds"] for s in steps),
                           "tokens": mean(s[phase][name]["tokens"] for s in steps),
                           "peak_mb": max(s[phase][name]["peak_mb"] for s in steps)}
        entry["speedup"] = entry["old"]["seconds"] / max(entry["new"]["seconds"], 1e-9)
        entry["token_ratio"] = entry["old"]["tokens"] / max(entry["new"]["tokens"], 1)
        phases[phase] = entry
    total = {name: mean(s["total"][name] for s in steps) for name in ("old", "new")}
    return {"phases": phases, "total_seconds": total, "speedup": total["old"] / max(total["new"], 1e-9),
            "turns_per_step": mean(s["turns"] for s in steps),
            "prompt_tokens_per_step": mean(s["prompt_tokens"] for s in steps),
            "teacher_max_abs_diff": max(s["teacher_max_abs_diff"] for s in steps),
            "update_loss_max_abs_diff": max(abs(s["update_loss"]["old"] - s["update_loss"]["new"]) for s in steps),
            "steps": steps}


def bench_sft(args, cfg, device, log) -> dict:
    """Optimizer steps of the recipe's teacher bootstrap SFT, old and new on the same batches."""
    import dataclasses

    import torch

    from atod_edge.envs import env_class
    from atod_edge.models.loading import load_model
    from atod_edge.train.config import SFTConfig
    from atod_edge.train.demos import build_examples, demo_episodes
    from atod_edge.train.sft import chunk_loss

    b = cfg.bootstrap
    sft = SFTConfig(env=cfg.env, model=b.teacher_preset, demos=b.teacher_demos, noise=b.teacher_noise,
                    episodes=args.sft_episodes, batch_size=b.teacher_batch_size,
                    micro_batch=min(16, b.teacher_batch_size), prompt_loss_weight=b.teacher_prompt_loss_weight,
                    history_turns=cfg.history_turns, seed=cfg.seed)
    model, tokenizer = load_model(sft.model, device=str(device))
    model.train()
    examples = build_examples(demo_episodes(sft), tokenizer, env_class(cfg.env).instructions, sft.history_turns)
    random.Random(0).shuffle(examples)
    runs = {}
    for name, reuse in (("old", False), ("new", True)):
        run_model = copy.deepcopy(model)
        runs[name] = (run_model, torch.optim.AdamW(run_model.parameters(), lr=sft.lr),
                      dataclasses.replace(sft, prefix_reuse=reuse))
    pad = tokenizer.pad_token_id or 0
    rows = []
    for step in range(args.sft_steps):
        batch = examples[step * sft.batch_size:(step + 1) * sft.batch_size]
        if not batch:
            break
        n_tokens = sum(len(r) for _, r in batch)
        n_prompt = sum(len(p) - 1 for p, _ in batch)
        row = {"step": step, "examples": len(batch), "tokens": sum(len(p) + len(r) for p, r in batch)}
        for name in (("old", "new") if step % 2 == 0 else ("new", "old")):
            run_model, optimizer, run_cfg = runs[name]

            def one_step():
                ordered = sorted(batch, key=(lambda ex: ex[0] + ex[1]) if run_cfg.prefix_reuse
                                 else (lambda ex: len(ex[0]) + len(ex[1])))
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for m in range(0, len(ordered), run_cfg.micro_batch):
                    loss = chunk_loss(run_model, ordered[m:m + run_cfg.micro_batch], pad, run_cfg, n_tokens, n_prompt)
                    loss.backward()
                    total += float(loss.detach())
                torch.nn.utils.clip_grad_norm_(run_model.parameters(), 1.0)
                optimizer.step()
                return total

            seconds, peak, loss, _ = timed(device, one_step)
            row[name] = {"seconds": seconds, "peak_mb": peak, "loss": loss}
        row["new"]["tokens"] = tree_tokens([p for p, _ in batch], [r for _, r in batch], sft.micro_batch)
        rows.append(row)
    old = sum(r["old"]["seconds"] for r in rows) / len(rows)
    new = sum(r["new"]["seconds"] for r in rows) / len(rows)
    log(f"sft: {len(rows)} steps of {sft.batch_size} turns (prompt_loss_weight {sft.prompt_loss_weight}): "
        f"{old:.2f}s -> {new:.2f}s per step")
    return {"config": {"batch_size": sft.batch_size, "micro_batch": sft.micro_batch, "demos": sft.demos,
                       "prompt_loss_weight": sft.prompt_loss_weight, "model": sft.model},
            "seconds_per_step": {"old": old, "new": new}, "speedup": old / max(new, 1e-9),
            "tokens_per_step": {"old": sum(r["tokens"] for r in rows) / len(rows),
                                "new": sum(r["new"]["tokens"] for r in rows) / len(rows)},
            "peak_mb": {name: max(r[name]["peak_mb"] for r in rows) for name in ("old", "new")},
            "peak_mb_method": "in-process RSS growth sampled every 5 ms (approximate: freed memory stays mapped)",
            "final_loss": {name: rows[-1][name]["loss"] for name in ("old", "new")},
            "steps": rows}


def measure_peak(teacher_src, student_src, device, log) -> dict:
    """The matmul peak (machine_bounds.matmul_rates) over the student's and teacher's shapes at a
    micro-batch of tokens and a large square, in the dtype the phases run in."""
    from transformers import AutoConfig

    from atod_edge.models.presets import resolve_model
    from machine_bounds import matmul_rates, model_dims

    dtype = "float32" if device.type == "cpu" else "bfloat16"
    shapes = {(1024, 1024, 1024)}
    for src in (student_src, teacher_src):
        d = model_dims(AutoConfig.from_pretrained(resolve_model(src)))
        for m in (16, 512):
            shapes |= {(m, d["hidden"], d["heads"] * d["head_dim"]), (m, d["hidden"], d["intermediate"]),
                       (m, d["intermediate"], d["hidden"]), (m, d["hidden"], d["vocab"])}
    rows = matmul_rates(sorted(shapes), dtypes=(dtype,), device=str(device))
    peak = max(r["gflop_s"] for r in rows)
    log(f"matmul peak {peak:.0f} GFLOP/s ({dtype}, best of {len(rows)} shapes)")
    return {"dtype": dtype, "gflop_s": {dtype: peak}, "shapes": rows}


def main() -> int:
    import tempfile

    import torch

    sys.path.insert(0, str(Path(__file__).parent))   # machine_bounds
    from atod_edge.config import load_config
    from atod_edge.engine.precision import torch_device
    from atod_edge.train.config import TrainConfig
    from atod_edge.train.pipeline import ensure_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="household")
    parser.add_argument("--steps", type=int, default=3, help="training steps (each measured old and new)")
    parser.add_argument("--sft-steps", type=int, default=12, help="SFT optimizer steps (each old and new)")
    parser.add_argument("--sft-episodes", type=int, default=20, help="dart demos the SFT batches come from")
    parser.add_argument("--student", help="student checkpoint dir (default: see the docstring)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--note", default="", help="a remark stored in the JSON (e.g. the machine's load)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--probe", help=argparse.SUPPRESS)   # internal: one phase's memory, in a fresh process
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.probe, Path(args.work))
        return 0
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    from machine_bounds import load_average

    load_start = load_average()
    cfg = load_config(TrainConfig, args.recipe, [f"device={args.device}"])
    device = torch_device(args.device)
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="bench-step-") as work:
        if args.student:
            teacher_src, student_src = ensure_model(cfg, "teacher", log), args.student
            which = f"teacher: {teacher_src}; student: {args.student}"
        else:
            teacher_src, student_src, which = models(cfg, log)
        log(f"models: {which}")
        args.work = work
        matmul_peak = measure_peak(teacher_src, student_src, device, log)
        train = bench_train(args, cfg, teacher_src, student_src, device, log, matmul_peak)
    sft = bench_sft(args, cfg, device, log)
    result = {
        "speedup": train["speedup"], "sft_speedup": sft["speedup"],
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": __import__("os").cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(), "device": str(device)},
        "recipe": args.recipe, "models": which, "note": args.note,
        "load_average": {"start": load_start, "end": load_average()},
        "train_step": train, "sft_step": sft,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from atod_edge.io import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    p = train["phases"]
    print(f"{'phase':10s} {'old s':>8s} {'new s':>8s} {'ratio':>6s} {'old tokens':>11s} {'new tokens':>11s} "
          f"{'old MB':>7s} {'new MB':>7s}")
    print(f"{'rollout':10s} {p['rollout']['seconds']:8.2f} {p['rollout']['seconds']:8.2f} {'(same)':>6s}")
    print(f"{'env':10s} {p['env']['seconds']:8.2f} {p['env']['seconds']:8.2f} {'(same)':>6s}")
    for phase in ("teacher", "update"):
        e = p[phase]
        print(f"{phase:10s} {e['old']['seconds']:8.2f} {e['new']['seconds']:8.2f} {e['speedup']:5.2f}x "
              f"{e['old']['tokens']:11.0f} {e['new']['tokens']:11.0f} {e['old']['peak_mb'] or 0:7.0f} {e['new']['peak_mb'] or 0:7.0f}")
    t = train["total_seconds"]
    print(f"{'step':10s} {t['old']:8.2f} {t['new']:8.2f} {train['speedup']:5.2f}x")
    s = sft["seconds_per_step"]
    print(f"{'sft step':10s} {s['old']:8.2f} {s['new']:8.2f} {sft['speedup']:5.2f}x "
          f"{sft['tokens_per_step']['old']:11.0f} {sft['tokens_per_step']['new']:11.0f}")
    m = train["mfu"]
    print(f"\nMFU against the measured {m['peak_dtype']} matmul peak, {m['peak_gflop_s']:.0f} GFLOP/s "
          f"(load average {result['load_average']['end']}):")
    print(f"{'phase':10s} {'path':5s} {'GFLOP':>8s} {'seconds':>8s} {'GFLOP/s':>8s} {'MFU':>6s} "
          f"{'CPU s':>7s} {'GFLOP/CPU s':>11s} {'MFU (CPU s)':>11s}")
    for phase, name, r in [("rollout", "both", m["rollout"])] + [
            (phase, name, m[phase][name]) for phase in ("teacher", "update") for name in ("old", "new")]:
        print(f"{phase:10s} {name:5s} {r['gflop']:8.1f} {r['seconds']:8.2f} {r['gflop_s']:8.1f} {r['mfu']:6.1%} "
              f"{r['cpu_seconds']:7.2f} {r['gflop_per_cpu_s']:11.1f} {r['mfu_cpu_time']:11.1%}")
    print(f"speedup {train['speedup']:.2f}x (step), sft_speedup {sft['speedup']:.2f}x; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
