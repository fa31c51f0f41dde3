"""Training dashboard: a run directory's curves, refreshed on a timer while the trainer writes."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from atod_edge.tui.data import CURVES, RunDir, TokenDecoder
from atod_edge.tui.screens.text_view import TextViewScreen
from atod_edge.tui.widgets.curve_plot import CurvePlot, format_value


class DashboardScreen(Screen):
    """Curves of success, reward, kappa/rho, turn weights, |log-ratio|, loss and episode length."""

    HELP_TITLE = "training dashboard"
    BINDINGS = [
        Binding("r", "reload", "reload"),
        Binding("space", "toggle_follow", "pause/follow"),
        Binding("c", "show_config", "config"),
        Binding("s", "open_samples", "samples"),
    ]

    def __init__(self, run_dir: str | Path, *, refresh_seconds: float = 2.0,
                 decoder: TokenDecoder | None = None):
        super().__init__()
        self.run = RunDir(run_dir)
        self.refresh_seconds = refresh_seconds
        self.decoder = decoder
        self.following = True
        self._timer = None
        self._warned_skipped = 0

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="run-status")
        with Grid(id="curves"):
            for key, title in CURVES:
                yield CurvePlot(key, title, id=f"curve-{key}", classes="curve")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"dashboard · {self.run.path.name}"
        self.reload()
        if self.refresh_seconds > 0:
            self._timer = self.set_interval(self.refresh_seconds, self.refresh_tick)

    def refresh_tick(self) -> None:
        """What the refresh timer runs: read new lines while following, nothing while paused."""
        if self.following:
            self.reload()

    def reload(self) -> None:
        """Read new metric lines (if any) and redraw; never raises on a torn or missing file."""
        self.run.metrics.poll()
        for key, _ in CURVES:
            self.query_one(f"#curve-{key}", CurvePlot).set_points(self.run.metrics.series(key))
        self.query_one("#run-status", Static).update(self.status_text())
        skipped = self.run.metrics.skipped
        if skipped > self._warned_skipped:
            self._warned_skipped = skipped
            self.notify(f"metrics.jsonl: skipped {skipped} corrupt line(s)", title="metrics",
                        severity="warning")

    def status_text(self) -> Text:
        metrics = self.run.metrics
        rows = [r for r in metrics.rows if "step" in r]
        report = self.run.report()
        out = Text()
        out.append(self.run.path.name, style="bold")
        if not metrics.exists:
            out.append("  waiting for metrics.jsonl…", style="yellow")
        else:
            last = rows[-1] if rows else {}
            out.append(f"  step {last.get('step', '–')}")
            tokens = sum(r.get("tokens", 0) for r in rows if isinstance(r.get("tokens"), (int, float)))
            if tokens:
                out.append(f"  {format_value(tokens)} tokens")
            times = [sum(r.get(k, 0) for k in ("time_rollout", "time_teacher", "time_update")
                         if isinstance(r.get(k), (int, float))) for r in rows[-20:]]
            if any(times):
                out.append(f"  {sum(times) / len(times):.2f} s/step")
            eval_success = metrics.last("eval_success")
            if eval_success is not None:
                out.append(f"  eval success {format_value(eval_success)}")
        out.append("  ")
        if report is not None:
            out.append("finished", style="bold green")
        else:
            out.append("following" if self.following else "paused", style="cyan" if self.following else "yellow")
        samples = self.run.sample_files()
        out.append(f"  {len(samples)} sample file(s)", style="dim")
        return out

    # ------------------------------------------------------------------ actions

    def action_reload(self) -> None:
        self.reload()

    def action_toggle_follow(self) -> None:
        self.following = not self.following
        if self._timer is not None:
            if self.following:
                self._timer.resume()
            else:
                self._timer.pause()
        self.query_one("#run-status", Static).update(self.status_text())

    def action_show_config(self) -> None:
        self.app.push_screen(TextViewScreen(f"config · {self.run.path.name}", self.run.config_text()))

    def action_open_samples(self) -> None:
        latest = self.run.latest_sample()
        if latest is None:
            self.notify("no sample episodes in this run yet (samples/step_*.jsonl)", severity="warning")
            return
        from atod_edge.tui.screens.inspector import InspectorScreen

        decoder = self.decoder
        if decoder is None:
            decoder, notice = TokenDecoder.load(run_dir=self.run.path)
        try:
            screen = InspectorScreen(latest, decoder=decoder, title=f"{self.run.path.name}/samples/{latest.name}")
        except Exception as e:  # an unreadable samples file is a notice, not a crash
            self.notify(f"cannot open {latest.name}: {e}", severity="error")
            return
        self.app.push_screen(screen)
