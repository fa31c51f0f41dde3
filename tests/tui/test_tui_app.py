"""The app shell: opening paths, help, themes, the command palette, run_tui's options."""

from __future__ import annotations

import pytest
from textual.command import CommandList
from tui_fixtures import until

from atod_edge.errors import UserError
from atod_edge.tui.app import AtodApp, run_tui
from atod_edge.tui.commands import screen_commands
from atod_edge.tui.screens.dashboard import DashboardScreen
from atod_edge.tui.screens.help import HelpScreen
from atod_edge.tui.screens.inspector import InspectorScreen
from atod_edge.tui.screens.live import LiveRunScreen
from atod_edge.tui.screens.open_path import OpenPathScreen

SIZE = (120, 36)


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        run_tui(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="unknown tui option"):
        run_tui(None, colour="blue")
    with pytest.raises(UserError, match="unknown theme"):
        AtodApp(None, theme="sepia")


@pytest.mark.asyncio
async def test_help_theme_and_palette(episodes_file):
    app = AtodApp(str(episodes_file), theme="light")
    async with app.run_test(size=SIZE) as pilot:
        assert app.theme == "textual-light"
        await pilot.press("ctrl+t")
        assert app.theme == "textual-dark"
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        titles = [title for title, _ in app.screen.sections]
        assert titles == ["episode inspector", "token view (t focuses it)", "everywhere"]
        await pilot.press("escape")
        assert isinstance(app.screen, InspectorScreen)
        # every screen action is a palette command; running one acts on the screen
        commands = {title: callback for title, _, callback in screen_commands(app, app.screen)}
        assert {"next ep", "outcome", "help", "dark/light", "open…"} <= set(commands)
        await commands["next ep"]()
        assert app.screen.current_episode == 1
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"next ep")
        # the palette searches in a worker: wait until its best hit is the command, then run it
        hits = app.screen.query_one(CommandList)
        await until(pilot, lambda: hits.highlighted is not None
                    and "next ep" in str(hits.get_option_at_index(hits.highlighted).prompt), "the palette's hit")
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, InspectorScreen) and app.screen.current_episode == 2


@pytest.mark.asyncio
async def test_open_paths_from_the_app(episodes_file, run_dir, test_envs):
    app = AtodApp(str(episodes_file), env="counting")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+o")
        assert isinstance(app.screen, OpenPathScreen)
        await pilot.press(*"/does/not/exist", "enter")
        assert isinstance(app.screen, OpenPathScreen)         # stays open, says why
        assert "not found" in str(app.screen.query_one("#open-error").render())
        app.screen.query_one("#open-input").value = str(run_dir)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, DashboardScreen)
        await pilot.press("ctrl+l")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, LiveRunScreen) and app.screen.session.env_name == "counting"
        await pilot.press("escape", "escape")
        assert isinstance(app.screen, InspectorScreen)
        await pilot.press("escape")                            # the first screen stays
        assert isinstance(app.screen, InspectorScreen)
