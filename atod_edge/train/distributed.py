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
from datetime import timedelta
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
    """Join the process group when launched by torchrun (WORLD_SIZE > 1). With CUDA, this
    process's GPU (LOCAL_RANK) becomes the current device before the group exists, and NCCL is
    bound to it (device_id): without that every rank's first collective, pinned copy and
    synchronize would run on GPU 0. Also makes the long-wait group (wait_group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        options = {"device_id": torch.device("cuda", local_rank)} if cuda else {}
        dist.init_process_group(backend="nccl" if cuda else "gloo", **options)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)
    wait_group(info)   # here, where every rank passes at the same point: making a group is a collective
    return info


def rank_device(device: str, info: DistInfo) -> str:
    """This rank's device for a configured one: under torchrun, a CUDA device ("cuda" or any
    "cuda:N", the same recipe on every rank) is the rank's own GPU, cuda:LOCAL_RANK."""
    if device.startswith("cuda") and info.world > 1:
        return f"cuda:{info.local_rank}"
    return device


# Waits that can outlast NCCL's watchdog (10 minutes by default): a rank done with its share of an
# evaluation, or waiting while rank 0 writes, waits in a gloo group with this timeout instead
WAIT_TIMEOUT = timedelta(hours=12)
_wait_groups: dict[int, object] = {}   # id of the default group -> its long-wait gloo group


def wait_group(info: DistInfo):
    """The gloo group with WAIT_TIMEOUT over every rank (made on the first call: every rank must
    make the first call at the same point), or None with one process."""
    if info.world == 1:
        return None
    import torch.distributed as dist

    key = id(dist.group.WORLD)
    if key not in _wait_groups:
        _wait_groups.clear()   # a destroyed default group's
        _wait_groups[key] = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return _wait_groups[key]


def gather_to_main(value, info: DistInfo) -> list | None:
    """Every rank's `value` (any picklable object), in rank order, on rank 0 (None on the others),
    through the long-wait group: the ranks may arrive hours apart."""
    if info.world == 1:
        return [value]
    import torch.distributed as dist

    gathered = [None] * info.world if info.main else None
    dist.gather_object(value, gathered, dst=0, group=wait_group(info))
    return gathered


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
    """Every rank waits for the others, in the long-wait group (rank 0 may be writing a checkpoint)."""
    if info.world > 1:
        import torch.distributed as dist

        dist.barrier(group=wait_group(info))


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
