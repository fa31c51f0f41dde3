"""Shared fixtures: a private preset cache with the tiny models built once per test session."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest


@pytest.fixture(scope="session")
def atod_cache(tmp_path_factory):
    """A temporary ATOD_EDGE_CACHE (set before anything is built), with tiny-student built in it.
    Subprocesses started by tests inherit it through the environment."""
    from atod_edge.models.presets import resolve_model

    path = tmp_path_factory.mktemp("atod-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATOD_EDGE_CACHE", str(path))
        resolve_model("tiny-student")
        yield path


@pytest.fixture(scope="session")
def tiny_student(atod_cache):
    """(model, tokenizer) of the tiny-student preset (random init), in eval mode on CPU."""
    from atod_edge.models.loading import load_model

    return load_model("tiny-student")


@pytest.fixture(scope="session")
def tiny_teacher(atod_cache):
    """(model, tokenizer) of the tiny-teacher preset (random init, same tokenizer as the student)."""
    from atod_edge.models.loading import load_model

    return load_model("tiny-teacher")


@pytest.fixture(scope="session")
def small_teacher(atod_cache, tmp_path_factory):
    """A teacher with the student's tokenizer but other outputs: tiny-student cut to its first
    layer (cheaper than tiny-teacher, and unlike the student itself it disagrees with it)."""
    from atod_edge.models.surgery import shrink_model

    return shrink_model("tiny-student", [0], tmp_path_factory.mktemp("teacher") / "small-teacher")


#: the settings of `trained_run` (about 3 s): 8 ATOD steps of 1 household task x 2 rollouts x 2 turns,
#: kappa/rho annealed over 6 steps, 2 eval episodes every 2 steps, 2 sample episodes a step
TRAINED_RUN = ["steps=8", "tasks_per_step=1", "group_size=2", "max_turns=2", "max_new_tokens=6", "lr=1e-3",
               "micro_batch=16", "eval_every=2", "eval_episodes=2", "sample_episodes=2", "checkpoint_every=4",
               "keep_checkpoints=2", "compare=false", "schedule.anneal_steps=6"]


@pytest.fixture(scope="session")
def trained_run(small_teacher, tmp_path_factory):
    """A run directory written by the real trainer (train()): config.yaml, metrics.jsonl,
    samples/step_000000..7.jsonl, checkpoints/step_000004 and step_000008. Shared by the TUI and CLI tests: copy it
    before changing anything in it."""
    import torch

    from atod_edge.config import load_config
    from atod_edge.train.config import TrainConfig
    from atod_edge.train.trainer import train

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(TrainConfig, None, TRAINED_RUN), run_dir, "tiny-student", str(small_teacher),
              log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return run_dir


def _damage(src, out, how: str):
    """A copy of checkpoint `src` whose weights no longer fit its config, as a new user met them:
    a tensor name in the safetensors header overwritten (the JSON still parses, so transformers
    would load it and randomly initialise the embeddings), or a config whose MLP width differs
    from the file's tensors."""
    shutil.copytree(src, out)
    weights = out / "model.safetensors"
    if how == "renamed tensor":
        data = bytearray(weights.read_bytes())
        at = data.index(b"model.embed_tokens.weight")
        data[at:at + 5] = b"XXXXX"
        weights.write_bytes(bytes(data))
    elif how == "wrong shape":
        config = json.loads((out / "config.json").read_text())
        config["intermediate_size"] //= 2
        (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def damage(atod_cache):
    """`damage(out, how)`: a damaged copy of tiny-student at `out` ("renamed tensor" or "wrong shape")."""
    from atod_edge.models.presets import resolve_model

    student = resolve_model("tiny-student")   # built now, before a test registers its own envs
    return lambda out, how="renamed tensor": _damage(student, out, how)


@pytest.fixture(scope="session")
def student_policy(tiny_student):
    from atod_edge.engine.policy import TorchPolicy

    model, tokenizer = tiny_student
    return TorchPolicy(model, tokenizer, name="tiny-student")


@contextlib.contextmanager
def _forced_text(model, token_ids):
    """Make `model` emit `token_ids` (then its own choice): a forward hook adds a large bias to
    the forced token's logit at each generation step. A prefill (more than one input token)
    starts a new generation."""
    step = {"n": 0}

    def hook(module, args, kwargs, output):
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            input_ids = args[0]
        if input_ids.shape[1] > 1:
            step["n"] = 0
        n = step["n"]
        step["n"] += 1
        if n < len(token_ids):
            output.logits[:, -1, token_ids[n]] += 1e4
        return output

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture
def forced_text():
    """`with forced_text(model, ids):` makes a real model emit the given token ids."""
    return _forced_text


# --- skip report (for .ci/run, which fails on any skip not in .ci/allowed-skips) -------------

_SKIPS: dict[str, str] = {}


def _record_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _SKIPS[report.nodeid] = reason.removeprefix("Skipped: ")


def pytest_collectreport(report):      # a module skipped as a whole (pytest.importorskip at the top)
    _record_skip(report)


def pytest_runtest_logreport(report):  # a test skipped by a marker or by pytest.skip() in its body
    _record_skip(report)


def pytest_sessionfinish(session, exitstatus):
    """With ATOD_EDGE_SKIP_REPORT=FILE, write every skipped test id and its reason to FILE
    (one `id<TAB>reason` a line), so CI can tell an expected skip from a broken import."""
    import os

    path = os.environ.get("ATOD_EDGE_SKIP_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(f"{nodeid}\t{' '.join(reason.split())}\n" for nodeid, reason in sorted(_SKIPS.items()))
