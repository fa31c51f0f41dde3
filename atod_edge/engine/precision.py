"""Devices and the precision a forward runs in: one place for every stage (engine, scoring,
training) to turn a user's device name into a torch.device and a precision into an autocast scope."""

from __future__ import annotations

import contextlib

from atod_edge.errors import UserError


def torch_device(name: str):
    """A torch.device for a user-given name, or a one-line UserError (a typo, or CUDA asked for
    where torch has none) instead of torch's traceback."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device '{name}' (examples: cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{name}': CUDA is not available here "
                            f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device '{name}': only {torch.cuda.device_count()} CUDA device(s) here")
    return device


PRECISIONS = ("auto", "fp32", "bf16")


def compute_autocast(device, precision: str = "auto"):
    """The autocast scope of a forward: bf16 autocast for "bf16" (on any device, CPU included) and
    for "auto" on CUDA; none for "fp32" and for "auto" on CPU (CPU runs stay fp32 unless asked:
    bf16 matmuls are fast only on CPUs with AMX or avx512_bf16, and samples change with precision).
    Weights keep their own dtype: an fp32 student computes in bf16 inside it (mixed precision)."""
    import torch

    device = torch.device(device)
    if autocasts_to_bf16(device, precision):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocasts_to_bf16(device, precision: str = "auto") -> bool:
    """Whether compute_autocast(device, precision) is a bf16 autocast."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}': expected one of {', '.join(PRECISIONS)}")
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")
