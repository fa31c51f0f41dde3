"""benchmarks/bench_llamacpp_builds.py and the llama.cpp build features bench_rollout records: the
features are read from llama.cpp's own system info, the bf16 GGUF really holds bf16 weights, and
one build's measurement times llama.cpp on each GGUF and the engine in the same process."""

from __future__ import annotations

import math

from bench_loader import load_benchmark


def test_simd_flags_are_the_features_llama_cpp_reports_as_built():
    import llama_cpp

    bench = load_benchmark("bench_rollout")
    assert bench.simd_flags("CPU : SSE3 = 1 | AVX512 = 0 | AVX2 = 1 | LLAMAFILE = 1 | ") == ["SSE3", "AVX2", "LLAMAFILE"]
    info = llama_cpp.llama_print_system_info().decode()
    flags = bench.llama_cpp_simd()
    assert flags and all(f"{flag} = 1" in info for flag in flags)


def test_one_build_times_llama_cpp_on_f16_and_bf16_ggufs_beside_the_engine(atod_cache, tiny_student, tmp_path):
    from atod_edge.export.gguf import tensor_types
    from atod_edge.export.pipeline import export_model

    bench = load_benchmark("bench_llamacpp_builds")
    export_model("tiny-student", tmp_path, onnx=False, gguf_quants=["f16"], verify=False)
    f16 = tmp_path / "agent.f16.gguf"
    bf16 = bench.bf16_gguf(f16, tmp_path / "agent.bf16.gguf")
    weights = {name: kind for name, kind in tensor_types(bf16).items() if name.endswith(".weight")
               and "norm" not in name}
    assert weights and set(weights.values()) == {"BF16"}

    _, tokenizer = tiny_student
    ids = tokenizer("go to the kitchen and open the fridge")["input_ids"]
    result = bench.measure("tiny-student", [ids, ids[:5]], {"f16 GGUF": f16, "bf16 GGUF": bf16}, steps=2, repeats=1)
    assert set(result["step_ms"]) == {"llama.cpp f16 GGUF", "llama.cpp bf16 GGUF", "engine bf16 copy", "engine fp32"}
    assert all(math.isfinite(ms) for ms in result["step_ms"].values())
    assert result["simd"] == load_benchmark("bench_rollout").llama_cpp_simd()
