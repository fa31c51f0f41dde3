"""The workstation-GPU path in under 5 minutes of one H100/H200 (issue 26): what would crash or
crawl the first time `atod-edge train` runs a gpu-paper-* recipe, measured on random-init models
of Qwen3-0.6B's (student) and Qwen3-4B's (teacher) shapes built on the device (vocabulary 151,936,
tied embeddings, GQA 16/8 and 32/8, q/k norms), no download.

Every result is one JSON row, appended to the output file (and printed) the moment it exists, so a
run cut short keeps what it measured; every check has a deadline (SIGALRM; a row with "error" says
which ran out) and the whole run a budget (--budget, default 300 s of checks).

Checks, in order (CPU --cpu sizes in brackets):
  env            device, torch / transformers versions, memory
  decode         ms per decode step, prefill seconds, peak memory and the KV cache's dtype at 128 rows
                 x ~350-token prompts x 512 forced tokens [8 x 48 x 24], for the fp32 master student
                 under bf16 autocast and for its bf16 rollout copy (engine/rollout_copy.py), padded
                 rows (the mask path) and, for the copy, unpadded rows (no mask: SDPA's GQA)
  sdpa_kernels   the SDPA ops and attention kernels of one profiled prefill + decode step, padded
                 and unpadded, and how many K/V copies (repeat_kv) each made
  compaction     ms to drop one row from the 128-row cache (every layer): the engine's one gather +
                 one write per buffer vs the old per-row copies with a tolist()
  teacher        teacher (4B shape, bf16) tokens/s scoring 128 turns at micro-batch 8 vs the token
                 budget (16,384), prefix tree on, and the largest |lp| difference between the two
  update         one update micro-batch (8 turns, fwd + bwd, fp32 masters, bf16 autocast) with the
                 LM head's TF32 on vs off: ms, peak memory, largest |lp| difference
  resident       memory with student + grads + AdamW state + bf16 rollout copy + teacher + a
                 128-row KV cache resident (peak during a forced decode)
  train          a 3-step ATOD run (16 tasks x 8 rollouts, 1 turn of up to 512 tokens, micro-batch 8,
                 ppo_epochs 2) [2 x 2, 2 turns of 16 tokens] through atod_edge.train.trainer.train,
                 models saved to a temporary dir first: per step the phase times, mean ratio (over
                 both epochs), clip fraction, rollout mismatch, peak memory

Run on the lent GPU machine, from a bare checkout (no editable install, no venv):

  1. Check the machine first (one short `run` call):
        python3 -c "import torch, numpy, yaml, safetensors, requests, regex, tqdm; \
                    print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0))"
     The machine brings python 3.12, a CUDA torch (2.11), numpy, pyyaml, safetensors, accelerate;
     its transformers (5.x) and huggingface-hub (1.x) are too new for this project's pin.
  2. Here, fetch the pinned wheels for cp312 into an ignored folder (about 15 MB; carry <= 64 MiB):
        pip download --no-deps --only-binary=:all: --python-version 3.12 \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .cache/gpu-wheels \
            transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.2
     (add `requests urllib3 idna certifi charset-normalizer regex` there if step 1 lacked them).
  3. One `run` call, carry [".cache/gpu-wheels"], timeout_s 420:
        pip install -q --no-index --no-deps --target /tmp/deps .cache/gpu-wheels/*.whl && \
        PYTHONPATH=/tmp/deps:. ATOD_EDGE_CACHE=/tmp/atod-cache \
        python3 benchmarks/cuda_smoke.py --out "$OUT"
     The rows come back under $OUT; copy the .jsonl into benchmarks/results/cuda/ and commit it.
  Never carry a venv made here (its CPU torch would shadow the machine's CUDA torch) nor rely on
  the editable install (it points at this machine's paths): PYTHONPATH=. imports the checkout.

  python benchmarks/cuda_smoke.py --cpu      # the same script on CPU, tiny Qwen3 shapes, < 3 min

Output: --out DIR (default benchmarks/results/cuda/), file cuda-smoke-<time>-<cpu|gpu>.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))   # a bare checkout: import atod_edge from the tree

VOCAB = 151_936
QWEN3 = dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=40_960, head_dim=128,
             tie_word_embeddings=True, hidden_act="silu")
SHAPES = {   # Qwen3-0.6B and Qwen3-4B (their config.json), and tiny Qwen3s for --cpu
    "qwen3-0.6b": dict(QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8),
    "qwen3-4b": dict(QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8),
    "tiny-qwen3-student": dict(QWEN3, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
                               num_attention_heads=4, num_key_value_heads=2),
    "tiny-qwen3-teacher": dict(QWEN3, hidden_size=96, intermediate_size=192, num_hidden_layers=3, head_dim=16,
                               num_attention_heads=6, num_key_value_heads=2),
}
GPU = dict(student="qwen3-0.6b", teacher="qwen3-4b", rows=128, prompt=350, forced=512, turns=128, response=512,
           micro_batch=8, token_budget=16_384, tasks=16, group=8, max_turns=1, max_new_tokens=512, steps=3,
           deadlines=dict(build=40, decode=70, sdpa_kernels=20, compaction=15, teacher=35, update=25,
                          resident=40, train=150))
CPU = dict(student="tiny-qwen3-student", teacher="tiny-qwen3-teacher", rows=8, prompt=48, forced=24, turns=16,
           response=24, micro_batch=4, token_budget=512, tasks=2, group=2, max_turns=2, max_new_tokens=16, steps=3,
           deadlines=dict(build=30, decode=30, sdpa_kernels=20, compaction=10, teacher=20, update=20,
                          resident=20, train=90))


ATTENTION_KERNELS = ("fmha", "flash", "attention", "softmax", "cudnn", "cutlass")


class Deadline(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise Deadline in the main thread after `seconds` (between Python bytecodes: a running CUDA
    kernel finishes first)."""
    def expire(signum, frame):
        raise Deadline(f"deadline {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Rows:
    """Appends each row to the JSONL file as one write the moment it exists, and prints it."""

    def __init__(self, path: Path, device: str):
        self.path, self.device, self.count = path, device, 0
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, check: str, **fields) -> dict:
        from atod_edge.io import append_line

        row = {"check": check, "device": self.device, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
        line = json.dumps(row, sort_keys=True, default=str)
        append_line(self.path, line)
        self.count += 1
        print(line, flush=True)
        return row


class Machine:
    """The device, its synchronisation and memory counters (CPU: none, reported as null)."""

    def __init__(self, cpu: bool):
        import torch

        self.torch = torch
        self.cuda = not cpu
        self.device = torch.device("cuda:0" if self.cuda else "cpu")

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self):
        return round(self.torch.cuda.max_memory_allocated() / 2**30, 3) if self.cuda else None

    def allocated_gib(self):
        return round(self.torch.cuda.memory_allocated() / 2**30, 3) if self.cuda else None

    def timed(self, fn):
        self.sync()
        started = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - started


class ForcedTokenizer:
    """No end-of-turn token and no stop strings: every row decodes all its forced tokens."""

    pad_token_id = 0
    eos_token_id = None

    def get_vocab(self):
        return {}

    def decode(self, ids, skip_special_tokens=True):
        return ""


def build(shape: str, machine: Machine, dtype):
    """A random-init Qwen3 of `shape`, built straight on the device in `dtype` (rotary tables fp32)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         attn_implementation="sdpa", **SHAPES[shape])
    torch.manual_seed(0)
    with machine.device:
        model = Qwen3ForCausalLM._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(dtype == torch.float32)


def prompts_of(rows: int, length: int, seed: int, equal: bool = False, group: int = 8) -> list[list[int]]:
    """Rows of ~`length` random tokens; each group of `group` rows shares its first 80%; lengths
    differ by up to +-15% (left padding) unless `equal`."""
    import random

    rng = random.Random(seed)
    out = []
    for g in range(math.ceil(rows / group)):
        shared = [rng.randrange(3, VOCAB) for _ in range(int(length * 0.8))]
        for _ in range(min(group, rows - g * group)):
            tail = length - len(shared) + (0 if equal else rng.randint(-length // 7, length // 7))
            out.append(shared + [rng.randrange(3, VOCAB) for _ in range(max(1, tail))])
    return out


def record_cache_dtypes():
    """Patch BufferLayer to note the dtype its buffers are allocated in; returns the list."""
    from atod_edge.engine import kv_cache

    seen: list[str] = []
    original = kv_cache.BufferLayer.lazy_initialization

    def noting(self, key_states):
        original(self, key_states)
        seen.append(f"k:{self._k.dtype} v:{self._v.dtype} (keys came {key_states.dtype})")

    kv_cache.BufferLayer.lazy_initialization = noting
    return seen, lambda: setattr(kv_cache.BufferLayer, "lazy_initialization", original)


# --- checks ------------------------------------------------------------------------------------------

def check_decode(rows: Rows, machine: Machine, plan: dict, models: dict) -> None:
    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.engine.sampling import SamplingParams

    variants = [("fp32-master", models["student"], False), ("bf16-copy", models["copy"], False),
                ("bf16-copy", models["copy"], True)]
    for name, model, equal in variants:
        prompts = prompts_of(plan["rows"], plan["prompt"], seed=1, equal=equal)
        policy = TorchPolicy(model, ForcedTokenizer(), precision="bf16", device=str(machine.device))
        seen, restore = record_cache_dtypes()
        try:
            _, prefill = machine.timed(lambda: policy.generate(prompts, SamplingParams(max_new_tokens=1, stop=()), seed=0))
            machine.reset_peak()
            out, total = machine.timed(lambda: policy.generate(
                prompts, SamplingParams(max_new_tokens=plan["forced"], stop=()), seed=0))
        finally:
            restore()
        steps = plan["forced"] - 1
        rows("decode", model=name, padded=not equal, rows=len(prompts),
             prompt_tokens=sum(map(len, prompts)) // len(prompts), forced_tokens=plan["forced"],
             all_rows_ran_to_the_end=all(len(g.token_ids) == plan["forced"] for g in out),
             prefill_s=round(prefill, 3), decode_ms_per_step=round(1000 * (total - prefill) / max(1, steps), 2),
             tokens_per_s=round(len(prompts) * steps / max(1e-9, total - prefill), 1),
             peak_gib=machine.peak_gib(), kv_cache=sorted(set(seen)))


def check_sdpa_kernels(rows: Rows, machine: Machine, plan: dict, models: dict) -> None:
    import transformers.integrations.sdpa_attention as sdpa
    from torch.profiler import ProfilerActivity, profile

    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.engine.sampling import SamplingParams

    repeats = []
    original = sdpa.repeat_kv
    sdpa.repeat_kv = lambda states, n: repeats.append(1) or original(states, n)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if machine.cuda else [])
    try:
        for equal in (False, True):
            prompts = prompts_of(min(plan["rows"], 16), plan["prompt"], seed=2, equal=equal)
            policy = TorchPolicy(models["copy"], ForcedTokenizer(), precision="bf16", device=str(machine.device))
            policy.generate(prompts, SamplingParams(max_new_tokens=2, stop=()), seed=0)   # warm-up
            repeats.clear()
            with profile(activities=activities) as prof:   # prefill + one decode step
                policy.generate(prompts, SamplingParams(max_new_tokens=2, stop=()), seed=0)
                machine.sync()
            ops = {e.key: e.count for e in prof.key_averages()
                   if "scaled_dot_product" in e.key or "attention" in e.key.lower()}
            counts: dict[str, int] = {}
            for e in prof.events():   # device kernels (CUDA only)
                name = e.name.lower()
                if "cuda" in str(e.device_type).lower() and any(k in name for k in ATTENTION_KERNELS):
                    counts[e.name[:90]] = counts.get(e.name[:90], 0) + 1
            kernels = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
            layers = models["copy"].config.num_hidden_layers
            rows("sdpa_kernels", padded=not equal, rows=len(prompts), sdpa_ops=ops, attention_kernels=kernels,
                 repeat_kv_calls=len(repeats), repeat_kv_calls_in_prefill=2 * layers,
                 note="repeat_kv beyond the prefill's 2 per layer: the decode step copied K/V (a mask was passed)")
    finally:
        sdpa.repeat_kv = original


def old_compaction(layer, indices) -> None:
    """BufferLayer.batch_select_indices before issue 26: a tolist() and one copy per moved row."""
    keep = indices.tolist()
    for buffer in (layer._k, layer._v):
        for row, source in enumerate(keep):
            if source != row:
                buffer[row, :, :layer.length].copy_(buffer[source, :, :layer.length])
    layer._k, layer._v = layer._k[:len(keep)], layer._v[:len(keep)]
    layer.keys, layer.values = layer._k[:, :, :layer.length], layer._v[:, :, :layer.length]


def check_compaction(rows: Rows, machine: Machine, plan: dict, models: dict) -> None:
    import torch

    from atod_edge.engine.kv_cache import buffer_cache

    config = models["student"].config
    length = plan["prompt"] + plan["forced"]
    heads, dim = config.num_key_value_heads, config.head_dim
    results = {}
    for name in ("index_select", "per_row_tolist"):
        cache = buffer_cache(config.num_hidden_layers, length)
        for layer in cache.layers:
            kv = torch.zeros(plan["rows"], heads, length, dim, dtype=torch.bfloat16, device=machine.device)
            layer.update(kv, kv)
        times = []
        for drop in range(3):   # drop the first row: every other row moves up
            index = torch.arange(1, cache.layers[0].keys.shape[0], device=machine.device)
            run = ((lambda: cache.batch_select_indices(index)) if name == "index_select"
                   else (lambda: [old_compaction(layer, index) for layer in cache.layers]))
            times.append(machine.timed(run)[1])
        results[name] = round(1000 * min(times), 3)
        del cache
    rows("compaction", rows=plan["rows"], positions=length, layers=config.num_hidden_layers,
         ms_per_compaction=results, note="one finished row leaving a full batch, all layers, bf16 K and V")


def turn_set(plan: dict, seed: int = 3):
    """128 turns [16]: groups of 8 share a prompt prefix (a task), responses of 1/8..1 x the max."""
    import random

    rng = random.Random(seed)
    prompts = prompts_of(plan["turns"], plan["prompt"], seed=seed)
    responses = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(plan["response"] // 8, plan["response"]))]
                 for _ in prompts]
    return prompts, responses


def check_teacher(rows: Rows, machine: Machine, plan: dict, models: dict) -> None:
    import torch

    from atod_edge.rollout.episode import Episode, Turn
    from atod_edge.scoring.logprobs import score_episodes

    prompts, responses = turn_set(plan)
    tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    scores = {}
    for name, options in (("micro_batch", dict(micro_batch=plan["micro_batch"])),
                          ("token_budget", dict(micro_batch=plan["micro_batch"], token_budget=plan["token_budget"]))):
        episodes = [Episode(env="synthetic", task_id=str(i), seed=i, split="train",
                            turns=[Turn(observation="", prompt_ids=p, response_ids=r)])
                    for i, (p, r) in enumerate(zip(prompts, responses))]
        score_episodes(models["teacher"], episodes[:2], precision="bf16", **options)   # warm-up
        machine.reset_peak()
        _, seconds = machine.timed(lambda: score_episodes(models["teacher"], episodes, precision="bf16", **options))
        scores[name] = torch.tensor([lp for e in episodes for lp in e.turns[0].teacher_logprobs])
        rows("teacher", batching=name, options=options, turns=len(prompts), tokens=tokens,
             seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 1), peak_gib=machine.peak_gib())
    rows("teacher", compare="token_budget vs micro_batch",
         max_abs_lp_diff=float((scores["micro_batch"] - scores["token_budget"]).abs().max()),
         note="bf16: batch composition changes the rounding")


def check_update(rows: Rows, machine: Machine, plan: dict, models: dict) -> None:
    import torch

    import atod_edge.scoring.tokens as tokens
    from atod_edge.scoring.logprobs import response_logprobs

    student = models["student"]
    prompts, responses = turn_set(plan, seed=4)
    prompts, responses = prompts[:plan["micro_batch"]], responses[:plan["micro_batch"]]
    original = tokens.tf32_matmuls
    lps = {}
    try:
        for name in ("tf32_on", "tf32_off", "tf32_on"):
            if name == "tf32_off":
                tokens.tf32_matmuls = lambda device: contextlib.nullcontext()
            else:
                tokens.tf32_matmuls = original

            def step():
                lp = torch.cat(response_logprobs(student, prompts, responses, micro_batch=len(prompts),
                                                 precision="bf16"))
                (-lp.mean()).backward()
                return lp.detach()

            student.zero_grad(set_to_none=True)
            machine.reset_peak()
            lp, seconds = machine.timed(step)
            lps[name] = lp
            rows("update", lm_head=name, turns=len(prompts), tokens=sum(len(p) + len(r) for p, r in
                                                                        zip(prompts, responses)),
                 ms=round(1000 * seconds, 1), peak_gib=machine.peak_gib(),
                 note="first tf32_on run includes warm-up; compare the last two")
    finally:
        tokens.tf32_matmuls = original
    rows("update", compare="tf32 on vs off", max_abs_lp_diff=float((lps["tf32_on"] - lps["tf32_off"]).abs().max()),
         cuda_only="on CPU both runs are the same fp32 head")


def check_resident(rows: Rows, machine: Machine, plan: dict, models: dict) -> None:
    import torch

    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.engine.rollout_copy import refresh_rollout_copy
    from atod_edge.engine.sampling import SamplingParams
    from atod_edge.scoring.logprobs import response_logprobs

    student = models["student"]
    stages = {"student+copy+teacher": machine.allocated_gib()}
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
    prompts, responses = turn_set(plan, seed=5)
    lp = torch.cat(response_logprobs(student, prompts[:2], responses[:2], precision="bf16"))
    (-lp.mean()).backward()
    optimizer.step()                                 # AdamW's two fp32 moments now exist
    stages["+grads+adamw"] = machine.allocated_gib()
    refresh_rollout_copy(student, models["copy"])
    policy = TorchPolicy(models["copy"], ForcedTokenizer(), precision="bf16", device=str(machine.device))
    machine.reset_peak()
    machine.timed(lambda: policy.generate(prompts_of(plan["rows"], plan["prompt"], seed=6),
                                          SamplingParams(max_new_tokens=plan["forced"], stop=()), seed=0))
    stages["peak during a forced decode"] = machine.peak_gib()
    total = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if machine.cuda else None
    rows("resident", gib=stages, device_total_gib=total, rows=plan["rows"], forced_tokens=plan["forced"])
    optimizer.zero_grad(set_to_none=True)
    del optimizer


def check_train(rows: Rows, machine: Machine, plan: dict, work: Path, models: dict) -> None:
    import torch

    from atod_edge.config import load_config
    from atod_edge.io import read_jsonl
    from atod_edge.models.loading import load_tokenizer
    from atod_edge.train.config import TrainConfig
    from atod_edge.train.trainer import train

    tokenizer = load_tokenizer("household-teacher")    # the tiny presets' tokenizer, shipped in the zoo
    dirs = {}
    for role in ("student", "teacher"):
        dirs[role] = work / role
        models[role].to(torch.bfloat16).save_pretrained(dirs[role])   # the trainer makes fp32 masters
        tokenizer.save_pretrained(dirs[role])
    models.clear()                                   # free the device for the run
    if machine.cuda:
        torch.cuda.empty_cache()
    cfg = load_config(TrainConfig, None, [
        "algo=atod", f"device={machine.device}", "precision=bf16", f"steps={plan['steps']}",
        f"tasks_per_step={plan['tasks']}", f"group_size={plan['group']}", f"max_turns={plan['max_turns']}",
        f"max_new_tokens={plan['max_new_tokens']}", f"micro_batch={plan['micro_batch']}", "ppo_epochs=2",
        "lr=1e-6", "eval_episodes=0", "sample_episodes=0", "compare=false", f"checkpoint_every={plan['steps']}",
        f"schedule.anneal_steps={plan['steps']}"])
    run_dir = work / "train-run"
    stop = threading.Event()

    def forward_rows():   # each step's row as soon as the trainer has written it
        seen = 0
        while True:
            finished = stop.wait(1.0)
            found = [r for r in read_jsonl(run_dir / "metrics.jsonl")[0] if "loss" in r] \
                if (run_dir / "metrics.jsonl").is_file() else []
            for r in found[seen:]:
                rows("train", step=r.get("step"), **{k: r.get(k) for k in (
                    "time_rollout", "time_teacher", "time_recompute", "time_update", "mean_ratio", "clip_fraction",
                    "rollout_mismatch_mean", "rollout_mismatch_max", "cuda_peak_mib", "generated_tokens",
                    "prompt_tokens", "truncated_rate", "loss", "grad_norm")})
            seen = len(found)
            if finished:
                return

    watcher = threading.Thread(target=forward_rows, daemon=True)
    watcher.start()
    started = time.perf_counter()
    try:
        train(cfg, run_dir, str(dirs["student"]), str(dirs["teacher"]), log=lambda *a: None)
    finally:
        stop.set()
        watcher.join(timeout=10)
    rows("train", done=True, seconds=round(time.perf_counter() - started, 1), tasks=plan["tasks"],
         group=plan["group"], max_new_tokens=plan["max_new_tokens"], student=plan["student"], teacher=plan["teacher"])


# --- main ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny Qwen3 shapes on CPU (bf16 autocast)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cuda"), help="directory for the JSONL")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for all checks together")
    parser.add_argument("--only", default="", help="comma-separated checks to run (default: all)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("ATOD_EDGE_CACHE", tempfile.mkdtemp(prefix="atod-cache-"))
    import torch
    import transformers

    if not args.cpu and not torch.cuda.is_available():
        print("cuda_smoke: no CUDA device here; --cpu runs the same checks on CPU", file=sys.stderr)
        return 1
    plan = CPU if args.cpu else GPU
    machine = Machine(args.cpu)
    if args.cpu:
        torch.set_num_threads(1)   # on a shared 2-core machine more threads spin-wait (8x slower measured)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = Rows(Path(args.out) / f"cuda-smoke-{stamp}-{'cpu' if args.cpu else 'gpu'}.jsonl", str(machine.device))
    props = torch.cuda.get_device_properties(0) if machine.cuda else None
    rows("env", torch=torch.__version__, transformers=transformers.__version__, cuda=torch.version.cuda,
         gpu=props.name if props else None, gpu_gib=round(props.total_memory / 2**30, 1) if props else None,
         python=sys.version.split()[0], threads=torch.get_num_threads(), plan={k: v for k, v in plan.items()
                                                                           if k != "deadlines"})
    only = set(filter(None, args.only.split(",")))
    failed: list[str] = []
    models: dict = {}

    def run(name: str, fn) -> None:
        if only and name not in only:
            return
        left = args.budget - (time.perf_counter() - started)
        limit = min(plan["deadlines"][name], left)
        if limit < 2:
            rows(name, error="skipped: the run's budget is spent")
            failed.append(name)
            return
        t0 = time.perf_counter()
        try:
            with deadline(limit):
                fn()
        except Exception as e:   # Deadline included: one check's failure must not lose the others
            failed.append(name)
            rows(name, error=f"{type(e).__name__}: {e}"[:500], seconds=round(time.perf_counter() - t0, 1))

    def build_all():
        from atod_edge.engine.rollout_copy import rollout_copy

        models["student"] = build(plan["student"], machine, torch.float32)   # fp32 masters, as the trainer
        models["copy"] = rollout_copy(models["student"])
        models["teacher"] = build(plan["teacher"], machine, torch.bfloat16)
        rows("build", student=plan["student"], teacher=plan["teacher"], vocab=VOCAB,
             student_params=sum(p.numel() for p in models["student"].parameters()),
             teacher_params=sum(p.numel() for p in models["teacher"].parameters()),
             allocated_gib=machine.allocated_gib(), seconds=round(time.perf_counter() - started, 1))

    with tempfile.TemporaryDirectory(prefix="atod-cuda-smoke-") as tmp:
        run("build", build_all)
        if models:
            run("decode", lambda: check_decode(rows, machine, plan, models))
            run("sdpa_kernels", lambda: check_sdpa_kernels(rows, machine, plan, models))
            run("compaction", lambda: check_compaction(rows, machine, plan, models))
            run("teacher", lambda: check_teacher(rows, machine, plan, models))
            run("update", lambda: check_update(rows, machine, plan, models))
            run("resident", lambda: check_resident(rows, machine, plan, models))
            run("train", lambda: check_train(rows, machine, plan, Path(tmp), models))
    rows("done", seconds=round(time.perf_counter() - started, 1), failed=failed)
    print(f"cuda_smoke: {rows.count} rows in {rows.path}" + (f"; failed: {', '.join(failed)}" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
