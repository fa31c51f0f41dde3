"""The household env's two scripted experts: the visible expert and the oracle.

Data flow: they read what env.py shows (the prompt's view) or holds (a world.Room), and return
the next action text; the rollout engine records it as a demonstration (SFT) or as a DART hint.

- `visible_expert_action` (what `HouseholdEnv.expert_action()` returns) acts only on what the
  agent's prompt shows: the task, the last HISTORY_TURNS turns and the admissible actions, so a
  memory-less model can imitate its demonstrations. It searches the receptacles where the goal
  object can start in sorted order. HISTORY_TURNS (envs/base.py) is also the default of every
  `history_turns` option of the prompt (prompts.build_messages): with the default, the prompt
  shows exactly the turns this expert reads.
- `oracle_action` (`HouseholdEnv.oracle_action()`, or `expert_action(oracle=True)`) reads the
  hidden world state and walks straight to the objects: shorter, but not imitable.
"""

from __future__ import annotations

import functools
import re
from typing import Collection, NamedTuple, Sequence

from atod_edge.envs.base import HISTORY_TURNS
from atod_edge.envs.household.catalog import DESKLAMP_HOSTS, LOOK, OBJECTS, PLACE, PROCESS, RECEPTACLES, TWO
from atod_edge.envs.household.world import Room


# ---------------------------------------------------------------- the oracle

def oracle_action(room: Room) -> str:
    """The next action of a scripted oracle that knows where everything is.

    Not imitable by an agent (it walks straight to hidden objects); kept for tests and for
    measuring how far the visible expert is from the shortest solution. It plans from the
    current state, so it recovers after other policies' actions: put down a wrong object,
    fetch a goal object (opening as needed), process it, place it.
    """
    held = room.holding
    if held is not None and room.obj_kind[held] != room.goal_kind:
        return _oracle_put_down(room)
    if room.family == LOOK:
        if held is None:
            return _oracle_fetch(room, list(room.obj_kind))
        if room.location != room.lamp_location:
            return f"go to {room.lamp_location}"
        return f"use {room.lamp_name}" if not room.lamp_on else f"examine {held}"
    target = _oracle_target(room)
    if held is not None:
        if room.goal_state is not None and room.goal_state not in room.obj_states[held]:
            if room.location != room.appliance:
                return f"go to {room.appliance}"
            return f"{PROCESS[room.family][2]} {held} with {room.appliance}"
        return _oracle_put_into(room, target)
    done_here = set(o for o in room.contents[target] if room.satisfies(o))
    return _oracle_fetch(room, [o for o in room.obj_kind if o not in done_here])


def _oracle_target(room: Room) -> str:
    """The target instance: the one already holding most goal objects, else the first."""
    candidates = [r for r in room.receptacles if room.rec_kind[r] == room.target_kind]
    return max(candidates, key=lambda r: (room.count_done(r), -candidates.index(r)))


def _oracle_fetch(room: Room, allowed: list[str]) -> str:
    """Go to, open and take a goal-kind object; prefer one already processed, then one nearby."""
    order = {r: i for i, r in enumerate(room.receptacles)}
    candidates = [o for o in allowed if room.obj_kind[o] == room.goal_kind and room.obj_loc[o] != "hand"]
    best = min(candidates, key=lambda o: (not room.satisfies(o), room.obj_loc[o] != room.location,
                                          order[room.obj_loc[o]], o))
    where = room.obj_loc[best]
    if room.location != where:
        return f"go to {where}"
    if where in room.is_open and not room.is_open[where]:
        return f"open {where}"
    return f"take {best} from {where}"


def _oracle_put_into(room: Room, receptacle: str) -> str:
    if room.location != receptacle:
        return f"go to {receptacle}"
    if receptacle in room.is_open and not room.is_open[receptacle]:
        return f"open {receptacle}"
    return f"put {room.holding} {room.rec_spec[receptacle].preposition} {receptacle}"


def _oracle_put_down(room: Room) -> str:
    """Get rid of a wrong object: here if possible, else at the first container in the room."""
    here = room.location
    if here is not None and room.rec_spec[here].container:
        return _oracle_put_into(room, here)
    first = next(r for r in room.receptacles if room.rec_spec[r].container)
    return _oracle_put_into(room, first)


# ---------------------------------------------------------------- the visible expert
#
# A policy over exactly what the agent's prompt holds: the task observation, the last
# HISTORY_TURNS (action, observation) pairs and the admissible actions. The admissible actions
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
    observation) pairs, of which only the last HISTORY_TURNS are read; admissible: the
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
        last = [observation for _, observation in list(recent)[-HISTORY_TURNS:]]
        just_processed = any(o.startswith(f"You {verb} the {view.held} using") for o in last)
        put_failed = any(o.startswith(f"You put the {view.held} ") for o in last)
        if (view.here != target and not just_processed) or (view.here == target and put_failed):
            return f"go to {appliance}" if view.here != appliance else f"{verb} {view.held} with {appliance}"
    return _put_into(view, target)
