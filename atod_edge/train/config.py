"""The training package's configs, typed dataclasses filled from YAML recipes and --set overrides
(atod_edge/config.py): TrainConfig for `atod-edge train` (its `schedule:` section is
schedule.ScheduleConfig, beside the formulas it feeds) and SFTConfig for `atod-edge sft` and the
bootstrap. Read by trainer.py, pipeline.py and sft.py; validated here, once, at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass

from atod_edge.config import MAX_NEW_TOKENS, SEED_MAX, nested, opt
from atod_edge.errors import ConfigError
from atod_edge.prompts import check_template_kwargs
from atod_edge.train.schedule import ScheduleConfig


@dataclass
class BootstrapOptions:
    """How the default job makes its teacher and cold-start student when none is given."""

    teacher_preset: str = opt("tiny-teacher", "preset the teacher is fine-tuned from")
    teacher_demos: str = opt("noisy", "teacher demonstrations: expert | noisy | dart | FILE.jsonl")
    teacher_noise: float = opt(0.3, "noisy demos: chance of a random admissible action", min=0.0, max=1.0)
    teacher_episodes: int = opt(300, "teacher demonstration episodes", min=1)
    teacher_epochs: int = opt(2, "teacher SFT epochs", min=1)
    teacher_lr: float = opt(1e-3, "teacher SFT learning rate", min=0.0)
    teacher_batch_size: int = opt(16, "teacher SFT turns per optimizer step", min=1)
    teacher_prompt_loss_weight: float = opt(0.0, "teacher SFT: weight of the LM loss on prompt tokens", min=0.0)
    student_preset: str = opt("tiny-student", "preset the cold-start student is fine-tuned from")
    student_from_teacher: str = opt("", "cut the student from the teacher instead, keeping these decoder "
                                    "layers (e.g. '0,3'; see `models shrink`); empty: use student_preset")
    student_demos: str = opt("noisy", "cold-start demonstrations: expert | noisy | dart | FILE.jsonl")
    student_noise: float = opt(0.3, "noisy demos for the cold start", min=0.0, max=1.0)
    student_episodes: int = opt(30, "cold-start demonstration episodes (few: a weak start)", min=1)
    student_epochs: int = opt(1, "cold-start SFT epochs", min=1)
    student_lr: float = opt(1e-3, "cold-start SFT learning rate", min=0.0)
    student_batch_size: int = opt(16, "cold-start SFT turns per optimizer step", min=1)
    student_prompt_loss_weight: float = opt(0.0, "cold-start SFT: weight of the LM loss on prompt tokens",
                                            min=0.0)


@dataclass
class LoraOptions:
    """LoRA adapters through peft (optional extra `lora`), for students too large to fine-tune whole."""

    rank: int = opt(0, "LoRA rank r (0 = off: every weight of the student is trained)", min=0)
    alpha: float = opt(16.0, "LoRA alpha: the adapter update is scaled by alpha / rank", min=0.0)
    dropout: float = opt(0.0, "dropout on the adapters' input (training only)", min=0.0, max=1.0)
    target_modules: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                    "modules that get adapters (default: the attention and MLP projections "
                                    "of Llama/Qwen/Mistral)")


@dataclass
class TrainConfig:
    algo: str = opt("atod", "atod | opd (kappa=1, rho=0, w=1) | grpo (kappa=0, rho=1)",
                    choices=["atod", "opd", "grpo"])
    env: str = opt("household", "environment name or pkg.module:Class")
    teacher: str = opt("auto", "teacher checkpoint dir, preset or zoo name, or a .gguf file (scored by llama.cpp, "
                       "float32 KV cache); auto = bootstrap by SFT (cached)")
    student: str = opt("auto", "student checkpoint dir or preset; auto = cold-start by SFT (cached)")
    device: str = opt("cpu", "student device: cpu, cuda, cuda:0 (bf16 autocast on CUDA)")
    teacher_device: str = opt("", "teacher device (empty: same as the student)")
    precision: str = opt("auto", "compute precision: auto (bf16 on CUDA, fp32 on CPU) | bf16 (bf16 autocast, CPU "
                         "too; FSDP2: a MixedPrecisionPolicy) | fp32. The trained weights are fp32 master weights "
                         "whatever the checkpoint's dtype (AdamW steps at lr 1e-6 round away in bf16); the frozen "
                         "teacher keeps its checkpoint's dtype on accelerators", choices=["auto", "bf16", "fp32"])
    steps: int = opt(150, "training steps (one optimizer round over one batch of rollouts)", min=1)
    tasks_per_step: int = opt(16, "B: tasks per step", min=1)
    group_size: int = opt(8, "G: rollouts per task (a GRPO group)", min=1, max=4096)
    lr: float = opt(1e-6, "AdamW learning rate", min=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0.0)
    warmup_steps: int = opt(0, "linear learning-rate warmup steps", min=0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)", min=0.0)
    ppo_epochs: int = opt(1, "passes over each batch (1: ratio = 1, plain policy gradient)", min=1)
    micro_batch: int = opt(16, "turns per forward/backward pass (gradient accumulation)", min=1)
    score_token_budget: int = opt(0, "teacher scoring: tokens per no-grad forward (padded rows x width, or the "
                                  "prefix tree's tokens); 0 = micro_batch turns a forward. The old-log-prob "
                                  "recompute keeps the update's micro-batches (a ratio of exactly 1)", min=0)
    prefix_reuse: bool = opt(True, "teacher scoring and the update compute the prompt prefixes a micro-batch's "
                             "turns share once (same log-probs and gradients); false: every turn on its own")
    eps_clip: float = opt(0.2, "PPO clip range", min=0.0)
    recompute_old_logprobs: str = opt("auto", "recompute lp_S with the update's own forward before the first "
                                      "epoch (verl's old log-probs): the rollout's cached bf16 decode gives other "
                                      "log-probs than the training forward, so the first ratio would not be 1 and "
                                      "lp_T - lp_S would carry the difference. auto: when computing in bf16 | "
                                      "always | never. The rollout-vs-training mismatch is logged per step",
                                      choices=["auto", "always", "never"])
    tis_cap: float = opt(0.0, "truncated importance sampling: weight each token's loss by "
                         "min(pi_old / pi_rollout, tis_cap), correcting for the rollout engine's numerics (needs "
                         "the recomputed lp_S); 0 = off (verl uses 2)", min=0.0)
    weights: str = opt("tdur", "OPD weights: tdur (turn-level soft OR) | uniform | token (token-level) | "
                       "disagreement | uncertainty",
                       choices=["tdur", "uniform", "token", "disagreement", "uncertainty"])
    invalid_penalty: float = opt(0.1, "reward penalty per invalid action", min=0.0)
    temperature: float = opt(1.0, "rollout temperature", min=0.0)
    top_p: float = opt(1.0, "rollout nucleus threshold", min=0.0, max=1.0)
    max_new_tokens: int = opt(48, "max response tokens per turn (paper: 512)", min=1, max=MAX_NEW_TOKENS)
    truncated_turns: str = opt("train", "turns whose response reached max_new_tokens (recorded as finish_reason "
                               "'length'): train (like any turn: the cut response rarely holds a parsable action, "
                               "so the invalid penalty applies, and its tokens get their advantages) | mask (their "
                               "tokens get no loss; the episode's reward still counts the turn)",
                               choices=["train", "mask"])
    history_turns: int = opt(2, "past turns shown in the prompt", min=0)
    max_turns: int = opt(0, "turn limit per episode (0: the env's default)", min=0)
    env_step_timeout: float = opt(60.0, "seconds an env's reset/step may take before its episode ends as an "
                                  "error (0: no limit); training rollouts and evaluations alike", min=0.0)
    max_prompt_tokens: int = opt(0, "prompt token budget (0: the model's context less max_new_tokens); longer "
                                 "prompts are cut, oldest history first; training rollouts and evaluations "
                                 "alike", min=0)
    eval_every: int = opt(0, "evaluate every N steps (0: only at the end)", min=0)
    eval_episodes: int = opt(100, "episodes per evaluation (eval split, temperature eval_temperature)", min=0)
    eval_temperature: float = opt(0.4, "evaluation temperature (paper: 0.4)", min=0.0)
    eval_batch_episodes: int = opt(64, "evaluation episodes rolled out at once; under torchrun these batches are "
                                   "shared out among the ranks (each with its one-process seed: the same results)",
                                   min=1)
    chat_template_kwargs: dict = opt({}, "extra keyword arguments of the chat template for every prompt (rollouts, "
                                     "evaluation), e.g. {enable_thinking: false} for Qwen3: without it Qwen3 thinks "
                                     "past max_new_tokens before any action")
    grad_norm_every: int = opt(10, "every N steps, log the gradient norm of each advantage term (kappa A^OPD, "
                               "rho A^GRPO: two extra backward passes) and their cosine (grad_norm_opd, "
                               "grad_norm_grpo, grad_cos_opd_grpo); 0 = off", min=0)
    checkpoint_every: int = opt(10, "checkpoint every N steps (and at the end)", min=1)
    keep_checkpoints: int = opt(2, "how many step checkpoints to keep", min=1)
    sample_episodes: int = opt(8, "episodes with token-level fields saved per step for the TUI", min=0)
    gradient_checkpointing: bool = opt(False, "trade compute for memory in the student's update")
    distributed: str = opt("ddp", "under torchrun: ddp (a full replica per rank, gradients summed) | fsdp "
                           "(FSDP2: parameters, gradients and optimizer state sharded for the update; "
                           "rollouts use a full copy of the weights per rank)", choices=["ddp", "fsdp"])
    lora: LoraOptions = nested(LoraOptions, "LoRA adapters instead of full fine-tuning (needs peft)")
    seed: int = opt(0, "seed for rollouts and initialisation", min=0, max=SEED_MAX)
    schedule: ScheduleConfig = nested(ScheduleConfig, "the annealed kappa/rho schedule")
    bootstrap: BootstrapOptions = nested(BootstrapOptions, "teacher bootstrap and cold start")
    compare: bool = opt(True, "at the end, evaluate the cold-start student and the teacher too and print a table")
    rollout_precision: str = opt("auto", "rollout weights: bf16 (rollouts decode a bf16 copy of the student, "
                                 "refreshed after every update: half the weight bytes a decode step reads; samples "
                                 "differ from fp32 decoding; lp_S is recomputed by the training forward) | fp32 (the "
                                 "student itself, in `precision`) | auto (bf16 on CUDA and where precision is bf16, "
                                 "fp32 otherwise)",
                                 choices=["auto", "bf16", "fp32"])

    def validate(self) -> None:
        for key in ("temperature", "top_p"):
            if getattr(self, key) != 1.0:
                # lp_S, the ratio and lp_T - lp_S are all of the model's own distribution
                raise ConfigError(f"config key '{key}': got {getattr(self, key)}, but training rollouts must sample "
                                  f"the model's own distribution (temperature 1, top_p 1), whose log-probs the "
                                  f"update and the teacher term use; eval_temperature sets evaluation's")
        check_template_kwargs(self.chat_template_kwargs)
        if self.rollout_precision == "bf16" and self.recompute_old_logprobs == "never":
            raise ConfigError("config key 'rollout_precision': bf16 rollouts need lp_S recomputed by the training "
                              "forward; set recompute_old_logprobs to auto or always")
        if self.tis_cap and self.recompute_old_logprobs == "never":
            raise ConfigError("config key 'tis_cap': truncated importance sampling needs the recomputed old "
                              "log-probs; set recompute_old_logprobs to auto or always")
        # ScheduleConfig validates its own keys; this one is a recipe's mistake only (the formula
        # itself takes a floor above the start: kappa = kappa_min from step 0)
        if self.schedule.kappa_min > self.schedule.kappa_init:
            raise ConfigError(f"config key 'schedule.kappa_min': got {self.schedule.kappa_min}, "
                              f"must be <= schedule.kappa_init ({self.schedule.kappa_init})")
        if self.steps * self.tasks_per_step > MAX_TRAIN_TASKS:
            # the train split's task list is built up front (trainer.train)
            raise ConfigError(f"config keys 'steps' x 'tasks_per_step': {self.steps} x {self.tasks_per_step} = "
                              f"{self.steps * self.tasks_per_step:,} training tasks, at most {MAX_TRAIN_TASKS:,}")
        if self.algo != "opd" and self.group_size < 2:
            raise ConfigError(f"config key 'group_size': got {self.group_size}, GRPO needs >= 2 rollouts "
                              f"per task (algo={self.algo})")
        if self.lora.rank and self.distributed == "fsdp":
            raise ConfigError("config key 'lora.rank': LoRA with distributed=fsdp is not supported; the "
                              "adapters are small, use distributed=ddp")
        check_lora(self.lora)


LR_SCHEDULES = ("linear", "constant", "cosine")   # the shapes of sft.lr_factor
#: the most training tasks a run may take (steps x tasks_per_step; their list is built up front)
MAX_TRAIN_TASKS = 10**6


@dataclass
class SFTConfig:
    """`atod-edge sft` and the bootstrap's fine-tuning (sft.py): demonstrations (demos.py), the
    optimizer and its learning-rate shape, evaluation, checkpoints."""

    env: str = opt("household", "environment name or pkg.module:Class")
    model: str = opt("tiny-teacher", "preset name or checkpoint dir to start from")
    demos: str = opt("expert", "expert | noisy | dart | dagger | a mix of them, e.g. dart+dagger | path to an "
                     "episodes JSONL")
    noise: float = opt(0.3, "noisy/dart demos: probability of a random (dart: maybe stale) action",
                       min=0.0, max=1.0)
    successful_only: bool = opt(False, "train only on demonstrations that succeeded")
    episodes: int = opt(200, "number of demonstration episodes", min=1)
    demo_start: int = opt(0, "index of the first train-split task of generated demos (a later run can "
                          "take tasks an earlier one did not)", min=0)
    rollout_temperature: float = opt(0.4, "dagger demos: sampling temperature of the start model's episodes",
                                     min=0.0)
    epochs: int = opt(2, "passes over the demonstrations", min=1)
    lr: float = opt(1e-3, "AdamW learning rate", min=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0.0)
    batch_size: int = opt(16, "turns per optimizer step", min=1)
    micro_batch: int = opt(16, "turns per forward pass", min=1)
    prefix_reuse: bool = opt(True, "encode the prompt prefixes a micro-batch's turns share once (same loss and "
                             "gradients); false: every turn on its own")
    warmup_steps: int = opt(10, "linear warmup steps", min=0)
    history_turns: int = opt(2, "past turns in the prompt", min=0)
    prompt_loss_weight: float = opt(0.0, "weight of a language-modelling loss on the prompt tokens (0: "
                                    "response tokens only; helps models trained from scratch)", min=0.0)
    seed: int = opt(0, "seed for demos and shuffling", min=0, max=SEED_MAX)
    device: str = opt("cpu", "torch device")
    precision: str = opt("auto", "compute precision: auto (bf16 on CUDA, fp32 on CPU) | bf16 (bf16 autocast, CPU "
                         "too where it has native bf16) | fp32; the trained weights stay fp32 master weights",
                         choices=["auto", "bf16", "fp32"])
    out: str = opt("runs/sft", "output model dir (metrics, checkpoints, curves: <out>.work/)")
    eval_episodes: int = opt(50, "episodes evaluated on the eval split at the end (0 = none)", min=0)
    lr_schedule: str = opt("linear", "linear (the warmup ramp times a decay to 0 over the whole run, the "
                           "original schedule) | constant (after warmup) | cosine (from the end of warmup)",
                           choices=list(LR_SCHEDULES))
    min_lr_ratio: float = opt(0.0, "floor of the linear or cosine decay, as a fraction of lr", min=0.0, max=1.0)
    log_every: int = opt(1, "steps between loss rows in <out>.work/metrics.jsonl", min=1)
    eval_every: int = opt(0, "steps between evaluations during training (0 = only the final one)", min=0)
    eval_every_episodes: int = opt(20, "eval-split episodes of each periodic evaluation", min=1)
    checkpoint_every: int = opt(100, "steps between checkpoints in <out>.work/checkpoints, for --resume "
                                "(0 = none)", min=0)
    chat_template_kwargs: dict = opt({}, "extra keyword arguments of the chat template for every prompt (demos, "
                                     "evaluation), e.g. {enable_thinking: false} for Qwen3")
    lora: LoraOptions = nested(LoraOptions, "LoRA adapters instead of full fine-tuning (needs peft); the output "
                               "is the merged model, with the adapter in <out>/adapter/")

    def validate(self) -> None:
        check_template_kwargs(self.chat_template_kwargs)
        check_lora(self.lora)


def check_lora(lora: LoraOptions) -> None:
    """The `lora:` keys of a train or sft config (TrainConfig also refuses LoRA under fsdp)."""
    if not lora.rank:
        return
    if not lora.target_modules:
        raise ConfigError("config key 'lora.target_modules': empty, but lora.rank > 0 needs at least one")
    from atod_edge.train.lora import INSTALL_HINT, peft_available

    if not peft_available():
        raise ConfigError(f"config key 'lora.rank': got {lora.rank}, but LoRA needs peft, which is "
                          f"not installed: {INSTALL_HINT}")
