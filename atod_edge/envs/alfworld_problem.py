"""ALFWorld-style problems for `alfworld-engine`, drawn locally from what the `alfworld` wheel ships.

Data flow: Task.seed -> `generate_problem` (this module: a PDDL problem, its task text and
facts) -> alfworld_env.py (`generate_game` checks it winnable in the engine, caches it as a
game file, and AlfWorldEngineEnv plays it).

IMPORTANT: these are NOT the official ALFWorld splits (see alfworld_env.py). The sources: the
ALFRED PDDL domain (alfred.pddl), its text grammar (alfred.twl2), the AI2-THOR scene layouts
(which object and receptacle types each of the 120 floor plans holds) and the goal library of
the six task families.

How a task is built (all draws from random.Random(task.seed), so a seed always gives one game):
    family (one of six) -> a floor plan whose room type allows it (train/eval: ALFRED's train
    scenes; unseen: its held-out test scenes) -> goal object/target types present in it ->
    receptacle instances from the layout (each at its own location) -> 1-3 goal objects and
    1-2 of up to 10 other object types present, each put in a receptacle that can hold it ->
    PDDL problem + goal from alfworld's goal library.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from atod_edge.errors import UserError

INSTALL_HINT = "install the optional extra: pip install 'atod-edge[alfworld]'"
GENERATOR_VERSION = 2  # bump when the problem generator changes, so cached games are rebuilt

FAMILIES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
            "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place")
# family -> (appliance receptacle type, ability the goal object needs)
PROCESS = {
    "pick_clean_then_place_in_recep": ("SinkBasin", "Cleanable"),
    "pick_heat_then_place_in_recep": ("Microwave", "Heatable"),
    "pick_cool_then_place_in_recep": ("Fridge", "Coolable"),
}
LAMP_HOSTS = ("Desk", "SideTable", "Dresser")
MAX_INSTANCES = 3          # of the goal object type, as in ALFRED's scene randomisation
MAX_CLUTTER_INSTANCES = 2  # of each other object type
# Object types in a room besides the goal's (and the lamp). The engine grounds every action for
# every object, so a full ALFRED kitchen (~35 types) makes each reset take seconds; 10 keeps the
# rooms cluttered while a reset stays near a second.
MAX_CLUTTER_TYPES = 10
MAX_STOVEBURNERS = 4
MAX_GENERATION_TRIES = 50  # draws before giving up on a seed (never reached in practice)
# type constants that alfred.pddl's action preconditions name, so every problem must declare them
DOMAIN_RTYPES = frozenset({"SinkBasin", "Microwave", "Fridge"})
DOMAIN_OTYPES = frozenset({"Knife", "ButterKnife"})


def import_alfworld():
    """Import alfworld and TextWorld's PDDL engine, or explain how to get them."""
    try:
        import alfworld.gen.constants  # noqa: F401
        import alfworld.gen.goal_library  # noqa: F401
        import fast_downward  # noqa: F401
        import textworld  # noqa: F401
    except ImportError as e:
        raise UserError(f"alfworld-engine needs the 'alfworld' package with textworld[pddl] ({e}); "
                        f"{INSTALL_HINT}") from None
    import alfworld
    return alfworld


def alfworld_data_paths() -> tuple[Path, Path, Path]:
    """(alfred.pddl, alfred.twl2, layouts folder) inside the installed alfworld package."""
    alfworld = import_alfworld()
    root = Path(alfworld.__file__).parent
    return root / "data" / "alfred.pddl", root / "data" / "alfred.twl2", root / "gen" / "layouts"


def _pddl_name(text: str) -> str:
    """An AI2-THOR id as a PDDL name, with ALFRED's character escapes (demangled back later)."""
    for char, escape in (("-", "_minus_"), ("|", "_bar_"), ("+", "_plus_"), (".", "_dot_"), (",", "_comma_")):
        text = text.replace(char, escape)
    return text


def _receptacle_type(thor_id: str) -> str:
    """"Sink|x|y|z|SinkBasin" -> SinkBasin; "Cabinet|x|y|z" -> Cabinet."""
    parts = thor_id.split("|")
    return parts[-1] if parts[-1].endswith("Basin") else parts[0]


# ---------------------------------------------------------------- problem generation

class _Scene:
    """One AI2-THOR floor plan as the wheel ships it: object types and receptacle poses."""

    def __init__(self, number: int, layouts: Path) -> None:
        self.number = number
        self.types = set(json.loads((layouts / f"FloorPlan{number}-objects.json").read_text()))
        poses_file = layouts / f"FloorPlan{number}-openable.json"
        self.poses: dict[str, tuple] = {}
        if poses_file.is_file():
            self.poses = {k: tuple(v) for k, v in json.loads(poses_file.read_text()).items()}


def _room_type(number: int) -> str:
    return {0: "Kitchen", 2: "LivingRoom", 3: "Bedroom", 4: "Bathroom"}[number // 100]


def generate_problem(seed: int, split: str) -> dict[str, Any]:
    """Draw one ALFWorld-style task from `seed`: a dict with the PDDL problem, task text and facts.

    Deterministic: the same seed and split always give the same problem."""
    import alfworld.gen.constants as constants
    _, _, layouts = alfworld_data_paths()
    rng = random.Random(seed)
    scene_numbers = constants.TEST_SCENE_NUMBERS if split == "unseen" else constants.TRAIN_SCENE_NUMBERS
    for _ in range(MAX_GENERATION_TRIES):
        family = rng.choice(FAMILIES)
        rooms = constants.GOALS_VALID[family]
        candidates = [n for n in scene_numbers if _room_type(n) in rooms]
        scene = _Scene(rng.choice(candidates), layouts)
        problem = _try_problem(rng, family, scene, constants)
        if problem is not None:
            return problem
    raise RuntimeError(f"alfworld-engine: could not draw a task from seed {seed}")


def _try_problem(rng: random.Random, family: str, scene: _Scene, constants) -> dict[str, Any] | None:
    """Build receptacles, objects and a goal in `scene`, or None when the scene cannot host `family`."""
    static_receptacles = set(constants.RECEPTACLES) - set(constants.MOVABLE_RECEPTACLES)
    can_hold = constants.VAL_RECEPTACLE_OBJECTS  # receptacle type -> object types it can hold
    abilities = constants.VAL_ACTION_OBJECTS     # "Heatable" -> object types ...

    # receptacle instances: those the layout lists by id, then one per other type it holds
    receptacles: dict[str, str] = {}   # pddl name -> type
    location_of: dict[str, str] = {}   # pddl name -> location name
    n_locations = 0
    # Each receptacle gets its own location: in the layouts some share an interaction pose,
    # which lets the engine take from one receptacle while the text shows another.
    for thor_id in sorted(scene.poses):
        rtype = _receptacle_type(thor_id)
        if rtype not in static_receptacles:
            continue
        name = _pddl_name(thor_id)
        n_locations += 1
        receptacles[name] = rtype
        location_of[name] = f"loc_bar_{n_locations}"
    posed_types = set(receptacles.values())
    for rtype in sorted(scene.types & static_receptacles - posed_types):
        count = rng.randint(2, MAX_STOVEBURNERS) if rtype == "StoveBurner" else 1
        for k in range(count):
            name = f"{rtype}_bar_s{k + 1}"
            n_locations += 1
            receptacles[name] = rtype
            location_of[name] = f"loc_bar_{n_locations}"
    present_rtypes = set(receptacles.values())

    pickable = {o for kinds in can_hold.values() for o in kinds}
    object_types = sorted(t for t in scene.types if t in pickable and "Sliced" not in t
                          and any(t in can_hold[r] for r in present_rtypes))

    # the goal: object type and target receptacle type (and lamp / appliance) present here
    toggle = None
    if family in PROCESS:
        appliance, ability = PROCESS[family]
        if appliance not in present_rtypes:
            return None
        object_types_ok = [t for t in object_types if t in abilities[ability]]
    elif family == "look_at_obj_in_light":
        hosts = [r for r in receptacles if receptacles[r] in LAMP_HOSTS]
        if "DeskLamp" not in scene.types or not hosts:
            return None
        toggle = "DeskLamp"
        object_types_ok = object_types
    else:
        object_types_ok = object_types
    if not object_types_ok:
        return None
    goal_type = rng.choice(object_types_ok)
    target_type = None
    if family != "look_at_obj_in_light":
        appliance = PROCESS[family][0] if family in PROCESS else None
        targets = sorted(r for r in present_rtypes if goal_type in can_hold[r] and r != appliance)
        if not targets:
            return None
        target_type = rng.choice(targets)

    # objects: 1-3 of the goal type (at least 2 for two-object tasks), 1-2 of some clutter types
    clutter = [t for t in object_types if t != goal_type]
    clutter = sorted(rng.sample(clutter, min(len(clutter), MAX_CLUTTER_TYPES)))
    objects: dict[str, str] = {}       # pddl name -> type
    inside: dict[str, str] = {}        # object -> receptacle
    for otype in [goal_type] + clutter:
        low = 2 if (otype == goal_type and family == "pick_two_obj_and_place") else 1
        high = MAX_INSTANCES if otype == goal_type else MAX_CLUTTER_INSTANCES
        holders = [r for r in receptacles if otype in can_hold[receptacles[r]]
                   and not (otype == goal_type and receptacles[r] == target_type)]
        if not holders:
            if otype == goal_type:
                return None
            continue
        for k in range(rng.randint(low, max(low, high))):
            name = f"{otype}_bar_{k + 1}"
            objects[name] = otype
            inside[name] = rng.choice(holders)
    if toggle:
        lamp = f"{toggle}_bar_1"
        objects[lamp] = toggle
        inside[lamp] = rng.choice(hosts)

    task_text = rng.choice(_goal_templates(family)).format(
        obj=goal_type.lower(), recep=(target_type or "").lower(), toggle=(toggle or "").lower(), mrecep="")
    start = "loc_bar_start"
    pddl = _problem_text(family, goal_type, target_type, toggle, receptacles, location_of, objects,
                         inside, start, constants)
    return {"family": family, "scene": scene.number, "goal_object": goal_type,
            "goal_receptacle": target_type, "toggle": toggle, "task": task_text,
            "task_text_for_grammar": task_text, "pddl_problem": pddl}


def _goal_templates(family: str) -> list[str]:
    import alfworld.gen.goal_library as goal_library
    return list(goal_library.gdict[family]["templates"])


def _problem_text(family, goal_type, target_type, toggle, receptacles, location_of, objects, inside,
                  start, constants) -> str:
    """The PDDL problem in ALFRED's conventions (agent1, <Type>Type constants, escaped ids)."""
    import alfworld.gen.goal_library as goal_library
    # Only the types in play (plus those the domain names in preconditions) are declared: every
    # declared type multiplies the planner's grounding, and the full ALFRED list made it minutes.
    rtypes = sorted(set(receptacles.values()) | DOMAIN_RTYPES | ({target_type} - {None}))
    otypes = sorted(set(objects.values()) | DOMAIN_OTYPES | {goal_type})
    locations = sorted(set(location_of.values()) | {start})
    declared = (["agent1 - agent"] + [f"{loc} - location" for loc in locations]
                + [f"{r} - receptacle" for r in receptacles] + [f"{o} - object" for o in objects]
                + [f"{t}Type - otype" for t in otypes] + [f"{t}Type - rtype" for t in rtypes])
    openable = set(constants.OPENABLE_CLASS_LIST)
    abilities = constants.VAL_ACTION_OBJECTS
    facts = [f"(atLocation agent1 {start})"]
    for r, rtype in receptacles.items():
        facts.append(f"(receptacleType {r} {rtype}Type)")
        facts.append(f"(receptacleAtLocation {r} {location_of[r]})")
        if rtype in openable:
            facts.append(f"(openable {r})")
    for o, otype in objects.items():
        facts.append(f"(objectType {o} {otype}Type)")
        facts.append(f"(inReceptacle {o} {inside[o]})")
        facts.append(f"(objectAtLocation {o} {location_of[inside[o]]})")
        if otype == toggle:
            facts.append(f"(toggleable {o})")
            continue
        facts.append(f"(pickupable {o})")
        for ability, predicate in (("Cleanable", "cleanable"), ("Heatable", "heatable"),
                                   ("Coolable", "coolable"), ("Sliceable", "sliceable")):
            if otype in abilities[ability]:
                facts.append(f"({predicate} {o})")
        if otype in constants.MOVABLE_RECEPTACLES_SET:
            facts.append(f"(isReceptacleObject {o})")
    for rtype in sorted(set(receptacles.values())):
        for otype in sorted(set(objects.values())):
            if otype in constants.VAL_RECEPTACLE_OBJECTS.get(rtype, ()):
                facts.append(f"(canContain {rtype}Type {otype}Type)")
    goal = goal_library.gdict[family]["pddl"].format(
        obj=goal_type, recep=target_type or "", toggle=toggle or "", mrecep="")
    goal = goal.replace(" # ", " - ").strip()
    assert goal.endswith(")")
    goal = goal[:-1].rstrip()  # the library's goal also closes the (define ...); we close it below
    return ("(define (problem alfworld_engine)\n (:domain alfred)\n (:objects\n  "
            + "\n  ".join(declared) + "\n )\n (:init\n  " + "\n  ".join(facts)
            + "\n  (= (total-cost) 0)\n )\n " + goal + "\n (:metric minimize (total-cost))\n)\n")
