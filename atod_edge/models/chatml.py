"""The ChatML special tokens and chat template that the built-in presets' tokenizers share (the
tiny tokenizer is trained with them, the SmolLM2 tokenizer is rebuilt around them).

A leaf of models/: tiny.py and smollm2.py import it; it imports nothing.
"""

from __future__ import annotations

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
