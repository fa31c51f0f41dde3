"""Bad inputs a new user meets (issue 30, the core's part): each ends in one clear line, a counted
skip or a cut prompt, never a traceback, a hang or an unbounded allocation, and data that existed
is intact afterwards.

Classes: prompts over the model's context (torch, ONNX Runtime, Agent.act, the rollout engine);
plug-in envs that fail to load, return the wrong types, hang or always raise; JSONL lines nested
too deeply or too long; zoo cards that leave files unchecked; broken tokenizers, a tokenizer of
another model, and weights holding NaN or inf.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from atod_edge.errors import UserError

BAD_ENVS = '''
import time
from atod_edge.envs import Env, StepResult


class Good(Env):
    name = "good"
    max_turns = 3
    instructions = "Reply with tick."

    def reset(self, task):
        return f"Task {task.index}: tick."

    def step(self, action):
        return StepResult("ok", 0.0, False, {"valid": True, "admissible": ["tick"]})

    def admissible_actions(self):
        return ["tick"]

    def expert_action(self):
        return "tick"


class BadCtor(Good):
    def __init__(self):
        raise RuntimeError("no license server")


class BadTasks(Good):
    def tasks(self, split, n, start=0):
        raise KeyError("tasks broke")


class TasksNone(Good):
    def tasks(self, split, n, start=0):
        return None


class TasksInts(Good):
    def tasks(self, split, n, start=0):
        return [1, 2, 3]


class StepTuple(Good):
    def step(self, action):
        return ("obs", 1.0, True, {})


class StepNone(Good):
    def step(self, action):
        return None


class StepStrReward(Good):
    def step(self, action):
        return StepResult("obs", "high", False, {})


class StepNanReward(Good):
    def step(self, action):
        return StepResult("obs", float("nan"), True, {})


class StepListInfo(Good):
    def step(self, action):
        return StepResult("obs", 0.0, False, ["valid"])


class StepIntObs(Good):
    def step(self, action):
        return StepResult(12345, 0.0, False, {})


class ResetNone(Good):
    def reset(self, task):
        return None


class IntActions(Good):
    def admissible_actions(self):
        return [1, 2, 3]


class ExpertInt(Good):
    def expert_action(self):
        return 7


class SleepStep(Good):
    def step(self, action):
        time.sleep(3600)


class SleepReset(Good):
    def reset(self, task):
        time.sleep(3600)


class SwallowStep(Good):
    """Hangs in a retry loop that swallows every Exception."""

    def step(self, action):
        while True:
            try:
                time.sleep(3600)
            except Exception:
                pass


class AlwaysRaise(Good):
    def step(self, action):
        raise RuntimeError("backend gone")


class HugeObs(Good):
    """A 1 MB first observation and 1 MB after every step."""

    def reset(self, task):
        return "You see a room. " + "dust " * 200_000 + f"Task {task.index}: tick."

    def step(self, action):
        return StepResult("a" * 1_000_000, 0.0, False, {"admissible": ["tick"]})
'''

MODULE = "badenvs30"


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    """A directory with the bad envs (and modules that fail at import), on sys.path here and on
    PYTHONPATH for subprocesses."""
    root = tmp_path_factory.mktemp("bad-plugins")
    (root / f"{MODULE}.py").write_text(textwrap.dedent(BAD_ENVS))
    (root / "raisemod30.py").write_text('raise RuntimeError("module-level failure")\n')
    (root / "syntaxmod30.py").write_text("def broken(:\n")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def cli(args, plugins=None, timeout=300, **env):
    """`python -m atod_edge.cli ARGS` with at most 6 GB of address space: returns (rc, stdout, stderr)."""
    environ = dict(os.environ, OMP_NUM_THREADS="1", **env)
    if plugins is not None:
        environ["PYTHONPATH"] = str(plugins)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    done = subprocess.run([sys.executable, "-m", "atod_edge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=environ, preexec_fn=limit)
    return done.returncode, done.stdout, done.stderr


def assert_one_line(rc, out, err, *needles):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc != 0, (out, err)
    assert len(lines) == 1, err
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in lines[0], lines[0]


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text.strip(), text
    return text


def tree(path):
    """{relative path: bytes} of every file under `path` (for 'intact afterwards' checks)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# 1. prompts over the model's context


def test_torch_backend_refuses_a_prompt_over_its_context_before_any_allocation(student_policy):
    from atod_edge.engine.context import ContextOverflow
    from atod_edge.engine.sampling import SamplingParams

    assert student_policy.context_length == 2048
    with pytest.raises(ContextOverflow) as error:
        student_policy.generate([[5] * 3000], SamplingParams(max_new_tokens=8))
    assert "prompt of 3000 tokens + 8 new exceeds the model context (2048)" in one_line(error.value)
    with pytest.raises(ContextOverflow, match="max_new_tokens 1000000000 leaves no room"):
        student_policy.generate([[5] * 10], SamplingParams(max_new_tokens=1_000_000_000))


def test_onnx_backend_refuses_a_prompt_over_its_context_before_running_the_graph(student_policy, tmp_path):
    from atod_edge.engine.backends.ort import OrtPolicy, _config_context
    from atod_edge.engine.context import ContextOverflow
    from atod_edge.engine.sampling import SamplingParams

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 128}))
    assert _config_context(tmp_path) == 128
    policy = OrtPolicy.__new__(OrtPolicy)         # no session: the check must come before any run
    policy.tokenizer, policy.context_length = student_policy.tokenizer, 128
    with pytest.raises(ContextOverflow, match=r"prompt of 200 tokens \+ 8 new exceeds the ONNX model context \(128\)"):
        policy.generate([[5] * 200], SamplingParams(max_new_tokens=8))


def test_prompts_within_the_budget_are_encoded_exactly_as_before(student_policy):
    from atod_edge.prompts import build_messages, encode_prompts
    from atod_edge.rollout.budget import PromptFitter

    tok = student_policy.tokenizer
    items = [("Your task is to: find the key.", [], None, ["look", "go to desk 1"]),
             ("Your task is to: find the key.", [("look", "You see a desk 1."), ("go to desk 1", "On the desk 1.")],
              "On the desk 1.", ["take key 1 from desk 1"])]
    expected = encode_prompts(tok, [build_messages("Act.", *item, 2) for item in items])
    assert PromptFitter(tok, "Act.", 2, 2000).encode(items) == [(ids, "") for ids in expected]
    assert PromptFitter(tok, "Act.", 2, None).encode(items) == [(ids, "") for ids in expected]


def test_an_over_long_prompt_is_cut_oldest_history_first_keeping_the_observation_tail(student_policy):
    from atod_edge.rollout.budget import CUT_MARK, PromptFitter

    tok = student_policy.tokenizer
    old = ("look", "an old observation " * 30)                     # ~100 tokens alone
    current = ("go to desk 1", "On the desk 1, you see a key 1.")
    item = ("Your task is to: find the key.", [old, current], current[1], ["look"])
    [(full, _)] = PromptFitter(tok, "Act.", 2, None).encode([item])
    fitter = PromptFitter(tok, "Act.", 2, len(full) - 20)           # room for all but the old turn
    [(ids, cut)] = fitter.encode([item])
    text = tok.decode(ids)
    assert len(ids) <= len(full) - 20 and cut == f"cut to {len(full) - 20} tokens: history 2->1 turns"
    assert "old observation" not in text and "you see a key 1" in text and "find the key" in text
    # an observation alone over the budget: its tail is kept, marked as cut
    fitter = PromptFitter(tok, "Act.", 2, 300)
    huge = "filler " * 2000 + "THE END IS HERE."
    [(ids, cut)] = fitter.encode([("Your task is to: find the key.", [("look", huge)], huge, ["look"])])
    text = tok.decode(ids)
    assert len(ids) <= 300 and "observation" in cut
    assert text.count("filler") < 300 and "THE END IS HERE." in text and CUT_MARK.strip() in text


def test_agent_act_with_a_100kb_observation_finishes_with_a_cut_prompt(student_policy):
    from atod_edge.rollout.agent import Agent

    agent = Agent(student_policy, env_instructions="Act.", max_new_tokens=4)
    agent.reset("Your task is to: find the key.")
    agent.act("look", ["look"])
    started = time.perf_counter()
    result = agent.act("You see " + "a dusty shelf 7, " * 6000, ["look"])   # ~100 KB, ~48k tokens
    assert time.perf_counter() - started < 120
    assert result.prompt_cut.startswith("cut to 2044 tokens")
    assert result.reason == "" or "exceeds" not in result.reason
    # a 100 KB task text as well
    agent.reset("You are in a room. " + "a dusty shelf 7, " * 6000 + "Your task is to: find the key.")
    assert "task text" in agent.act("x", ["look"]).prompt_cut


def test_max_new_tokens_past_the_context_is_one_line_before_any_work(student_policy):
    from atod_edge.engine.context import ContextOverflow
    from atod_edge.rollout.agent import Agent

    with pytest.raises(ContextOverflow) as error:
        Agent(student_policy, max_new_tokens=1_000_000_000)
    assert ("max_new_tokens 1000000000 leaves no room for a prompt in the model's context (2048)"
            in one_line(error.value))


def test_eval_of_a_plugin_env_with_1mb_observations_finishes_with_bounded_memory(plugins, atod_cache, tmp_path):
    """Before: the prompt grew to ~500k tokens and the process was killed for memory (23 GB).
    Now it runs under a 6 GB address-space limit, and the report counts the cut prompts."""
    out = tmp_path / "eval"
    rc, stdout, stderr = cli(["eval", "--model", "tiny-student", "--env", f"{MODULE}:HugeObs", "--episodes", "1",
                              "--set", "max_turns=2", "--set", "max_new_tokens=4", "--out", str(out)], plugins)
    assert rc == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["prompt_cuts"] == 2 and report["errors"] == 0
    assert "prompts cut to fit the context" in stdout


# --------------------------------------------------------------------------------------------
# 2. plug-in envs


@pytest.mark.parametrize("spec, needle", [
    (":", "env ':': not an import path"),
    (":Good", "env ':Good': not an import path"),
    ("..x:Good", "env '..x:Good': not an import path"),
    ("raisemod30:X", "env 'raisemod30:X': importing module 'raisemod30' failed: RuntimeError: module-level failure"),
    ("syntaxmod30:X", "importing module 'syntaxmod30' failed: SyntaxError"),
    (f"{MODULE}:BadCtor", f"env {MODULE}:BadCtor: the constructor failed: RuntimeError: no license server"),
    (f"{MODULE}:BadTasks", f"env {MODULE}:BadTasks: tasks('eval', 2) failed: KeyError"),
    (f"{MODULE}:TasksNone", f"env {MODULE}:TasksNone: tasks() returned None (NoneType), expected a list of Task"),
    (f"{MODULE}:TasksInts", f"env {MODULE}:TasksInts: tasks() returned a task 1 (int), expected a Task"),
])
def test_a_plugin_env_that_cannot_load_is_one_line_naming_it(plugins, spec, needle):
    from atod_edge.evaluate.evaluate import EvalConfig, evaluate

    with pytest.raises(UserError) as error:
        evaluate("expert", EvalConfig(env=spec, episodes=2))
    assert needle in one_line(error.value)


@pytest.mark.parametrize("cls, needle", [
    ("StepTuple", "step() returned ('obs', 1.0, True, {}) (tuple), expected a StepResult"),
    ("StepNone", "step() returned None (NoneType), expected a StepResult"),
    ("StepStrReward", "step() returned reward 'high' (str), expected a finite number"),
    ("StepNanReward", "step() returned reward nan (float), expected a finite number"),
    ("StepListInfo", "step() returned info ['valid'] (list), expected a dict"),
    ("StepIntObs", "step() returned an observation 12345 (int), expected a str"),
    ("ResetNone", "reset() returned an observation None (NoneType), expected a str"),
    ("IntActions", "admissible_actions() returned an admissible action 1 (int), expected a str"),
    ("ExpertInt", "expert_action() returned an action 7 (int), expected a str"),
])
def test_an_env_returning_the_wrong_type_is_one_line_naming_class_and_field(plugins, cls, needle):
    from atod_edge.evaluate.evaluate import EvalConfig, evaluate

    with pytest.raises(UserError) as error:
        evaluate("expert", EvalConfig(env=f"{MODULE}:{cls}", episodes=2))
    assert f"env {MODULE}:{cls}: {needle}" in one_line(error.value)


def test_the_cli_names_a_bad_plugin_in_one_line_and_leaves_earlier_results_intact(plugins, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.json").write_text('{"success": 0.5}\n')
    (out / "episodes.jsonl").write_text('{"env": "x"}\n')
    before = tree(out)
    for spec, needle in ((":", "not an import path"), ("raisemod30:X", "RuntimeError: module-level failure"),
                         (f"{MODULE}:BadCtor", "the constructor failed"),
                         (f"{MODULE}:StepTuple", "step() returned ('obs', 1.0, True, {}) (tuple)")):
        rc, stdout, stderr = cli(["eval", "--policy", "expert", "--env", spec, "--episodes", "2", "--out", str(out)],
                                 plugins)
        assert_one_line(rc, stdout, stderr, needle)
    assert tree(out) == before


@pytest.mark.parametrize("cls", ["SleepStep", "SleepReset", "SwallowStep"])
def test_a_hung_env_ends_its_episode_as_an_error_within_the_timeout(plugins, student_policy, cls):
    from atod_edge.evaluate.evaluate import EvalConfig, all_failed_by_error, evaluate, format_summary

    cfg = EvalConfig(env=f"{MODULE}:{cls}", episodes=2, env_step_timeout=0.5, max_new_tokens=4)
    for policy in ("expert", student_policy):
        started = time.perf_counter()
        summary, episodes = evaluate(policy, cfg)
        assert time.perf_counter() - started < 30
        assert summary["errors"] == 2 and all_failed_by_error(summary)
        assert "took longer than 0.5 s" in episodes[0].meta["error"]
        assert "2 of 2 episodes ended in env errors" in format_summary(summary)
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_an_env_whose_step_always_raises_is_counted_in_the_printed_summary(plugins, student_policy):
    from atod_edge.evaluate.evaluate import EvalConfig, all_failed_by_error, evaluate, format_summary

    summary, _ = evaluate(student_policy, EvalConfig(env=f"{MODULE}:AlwaysRaise", episodes=3, max_new_tokens=4))
    assert summary["errors"] == 3 and all_failed_by_error(summary)
    assert "RuntimeError: backend gone" in summary["first_error"]
    assert "3 of 3 episodes ended in env errors (first: env step failed: RuntimeError: backend gone)" \
        in format_summary(summary)
    good, _ = evaluate("expert", EvalConfig(env=f"{MODULE}:Good", episodes=2))
    assert good["errors"] == 0 and not all_failed_by_error(good) and "env errors" not in format_summary(good)


def test_the_deadline_also_holds_off_the_main_thread_and_passes_results_and_errors():
    from atod_edge.rollout.env_calls import EnvTimeout, call_with_deadline

    assert call_with_deadline(lambda x: x + 1, 1, timeout=5, what="f()") == 2
    with pytest.raises(KeyError):
        call_with_deadline({}.__getitem__, "k", timeout=5, what="f()")
    box = []

    def worker():
        started = time.perf_counter()
        try:
            call_with_deadline(time.sleep, 30, timeout=0.3, what="env X: step()")
        except EnvTimeout as e:
            box.append((str(e), time.perf_counter() - started))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    assert box and box[0][0] == "env X: step() took longer than 0.3 s" and box[0][1] < 5


# --------------------------------------------------------------------------------------------
# 3. JSONL lines nested too deeply or too long


@pytest.fixture
def bad_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "success": 0.5}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n"
                     + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"\n"
                     + b'{"x": "' + b"y" * 5000 + b'"}\n{"step": 2, "success": 0.6}\n')
    return path


def test_read_jsonl_skips_deeply_nested_and_oversized_lines(bad_jsonl):
    from atod_edge.io import read_jsonl

    before = bad_jsonl.read_bytes()
    records, skipped = read_jsonl(bad_jsonl, max_line_bytes=1000)
    assert records == [{"step": 1, "success": 0.5}, {"step": 2, "success": 0.6}] and skipped == 3
    records, skipped = read_jsonl(bad_jsonl)
    assert len(records) == 3 and skipped == 2
    assert bad_jsonl.read_bytes() == before


def test_metrics_log_and_episode_readers_skip_a_nested_line(bad_jsonl):
    from atod_edge.rollout.episode import read_episodes
    from atod_edge.tui.data import MetricsLog

    log = MetricsLog(bad_jsonl)
    assert log.poll() == 3 and log.skipped == 2
    assert log.series("success") == [(1, 0.5), (2, 0.6)]
    episodes, skipped = read_episodes(bad_jsonl)
    assert skipped >= 2


# --------------------------------------------------------------------------------------------
# 4. zoo cards must cover every file


@pytest.fixture
def zoo_copy(tmp_path):
    from atod_edge.models import zoo

    name = "household-teacher"
    root = tmp_path / "zoo"
    shutil.copytree(zoo.ZOO_ROOT / name, root / name)
    return root, name


def _rewrite_card(root, name, change):
    path = root / name / "card.json"
    card = json.loads(path.read_text())
    change(card)
    path.write_text(json.dumps(card))


def test_a_card_with_an_empty_files_table_is_refused(zoo_copy):
    from atod_edge.models import zoo

    root, name = zoo_copy
    _rewrite_card(root, name, lambda card: card.update(files={}))
    with pytest.raises(UserError, match="lists no files"):
        zoo.model_dir(name, root)


def test_a_file_missing_from_the_card_is_refused_naming_it(zoo_copy):
    from atod_edge.models import zoo

    root, name = zoo_copy
    _rewrite_card(root, name, lambda card: card["files"].pop("tokenizer.json"))
    with pytest.raises(UserError) as error:
        zoo.model_dir(name, root)
    assert "tokenizer.json is not listed in its card" in one_line(error.value)


def test_an_unlisted_weight_shard_is_refused_and_the_cli_says_so_in_one_line(zoo_copy):
    from atod_edge.models import zoo

    root, name = zoo_copy
    shutil.copy(root / name / "model.safetensors", root / name / "model-00002-of-00002.safetensors")
    before = tree(root)
    with pytest.raises(UserError, match=r"model-00002-of-00002\.safetensors is not listed"):
        zoo.model_dir(name, root)
    _rewrite_card(root, name, lambda card: card["files"].update({"x": "not an entry"}))
    with pytest.raises(UserError, match="malformed 'files' entry 'x'"):
        zoo.read_card(name, root)
    rc, stdout, stderr = cli(["models", "info", name], ATOD_EDGE_ZOO=str(root))
    assert_one_line(rc, stdout, stderr, "malformed 'files' entry 'x'")
    assert {k: v for k, v in tree(root).items() if not k.endswith("card.json")} == \
        {k: v for k, v in before.items() if not k.endswith("card.json")}


# --------------------------------------------------------------------------------------------
# 5. tokenizers and weights


@pytest.fixture(scope="module")
def damaged(atod_cache, tmp_path_factory):
    """`damaged(how)`: a copy of tiny-student damaged in one way."""
    from atod_edge.models.presets import resolve_model

    student = resolve_model("tiny-student")
    root = tmp_path_factory.mktemp("damaged")

    def make(how: str):
        out = root / how
        if out.exists():
            return out
        shutil.copytree(student, out)
        if how == "no tokenizer.json":
            (out / "tokenizer.json").unlink()
        elif how == "garbage tokenizer.json":
            (out / "tokenizer.json").write_text("garbage{not json")
        elif how == "empty tokenizer.json":
            (out / "tokenizer.json").write_text("")
        elif how == "tokenizer.json of the wrong shape":
            (out / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')
        elif how == "garbage tokenizer_config.json":
            (out / "tokenizer_config.json").write_text("[1,2")
        elif how == "tokenizer of another size":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(out)
            tok.add_tokens([f"zzq{i}" for i in range(4096 - len(tok))])
            tok.save_pretrained(out)
        else:
            import torch
            from safetensors.torch import load_file, save_file

            weights = load_file(out / "model.safetensors")
            name = sorted(weights)[3]
            if how == "one NaN weight":
                weights[name][0, 0] = float("nan")
            elif how == "a tensor of inf":
                weights[name][:] = float("inf")
            else:
                weights = {k: torch.full_like(v, float("nan")) for k, v in weights.items()}
            save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
        return out

    return make


@pytest.mark.parametrize("how", ["no tokenizer.json", "garbage tokenizer.json", "empty tokenizer.json",
                                 "tokenizer.json of the wrong shape", "garbage tokenizer_config.json"])
def test_a_broken_tokenizer_is_one_line(damaged, how):
    from atod_edge.models.loading import load_model, load_tokenizer

    path = damaged(how)
    with pytest.raises(UserError) as error:
        load_tokenizer(path)
    assert "cannot load the tokenizer of" in one_line(error.value)
    with pytest.raises(UserError, match="cannot load the tokenizer of"):
        load_model(path)


@pytest.mark.parametrize("how, needle", [
    ("tokenizer of another size", "its tokenizer has 4096 entries but the model has 2182 embedding rows"),
    ("one NaN weight", "holds NaN or inf weights (model."),
    ("a tensor of inf", "holds NaN or inf weights"),
    ("all weights NaN", "holds NaN or inf weights (model.embed_tokens.weight"),
])
def test_a_foreign_tokenizer_or_damaged_weights_are_refused_at_load(damaged, how, needle):
    from atod_edge.models.loading import load_model

    with pytest.raises(UserError) as error:
        load_model(damaged(how))
    assert needle in one_line(error.value)


def test_the_cli_refuses_a_garbage_tokenizer_and_nan_weights_in_one_line(damaged, tmp_path):
    for how, needle in (("garbage tokenizer.json", "cannot load the tokenizer of"),
                        ("all weights NaN", "holds NaN or inf weights")):
        path = damaged(how)
        before = tree(path)
        rc, stdout, stderr = cli(["eval", "--model", str(path), "--episodes", "1", "--out", str(tmp_path / how)])
        assert_one_line(rc, stdout, stderr, needle)
        assert tree(path) == before and not (tmp_path / how).exists()



def _raising_env(tmp_path, module: str) -> dict:
    """A household env whose step() always raises, importable as `module:RaisingEnv`; the env vars
    that put it on the path."""
    import os
    import textwrap

    (tmp_path / f"{module}.py").write_text(textwrap.dedent('''
        from atod_edge.envs.household.env import HouseholdEnv

        class RaisingEnv(HouseholdEnv):
            name = "raising"

            def step(self, action):
                raise RuntimeError("the simulator crashed")
    '''))
    return {**os.environ, "PYTHONPATH": str(tmp_path)}


def test_eval_exits_non_zero_when_every_episode_ended_in_an_env_error(tmp_path):
    """The run says so in its summary and, since it measured nothing, exits non-zero in one line."""
    import subprocess
    import sys

    env = _raising_env(tmp_path, "raising_env")
    result = subprocess.run([sys.executable, "-m", "atod_edge.cli", "eval", "--policy", "expert", "--env",
                             "raising_env:RaisingEnv", "--episodes", "2", "--out", str(tmp_path / "ev")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert "2 of 2 episodes ended in env errors" in result.stdout
    [line] = result.stderr.strip().splitlines()
    assert "every one of 2 episodes ended in an env error" in line and "the simulator crashed" in line


def test_train_stops_in_one_line_when_every_episode_of_a_step_ended_in_an_env_error(tmp_path):
    """An env whose step() always raises must not train to exit 0 on nothing but errors."""
    import subprocess
    import sys

    env = _raising_env(tmp_path, "raising_env2")
    result = subprocess.run([sys.executable, "-m", "atod_edge.cli", "train", "--algo", "grpo", "--out",
                             str(tmp_path / "run"), "--set", "env=raising_env2:RaisingEnv",
                             "--set", "student=tiny-student", "--set", "teacher=none", "--set", "steps=2",
                             "--set", "tasks_per_step=1", "--set", "group_size=2", "--set", "compare=false",
                             "--set", "eval_episodes=0", "--set", "max_new_tokens=8"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "every one of its 2 episodes ended in an env error" in line and "the simulator crashed" in line
