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
    from atod_edge.models import resolve_model

    path = tmp_path_factory.mktemp("atod-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATOD_EDGE_CACHE", str(path))
        resolve_model("tiny-student")
        yield path


@pytest.fixture(scope="session")
def tiny_student(atod_cache):
    """(model, tokenizer) of the tiny-student preset (random init), in eval mode on CPU."""
    from atod_edge.models import load_model

    return load_model("tiny-student")


@pytest.fixture(scope="session")
def tiny_teacher(atod_cache):
    """(model, tokenizer) of the tiny-teacher preset (random init, same tokenizer as the student)."""
    from atod_edge.models import load_model

    return load_model("tiny-teacher")


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
    from atod_edge.models import resolve_model

    student = resolve_model("tiny-student")   # built now, before a test registers its own envs
    return lambda out, how="renamed tensor": _damage(student, out, how)


@pytest.fixture(scope="session")
def student_policy(tiny_student):
    from atod_edge.policy import TorchPolicy

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
