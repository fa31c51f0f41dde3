"""Snapshot tests: each screen at 120x36 with fixed data. After an intended change to the look,
regenerate with `pytest tests/tui/test_tui_snapshots.py --snapshot-update` and review the SVGs
under tests/tui/__snapshots__/. The dashboard pictures show a real train() run (tests/conftest.py's
trained_run, wall-clock timings left out): a change to the trainer's numbers or to its config
fields changes them too, and is reviewed the same way."""

from __future__ import annotations

from tui_fixtures import copy_run_dir

from atod_edge.tui.app import AtodApp

SIZE = (120, 36)


def test_inspector_snapshot(snap_compare, episodes_file, tmp_path):
    app = AtodApp(str(episodes_file), tokenizer=str(tmp_path / "tok"))
    # second episode's first turn, then the fourth token selected in the token view
    assert snap_compare(app, terminal_size=SIZE, press=["n", "p", "right_square_bracket", "t",
                                                        "right", "right", "right"])


def test_inspector_filtered_snapshot(snap_compare, episodes_file, tmp_path):
    app = AtodApp(str(episodes_file), tokenizer=str(tmp_path / "tok"))
    assert snap_compare(app, terminal_size=SIZE, press=["o", "o", "e", "e"])


def clean_run_dir(trained_run, tmp_path):
    """The trainer's run without corrupt lines (a warning toast times out after 5 s, which would make
    the picture racy) and without its wall-clock timings (the s/step figure changes every run)."""
    return copy_run_dir(trained_run, tmp_path / "run", corrupt=False, wall_clock=False)


def test_dashboard_snapshot(snap_compare, trained_run, tmp_path):
    app = AtodApp(str(clean_run_dir(trained_run, tmp_path)), refresh_seconds=0)
    assert snap_compare(app, terminal_size=SIZE)


def test_live_snapshot(snap_compare, test_envs):
    app = AtodApp(None, env="counting", index=1)

    async def two_turns(pilot):
        for key in ("", "s", "i"):
            if key == "i":   # an invalid typed action shows the feedback line
                await pilot.press("i", *"jump", "enter")
            elif key:
                await pilot.press(key)
            await pilot.app.workers.wait_for_complete()
            await pilot.pause()
        pilot.app.screen.query_one("#admissible").focus()   # no blinking cursor in the picture

    assert snap_compare(app, terminal_size=SIZE, run_before=two_turns)


def test_help_snapshot(snap_compare, episodes_file):
    app = AtodApp(str(episodes_file))
    assert snap_compare(app, terminal_size=SIZE, press=["f1"])


def test_light_theme_snapshot(snap_compare, trained_run, tmp_path):
    app = AtodApp(str(clean_run_dir(trained_run, tmp_path)), refresh_seconds=0, theme="light")
    assert snap_compare(app, terminal_size=SIZE, press=["c"])
