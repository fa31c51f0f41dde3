"""The training loop's distributed plumbing: which rank this process is (torchrun), the sums and
maxima over ranks, the barrier, FSDP2 sharding and the all-gather that refreshes the rollout copy,
and the optimizer state a checkpoint holds. With one process (no torchrun) every helper is a no-op
or the plain single-device call, so trainer.py, update.py and run_log.py call them unconditionally.

Two ways to hold the student (config `distributed`; trainer.py's docstring tells the whole story):
ddp, a whole replica per rank with gradients all-reduced by update.py, and fsdp (FSDP2,
shard_fsdp below), whose shards also hold the gradients and the AdamW state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from atod_edge.errors import UserError
from atod_edge.train.precision import fsdp_mixed_precision


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0   # the rank on this machine: which GPU this process drives

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(),
                    int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(value: int, info: DistInfo, device) -> int:
    if info.world == 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor(value, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


def all_reduce_max_tensor(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as dist

        dist.barrier()


def shard_fsdp(model, device: str, info: DistInfo, precision: str = "fp32") -> None:
    """FSDP2 in place: each decoder layer is its own shard group, the rest (embeddings, final norm,
    LM head) the root's. Gradients are summed, not averaged, like the ddp path (the loss is already
    a global token mean), with plain SUM collectives (gloo has no AVG/PREMUL_SUM). precision bf16:
    a MixedPrecisionPolicy (bf16 parameters in forward and backward, fp32 gradient reduction; the
    fp32 shards stay the master weights, see precision.py)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(f"distributed=fsdp: {type(model).__name__} has no model.layers to shard "
                        "(supported: Llama/Qwen/Mistral-style decoders); use distributed=ddp")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (info.world,))
    mixed = fsdp_mixed_precision(precision)
    options = {"mp_policy": mixed} if mixed is not None else {}
    for layer in layers:
        fully_shard(layer, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


@torch.no_grad()
def gather_full_weights(sharded, full) -> None:
    """Copy the sharded model's parameters into the unsharded copy `full` (an all-gather per
    parameter: every rank must call this, in the same order)."""
    targets = dict(full.named_parameters())
    for name, param in sharded.named_parameters():
        targets[name].copy_(param.full_tensor() if hasattr(param, "full_tensor") else param)


def optimizer_state(student, optimizer, fsdp: bool) -> dict:
    """The optimizer state to save. fsdp: the full (unsharded) state, gathered to rank 0 (every rank
    must call this; the others get an empty dict)."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(student, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(student, optimizer, state: dict, fsdp: bool, where: Path) -> None:
    try:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(student, optimizer, optim_state_dict=state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{where}: its optimizer state does not fit this run (were distributed or lora.* "
                        f"changed since?): {first}") from None
