"""The zoo's household teacher as the trained fixture: a policy that sometimes wins, so GRPO groups
have varying rewards and the update's direction can be checked on real episodes."""

from __future__ import annotations

import pytest
import torch

from atod_edge.models import zoo
from atod_edge.models.loading import load_model
from atod_edge.engine.sampling import SamplingParams
from atod_edge.engine.policy import TorchPolicy
from atod_edge.rollout.runner import run_episodes
from atod_edge.scoring.logprobs import response_logprobs
from atod_edge.train.config import TrainConfig
from atod_edge.train.batch import build_batch
from atod_edge.train.distributed import DistInfo
from atod_edge.train.update import update

TEACHER = "household-teacher"


@pytest.fixture(scope="module")
def teacher_episodes():
    if TEACHER not in zoo.names():
        pytest.fail(f"the zoo has no {TEACHER}")
    model, tokenizer = load_model(TEACHER)
    policy = TorchPolicy(model, tokenizer)
    from atod_edge.envs import env_class

    tasks = env_class("household")().tasks("train", 4, start=10_000)
    episodes = run_episodes(policy, "household", tasks, group_size=4, seed=7,
                            sampling=SamplingParams(max_new_tokens=20, temperature=1.0), max_turns=15)
    return model, tokenizer, episodes


def test_zoo_teacher_groups_have_varying_rewards(teacher_episodes):
    _, _, episodes = teacher_episodes
    by_group: dict[int, set[bool]] = {}
    for ep in episodes:
        by_group.setdefault(ep.group, set()).add(ep.success)
    assert any(outcomes == {True, False} for outcomes in by_group.values()), by_group


def test_grpo_step_on_the_teacher_favours_its_winning_episodes(teacher_episodes):
    """One GRPO update (kappa = 0, rho = 1) raises the log-probs of the responses of episodes that
    won relative to those that lost in their group: the sign of ATOD.md section 1 end to end."""
    model, tokenizer, episodes = teacher_episodes
    student = type(model)(model.config)
    student.load_state_dict(model.state_dict())
    cfg = TrainConfig(algo="grpo", lr=1e-3, micro_batch=32, max_grad_norm=0.0, invalid_penalty=0.0)
    mixed = {ep.group for ep in episodes if ep.success} & {ep.group for ep in episodes if not ep.success}
    chosen = [ep for ep in episodes if ep.group in mixed]
    batch = build_batch(chosen, cfg, step=0)
    pad = tokenizer.pad_token_id

    def mean_logprob(ep) -> float:
        with torch.no_grad():
            lps = response_logprobs(student, [t.prompt_ids for t in ep.turns], [t.response_ids for t in ep.turns],
                                    pad_id=pad)
        return float(torch.cat(lps).mean())

    before = [mean_logprob(ep) for ep in chosen]
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
    update(student, optimizer, batch, cfg, DistInfo(rank=0, world=1, local_rank=0), pad_id=pad)
    student.eval()
    change = [mean_logprob(ep) - b for ep, b in zip(chosen, before)]
    won = [c for c, ep in zip(change, chosen) if ep.success]
    lost = [c for c, ep in zip(change, chosen) if not ep.success]
    assert sum(won) / len(won) > sum(lost) / len(lost)
