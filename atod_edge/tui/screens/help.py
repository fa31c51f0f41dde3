"""The help screen: what each screen is for and every key binding, read from the bindings
themselves so the list cannot drift from the code."""

from __future__ import annotations

from rich.console import Group
from rich.markdown import Markdown
from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

INTRO = """\
**atod-edge tui** runs, watches and inspects multi-turn agent episodes.

- **Live run**: pick an env, a task and an agent (the scripted expert, a human, or a model:
  checkpoint directory, `.onnx` or `.gguf`); step or autoplay; type an action to take over a turn.
- **Inspector**: episodes from eval or training samples; filter them, then read each turn's
  T-DUR values (d disagreement, h uncertainty, w weight) and its tokens coloured by
  teacher − student log-probability (green: the teacher prefers the token, red: it does not).
- **Dashboard**: a run directory's curves, refreshed while the trainer writes.

`ctrl+p` opens the command palette: every action below is there too.
"""

KEY_NAMES = {"right_square_bracket": "]", "left_square_bracket": "[", "slash": "/",
             "question_mark": "?", "plus": "+", "minus": "-", "escape": "esc"}


def key_label(binding: Binding) -> str:
    return " / ".join(KEY_NAMES.get(k.strip(), k.strip()) for k in binding.key.split(","))


def bindings_rows(bindings: list) -> list[tuple[str, str]]:
    rows = []
    for b in bindings:
        b = b if isinstance(b, Binding) else Binding(*b)
        if b.description:
            rows.append((key_label(b), b.description))
    return rows


def bindings_table(title: str, bindings: list) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", show_header=False,
                  box=None, padding=(0, 2, 0, 0))
    table.add_column("key", style="bold cyan", min_width=14)
    table.add_column("action")
    for key, description in bindings_rows(bindings):
        table.add_row(key, description)
    return table


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,f1", "close", "close")]

    def __init__(self, sections: list[tuple[str, list]]):
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        parts = [Markdown(INTRO)]
        for title, bindings in self.sections:
            parts += ["", bindings_table(title, bindings)]
        with Vertical(id="help-dialog", classes="dialog"):
            yield Static("help", classes="dialog-title")
            with VerticalScroll():
                yield Static(Group(*parts), id="help-body")
            yield Static("escape: close", classes="dialog-hint")

    def action_close(self) -> None:
        self.dismiss(None)
