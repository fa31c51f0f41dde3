"""The teacher of distillation: whatever fills lp_T, the log-probs of the student's recorded tokens.

    load_teacher("ckpt-dir" or a preset, ...)   a transformers model, scored in torch (scoring.py)
    load_teacher("teacher.q4_k_m.gguf", ...)    a LlamaCppTeacher (backends/llamacpp_teacher.py): a
                                                large quantized teacher in llama.cpp on a laptop CPU,
                                                beside the student training in torch

Both are checked against the student's tokenizer when loaded, and `score_episodes` fills
`teacher_logprobs` with either, so the trainer does not care which one it got.
"""

from __future__ import annotations

from pathlib import Path


def is_gguf(source: str | Path) -> bool:
    return str(source).lower().endswith(".gguf")


def load_teacher(source: str | Path, device: str, student_tokenizer, n_threads: int | None = None,
                 precision: str = "auto"):
    """The teacher at `source` (checkpoint dir, preset, or .gguf file), in eval mode without
    gradients, refused with a UserError naming the first difference if its tokenizer is not the
    student's. Where `precision` scores under bf16 autocast (engine.precision), its linear layers
    are held in bf16 (bf16_linears)."""
    if is_gguf(source):
        from atod_edge.scoring.llamacpp_teacher import LlamaCppTeacher

        return LlamaCppTeacher.load(source, student_tokenizer=student_tokenizer, n_threads=n_threads)
    from atod_edge.models.loading import check_same_tokenizer, load_model

    model, tokenizer = load_model(source, device=device)
    model.eval().requires_grad_(False)
    check_same_tokenizer(tokenizer, student_tokenizer, "teacher", "student")
    from atod_edge.engine.precision import autocasts_to_bf16

    if autocasts_to_bf16(device, precision):
        bf16_linears(model)
    return model


def bf16_linears(model) -> None:
    """Cast a frozen model's fp32 linear layers to bf16, except the LM head (the scorer computes
    it in fp32, scoring/tokens.py, and it is often tied to the embedding). Under bf16 autocast this
    changes no value: autocast rounds a linear's fp32 weight to bf16 at every call, and caches
    that cast only for weights that require gradients, so a frozen teacher paid it on every
    forward; now it is paid once."""
    import torch

    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head and module.weight.dtype == torch.float32:
            module.to(torch.bfloat16)


def score_episodes(teacher, episodes, **torch_options) -> None:
    """Fill `teacher_logprobs` of every token-level turn of `episodes` with `teacher` (a model from
    load_teacher). torch_options (pad_id, micro_batch, ...) go to atod_edge.scoring.logprobs.score_episodes;
    llama.cpp batches by tokens and ignores them."""
    from atod_edge.scoring.llamacpp_teacher import LlamaCppTeacher

    if isinstance(teacher, LlamaCppTeacher):
        teacher.score_episodes(episodes)
        return
    from atod_edge.scoring.logprobs import score_episodes as score_in_torch

    score_in_torch(teacher, episodes, **torch_options)
