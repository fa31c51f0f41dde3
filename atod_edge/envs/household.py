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

Speed: the valid actions of a state are built once per state change into a dict
action text -> operation, so checking and running an action is a dict lookup.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar, NamedTuple

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
        return f"{self._room_text}\n\nYour task is to: {self.task_text}"

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

    # ------------------------------------------------------------ the scripted expert

    def expert_action(self) -> str:
        """The next action of a scripted oracle that knows where everything is.

        It plans from the current state, so it also recovers after other policies' actions:
        put down a wrong object, fetch a goal object (opening as needed), process it, place it.
        """
        self._require_reset()
        held = self.holding
        if held is not None and self.obj_kind[held] != self.goal_kind:
            return self._expert_put_down()
        if self.family == LOOK:
            if held is None:
                return self._expert_fetch(list(self.obj_kind))
            if self.location != self.lamp_location:
                return f"go to {self.lamp_location}"
            return f"use {self.lamp_name}" if not self.lamp_on else f"examine {held}"
        target = self._expert_target()
        if held is not None:
            if self.goal_state is not None and self.goal_state not in self.obj_states[held]:
                if self.location != self.appliance:
                    return f"go to {self.appliance}"
                return f"{PROCESS[self.family][2]} {held} with {self.appliance}"
            return self._expert_put_into(target)
        done_here = set(o for o in self.contents[target] if self._satisfies(o))
        return self._expert_fetch([o for o in self.obj_kind if o not in done_here])

    def _expert_target(self) -> str:
        """The target instance: the one already holding most goal objects, else the first."""
        candidates = [r for r in self.receptacles if self.rec_kind[r] == self.target_kind]
        return max(candidates, key=lambda r: (self._count_done(r), -candidates.index(r)))

    def _expert_fetch(self, allowed: list[str]) -> str:
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

    def _expert_put_into(self, receptacle: str) -> str:
        if self.location != receptacle:
            return f"go to {receptacle}"
        if receptacle in self.is_open and not self.is_open[receptacle]:
            return f"open {receptacle}"
        return f"put {self.holding} {self.rec_spec[receptacle].preposition} {receptacle}"

    def _expert_put_down(self) -> str:
        """Get rid of a wrong object: here if possible, else at the first container in the room."""
        here = self.location
        if here is not None and self.rec_spec[here].container:
            return self._expert_put_into(here)
        first = next(r for r in self.receptacles if self.rec_spec[r].container)
        return self._expert_put_into(first)
