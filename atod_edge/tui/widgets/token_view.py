"""Response tokens coloured by teacher-minus-student log-probability, with a movable selection."""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget

from atod_edge.tui.tokens import TokenInfo

# Background colours by |delta| bucket: green where the teacher likes the token more than the
# student (OPD pushes it up), red where it likes it less. Same hues in dark and light themes.
POSITIVE = ("#1f4d2b", "#236b35", "#2a8a42", "#33a852")
NEGATIVE = ("#5c2222", "#7d2a2a", "#9e3232", "#c03a3a")
THRESHOLDS = (0.1, 0.5, 1.0, 2.0)   # nats; below the first the token is left uncoloured


def delta_style(delta: float | None) -> str:
    """Rich style for a token with this teacher-minus-student log-prob difference."""
    if delta is None:
        return ""
    size = abs(delta)
    bucket = -1
    for i, threshold in enumerate(THRESHOLDS):
        if size >= threshold:
            bucket = i
    if bucket < 0:
        return ""
    palette = POSITIVE if delta > 0 else NEGATIVE
    return f"#ffffff on {palette[bucket]}"


def surprisal_style(logprob: float | None) -> str:
    """Rich style for a token by its own log-prob under the agent that sampled it (when no teacher
    scored it): the less likely the token, the redder; likely tokens (p > 0.9) stay plain."""
    if logprob is None:
        return ""
    return delta_style(min(logprob, 0.0))     # the red buckets of delta_style, by -log p


def surprisal_legend() -> Text:
    """A one-line key of surprisal_style's colours, in nats of -log p."""
    out = Text("−log p ", style="dim")
    for colour, threshold in zip(NEGATIVE, THRESHOLDS):
        out.append(f" {threshold:g} ".replace("0.", "."), style=f"#ffffff on {colour}")
    out.append(" nats (the agent's own log-prob: red = unlikely)", style="dim")
    return out


def visible(text: str) -> str:
    """Token text with newlines and tabs made visible, so every token occupies some cells."""
    shown = text.replace("\n", "↵").replace("\t", "→")
    return shown if shown else "∅"


def legend() -> Text:
    """A one-line key of the colours: Δ = log p_T − log p_S in nats, by bucket."""
    def label(threshold: float) -> str:
        return f"{threshold:g}".replace("0.", ".")

    out = Text("Δ(T−S) ", style="dim")
    for colour, threshold in zip(reversed(NEGATIVE), reversed(THRESHOLDS)):
        out.append(f"-{label(threshold)}", style=f"#ffffff on {colour}")
    out.append(" 0 ", style="dim")
    for colour, threshold in zip(POSITIVE, THRESHOLDS):
        out.append(f"+{label(threshold)}", style=f"#ffffff on {colour}")
    out.append(" nats", style="dim")
    return out


class TokenView(Widget, can_focus=True):
    """Shows a turn's response tokens; left/right move the selected token."""

    DEFAULT_CSS = """
    TokenView { height: auto; min-height: 3; padding: 0 1; }
    TokenView:focus { background: $boost; }
    """

    BINDINGS = [
        Binding("left,h", "move(-1)", "prev token", show=False),
        Binding("right,l", "move(1)", "next token", show=False),
        Binding("home", "jump(0)", "first token", show=False),
        Binding("end", "jump(-1)", "last token", show=False),
    ]

    selected: reactive[int] = reactive(0)

    class Selected(Message):
        """The selected token changed (index into the turn's tokens)."""

        def __init__(self, view: "TokenView", index: int) -> None:
            super().__init__()
            self.view = view
            self.index = index

    def __init__(self, *, id: str | None = None, classes: str | None = None, colour_by: str = "delta"):
        super().__init__(id=id, classes=classes)
        self.colour_by = colour_by     # "delta": teacher - student; "logprob": the token's own log-prob
        self.tokens: list[TokenInfo] = []
        self.fallback_text = ""

    def set_tokens(self, tokens: list[TokenInfo], fallback_text: str = "") -> None:
        """Show `tokens`, or `fallback_text` plain when the turn has no token-level data."""
        self.tokens = tokens
        self.fallback_text = fallback_text
        self.selected = 0
        self.refresh(layout=True)
        self.post_message(self.Selected(self, 0))

    @property
    def current(self) -> TokenInfo | None:
        return self.tokens[self.selected] if 0 <= self.selected < len(self.tokens) else None

    def action_move(self, delta: int) -> None:
        if self.tokens:
            self.selected = max(0, min(len(self.tokens) - 1, self.selected + delta))

    def action_jump(self, index: int) -> None:
        if self.tokens:
            self.selected = index % len(self.tokens)

    def watch_selected(self, index: int) -> None:
        self.post_message(self.Selected(self, index))

    def render(self) -> Text:
        if not self.tokens:
            if self.fallback_text:
                return Text(self.fallback_text + "\n", style="") + Text("(no token-level data in this turn)",
                                                                        style="dim italic")
            return Text("(empty response)", style="dim italic")
        out = Text()
        for tok in self.tokens:
            style = delta_style(tok.delta) if self.colour_by == "delta" else surprisal_style(tok.student_logprob)
            if tok.index == self.selected:
                style = (style + " " if style else "") + "reverse bold underline"
            out.append(visible(tok.text), style=style)
        return out
