"""Ask for a path to open: a run directory, an episodes .jsonl or a model (checkpoint dir, .onnx, .gguf)."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from atod_edge.errors import UserError
from atod_edge.tui.data import classify_path


class OpenPathScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, prompt: str = "open a run directory, an episodes .jsonl or a model"):
        super().__init__()
        self.prompt = prompt

    def compose(self) -> ComposeResult:
        with Vertical(id="open-dialog", classes="dialog"):
            yield Static(self.prompt, classes="dialog-title")
            yield Input(placeholder="path", id="open-input")
            yield Static("", id="open-error")
            yield Static("enter: open · escape: cancel", classes="dialog-hint")

    @on(Input.Submitted, "#open-input")
    def _submitted(self, event: Input.Submitted) -> None:
        path = event.value.strip()
        try:
            if not path:
                raise UserError("type a path")
            classify_path(path)
        except UserError as e:
            self.query_one("#open-error", Static).update(Text(str(e), style="red"))
            return
        self.dismiss(path)

    def action_cancel(self) -> None:
        self.dismiss(None)
