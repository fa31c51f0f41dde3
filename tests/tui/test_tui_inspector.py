"""Pilot tests for the episode inspector: open, navigate, filter, token panel, bad files."""

from __future__ import annotations

import pytest
from tui_fixtures import make_episodes, write_episodes_file

from atod_edge.tui.app import AtodApp
from atod_edge.tui.screens.inspector import InspectorScreen
from atod_edge.tui.widgets.token_view import TokenView

SIZE = (120, 36)
pytestmark = pytest.mark.asyncio


def notices(app) -> list[str]:
    return [n.message for n in app._notifications]


async def test_navigate_episodes_turns_and_tokens(episodes_file, tmp_path):
    app = AtodApp(str(episodes_file), tokenizer=str(tmp_path / "tok"))
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, InspectorScreen)
        assert screen.current_episode == 0 and screen.current_turn == 0
        await pilot.press("n", "n")
        assert screen.current_episode == 2
        await pilot.press("p")
        assert screen.current_episode == 1
        await pilot.press("right_square_bracket", "right_square_bracket")
        assert screen.current_turn == 2
        await pilot.press("left_square_bracket")
        assert screen.current_turn == 1
        # the token view: move the selection, the side panel follows
        await pilot.press("t", "right", "right", "right")
        tokens = screen.query_one("#tokens", TokenView)
        assert tokens.selected == 3
        await pilot.pause()
        panel = str(screen.query_one("#token-panel").render())
        assert "token 4/" in panel and repr(tokens.current.text) in panel
        assert "disagreement" in panel
        await pilot.press("end")
        assert tokens.selected == len(tokens.tokens) - 1
        # arrow keys in the episode table move between episodes too
        screen.query_one("#episodes").focus()
        await pilot.press("down")
        await pilot.pause()
        assert screen.current_episode == 2


async def test_filters(episodes_file):
    app = AtodApp(str(episodes_file))
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        episodes = screen.episodes
        await pilot.press("o")                                  # outcome: success
        await pilot.pause()
        assert screen.shown and all(episodes[i].success for i in screen.shown)
        await pilot.press("o")                                  # outcome: failure
        await pilot.pause()
        assert screen.shown and all(not episodes[i].success for i in screen.shown)
        await pilot.press("o", "e")                             # outcome all, env: first env
        await pilot.pause()
        assert {episodes[i].env for i in screen.shown} == {"household"}
        await pilot.press("escape")                             # clear filters
        await pilot.pause()
        assert len(screen.shown) == len(episodes)
        await pilot.press("slash", *"red mug")                  # text search
        await pilot.pause()
        assert screen.shown and all(episodes[i].env == "shop" for i in screen.shown)
        assert "of 8 episodes" in str(screen.query_one("#list-status").render())
        await pilot.press(*" zzz")
        await pilot.pause()
        assert screen.shown == [] and screen.current_episode is None
        assert "no episode matches" in str(screen.query_one("#episode-summary").render())
        await pilot.press("escape")                             # leaves the input: clear filters
        await pilot.pause()
        screen.query_one("#step-filter").focus()
        await pilot.press("2", "0")
        await pilot.pause()
        assert screen.shown and all(episodes[i].step == 20 for i in screen.shown)


async def test_corrupt_file_and_old_schema_show_a_notice(tmp_path):
    path = write_episodes_file(tmp_path / "bad.jsonl", make_episodes(n=2), corrupt=True)
    with open(path, "a") as f:   # an old record: no token-level fields, no success key
        f.write('\n{"env": "household", "task_id": "household/eval/5", "seed": 1, "split": "eval", '
                '"turns": [{"observation": "You are in a room.", "response": "look"}]}\n')
    app = AtodApp(str(path))
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert len(screen.episodes) == 3
        assert any("skipped 2 torn or corrupt" in n for n in notices(app))
        await pilot.press("n", "n")
        assert screen.current_episode == 2
        assert "no token-level data" in str(screen.query_one("#tokens").render())
        assert "no teacher scores" in str(screen.query_one("#episode-summary").render())


async def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    app = AtodApp(str(path))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("n", "right_square_bracket", "t", "right")   # nothing to move: no crash
        assert app.screen.current_episode is None
        assert any("no episodes" in n for n in notices(app))


async def test_truncated_turns_are_marked(tmp_path):
    from atod_edge.rollout.episode import Episode, Turn

    cut = Turn("You are in a kitchen.", response="<action>open fri", prompt_ids=[1, 2], response_ids=[3, 4, 5],
               student_logprobs=[-1.0, -2.0, -0.5], valid=False, finish_reason="length")
    path = write_episodes_file(tmp_path / "cut.jsonl", [Episode(env="household", task_id="household/train/0", seed=0,
                                                                split="train", turns=[cut])])
    app = AtodApp(str(path))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert "truncated: the response reached max_new_tokens" in str(app.screen.query_one("#action-line").render())
        assert "(1 truncated)" in str(app.screen.query_one("#episode-summary").render())
