"""The atod-edge terminal app: wires the screens, the app-wide keys, the palette and the themes.

    atod-edge tui RUN_DIR          training dashboard (a directory with metrics.jsonl)
    atod-edge tui EPISODES.jsonl   episode inspector
    atod-edge tui MODEL            live run with that model (checkpoint dir, .onnx, .gguf)
    atod-edge tui                  live run with the scripted expert
    atod-edge tui --diff A B       two agents' episode files on the same tasks, side by side
"""

from __future__ import annotations

from pathlib import Path

from textual.app import App
from textual.binding import Binding
from textual.screen import Screen

from atod_edge.errors import UserError
from atod_edge.tui.commands import AtodCommands
from atod_edge.tui.data import classify_path
from atod_edge.tui.tokens import TokenDecoder

THEMES = {"dark": "textual-dark", "light": "textual-light"}


class AtodApp(App):
    """Screens are pushed on a stack: escape goes back to the one beneath."""

    CSS_PATH = "app.tcss"
    TITLE = "atod-edge"
    COMMANDS = App.COMMANDS | {AtodCommands}
    ENABLE_COMMAND_PALETTE = True
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("f1,question_mark", "help", "help"),
        Binding("ctrl+t", "toggle_theme", "dark/light"),
        Binding("ctrl+o", "open", "open…", show=False),
        Binding("ctrl+l", "live", "live run", show=False),
        Binding("escape", "back", "back", show=False),
    ]

    def __init__(self, path: str | None = None, *, tokenizer: str | None = None, env: str | None = None,
                 split: str = "eval", index: int = 0, theme: str = "dark", refresh_seconds: float = 2.0,
                 autostart: bool = True, diff: tuple[str, str] | None = None):
        super().__init__()
        if theme not in THEMES:
            raise UserError(f"unknown theme '{theme}' (allowed: {', '.join(THEMES)})")
        self.diff_data = None
        if diff is not None:
            from atod_edge.tui.diff_data import load_diff

            self.diff_data = load_diff(*diff)      # raises UserError before the UI starts
            self.diff_paths = tuple(str(p) for p in diff)
        self.start_path = path
        self.start_kind = classify_path(path)     # raises UserError before the UI starts
        self.tokenizer_path = tokenizer
        self.live_options = {"env": env, "split": split, "index": index, "autostart": autostart}
        self.refresh_seconds = refresh_seconds
        self.theme_name = theme
        self.decoder: TokenDecoder | None = None

    def on_mount(self) -> None:
        self.theme = THEMES[self.theme_name]
        if self.diff_data is not None:
            from atod_edge.tui.diff_data import find_diff_tokenizer
            from atod_edge.tui.screens.diff import DiffScreen

            decoder, notice = TokenDecoder.load(self.tokenizer_path or find_diff_tokenizer(*self.diff_paths))
            if notice:
                self.notify(notice, severity="warning")
            self.push_screen(DiffScreen(self.diff_data, decoder=decoder))
            return
        try:
            screen = self.screen_for(self.start_path, self.start_kind)
        except UserError as e:
            self.notify(str(e), severity="error")
            screen = self.screen_for(None, "live")
        self.push_screen(screen)

    # ------------------------------------------------------------------ opening things

    def screen_for(self, path: str | None, kind: str | None = None) -> Screen:
        """The screen that shows `path` (see the module docstring)."""
        from atod_edge.tui.screens.dashboard import DashboardScreen
        from atod_edge.tui.screens.inspector import InspectorScreen
        from atod_edge.tui.screens.live import LiveRunScreen

        kind = kind or classify_path(path)
        if kind == "dashboard":
            decoder, notice = TokenDecoder.load(self.tokenizer_path, run_dir=path)
            self.decoder = decoder
            if notice:
                self.notify(notice, severity="warning")
            return DashboardScreen(path, refresh_seconds=self.refresh_seconds, decoder=decoder)
        if kind == "inspector":
            episodes_path = Path(path)
            # a training run's samples/step_N.jsonl: the run's checkpoints hold the tokenizer
            run_dir = episodes_path.parent.parent if episodes_path.parent.name == "samples" else None
            decoder, notice = TokenDecoder.load(self.tokenizer_path, run_dir=run_dir)
            self.decoder = decoder
            return InspectorScreen(episodes_path, decoder=decoder, notice=notice)
        options = dict(self.live_options)
        if path:
            options.update(agent="model", model_path=str(path))
        return LiveRunScreen(**options)

    def open_path(self, path: str | None) -> None:
        if not path:
            return
        try:
            self.push_screen(self.screen_for(path))
        except UserError as e:
            self.notify(str(e), severity="error")

    # ------------------------------------------------------------------ actions

    def action_open(self) -> None:
        from atod_edge.tui.screens.open_path import OpenPathScreen

        self.push_screen(OpenPathScreen(), self.open_path)

    def action_live(self) -> None:
        from atod_edge.tui.screens.live import LiveRunScreen

        if not isinstance(self.screen, LiveRunScreen):
            self.push_screen(LiveRunScreen(**self.live_options))

    def action_back(self) -> None:
        # the bottom two screens are Textual's default screen and the first screen opened
        if len(self.screen_stack) > 2:
            self.pop_screen()

    def action_toggle_theme(self) -> None:
        self.theme = THEMES["light"] if self.theme == THEMES["dark"] else THEMES["dark"]

    def action_help(self) -> None:
        from atod_edge.tui.screens.help import HelpScreen

        if isinstance(self.screen, HelpScreen):
            return
        sections = [("everywhere", self.BINDINGS)]
        bindings = getattr(self.screen, "BINDINGS", [])
        if bindings:
            title = getattr(self.screen, "HELP_TITLE", type(self.screen).__name__)
            sections[:0] = [(title, bindings), *getattr(self.screen, "HELP_EXTRA", [])]
        self.push_screen(HelpScreen(sections))


def run_tui(path: str | None = None, **opts) -> int:
    """Open the app on `path` (run dir, episodes .jsonl, model, or None). Returns an exit code.

    Options: tokenizer (a tokenizer.json or a directory holding one), env, split, index (live
    run), theme ("dark" or "light"), refresh_seconds (dashboard), diff (two episode files: the diff
    screen instead of `path`). Unknown options are an error.
    """
    allowed = {"tokenizer", "env", "split", "index", "theme", "refresh_seconds", "diff"}
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise UserError(f"unknown tui option(s): {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    opts = {k: v for k, v in opts.items() if v is not None}
    app = AtodApp(path, **opts)
    app.run()
    return int(app.return_code or 0)
