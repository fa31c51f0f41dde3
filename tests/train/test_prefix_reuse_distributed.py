"""The update with prefix reuse under two gloo processes (ddp): the gradients summed over the
ranks equal those of one process running every turn on its own (the per-turn path)."""

from __future__ import annotations

import os
import socket

import pytest
import torch


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def _batch(rank: int | None):
    """Eight turns of two 'episodes' (a 24-token shared prefix each, then their own tokens);
    rank 0 holds five, rank 1 three, None all. lp_S: the model's own log-probs; random advantages."""
    from atod_edge.scoring.logprobs import response_logprobs
    from atod_edge.train.batch import TokenBatch

    gen = torch.Generator().manual_seed(3)
    shared = [torch.randint(1, 64, (24,), generator=gen).tolist() for _ in range(2)]
    prompts = [shared[k % 2] + torch.randint(1, 64, (3 + k,), generator=gen).tolist() for k in range(8)]
    responses = [torch.randint(1, 64, (1 + k % 3,), generator=gen).tolist() for k in range(8)]
    with torch.no_grad():
        old = response_logprobs(_tiny_llama(), prompts, responses)
    advantages = [torch.randn(len(r), generator=gen) for r in responses]
    mine = range(8) if rank is None else range(5) if rank == 0 else range(5, 8)
    offsets = [sum(len(responses[j]) for j in mine if j < k) for k in mine]
    return TokenBatch([prompts[k] for k in mine], [responses[k] for k in mine], offsets,
                      torch.cat([old[k] for k in mine]), torch.cat([advantages[k] for k in mine]), {})


def _cfg(reuse: bool):
    from atod_edge.config import load_config
    from atod_edge.train.config import TrainConfig

    return load_config(TrainConfig, None, ["micro_batch=3", "lr=0", "max_grad_norm=0",
                                           f"prefix_reuse={str(reuse).lower()}"])


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from atod_edge.train.distributed import DistInfo
    from atod_edge.train.update import update

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = _tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    stats = update(model, optimizer, _batch(rank), _cfg(True), DistInfo(rank, 2), pad_id=0)
    if rank == 0:
        torch.save({"grads": {n: p.grad for n, p in model.named_parameters()}, "stats": stats}, out)
    dist.barrier()
    dist.destroy_process_group()


def test_two_gloo_ranks_with_prefix_reuse_sum_to_the_per_turn_gradients(tmp_path):
    import torch.multiprocessing as mp

    from atod_edge.train.distributed import DistInfo
    from atod_edge.train.update import update

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(port, str(out)), nprocs=2, join=True)
    ranks = torch.load(out, weights_only=True)

    model = _tiny_llama()
    stats = update(model, torch.optim.AdamW(model.parameters(), lr=0.0), _batch(None), _cfg(False), DistInfo(),
                   pad_id=0)
    assert ranks["stats"]["tokens"] == stats["tokens"]
    assert ranks["stats"]["loss"] == pytest.approx(stats["loss"], rel=1e-5)
    for name, param in model.named_parameters():
        assert float(param.grad.norm()) > 0, name
        assert float((ranks["grads"][name] - param.grad).norm() / param.grad.norm()) < 1e-5, name
