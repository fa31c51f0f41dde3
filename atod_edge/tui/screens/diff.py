"""Episode diff: two agents on the same tasks. Tasks whose outcome flipped come first, then the
turns of one task side by side (aligned by turn index, the first divergent turn marked), each
side's tokens coloured by teacher − student log-prob where the records hold a teacher's scores,
else by the agent's own log-prob; a summary bar with wins, losses, ties and the paired
difference of success with its 95% interval."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from atod_edge.rollout.episode import Turn
from atod_edge.tui.diff_data import DiffData, TaskPair, same_action
from atod_edge.tui.screens.inspector import clip_cell, fmt, short_task
from atod_edge.tui.tokens import TokenDecoder, turn_tokens
from atod_edge.tui.widgets.token_view import TokenView, legend, surprisal_legend

DIVERGE_MARK = "◆"
OUTCOME_TEXT = {"a": ("A wins", "bold green"), "b": ("B wins", "bold magenta"), "tie": ("tie", "dim")}


def _ok(success: bool) -> Text:
    return Text("✓", style="green") if success else Text("✗", style="red")


def summary_bar(data: DiffData) -> Text:
    """Two lines: who A and B are with their success, then wins/losses/ties and A − B."""
    s = data.summary
    n = s["pairs"]
    rate_a = sum(p.a.success for p in data.pairs) / n if n else 0.0
    rate_b = sum(p.b.success for p in data.pairs) / n if n else 0.0
    out = Text()
    out.append("A ", style="bold green")
    out.append(f"{data.name_a}  {rate_a:.1%}")
    out.append("   vs   ", style="dim")
    out.append("B ", style="bold magenta")
    out.append(f"{data.name_b}  {rate_b:.1%}")
    out.append(f"   on {n} paired tasks\n", style="dim")
    out.append(f"A wins {s['a_wins']}", style="green")
    out.append("  ·  ")
    out.append(f"B wins {s['b_wins']}", style="magenta")
    out.append(f"  ·  ties {s['ties']}  ·  ")
    diff = s["success_diff"]
    low, high = diff["ci95"]
    significant = low > 0 or high < 0
    out.append(f"A − B success {diff['mean']:+.1%} [{low:+.1%}, {high:+.1%}]",
               style="bold" if significant else "")
    out.append(" 95% paired" + ("" if significant else ", includes 0"), style="dim")
    return out


class DiffScreen(Screen):
    """Compare two episode files of two agents on the same tasks (`atod-edge tui --diff A B`)."""

    HELP_TITLE = "episode diff"
    HELP_EXTRA = [("token views (t switches A/B)", TokenView.BINDINGS)]
    BINDINGS = [
        Binding("n", "next_task", "next task"),
        Binding("p", "prev_task", "prev task", show=False),
        Binding("right_square_bracket", "next_turn", "next turn"),
        Binding("left_square_bracket", "prev_turn", "prev turn", show=False),
        Binding("d", "first_divergence", "divergence"),
        Binding("t", "switch_tokens", "tokens A/B"),
        Binding("escape", "back", "back", show=False),
    ]

    def __init__(self, data: DiffData, *, decoder: TokenDecoder | None = None, title: str | None = None):
        super().__init__()
        self.data = data
        self.decoder = decoder or TokenDecoder()
        self.source_title = title or f"{data.name_a} vs {data.name_b}"
        self.current_pair: int | None = None
        self.current_turn: int | None = None

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(summary_bar(self.data), id="diff-summary")
        with Horizontal(id="diff-body"):
            with Vertical(id="diff-task-pane"):
                yield DataTable(id="diff-tasks", cursor_type="row", zebra_stripes=True)
                yield Static(id="diff-list-status")
            with Vertical(id="diff-detail-pane"):
                yield Static(id="diff-pair-summary")
                yield DataTable(id="diff-turns", cursor_type="row")
                with Horizontal(id="diff-turn-detail"):
                    for side in ("a", "b"):
                        with VerticalScroll(id=f"diff-side-{side}", classes="diff-side"):
                            yield Static(id=f"diff-action-{side}", classes="diff-action")
                            yield TokenView(id=f"tokens-{side}", colour_by=self.data.colour_by)
                            yield Static(id=f"diff-token-{side}", classes="diff-token")
                            yield Static(id=f"diff-obs-{side}", classes="diff-obs")
                yield Static(legend() if self.data.colour_by == "delta" else surprisal_legend(), id="diff-legend")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"diff · {self.source_title}"
        tasks = self.query_one("#diff-tasks", DataTable)
        tasks.add_columns("task", "A", "B", "outcome", "turns", "div")
        for k, pair in enumerate(self.data.pairs):
            label, style = OUTCOME_TEXT[pair.outcome]
            div = pair.first_divergence
            tasks.add_row(clip_cell(short_task(pair.a), 18), _ok(pair.a.success), _ok(pair.b.success),
                          Text(label, style=style), f"{pair.a.num_turns}/{pair.b.num_turns}",
                          "–" if div is None else str(div + 1), key=str(k))
        self.query_one("#diff-list-status", Static).update(
            f"{self.data.flipped} flipped of {len(self.data.pairs)} tasks  ·  flipped first")
        turns = self.query_one("#diff-turns", DataTable)
        turns.add_columns("#", " ", "A action", "B action")
        for notice in self.data.notices:
            self.notify(notice, title="diff", severity="warning")
        if self.data.pairs:
            self.show_pair(0)
        tasks.focus()

    # ------------------------------------------------------------------ tasks and turns

    @on(DataTable.RowHighlighted, "#diff-tasks")
    def _task_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value is not None:
            k = int(event.row_key.value)
            if k != self.current_pair:
                self.show_pair(k)

    @on(DataTable.RowHighlighted, "#diff-turns")
    def _turn_highlighted(self, event: DataTable.RowHighlighted) -> None:
        # the cursor landing on the row already shown (after show_pair refills the table) changes nothing
        if event.row_key is not None and event.row_key.value is not None and int(event.row_key.value) != self.current_turn:
            self.show_turn(int(event.row_key.value))

    @property
    def pair(self) -> TaskPair | None:
        return self.data.pairs[self.current_pair] if self.current_pair is not None else None

    def show_pair(self, k: int) -> None:
        self.current_pair = k
        pair = self.data.pairs[k]
        div = pair.first_divergence
        out = Text()
        out.append(pair.task_id, style="bold")
        label, style = OUTCOME_TEXT[pair.outcome]
        out.append("  ")
        out.append(label, style=style)
        out.append("\nA ", style="bold green")
        out.append_text(_ok(pair.a.success))
        out.append(f" {pair.a.num_turns} turns, score {fmt(pair.a.score)}   ")
        out.append("B ", style="bold magenta")
        out.append_text(_ok(pair.b.success))
        out.append(f" {pair.b.num_turns} turns, score {fmt(pair.b.score)}   ")
        if div is None:
            out.append("same actions throughout", style="dim")
        else:
            out.append(f"{DIVERGE_MARK} diverge at turn {div + 1}", style="bold yellow")
        self.query_one("#diff-pair-summary", Static).update(out)
        turns = self.query_one("#diff-turns", DataTable)
        turns.clear()
        for t, (ta, tb) in enumerate(pair.aligned_turns()):
            if t == div:
                mark = Text(DIVERGE_MARK, style="bold yellow")
            elif div is not None and t > div:
                mark = Text("·", style="dim")    # past the divergence: different states
            else:
                mark = Text("=", style="dim")
            turns.add_row(str(t + 1), mark, self._action_cell(ta, tb), self._action_cell(tb, ta), key=str(t))
        self.show_turn(0 if pair.aligned_turns() else None)
        if pair.aligned_turns():
            turns.move_cursor(row=0)

    @staticmethod
    def _action_cell(turn: Turn | None, other: Turn | None) -> Text:
        if turn is None:
            return Text("(ended)", style="dim italic")
        text = clip_cell(turn.action if turn.action is not None else "∅ unparsable", 28)
        style = "" if turn.valid else "red"
        if other is not None and not same_action(turn, other):
            style = (style + " bold").strip()
        return Text(text, style=style)

    def show_turn(self, k: int | None) -> None:
        self.current_turn = k
        pair = self.pair
        aligned = pair.aligned_turns() if pair is not None and k is not None else []
        ta, tb = aligned[k] if aligned and 0 <= k < len(aligned) else (None, None)
        for side, turn in (("a", ta), ("b", tb)):
            self._show_side(side, turn)

    def _show_side(self, side: str, turn: Turn | None) -> None:
        action = self.query_one(f"#diff-action-{side}", Static)
        tokens = self.query_one(f"#tokens-{side}", TokenView)
        obs = self.query_one(f"#diff-obs-{side}", Static)
        head = Text(f"{side.upper()} ", style="bold green" if side == "a" else "bold magenta")
        if turn is None:
            head.append("(episode ended)", style="dim italic")
            action.update(head)
            tokens.set_tokens([], "")
            obs.update("")
            return
        if turn.action is not None:
            head.append(turn.action, style="green" if turn.valid else "red")
        else:
            head.append("no action (unparsable response)", style="red")
        if turn.feedback:
            head.append(f"  {turn.feedback}", style="yellow")
        action.update(head)
        tokens.set_tokens(turn_tokens(turn, self.decoder), turn.response)
        text = Text("observation before this turn\n", style="bold")
        text.append(turn.observation.rstrip() or "(empty)")
        obs.update(text)

    @on(TokenView.Selected)
    def _token_selected(self, event: TokenView.Selected) -> None:
        side = (event.view.id or "tokens-a")[-1]
        token = event.view.current
        out = Text()
        if token is not None:
            out.append(f"{token.index + 1}/{len(event.view.tokens)} {token.text!r} ", style="dim")
            out.append(f"log p {fmt(token.student_logprob, 2)}")
            if token.delta is not None:
                out.append(f" Δ {token.delta:+.2f}")
        self.query_one(f"#diff-token-{side}", Static).update(out)

    # ------------------------------------------------------------------ actions

    def _move_pair(self, step: int) -> None:
        if not self.data.pairs:
            return
        k = max(0, min(len(self.data.pairs) - 1, (self.current_pair or 0) + step))
        self.query_one("#diff-tasks", DataTable).move_cursor(row=k)
        self.show_pair(k)

    def action_next_task(self) -> None:
        self._move_pair(1)

    def action_prev_task(self) -> None:
        self._move_pair(-1)

    def _go_to_turn(self, k: int) -> None:
        pair = self.pair
        if pair is None or not pair.aligned_turns():
            return
        k = max(0, min(len(pair.aligned_turns()) - 1, k))
        self.query_one("#diff-turns", DataTable).move_cursor(row=k)
        self.show_turn(k)

    def action_next_turn(self) -> None:
        self._go_to_turn((self.current_turn or 0) + 1)

    def action_prev_turn(self) -> None:
        self._go_to_turn((self.current_turn or 0) - 1)

    def action_first_divergence(self) -> None:
        pair = self.pair
        if pair is None or pair.first_divergence is None:
            self.notify("these two episodes took the same actions throughout", title="diff")
            return
        self._go_to_turn(pair.first_divergence)

    def action_switch_tokens(self) -> None:
        a, b = self.query_one("#tokens-a", TokenView), self.query_one("#tokens-b", TokenView)
        (b if a.has_focus else a).focus()

    def action_back(self) -> None:
        self.app.action_back()
