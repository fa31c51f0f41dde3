"""`atod-edge export` and `atod-edge export verify` end to end through the command line, on a
checkpoint the trainer wrote and on a LoRA adapter merged at export; `atod-edge eval` on the files."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("optimum.exporters.onnx")
gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from atod_edge.cli.main import main  # noqa: E402

QUICK = ["verify.n_contexts=2", "verify.max_context_tokens=256", "verify.greedy_tokens=8", "verify.n_episodes=2",
         "verify.max_turns=2", "verify.speed_tokens=8", "verify.device=cpu"]


def quick() -> list[str]:
    return [a for s in QUICK for a in ("--set", s)]


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """The trainer's last checkpoint exported by the CLI with --int8 (no --onnx: it implies ONNX)
    and GGUF f32, without verification."""
    out = tmp_path_factory.mktemp("cli-export") / "out"
    checkpoint = trained_run / "checkpoints" / "step_000008"
    code = main(["export", str(checkpoint), "--int8", "--quant", "f32", "--out", str(out), "--no-verify"])
    return checkpoint, out, code


def test_export_int8_implies_onnx_and_no_verify_writes_an_unverified_report(exported):
    checkpoint, out, code = exported
    assert code == 0
    for name in ("onnx/model.onnx", "onnx/model.int8.onnx", "agent.f32.gguf", "tokenizer.json", "export.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("agent.f16.gguf")) and not list(out.glob("agent.q8_0.gguf"))   # only f32, as asked
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["source"] == str(checkpoint.resolve())
    assert [f["file"] for f in manifest["files"]] == ["onnx/model.onnx", "onnx/model.int8.onnx", "agent.f32.gguf"]
    report = json.loads((out / "report.json").read_text())
    assert report["verified"] is False and "parity" not in json.dumps(report["files"])


def test_export_verify_dispatches_to_the_export_dir_and_passes(exported, capsys):
    _, out, _ = exported
    assert main(["export", "verify", str(out), *quick()]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report.get("verified", True) and report["passed"]
    assert {f["file"] for f in report["files"]} == {"onnx/model.onnx", "onnx/model.int8.onnx", "agent.f32.gguf"}
    assert all(f["status"] == "pass" for f in report["files"])
    assert "PASS" in capsys.readouterr().out


def test_export_verify_exits_1_on_a_failing_file(exported, tmp_path, capsys):
    _, out, _ = exported
    bad = shutil.copytree(out, tmp_path / "bad")
    # an f32 file must match the student's logits to 1e-3, whatever the model: any damage fails it
    reader = gguf.GGUFReader(str(bad / "agent.f32.gguf"))
    offset = int(next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight").data_offset)
    del reader
    with open(bad / "agent.f32.gguf", "r+b") as f:   # 32.06 as f32: far off the real weights
        f.seek(offset)
        f.write(b"\x00\x42" * 4096)
    manifest = json.loads((bad / "export.json").read_text())   # the int8 file is not needed here
    manifest["files"] = [f for f in manifest["files"] if f["file"] != "onnx/model.int8.onnx"]
    (bad / "export.json").write_text(json.dumps(manifest))
    assert main(["export", "verify", str(bad), *quick(), "--set", "verify.n_episodes=0"]) == 1
    report = json.loads((bad / "report.json").read_text())
    status = {f["file"]: f["status"] for f in report["files"]}
    assert status["agent.f32.gguf"] == "fail" and status["onnx/model.onnx"] == "pass"
    assert "FAIL" in capsys.readouterr().out


def test_export_usage_errors_are_one_line(exported, capsys):
    checkpoint, out, _ = exported
    assert main(["export", str(checkpoint), "--out", str(out / "none")]) == 1
    assert "nothing to export" in capsys.readouterr().err
    assert main(["export", "verify"]) == 1
    assert "usage: atod-edge export verify DIR" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["agent.f32.gguf", "onnx"])
def test_eval_runs_an_exported_file_through_the_cli(exported, tmp_path, capsys, name):
    _, out, _ = exported
    report_dir = tmp_path / "eval"
    assert main(["eval", "--model", str(out / name), "--env", "household", "--episodes", "2",
                 "--set", "max_turns=2", "--set", "max_new_tokens=6", "--out", str(report_dir)]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["episodes"] == 2 and report["generated_tokens"] > 0
    assert str(out / name) in report["policy"]


def test_a_lora_adapter_is_merged_into_its_base_at_export(small_teacher, tmp_path):
    """The trainer's LoRA checkpoint holds the merged model and CHECKPOINT/adapter; exporting the
    adapter directory merges it into its base again: the ONNX file computes the merged model's
    logits, not the base's."""
    pytest.importorskip("peft")
    import numpy as np
    import torch

    from atod_edge.engine.backends import load_policy
    from atod_edge.config import load_config
    from atod_edge.models.loading import load_model
    from atod_edge.train.config import TrainConfig
    from atod_edge.train.trainer import train

    # OPD: the teacher's log-probs give every token a signal (GRPO on a random student has none)
    cfg = load_config(TrainConfig, None, ["algo=opd", "steps=2", "tasks_per_step=1", "group_size=2", "max_turns=2",
                                          "max_new_tokens=6", "lr=5e-2", "eval_episodes=0", "sample_episodes=0",
                                          "compare=false", "lora.rank=4", "lora.alpha=8", "checkpoint_every=2"])
    final = train(cfg, tmp_path / "run", "tiny-student", str(small_teacher), log=lambda *a: None)
    assert (final / "adapter" / "adapter_config.json").is_file()
    out = tmp_path / "export"
    assert main(["export", str(final / "adapter"), "--onnx", "--out", str(out), "--no-verify"]) == 0

    merged, tokenizer = load_model(final)
    base, _ = load_model("tiny-student")
    ids = tokenizer("<|im_start|>user\nYou are in the kitchen.<|im_end|>", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = merged(torch.tensor([ids])).logits[0].numpy()
        base_logits = base(torch.tensor([ids])).logits[0].numpy()
    got = load_policy(str(out / "onnx")).logits(ids)
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(base_logits - want).max() > 1e-3     # the adapter moved the model: the test can fail
