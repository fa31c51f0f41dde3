"""Episode inspector: a filtered list of episodes, the turns of one, and its tokens coloured by
teacher-minus-student log-probability with the T-DUR quantities (d, h, w) per turn."""

from __future__ import annotations

import math
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Select, Static

from atod_edge.rollout.episode import Episode, Turn
from atod_edge.tui.episodes import OUTCOMES, EpisodeFilter, episode_search_text, episode_stats, load_episodes, step_filter_valid
from atod_edge.tui.tokens import TokenDecoder, TokenInfo, turn_tokens
from atod_edge.tui.widgets.token_view import TokenView, legend


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def clip_cell(text: str, width: int) -> str:
    """`text` cut to a table cell of `width` characters, with an ellipsis."""
    return text if len(text) <= width else text[: width - 1] + "…"


def short_task(ep: Episode) -> str:
    """The task id without the env prefix (the env has its own column)."""
    prefix = f"{ep.env}/"
    return ep.task_id[len(prefix):] if ep.task_id.startswith(prefix) else ep.task_id


class InspectorScreen(Screen):
    """Browse episodes from a JSONL file (eval output, training samples or a saved live run)."""

    HELP_TITLE = "episode inspector"
    HELP_EXTRA = [("token view (t focuses it)", TokenView.BINDINGS)]
    BINDINGS = [
        Binding("n", "next_episode", "next ep"),
        Binding("p", "prev_episode", "prev ep", show=False),
        Binding("right_square_bracket", "next_turn", "next turn"),
        Binding("left_square_bracket", "prev_turn", "prev turn", show=False),
        Binding("t", "focus_tokens", "tokens"),
        Binding("slash", "focus_search", "search"),
        Binding("o", "cycle_outcome", "outcome"),
        Binding("e", "cycle_env", "env"),
        Binding("escape", "clear_filters", "clear/back"),
    ]

    def __init__(self, path: str | Path | None = None, *, episodes: list[Episode] | None = None,
                 decoder: TokenDecoder | None = None, title: str | None = None, notice: str | None = None):
        super().__init__()
        self.path = Path(path) if path is not None else None
        self.notice = notice
        if episodes is None:
            if self.path is None:
                raise ValueError("InspectorScreen needs a path or episodes")
            episodes, load_notice = load_episodes(self.path)
            self.notice = "; ".join(n for n in (notice, load_notice) if n) or None
        self.episodes = episodes
        self.decoder = decoder or TokenDecoder()
        self.source_title = title or (self.path.name if self.path else "episodes")
        self.episode_filter = EpisodeFilter()
        self.shown: list[int] = list(range(len(episodes)))
        self.current_episode: int | None = None
        self.current_turn: int | None = None
        self.envs = sorted({ep.env for ep in episodes if ep.env})
        self._search_texts: list[str] | None = None

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="inspector-body"):
            with Vertical(id="episode-pane"):
                yield Input(placeholder="search text ( / )", id="search", compact=True)
                with Horizontal(id="filter-row"):
                    yield Select([(env, env) for env in self.envs], prompt="env: all", id="env-filter",
                                 compact=True)
                    yield Select([(o, o) for o in OUTCOMES], value="all", allow_blank=False,
                                 id="outcome-filter", compact=True)
                    yield Input(placeholder="step", id="step-filter", compact=True)
                yield DataTable(id="episodes", cursor_type="row", zebra_stripes=True)
                yield Static(id="list-status")
            with Vertical(id="detail-pane"):
                yield Static(id="episode-summary")
                yield DataTable(id="turns", cursor_type="row")
                with Horizontal(id="turn-detail"):
                    with VerticalScroll(id="turn-text"):
                        yield Static(id="action-line")
                        yield TokenView(id="tokens")
                        yield Static(legend(), id="legend")
                        yield Static(id="observation")
                    yield Static(id="token-panel")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"inspector · {self.source_title}"
        table = self.query_one("#episodes", DataTable)
        table.add_columns("#", "env", "task", "step", "ok", "turns", "score")
        turns = self.query_one("#turns", DataTable)
        turns.add_columns("#", "action", "valid", "reward", "d", "h", "w", "tok")
        self.refresh_list()
        if self.notice:
            self.notify(self.notice, title="episodes", severity="warning")
        table.focus()

    # ------------------------------------------------------------------ list and filters

    def refresh_list(self, keep: int | None = None) -> None:
        """Re-apply the filter; keep the episode `keep` selected if it is still listed."""
        if self.episode_filter.text.strip() and self._search_texts is None:
            # built once, on the first text search: typing then filters without re-joining texts
            self._search_texts = [episode_search_text(ep) for ep in self.episodes]
        self.shown = self.episode_filter.apply(self.episodes, self._search_texts)
        table = self.query_one("#episodes", DataTable)
        table.clear()
        for i in self.shown:
            ep = self.episodes[i]
            ok = Text("✓", style="green") if ep.success else Text("✗", style="red")
            table.add_row(str(i), ep.env, short_task(ep), "" if ep.step is None else str(ep.step), ok,
                          str(ep.num_turns), fmt(ep.score), key=str(i))
        status = f"{len(self.shown)} of {len(self.episodes)} episodes"
        if not step_filter_valid(self.episode_filter.step):
            status += "  ·  step filter: use N or A-B"
        self.query_one("#list-status", Static).update(status)
        if not self.shown:
            self.show_episode(None)
            return
        target = keep if keep in self.shown else self.shown[0]
        table.move_cursor(row=self.shown.index(target))
        self.show_episode(target)

    @on(Input.Changed, "#search")
    def _search_changed(self, event: Input.Changed) -> None:
        self.episode_filter.text = event.value
        self.refresh_list(keep=self.current_episode)

    @on(Input.Changed, "#step-filter")
    def _step_changed(self, event: Input.Changed) -> None:
        self.episode_filter.step = event.value
        self.refresh_list(keep=self.current_episode)

    @on(Select.Changed, "#env-filter")
    def _env_changed(self, event: Select.Changed) -> None:
        self.episode_filter.env = None if event.value is Select.NULL else str(event.value)
        self.refresh_list(keep=self.current_episode)

    @on(Select.Changed, "#outcome-filter")
    def _outcome_changed(self, event: Select.Changed) -> None:
        self.episode_filter.outcome = "all" if event.value is Select.NULL else str(event.value)
        self.refresh_list(keep=self.current_episode)

    @on(DataTable.RowHighlighted, "#episodes")
    def _episode_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value is not None:
            index = int(event.row_key.value)
            if index != self.current_episode:
                self.show_episode(index)

    @on(DataTable.RowHighlighted, "#turns")
    def _turn_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value is not None:
            self.show_turn(int(event.row_key.value))

    # ------------------------------------------------------------------ detail

    def show_episode(self, index: int | None) -> None:
        self.current_episode = index
        summary = self.query_one("#episode-summary", Static)
        turns = self.query_one("#turns", DataTable)
        turns.clear()
        if index is None:
            summary.update(Text("no episode matches the filters" if self.episodes else "no episodes",
                                style="dim italic"))
            self.show_turn(None)
            return
        ep = self.episodes[index]
        summary.update(self.summary_text(ep))
        for k, turn in enumerate(ep.turns):
            valid = Text("yes", style="green") if turn.valid else Text("no", style="red")
            turns.add_row(str(k + 1), clip_cell(turn.action or "∅", 30), valid, fmt(turn.reward),
                          fmt(turn.disagreement), fmt(turn.uncertainty), fmt(turn.weight),
                          str(len(turn.response_ids or [])), key=str(k))
        if ep.turns:
            turns.move_cursor(row=0)
            self.show_turn(0)
        else:
            self.show_turn(None)

    def summary_text(self, ep: Episode) -> Text:
        stats = episode_stats(ep)
        out = Text()
        out.append(f"{ep.env}", style="bold")
        out.append(f" · {short_task(ep)}")
        if ep.policy:
            out.append(f" · {ep.policy}")
        if ep.step is not None:
            out.append(f" · step {ep.step}")
        if ep.group is not None:
            out.append(f" · group {ep.group}")
        out.append("\n")
        out.append("✓ success" if ep.success else "✗ failure", style="bold green" if ep.success else "bold red")
        out.append(f"  score {fmt(ep.score)}  reward {fmt(ep.reward)}  {stats.turns} turns")
        if stats.invalid:
            out.append(f" ({stats.invalid} invalid)", style="yellow")
        if ep.num_truncated:
            out.append(f" ({ep.num_truncated} truncated)", style="yellow")
        out.append(f"  {stats.tokens} tokens\n")
        if stats.mean_disagreement is not None:
            out.append(f"mean d {fmt(stats.mean_disagreement)}  ")
        if stats.mean_weight is not None:
            out.append(f"mean w {fmt(stats.mean_weight)}  ")
        if stats.mean_abs_log_ratio is not None:
            out.append(f"mean |Δ| {fmt(stats.mean_abs_log_ratio)}")
        if not stats.has_teacher:
            out.append("no teacher scores in this episode", style="dim")
        return out

    def current_turn_record(self) -> Turn | None:
        if self.current_episode is None or self.current_turn is None:
            return None
        turns = self.episodes[self.current_episode].turns
        return turns[self.current_turn] if 0 <= self.current_turn < len(turns) else None

    def show_turn(self, k: int | None) -> None:
        self.current_turn = k
        turn = self.current_turn_record()
        observation = self.query_one("#observation", Static)
        action_line = self.query_one("#action-line", Static)
        tokens = self.query_one("#tokens", TokenView)
        if turn is None:
            observation.update("")
            action_line.update("")
            tokens.set_tokens([], "")
            return
        line = Text("action ", style="bold")
        if turn.action is not None:
            line.append(turn.action, style="green" if turn.valid else "red")
        else:
            line.append("none (unparsable response)", style="red")
        if turn.feedback:
            line.append(f"  {turn.feedback}", style="yellow")
        if turn.truncated:
            line.append("  truncated: the response reached max_new_tokens", style="yellow")
        action_line.update(line)
        text = Text()
        text.append("observation before this turn\n", style="bold")
        text.append(turn.observation.rstrip() or "(empty)")
        observation.update(text)
        tokens.set_tokens(turn_tokens(turn, self.decoder), turn.response)

    @on(TokenView.Selected)
    def _token_selected(self, event: TokenView.Selected) -> None:
        self.update_token_panel(event.view.current)

    def update_token_panel(self, token: TokenInfo | None) -> None:
        turn = self.current_turn_record()
        out = Text()
        if turn is not None and self.current_turn is not None:
            out.append(f"turn {self.current_turn + 1}\n", style="bold")
            out.append(f"d  disagreement {fmt(turn.disagreement, 3)}\n")
            out.append(f"h  uncertainty  {fmt(turn.uncertainty, 3)}\n")
            out.append(f"w  weight       {fmt(turn.weight, 3)}\n")
            out.append(f"reward {fmt(turn.reward)}  {'valid' if turn.valid else 'invalid'}\n\n")
        if token is not None:
            n = len(self.query_one("#tokens", TokenView).tokens)
            out.append(f"token {token.index + 1}/{n}\n", style="bold")
            out.append(f"text   {token.text!r}\n")
            out.append(f"id     {token.token_id}\n")
            out.append(f"log p_S {fmt(token.student_logprob, 3)}\n")
            out.append(f"log p_T {fmt(token.teacher_logprob, 3)}\n")
            delta = token.delta
            out.append("Δ T−S  ")
            out.append(fmt(delta, 3), style="green" if (delta or 0) > 0 else "red" if (delta or 0) < 0 else "")
            if token.student_logprob is not None:
                out.append(f"\np_S    {math.exp(token.student_logprob):.3f}")
        elif turn is not None:
            out.append("no token-level data", style="dim italic")
        if not self.decoder.has_tokenizer and token is not None:
            out.append("\n\n(no tokenizer: ids shown)", style="dim")
        self.query_one("#token-panel", Static).update(out)

    # ------------------------------------------------------------------ actions

    def _move_episode(self, step: int) -> None:
        if not self.shown:
            return
        pos = self.shown.index(self.current_episode) if self.current_episode in self.shown else -1
        pos = max(0, min(len(self.shown) - 1, pos + step))
        self.query_one("#episodes", DataTable).move_cursor(row=pos)
        self.show_episode(self.shown[pos])

    def action_next_episode(self) -> None:
        self._move_episode(1)

    def action_prev_episode(self) -> None:
        self._move_episode(-1)

    def _move_turn(self, step: int) -> None:
        if self.current_episode is None or self.current_turn is None:
            return
        n = len(self.episodes[self.current_episode].turns)
        k = max(0, min(n - 1, self.current_turn + step))
        self.query_one("#turns", DataTable).move_cursor(row=k)
        self.show_turn(k)

    def action_next_turn(self) -> None:
        self._move_turn(1)

    def action_prev_turn(self) -> None:
        self._move_turn(-1)

    def action_focus_tokens(self) -> None:
        self.query_one("#tokens", TokenView).focus()

    def action_focus_search(self) -> None:
        self.query_one("#search", Input).focus()

    def action_cycle_outcome(self) -> None:
        select = self.query_one("#outcome-filter", Select)
        current = self.episode_filter.outcome if self.episode_filter.outcome in OUTCOMES else "all"
        select.value = OUTCOMES[(OUTCOMES.index(current) + 1) % len(OUTCOMES)]

    def action_cycle_env(self) -> None:
        select = self.query_one("#env-filter", Select)
        options: list = [None, *self.envs]
        current = self.episode_filter.env if self.episode_filter.env in self.envs else None
        nxt = options[(options.index(current) + 1) % len(options)]
        if nxt is None:
            select.clear()
        else:
            select.value = nxt

    def action_clear_filters(self) -> None:
        """Clear the filters; with none set, go back to the screen beneath (if any)."""
        if self.episode_filter == EpisodeFilter() and not self.query_one("#search", Input).value:
            self.app.action_back()
            return
        self.query_one("#search", Input).value = ""
        self.query_one("#step-filter", Input).value = ""
        self.query_one("#env-filter", Select).clear()
        self.query_one("#outcome-filter", Select).value = "all"
        self.episode_filter = EpisodeFilter()
        self.refresh_list(keep=self.current_episode)
        self.query_one("#episodes", DataTable).focus()
