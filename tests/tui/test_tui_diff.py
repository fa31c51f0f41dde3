"""The episode diff (tui/diff_data.py, tui/screens/diff.py): pairing and ordering on hand-made
episodes, pilot tests on a real `atod-edge eval --model A --model B` comparison, a snapshot."""

from __future__ import annotations

import json
import math

import pytest

from atod_edge.rollout.episode import Episode, Turn, write_episodes
from atod_edge.errors import UserError
from atod_edge.tui.app import AtodApp
from atod_edge.tui.diff_data import build_diff, load_diff
from atod_edge.tui.screens.diff import DiffScreen
from atod_edge.tui.widgets.token_view import TokenView

SIZE = (120, 36)

# (task, A's actions, A won, B's actions, B won): A wins task 0, B wins task 1, task 2 is a tie with
# the same actions, task 3 a tie where both fail after diverging at turn 2
TASKS = [
    ("household/eval/0", ["open fridge 1", "take apple 1 from fridge 1", "go to counter 1"], True,
     ["open fridge 1", "go to cabinet 2", "open cabinet 2", "look"], False),
    ("household/eval/1", ["look", "look"], False, ["go to counter 1", "take mug 1 from counter 1"], True),
    ("household/eval/2", ["search red mug", "click item 2", "buy now"], True,
     ["search red mug", "click item 2", "buy now"], True),
    ("household/eval/3", ["open fridge 1", "look"], False, ["open fridge 1", "go to cabinet 2"], False),
]
WORDS = "open fridge take apple from go to counter cabinet look search red mug click item buy now 1 2".split()


def _turn(action: str, k: int, teacher: bool, seed: int) -> Turn:
    response = f"Action: {action}"
    ids = [WORDS.index(w) + 10 if w in WORDS else 5 for w in response.replace(":", "").split()]
    student = [-0.05 * ((i * 7 + seed) % 9) for i in range(len(ids))]
    turn = Turn(observation=f"observation {k}", response=response, action=action, reward=0.0,
                prompt_ids=[1, 2, 3], response_ids=ids, student_logprobs=student)
    if teacher:
        turn.teacher_logprobs = [s + (0.8 if i % 3 == 0 else -0.6 if i % 3 == 1 else 0.0)
                                 for i, s in enumerate(student)]
    return turn


def _episodes(side: int, teacher: bool = True) -> list[Episode]:
    out = []
    for n, task in enumerate(TASKS):
        task_id, actions, won = task[0], task[1 + 2 * side], task[2 + 2 * side]
        out.append(Episode(env="household", task_id=task_id, seed=n, split="eval",
                           turns=[_turn(a, k, teacher, seed=n + side) for k, a in enumerate(actions)],
                           success=won, reward=float(won), score=float(won),
                           policy=["agent-a", "agent-b"][side]))
    return out


@pytest.fixture
def diff_files(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_episodes(a, _episodes(0))
    write_episodes(b, list(reversed(_episodes(1))))     # another order: pairing is by task
    return a, b


def test_pairs_are_ordered_flipped_first_with_the_first_divergence():
    data = build_diff(_episodes(0), list(reversed(_episodes(1))), "agent-a", "agent-b")
    assert [(p.task_id[-1], p.outcome) for p in data.pairs] == [("0", "a"), ("1", "b"), ("2", "tie"), ("3", "tie")]
    assert [p.first_divergence for p in data.pairs] == [1, 0, None, 1]
    first = data.pairs[0].aligned_turns()
    assert len(first) == 4 and first[3][0] is None and first[3][1].action == "look"
    s = data.summary
    assert (s["pairs"], s["a_wins"], s["b_wins"], s["ties"]) == (4, 1, 1, 2)
    # success A = [1, 0, 1, 0], B = [0, 1, 1, 0]: differences [1, -1, 0, 0], mean 0, sd sqrt(2/3);
    # the t half-width 3.182 * sqrt(2/3) / 2 = 1.30 is clipped to the range a difference can take
    assert 3.182 * math.sqrt(2 / 3) / 2 > 1
    assert s["success_diff"]["mean"] == 0 and s["success_diff"]["ci95"] == [-1.0, 1.0]
    assert data.colour_by == "delta"
    assert build_diff(_episodes(0, teacher=False), _episodes(1, teacher=False)).colour_by == "logprob"


def test_load_refuses_files_without_a_common_task(tmp_path, diff_files):
    other = tmp_path / "other.jsonl"
    write_episodes(other, [Episode(env="shop", task_id="shop/eval/9", seed=0, split="eval")])
    with pytest.raises(UserError, match="share no task"):
        load_diff(diff_files[0], other)
    with pytest.raises(UserError, match="not found"):
        load_diff(diff_files[0], tmp_path / "missing.jsonl")
    data = load_diff(*diff_files)
    assert (data.name_a, data.name_b) == ("agent-a", "agent-b")


@pytest.mark.asyncio
async def test_diff_screen_navigation(diff_files):
    app = AtodApp(None, diff=tuple(map(str, diff_files)))
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, DiffScreen)
        bar = str(screen.query_one("#diff-summary").render())
        assert "A wins 1" in bar and "B wins 1" in bar and "ties 2" in bar and "+0.0%" in bar
        tasks = screen.query_one("#diff-tasks")
        assert tasks.row_count == 4 and screen.current_pair == 0
        assert "diverge at turn 2" in str(screen.query_one("#diff-pair-summary").render())
        await pilot.press("d")                          # jump to the first divergent turn
        assert screen.current_turn == 1
        action_a = str(screen.query_one("#diff-action-a").render())
        action_b = str(screen.query_one("#diff-action-b").render())
        assert "take apple 1 from fridge 1" in action_a and "go to cabinet 2" in action_b
        await pilot.press("right_square_bracket", "right_square_bracket")
        assert screen.current_turn == 3
        assert "episode ended" in str(screen.query_one("#diff-action-a").render())
        await pilot.press("n", "n")                     # the tie with the same actions
        assert screen.current_pair == 2
        assert "same actions throughout" in str(screen.query_one("#diff-pair-summary").render())
        # tokens: the A view focused, moved; its line shows log p and teacher - student
        await pilot.press("p", "p", "t", "right", "right")
        tokens = screen.query_one("#tokens-a", TokenView)
        assert tokens.has_focus and tokens.selected == 2 and tokens.colour_by == "delta"
        await pilot.pause()
        assert "log p" in str(screen.query_one("#diff-token-a").render())
        await pilot.press("t")
        assert screen.query_one("#tokens-b", TokenView).has_focus


def test_tui_diff_cli_errors(diff_files, tmp_path, capsys):
    from atod_edge.cli.main import main

    assert main(["tui", "--diff", str(diff_files[0]), str(tmp_path / "nope.jsonl")]) != 0
    assert "not found" in capsys.readouterr().err
    assert main(["tui", str(diff_files[0]), "--diff", *map(str, diff_files)]) != 0
    assert "no PATH" in capsys.readouterr().err


def test_eval_compare_writes_both_files_and_the_pairing_index(atod_cache, tmp_path):
    """A real comparison: the tiny student (token-level records) against the scripted expert on
    the same four seeded tasks; the diff screen opens on the files it wrote."""
    import asyncio

    from atod_edge.cli.main import main

    out = tmp_path / "cmp"
    code = main(["eval", "--model", "tiny-student", "--compare", "expert", "--episodes", "4", "--out", str(out),
                 "--set", "max_turns=3", "--set", "max_new_tokens=8"])
    assert code == 0
    index = json.loads((out / "pairs.json").read_text())
    assert index["a"]["model"] == "tiny-student" and index["b"]["model"] == "expert"
    assert len(index["pairs"]) == 4 and all(p["a"] == p["b"] for p in index["pairs"])
    a = [json.loads(line) for line in (out / "a" / "episodes.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (out / "b" / "episodes.jsonl").read_text().splitlines()]
    assert [e["task_id"] for e in a] == [e["task_id"] for e in b]
    s = index["summary"]
    assert s["a_wins"] + s["b_wins"] + s["ties"] == 4
    assert s["b_wins"] == sum(e["success"] and not f["success"] for e, f in zip(b, a))

    async def drive():
        app = AtodApp(None, diff=(str(out / "a" / "episodes.jsonl"), str(out / "b" / "episodes.jsonl")))
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            assert isinstance(screen, DiffScreen)
            # no teacher scores in eval records: tokens coloured by the student's own log-prob
            assert screen.data.colour_by == "logprob"
            flipped = [p.flipped for p in screen.data.pairs]
            assert flipped == sorted(flipped, reverse=True)
            assert screen.decoder.has_tokenizer     # found through pairs.json's model
            await pilot.press("t")
            assert screen.query_one("#tokens-a", TokenView).tokens

    asyncio.run(drive())


def test_diff_snapshot(snap_compare, diff_files):
    app = AtodApp(None, diff=tuple(map(str, diff_files)))
    # the first flipped task, its first divergent turn, the third token of A selected
    assert snap_compare(app, terminal_size=SIZE, press=["d", "t", "right", "right"])
