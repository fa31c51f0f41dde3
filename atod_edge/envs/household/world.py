"""A household room: its generation from a task's seed and the state the episode changes.

Data flow: catalog.py (the tables) -> world.py (`Room.generate` draws one room and goal from
`random.Random(task.seed)`) -> env.py (HouseholdEnv is a Room that the agent's actions change)
-> experts.py (the oracle reads a Room; the visible expert reads only the prompt).

As in ALFWorld, a goal names a receptacle *type*: any instance of it counts (for two objects,
both must end up in the same instance). Train and eval rooms are the same distribution over
disjoint seeds; unseen rooms draw their goal object from UNSEEN_ONLY_OBJECTS.
"""

from __future__ import annotations

import random

from atod_edge.envs.household.catalog import (ALL_OBJECTS, DESKLAMP_HOSTS, FAMILIES, FLOORLAMP, LAMPS, LOOK,
                                              MAX_OBJECTS, MAX_RECEPTACLES, MIN_OBJECTS, MIN_RECEPTACLES,
                                              OBJECTS, PLACE, PROCESS, RECEPTACLES, SEEN_OBJECTS, TWO,
                                              UNSEEN_ONLY_OBJECTS, ReceptacleKind)


class Room:
    """The world state of one household task: receptacles and their contents, objects and their
    states, the lamp, the goal, and where the agent stands and what it holds.

    `generate` fills it from a seeded rng; the env's actions then change `location`, `holding`,
    `lamp_on`, `is_open`, `contents`, `obj_loc` and `obj_states`.
    """

    # the room
    receptacles: list[str]                 # "cabinet 2", ... in the order the room lists them
    rec_kind: dict[str, str]               # receptacle -> kind ("cabinet")
    rec_spec: dict[str, ReceptacleKind]
    is_open: dict[str, bool]               # openable receptacles only
    contents: dict[str, list[str]]         # receptacle -> objects (and a desklamp) in/on it
    obj_kind: dict[str, str]               # object -> kind ("mug")
    obj_loc: dict[str, str]                # object -> receptacle, or "hand"
    obj_states: dict[str, set[str]]        # object -> {"clean", "hot", "cool"}
    lamp_name: str | None                  # "desklamp 1" / "floorlamp 1" / None
    lamp_location: str | None              # the receptacle the lamp is at (the floorlamp is its own)
    # the goal
    family: str
    goal_kind: str
    target_kind: str | None                # None for look_at_obj_in_light
    goal_state: str | None                 # "clean" / "hot" / "cool" for the process families
    appliance: str | None                  # "sinkbasin 1" / "microwave 1" / "fridge 1"
    goal_count: int
    goal_lamp: str | None
    # the agent
    location: str | None                   # None: the middle of the room
    holding: str | None
    lamp_on: bool

    def generate(self, rng: random.Random, unseen: bool) -> None:
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

    def goal_text(self) -> str:
        """The task as the agent reads it after 'Your task is to:'."""
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

    def satisfies(self, obj: str) -> bool:
        """A goal object in the goal's state."""
        return (self.obj_kind.get(obj) == self.goal_kind
                and (self.goal_state is None or self.goal_state in self.obj_states[obj]))

    def count_done(self, receptacle: str) -> int:
        """How many goal objects in the goal's state are in/on `receptacle`."""
        return sum(1 for o in self.contents[receptacle] if self.satisfies(o))
