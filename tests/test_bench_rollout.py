"""benchmarks/bench_rollout.py: its batched HF generate baseline plays the same episodes and
turns as the engine, one generate call per turn over every live episode, and cuts responses
where the engine would; its fixed-length decode timing keeps every row decoding."""

from __future__ import annotations

from bench_loader import load_benchmark

def test_batched_generate_plays_the_engines_episodes_one_call_per_turn(tiny_student):
    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.engine.sampling import SamplingParams, StopChecker
    from atod_edge.envs import env_class
    from atod_edge.rollout.runner import run_episodes

    bench = load_benchmark("bench_rollout")
    model, tokenizer = tiny_student
    env_cls = env_class("household")
    tasks = env_cls().tasks("eval", 4)
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0)
    engine = run_episodes(TorchPolicy(model, tokenizer), env_cls, tasks, sampling=sampling, max_turns=2)

    hf = bench.HFGeneratePolicy(model, tokenizer)
    calls = []
    generate = hf.generate
    hf.generate = lambda prompts, *a, **k: calls.append(len(prompts)) or generate(prompts, *a, **k)
    baseline = run_episodes(hf, env_cls, tasks, sampling=sampling, max_turns=2)

    assert [(e.task_id, len(e.turns)) for e in baseline] == [(e.task_id, len(e.turns)) for e in engine]
    assert calls[0] == len(tasks) and sum(calls) == sum(len(e.turns) for e in baseline)
    checker = StopChecker(tokenizer, sampling)
    for turn in (t for e in baseline for t in e.turns):
        ids = list(turn.response_ids)
        assert 1 <= len(ids) <= sampling.max_new_tokens
        assert all(checker.is_done(ids[:k]) is None for k in range(1, len(ids)))   # cut where the engine stops
        assert checker.is_done(ids) is not None


def test_fixed_length_decode_timing_keeps_every_row(tiny_student):
    from atod_edge.engine.policy import TorchPolicy

    bench = load_benchmark("bench_rollout")
    model, tokenizer = tiny_student
    policy = TorchPolicy(model, tokenizer)
    ids = tokenizer("go to the kitchen")["input_ids"]
    ms = bench.decode_step_ms(policy, [ids, ids[:3]], steps=3, repeats=1)   # asserts no row stops early
    assert ms == ms and policy.tokenizer is tokenizer


def test_position_counter_counts_what_each_forward_computes(tiny_student):
    """PositionCounter: batched generate computes every row at the batch's width and then one
    position per row per step until the last row stops; the engine, with no prefix to reuse in
    a fresh scope, computes the distinct prompts' own lengths padded within a length bucket and
    then only the rows still decoding. The counter leaves the model as it found it."""
    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.engine.sampling import SamplingParams

    bench = load_benchmark("bench_rollout")
    model, tokenizer = tiny_student
    prompts = [tokenizer("go to the kitchen")["input_ids"], tokenizer("open the fridge and look")["input_ids"]]
    sampling = SamplingParams(max_new_tokens=5, temperature=1.0, stop=())
    hf = bench.HFGeneratePolicy(model, tokenizer)
    with bench.PositionCounter(model) as counter:
        out = hf.generate(prompts, sampling, seed=0)
    steps = max(len(g.token_ids) for g in out)
    width = max(map(len, prompts))
    assert counter.positions == len(prompts) * width + len(prompts) * (steps - 1)
    assert "forward" not in vars(model)

    policy = TorchPolicy(model, tokenizer, prefix_cache_mb=0)
    with bench.PositionCounter(model) as counter:
        out = policy.generate(prompts, sampling, seed=0)
    lengths = sorted(len(g.token_ids) for g in out)
    decoded = sum(sum(1 for n in lengths if n > k) for k in range(1, lengths[-1]))   # rows live at each step
    assert sum(map(len, prompts)) <= counter.positions - decoded <= len(prompts) * width


def test_kernels_in_context_finds_the_decode_steps_linear_and_attention_ops(tiny_student):
    """kernels_in_context_ms attributes a real decode step's time to the op names kernel_floor_ms
    times alone: a torch or kernel rename would leave them at zero and the breakdown meaningless."""
    from atod_edge.engine.policy import TorchPolicy

    bench = load_benchmark("bench_rollout")
    model, tokenizer = tiny_student
    ids = tokenizer("go to the kitchen and open the fridge")["input_ids"]
    ms = bench.kernels_in_context_ms(TorchPolicy(model, tokenizer), [ids, ids[:4], ids[:6]], steps=4)
    assert ms["linear"] > 0 and ms["attention"] > 0 and ms["other"] > 0


def test_rollout_plot_draws_every_model_that_ran(tmp_path):
    """plot_rollout writes rollout.png from a result's rows; a skipped model is left out."""
    bench = load_benchmark("bench_rollout")
    rows = [{"mode": mode, "episodes_per_s": rate} for mode, rate in
            (("batched-generate", 2.0), ("engine", 5.0), ("engine-bf16", 9.0), ("per-episode", 0.5))]
    result = {"machine": {"torch_threads": 1},
              "models": {"a": {"rows": rows, "work_ratio_vs_batched_generate": 2.5},
                         "b": {"skipped": "no download"}}}
    bench.plot_rollout(result, tmp_path / "rollout.png")
    assert (tmp_path / "rollout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rollout.png"]      # no temporary file left
