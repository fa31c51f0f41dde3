"""Loading a model and its tokenizer, and the checks that refuse what would silently go wrong:
`load_model` / `load_tokenizer` take any name `resolve_model` accepts (preset, zoo model,
checkpoint directory) and refuse weight files that do not match their config; `check_same_tokenizer`
refuses a teacher and a student that would give different ids for the same text.

Data flow: presets.py resolves a name to a directory -> this module loads it -> the engine, the
scorers, training and export use the (model, tokenizer) pair. surgery.py and describe.py stand on it.
"""

from __future__ import annotations

import os

from atod_edge.errors import UserError
from atod_edge.models.presets import resolve_model


def _torch_dtype(dtype, device: str):
    import torch

    if dtype is None:
        # fp32 on CPU (bf16 matmuls are slow there); the checkpoint's own dtype on accelerators.
        return torch.float32 if str(device).startswith("cpu") else "auto"
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise UserError(f"unknown dtype '{dtype}' (choices: {', '.join(names)}, auto)")
    return names[dtype]


def load_tokenizer(path_or_name: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer of a preset or checkpoint directory."""
    path = resolve_model(path_or_name)
    return load_tokenizer_dir(path, f"the tokenizer of '{path_or_name}'", trust_remote_code)


def load_tokenizer_dir(directory: str | os.PathLike, what: str, trust_remote_code: bool = False):
    """AutoTokenizer.from_pretrained(directory), with any failure as one line naming `what`: a
    missing, empty or garbage tokenizer.json makes transformers and tokenizers raise many types
    (OSError, ValueError, TypeError, KeyError, the tokenizers' Exception), none of them ours."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - whatever the file did to the parser, it is the file's fault
        raise UserError(f"cannot load {what} ({directory}): {type(e).__name__}: {_first_line(e)}") from None


def load_model(path_or_name: str | os.PathLike, device: str = "cpu", dtype=None,
               trust_remote_code: bool = False):
    """(model, tokenizer) for a preset name or checkpoint directory, in eval mode on `device`.

    dtype: None (fp32 on CPU, the checkpoint's dtype elsewhere), "auto", a name like "bf16",
    or a torch.dtype. device="meta" reads no weights: it only checks that the weight files match
    the config (every tensor there, none extra, the right shapes), as every load does.
    A damaged or foreign weight file is refused with a UserError naming the file and the tensors.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = resolve_model(path_or_name)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    files = sorted(f.name for f in path.glob("*.safetensors"))
    weights = str(path / files[0]) if len(files) == 1 else f"{path} ({', '.join(files) or 'no safetensors'})"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # the "newly initialized" warnings: refused below instead
    try:
        # ignore_mismatched_sizes: a wrong shape lands in the loading info (with its tensor's
        # name) instead of a RuntimeError naming only "weight"; it is refused all the same
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=_torch_dtype(dtype, device), trust_remote_code=trust_remote_code,
            output_loading_info=True, ignore_mismatched_sizes=True,
            **({"device_map": "meta"} if str(device) == "meta" else {}))
    except (OSError, ValueError, SafetensorError) as e:
        raise UserError(f"cannot load model '{path_or_name}': {weights}: {_first_line(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = _loading_problems(info)
    if problems:
        # transformers would run on with random weights in place of these: a damaged or foreign file
        raise UserError(f"cannot load model '{path_or_name}': {weights} does not match its "
                        f"config.json ({problems}); the file is damaged or from another model")
    _check_vocabulary(model, tokenizer, path_or_name)
    if str(device) != "meta":
        _check_finite(model, f"cannot load model '{path_or_name}': {weights}")
    return model.to(device).eval(), tokenizer


def _check_vocabulary(model, tokenizer, name) -> None:
    """Refuse a tokenizer with ids past the model's embedding rows (a tokenizer swapped for one of
    another model): such ids index outside the embedding at the first prompt that uses them."""
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise UserError(f"cannot load model '{name}': its tokenizer has {len(tokenizer)} entries but the "
                        f"model has {rows} embedding rows: the tokenizer is from another model")


def _check_finite(model, what: str) -> None:
    """Refuse weights holding NaN or inf (a damaged file, or a diverged run's checkpoint): one fp32
    sum per tensor (no copy of the weights; NaN and inf propagate into the sum), one host sync."""
    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point() and p.device.type != "meta"]
    if not named:
        return
    with torch.no_grad():
        sums = torch.stack([p.sum(dtype=torch.float32) for _, p in named])
        finite = torch.isfinite(sums)
        if bool(finite.all()):
            return
        bad = [n for (n, _), ok in zip(named, finite.tolist()) if not ok]
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise UserError(f"{what} holds NaN or inf weights ({', '.join(bad[:3])}{more}): the model is damaged")


def _loading_problems(info: dict, shown: int = 3) -> str:
    """The missing / unexpected / mismatched tensors of from_pretrained's loading info, in one line."""
    parts = []
    for key, label in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                       ("mismatched_keys", "wrong shape")):
        names = sorted(k if isinstance(k, str) else k[0] for k in info.get(key) or [])
        if names:
            more = f" and {len(names) - shown} more" if len(names) > shown else ""
            parts.append(f"{label}: {', '.join(names[:shown])}{more}")
    if info.get("error_msgs"):
        parts.append(_first_line(Exception(info["error_msgs"][0])))
    return "; ".join(parts)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def decoder_dims(config) -> dict[str, int]:
    """A transformers config's decoder shape as its attention lays it out: layers, heads, kv_heads
    (num_key_value_heads, or heads where unset) and head_dim (config.head_dim, or hidden_size /
    heads where unset); a multimodal config's text decoder."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    return {"layers": config.num_hidden_layers, "heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


def check_same_tokenizer(tok_a, tok_b, name_a: str = "teacher", name_b: str = "student") -> None:
    """Refuse two tokenizers that would not give the same ids for the same text (UserError naming
    the first difference). Distillation compares log-probs token by token, so they must match."""
    prefix = f"{name_a} and {name_b} tokenizers differ"
    vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
    if len(vocab_a) != len(vocab_b):
        raise UserError(f"{prefix}: vocab size {len(vocab_a)} vs {len(vocab_b)}")
    if vocab_a != vocab_b:
        token = next(t for t in sorted(vocab_a) if vocab_a[t] != vocab_b.get(t))
        raise UserError(f"{prefix}: token {token!r} has id {vocab_a[token]} vs {vocab_b.get(token)}")
    for role in ("eos_token", "pad_token", "bos_token"):
        a, b = getattr(tok_a, role, None), getattr(tok_b, role, None)
        if str(a) != str(b):
            raise UserError(f"{prefix}: {role} {a!r} vs {b!r}")
    added_a = {i: str(t) for i, t in tok_a.added_tokens_decoder.items()}
    added_b = {i: str(t) for i, t in tok_b.added_tokens_decoder.items()}
    if added_a != added_b:
        i = next(i for i in sorted(set(added_a) | set(added_b)) if added_a.get(i) != added_b.get(i))
        raise UserError(f"{prefix}: added token {i} is {added_a.get(i)!r} vs {added_b.get(i)!r}")
    if (tok_a.chat_template or None) != (tok_b.chat_template or None):
        raise UserError(f"{prefix}: chat template "
                        f"{'set' if tok_a.chat_template else 'missing'} vs "
                        f"{'set' if tok_b.chat_template else 'missing'}"
                        + (" (different text)" if tok_a.chat_template and tok_b.chat_template else ""))
