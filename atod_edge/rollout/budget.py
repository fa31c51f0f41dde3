"""The prompt budget: every prompt the rollout engine and `Agent.act` send to a model fits its context.

The budget is the model's context (`Policy.context_length`) less `max_new_tokens`, or a configured
`max_prompt_tokens` if smaller. A prompt within it is built and encoded exactly as
`prompts.encode_prompts` does (same ids, one tokenizer call per batch). A prompt over it is cut,
always in this order, until it fits:

1. history, oldest turn first, down to the last turn (its action and the observation it led to);
2. admissible actions longer than MAX_ACTION_CHARS (no reply could name them anyway);
3. the current observation and the task text (the episode's first observation) are cut to their
   tails, marked by a leading "[...] " (an observation states the new facts last; household's
   first observation ends with "Your task is to: ..."): the observation keeps at least half of
   the room left, the task the rest.

Before any of that, a text too long to fit even alone (over budget x 32 characters) is cut to its
tail without being tokenized, so a 1 MB observation costs one string slice, not a 1 MB encode.
A prompt whose fixed part (system instructions, template, admissible actions) leaves no room is
a `ContextOverflow` (one line): the env's instructions do not fit the model, a configuration
problem, not a turn's. Turns whose prompt was cut say so: `Episode.meta["prompt_cuts"]` counts
them in the rollout engine, `AgentAction.prompt_cut` tells the embedding program.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from atod_edge.engine.context import ContextOverflow
from atod_edge.envs.base import MAX_ACTION_CHARS
from atod_edge.prompts import MAX_ADMISSIBLE_SHOWN, build_messages, render_prompt

CUT_MARK = "[...] "
#: characters per token assumed for a text before it is tokenized: more than any real text averages
MAX_CHARS_PER_TOKEN = 32
#: tokens kept free for the cut mark and for merges at the edges of a cut text
_SLACK = 8

# (task text, full history of (action, observation that followed), current observation or None
# on the first turn, admissible actions): what build_messages takes, minus the fixed parts
PromptParts = tuple[str, Sequence[tuple[str, str]], "str | None", Sequence[str]]


def prompt_budget(policy, max_new_tokens: int, max_prompt_tokens: int | None = None) -> int | None:
    """Prompt tokens a turn may use with this policy (None: no known limit)."""
    context = getattr(policy, "context_length", None)
    budget = context - max_new_tokens if context else None
    if max_prompt_tokens:
        budget = max_prompt_tokens if budget is None else min(budget, max_prompt_tokens)
    if budget is not None and budget < 1:
        raise ContextOverflow(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                              f"model's context ({context})")
    return budget


class PromptFitter:
    """Builds, encodes and, where needed, cuts the prompts of one env's episodes for one budget."""

    def __init__(self, tokenizer, instructions: str, history_turns: int, budget: int | None,
                 chat_template_kwargs: Mapping[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.chat_template_kwargs = chat_template_kwargs
        self.instructions = instructions
        self.history_turns = history_turns
        self.budget = budget
        self._max_chars: int | None = None

    @property
    def max_chars(self) -> int:
        """The longest token's text (an upper bound on the characters one token covers)."""
        if self._max_chars is None:
            try:
                self._max_chars = max(1, max((len(t) for t in self.tokenizer.get_vocab()), default=1))
            except Exception:  # noqa: BLE001 - a tokenizer without get_vocab: assume the cap
                self._max_chars = MAX_CHARS_PER_TOKEN
        return self._max_chars

    def encode(self, items: Sequence[PromptParts]) -> list[tuple[list[int], str]]:
        """(prompt ids, what was cut: "" when nothing) for each item, in order."""
        if not items:
            return []
        texts = [self._render(*item, self.history_turns) for item in items]
        if self.budget is None:
            return [(list(ids), "") for ids in self._ids(texts)]
        plausible = [k for k, text in enumerate(texts) if len(text) <= self.budget * self.max_chars]
        out: list[tuple[list[int], str] | None] = [None] * len(items)
        for k, ids in zip(plausible, self._ids([texts[k] for k in plausible])):
            if len(ids) <= self.budget:
                out[k] = (list(ids), "")
        return [fitted if fitted is not None else self._cut(*items[k]) for k, fitted in enumerate(out)]

    # -- helpers -------------------------------------------------------------------------------
    def _render(self, task, history, observation, admissible, history_turns) -> str:
        messages = build_messages(self.instructions, task, history, observation, admissible, history_turns)
        return render_prompt(self.tokenizer, messages, self.chat_template_kwargs)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        # verbose=False: no "longer than the maximum sequence length" warning for a text being cut
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []

    def _count(self, text: str) -> int:
        return len(self._ids([text])[0]) if text else 0

    def _tail(self, text: str, keep: int) -> str:
        """The last `keep` tokens' worth of `text`, marked as cut (the text itself if it fits)."""
        if keep <= 0:
            return ""
        try:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            offsets = encoded["offset_mapping"]
        except Exception:  # noqa: BLE001 - a slow tokenizer has no offsets: cut by character share
            n = self._count(text)
            return text if n <= keep else CUT_MARK + text[len(text) - len(text) * keep // n:]
        if len(offsets) <= keep:
            return text
        return CUT_MARK + text[offsets[len(offsets) - keep][0]:]

    def _cut(self, task: str, history, observation, admissible) -> tuple[list[int], str]:
        budget = self.budget
        limit = budget * min(self.max_chars, MAX_CHARS_PER_TOKEN)
        notes: list[str] = []

        def pre(text: str) -> str:              # too long to fit even alone: its tail, untokenized
            if len(text) <= limit:
                return text
            if not notes:
                notes.append(f"texts over {limit} characters to their tails")
            return CUT_MARK + text[-limit:]

        shown = [(pre(a), pre(o)) for a, o in (list(history)[-self.history_turns:] if self.history_turns > 0 else [])]
        task, observation = pre(task), None if observation is None else pre(observation)
        admissible = list(admissible or [])[:MAX_ADMISSIBLE_SHOWN]

        def build(task, shown, observation, admissible) -> list[int]:
            return self._ids([self._render(task, shown, observation, admissible, len(shown))])[0]

        ids = build(task, shown, observation, admissible)
        if len(ids) > budget and len(shown) > 1:
            notes.append(f"history {len(shown)}->1 turns")
            while len(ids) > budget and len(shown) > 1:
                shown = shown[1:]
                ids = build(task, shown, observation, admissible)
        if len(ids) > budget and any(len(a) > MAX_ACTION_CHARS for a in admissible):
            admissible = [a for a in admissible if len(a) <= MAX_ACTION_CHARS]
            notes.append("over-long admissible actions")
            ids = build(task, shown, observation, admissible)
        if len(ids) > budget:
            ids = self._cut_texts(task, shown, observation, admissible, build, notes)
        return list(ids), (f"cut to {budget} tokens: {', '.join(notes)}" if notes else "")

    def _cut_texts(self, task, shown, observation, admissible, build, notes) -> list[int]:
        """Cut the current observation and the task text to their tails so the prompt fits."""
        budget = self.budget
        current = shown[-1][1] if shown else (observation or "")

        def with_texts(task_text, current_text):
            if shown:
                return build(task_text, [*shown[:-1], (shown[-1][0], current_text)], observation, admissible)
            return build(task_text, shown, None if observation is None else current_text, admissible)

        fixed = len(with_texts("", ""))
        if fixed + _SLACK > budget and admissible:
            admissible = []
            notes.append("admissible actions")
            fixed = len(with_texts("", ""))
        room = budget - fixed - _SLACK
        if room < 1:
            raise ContextOverflow(f"a prompt without its task and observation already takes {fixed} tokens "
                                  f"(system instructions and template), over the prompt budget of {budget}")
        n_task, n_current = self._count(task), self._count(current)
        for _ in range(4):
            keep_current = min(n_current, max(room - n_task, room // 2))
            keep_task = min(n_task, room - keep_current)
            ids = with_texts(self._tail(task, keep_task), self._tail(current, keep_current))
            if len(ids) <= budget:
                if keep_current < n_current:
                    notes.append(f"observation {n_current}->{keep_current} tokens")
                if keep_task < n_task:
                    notes.append(f"task text {n_task}->{keep_task} tokens")
                return ids
            room -= len(ids) - budget + _SLACK
            if room < 1:
                break
        raise ContextOverflow(f"cannot cut the prompt to the budget of {budget} tokens "
                              f"(the system instructions and template take {fixed})")
