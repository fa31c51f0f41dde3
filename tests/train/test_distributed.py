"""Two CPU processes under torchrun (gloo): the trainer's data-parallel paths (ddp and fsdp), end
to end, and the FSDP update on uneven batches against a one-process update."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import cli_env, load_weights, metric_rows, overrides, same_weights

# the small teacher has one layer: the cold start keeps it (the recipe keeps layers 0,1 of four)
SETTINGS = overrides(steps=2, tasks_per_step=2, bootstrap__student_episodes=1, bootstrap__student_epochs=1,
                     bootstrap__student_from_teacher="0")


def _torchrun(run_dir: Path, dumps: Path, student: str, teacher: Path, *extra: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "atod_edge.cli", "train", "--out", str(run_dir), "--set", f"student={student}",
               "--set", f"teacher={teacher}", *[a for o in [*SETTINGS, *extra] for a in ("--set", o)]]
    result = subprocess.run(command, cwd=run_dir.parent, env=cli_env(ATOD_EDGE_TEST_DUMP_WEIGHTS=str(dumps)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def ddp_run(atod_cache, small_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    output = _torchrun(root / "run", root / "weights", "auto", small_teacher)
    return root / "run", root / "weights", output


def test_two_gloo_ranks_bootstrap_once_train_and_hold_identical_weights(ddp_run, atod_cache):
    run_dir, dumps, output = ddp_run

    # the cold-start student was bootstrapped once, by rank 0, and rank 1 found it in the cache
    assert output.count("bootstrapping by SFT") == 1
    student = Path(json.loads((run_dir / "run.json").read_text())["student"])
    assert student.parent == atod_cache / "bootstrap"

    # both ranks hold the same weights, equal to rank 0's final checkpoint, and they moved
    rank0 = torch.load(dumps / "rank0.pt", weights_only=True)
    rank1 = torch.load(dumps / "rank1.pt", weights_only=True)
    assert same_weights(rank0, rank1)
    checkpoint = load_weights(run_dir / "checkpoints" / "step_000002")
    assert same_weights(checkpoint, {k: rank0[k] for k in checkpoint})
    assert not same_weights(checkpoint, load_weights(student))

    # only rank 0 wrote: one row per step, covering the episodes of both ranks (2 tasks x 2)
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["episodes"] == 4 and r["tokens"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    assert output.count("training atod on household") == 1


def test_fsdp_ranks_hold_identical_full_weights_equal_to_the_ddp_run(ddp_run, small_teacher, tmp_path):
    """The same run sharded with FSDP2: gradients are summed like ddp's, so after two steps the
    weights equal the ddp run's up to float rounding (reduce-scatter vs all-reduce, the norm of
    sharded gradients)."""
    ddp_dir, ddp_dumps, _ = ddp_run
    student = json.loads((ddp_dir / "run.json").read_text())["student"]
    run_dir, dumps = tmp_path / "run", tmp_path / "weights"
    _torchrun(run_dir, dumps, student, small_teacher, "distributed=fsdp")

    rank0 = torch.load(dumps / "rank0.pt", weights_only=True)
    rank1 = torch.load(dumps / "rank1.pt", weights_only=True)
    assert same_weights(rank0, rank1)   # the full (gathered) weights every rank rolls out with
    checkpoint = load_weights(run_dir / "checkpoints" / "step_000002")   # rank 0 saved the full model
    assert same_weights(checkpoint, {k: rank0[k] for k in checkpoint})
    assert not same_weights(checkpoint, load_weights(student))
    ddp = torch.load(ddp_dumps / "rank0.pt", weights_only=True)
    # Adam divides by the gradient's own scale, so where a gradient is ~0 a rounding difference can
    # move that element by up to lr a step (no bound on the largest difference can tell that from
    # a bug); everywhere else the two runs agree to 1e-5
    for key in ddp:
        difference = (rank0[key] - ddp[key]).abs()
        assert int((difference > 1e-5).sum()) <= max(1, difference.numel() // 10_000), key
    rows, ddp_rows = metric_rows(run_dir), metric_rows(ddp_dir)
    assert [r["episodes"] for r in rows] == [4, 4]
    for row, ddp_row in zip(rows, ddp_rows):
        assert row["tokens"] == ddp_row["tokens"] and row["success"] == ddp_row["success"]
        assert row["loss"] == pytest.approx(ddp_row["loss"], rel=1e-4, abs=1e-6)
        # the same scale-blindness lets a wrong reduction (FSDP's default divide-by-world mean
        # instead of ddp's sum) leave the weights within the bound above: the summed gradient's
        # norm, logged before clipping, is what tells them apart (half of ddp's with a mean)
        assert row["grad_norm"] == pytest.approx(ddp_row["grad_norm"], rel=1e-4), row["step"]
    # the optimizer state was gathered in full: every parameter has its moments, unsharded
    state = torch.load(run_dir / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=True)
    moments = state["optimizer"]["state"]
    assert set(moments) == {k for k in checkpoint if k != "lm_head.weight"}   # tied to the embeddings
    assert all(moments[k]["exp_avg"].shape == checkpoint[k].shape for k in moments)


# --- the FSDP update on uneven batches --------------------------------------------------------


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def _turns(rank: int | None):
    """Rank 0 holds three turns, rank 1 one (None: all four): random tokens, the model's own
    log-probs as lp_S (ratio 1 in the first epoch), random advantages."""
    from atod_edge.scoring.logprobs import response_logprobs
    from atod_edge.train.batch import TokenBatch

    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 64, (n,), generator=gen).tolist() for n in (2, 5, 3, 4)]
    responses = [torch.randint(1, 64, (n,), generator=gen).tolist() for n in (3, 1, 2, 3)]
    with torch.no_grad():
        old = response_logprobs(_tiny_llama(), prompts, responses)
    turns = [(p, r, lp.tolist(), torch.randn(len(r), generator=gen).tolist())
             for p, r, lp in zip(prompts, responses, old)]
    mine = turns if rank is None else turns[:3] if rank == 0 else turns[3:]
    offsets = [sum(len(t[1]) for t in mine[:k]) for k in range(len(mine))]
    return TokenBatch([t[0] for t in mine], [t[1] for t in mine], offsets,
                      torch.tensor([x for t in mine for x in t[2]]), torch.tensor([x for t in mine for x in t[3]]), {})


def _update_cfg():
    from atod_edge.config import load_config
    from atod_edge.train.config import TrainConfig

    return load_config(TrainConfig, None, ["micro_batch=1", "ppo_epochs=2", "lr=1e-2"])


def _fsdp_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from atod_edge.train.distributed import DistInfo, shard_fsdp
    from atod_edge.train.update import update

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    info = DistInfo(rank, 2)
    model = _tiny_llama()
    shard_fsdp(model, "cpu", info)
    optimizer = torch.optim.AdamW(model.parameters(), lr=_update_cfg().lr)
    stats = update(model, optimizer, _turns(rank), _update_cfg(), info, pad_id=0, fsdp=True)
    # clone: waits for each all-gather (an unused async result would be torn down mid-flight)
    full = {name: p.full_tensor().clone() for name, p in model.named_parameters()}
    if rank == 0:
        torch.save({"weights": full, "stats": stats}, out)
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp_update_on_uneven_batches_equals_one_process_over_all_turns(tmp_path):
    """Rank 0 has three micro-batches, rank 1 one: rank 1 runs two zero-loss ones so the
    collectives match (without them this hangs), and the result is the one-process update."""
    import torch.multiprocessing as mp

    from atod_edge.train.distributed import DistInfo
    from atod_edge.train.update import update

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "fsdp.pt"
    try:
        mp.spawn(_fsdp_worker, args=(port, str(out)), nprocs=2, join=True)
    except mp.ProcessExitedException as error:
        # A gloo FSDP worker on CPU is sometimes killed by std::terminate inside torch (SIGABRT, "terminate
        # called without an active exception"; ~1 run in 12-40, not traced): spawn once more, on a new port.
        # A Python error in a worker raises ProcessRaisedException instead, and is never retried.
        if error.signal_name != "SIGABRT":
            raise
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_fsdp_worker, args=(port, str(out)), nprocs=2, join=True)
    sharded = torch.load(out, weights_only=True)

    model = _tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=_update_cfg().lr)
    stats = update(model, optimizer, _turns(None), _update_cfg(), DistInfo(), pad_id=0)
    assert sharded["stats"]["tokens"] == stats["tokens"]
    for key in ("loss", "grad_norm", "mean_ratio", "clip_fraction"):
        assert sharded["stats"][key] == pytest.approx(stats[key], rel=1e-4, abs=1e-6), key
    assert stats["mean_ratio"] != 1.0   # the second epoch ran on updated weights
    # Summation order differs between 2 shards and 1 process; Adam's first steps divide by |g|,
    # which can turn a 1e-7 gradient difference into a few 1e-6 of weight (1e-5 as in the ddp test).
    for name, param in model.named_parameters():
        torch.testing.assert_close(sharded["weights"][name], param.detach(), atol=1e-5, rtol=1e-5)
