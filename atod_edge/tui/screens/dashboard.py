"""Training dashboard: a run directory's curves, refreshed on a timer while the trainer writes, and
once the run has finished its final evaluation from report.json (tui/run_report.py): the trained
student's success with its 95% interval, and the comparison table when the run compared models."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from atod_edge.tui.data import CURVES, RunDir
from atod_edge.tui.run_report import EvalRow, FinalEval, final_eval
from atod_edge.tui.screens.text_view import TextViewScreen
from atod_edge.tui.tokens import TokenDecoder
from atod_edge.tui.widgets.curve_plot import CurvePlot, format_value


class DashboardScreen(Screen):
    """Curves of success, reward, kappa/rho, turn weights, |log-ratio|, loss and episode length;
    above them a finished run's final evaluation, if it has one."""

    HELP_TITLE = "training dashboard"
    DEFAULT_CSS = """
    #final-eval { height: auto; margin: 0 1; padding: 0 1; border: round $panel-lighten-2;
                  border-title-align: left; }
    """
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
        yield Static(id="final-eval")
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
        final = final_eval(self.run.report())
        for key, _ in CURVES:
            self.query_one(f"#curve-{key}", CurvePlot).set_points(self.run.metrics.series(key))
        # a run without evaluations during training has its final one above the curves: no empty plot
        eval_curve = self.query_one("#curve-eval_success", CurvePlot)
        eval_curve.display = bool(eval_curve.points) or final is None
        panel = self.query_one("#final-eval", Static)
        panel.display = final is not None
        if final is not None:
            panel.border_title = final_eval_title(final)
            panel.update(final_eval_text(final))
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
            final = final_eval(report)
            if final is not None:
                out.append(f"  final eval success {success_text(final.student)}")
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


def success_text(row: EvalRow) -> str:
    """"62.0% [55.1%, 68.4%]": a success rate with its 95% interval, as train/pipeline.py's table."""
    if row.ci95 is None:
        return f"{row.success:.1%}"
    low, high = row.ci95
    return f"{row.success:.1%} [{low:.1%}, {high:.1%}]"


def final_eval_title(final: FinalEval) -> str:
    """"final evaluation · household eval split · 200 episodes · temperature 0.4"."""
    where = " ".join(part for part in (final.env, f"{final.split} split" if final.split else None) if part)
    episodes = final.student.episodes
    facts = ["final evaluation", where, f"{episodes} episodes" if episodes is not None else "",
             f"temperature {final.temperature:g}" if final.temperature is not None else ""]
    return " · ".join(fact for fact in facts if fact)


def final_eval_text(final: FinalEval) -> Text:
    """The final evaluation panel's table: one row per model (the trained student last, in bold),
    then the paired differences the pipeline computed."""
    width = max(len("model"), *(len(row.model) for row in final.rows)) + 2
    out = Text(f"{'model':{width}s}{'success':>8s}  {'95% CI':17s}{'score':>7s}{'turns':>7s}{'invalid':>9s}",
               style="dim")
    for row in final.rows:
        ci = f"[{row.ci95[0]:.1%}, {row.ci95[1]:.1%}]" if row.ci95 else "–"
        line = (f"{row.model:{width}s}{row.success:>8.1%}  {ci:17s}{_number(row.score, '.3f'):>7s}"
                f"{_number(row.turns, '.1f'):>7s}{_number(row.invalid_rate, '.1%'):>9s}")
        out.append("\n" + line, style="bold" if row is final.student else "")
    for line in final.paired:
        out.append("\n" + line, style="dim")
    return out


def _number(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)
