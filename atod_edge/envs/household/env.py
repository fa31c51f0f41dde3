"""The household env: the room an agent plays, its action semantics and feedback.

Data flow: `reset(task)` draws a room from the task's seed (world.py, with catalog.py's tables);
each `step(action)` runs one valid action on that room or explains why it is invalid; the
experts (experts.py) give the next action from the prompt's view or, as an oracle, from the room.

Speed: the valid actions of a state are built once per state change into a dict
action text -> operation, so checking and running an action is a dict lookup.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

from atod_edge.envs.base import HISTORY_TURNS, MAX_ACTION_CHARS, SPLITS, Env, StepResult, Task
from atod_edge.envs.household import experts
from atod_edge.envs.household.catalog import LOOK, OBJECTS, VERB_TO_APPLIANCE, VERB_TO_STATE
from atod_edge.envs.household.world import Room
from atod_edge.errors import UserError

NOTHING_HAPPENS = "Nothing happens."


def _with_article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def _list_things(names: list[str]) -> str:
    """ALFWorld-style list: 'a mug 1, an apple 2, and a knife 1' (or 'nothing')."""
    if not names:
        return "nothing"
    if len(names) == 1:
        return _with_article(names[0])
    return ", ".join(_with_article(n) for n in names[:-1]) + ", and " + _with_article(names[-1])


def _normalize(action: str) -> str:
    """Lower-case, collapse whitespace and drop a trailing full stop, so 'Open  Fridge 1.' works."""
    return " ".join(action.lower().split()).rstrip(".!")


# ---------------------------------------------------------------- the environment

class HouseholdEnv(Room, Env):
    """ALFWorld-style text household: find objects, open, take, clean/heat/cool, put, use a lamp."""

    name: ClassVar[str] = "household"
    max_turns: ClassVar[int] = 30
    description: ClassVar[str] = "ALFWorld-style household tasks in a procedurally generated room"
    # Short on purpose: it is in every prompt, and the admissible actions are listed anyway.
    instructions: ClassVar[str] = (
        "Household task: do what follows 'Your task is to:'. Actions: go to X, open X, take O "
        "from X, put O in/on X, clean/heat/cool O with X, use X. Hold one object at a time."
    )

    def __init__(self) -> None:
        self._task: Task | None = None

    # ------------------------------------------------------------ a new episode

    def reset(self, task: Task) -> str:
        if task.split not in SPLITS:
            raise UserError(f"unknown split '{task.split}' (allowed: {', '.join(SPLITS)})")
        self._task = task
        self.generate(random.Random(task.seed), unseen=task.split == "unseen")
        self.location: str | None = None   # None: the middle of the room
        self.holding: str | None = None
        self.lamp_on = False
        self.turns = 0
        self.won = False
        self.done = False
        self._refresh_actions()
        self.task_text = self.goal_text()
        self._room_text = ("You are in the middle of a room. Looking quickly around you, you see "
                           f"{_list_things(self.receptacles)}.")
        self._first_observation = f"{self._room_text}\n\nYour task is to: {self.task_text}"
        self._recent: list[tuple[str, str]] = []  # the last HISTORY_TURNS (action, observation)
        # receptacles shown without a goal object since the last take or put (expert bookkeeping)
        self._searched: set[str] = set()
        return self._first_observation

    # ------------------------------------------------------------ admissible actions

    def _visible_inside(self, receptacle: str) -> bool:
        return not self.rec_spec[receptacle].openable or self.is_open[receptacle]

    def _refresh_actions(self) -> None:
        """Rebuild the valid actions of this state: listed text -> op, plus accepted aliases."""
        ops: dict[str, tuple[str, str, str | None]] = {}
        here, held = self.location, self.holding
        for r in self.receptacles:
            if r != here:
                ops["go to " + r] = ("go", r, None)
        aliases: dict[str, tuple[str, str, str | None]] = {}
        if here is not None:
            spec = self.rec_spec[here]
            if spec.openable:
                if self.is_open[here]:
                    ops["close " + here] = ("close", here, None)
                else:
                    ops["open " + here] = ("open", here, None)
            visible = self._visible_inside(here)
            if visible and held is None:
                for o in self.contents[here]:
                    if o in self.obj_kind:  # lamps are listed but cannot be taken
                        ops[f"take {o} from {here}"] = ("take", o, here)
            if held is not None:
                if visible and spec.container:
                    ops[f"put {held} {spec.preposition} {here}"] = ("put", held, here)
                    other = "on" if spec.preposition == "in" else "in"
                    aliases[f"put {held} {other} {here}"] = ("put", held, here)
                    aliases[f"put {held} in/on {here}"] = ("put", held, here)
                kind = self.rec_kind[here]
                for verb, appliance in VERB_TO_APPLIANCE.items():
                    if kind == appliance and verb in OBJECTS[self.obj_kind[held]].abilities:
                        ops[f"{verb} {held} with {here}"] = (verb, held, here)
            if here == self.lamp_location and not self.lamp_on:
                ops["use " + self.lamp_name] = ("use", self.lamp_name, None)
            ops["examine " + here] = ("examine_here", here, None)
        if held is not None:
            ops["examine " + held] = ("examine_held", held, None)
        ops["look"] = ("look", "", None)
        ops["inventory"] = ("inventory", "", None)
        self._admissible = sorted(ops)
        aliases.update(ops)
        self._ops = aliases

    def admissible_actions(self) -> list[str]:
        self._require_reset()
        return list(self._admissible)

    # ------------------------------------------------------------ stepping

    def step(self, action: str) -> StepResult:
        self._require_reset()
        if self.done:
            return StepResult("The episode is over.", 0.0, True, self._info(False, "the episode is over"))
        self.turns += 1
        if not isinstance(action, str):
            text, op = None, None
        elif len(action) > MAX_ACTION_CHARS:
            text, op = "", None
        else:
            text = _normalize(action)
            op = self._ops.get(text)
        if op is None:
            observation, valid, feedback = NOTHING_HAPPENS, False, self._why_invalid(text)
        else:
            observation, valid, feedback = self._apply(*op), True, ""
            self.won = self._goal_met()
        reward = 1.0 if self.won else 0.0
        self.done = self.won or self.turns >= self.max_turns
        self._recent = (self._recent + [(str(action)[:MAX_ACTION_CHARS], observation)])[-HISTORY_TURNS:]
        return StepResult(observation, reward, self.done, self._info(valid, feedback))

    def _info(self, valid: bool, feedback: str) -> dict[str, Any]:
        return {"valid": valid, "won": self.won, "score": 1.0 if self.won else 0.0,
                "admissible": list(self._admissible), "feedback": feedback}

    def _require_reset(self) -> None:
        if self._task is None:
            raise RuntimeError("HouseholdEnv: call reset(task) before step()")

    def _describe_here(self, receptacle: str) -> str:
        """What you see at a receptacle: closed, or its contents."""
        if receptacle == "floorlamp 1":
            return f"The floorlamp 1 is {'on' if self.lamp_on else 'off'}."
        spec = self.rec_spec[receptacle]
        if spec.openable and not self.is_open[receptacle]:
            return f"The {receptacle} is closed."
        things = _list_things(self.contents[receptacle])
        if spec.openable:
            return f"The {receptacle} is open. In it, you see {things}."
        return f"{spec.preposition.capitalize()} the {receptacle}, you see {things}."

    def _apply(self, op: str, a: str, b: str | None) -> str:
        """Run a valid operation (checked by construction of the ops dict) and describe it."""
        state_changed = True
        if op == "go":
            self.location = a
            observation = f"You arrive at {a}. {self._describe_here(a)}"
        elif op == "open":
            self.is_open[a] = True
            observation = f"You open the {a}. In it, you see {_list_things(self.contents[a])}."
        elif op == "close":
            self.is_open[a] = False
            observation = f"You close the {a}."
        elif op == "take":
            self.contents[b].remove(a)
            self.obj_loc[a] = "hand"
            self.holding = a
            observation = f"You pick up the {a} from the {b}."
        elif op == "put":
            self.contents[b].append(a)
            self.obj_loc[a] = b
            self.holding = None
            observation = f"You put the {a} {self.rec_spec[b].preposition} the {b}."
        elif op in VERB_TO_STATE:
            states = self.obj_states[a]
            new_state = VERB_TO_STATE[op]
            # heating undoes cooling and the reverse
            states.discard({"hot": "cool", "cool": "hot"}.get(new_state, ""))
            states.add(new_state)
            observation = f"You {op} the {a} using the {b}."
            state_changed = False  # the set of valid actions does not depend on object states
        elif op == "use":
            self.lamp_on = True
            observation = f"You turn on the {a}."
        else:
            state_changed = False
            if op == "examine_here":
                observation = self._describe_here(a)
            elif op == "examine_held":
                lit = self.lamp_on and self.location == self.lamp_location
                observation = f"This is a normal {a}." if lit else f"There's nothing special about {a}."
            elif op == "inventory":
                observation = (f"You are carrying: {_with_article(self.holding)}." if self.holding
                               else "You are not carrying anything.")
            else:  # look
                observation = (f"You are facing the {self.location}. {self._describe_here(self.location)}"
                               if self.location else self._room_text)
        if op in ("take", "put"):
            self._searched.clear()
        here = self.location
        if (here is not None and self._visible_inside(here)
                and not any(self.obj_kind.get(o) == self.goal_kind for o in self.contents[here])):
            self._searched.add(here)
        if state_changed:
            self._refresh_actions()
        return observation

    def _goal_met(self) -> bool:
        if self.family == LOOK:
            held = self.holding
            return (held is not None and self.obj_kind[held] == self.goal_kind and self.lamp_on
                    and self.location == self.lamp_location)
        return any(self.count_done(r) >= self.goal_count for r in self.receptacles
                   if self.rec_kind[r] == self.target_kind)

    def _why_invalid(self, text: str | None) -> str:
        """A short reason for an invalid action (only computed for invalid actions)."""
        if text is None:
            return "the action must be text"
        if text == "":
            return f"empty or over-long action (at most {MAX_ACTION_CHARS} characters); try 'look'"
        verb = text.split()[0]
        if verb not in ("go", "open", "close", "take", "put", "clean", "heat", "cool", "use",
                        "examine", "look", "inventory"):
            return ("unknown action; use go to, open, close, take, put, clean, heat, cool, use, "
                    "examine, look or inventory")
        mentioned = [r for r in self.receptacles if r in text]
        if verb == "go" and mentioned and mentioned[0] == self.location:
            return f"you are already at {self.location}"
        if verb in ("open", "close", "take", "put", "clean", "heat", "cool", "use"):
            if self.location is None or (mentioned and self.location not in mentioned):
                return "go to the receptacle first"
            if self.location in self.is_open and not self.is_open[self.location] and verb != "open":
                return f"the {self.location} is closed"
        if verb == "take" and self.holding is not None:
            return f"you are already holding the {self.holding}; put it somewhere first"
        if verb in ("put", "clean", "heat", "cool") and self.holding is None:
            return "you are not holding anything"
        return "that action is not possible here"

    # ------------------------------------------------------------ the scripted experts

    def expert_action(self, oracle: bool = False) -> str:
        """The scripted expert's next action, computed only from what the agent's prompt shows.

        The expert sees what a memory-less agent sees: the task observation, the last
        HISTORY_TURNS (action, observation) pairs and the current admissible actions (see
        `visible_expert_action`), so its demonstrations can be imitated. It searches receptacles
        in sorted order, so it may take more turns than the oracle. `oracle=True` gives
        `oracle_action()` instead, which reads the hidden world state.
        """
        self._require_reset()
        if oracle:
            return self.oracle_action()
        return experts.visible_expert_action(self._first_observation, self._recent, self._admissible,
                                             self._searched)

    def oracle_action(self) -> str:
        """The next action of a scripted oracle that knows where everything is (experts.py):
        shorter than the visible expert's, but not imitable."""
        self._require_reset()
        return experts.oracle_action(self)
