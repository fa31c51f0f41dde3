"""Tests for atod_edge/prompts.py: the action parser, the prompt builder, prompt encoding."""

from __future__ import annotations

import copy
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atod_edge.envs.base import MAX_ACTION_CHARS
from atod_edge.prompts import MAX_ADMISSIBLE_SHOWN, RESPONSE_FORMAT, ParsedAction, build_messages, encode_prompt, format_response, parse_action, render_prompt

# text biased towards the parser's own tags, so the interesting cases come up often
TAGGY_TEXT = st.lists(st.one_of(st.text(max_size=30), st.sampled_from(
    ["<action>", "</action>", "<ACTION>", "</Action>", "<action", "action>", "\x00", "\n", " "])),
    max_size=20).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), TAGGY_TEXT))
def test_parse_action_never_raises_and_returns_a_clean_action_or_a_reason(text):
    parsed = parse_action(text)
    assert isinstance(parsed, ParsedAction)
    if parsed.action is None:
        assert parsed.reason
    else:
        assert parsed.reason == ""
        assert parsed.action == parsed.action.strip() and parsed.action.isprintable()
        assert 0 < len(parsed.action) <= MAX_ACTION_CHARS
        assert "<action>" not in parsed.action.lower() and "</action>" not in parsed.action.lower()


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126).filter(lambda c: c not in "<>"),
               min_size=1, max_size=50),
       st.text(max_size=40), st.text(max_size=40))
def test_an_action_inside_tags_is_found_whatever_surrounds_it(action, before, after):
    # whatever the text before it (even a stray opening tag), the first complete action is found
    text = f"{before.replace('</action>', '')}<action>{action}</action>{after}"
    assert parse_action(text).action == action


@pytest.mark.parametrize("text, action", [
    ("I should open it. <action>open fridge 1</action>", "open fridge 1"),
    ("<action>go to desk 1</action> then <action>look</action>", "go to desk 1"),   # the first
    ("<ACTION>  take   mug 1\n from  desk 1 </Action>", "take mug 1 from desk 1"),  # spaces folded
    ("<action><action>look</action>", "look"),                                      # innermost
    ("</action> oops <action>buy</action>", "buy"),
])
def test_parse_action_extracts_the_first_action(text, action):
    assert parse_action(text) == ParsedAction(action)


@pytest.mark.parametrize("text, reason", [
    ("open fridge 1", "no <action>"),
    ("", "no <action>"),
    ("<action>open fridge 1", "unterminated"),
    ("<action>   </action>", "empty"),
    ("<action>" + "x" * (MAX_ACTION_CHARS + 1) + "</action>", "longer than"),
    ("<action>open\x00fridge</action>", "control characters"),
    ("<action>go\x1b[31m</action>", "control characters"),
    (None, "not text"),
])
def test_parse_action_rejects_with_a_reason(text, reason):
    parsed = parse_action(text)
    assert parsed.action is None and reason in parsed.reason


def test_parse_action_is_fast_on_adversarial_text():
    started = time.perf_counter()
    for text in ("<action>" * 50_000, "<action>" * 50_000 + "</action>", "x" * 500_000):
        parse_action(text)
    # generous bound: the old lazy regex took minutes here (quadratic in the number of tags)
    assert time.perf_counter() - started < 5.0


def test_format_response_round_trips_through_the_parser():
    assert parse_action(format_response("look", "I am lost.")).action == "look"
    assert format_response("look") == "<action>look</action>"


def test_build_messages_keeps_the_task_and_only_the_last_h_turns():
    history = [(f"action {i}", f"observation after {i}") for i in range(5)]
    messages = build_messages("Use verbs.", "TASK: put a mug in the fridge.", history,
                              "observation after 4", ["look", "inventory"], history_turns=2)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"].startswith("Use verbs.") and RESPONSE_FORMAT in messages[0]["content"]
    user = messages[1]["content"]
    assert user.startswith("TASK: put a mug in the fridge.")
    assert "> action 3" in user and "> action 4" in user and "observation after 3" in user
    for old in range(3):
        assert f"action {old}" not in user and f"observation after {old}" not in user
    assert user.count("observation after 4") == 1          # the current one is not repeated
    assert user.rstrip().endswith("Admissible actions: look | inventory")


def test_build_messages_first_turn_and_no_history():
    first = build_messages("", "TASK", [], None, None)[1]["content"]
    assert first == "TASK"
    no_history = build_messages("", "TASK", [("a", "seen a")], "seen a", ["b"], history_turns=0)[1]["content"]
    assert "> a" not in no_history and "Current observation:\nseen a" in no_history


def test_build_messages_caps_the_admissible_list():
    many = [f"go to shelf {i}" for i in range(MAX_ADMISSIBLE_SHOWN + 10)]
    user = build_messages("", "TASK", [], None, many)[1]["content"]
    assert f"shelf {MAX_ADMISSIBLE_SHOWN - 1}" in user and f"shelf {MAX_ADMISSIBLE_SHOWN}" not in user


def test_encode_prompt_uses_the_chat_template(tiny_student):
    _, tokenizer = tiny_student
    messages = build_messages("Use verbs.", "TASK", [("look", "You see a desk.")], "You see a desk.", ["look"])
    ids = encode_prompt(tokenizer, messages)
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nUse verbs.")
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids   # a special token, not its letters


def test_encode_prompt_without_a_chat_template_uses_plain_text(tiny_student):
    _, tokenizer = tiny_student
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    messages = build_messages("Use verbs.", "TASK", [], None, ["look"])
    text = render_prompt(plain, messages)
    assert text.startswith("### system\nUse verbs.") and text.endswith("### assistant\n")
    assert plain.decode(encode_prompt(plain, messages)) == text


def test_encode_prompts_equals_encode_prompt_one_by_one(tiny_student):
    from atod_edge.prompts import encode_prompts

    _, tokenizer = tiny_student
    batch = [build_messages("Act.", f"Task {i}: " + "find the key " * i, [("look", "a room")] * (i % 3),
                            "You see a door." if i else None, ["look", "open door"]) for i in range(6)]
    assert encode_prompts(tokenizer, batch) == [encode_prompt(tokenizer, m) for m in batch]
    assert encode_prompts(tokenizer, []) == []

