"""A built-in ALFWorld-style household environment, pure Python and procedurally generated.

Each task is a small room (6-12 receptacles, 6-15 objects) built from `random.Random(task.seed)`
with one goal from the six ALFWorld task families:

    pick_and_place          "put a mug in cabinet."
    look_at_obj_in_light    "examine the book with the desklamp."
    pick_clean_then_place   "put a clean mug in coffeemachine."     (clean with sinkbasin 1)
    pick_heat_then_place    "put a hot apple in countertop."         (heat with microwave 1)
    pick_cool_then_place    "put a cool tomato in diningtable."      (cool with fridge 1)
    pick_two_obj_and_place  "put two book in shelf."

As in ALFWorld, a goal names a receptacle *type*: any instance of it counts (for two objects,
both must end up in the same instance).

Splits: train and eval are the same distribution over disjoint seeds. The unseen split holds
out whole object types (UNSEEN_ONLY_OBJECTS): they never appear, not even as clutter, in a
train or eval room, and every unseen task's goal object is one of them.

Experts: `expert_action()` acts only on what the agent's prompt shows (the task, the last
RECENT_TURNS turns and the admissible actions; see `visible_expert_action`), so a memory-less
model can imitate its demonstrations: it searches the receptacles where the goal object can
start in sorted order. `oracle_action()` (or `expert_action(oracle=True)`) reads the hidden
world state and walks straight to the objects: shorter, but not imitable.

Speed: the valid actions of a state are built once per state change into a dict
action text -> operation, so checking and running an action is a dict lookup.
"""

from __future__ import annotations

import functools
import random
import re
from typing import Any, ClassVar, Collection, NamedTuple, Sequence

from atod_edge.envs.base import SPLITS, Env, StepResult, Task
from atod_edge.errors import UserError


# ---------------------------------------------------------------- the world's vocabulary

class ReceptacleKind(NamedTuple):
    openable: bool      # starts closed; must be opened to see inside, take or put
    preposition: str    # "in" or "on", for observations and goal text
    max_count: int      # most instances of this kind in one room
    container: bool = True  # False: a place you can go to but not put things in (floorlamp)


RECEPTACLES: dict[str, ReceptacleKind] = {
    "fridge": ReceptacleKind(True, "in", 1),
    "microwave": ReceptacleKind(True, "in", 1),
    "sinkbasin": ReceptacleKind(False, "in", 1),
    "stoveburner": ReceptacleKind(False, "on", 2),
    "countertop": ReceptacleKind(False, "on", 3),
    "cabinet": ReceptacleKind(True, "in", 4),
    "drawer": ReceptacleKind(True, "in", 3),
    "shelf": ReceptacleKind(False, "on", 3),
    "desk": ReceptacleKind(False, "on", 1),
    "sidetable": ReceptacleKind(False, "on", 2),
    "dresser": ReceptacleKind(False, "on", 1),
    "garbagecan": ReceptacleKind(False, "in", 1),
    "coffeemachine": ReceptacleKind(False, "in", 1),
    "diningtable": ReceptacleKind(False, "on", 1),
    "bed": ReceptacleKind(False, "on", 1),
    "sofa": ReceptacleKind(False, "on", 1),
    "armchair": ReceptacleKind(False, "on", 1),
}
# the floorlamp stands on its own: you go to it and use it, nothing goes in or on it
FLOORLAMP = ReceptacleKind(False, "at", 1, container=False)
DESKLAMP_HOSTS = ("desk", "sidetable", "dresser")

PLACE, LOOK, CLEAN, HEAT, COOL, TWO = (
    "pick_and_place", "look_at_obj_in_light", "pick_clean_then_place",
    "pick_heat_then_place", "pick_cool_then_place", "pick_two_obj_and_place")
FAMILIES = (PLACE, LOOK, CLEAN, HEAT, COOL, TWO)

# family -> (appliance kind, state it gives, verb) for the three "process then place" families
PROCESS = {
    CLEAN: ("sinkbasin", "clean", "clean"),
    HEAT: ("microwave", "hot", "heat"),
    COOL: ("fridge", "cool", "cool"),
}
VERB_TO_STATE = {verb: state for _, state, verb in PROCESS.values()}
VERB_TO_APPLIANCE = {verb: appliance for appliance, _, verb in PROCESS.values()}


class ObjectKind(NamedTuple):
    starts: tuple[str, ...]    # receptacle kinds it can start in
    families: frozenset        # task families it can be the goal object of
    targets: tuple[str, ...]   # receptacle kinds a goal may ask to put it in/on
    abilities: frozenset       # processing verbs that work on it: clean / heat / cool


def _object_kind(starts: str, families: str, targets: str, abilities: str = "") -> ObjectKind:
    family_names = {"place": PLACE, "look": LOOK, "clean": CLEAN, "heat": HEAT, "cool": COOL, "two": TWO}
    return ObjectKind(tuple(starts.split()), frozenset(family_names[f] for f in families.split()),
                      tuple(targets.split()), frozenset(abilities.split()))


_FOOD_STARTS = "fridge countertop diningtable"
_FOOD_TARGETS = "countertop diningtable fridge microwave garbagecan"
OBJECTS: dict[str, ObjectKind] = {
    "apple": _object_kind(_FOOD_STARTS + " garbagecan", "place two heat cool clean", _FOOD_TARGETS + " sidetable",
                   "clean heat cool"),
    "potato": _object_kind(_FOOD_STARTS + " garbagecan cabinet", "place two heat cool clean", _FOOD_TARGETS,
                    "clean heat cool"),
    "egg": _object_kind(_FOOD_STARTS, "place heat cool clean", _FOOD_TARGETS, "clean heat cool"),
    "tomato": _object_kind(_FOOD_STARTS + " garbagecan", "place two heat cool clean", _FOOD_TARGETS,
                    "clean heat cool"),
    "lettuce": _object_kind(_FOOD_STARTS, "place two cool clean", "countertop diningtable fridge sidetable",
                     "clean cool"),
    "bread": _object_kind("countertop diningtable cabinet fridge", "place two heat cool",
                   "countertop diningtable fridge microwave cabinet", "heat cool"),
    "mug": _object_kind("cabinet countertop shelf coffeemachine sinkbasin desk", "place two heat cool clean look",
                 "cabinet coffeemachine countertop shelf sidetable desk", "clean heat cool"),
    "bowl": _object_kind("cabinet countertop shelf diningtable fridge", "place two cool clean look",
                  "cabinet countertop shelf diningtable fridge microwave", "clean heat cool"),
    "plate": _object_kind("cabinet countertop diningtable shelf", "place two heat cool clean",
                   "cabinet countertop diningtable shelf fridge", "clean heat cool"),
    "knife": _object_kind("drawer countertop diningtable sinkbasin", "place two clean",
                   "drawer countertop diningtable", "clean"),
    "spoon": _object_kind("drawer countertop diningtable sinkbasin", "place two clean",
                   "drawer countertop diningtable", "clean"),
    "book": _object_kind("shelf desk sidetable bed sofa drawer", "place two look",
                  "shelf desk sidetable bed sofa drawer"),
    "cd": _object_kind("shelf desk sidetable drawer garbagecan", "place two look",
                "shelf desk sidetable drawer garbagecan"),
    "pen": _object_kind("desk drawer sidetable shelf", "place two look", "desk drawer shelf sidetable garbagecan"),
    "keychain": _object_kind("sidetable drawer dresser shelf sofa", "place two look",
                      "drawer dresser sidetable shelf sofa armchair"),
    "pillow": _object_kind("bed sofa armchair", "place two look", "bed sofa armchair"),
    "alarmclock": _object_kind("desk sidetable dresser shelf", "place two look", "desk sidetable dresser shelf"),
    # held out for the unseen split: never generated in train or eval rooms
    "cup": _object_kind("cabinet countertop diningtable shelf", "place two heat cool clean",
                 "cabinet countertop diningtable shelf coffeemachine", "clean heat cool"),
    "pan": _object_kind("stoveburner countertop cabinet", "place cool clean",
                 "stoveburner countertop cabinet diningtable", "clean cool"),
    "cellphone": _object_kind("desk sidetable dresser bed sofa", "place two look",
                       "desk sidetable dresser bed sofa drawer"),
    "creditcard": _object_kind("desk sidetable dresser countertop drawer", "place two look",
                        "desk sidetable dresser drawer shelf"),
}
UNSEEN_ONLY_OBJECTS = frozenset({"cup", "pan", "cellphone", "creditcard"})
SEEN_OBJECTS = tuple(k for k in OBJECTS if k not in UNSEEN_ONLY_OBJECTS)
ALL_OBJECTS = tuple(OBJECTS)
LAMPS = ("desklamp", "floorlamp")

MIN_RECEPTACLES, MAX_RECEPTACLES = 6, 12
MIN_OBJECTS, MAX_OBJECTS = 6, 15
MAX_ACTION_CHARS = 200  # longer inputs are rejected before any parsing work
RECENT_TURNS = 2  # turns of history the agent's prompt shows (atod_edge/prompts.py build_messages)

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

class HouseholdEnv(Env):
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

    # ------------------------------------------------------------ world generation

    def reset(self, task: Task) -> str:
        if task.split not in SPLITS:
            raise UserError(f"unknown split '{task.split}' (allowed: {', '.join(SPLITS)})")
        self._task = task
        self._generate(random.Random(task.seed), unseen=task.split == "unseen")
        self.location: str | None = None   # None: the middle of the room
        self.holding: str | None = None
        self.lamp_on = False
        self.turns = 0
        self.won = False
        self.done = False
        self._refresh_actions()
        self.task_text = self._goal_text()
        self._room_text = ("You are in the middle of a room. Looking quickly around you, you see "
                           f"{_list_things(self.receptacles)}.")
        self._first_observation = f"{self._room_text}\n\nYour task is to: {self.task_text}"
        self._recent: list[tuple[str, str]] = []  # the last RECENT_TURNS (action, observation)
        # receptacles shown without a goal object since the last take or put (expert bookkeeping)
        self._searched: set[str] = set()
        return self._first_observation

    def _generate(self, rng: random.Random, unseen: bool) -> None:
        """Build the room and goal. Goal first, then the receptacles it needs, then clutter."""
        object_pool = UNSEEN_ONLY_OBJECTS if unseen else SEEN_OBJECTS
        clutter_pool = ALL_OBJECTS if unseen else SEEN_OBJECTS
        self.family = family = rng.choice(FAMILIES)
        goal_kind = rng.choice(sorted(k for k in object_pool if family in OBJECTS[k].families))
        spec = OBJECTS[goal_kind]
        appliance = PROCESS[family][0] if family in PROCESS else None

        lamp = rng.choice(LAMPS) if family == LOOK else None
        target_kind = None
        if family != LOOK:
            target_kind = rng.choice([t for t in spec.targets if t != appliance])
        # the goal object starts somewhere that is not the goal receptacle kind
        start_choices = [s for s in spec.starts if s != target_kind]
        start_kinds = rng.sample(start_choices, min(len(start_choices), rng.randint(1, 2)))

        counts: dict[str, int] = {}
        for kind in [appliance, target_kind, *start_kinds]:
            if kind is not None:
                counts[kind] = 1
        if lamp is None and rng.random() < 0.5:  # lamps also stand in rooms whose goal needs none
            lamp = rng.choice(LAMPS)
        lamp_host = None
        if lamp == "desklamp":
            hosts = [h for h in DESKLAMP_HOSTS if h in counts] or [rng.choice(DESKLAMP_HOSTS)]
            lamp_host = rng.choice(hosts)
            counts.setdefault(lamp_host, 1)
        n_receptacles = rng.randint(MIN_RECEPTACLES, MAX_RECEPTACLES) - (lamp == "floorlamp")
        kinds = sorted(RECEPTACLES)
        while sum(counts.values()) < n_receptacles:
            kind = rng.choice(kinds)
            if counts.get(kind, 0) < RECEPTACLES[kind].max_count:
                counts[kind] = counts.get(kind, 0) + 1

        receptacles = [f"{kind} {i}" for kind, n in counts.items() for i in range(1, n + 1)]
        if lamp == "floorlamp":
            receptacles.append("floorlamp 1")
        rng.shuffle(receptacles)
        self.receptacles = receptacles
        self.rec_kind = {r: r.rsplit(" ", 1)[0] for r in receptacles}
        self.rec_spec = {r: RECEPTACLES.get(k, FLOORLAMP) for r, k in self.rec_kind.items()}
        self.is_open = {r: False for r in receptacles if self.rec_spec[r].openable}
        self.contents: dict[str, list[str]] = {r: [] for r in receptacles}
        self.obj_kind: dict[str, str] = {}
        self.obj_loc: dict[str, str] = {}
        self.obj_states: dict[str, set[str]] = {}
        self._kind_counter: dict[str, int] = {}

        def receptacles_of(kinds_wanted) -> list[str]:
            return [r for r in receptacles if self.rec_kind[r] in kinds_wanted]

        # goal objects: two needed for TWO (plus maybe a spare), one or two otherwise
        n_goal = (2 if family == TWO else 1) + (rng.random() < 0.3)
        start_recs = receptacles_of(start_kinds)
        for _ in range(n_goal):
            self._add_object(goal_kind, rng.choice(start_recs))
        # clutter: other kinds, only where that kind can start
        n_objects = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
        clutter_kinds = [k for k in clutter_pool if k != goal_kind]
        for _ in range(200):  # bounded: a room may offer few spots for some kinds
            if len(self.obj_kind) >= n_objects:
                break
            kind = rng.choice(clutter_kinds)
            spots = [r for r in receptacles_of(OBJECTS[kind].starts) if self.rec_spec[r].container]
            if spots:
                self._add_object(kind, rng.choice(spots))

        self.lamp_name = f"{lamp} 1" if lamp else None
        self.lamp_location = None
        if lamp == "desklamp":
            self.lamp_location = rng.choice(receptacles_of([lamp_host]))
            self.contents[self.lamp_location].append(self.lamp_name)  # visible there, not takeable
        elif lamp == "floorlamp":
            self.lamp_location = "floorlamp 1"

        self.goal_kind = goal_kind
        self.target_kind = target_kind
        self.goal_state = PROCESS[family][1] if family in PROCESS else None
        self.appliance = f"{appliance} 1" if appliance else None
        self.goal_count = 2 if family == TWO else 1
        self.goal_lamp = lamp if family == LOOK else None
        self._alternate_wording = rng.random() < 0.5

    def _add_object(self, kind: str, receptacle: str) -> None:
        n = self._kind_counter.get(kind, 0) + 1
        self._kind_counter[kind] = n
        name = f"{kind} {n}"
        self.obj_kind[name] = kind
        self.obj_loc[name] = receptacle
        self.obj_states[name] = set()
        self.contents[receptacle].append(name)

    def _goal_text(self) -> str:
        obj = self.goal_kind
        if self.family == LOOK:
            return (f"look at {obj} under the {self.goal_lamp}." if self._alternate_wording
                    else f"examine the {obj} with the {self.goal_lamp}.")
        prep = RECEPTACLES[self.target_kind].preposition
        target = self.target_kind
        if self.family == TWO:
            return f"put two {obj} {prep} {target}."
        if self.family == PLACE:
            return f"put some {obj} {prep} {target}." if self._alternate_wording else f"put a {obj} {prep} {target}."
        return f"put a {self.goal_state} {obj} {prep} {target}."

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
        self._recent = (self._recent + [(str(action)[:MAX_ACTION_CHARS], observation)])[-RECENT_TURNS:]
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
        return any(self._count_done(r) >= self.goal_count for r in self.receptacles
                   if self.rec_kind[r] == self.target_kind)

    def _satisfies(self, obj: str) -> bool:
        return (self.obj_kind.get(obj) == self.goal_kind
                and (self.goal_state is None or self.goal_state in self.obj_states[obj]))

    def _count_done(self, receptacle: str) -> int:
        return sum(1 for o in self.contents[receptacle] if self._satisfies(o))

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
        RECENT_TURNS (action, observation) pairs and the current admissible actions (see
        `visible_expert_action`), so its demonstrations can be imitated. It searches receptacles
        in sorted order, so it may take more turns than the oracle. `oracle=True` gives
        `oracle_action()` instead, which reads the hidden world state.
        """
        self._require_reset()
        if oracle:
            return self.oracle_action()
        return visible_expert_action(self._first_observation, self._recent, self._admissible,
                                     self._searched)

    def oracle_action(self) -> str:
        """The next action of a scripted oracle that knows where everything is.

        Not imitable by an agent (it walks straight to hidden objects); kept for tests and for
        measuring how far the visible expert is from the shortest solution. It plans from the
        current state, so it recovers after other policies' actions: put down a wrong object,
        fetch a goal object (opening as needed), process it, place it.
        """
        self._require_reset()
        held = self.holding
        if held is not None and self.obj_kind[held] != self.goal_kind:
            return self._oracle_put_down()
        if self.family == LOOK:
            if held is None:
                return self._oracle_fetch(list(self.obj_kind))
            if self.location != self.lamp_location:
                return f"go to {self.lamp_location}"
            return f"use {self.lamp_name}" if not self.lamp_on else f"examine {held}"
        target = self._oracle_target()
        if held is not None:
            if self.goal_state is not None and self.goal_state not in self.obj_states[held]:
                if self.location != self.appliance:
                    return f"go to {self.appliance}"
                return f"{PROCESS[self.family][2]} {held} with {self.appliance}"
            return self._oracle_put_into(target)
        done_here = set(o for o in self.contents[target] if self._satisfies(o))
        return self._oracle_fetch([o for o in self.obj_kind if o not in done_here])

    def _oracle_target(self) -> str:
        """The target instance: the one already holding most goal objects, else the first."""
        candidates = [r for r in self.receptacles if self.rec_kind[r] == self.target_kind]
        return max(candidates, key=lambda r: (self._count_done(r), -candidates.index(r)))

    def _oracle_fetch(self, allowed: list[str]) -> str:
        """Go to, open and take a goal-kind object; prefer one already processed, then one nearby."""
        order = {r: i for i, r in enumerate(self.receptacles)}
        candidates = [o for o in allowed if self.obj_kind[o] == self.goal_kind and self.obj_loc[o] != "hand"]
        best = min(candidates, key=lambda o: (not self._satisfies(o), self.obj_loc[o] != self.location,
                                              order[self.obj_loc[o]], o))
        where = self.obj_loc[best]
        if self.location != where:
            return f"go to {where}"
        if where in self.is_open and not self.is_open[where]:
            return f"open {where}"
        return f"take {best} from {where}"

    def _oracle_put_into(self, receptacle: str) -> str:
        if self.location != receptacle:
            return f"go to {receptacle}"
        if receptacle in self.is_open and not self.is_open[receptacle]:
            return f"open {receptacle}"
        return f"put {self.holding} {self.rec_spec[receptacle].preposition} {receptacle}"

    def _oracle_put_down(self) -> str:
        """Get rid of a wrong object: here if possible, else at the first container in the room."""
        here = self.location
        if here is not None and self.rec_spec[here].container:
            return self._oracle_put_into(here)
        first = next(r for r in self.receptacles if self.rec_spec[r].container)
        return self._oracle_put_into(first)


# ---------------------------------------------------------------- the visible expert
#
# A policy over exactly what the agent's prompt holds: the task observation, the last
# RECENT_TURNS (action, observation) pairs and the admissible actions. The admissible actions
# reveal the agent's location ("examine <here>"), what it holds ("examine <object>"), whether
# the receptacle here is closed ("open <here>"), what it can take here and whether a lamp
# is here ("use <lamp>"). The search is memory-less: from wherever it stands, the expert goes
# to the next receptacle, in sorted order and wrapping around, of a kind where the goal object
# can start (OBJECTS[kind].starts, a fixed prior given by the object named in the task).

class Goal(NamedTuple):
    """A household goal as its task text states it."""
    family: str
    obj: str                 # goal object kind, e.g. "apple"
    target: str | None       # target receptacle kind; None for look_at_obj_in_light
    lamp: str | None         # "desklamp" or "floorlamp" for look_at_obj_in_light


_LOOK_GOAL = re.compile(r"(?:look at|examine the) (\w+) (?:under|with) the (\w+)\.")
_PUT_GOAL = re.compile(r"put (two|a|some) (?:(hot|cool|clean) )?(\w+) (?:in|on) (\w+)\.")
_STATE_TO_FAMILY = {state: family for family, (_, state, _) in PROCESS.items()}


@functools.lru_cache(maxsize=4096)  # the expert reads the same task text every turn
def parse_goal(task_observation: str) -> Goal:
    """Read the goal from the first observation (or just the task text)."""
    text = task_observation.rsplit("Your task is to:", 1)[-1].strip()
    look = _LOOK_GOAL.fullmatch(text)
    if look:
        return Goal(LOOK, look.group(1), None, look.group(2))
    put = _PUT_GOAL.fullmatch(text)
    if put is None:
        raise ValueError(f"not a household task: {text!r}")
    count, state, obj, target = put.groups()
    family = TWO if count == "two" else _STATE_TO_FAMILY[state] if state else PLACE
    return Goal(family, obj, target, None)


def _kind(name: str) -> str:
    """'cabinet 2' -> 'cabinet'."""
    return name.rsplit(" ", 1)[0]


def _is_receptacle(name: str) -> bool:
    return _kind(name) in RECEPTACLES or _kind(name) == "floorlamp"


class _View(NamedTuple):
    """What the admissible actions say about the current state."""
    receptacles: list[str]   # every receptacle in the room, sorted
    here: str | None         # None: the middle of the room
    held: str | None
    here_closed: bool
    takeable: list[str]      # objects that can be taken here, sorted
    put_here: str | None     # the listed "put <held> in/on <here>" action
    use_lamp: str | None     # the listed "use <lamp>" action


def _read_admissible(admissible: Sequence[str]) -> _View:
    receptacles, takeable = [], []
    here = held = put_here = use_lamp = None
    here_closed = False
    for action in admissible:
        if action.startswith("go to "):
            receptacles.append(action[len("go to "):])
        elif action.startswith("examine "):
            name = action[len("examine "):]
            if _is_receptacle(name):
                here = name
            else:
                held = name
        elif action.startswith("open "):
            here_closed = True
        elif action.startswith("take "):
            takeable.append(action[len("take "):].split(" from ", 1)[0])
        elif action.startswith("put "):
            put_here = action
        elif action.startswith("use "):
            use_lamp = action
    if here is not None:
        receptacles.append(here)
    return _View(sorted(receptacles), here, held, here_closed, sorted(takeable), put_here, use_lamp)


def _next_receptacle(view: _View, kinds) -> str:
    """The first receptacle of one of `kinds` after here in sorted order, wrapping around.

    Falls back to every receptacle when no other one of those kinds is in the room (only
    after other policies moved things: the goal object is then somewhere unexpected)."""
    candidates = [r for r in view.receptacles if _kind(r) in kinds and r != view.here]
    if not candidates:
        candidates = [r for r in view.receptacles if r != view.here]
    if view.here is not None:
        for receptacle in candidates:
            if receptacle > view.here:
                return f"go to {receptacle}"
    return f"go to {candidates[0]}"


def _put_into(view: _View, receptacle: str) -> str:
    if view.here != receptacle:
        return f"go to {receptacle}"
    if view.here_closed:
        return f"open {receptacle}"
    return f"put {view.held} {RECEPTACLES[_kind(receptacle)].preposition} {receptacle}"


def _put_down(view: _View) -> str:
    """Get rid of a wrong object: here if possible, else at the first container in the room."""
    if view.put_here:
        return view.put_here
    if view.here_closed:
        return f"open {view.here}"
    return _put_into(view, next(r for r in view.receptacles if _is_container(r) and r != view.here))


def _is_container(receptacle: str) -> bool:
    return _kind(receptacle) in RECEPTACLES and RECEPTACLES[_kind(receptacle)].container


def _search(goal: Goal, view: _View, searched: Collection[str], keep_here: bool = False) -> str:
    """Take a goal object seen here (unless keep_here), else open a closed candidate here,
    else go on to the next candidate receptacle.

    Candidates are the receptacles of kinds where the goal object can start. Once all of
    them are in `searched` (a whole fruitless pass: another policy moved the object
    elsewhere), every receptacle is a candidate."""
    seen = [o for o in view.takeable if _kind(o) == goal.obj]
    if seen and not keep_here:
        return f"take {seen[0]} from {view.here}"
    spec = OBJECTS.get(goal.obj)
    kinds = set(spec.starts if spec else RECEPTACLES) - {goal.target}
    if all(r in searched for r in view.receptacles if _kind(r) in kinds):
        kinds = set(RECEPTACLES)
    if view.here_closed and _kind(view.here) in kinds:
        return f"open {view.here}"
    return _next_receptacle(view, kinds)


def visible_expert_action(task_observation: str, recent: Sequence[tuple[str, str]],
                          admissible: Sequence[str], searched: Collection[str] = ()) -> str:
    """The household expert's next action from the agent's view alone.

    task_observation: the first observation (room and task); recent: the last (action,
    observation) pairs, of which only the last RECENT_TURNS are read; admissible: the
    current admissible actions. The plan: search candidate receptacles in sorted order
    (opening closed ones), take the goal object when seen; for clean/heat/cool go to the
    appliance (sinkbasin 1 / microwave 1 / fridge 1) and process it; then go to the first
    receptacle of the target kind in sorted order and put it there (for a lamp goal: go to the
    lamp, searching desklamp hosts in sorted order, and use it).

    searched: the receptacles shown holding no goal object since the last take or put. The
    only input the prompt does not show; it changes the action only after a whole fruitless
    pass over the candidate receptacles, which never happens unless another policy moved the
    goal object.
    """
    goal = parse_goal(task_observation)
    view = _read_admissible(admissible)
    if view.held is not None and _kind(view.held) != goal.obj:
        return _put_down(view)
    if goal.family == LOOK:
        if view.held is None:
            return _search(goal, view, searched)
        if view.use_lamp:
            return view.use_lamp
        return _next_receptacle(view, {"floorlamp"} if goal.lamp == "floorlamp" else DESKLAMP_HOSTS)
    target = next(r for r in view.receptacles if _kind(r) == goal.target)
    if view.held is None:
        # pick two: the first object already lies in the target; leave it there
        return _search(goal, view, searched, keep_here=goal.family == TWO and view.here == target)
    if goal.family in PROCESS:
        # The object's state is not shown. The expert carries it to the target right after
        # processing it and puts it there; if a put there did not end the episode (it was not
        # processed after all), it takes the object back and processes it first.
        appliance_kind, _, verb = PROCESS[goal.family]
        appliance = f"{appliance_kind} 1"
        last = [observation for _, observation in list(recent)[-RECENT_TURNS:]]
        just_processed = any(o.startswith(f"You {verb} the {view.held} using") for o in last)
        put_failed = any(o.startswith(f"You put the {view.held} ") for o in last)
        if (view.here != target and not just_processed) or (view.here == target and put_failed):
            return f"go to {appliance}" if view.here != appliance else f"{verb} {view.held} with {appliance}"
    return _put_into(view, target)
