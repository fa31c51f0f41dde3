"""A modal that shows a block of text (a run's config, a report), scrollable, closed with escape."""

from __future__ import annotations

from rich.syntax import Syntax
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


class TextViewScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q", "close", "close")]

    def __init__(self, title: str, text: str, *, lexer: str = "yaml"):
        super().__init__()
        self.title_text = title
        self.text = text
        self.lexer = lexer

    def compose(self) -> ComposeResult:
        with Vertical(id="text-dialog", classes="dialog"):
            yield Static(self.title_text, classes="dialog-title")
            with VerticalScroll():
                yield Static(Syntax(self.text, self.lexer, theme="ansi_dark", word_wrap=True,
                                    background_color="default"), id="text-body")
            yield Static("escape: close", classes="dialog-hint")

    def action_close(self) -> None:
        self.dismiss(None)
