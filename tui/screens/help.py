"""The help screen: what each screen is for and every key binding, read from the bindings
themselves so the list cannot drift from the code."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown, Static

INTRO = """\
**atod-edge tui** runs, watches and inspects multi-turn agent episodes.

- **Live run**: pick an env, a task and an agent (scripted expert, a human, or a model:
  checkpoint directory, `.onnx` or `.gguf`); step or autoplay; type an action to take over a turn.
- **Inspector**: episodes from eval or training samples; filter, then read each turn's
  T-DUR values (d disagreement, h uncertainty, w weight) and its tokens coloured by
  teacher − student log-probability (green: the teacher prefers the token, red: it does not).
- **Dashboard**: a run directory's curves, refreshed while the trainer writes.

`ctrl+p` opens the command palette: every action below is there too.
"""


def key_label(binding: Binding) -> str:
    names = {"right_square_bracket": "]", "left_square_bracket": "[", "slash": "/",
             "question_mark": "?", "space": "space", "plus": "+", "minus": "-"}
    return " / ".join(names.get(k.strip(), k.strip()) for k in binding.key.split(","))


def bindings_table(title: str, bindings: list) -> str:
    rows = [f"### {title}", "", "| key | action |", "|---|---|"]
    for b in bindings:
        b = b if isinstance(b, Binding) else Binding(*b)
        if b.description:
            rows.append(f"| `{key_label(b)}` | {b.description} |")
    return "\n".join(rows) + "\n"


def help_markdown(sections: list[tuple[str, list]]) -> str:
    return INTRO + "\n" + "\n".join(bindings_table(title, bindings) for title, bindings in sections)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,f1", "close", "close")]

    def __init__(self, sections: list[tuple[str, list]]):
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        with Vertical(id="help-dialog", classes="dialog"):
            yield Static("help", classes="dialog-title")
            with VerticalScroll():
                yield Markdown(help_markdown(self.sections), id="help-body")
            yield Static("escape: close", classes="dialog-hint")

    def action_close(self) -> None:
        self.dismiss(None)
