"""The workstation-GPU path of training, tested on CPU (issue 26 items 1, 2, 3, 10) and the
per-term gradient norms (issue 29 item 1).

- torchrun + NCCL: each rank's GPU is made current before the process group exists, and "cuda"
  means the rank's GPU for the student, the teacher and the phase timings' synchronize
  (CUDA calls are recorded by monkeypatching: there is no GPU here);
- evaluation under torchrun: two gloo processes whose default group times out long before an
  evaluation (made slow by an env that sleeps) would end on one rank;
- Qwen3's thinking mode: a Qwen3-style chat template (written below) on the tiny tokenizer,
  chat_template_kwargs through the runner, evaluation, Agent, SFT demos and the trainer, and
  <think> blocks in parse_action;
- SFT keeps fp32 master weights of a bf16 checkpoint; gradient checkpointing is non-reentrant;
- grad_norm_opd / grad_norm_grpo / grad_cos_opd_grpo: two extra backward passes, linear in the
  advantages, logged every grad_norm_every steps.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from train_fixtures import metric_rows, overrides

from atod_edge.config import load_config
from atod_edge.engine.policy import Generation, Policy
from atod_edge.envs.household.env import HouseholdEnv
from atod_edge.errors import ConfigError
from atod_edge.prompts import encode_prompt, parse_action
from atod_edge.rollout.episode import Episode, Turn
from atod_edge.train.config import SFTConfig, TrainConfig
from atod_edge.train.distributed import DistInfo

# --- 1. torchrun + NCCL: the rank's GPU --------------------------------------------------------


def _fake_torchrun(monkeypatch, calls: list) -> None:
    """Rank 1 of 2 under torchrun, CUDA calls recorded instead of made."""
    import torch.distributed as dist

    import atod_edge.train.distributed as distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed, "_wait_groups", {}, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("synchronize", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: any(c[0] == "init_process_group" for c in calls))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init_process_group", kw)))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.append(("new_group", kw)) or object())


def test_init_distributed_makes_the_rank_gpu_current_before_nccl_starts(monkeypatch):
    from atod_edge.train.distributed import init_distributed

    calls: list = []
    _fake_torchrun(monkeypatch, calls)
    info = init_distributed("cuda")
    assert (info.rank, info.world, info.local_rank) == (1, 2, 1)
    names = [c[0] for c in calls]
    assert names.index("set_device") < names.index("init_process_group")
    assert dict(calls)["set_device"] in (1, torch.device("cuda", 1))
    init = dict(calls)["init_process_group"]
    assert init["backend"] == "nccl" and torch.device(init["device_id"]) == torch.device("cuda", 1)
    # and the gloo group for long waits (evaluation, rank 0's writes), with a timeout past NCCL's watchdog
    group = dict(calls)["new_group"]
    assert group["backend"] == "gloo" and group["timeout"] > timedelta(hours=1)


def test_placement_puts_student_and_teacher_on_the_rank_gpu(monkeypatch):
    import atod_edge.train.trainer as trainer

    calls: list = []
    _fake_torchrun(monkeypatch, calls)
    monkeypatch.setattr(trainer, "init_distributed", lambda device: DistInfo(1, 2, 1))
    for teacher_device, expected in (("cuda", "cuda:1"), ("", "cuda:1"), ("cuda:0", "cuda:0")):
        cfg = load_config(TrainConfig, None, ["device=cuda", f"teacher_device={teacher_device}", "tasks_per_step=2"])
        where = trainer.placement(cfg)
        assert where.device == "cuda:1"
        assert where.teacher_device == expected, teacher_device   # an explicit index is taken as given

    loaded = []
    import atod_edge.scoring.teacher as teacher_module

    monkeypatch.setattr(teacher_module, "load_teacher", lambda src, device, student_tokenizer, **_: loaded.append(device))
    cfg = load_config(TrainConfig, None, ["device=cuda", "teacher_device=cuda", "tasks_per_step=2"])
    trainer.make_teacher(cfg, "some-teacher", None, trainer.placement(cfg).teacher_device)
    assert loaded == ["cuda:1"]


def test_phase_timings_synchronize_the_rank_gpu(monkeypatch):
    from atod_edge.train.run_log import sync

    calls: list = []
    _fake_torchrun(monkeypatch, calls)
    sync("cuda:1")
    sync("cpu")
    assert calls == [("synchronize", torch.device("cuda", 1))]


# --- 2. evaluation under torchrun, past the default group's timeout ----------------------------

EVAL_SLEEP_ENV = "ATOD_EDGE_TEST_EVAL_SLEEP"


class SlowEvalHousehold(HouseholdEnv):
    """household whose eval-split episodes start slowly (ATOD_EDGE_TEST_EVAL_SLEEP seconds each)."""

    def reset(self, task):
        if task.split == "eval":
            time.sleep(float(os.environ.get(EVAL_SLEEP_ENV, "0")))
        return super().reset(task)


SLOW_ENV = f"{__name__}:SlowEvalHousehold"
# 4 eval episodes in batches of 2, 4 s each to start: 16 s on one rank, far past the 8 s timeout of
# the default group, in which the other rank used to wait; 8 s on each of two ranks
EVAL_RUN = overrides(env=SLOW_ENV, algo="grpo", steps=2, tasks_per_step=2, eval_every=1, eval_episodes=4,
                     eval_batch_episodes=2, grad_norm_every=0, sample_episodes=0)
DEFAULT_GROUP_TIMEOUT_S = 8


def _eval_worker(rank: int, port: int, run_dir: str, student: str) -> None:
    import torch.distributed as dist

    from atod_edge.train.trainer import train

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), **{EVAL_SLEEP_ENV: "4"})
    # the default group's timeout stands in for NCCL's 10-minute watchdog
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=DEFAULT_GROUP_TIMEOUT_S))
    train(load_config(TrainConfig, None, EVAL_RUN), run_dir, student, None, log=lambda *a: None)
    dist.destroy_process_group()


def test_two_ranks_share_a_slow_evaluation_and_log_the_one_process_result(atod_cache, tmp_path, one_thread):
    import torch.multiprocessing as mp

    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.evaluate.evaluate import EvalConfig, evaluate

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    mp.spawn(_eval_worker, args=(port, str(run_dir), "tiny-student"), nprocs=2, join=True)
    rows = metric_rows(run_dir)
    [row] = [r for r in rows if "eval_success" in r]
    assert row["step"] == 0 and len(row["eval_outcomes"]) == 4
    assert time.perf_counter() - started < 120

    # the row equals a one-process evaluation of the same weights (step 1's checkpoint)
    policy = TorchPolicy.load(str(run_dir / "checkpoints" / "step_000001"))
    cfg = load_config(TrainConfig, None, EVAL_RUN)
    summary, episodes = evaluate(policy, EvalConfig(env=SLOW_ENV, episodes=4, batch_episodes=2,
                                                    temperature=cfg.eval_temperature, seed=cfg.seed,
                                                    history_turns=cfg.history_turns,
                                                    max_new_tokens=cfg.max_new_tokens, max_turns=cfg.max_turns))
    assert row["eval_outcomes"] == [int(ep.success) for ep in episodes]
    assert row["eval_success"] == summary["success"] and row["eval_turns"] == summary["turns"]
    assert row["eval_score"] == summary["score"]


# --- 3. Qwen3 thinking mode ---------------------------------------------------------------------

# Qwen3's chat template, reduced to what matters here: ChatML turns, and with enable_thinking false
# an empty thinking block opened and closed in the generation prompt
QWEN3_STYLE_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}")
EMPTY_THINKING = "<think>\n\n</think>\n\n"
NO_THINKING = {"enable_thinking": False}


@pytest.fixture(scope="module")
def qwen3_style_tokenizer(atod_cache):
    from atod_edge.models.loading import load_tokenizer

    tokenizer = copy.deepcopy(load_tokenizer("tiny-student"))
    tokenizer.chat_template = QWEN3_STYLE_TEMPLATE
    return tokenizer


class ThinkingPolicy(Policy):
    """Replies like Qwen3: with thinking off (the empty block in the prompt) an action; otherwise a
    thinking block that quotes an action and is cut at the length limit before it closes."""

    name = "qwen3-like"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prompts: list[str] = []

    def generate(self, prompts, sampling, seed=None):
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            self.prompts.append(text)
            thinking_off = text.endswith(EMPTY_THINKING)
            reply = "<action>look</action>" if thinking_off else "<think>\nI could <action>look</action>"
            reply_ids = self.tokenizer(reply, add_special_tokens=False)["input_ids"]
            out.append(Generation(reply_ids, [-0.5] * len(reply_ids), reply, "stop" if thinking_off else "length"))
        return out


def test_parse_action_reads_only_what_follows_the_thinking():
    assert parse_action("<think>maybe <action>open door</action>?</think>\n<action>look</action>").action == "look"
    cut = parse_action("<think>\nI could <action>look</action>")   # generation stopped at </action>
    assert cut.action is None and "think" in cut.reason
    assert parse_action("the template opened it</think><action>look</action>").action == "look"
    assert parse_action("<THINK>x</Think> <action>look</action>").action == "look"
    assert parse_action("<think></think>\n<think>again").action is None
    assert parse_action("<action>look</action>").action == "look"   # no thinking: unchanged


def test_chat_template_kwargs_reach_the_template(qwen3_style_tokenizer):
    messages = [{"role": "system", "content": "Act."}, {"role": "user", "content": "You are in a room."}]
    thinking = qwen3_style_tokenizer.decode(encode_prompt(qwen3_style_tokenizer, messages))
    plain = qwen3_style_tokenizer.decode(encode_prompt(qwen3_style_tokenizer, messages, NO_THINKING))
    assert thinking.endswith("<|im_start|>assistant\n") and plain == thinking + EMPTY_THINKING


def test_rollouts_evaluation_agent_and_demos_pass_the_template_kwargs(qwen3_style_tokenizer):
    from atod_edge.envs import env_class
    from atod_edge.evaluate.evaluate import EvalConfig, evaluate
    from atod_edge.rollout.agent import Agent
    from atod_edge.rollout.runner import run_episodes
    from atod_edge.train.demos import build_examples

    policy = ThinkingPolicy(qwen3_style_tokenizer)
    tasks = env_class("household")().tasks("train", 2)
    thinking = run_episodes(policy, "household", tasks, max_turns=2)
    assert all(t.action is None and t.truncated for ep in thinking for t in ep.turns)   # Qwen3's default
    episodes = run_episodes(policy, "household", tasks, max_turns=2, chat_template_kwargs=NO_THINKING)
    assert all(t.action == "look" for ep in episodes for t in ep.turns)
    assert all(qwen3_style_tokenizer.decode(t.prompt_ids).endswith(EMPTY_THINKING) for ep in episodes for t in ep.turns)

    _, evaluated = evaluate(policy, EvalConfig(episodes=2, max_turns=2, chat_template_kwargs=NO_THINKING))
    assert all(t.action == "look" for ep in evaluated for t in ep.turns)
    with pytest.raises(ConfigError, match="chat_template_kwargs"):
        load_config(EvalConfig, None, ["chat_template_kwargs=yes"])

    agent = Agent(policy, chat_template_kwargs=NO_THINKING)
    agent.reset("You are in a kitchen. Your task is to look.")
    assert agent.act("You are in a kitchen.", ["look"]).action == "look"

    examples = build_examples(episodes, qwen3_style_tokenizer, "Act.", 2, NO_THINKING)
    assert examples and all(qwen3_style_tokenizer.decode(p).endswith(EMPTY_THINKING) for p, _ in examples)


def test_gpu_recipes_turn_qwen3_thinking_off_and_bad_kwargs_are_refused():
    for recipe in ("gpu-paper-household", "gpu-paper-shop", "gpu-paper-searchqa"):
        assert load_config(TrainConfig, recipe, []).chat_template_kwargs == NO_THINKING
    assert load_config(TrainConfig, None, []).chat_template_kwargs == {}
    assert load_config(SFTConfig, None, ["chat_template_kwargs.enable_thinking=false"]).chat_template_kwargs == \
        NO_THINKING
    for bad in ("chat_template_kwargs=5", "chat_template_kwargs=[a]"):
        with pytest.raises(ConfigError, match="chat_template_kwargs"):
            load_config(TrainConfig, None, [bad])


def test_progress_line_shows_the_truncation_rate_when_there_is_one(capsys):
    from atod_edge.train.run_log import print_progress

    row = {"success": 0.5, "reward": 0.5, "kappa": 1.0, "rho": 1.0, "mean_turn_weight": 1.0, "episodes": 4,
           "time_rollout": 1.0}
    print_progress(1, 2, 0, {**row, "truncated_rate": 0.25}, time.perf_counter())
    print_progress(2, 2, 0, {**row, "truncated_rate": 0.0}, time.perf_counter())
    first, second = capsys.readouterr().err.split("\r")[1:]
    assert "truncated 25.0%" in first and "truncated" not in second


# --- 10. SFT's fp32 master weights, non-reentrant gradient checkpointing -----------------------


def test_sft_trains_fp32_master_weights_of_a_bf16_checkpoint(atod_cache, tmp_path, monkeypatch, one_thread):
    """On an accelerator, load_model's default is the checkpoint's dtype: simulated here (the CPU
    default is fp32 anyway), sft must ask for fp32 itself."""
    import atod_edge.models.loading as loading
    from atod_edge.train.sft import train_sft

    model, tokenizer = loading.load_model("tiny-student")
    bf16 = tmp_path / "bf16-student"
    model.to(torch.bfloat16).save_pretrained(bf16)
    tokenizer.save_pretrained(bf16)
    accelerator_default = loading._torch_dtype
    monkeypatch.setattr(loading, "_torch_dtype",
                        lambda dtype, device: "auto" if dtype is None else accelerator_default(dtype, device))
    trained_dtypes = []
    real_load = loading.load_model

    def load_model(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        trained_dtypes.append({p.dtype for p in loaded[0].parameters()})
        return loaded

    monkeypatch.setattr(loading, "load_model", load_model)
    cfg = load_config(SFTConfig, None, [f"model={bf16}", f"out={tmp_path / 'sft'}", "demos=expert", "episodes=1",
                                        "epochs=1", "eval_episodes=0", "checkpoint_every=0", "warmup_steps=0"])
    out = train_sft(cfg, log=lambda *a: None)
    assert trained_dtypes[0] == {torch.float32}
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float32}


def test_gradient_checkpointing_is_not_reentrant(atod_cache, one_thread):
    from atod_edge.train.trainer import make_student, placement

    cfg = load_config(TrainConfig, None, ["gradient_checkpointing=true", "tasks_per_step=1"])
    student = make_student(cfg, "tiny-student", None, placement(cfg))
    functions = [m._gradient_checkpointing_func for m in student.model.modules()
                 if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")]
    assert functions and all(f.keywords.get("use_reentrant") is False for f in functions)


# --- issue 29: the gradient norm of each advantage term ----------------------------------------


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def _scored_episodes(model) -> list[Episode]:
    """Two groups of two 1-2-turn episodes over random tokens: lp_S the model's own (ratio 1),
    lp_T random, rewards that differ within each group."""
    from atod_edge.scoring.logprobs import response_logprobs

    gen = torch.Generator().manual_seed(3)
    episodes = []
    for i, (turns, reward) in enumerate([(2, 1.0), (1, 0.0), (1, 0.0), (2, 1.0)]):
        prompts = [torch.randint(1, 64, (4 + k,), generator=gen).tolist() for k in range(turns)]
        responses = [torch.randint(1, 64, (3,), generator=gen).tolist() for _ in range(turns)]
        with torch.no_grad():
            own = response_logprobs(model, prompts, responses)
        episodes.append(Episode(env="household", task_id=f"t{i // 2}", seed=0, split="train", reward=reward,
                                success=bool(reward), group=i // 2,
                                turns=[Turn(observation="o", prompt_ids=p, response_ids=r, student_logprobs=lp.tolist(),
                                            teacher_logprobs=(lp - torch.rand(len(r), generator=gen)).tolist())
                                       for p, r, lp in zip(prompts, responses, own)]))
    return episodes


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()])


def test_term_gradients_add_up_to_the_update_gradient_and_their_norms_are_logged(one_thread):
    from atod_edge.train.batch import build_batch
    from atod_edge.train.update import backward_with, update

    model = _tiny_llama()
    cfg = load_config(TrainConfig, None, ["micro_batch=2", "lr=1e-2", "max_grad_norm=0"])
    batch = build_batch(_scored_episodes(model), cfg, step=0)
    assert batch.opd_term is not None and batch.grpo_term is not None
    torch.testing.assert_close(batch.opd_term + batch.grpo_term, batch.advantages)

    grads = {}
    for name, advantages in (("opd", batch.opd_term), ("grpo", batch.grpo_term), ("all", batch.advantages)):
        model.zero_grad(set_to_none=True)
        backward_with(model, batch, advantages, cfg, DistInfo(), pad_id=0)
        grads[name] = _grads(model)
    model.zero_grad(set_to_none=True)
    # linear in the advantages (every ratio is 1 here, inside the clip range)
    torch.testing.assert_close(grads["all"], grads["opd"] + grads["grpo"], atol=1e-6, rtol=1e-5)

    before = copy.deepcopy(model)
    stats = update(model, torch.optim.AdamW(model.parameters(), lr=cfg.lr), batch, cfg, DistInfo(), 0,
                   grad_terms=True)
    assert stats["grad_norm_opd"] == pytest.approx(float(grads["opd"].norm()), rel=1e-5)
    assert stats["grad_norm_grpo"] == pytest.approx(float(grads["grpo"].norm()), rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(float(grads["all"].norm()), rel=1e-5)
    cosine = torch.nn.functional.cosine_similarity(grads["opd"], grads["grpo"], dim=0)
    assert stats["grad_cos_opd_grpo"] == pytest.approx(float(cosine), abs=1e-4)
    assert all(math.isfinite(stats[k]) and stats[k] > 0 for k in ("grad_norm_opd", "grad_norm_grpo"))

    # the extra passes leave the update itself alone: the same step without them, the same weights
    plain = update(before, torch.optim.AdamW(before.parameters(), lr=cfg.lr), batch, cfg, DistInfo(), 0)
    assert "grad_norm_opd" not in plain and plain["loss"] == pytest.approx(stats["loss"], rel=1e-6)
    for (name, a), b in zip(model.named_parameters(), before.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0, msg=name)


def test_without_a_teacher_term_the_opd_gradient_norm_is_zero(one_thread):
    from atod_edge.train.batch import build_batch
    from atod_edge.train.update import update

    model = _tiny_llama()
    cfg = load_config(TrainConfig, None, ["algo=grpo", "micro_batch=2"])
    batch = build_batch(_scored_episodes(model), cfg, step=0)
    assert batch.opd_term is None
    stats = update(model, torch.optim.AdamW(model.parameters(), lr=cfg.lr), batch, cfg, DistInfo(), 0,
                   grad_terms=True)
    assert stats["grad_norm_opd"] == 0.0 and stats["grad_norm_grpo"] > 0
    assert stats["grad_norm_grpo"] == pytest.approx(stats["grad_norm"], rel=1e-5)   # the whole update
    assert "grad_cos_opd_grpo" not in stats   # undefined


@pytest.fixture(scope="module")
def logged_run(small_teacher, tmp_path_factory):
    """3 ATOD steps with grad_norm_every=2 and chat_template_kwargs set, an evaluation after step 1;
    the enable_thinking of every chat template the run applied is recorded."""
    from transformers import PreTrainedTokenizerBase

    from atod_edge.train.trainer import train

    seen = []
    real = PreTrainedTokenizerBase.apply_chat_template

    def apply_chat_template(self, conversation, *args, **kwargs):
        seen.append(kwargs.get("enable_thinking", "unset"))
        return real(self, conversation, *args, **kwargs)

    cfg = load_config(TrainConfig, None, overrides(grad_norm_every=2, eval_every=1, eval_episodes=1) +
                      ["chat_template_kwargs.enable_thinking=false"])
    run_dir = tmp_path_factory.mktemp("grad-terms") / "run"
    stderr = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr):
            mp.setattr(PreTrainedTokenizerBase, "apply_chat_template", apply_chat_template)
            train(cfg, run_dir, "tiny-student", str(small_teacher), log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return Path(run_dir), seen


def test_term_gradient_norms_are_logged_every_n_steps(logged_run):
    run_dir, _ = logged_run
    rows = [r for r in metric_rows(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows:
        keys = {"grad_norm_opd", "grad_norm_grpo", "grad_cos_opd_grpo"} & set(row)
        if row["step"] % 2 == 0:
            assert {"grad_norm_opd", "grad_norm_grpo"} <= keys, row["step"]
            assert row["grad_norm_opd"] > 0 and row["grad_norm_grpo"] >= 0
            assert math.isfinite(row["grad_norm_opd"]) and math.isfinite(row["grad_norm_grpo"])
            # the cosine where both terms have a gradient (a group whose rewards tie has no GRPO signal)
            if row["grad_norm_grpo"] > 0:
                assert -1.0 <= row["grad_cos_opd_grpo"] <= 1.0
        else:
            assert not keys


def test_the_trainer_passes_the_template_kwargs_to_rollouts_and_evaluation(logged_run):
    _, seen = logged_run
    # every prompt of the rollouts (3 steps x 2 episodes) and of the evaluation after step 1
    assert len(seen) >= 7 and set(seen) == {False}


def test_bf16_rollouts_decode_a_bf16_copy_refreshed_after_every_update(small_teacher, tmp_path):
    """Issue 26 item 4, the trainer's half: under precision=bf16 the rollouts decode a bf16 copy of the
    student (not the fp32 master weights), the copy is refreshed after each update to equal the master
    rounded to bf16, and teacher scoring gets the configured token budget."""
    import atod_edge.engine.rollout_copy as rollout_copy_module
    import atod_edge.scoring.teacher as teacher_module
    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.train.trainer import train

    decoded_dtypes, refreshed, budgets = [], [], []
    real_generate, real_refresh = TorchPolicy.generate, rollout_copy_module.refresh_rollout_copy
    real_score = teacher_module.score_episodes

    def generate(self, *args, **kwargs):
        decoded_dtypes.append(next(self.model.parameters()).dtype)
        return real_generate(self, *args, **kwargs)

    def refresh(src, dst):
        real_refresh(src, dst)
        refreshed.append(all(torch.equal(p.detach().to(torch.bfloat16), dict(dst.named_parameters())[n])
                             for n, p in src.named_parameters()))

    def score(teacher, episodes, **options):
        budgets.append(options.get("token_budget"))
        return real_score(teacher, episodes, **options)

    cfg = load_config(TrainConfig, None, overrides(steps=2, eval_episodes=0) +
                      ["precision=bf16", "score_token_budget=512"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(TorchPolicy, "generate", generate)
            mp.setattr(rollout_copy_module, "refresh_rollout_copy", refresh)
            mp.setattr(teacher_module, "score_episodes", score)
            train(cfg, tmp_path / "run", "tiny-student", str(small_teacher), log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    assert decoded_dtypes and set(decoded_dtypes) == {torch.bfloat16}
    assert refreshed == [True, True]          # after each of the 2 updates
    assert budgets == [512, 512]
