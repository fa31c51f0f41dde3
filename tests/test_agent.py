"""atod_edge.Agent: the embeddable one-episode agent on real tiny models and real runtimes.

It must build the prompts the rollout engine builds (so a trained agent sees what it was trained
on), keep only the last H turns, never raise on garbage replies, run the same on PyTorch and on an
exported GGUF, and the README's example must run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from atod_edge.envs import make_env
from atod_edge.errors import UserError
from atod_edge.engine.sampling import SamplingParams
from atod_edge.engine.policy import TorchPolicy
from atod_edge.rollout.runner import run_episodes

README = Path(__file__).resolve().parents[1] / "README.md"


class RecordingPolicy(TorchPolicy):
    """The real tiny-student, remembering every prompt it was given."""

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer, name="recording")
        self.prompts: list[list[int]] = []

    def generate(self, prompts, sampling, seed=None):
        self.prompts += [list(p) for p in prompts]
        return super().generate(prompts, sampling, seed=seed)


def _play(agent, env, task, turns: int):
    """Drive `env` with `agent` for up to `turns` turns, as the README does."""
    observation = env.reset(task)
    agent.reset(observation)
    results = []
    for _ in range(turns):
        result = agent.act(observation, env.admissible_actions())
        results.append(result)
        step = env.step(result.action or "")
        observation = step.observation
        if step.done:
            break
    return results


def test_agent_builds_the_engines_prompts_and_acts_like_it(tiny_student):
    from atod_edge import Agent

    model, tokenizer = tiny_student
    env = make_env("household")
    task = env.tasks("eval", 1, start=5)[0]
    engine = RecordingPolicy(model, tokenizer)
    [episode] = run_episodes(engine, "household", [task], sampling=SamplingParams(temperature=0.0),
                             seed=0, max_turns=4)
    policy = RecordingPolicy(model, tokenizer)
    agent = Agent(policy, env_instructions=env.instructions)
    results = _play(agent, make_env("household"), task, turns=episode.num_turns)

    assert len(results) == episode.num_turns >= 3
    assert policy.prompts == engine.prompts            # token for token, every turn
    assert [r.response for r in results] == [t.response for t in episode.turns]
    assert [r.action for r in results] == [t.action for t in episode.turns]
    assert agent.turns == episode.num_turns


def test_agent_keeps_only_the_last_turns_and_shows_invalid_ones(tiny_student, forced_text):
    from atod_edge import Agent

    model, tokenizer = tiny_student
    policy = RecordingPolicy(model, tokenizer)
    agent = Agent(policy, env_instructions="Act.", history_turns=2)
    agent.reset("TASK-TEXT")
    replies = ["<action>open box 1</action>", "<action>take key 2", "<action>go to door 3</action>",
               "<action>use key 4</action>"]
    results = []
    for i, reply in enumerate(replies):
        ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        with forced_text(model, ids):
            results.append(agent.act(f"OBSERVATION-{i}", ["open box 1", "look"]))
    assert [r.action for r in results] == ["open box 1", None, "go to door 3", "use key 4"]
    assert results[1].reason == "unterminated <action> tag" and not results[1].valid
    last = tokenizer.decode(policy.prompts[-1])
    assert "TASK-TEXT" in last                          # the task stays in every prompt
    assert "> (invalid)\nOBSERVATION-2" in last and "> go to door 3\nOBSERVATION-3" in last
    assert "open box 1\nOBSERVATION-1" not in last     # older than the last 2 turns
    assert "Admissible actions: open box 1 | look" in last


def test_agent_never_raises_on_garbage_and_refuses_act_before_reset(tiny_student, forced_text):
    from atod_edge import Agent

    model, tokenizer = tiny_student
    agent = Agent(TorchPolicy(model, tokenizer), env_instructions="Act.", max_new_tokens=12)
    with pytest.raises(UserError, match="reset"):
        agent.act("x", [])
    agent.reset("task")
    garbage = [tokenizer.convert_tokens_to_ids("<|im_start|>")] * 3 + list(range(100, 109))
    with forced_text(model, garbage):
        result = agent.act("observation", None)
    assert result.action is None and result.reason and result.seconds > 0
    assert agent.act(12345, ["look"]).response is not None      # not even text: still a result


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, atod_cache):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from atod_edge.export import export_model

    out = tmp_path_factory.mktemp("agent-gguf")
    export_model("tiny-student", out, onnx=False, gguf_quants=["f32"], verify=False)
    return out / "agent.f32.gguf"


def test_agent_on_a_gguf_acts_like_the_pytorch_agent(tiny_gguf):
    from atod_edge import Agent

    env = make_env("household")
    task = env.tasks("eval", 1, start=2)[0]
    with Agent.load("tiny-student", env_instructions=env.instructions) as reference, \
            Agent.load(str(tiny_gguf), env_instructions=env.instructions) as agent:
        assert type(agent.policy).__name__ == "LlamaCppPolicy"
        expected = _play(reference, make_env("household"), task, turns=3)
        got = _play(agent, make_env("household"), task, turns=3)
    assert [r.response for r in got] == [r.response for r in expected]


def test_agent_cuts_a_prompt_too_long_for_the_runtime_to_its_context(tiny_gguf):
    """Issue 30: a prompt over the runtime's context is cut (the task text to its tail), as the
    rollout engine cuts it, instead of a turn with no reply."""
    from atod_edge import Agent

    with Agent.load(str(tiny_gguf), env_instructions="Act.", n_ctx=256) as agent:
        assert agent.policy.context_length == 256
        agent.reset("a task text that is far too long " * 100)       # ~700 tokens
        result = agent.act("observation", ["look"])
    assert result.prompt_cut.startswith("cut to 208 tokens") and "task text" in result.prompt_cut
    assert "exceeds" not in result.reason


def test_readme_agent_example_runs_as_written(atod_cache, tmp_path):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Embedding the agent"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "from atod_edge import Agent" in code and "make_env(" in code
    assert len([line for line in code.splitlines() if line.strip()]) <= 14
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"(won|lost) after \d+ turns", run.stdout), run.stdout
