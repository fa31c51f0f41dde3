"""The context budget every backend enforces: a prompt plus the tokens to generate must fit the
model's context, checked before anything is allocated.

Each backend knows its context (`Policy.context_length`): torch from the model config's
`max_position_embeddings`, ONNX Runtime from the config.json beside the .onnx file, llama.cpp from
the context it was opened with (`n_ctx`). A batch with a prompt that does not fit is refused with a
`ContextOverflow` (a UserError: one line) before the prefill, never an unbounded allocation. The
rollout engine and `Agent.act` cut prompts to fit before they reach a backend
(atod_edge.rollout.budget), so in a run this check is the backstop, not the policy.
"""

from __future__ import annotations

from typing import Any, Sequence

from atod_edge.errors import UserError

#: config keys that hold a model's context length, in the order they are tried
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


class ContextOverflow(UserError):
    """A prompt plus the tokens to generate is longer than the model's context."""


def model_context(config: Any) -> int | None:
    """The context length a transformers config (or its config.json as a dict) declares, or None."""
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    for key in CONTEXT_KEYS:
        value = get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_fits(prompts: Sequence[Sequence[int]], max_new_tokens: int, context: int | None,
               backend: str, hint: str = "") -> None:
    """Raise ContextOverflow when the longest prompt plus `max_new_tokens` exceeds `context`
    (None: no known limit)."""
    if context is None:
        return
    hint = f"; {hint}" if hint else ""
    if max_new_tokens >= context:
        raise ContextOverflow(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                              f"{backend} context ({context}){hint}")
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > context:
        raise ContextOverflow(f"prompt of {longest} tokens + {max_new_tokens} new exceeds the {backend} "
                              f"context ({context}){hint}")
