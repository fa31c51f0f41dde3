"""Layer surgery on checkpoints: `shrink_model` cuts a compact student from a bigger checkpoint
(keeping the layers `parse_keep_layers` names), `average_models` saves the uniform average of
several checkpoints of one architecture (a "model soup").

The top of models/ beside describe.py: it loads through loading.py and writes a new checkpoint
directory with a card (`PRESET_CARD`) saying where it came from; `atod-edge models shrink|average`
and the training pipeline call it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from atod_edge.errors import UserError
from atod_edge.io import atomic_path, atomic_write_json, check_output
from atod_edge.models.cache import PRESET_CARD
from atod_edge.models.loading import check_same_tokenizer, load_model


def parse_keep_layers(spec: str, num_layers: int) -> list[int]:
    """Layers to keep: "0,2,4" (explicit indices) or "every:N" (every N-th layer, first and last
    always included)."""
    spec = spec.strip()
    if spec.startswith("every:"):
        try:
            step = int(spec.split(":", 1)[1])
        except ValueError:
            step = 0
        if step < 1:
            raise UserError(f"layer spec '{spec}': expected every:N with N a positive integer")
        keep = list(range(0, num_layers, step))
        if keep[-1] != num_layers - 1:
            keep.append(num_layers - 1)
        return keep
    try:
        keep = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"layer spec '{spec}': expected comma-separated layer indices like 0,2,4 "
                        "or every:N") from None
    if not keep:
        raise UserError("layer spec is empty: give indices like 0,2,4 or every:N")
    bad = [i for i in keep if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"layer spec '{spec}': layer {bad[0]} out of range (model has {num_layers} "
                        f"layers: 0..{num_layers - 1})")
    if len(set(keep)) != len(keep) or keep != sorted(keep):
        raise UserError(f"layer spec '{spec}': indices must be increasing and distinct")
    return keep


def shrink_model(src: str | os.PathLike, keep_layers: list[int] | str,
                 out: str | os.PathLike, force: bool = False) -> Path:
    """Save a copy of `src` that keeps only `keep_layers` of its decoder layers (renumbered), with
    the embeddings, final norm, lm_head and tokenizer unchanged. Llama/Qwen/Mistral family.
    `out` must be new, empty or an earlier model (io.check_output; force: a foreign dir too)."""
    import torch

    _check_out(out, [src], force)
    model, tokenizer = load_model(src, dtype="auto")
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(f"cannot shrink '{src}': {type(model).__name__} has no model.layers "
                        "(supported: Llama/Qwen/Mistral-style decoders)")
    if isinstance(keep_layers, str):
        keep_layers = parse_keep_layers(keep_layers, len(layers))
    else:
        keep_layers = parse_keep_layers(",".join(str(i) for i in keep_layers), len(layers))
    decoder.layers = torch.nn.ModuleList(layers[i] for i in keep_layers)
    for new_index, layer in enumerate(decoder.layers):
        # The KV cache is indexed by layer_idx: renumber so kept layers use slots 0..n-1.
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index
    config = model.config
    source_layers = config.num_hidden_layers
    config.num_hidden_layers = len(keep_layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep_layers]
    if getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = min(config.max_window_layers, len(keep_layers))
    out = Path(out)
    with atomic_path(out, kind=None if force else "model") as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / PRESET_CARD, {
            "shrunk_from": str(src), "source_layers": source_layers, "kept_layers": keep_layers,
            "params": sum(p.numel() for p in model.parameters())})
    return out


def average_models(srcs: Sequence[str | os.PathLike], out: str | os.PathLike, force: bool = False) -> Path:
    """Save the uniform average of the weights of `srcs` (checkpoint averaging, a "model soup":
    e.g. the outputs of consecutive SFT runs from one start, which sit in one basin). They must be
    one architecture (the same parameter names and shapes) with one tokenizer; the output takes
    the first one's config and tokenizer."""
    import torch

    if len(srcs) < 2:
        raise UserError("average needs at least two models")
    _check_out(out, srcs, force)
    model, tokenizer = load_model(srcs[0], dtype="auto")
    total = {name: p.detach().float().clone() for name, p in model.state_dict().items()}
    for src in srcs[1:]:
        other, other_tokenizer = load_model(src, dtype="auto")
        check_same_tokenizer(tokenizer, other_tokenizer, str(srcs[0]), str(src))
        state = other.state_dict()
        if state.keys() != total.keys():
            missing = sorted(set(total) ^ set(state))[0]
            raise UserError(f"cannot average '{srcs[0]}' and '{src}': parameter {missing} is in only one of them")
        for name, tensor in state.items():
            if tensor.shape != total[name].shape:
                raise UserError(f"cannot average '{srcs[0]}' and '{src}': {name} is {tuple(total[name].shape)} "
                                f"vs {tuple(tensor.shape)}")
            total[name] += tensor.float()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(total[name] / len(srcs))
    out = Path(out)
    with atomic_path(out, kind=None if force else "model") as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / PRESET_CARD, {"averaged_from": [str(s) for s in srcs],
                                              "params": sum(p.numel() for p in model.parameters())})
    return out


def _check_out(out: str | os.PathLike, srcs: Sequence[str | os.PathLike], force: bool) -> None:
    """The output rule (io.check_output), and `out` is none of the models it is made from."""
    check_output(out, "model", force=force)
    for src in srcs:
        if Path(src).exists() and Path(src).resolve() == Path(out).resolve():
            raise UserError(f"--out {out} is the input model {src}: write the new model elsewhere")
