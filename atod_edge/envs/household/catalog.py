"""The household world's vocabulary: receptacle and object kinds, task families, splits' object pools.

Pure data, read by every other module of the household env: world.py draws rooms and goals
from these tables, env.py checks actions against them, experts.py plans with them.

Each task is a small room (6-12 receptacles, 6-15 objects) with one goal from the six ALFWorld
task families:

    pick_and_place          "put a mug in cabinet."
    look_at_obj_in_light    "examine the book with the desklamp."
    pick_clean_then_place   "put a clean mug in coffeemachine."     (clean with sinkbasin 1)
    pick_heat_then_place    "put a hot apple in countertop."         (heat with microwave 1)
    pick_cool_then_place    "put a cool tomato in diningtable."      (cool with fridge 1)
    pick_two_obj_and_place  "put two book in shelf."

Splits: the unseen split holds out whole object types (UNSEEN_ONLY_OBJECTS): they never appear,
not even as clutter, in a train or eval room, and every unseen task's goal object is one of them.
"""

from __future__ import annotations

from typing import NamedTuple


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
