"""LoRA for large students, through peft (optional: pip install 'atod-edge[lora]').

With lora.rank > 0 the trainer freezes the student and trains low-rank adapters on the chosen
projections, W' = W + (alpha / r) B A (Hu et al., 2021; B starts at zero, so step 0 is the
student itself). Everything the trainer saves as a transformers checkpoint is the *merged* plain
model, so export and `atod-edge eval` read it unchanged; the adapter is saved beside it in
CHECKPOINT/adapter/ (peft's layout: `PeftModel.from_pretrained(base, CHECKPOINT/adapter)` loads
it), and resume restores the exact adapter weights from there on top of the original student.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from atod_edge.errors import UserError

ADAPTER_DIR = "adapter"
INSTALL_HINT = "pip install 'atod-edge[lora]' (or: pip install peft)"


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def require_peft() -> None:
    if not peft_available():
        raise UserError(f"lora.rank > 0 needs peft, which is not installed: {INSTALL_HINT}")


def add_adapters(model, rank: int, alpha: float, dropout: float, target_modules: list[str]):
    """Wrap `model` with fresh LoRA adapters (only they require grad); returns the PeftModel.
    Train and roll out with `.get_base_model()`: the same transformers model with the LoRA
    layers inside, so the code that calls `model.model` and `get_output_embeddings()` works."""
    require_peft()
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none", task_type="CAUSAL_LM")
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as e:   # e.g. "Target modules {...} not found in the base model"
        first = (str(e).strip().splitlines() or ["invalid LoRA settings"])[0]
        raise UserError(f"config key 'lora.target_modules' ({', '.join(target_modules)}): {first}") from None
    base = wrapped.get_base_model()
    if getattr(base, "is_gradient_checkpointing", False):
        # reentrant checkpointing needs an input that requires grad, or the frozen embeddings
        # cut the graph and the adapters get no gradient
        base.enable_input_require_grads()
    return wrapped


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The plain transformers state dict of `model` (the base model with LoRA layers inside) with
    every adapter merged in: W + delta for adapted weights, adapter tensors dropped, peft's
    `.base_layer.` renamed away. The live model is left as it is (no in-place merge/unmerge,
    which would not restore W bit for bit); only one delta at a time is materialised."""
    from peft.tuners.lora import LoraLayer

    lora_layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    merged: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            owner, leaf = key.rsplit(".base_layer.", 1)
            layer = lora_layers.get(owner)
            if layer is not None and leaf == "weight":
                delta = sum(layer.get_delta_weight(name).float() for name in layer.active_adapters
                            if name in layer.lora_A)
                value = (value.float() + delta).to(value.dtype)
            key = f"{owner}.{leaf}"
        merged[key] = value.detach()
    return merged


def save_adapter(wrapped, path: Path) -> None:
    """peft's own layout (adapter_config.json, adapter_model.safetensors) in PATH."""
    wrapped.save_pretrained(str(path), safe_serialization=True)


def load_adapter(wrapped, checkpoint: Path) -> None:
    """Put the adapter weights of CHECKPOINT/adapter into `wrapped` (exactly as saved)."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    path = Path(checkpoint) / ADAPTER_DIR
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{checkpoint}: no LoRA adapter in it ({ADAPTER_DIR}/ is missing): the run was "
                        "trained without lora.rank; resume it with lora.rank=0")
    mismatch = UserError(f"{path}: does not fit the lora settings of this run (lora.rank and "
                         "lora.target_modules must be those it was trained with)")
    try:
        result = set_peft_model_state_dict(wrapped, load_peft_weights(str(path), device="cpu"))
    except RuntimeError:   # a shape mismatch: lora.rank changed since the checkpoint
        raise mismatch from None
    missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k]
    if getattr(result, "unexpected_keys", None) or missing:
        raise mismatch
