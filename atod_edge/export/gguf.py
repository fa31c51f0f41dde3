"""GGUF export: write f32/f16 with the `gguf` package's writer, quantize with llama.cpp itself.

The file carries everything llama.cpp needs to load and chat: hyperparameters, the byte-level BPE
tokenizer (tokens, types, merges, the pre-tokenizer name), special token ids and the chat
template. Quantized types come from `llama_cpp.llama_model_quantize`; llama.cpp silently swaps in
another type when a tensor's rows do not divide into its blocks (32, or 256 for K-quants), so
`tensor_types` reads the written file back and `quant_fallbacks` reports every such tensor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from atod_edge.errors import UserError
from atod_edge.io import atomic_path
from atod_edge.models.loading import decoder_dims

# model_type -> (gguf arch name, q/k rows need the rotate-half -> interleaved permutation)
ARCHS = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}

# quant name -> llama.cpp ftype constant name (llama_cpp.LLAMA_FTYPE_*)
QUANT_FTYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
FLOAT_TYPES = ("f32", "f16")
ALL_TYPES = FLOAT_TYPES + tuple(QUANT_FTYPES)

# Tensor types a 2-D weight may legitimately have in each file type. llama.cpp's mixes upgrade
# some tensors on purpose (Q4_K_M keeps attn_v/ffn_down/output partly in Q6_K); anything outside
# the set is a fallback (e.g. Q5_0/Q8_0/F16 because the row length does not divide into blocks).
EXPECTED_TYPES = {
    "f32": {"F32"},
    "f16": {"F16"},
    "q8_0": {"Q8_0"},
    "q4_0": {"Q4_0", "Q4_1", "Q6_K"},
    "q4_k_m": {"Q4_K", "Q5_K", "Q6_K"},
    "q5_k_m": {"Q5_K", "Q6_K"},
    "q6_k": {"Q6_K"},
}


def pre_tokenizer_name(model_dir: Path, model_type: str) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, read from tokenizer.json.

    A bare ByteLevel pre-tokenizer (our own tokenizers) is "gpt-2"; SmolLM2 puts single-digit
    splitting before ByteLevel: "smollm"; Qwen-family tokenizers split with their own regex
    first: "qwen2". Verification re-tokenizes text with llama.cpp and reports any mismatch.
    """
    try:
        spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{model_dir}: no readable tokenizer.json (GGUF export needs a fast "
                        "byte-level BPE tokenizer)") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{model_dir}: tokenizer model is {model.get('type')!r}; GGUF export "
                        "supports byte-level BPE only")
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and model_type in ("qwen2", "qwen3"):
        return "qwen2"
    raise UserError(f"{model_dir}: pre-tokenizer {kinds} has no known llama.cpp name; "
                    "supported: ByteLevel (gpt-2), Digits+ByteLevel (smollm), Qwen's Split+ByteLevel (qwen2)")


def _permute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """HF stores each head's q/k rows as [first halves | second halves] (rotate-half RoPE);
    llama.cpp's Llama graph rotates adjacent pairs, so interleave the two halves per head."""
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)


def _vocab(tokenizer, n_vocab: int):
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            # embedding rows beyond the tokenizer (padding): llama.cpp needs one entry per row
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_gguf(model_dir: str | Path, path: str | Path, out_type: str = "f16", name: str = "agent") -> Path:
    """Write an HF checkpoint directory (fp32 weights, save_pretrained layout) as f32/f16 GGUF."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if out_type not in FLOAT_TYPES:
        raise UserError(f"write_gguf writes f32 or f16, not '{out_type}' (quantize afterwards)")
    model_dir, path = Path(model_dir), Path(path)
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in ARCHS:
        raise UserError(f"GGUF export supports {', '.join(ARCHS)} models, not '{config.model_type}'")
    scaling = getattr(config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise UserError(f"GGUF export does not support rope_scaling {scaling}")
    arch_name, permute = ARCHS[config.model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    dims = decoder_dims(config)
    n_layers, n_heads, n_kv, head_dim = dims["layers"], dims["heads"], dims["kv_heads"], dims["head_dim"]
    n_vocab = state["model.embed_tokens.weight"].shape[0]
    tie = bool(getattr(config, "tie_word_embeddings", False))
    names = gguf.get_tensor_name_map(arch, n_layers)

    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch=arch_name)
        writer.add_name(name)
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(int(n_layers))
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_head_count(int(n_heads))
        writer.add_head_count_kv(int(n_kv))
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
        writer.add_rope_dimension_count(int(head_dim))
        writer.add_rope_freq_base(float(getattr(config, "rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(int(n_vocab))
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if out_type == "f32"
                             else gguf.LlamaFileType.MOSTLY_F16)

        tokens, types = _vocab(tokenizer, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(model_dir, config.model_type))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
        if not special.merges:
            raise UserError(f"{model_dir}: tokenizer has no BPE merges")
        if "bos" not in special.special_token_ids and "bos" not in special.add_special_token:
            special.add_special_token["bos"] = False   # our ChatML tokenizers have no BOS
        special.add_to_gguf(writer, quiet=True)

        for hf_name, weight in state.items():
            if hf_name == "lm_head.weight" and tie:
                continue                      # tied: llama.cpp reuses token_embd
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UserError(f"GGUF export: no llama.cpp name for tensor '{hf_name}'")
            if permute and hf_name.endswith("self_attn.q_proj.weight"):
                weight = _permute_rotary(weight, n_heads)
            elif permute and hf_name.endswith("self_attn.k_proj.weight"):
                weight = _permute_rotary(weight, n_kv)
            if out_type == "f16" and weight.ndim == 2:
                weight = weight.astype(np.float16)
            writer.add_tensor(gguf_name, np.ascontiguousarray(weight))

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")


def quantize_gguf(source: str | Path, path: str | Path, quant: str, n_threads: int | None = None,
                  imatrix: dict | None = None) -> Path:
    """Quantize an f32/f16 GGUF into `path` with llama.cpp (llama_model_quantize); `imatrix`
    (GGUF tensor name -> mean squared input activation per column, export.calibrate) weighs
    the rounding of each column."""
    import ctypes

    try:
        import llama_cpp
    except ImportError:
        raise UserError("quantizing GGUF needs llama-cpp-python (pip install 'atod-edge[export]')") from None
    if quant not in QUANT_FTYPES:
        raise UserError(f"unknown GGUF quant '{quant}' (choices: {', '.join(ALL_TYPES)})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[quant])
    params.nthread = int(n_threads or 0)
    keep_alive = None
    if imatrix:
        entries, keep_alive = imatrix_array(imatrix)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep_alive.append(entries)
    # llama.cpp logs every tensor (and every fallback) to stderr; the report lists fallbacks
    # from the written file, so keep the log aside and show its tail only on failure
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with atomic_path(path) as tmp, _stderr_to_file(tmp.with_name("quantize.log")) as log_file:
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0 or not tmp.is_file():
                tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["no log"]
                raise UserError(f"llama.cpp failed to quantize {source} to {quant} (code {rc}): {tail[0]}")
    finally:
        log.setLevel(level)
    return Path(path)


@contextlib.contextmanager
def _stderr_to_file(log_path: Path):
    """Redirect file descriptor 2 (where C code writes) into `log_path` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log_path, "wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield log_path
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def tensor_types(path: str | Path) -> dict[str, str]:
    """Tensor name -> stored type name ("F16", "Q4_K", ...), read back from the written file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in reader.tensors}


def quant_fallbacks(path: str | Path, quant: str) -> list[dict]:
    """Weight matrices stored in a type outside what `quant` promises (llama.cpp fell back)."""
    import gguf

    expected = EXPECTED_TYPES.get(quant)
    if expected is None:
        return []
    reader = gguf.GGUFReader(str(path))
    fallbacks = []
    for t in reader.tensors:
        if len([d for d in t.shape if d > 1]) < 2:   # norms and biases stay F32 by design
            continue
        got = t.tensor_type.name
        if got not in expected:
            fallbacks.append({"tensor": t.name, "expected": sorted(expected), "got": got,
                              "row_length": int(t.shape[0])})
    return fallbacks


def type_histogram(path: str | Path) -> dict[str, int]:
    return dict(Counter(tensor_types(path).values()))


def imatrix_array(imatrix: dict[str, np.ndarray]):
    """(ctypes array for llama_model_quantize_params.imatrix, buffers to keep alive meanwhile)."""
    import ctypes

    import llama_cpp

    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()   # zeroed: the last ends it
    buffers = []
    for entry, (name, values) in zip(entries, imatrix.items()):
        data = np.ascontiguousarray(values, dtype=np.float32)
        encoded = name.encode()
        buffers += [data, encoded]
        entry.name = encoded
        entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = data.size
    return entries, buffers
