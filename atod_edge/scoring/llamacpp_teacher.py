"""A teacher that runs from a GGUF file: llama.cpp scores the student's recorded tokens (lp_T).

Laptop-first distillation: a large quantized teacher sits in llama.cpp on the CPU (or in a second
machine's memory) while the student trains in torch. Only log-probs of recorded tokens are needed,
never sampling, so the scorer drives llama.cpp's batch API directly:

- float32 KV cache (type_k = type_v = 0, flash attention off): with the default f16 cache the
  logits drift ~5e-3 from PyTorch; with f32 an f32 file matches the torch teacher to ~1e-6.
- logits are requested only at the positions that predict a response token (each batch entry's
  `logits` flag), so the prompt tokens, most of every turn, cost a forward pass but no
  vocabulary-sized output row.
- batched scoring with prefix reuse through KV-cache sequences: the step's turns are sorted by
  their tokens and scored in rounds of up to n_seq - 1 turns. A round's common prefix (the G
  rollouts of a task start with the same prompt; every turn of a task with the same system prompt
  and task text) is evaluated once into sequence 0, or kept from the previous round's last turn
  as far as it still matches (llama_memory_seq_rm drops the rest), copied to each member's sequence with
  llama_memory_seq_cp (a unified KV cache: the copy shares cells, it costs no memory), and all
  members' suffixes go through llama_decode together, n_batch tokens a call.

The tokenizer check reads the GGUF's own vocabulary (token texts and the end-of-text id) and
compares it with the student's tokenizer, so a file that would give other ids for the same text
is refused before training starts.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from atod_edge.errors import UserError

GGML_TYPE_F32 = 0


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise UserError("a .gguf teacher needs llama-cpp-python (pip install 'atod-edge[export]')") from None
    return llama_cpp


def gguf_vocab_mismatch(llm, tokenizer) -> str | None:
    """Why the GGUF's vocabulary does not give the student tokenizer's ids, or None if it does:
    every token of the tokenizer must have the same text at the same id, and the same EOS."""
    llama_cpp = _llama_cpp()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_gguf = llama_cpp.llama_vocab_n_tokens(vocab)
    n_student = len(tokenizer)
    if n_gguf < n_student:
        return f"vocabulary of {n_gguf} tokens, the student's tokenizer has {n_student}"
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(n_student)))):
        text = llama_cpp.llama_vocab_get_text(vocab, i)
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        if token is not None and text != token:
            return f"token {i} is {text!r} in the GGUF, {token!r} in the student's tokenizer"
    eos = llama_cpp.llama_vocab_eos(vocab)
    if tokenizer.eos_token_id is not None and eos != tokenizer.eos_token_id:
        return f"end-of-text id {eos} in the GGUF, {tokenizer.eos_token_id} in the student's tokenizer"
    return None


def _log_softmax_pick(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log softmax(logits)[target] per row, accumulated in float64."""
    rows = logits.astype(np.float64)
    top = rows.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
    return (rows[np.arange(len(targets)), targets] - lse).astype(np.float32)


class LlamaCppTeacher:
    """lp_T from a GGUF file (atod_edge.scoring.teacher.load_teacher returns one for a .gguf path);
    `stats` counts the tokens scored, evaluated and reused from the cache since loading."""

    def __init__(self, llm, ctx, path: str, n_ctx: int, n_batch: int, n_seq: int):
        self.llm = llm                    # holds the model (and a minimal context of its own)
        self.ctx = ctx                    # the scoring context: n_seq sequences in one unified KV cache
        self.path = path
        self.n_ctx, self.n_batch, self.n_seq = n_ctx, n_batch, n_seq
        self.n_vocab = llm.n_vocab()
        self._trunk: list[int] = []       # the tokens whose keys/values sit in sequence 0 (positions 0..)
        self.stats = {"tokens": 0, "evaluated": 0, "reused": 0, "decode_calls": 0, "rounds": 0}

    @classmethod
    def load(cls, path: str | os.PathLike, student_tokenizer=None, n_threads: int | None = None,
             n_ctx: int | None = None, n_batch: int = 512, n_seq: int = 9) -> "LlamaCppTeacher":
        """n_ctx: KV cells shared by all sequences (default: the file's context, at most 4096);
        n_seq: sequences in the cache, the shared prefix (trunk) and up to n_seq - 1 turns."""
        llama_cpp = _llama_cpp()
        from atod_edge.engine.backends.llamacpp import trained_context

        file = Path(path)
        if not file.is_file():
            raise UserError(f"no GGUF teacher at {file}")
        n_ctx = int(n_ctx or min(trained_context(file), 4096))
        n_batch = max(1, min(int(n_batch), n_ctx))
        threads = int(n_threads or os.cpu_count() or 1)
        try:
            llm = llama_cpp.Llama(model_path=str(file), n_ctx=16, n_batch=16, n_ubatch=16, n_threads=threads,
                                  logits_all=False, verbose=False)
        except ValueError as e:   # llama-cpp-python's "Failed to load model from file"
            raise UserError(f"llama.cpp cannot load the teacher {file}: {e}") from None
        if student_tokenizer is not None:
            problem = gguf_vocab_mismatch(llm, student_tokenizer)
            if problem:
                llm.close()
                raise UserError(f"teacher {file} and the student tokenizers differ: {problem}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
        params.n_seq_max = max(2, int(n_seq))
        params.kv_unified = True             # sequences share cells: a copied prefix costs no memory
        params.type_k = params.type_v = GGML_TYPE_F32
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not ctx:
            llm.close()
            raise UserError(f"llama.cpp cannot create a scoring context for {file} (n_ctx={n_ctx})")
        return cls(llm, ctx, str(file), n_ctx, n_batch, params.n_seq_max)

    # ------------------------------------------------------------------ scoring

    def response_logprobs(self, prompts: Sequence[Sequence[int]],
                          responses: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per pair, float32 log pi_T(response_j | prompt, response_<j), as the torch scorer's
        atod_edge.scoring.logprobs.response_logprobs computes them.

        Turns are taken in sorted token order and scored in rounds of up to n_seq - 1: a round's
        common prefix (its trunk, capped before every member's first response-predicting position)
        is evaluated once in sequence 0, or kept from the previous round's last turn as far as it matches,
        copied to each member's sequence, and all members' suffixes go through llama_decode
        together, n_batch tokens a call. A turn joins a round only where that evaluates no token
        more than scoring it alone after its sorted predecessor would, so rounds save decode calls,
        never compute."""
        out: list[np.ndarray] = [np.zeros(0, dtype=np.float32) for _ in prompts]
        seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
        for k, (p, r) in enumerate(zip(prompts, responses)):
            if r and not p:
                raise ValueError("teacher scoring needs a non-empty prompt")
            if len(seqs[k]) > self.n_ctx:
                raise UserError(f"a turn of {len(seqs[k])} tokens exceeds the GGUF teacher's context "
                                f"({self.n_ctx}); load it with a larger n_ctx")
        order = sorted((k for k in range(len(seqs)) if responses[k]), key=lambda k: seqs[k])
        i = 0
        while i < len(order):
            members, trunk = [order[i]], len(prompts[order[i]]) - 1
            while i + len(members) < len(order) and len(members) < self.n_seq - 1:
                k = order[i + len(members)]
                # what k would share with the turn before it if scored alone (sorted order: the most)
                shared = min(_common_prefix(seqs[members[-1]], seqs[k]), len(prompts[k]) - 1)
                # join only where batching costs no extra token: k shares exactly the trunk (the first
                # member alone may shorten it for free: its own cost does not depend on the trunk)
                if len(members) > 1 and shared != trunk or shared > trunk:
                    break
                cells = shared + sum(len(seqs[m]) - 1 - shared for m in (*members, k))
                if cells > self.n_ctx:
                    break
                members.append(k)
                trunk = shared
            for k, lp in zip(members, self._score_round([seqs[k] for k in members],
                                                        [len(prompts[k]) for k in members], trunk)):
                out[k] = lp
            i += len(members)
        return out

    def _decode(self, batch, entries: list[tuple[int, int, int, bool]]) -> np.ndarray | None:
        """One llama_decode of (token, position, sequence, wants logits) entries; the log-softmax
        rows of the entries that want logits, in order (as a [n, n_vocab] float32 view copy)."""
        llama_cpp = _llama_cpp()
        for i, (token, pos, seq, wants) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = wants
        batch.n_tokens = len(entries)
        code = llama_cpp.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode failed with code {code} (KV cache full?)")
        self.stats["decode_calls"] += 1
        outputs = sum(e[3] for e in entries)
        if not outputs:
            return None
        ptr = ctypes.cast(llama_cpp.llama_get_logits(self.ctx), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(ptr, shape=(outputs, self.n_vocab)).copy()

    def _score_round(self, seqs: list[list[int]], prompt_lens: list[int], trunk: int) -> list[np.ndarray]:
        llama_cpp = _llama_cpp()
        mem = llama_cpp.llama_get_memory(self.ctx)
        if not self._trunk:       # nothing known to be cached (the first round, or after an error)
            llama_cpp.llama_memory_clear(mem, True)
        kept = min(_common_prefix(self._trunk, seqs[0]), trunk)
        llama_cpp.llama_memory_seq_rm(mem, 0, kept, -1)
        self._trunk = []          # until the round is done (an error midway leaves the cache unknown)
        batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        picked: list[list[np.ndarray]] = [[] for _ in seqs]
        try:
            for start in range(kept, trunk, self.n_batch):          # the trunk, no logits needed
                self._decode(batch, [(seqs[0][pos], pos, 0, False) for pos in range(start, min(trunk, start + self.n_batch))])
            for j in range(len(seqs)):
                llama_cpp.llama_memory_seq_cp(mem, 0, j + 1, 0, -1)
            # every member's suffix: positions trunk .. len-2 (the last token predicts nothing)
            entries = [(seq[pos], pos, j + 1, pos >= prompt_lens[j] - 1, j)
                       for j, seq in enumerate(seqs) for pos in range(trunk, len(seq) - 1)]
            for start in range(0, len(entries), self.n_batch):
                chunk = entries[start:start + self.n_batch]
                logits = self._decode(batch, [e[:4] for e in chunk])
                if logits is None:
                    continue
                wanted = [e for e in chunk if e[3]]
                targets = np.array([seqs[e[4]][e[1] + 1] for e in wanted], dtype=np.int64)
                lps = _log_softmax_pick(logits, targets)
                owners = np.array([e[4] for e in wanted])
                for j in np.unique(owners):
                    picked[j].append(lps[owners == j])
            # the last member's tokens become sequence 0: the next round's first turn, next in sorted
            # order, shares the most with it
            last = len(seqs)
            for j in range(1, last):
                llama_cpp.llama_memory_seq_rm(mem, j, -1, -1)
            llama_cpp.llama_memory_seq_rm(mem, 0, -1, -1)
            llama_cpp.llama_memory_seq_cp(mem, last, 0, -1, -1)
            llama_cpp.llama_memory_seq_rm(mem, last, -1, -1)
            self._trunk = seqs[-1][:-1]
        finally:
            llama_cpp.llama_batch_free(batch)
        evaluated = (trunk - kept) + sum(len(seq) - 1 - trunk for seq in seqs)
        self.stats["rounds"] += 1
        self.stats["tokens"] += sum(len(seq) for seq in seqs)
        self.stats["evaluated"] += evaluated
        self.stats["reused"] += sum(len(seq) - 1 for seq in seqs) - evaluated
        return [np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32) for parts in picked]

    def score_episodes(self, episodes) -> None:
        """Fill `teacher_logprobs` of every token-level turn (llama.cpp batches by tokens: n_batch
        per decode call)."""
        from atod_edge.scoring.logprobs import turn_pairs

        prompts, responses, where = turn_pairs(episodes)
        for (e, t), lp in zip(where, self.response_logprobs(prompts, responses)):
            episodes[e].turns[t].teacher_logprobs = lp.tolist()

    def close(self) -> None:
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            _llama_cpp().llama_free(ctx)
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.close()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
