"""Live run: pick an env, a task and an agent, then step turn by turn or autoplay.

Env resets, env steps and model generation all run in a thread worker, so the UI never freezes;
an exception from the env or the model becomes a notification. An env call that raises, hangs past
its deadline or returns the wrong type ends the episode (live_session.EnvCallError): one red line
in the transcript and a notice. A person can take over any turn by
typing an action. Each result carries the session generation it was started for, so a result
that arrives after a restart is dropped instead of landing in the new episode.
"""

from __future__ import annotations

from rich.rule import Rule
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, OptionList, RichLog, Select, Static

from atod_edge.envs import SPLITS, list_envs
from atod_edge.errors import UserError
from atod_edge.tui.live_session import Agent, EnvCallError, LiveSession, StepOutcome, make_agent

AGENTS = ("expert", "human", "model")
SPEEDS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)   # autoplay seconds per turn


class LiveRunScreen(Screen):
    """Run one episode live with the scripted expert, a human or a model."""

    HELP_TITLE = "live run"
    BINDINGS = [
        Binding("s", "step", "step"),
        Binding("a", "autoplay", "autoplay"),
        Binding("plus", "faster", "faster"),
        Binding("minus", "slower", "slower"),
        Binding("r", "restart", "restart"),
        Binding("t", "next_task", "next task"),
        Binding("i", "take_over", "type"),
        Binding("x", "inspect", "inspect"),
    ]

    def __init__(self, *, env: str | None = None, split: str = "eval", index: int = 0,
                 agent: str = "expert", model_path: str | None = None, autostart: bool = True):
        super().__init__()
        self.env_names = list(list_envs())
        if env and env not in self.env_names:
            self.env_names.append(env)
        self.initial = {"env": env or (self.env_names[0] if self.env_names else None), "split": split,
                        "index": index, "agent": agent if agent in AGENTS else "expert",
                        "model_path": model_path or ""}
        self.autostart = autostart
        self.session: LiveSession | None = None
        self.agent: Agent | None = None
        self.generation = 0          # bumped on each (re)start; stale worker results are dropped
        self.busy = False
        self.speed_index = SPEEDS.index(0.5)
        self._autoplay_timer = None

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        init = self.initial
        yield Header()
        with Horizontal(id="live-setup"):
            yield Select([(n, n) for n in self.env_names], value=init["env"] or Select.NULL,
                         prompt="env", id="env-select", compact=True)
            yield Select([(s, s) for s in SPLITS], value=init["split"], allow_blank=False,
                         id="split-select", compact=True)
            yield Input(str(init["index"]), placeholder="task #", id="task-index", type="integer",
                        compact=True)
            yield Select([(a, a) for a in AGENTS], value=init["agent"], allow_blank=False,
                         id="agent-select", compact=True)
            yield Input(init["model_path"], placeholder="model: checkpoint dir, .onnx or .gguf",
                        id="model-path", compact=True)
            yield Button("start", id="start", compact=True, variant="primary")
        with Horizontal(id="live-body"):
            yield RichLog(id="transcript", wrap=True, markup=False, auto_scroll=True, min_width=20)
            with Vertical(id="live-side"):
                yield Static(id="live-status")
                yield Static("admissible actions", classes="section-title")
                yield OptionList(id="admissible")
        yield Input(placeholder="type an action and press enter to take this turn (i)", id="action-input")
        yield Footer()

    def on_unmount(self) -> None:
        if self.session is not None:
            self.session.close()

    def on_mount(self) -> None:
        self.sub_title = "live run"
        self.update_status()
        if self.autostart and self.initial["env"]:
            self.action_restart()

    # ------------------------------------------------------------------ setup

    def read_setup(self) -> tuple[str, str, int, str, str]:
        env = self.query_one("#env-select", Select).value
        if env is Select.NULL:
            raise UserError("choose an environment")
        split = str(self.query_one("#split-select", Select).value)
        raw_index = self.query_one("#task-index", Input).value.strip() or "0"
        try:
            index = int(raw_index)
        except ValueError:
            raise UserError(f"task index must be a whole number, got '{raw_index}'") from None
        agent = str(self.query_one("#agent-select", Select).value)
        model_path = self.query_one("#model-path", Input).value.strip()
        return str(env), split, index, agent, model_path

    def start(self) -> None:
        """(Re)start an episode from the setup row's values, in a worker."""
        self.stop_autoplay()
        try:
            env, split, index, agent_kind, model_path = self.read_setup()
            agent = make_agent(agent_kind, model_path)
        except UserError as e:
            self.notify(str(e), title="live run", severity="error")
            return
        self.generation += 1
        self.busy = True
        self.update_status("starting…")
        self._start_worker(env, split, index, agent, self.generation)

    @work(thread=True, exclusive=True, group="live-start")
    def _start_worker(self, env: str, split: str, index: int, agent: Agent, generation: int) -> None:
        session = None
        try:
            session = LiveSession(env, split, index)
            session.reset()
            load = getattr(agent, "load", None)
            if load is not None:
                load()   # load the model here, off the UI thread
        except Exception as e:  # env or model problems become a notice, never a crash
            if session is not None:
                session.close()
            self.app.call_from_thread(self._failed, e, generation)
            return
        self.app.call_from_thread(self._started, session, agent, generation)

    def _started(self, session: LiveSession, agent: Agent, generation: int) -> None:
        if generation != self.generation:
            session.close()   # a later restart superseded this one
            return
        if self.session is not None:
            self.session.close()   # the episode being replaced
        self.session, self.agent, self.busy = session, agent, False
        log = self.query_one("#transcript", RichLog)
        log.clear()
        head = Text(f"task {session.task.task_id}", style="bold")
        head.append(f" · agent {agent.name} · max {session.max_turns} turns", style="dim")
        log.write(head)
        log.write(Text(session.observation.rstrip()))
        self.update_admissible()
        self.update_status()

    def _failed(self, error: Exception, generation: int) -> None:
        if generation != self.generation:
            return
        self.busy = False
        self.stop_autoplay()
        message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        self.notify(message, title="live run", severity="error")
        self.update_status()

    def _turn_failed(self, error: EnvCallError, generation: int) -> None:
        """An env call of this turn failed: the episode is over (LiveSession.error); a red line, a notice."""
        if generation == self.generation and self.session is not None:
            self._env_error(str(error))
        self._failed(error, generation)

    def _env_error(self, message: str) -> None:
        """The episode was ended by an env error: say so in the transcript (the notice is the caller's)."""
        self.query_one("#transcript", RichLog).write(Text(f"episode ended by an env error: {message}",
                                                          style="bold red"))
        self.stop_autoplay()
        self.update_admissible()

    # ------------------------------------------------------------------ turns

    def take_turn(self, typed_action: str | None = None) -> bool:
        """Start one turn: the agent's (typed_action None) or a typed one. False if not possible."""
        if self.session is None or self.agent is None:
            self.notify("no episode running: press start", severity="warning")
            return False
        if self.busy:
            return False
        if self.session.done:
            self.stop_autoplay()
            self.notify("episode over: r restarts, t goes to the next task", severity="information")
            return False
        if typed_action is None and self.agent.name == "human":
            self.notify("human agent: type an action below (i)", severity="information")
            return False
        self.busy = True
        self.update_status("thinking…" if typed_action is None else None)
        self._turn_worker(self.session, self.agent, typed_action, self.generation)
        return True

    @work(thread=True, exclusive=True, group="live-turn")
    def _turn_worker(self, session: LiveSession, agent: Agent, typed_action: str | None,
                     generation: int) -> None:
        try:
            if typed_action is None:
                response, action, reason = session.decide(agent)
                who = agent.name
            else:
                response, action, reason, who = typed_action, typed_action, "", "human"
            outcome = session.apply(action, response, reason)
        except EnvCallError as e:   # the env raised, hung or returned garbage: the episode is over
            self.app.call_from_thread(self._turn_failed, e, generation)
            return
        except Exception as e:
            self.app.call_from_thread(self._failed, e, generation)
            return
        self.app.call_from_thread(self._turn_done, outcome, who, generation)

    def _turn_done(self, outcome: StepOutcome, who: str, generation: int) -> None:
        if generation != self.generation or self.session is None:
            return
        self.busy = False
        turn = outcome.turn
        log = self.query_one("#transcript", RichLog)
        log.write(Rule(f"turn {len(self.session.turns)} · {who}", style="dim"), expand=True)
        if turn.response and turn.response not in (turn.action, f"<action>{turn.action}</action>"):
            log.write(Text(turn.response.rstrip(), style="italic"))
        line = Text("> ", style="bold")
        line.append(turn.action if turn.action is not None else "(no action parsed)",
                    style="bold green" if turn.valid else "bold red")
        line.append("  valid" if turn.valid else "  invalid", style="green" if turn.valid else "red")
        line.append(f"  reward {turn.reward:.2f}", style="dim")
        if turn.feedback:
            line.append(f"  ({turn.feedback})", style="yellow")
        log.write(line)
        log.write(Text(outcome.observation.rstrip()))
        if outcome.error:
            self._env_error(outcome.error)
            self.notify(outcome.error, title="live run", severity="error")
        elif outcome.done:
            verdict = "won" if outcome.won else "lost"
            log.write(Text(f"episode over: {verdict} · score {outcome.score:.2f} · "
                           f"{len(self.session.turns)} turns", style="bold green" if outcome.won else "bold red"))
            self.stop_autoplay()
        self.update_admissible()
        self.update_status()

    # ------------------------------------------------------------------ side panel

    def update_admissible(self) -> None:
        options = self.query_one("#admissible", OptionList)
        options.clear_options()
        if self.session is not None and self.session.admissible:
            options.add_options(self.session.admissible)
            options.highlighted = 0

    def update_status(self, activity: str | None = None) -> None:
        out = Text()
        s = self.session
        if s is None:
            out.append("no episode", style="dim italic")
        else:
            out.append(f"{s.task.task_id}\n", style="bold")
            out.append(f"agent   {self.agent.name if self.agent else '–'}\n")
            out.append(f"turn    {len(s.turns)} / {s.max_turns}\n")
            out.append(f"reward  {s.total_reward:.2f}\n")
            out.append(f"score   {s.score:.2f}\n")
            if s.turns:
                last = s.turns[-1]
                out.append("last    ")
                out.append("valid" if last.valid else "invalid", style="green" if last.valid else "red")
                out.append("\n")
            if s.error:
                out.append("done: env error\n", style="bold red")
            elif s.done:
                out.append("done: won\n" if s.won else "done: lost\n", style="bold green" if s.won else "bold red")
        out.append(f"autoplay {'on' if self._autoplay_timer else 'off'} · {SPEEDS[self.speed_index]:g} s/turn")
        if activity:
            out.append(f"\n{activity}", style="yellow")
        self.query_one("#live-status", Static).update(out)

    # ------------------------------------------------------------------ events

    @on(Button.Pressed, "#start")
    def _start_pressed(self) -> None:
        self.start()

    @on(Input.Submitted, "#action-input")
    def _action_submitted(self, event: Input.Submitted) -> None:
        action = event.value.strip()
        if action and self.take_turn(action):
            event.input.value = ""

    @on(OptionList.OptionSelected, "#admissible")
    def _admissible_chosen(self, event: OptionList.OptionSelected) -> None:
        action_input = self.query_one("#action-input", Input)
        action_input.value = str(event.option.prompt)
        action_input.focus()

    # ------------------------------------------------------------------ actions

    def action_step(self) -> None:
        self.take_turn()

    def action_restart(self) -> None:
        self.start()

    def action_next_task(self) -> None:
        index_input = self.query_one("#task-index", Input)
        try:
            index = int(index_input.value.strip() or "0") + 1
        except ValueError:
            index = 0
        index_input.value = str(index)
        self.start()

    def action_take_over(self) -> None:
        self.query_one("#action-input", Input).focus()

    def action_autoplay(self) -> None:
        if self._autoplay_timer is not None:
            self.stop_autoplay()
        elif self.agent is not None and self.agent.name == "human":
            self.notify("autoplay needs the expert or a model agent", severity="warning")
        else:
            self._autoplay_timer = self.set_interval(SPEEDS[self.speed_index], self._autoplay_tick)
            self._autoplay_tick()
        self.update_status()

    def _autoplay_tick(self) -> None:
        if self.busy:
            return
        if self.session is None or self.session.done or not self.take_turn():
            self.stop_autoplay()
            self.update_status()

    def stop_autoplay(self) -> None:
        if self._autoplay_timer is not None:
            self._autoplay_timer.stop()
            self._autoplay_timer = None

    def _set_speed(self, delta: int) -> None:
        self.speed_index = max(0, min(len(SPEEDS) - 1, self.speed_index + delta))
        if self._autoplay_timer is not None:   # restart the timer at the new pace
            self.stop_autoplay()
            self._autoplay_timer = self.set_interval(SPEEDS[self.speed_index], self._autoplay_tick)
        self.update_status()

    def action_faster(self) -> None:
        self._set_speed(-1)

    def action_slower(self) -> None:
        self._set_speed(1)

    def action_inspect(self) -> None:
        if self.session is None or not self.session.turns:
            self.notify("no turns to inspect yet", severity="warning")
            return
        from atod_edge.tui.screens.inspector import InspectorScreen

        episode = self.session.episode(self.agent.name if self.agent else "")
        self.app.push_screen(InspectorScreen(episodes=[episode], title=f"live · {episode.task_id}",
                                             decoder=getattr(self.app, "decoder", None)))
