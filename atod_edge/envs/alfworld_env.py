"""`alfworld-engine`: ALFWorld-style tasks, generated locally, played in the real ALFWorld engine.

IMPORTANT: these are NOT the official ALFWorld splits. The official game files (json_2.1.1) cannot
be downloaded here, so every task is generated locally from Task.seed out of what the `alfworld`
wheel ships: the ALFRED PDDL domain (alfred.pddl), its text grammar (alfred.twl2), the AI2-THOR
scene layouts (which object and receptacle types each of the 120 floor plans holds) and the goal
library of the six task families. The resulting PDDL problem is played by TextWorld's PDDL engine
with ALFWorld's name demangler, so observations, admissible commands and rules are ALFWorld's own.
Numbers on this env are not comparable to published ALFWorld results.

Needs the optional extra `pip install atod-edge[alfworld]` (PyPI `alfworld`, MIT, which brings
`textworld[pddl]`; its fast-downward library builds from source, about 2 minutes with cmake/g++).

How a task is built: alfworld_problem.py draws a PDDL problem from Task.seed (scene, goal,
receptacles, objects); this module checks it winnable by the expert in the engine and caches it
as game.tw-pddl (atomic rename) under cache_dir()/games/alfworld-engine/ (or
$ATOD_EDGE_GAMES_DIR/alfworld-engine/). A reset of a cached game takes ~1-2 s: the engine
grounds the PDDL problem with fast-downward's Python translator (four times). This module holds
the game cache, the engine pool, the env and its oracle expert.

Families: pick_and_place_simple, look_at_obj_in_light, pick_clean_then_place_in_recep,
pick_heat_then_place_in_recep, pick_cool_then_place_in_recep, pick_two_obj_and_place.
The expert is an oracle that reads the engine's current facts (where everything is, what is
held, opened, heated...) and plans from them, so it also finishes episodes other policies started;
each generated game is kept only if it wins, and its command list is stored as the walkthrough.
TextWorld's own planner (policy_commands: an optimal fast-downward search) is not used: on a
full ALFRED kitchen it took 1-4 minutes per call here. Reward is sparse: 1.0 when the goal holds
(ALFWorld has no partial score). ALFWorld 0.4.2's grammar says "move X to Y" to put things down.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from atod_edge.envs.alfworld_problem import (GENERATOR_VERSION, MAX_GENERATION_TRIES, alfworld_data_paths,
                                             generate_problem, import_alfworld)
from atod_edge.envs.base import MAX_ACTION_CHARS, SPLITS, Env, StepResult, Task
from atod_edge.errors import UserError


# ---------------------------------------------------------------- games on disk

def games_dir() -> Path:
    from atod_edge.envs.textworld_env import games_dir as shared_games_dir
    return shared_games_dir()


def game_folder(task: Task) -> Path:
    """The cache folder of a task's game (split, index and a hash of seed + generator version)."""
    alfworld = import_alfworld()
    spec = json.dumps({"seed": task.seed, "split": task.split, "generator": GENERATOR_VERSION,
                       "alfworld": getattr(alfworld, "__version__", "?")}, sort_keys=True)
    key = hashlib.sha256(spec.encode()).hexdigest()[:12]
    return games_dir() / AlfWorldEngineEnv.name / f"{task.split}-{task.index}-{key}"


def generate_game(task: Task) -> Path:
    """Generate, check and cache the task's game.tw-pddl (atomic rename); returns its path.

    A drawn problem is kept only if the oracle expert wins it in the engine; otherwise the next
    draw from the same seed's stream is tried (deterministic, and rare)."""
    folder = game_folder(task)
    final = folder / "game.tw-pddl"
    if final.is_file():
        return final
    domain_path, grammar_path, _ = alfworld_data_paths()
    domain, grammar = domain_path.read_text(), grammar_path.read_text()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for attempt in range(MAX_GENERATION_TRIES):
            problem = generate_problem(task.seed + attempt, task.split)
            game = {"pddl_domain": domain,
                    "grammar": grammar.replace("UNKNOWN GOAL", problem.pop("task_text_for_grammar")),
                    "pddl_problem": problem.pop("pddl_problem"), "alfworld_engine": problem,
                    "note": "locally generated ALFWorld-style task, not an official ALFWorld split"}
            (tmp / "game.tw-pddl").write_text(json.dumps(game))
            walkthrough = _solve(tmp / "game.tw-pddl", problem)
            if walkthrough is not None:
                game["walkthrough"], game["solvable"] = walkthrough, True
                (tmp / "game.tw-pddl").write_text(json.dumps(game))
                break
        else:
            raise RuntimeError(f"alfworld-engine: no solvable task drawn for {task.task_id}")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not final.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _solve(path: Path, meta: dict) -> list[str] | None:
    """The oracle's winning command list for a game, or None if it does not win in time."""
    env = AlfWorldEngineEnv()
    try:
        env._start(path, meta)
        commands = []
        for _ in range(AlfWorldEngineEnv.max_turns):
            command = env.expert_action()
            commands.append(command)
            result = env.step(command)
            if result.info["won"]:
                return commands
            if not result.info["valid"]:
                return None
        return None
    finally:
        env.close()


# ---------------------------------------------------------------- engine pool

# Each TextWorld PddlEnv loads its own ~34 MB copy of fast-downward's library and never unloads
# it, so engines are recycled: an env takes one on reset and gives it back on close/deletion.
_IDLE_ENGINES: list = []
MAX_IDLE_ENGINES = 32


def _acquire_engine():
    if _IDLE_ENGINES:
        return _IDLE_ENGINES.pop()
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    from textworld.envs.pddl import PddlEnv
    infos = textworld.EnvInfos(admissible_commands=True, won=True, facts=False)
    return AlfredDemangler(PddlEnv(infos))


def _release_engine(engine) -> None:
    if len(_IDLE_ENGINES) < MAX_IDLE_ENGINES:
        _IDLE_ENGINES.append(engine)
        return
    try:
        import fast_downward
        fast_downward.close_lib(engine.unwrapped.downward_lib)
    except Exception:
        pass


# ---------------------------------------------------------------- the environment

class AlfWorldEngineEnv(Env):
    """ALFWorld-style household tasks, locally generated (NOT the official ALFWorld splits),
    played in the real ALFWorld/TextWorld PDDL engine. See the module docstring."""

    name: ClassVar[str] = "alfworld-engine"
    max_turns: ClassVar[int] = 40
    description: ClassVar[str] = ("ALFWorld engine on locally generated tasks "
                                  "(not the official ALFWorld splits)")
    instructions: ClassVar[str] = (
        "Household task (ALFWorld engine): do what follows 'Your task is to:'. Actions: go to X, "
        "open X, close X, take O from X, move O to X (put it in/on X), heat/cool/clean O with X, "
        "use X (a lamp), examine X, look, inventory. Hold one object at a time."
    )
    extra: ClassVar[str] = "alfworld"

    def __init__(self) -> None:
        self._engine = None
        self._state = None
        self._task: Task | None = None

    def reset(self, task: Task) -> str:
        if task.split not in SPLITS:
            raise UserError(f"unknown split '{task.split}' (allowed: {', '.join(SPLITS)})")
        import_alfworld()
        path = generate_game(task)
        meta = json.loads(path.read_text())["alfworld_engine"]
        self._task = task
        return self._start(path, meta)

    def _start(self, path: Path, meta: dict) -> str:
        if self._engine is None:
            self._engine = _acquire_engine()
        self._engine.load(str(path))
        self._state = self._engine.reset()
        self._meta = meta
        self._names = {k: info.name.strip() for k, info in self._state["_entity_infos"].items()}
        self.turns = 0
        self.done = False
        self.won = False
        return _tidy(self._state.feedback)

    def step(self, action: str) -> StepResult:
        self._require_reset()
        if self.done:
            return StepResult("The episode is over.", 0.0, True, self._info(False, "the episode is over"))
        self.turns += 1
        command = ""
        if isinstance(action, str) and len(action) <= MAX_ACTION_CHARS:
            command = " ".join(action.strip().lower().split())
        if command and command in self._admissible():
            self._state, _, _ = self._engine.step(command)
            observation, valid, feedback = _tidy(self._state.feedback), True, ""
            self.won = bool(self._state["won"])
        else:
            observation, valid = "Nothing happens.", False
            feedback = ("the action must be text" if not isinstance(action, str) else
                        f"empty or over-long action (at most {MAX_ACTION_CHARS} characters); try 'look'"
                        if not command else
                        "not a command the game accepts here; choose one of the admissible commands")
        self.done = self.won or self.turns >= self.max_turns
        reward = 1.0 if self.won else 0.0
        return StepResult(observation, reward, self.done, self._info(valid, feedback))

    def admissible_actions(self) -> list[str]:
        self._require_reset()
        return self._admissible()

    def expert_action(self) -> str:
        """An oracle that reads the engine's facts: fetch, process, place (or use the lamp).
        It plans from the current state, so it also finishes episodes other policies started."""
        self._require_reset()
        return _Oracle(self._state["_facts"], self._names, self._meta).next_command(self._admissible())

    def close(self) -> None:
        if self._engine is not None:
            _release_engine(self._engine)
            self._engine = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _admissible(self) -> list[str]:
        if self.done:
            return []
        return [c for c in self._state["admissible_commands"] if c != "help"]

    def _info(self, valid: bool, feedback: str) -> dict[str, Any]:
        return {"valid": valid, "won": self.won, "score": 1.0 if self.won else 0.0,
                "admissible": self._admissible(), "feedback": feedback}

    def _require_reset(self) -> None:
        if self._state is None:
            raise RuntimeError("AlfWorldEngineEnv: call reset(task) before step()")


def _tidy(text: str) -> str:
    """Drop the engine's welcome banner and surrounding blank lines."""
    text = text.replace("-= Welcome to TextWorld, ALFRED! =-", "")
    return "\n\n".join(part.strip() for part in text.strip().split("\n\n") if part.strip())


class _Oracle:
    """The next command towards the goal, from the engine's current facts (ids -> names)."""

    def __init__(self, facts, names: dict[str, str], meta: dict) -> None:
        self.names = names
        self.meta = meta
        self.rel: dict[str, list[tuple[str, ...]]] = {}
        for fact in facts:
            self.rel.setdefault(fact.name, []).append(tuple(v.name for v in fact.arguments))

    def _pairs(self, predicate: str) -> list[tuple[str, ...]]:
        return self.rel.get(predicate, [])

    def _unary(self, predicate: str) -> set[str]:
        return {args[0] for args in self._pairs(predicate)}

    def next_command(self, admissible: list[str]) -> str:
        name = self.names
        type_of = {o: t for o, t in self._pairs("objecttype")}
        rtype_of = {r: t for r, t in self._pairs("receptacletype")}
        inside = {o: r for o, r in self._pairs("inreceptacle")}
        location = {r: l for r, l in self._pairs("receptacleatlocation")}
        here = next((l for _, l in self._pairs("atlocation")), None)
        at = next((r for r, l in sorted(location.items()) if l == here), None)
        held = next((o for _, o in self._pairs("holds")), None)
        opened = self._unary("opened")
        openable = self._unary("openable")
        can_contain = set(self._pairs("cancontain"))
        family = self.meta["family"]
        goal_type = self.meta["goal_object"].lower() + "type"
        target_type = (self.meta.get("goal_receptacle") or "").lower() + "type"
        state = {"pick_clean_then_place_in_recep": "isclean", "pick_heat_then_place_in_recep": "ishot",
                 "pick_cool_then_place_in_recep": "iscool"}.get(family)
        done_state = self._unary(state) if state else set()

        def ok(o):  # a goal object in the required state
            return type_of.get(o) == goal_type and (state is None or o in done_state)

        def go_then(r, command):
            if at != r:
                return f"go to {name[r]}"
            if r in openable and r not in opened and not command.startswith(("heat", "cool", "clean", "use")):
                return f"open {name[r]}"
            return command

        targets = sorted(r for r, t in rtype_of.items() if t == target_type)
        target = max(targets, key=lambda r: sum(ok(o) for o, rr in inside.items() if rr == r), default=None)
        need = 2 if family == "pick_two_obj_and_place" else 1

        if held is not None and type_of.get(held) != goal_type:
            # put the wrong object down: here if possible, else in a receptacle that can hold it
            if at is not None and f"move {name[held]} to {name[at]}" in admissible:
                return f"move {name[held]} to {name[at]}"
            homes = sorted(r for r in rtype_of if (rtype_of[r], type_of.get(held)) in can_contain
                           and r != target)
            home = next((r for r in homes if r not in openable), homes[0] if homes else None)
            return go_then(home, f"move {name[held]} to {name[home]}") if home else "look"

        if family == "look_at_obj_in_light":
            lamp = next(o for o, t in type_of.items() if t == self.meta["toggle"].lower() + "type")
            if held is None:
                return self._fetch([o for o in type_of if type_of[o] == goal_type], inside, at,
                                   openable, opened, go_then)
            return go_then(inside[lamp], f"use {name[lamp]}")

        if held is not None:  # a goal-type object in hand
            if state and held not in done_state:
                appliance_type = {"isclean": "sinkbasintype", "ishot": "microwavetype",
                                  "iscool": "fridgetype"}[state]
                appliance = sorted(r for r, t in rtype_of.items() if t == appliance_type)[0]
                verb = {"isclean": "clean", "ishot": "heat", "iscool": "cool"}[state]
                return go_then(appliance, f"{verb} {name[held]} with {name[appliance]}")
            return go_then(target, f"move {name[held]} to {name[target]}")
        placed = [o for o, r in inside.items() if r == target and ok(o)]
        candidates = [o for o in type_of if type_of[o] == goal_type and o not in placed]
        if len(placed) >= need:
            return "look"  # already won
        return self._fetch(candidates, inside, at, openable, opened, go_then)

    def _fetch(self, candidates, inside, at, openable, opened, go_then) -> str:
        """Go to (and open) the receptacle of the nearest-looking candidate and take it."""
        candidates = sorted(o for o in candidates if o in inside)
        if not candidates:
            return "look"
        # prefer one right here, then one in an open or non-openable receptacle
        candidates.sort(key=lambda o: (inside[o] != at, inside[o] in openable and inside[o] not in opened))
        obj = candidates[0]
        return go_then(inside[obj], f"take {self.names[obj]} from {self.names[inside[obj]]}")
