"""benchmarks/smollm2_cut_curve.py's pre-registered rule (PLAN.md, step 2) and its report; the failure report
of benchmarks/episode_failures.py."""

from __future__ import annotations

import pytest
from bench_loader import load_benchmark


def row(layers: int, success: float) -> dict:
    return {"layers": layers, "params": layers * 1e6, "success": success, "success_ci95": [0.0, 1.0],
            "turns": 10.0, "invalid_rate": 0.1, "tokens_per_s": 100.0}


def test_the_rule_takes_the_fewest_layers_that_win_enough_and_none_when_no_cut_does(tmp_path):
    curve = load_benchmark("smollm2_cut_curve")
    assert curve.choose({"every:2": row(16, 0.30), "every:3": row(11, 0.05), "every:5": row(7, 0.04)}) == "every:3"
    assert curve.choose({"every:2": row(16, 0.30), "every:3": row(11, 0.01)}) == "every:2"
    assert curve.choose({"every:2": row(16, 0.0), "every:3": row(11, 0.049)}) is None
    state = {"teacher": "t", "teacher_valid": row(30, 0.5), "chosen": "every:3",
             "curve": {"every:2": row(16, 0.3), "every:3": row(11, 0.05), "every:5": row(7, 0.0)}}
    curve.render(state, tmp_path)
    text = (tmp_path / "cut_curve.md").read_text()
    assert "| cut every:3 | 11 | 11.0M | 5.0% |" in text and "**every:3**" in text and "| teacher | 30 |" in text


def test_failure_report_puts_every_failed_episode_in_one_stage(tmp_path):
    from atod_edge.envs import env_class, env_tasks
    from atod_edge.rollout.episode import write_episodes
    from atod_edge.rollout.runner import run_scripted

    failures = load_benchmark("episode_failures")
    env_cls = env_class("household")
    episodes = run_scripted("random", env_cls, env_tasks(env_cls, "valid", 6), seed=0, max_turns=6)
    episodes += run_scripted("expert", env_cls, env_tasks(env_cls, "valid", 2), seed=0)
    write_episodes(tmp_path / "e.jsonl", episodes)
    result = failures.analyse(tmp_path / "e.jsonl")
    failed = sum(not ep.success for ep in episodes)
    assert result["episodes"] == 8 and result["failed"] == failed >= 6
    assert sum(result["stages"].values()) == failed
    assert sum(n for _, n in result["families"].values()) == 8
    assert sum(won for won, _ in result["families"].values()) == 8 - failed
    assert "by the first stage they never passed" in failures.markdown({"x": result})


def test_the_table_pairs_models_by_task_and_leaves_missing_ones_blank(tmp_path):
    import json

    table = load_benchmark("smollm2_table")

    def evaluation(successes: list[int], order: list[int] | None = None) -> dict:
        order = order or list(range(len(successes)))
        n = len(successes)
        summary = {"success": sum(successes) / n, "success_ci95": [0.0, 1.0], "turns": 9.0, "invalid_rate": 0.1}
        episodes = {"task_id": [f"household/{{split}}/{i}" for i in order], "success": [successes[i] for i in order]}
        return {split: {"summary": summary, "episodes": {k: [v.replace("{split}", split) if isinstance(v, str) else v
                                                               for v in vs] for k, vs in episodes.items()}}
                for split in ("eval", "unseen")}

    models = tmp_path / "models" / "household"
    models.mkdir(parents=True)
    (models / "cold-start.json").write_text(json.dumps(evaluation([0, 0, 1, 0])))
    (models / "teacher.json").write_text(json.dumps(evaluation([1, 1, 1, 0])))
    assert table.main([str(tmp_path), "--out", str(tmp_path), "--name", "t"]) == 0
    text = (tmp_path / "t.md").read_text()
    assert "| ATOD student | — |" in text and "teacher - cold start: **+50.0 points" in text
    run = tmp_path / "runs" / "household-atod-s0"
    run.mkdir(parents=True)
    # listed in another order: pairing goes by task id, not by position
    (run / "final_eval.json").write_text(json.dumps(evaluation([1, 0, 1, 1], order=[3, 2, 1, 0])))
    table.main([str(tmp_path), "--out", str(tmp_path), "--name", "t"])
    result = json.loads((tmp_path / "t.json").read_text())
    atod_cold = result["paired"]["eval"]["ATOD student - cold start"]
    assert atod_cold["n"] == 4 and abs(atod_cold["mean"] - 0.5) < 1e-9 and atod_cold["discordant"] == 2
    assert abs(result["paired"]["unseen"]["ATOD student - teacher"]["mean"]) < 1e-9


def test_cpu_kernel_benchmark_runs_each_variant():
    """bench_cpu_kernels: the head in both matmul modes and on bf16 operands, both log-sum-exps and the three
    attentions run at the SmolLM2 cut's shapes (a wrong shape or a missing op would raise here)."""
    bench = load_benchmark("bench_cpu_kernels")
    rows = bench.head_rows(1) + bench.attention_rows(1)
    assert [r["variant"] for r in rows] == ["IEEE fp32", "oneDNN bf16 mode",
                                           "for scale: bf16 weight and input, bf16 out", "torch.logsumexp",
                                           "in place (log_sum_exp_)", "transformers SDPA (repeat_kv), bf16",
                                           "folded SDPA, bf16", "folded SDPA in fp32"]
    assert all(r["ms"] > 0 for r in rows)


def test_the_step_floor_counts_each_shared_token_once_and_each_decode_step(tiny_student):
    """bench_smollm2_step's floor: a trie of the turns counts every shared prefix token once, and
    the rollout's decode steps are one per token position after the first of every generate call
    (turn index), over the rows still decoding, each at least its bytes over the bandwidth."""
    from atod_edge.rollout.episode import Episode, Turn

    bench = load_benchmark("bench_smollm2_step")
    shared = list(range(10, 30))                                    # 20 tokens every sequence starts with
    tokens, pairs = load_benchmark("machine_bounds").trie_work([shared + [1, 2], shared + [1, 3], shared + [4], []],
                                                                min_shared=1)
    assert tokens == 20 + 1 + 1 + 1 + 1                            # 1 after the fork, then 2 / 3, and 4
    assert pairs == sum(range(1, 23)) + 22 + 21       # A's positions 0..21, then B's position 21 and C's 20

    model, _ = tiny_student

    def episode(lengths):
        return Episode("household", "t", 0, "train", turns=[
            Turn("o", prompt_ids=list(range(5)), response_ids=list(range(n))) for n in lengths])

    # turn 0: rows decode 4 and 2 tokens -> 3 steps; turn 1: 3 tokens -> 2 steps (one row)
    episodes = [episode([4, 3]), episode([2])]
    slow, steps = bench.decode_floor_seconds(episodes, model, bandwidth_gb_s=1e-3, peak_gflop_s=1e9)
    fast, _ = bench.decode_floor_seconds(episodes, model, bandwidth_gb_s=1e-2, peak_gflop_s=1e9)
    assert steps == 5
    assert slow == pytest.approx(10 * fast)                         # memory-bound here: bytes / bandwidth


def test_the_kernel_floor_times_the_linear_layers_and_attention(tiny_student):
    bench = load_benchmark("bench_rollout")
    model, _ = tiny_student
    floor = bench.kernel_floor_ms(model, batch=4, context=32, steps=2, repeats=1)
    assert floor["linear"] > 0 and floor["attention"] > 0
    assert floor["total"] == pytest.approx(floor["linear"] + floor["attention"])
