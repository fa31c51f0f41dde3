"""Would llama.cpp decode the rollouts faster than the engine? Its decode step at batch 16, built
as the README installs it and built for this CPU, beside the engine's, against the bound.

The README builds llama-cpp-python with -DGGML_NATIVE=OFF (a portable build: AVX2, no AVX-512),
so the llama.cpp rows of bench_rollout.py are that build's. This benchmark also takes builds
installed elsewhere (`--build DIR`: a `pip install --target DIR` of llama-cpp-python), e.g. one
made with -DGGML_NATIVE=ON for this CPU's AVX-512 BF16:

    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON" pip install --no-deps --no-cache-dir \\
        --target DIR llama-cpp-python==0.3.36
    OMP_NUM_THREADS=2 taskset -c 0,1 python benchmarks/bench_llamacpp_builds.py --build DIR

Each build runs in its own process (a process can load one libllama), on the same 16 prompts
(the last-turn prompts of household episodes the engine played, saved once): llama.cpp on the
model's f16 GGUF export and on a bf16 one (the installed build's llama_model_quantize, once), one
llama_decode a step over the 16 sequences (bench_rollout.LlamaCppBatchPolicy, f16 KV cache), and
in the same process the engine on the model's bf16 rollout copy and in fp32, as the reference
each build is compared with. A step's time is bench_rollout.decode_step_ms (every row decoding,
the best of 3). The bound: bf16/f16 weights and KV (fp32 for the fp32 engine) read once a step
at the measured memory bandwidth (machine_bounds). Each build's SIMD flags (llama_print_system_info) are recorded.

Writes benchmarks/results/llamacpp_builds.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import machine_bounds  # noqa: E402

from atod_edge.io import atomic_path, atomic_write_json, cache_dir  # noqa: E402

OUT = Path(__file__).parent / "results" / "llamacpp_builds.json"


def bf16_gguf(f16: Path, out: Path) -> Path:
    """`out`, the f16 GGUF's weights converted to bf16 by llama.cpp (made when missing or older
    than the f16 file). Not export.gguf.quantize_gguf: bf16 is not one of the export's types."""
    import llama_cpp

    if not out.is_file() or out.stat().st_mtime < f16.stat().st_mtime:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_BF16
        with atomic_path(out) as tmp:
            if llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params) != 0:
                raise RuntimeError(f"llama.cpp could not write {out}")
    return out


def measure(model_src: str, prompts: list[list[int]], ggufs: dict[str, Path], steps: int, repeats: int) -> dict:
    """ms per decode step: llama.cpp on each GGUF, then the engine (bf16 copy, fp32), in this process."""
    import llama_cpp
    import torch

    import bench_rollout
    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.engine.rollout_copy import rollout_copy
    from atod_edge.models.loading import load_model

    model, tokenizer = load_model(model_src)
    model.eval()
    info = llama_cpp.llama_print_system_info().decode()
    result = {"llama_cpp": llama_cpp.__file__, "simd": bench_rollout.simd_flags(info), "system_info": info.strip(),
              "threads": torch.get_num_threads(), "step_ms": {}}
    for name, path in ggufs.items():
        policy = bench_rollout.LlamaCppBatchPolicy(str(path), tokenizer, n_threads=torch.get_num_threads())
        try:
            result["step_ms"][f"llama.cpp {name}"] = bench_rollout.decode_step_ms(policy, prompts, steps, repeats)["wall"]
        finally:
            policy.close()
    for name, policy in (("engine bf16 copy", TorchPolicy(rollout_copy(model), tokenizer, precision="bf16")),
                         ("engine fp32", TorchPolicy(model, tokenizer))):
        result["step_ms"][name] = bench_rollout.decode_step_ms(policy, prompts, steps, repeats)["wall"]
    return result


def fractions(step_ms: dict[str, float], bound_ms: float, bound32_ms: float) -> dict[str, float]:
    """Each row's bound / its step time: the fp32 engine against fp32 weights and KV, the rest
    against 16-bit ones."""
    return {k: (bound32_ms if k == "engine fp32" else bound_ms) / v for k, v in step_ms.items()}


def engine_prompts(model, tokenizer, batch: int) -> list[list[int]]:
    """The last-turn prompts of `batch` household eval episodes the engine plays (3 turns, 48 tokens)."""
    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.engine.sampling import SamplingParams
    from atod_edge.envs import env_class
    from atod_edge.rollout.runner import run_episodes

    env_cls = env_class("household")
    episodes = run_episodes(TorchPolicy(model, tokenizer), env_cls, env_cls().tasks("eval", batch),
                            sampling=SamplingParams(max_new_tokens=48, temperature=1.0), max_turns=3, seed=0)
    return [list(ep.turns[-1].prompt_ids) for ep in episodes if ep.turns][:batch]


def child(args) -> int:
    """One build's measurements (run with that build first on sys.path), printed as JSON."""
    spec = json.loads(Path(args.child).read_text())
    ggufs = {"f16 GGUF": Path(spec["f16"]), "bf16 GGUF": Path(spec["bf16"])}
    print(json.dumps(measure(spec["model"], spec["prompts"], ggufs, spec["steps"], spec["repeats"])))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: the SmolLM2 cut bench_rollout.py builds)")
    parser.add_argument("--build", action="append", default=[],
                        help="a directory holding another llama-cpp-python build (pip install --target); repeatable")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "atod-bench"))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import bench_rollout

    model = args.model or str(cache_dir() / "bench" / "smollm2-135m-every3")
    if args.model is None:
        why = bench_rollout.ensure_smollm2_cut(Path(model), print)
        if why:
            raise SystemExit(f"bench_llamacpp_builds: no SmolLM2 cut: {why}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    f16 = bench_rollout.export_gguf(model, work / f"gguf-{Path(model).name}", print)
    if f16 is None:
        raise SystemExit(f"bench_llamacpp_builds: {model} did not export to GGUF")
    bf16 = bf16_gguf(f16, f16.with_name("agent.bf16.gguf"))   # by the installed build, once for every build

    from atod_edge.models.loading import load_model

    loaded, tokenizer = load_model(model)
    loaded.eval()
    prompts = engine_prompts(loaded, tokenizer, args.batch)
    context = sum(map(len, prompts)) / len(prompts) + (1 + args.steps) / 2
    bandwidth = machine_bounds.memory_bandwidth(1024, repeats=3)
    cost = machine_bounds.decode_step_cost(loaded, len(prompts), context, weight_bytes=2, kv_bytes=2)
    cost32 = machine_bounds.decode_step_cost(loaded, len(prompts), context)
    # the memory-bandwidth bound: the bytes a step reads at the measured bandwidth (no compute term)
    bound_ms = machine_bounds.bound(cost, bandwidth["gb_s"], math.inf)["memory_ms"]
    bound32_ms = machine_bounds.bound(cost32, bandwidth["gb_s"], math.inf)["memory_ms"]
    spec = work / "llamacpp_builds_spec.json"
    spec.write_text(json.dumps({"model": model, "prompts": prompts, "f16": str(f16), "bf16": str(bf16),
                                "steps": args.steps, "repeats": args.repeats}))
    builds = []
    for build in [""] + args.build:   # "": the llama-cpp-python the project installed
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [build, os.environ.get("PYTHONPATH")]))}
        done = subprocess.run([sys.executable, __file__, "--child", str(spec)], env=env, capture_output=True,
                              text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"bench_llamacpp_builds: the build at {build or 'the venv'} failed: "
                             f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["build"] = build or "installed (README: -DGGML_NATIVE=OFF)"
        row["fraction_of_bound"] = fractions(row["step_ms"], bound_ms, bound32_ms)
        builds.append(row)
        print(f"{row['build']}: SIMD {' '.join(row['simd'])}")
        for k, v in row["step_ms"].items():
            print(f"  {k}: {v:.1f} ms a step ({row['fraction_of_bound'][k]:.0%} of its bound)")
    result = {"command": "OMP_NUM_THREADS=2 taskset -c 0,1 python benchmarks/bench_llamacpp_builds.py"
                         + "".join(" --build DIR" for _ in args.build),
              "model": model, "batch": len(prompts), "steps": args.steps, "mean_context": context,
              "load_average": machine_bounds.load_average(), "bandwidth": bandwidth, "cost_16bit": cost,
              "bound_ms": bound_ms, "cost_fp32": cost32, "bound_fp32_ms": bound32_ms, "builds": builds}
    atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
