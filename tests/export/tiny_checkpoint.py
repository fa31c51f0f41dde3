"""A tiny Llama checkpoint with a byte-level BPE tokenizer and a ChatML template, for export tests.

Small (2 layers, hidden 256, ~1 MB), built in about a second, and honest: a real
LlamaForCausalLM saved with save_pretrained plus a real trained tokenizer. Used until (and
besides) the built-in presets: `hidden` can be set to a width that is not a multiple of 256 to
provoke a K-quant fallback.
"""

from __future__ import annotations

from pathlib import Path

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CORPUS = [
    "You are in the kitchen. You see a fridge 1, a countertop 1 and a cabinet 2.",
    "Your task is to put a clean apple in the fridge.",
    "Admissible actions: go to fridge 1 | open fridge 1 | take apple 1 from countertop 1",
    "<action>open fridge 1</action> <action>go to countertop 1</action>",
    "Think briefly if you need to, then reply with exactly one action inside <action>...</action>.",
    "Nothing happens. The fridge 1 is open. In it, you see a lettuce 1 and a mug 2.",
    "0123456789 the quick brown fox jumps over the lazy dog, THE END! (ok?) [x] {y} #1 $2 %3",
]


def build_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None,
                                   chat_template=CHATML)


def build_checkpoint(path: str | Path, hidden: int = 256, intermediate: int = 512, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, tie: bool = True, seed: int = 0) -> Path:
    """Write a random-init tiny Llama checkpoint (weights scaled so logits are not flat)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=1024,
                         tie_word_embeddings=tie, initializer_range=0.08,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
