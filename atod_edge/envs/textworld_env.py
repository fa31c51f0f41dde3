"""TextWorld games behind the env protocol: `textworld-cooking`, `textworld-coin`, `textworld-treasure`.

Needs the optional extra (`pip install atod-edge[envs]`, which brings PyPI `textworld`, MIT). The
Inform 7 compilers ship in textworld's wheel, so games are generated here, offline:

    seed (Task.seed, already distinct per split)
      -> textworld.challenges.<family>.make(settings, GameOptions(seeds=...))   deterministic
      -> compile_game -> game.z8 + game.json, in a temporary folder
      -> renamed to  cache_dir()/games/<env>/<split>-<index>-<key>/   (atomic; reused later)

`key` hashes the settings, the seed and the textworld version, so changing any of them makes a
new game instead of silently reusing a stale one. Generating a game takes about 1.5 s (the first
one in a process about 4 s more: textworld loads its knowledge base); playing is fast.

Mapping to the protocol:
- observation: the engine's text without the ASCII banner (at reset) and without the trailing
  prompt/status line (">  -= Kitchen =-3/7") or the end-of-game RESTART/RESTORE question.
- admissible actions: TextWorld's admissible commands of the current state. An action outside
  them is an invalid step: it is not sent to the game (so engine synonyms such as "get x" cannot
  change the state behind a step marked invalid), the turn is spent, info["valid"] is False.
- expert: TextWorld's policy commands, a plan to win recomputed from the current state, so the
  expert also finishes episodes that another policy started.
- reward: sparse, given when the episode ends: the final score / max score (1.0 when won).
  info["score"] is that normalised score at every step; info["won"] the engine's won flag. A
  lost game (treasure hunter: taking the wrong object) ends the episode.
- splits: train and eval draw from the same distribution over disjoint seeds; unseen is a
  harder or held-out variant per family (see each class).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, ClassVar

from atod_edge.envs.base import MAX_ACTION_CHARS, SPLITS, Env, StepResult, Task
from atod_edge.errors import UserError

INSTALL_HINT = "install the optional extra: pip install 'atod-edge[envs]'"

# Lines of the ASCII-art banner are made of these characters (plus spaces).
_BANNER_CHARS = set("_|\\/$<>-")
# The prompt line: ">" then padding then an optional status "-= Room =-score/moves".
_PROMPT_LINE = re.compile(r"\n>[^\n]*$")
_END_QUESTION = re.compile(
    r"\n*Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command\?\s*$")
_BLANK_RUNS = re.compile(r"\n{3,}")


def import_textworld():
    """Import textworld, or explain how to get it."""
    try:
        import textworld  # noqa: F401
        import textworld.challenges  # noqa: F401
        import textworld.generator  # noqa: F401
    except ImportError as e:
        raise UserError(f"TextWorld environments need the 'textworld' package ({e}); "
                        f"{INSTALL_HINT}") from None
    return textworld


def games_dir() -> Path:
    """Where generated games are cached: $ATOD_EDGE_GAMES_DIR, else <cache_dir>/games."""
    override = os.environ.get("ATOD_EDGE_GAMES_DIR")
    if override:
        return Path(override).expanduser()
    from atod_edge.io import cache_dir
    return cache_dir() / "games"


def clean_observation(text: str, strip_banner: bool = False) -> str:
    """The engine's text without the banner, the prompt/status line and the restart question."""
    text = text.replace("\r", "")
    text = _END_QUESTION.sub("", _PROMPT_LINE.sub("", text))
    lines = text.split("\n")
    if strip_banner:
        lines = [ln for ln in lines if not _is_banner_line(ln)]
    text = "\n".join(ln.strip() for ln in lines)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def _is_banner_line(line: str) -> bool:
    chars = line.replace(" ", "")
    return bool(chars) and sum(c in _BANNER_CHARS for c in chars) >= 0.6 * len(chars)


def _normalize(action: str) -> str:
    return " ".join(action.strip().lower().split())


def generate_game(folder: Path, make_game, settings: dict, seed: int) -> Path:
    """Generate and compile one game into `folder` (game.z8 + game.json), atomically.

    Built in a temporary sibling folder and renamed into place, so a crash or a concurrent
    process never leaves a half-written game under the final name. Returns the .z8 path.
    """
    textworld = import_textworld()
    final = folder / "game.z8"
    if final.is_file() and (folder / "game.json").is_file():
        return final
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        options = textworld.GameOptions()
        options.seeds = seed % (2**32)  # numpy RandomState seeds must fit 32 bits
        options.path = str(tmp / "game.z8")
        options.file_ext = ".z8"
        options.force_recompile = True
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not fully supported.*")
            game = make_game(dict(settings), options)
            textworld.generator.compile_game(game, options)
        (tmp / "game.ni").unlink(missing_ok=True)  # the Inform 7 source, not needed to play
        try:
            os.rename(tmp, folder)
        except OSError:
            if not final.is_file():  # not a lost race with another process: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


class TextWorldEnv(Env):
    """Base adapter for one family of generated TextWorld games (subclasses set the family)."""

    name: ClassVar[str] = "textworld"
    max_turns: ClassVar[int] = 30
    #: the optional extra this env needs (so tools can tell it from the pure-Python built-ins)
    extra: ClassVar[str] = "envs"
    #: the textworld.challenges module attribute holding `make(settings, options)`
    challenge: ClassVar[str] = ""
    #: generation settings per split (unseen may differ: see each subclass)
    settings: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self) -> None:
        self._env = None
        self._state = None
        self._task: Task | None = None

    # ------------------------------------------------------------ games on disk

    @classmethod
    def _make_function(cls):
        textworld = import_textworld()
        module = getattr(textworld.challenges, cls.challenge)
        return module.make

    @classmethod
    def game_folder(cls, task: Task) -> Path:
        """The cache folder of a task's game (named by split, index and a settings/seed hash)."""
        textworld = import_textworld()
        spec = json.dumps({"settings": cls.settings[task.split], "seed": task.seed,
                           "textworld": textworld.__version__}, sort_keys=True)
        key = hashlib.sha256(spec.encode()).hexdigest()[:12]
        return games_dir() / cls.name / f"{task.split}-{task.index}-{key}"

    @classmethod
    def game_file(cls, task: Task) -> Path:
        """Path of the task's compiled game, generating it on first use."""
        if task.split not in SPLITS:
            raise UserError(f"unknown split '{task.split}' (allowed: {', '.join(SPLITS)})")
        return generate_game(cls.game_folder(task), cls._make_function(),
                             cls.settings[task.split], task.seed)

    # ------------------------------------------------------------ protocol

    def reset(self, task: Task) -> str:
        textworld = import_textworld()
        path = self.game_file(task)
        self.close()
        infos = textworld.EnvInfos(admissible_commands=True, policy_commands=True, score=True,
                                   max_score=True, won=True, lost=True, objective=True)
        with warnings.catch_warnings():
            # jericho cannot read scores from generated games; TextWorld tracks them itself
            warnings.filterwarnings("ignore", message=".*not fully supported.*")
            self._env = textworld.start(str(path), infos)
            self._state = self._env.reset()
        self._task = task
        self.turns = 0
        self.done = False
        self.won = False
        self.score = 0.0
        return clean_observation(self._state.feedback, strip_banner=True)

    def step(self, action: str) -> StepResult:
        self._require_reset()
        if self.done:
            return StepResult("The episode is over.", 0.0, True, self._info(False, "the episode is over"))
        self.turns += 1
        command = _normalize(action) if isinstance(action, str) and len(action) <= MAX_ACTION_CHARS else ""
        admissible = self._admissible()
        if command in admissible:
            self._state, _, _ = self._env.step(command)
            observation, valid, feedback = clean_observation(self._state.feedback), True, ""
            self.won = bool(self._state.won)
            max_score = float(self._state.max_score or 0) or 1.0
            self.score = 1.0 if self.won else max(0.0, float(self._state.score or 0)) / max_score
            self.done = bool(self._state.won or self._state.lost)
        else:
            observation, valid = "Nothing happens.", False
            feedback = self._why_invalid(action, command)
        self.done = self.done or self.turns >= self.max_turns
        reward = self.score if self.done else 0.0
        return StepResult(observation, reward, self.done, self._info(valid, feedback))

    def admissible_actions(self) -> list[str]:
        self._require_reset()
        return self._admissible()

    def expert_action(self) -> str:
        """The next command of TextWorld's plan to win from the current state."""
        self._require_reset()
        plan = list(self._state.policy_commands or [])
        if plan:
            return plan[0]
        return "look"  # the game is over, or the engine has no plan left

    def close(self) -> None:
        if self._env is not None:
            try:
                self._env.close()
            except Exception:
                pass
            self._env = None

    def __del__(self) -> None:
        self.close()

    # ------------------------------------------------------------ helpers

    def _admissible(self) -> list[str]:
        if self.done:
            return []
        return [_normalize(c) for c in (self._state.admissible_commands or [])]

    def _info(self, valid: bool, feedback: str) -> dict[str, Any]:
        return {"valid": valid, "won": self.won, "score": self.score,
                "admissible": self._admissible(), "feedback": feedback}

    def _why_invalid(self, action: Any, command: str) -> str:
        if not isinstance(action, str):
            return "the action must be text"
        if not command:
            return f"empty or over-long action (at most {MAX_ACTION_CHARS} characters); try 'look'"
        return "not a command the game accepts here; choose one of the admissible commands"

    def _require_reset(self) -> None:
        if self._state is None:
            raise RuntimeError(f"{type(self).__name__}: call reset(task) before step()")


class TextWorldCookingEnv(TextWorldEnv):
    """TextWorld's cooking games (as in the First TextWorld Problems competition).

    Read the cookbook, gather the ingredient, cut and cook it as the recipe says, prepare the
    meal and eat it. One room, one ingredient, closed containers, cooking and cutting. Train and
    eval use TextWorld's train food split; unseen uses its test split (foods and preparations
    never seen in train).
    """

    name: ClassVar[str] = "textworld-cooking"
    max_turns: ClassVar[int] = 30
    description: ClassVar[str] = "TextWorld cooking games (FTWP-style), generated locally by seed"
    instructions: ClassVar[str] = (
        "Cooking game: read the cookbook, gather the ingredients, cut them (slice/dice/chop X "
        "with knife) and cook them (cook X with stove/oven) as the recipe says, then prepare meal "
        "and eat meal. Other actions: open X, take X from Y, examine X, look, inventory."
    )
    challenge: ClassVar[str] = "cooking"
    _base: ClassVar[dict[str, Any]] = {"recipe": 1, "take": 1, "go": 1, "open": True, "cook": True,
                                       "cut": True, "drop": False, "recipe_seed": 0}
    settings: ClassVar[dict[str, dict[str, Any]]] = {
        "train": {**_base, "split": "train"},
        "valid": {**_base, "split": "train"},
        "eval": {**_base, "split": "train"},
        "unseen": {**_base, "split": "test"},
    }


class TextWorldCoinEnv(TextWorldEnv):
    """TextWorld's coin collector: find the coin along a chain of rooms and take it.

    Level 105: a 5-room path to the coin plus dead-end distractor rooms (10 rooms). Unseen:
    level 110, a 10-room path (20 rooms).
    """

    name: ClassVar[str] = "textworld-coin"
    max_turns: ClassVar[int] = 30
    description: ClassVar[str] = "TextWorld coin collector games, generated locally by seed"
    instructions: ClassVar[str] = (
        "Coin collector: explore the rooms (go north/south/east/west) to find the coin, then "
        "take coin. Dead ends mean you should go back."
    )
    challenge: ClassVar[str] = "coin_collector"
    settings: ClassVar[dict[str, dict[str, Any]]] = {
        "train": {"level": 105}, "valid": {"level": 105}, "eval": {"level": 105}, "unseen": {"level": 110},
    }


class TextWorldTreasureEnv(TextWorldEnv):
    """TextWorld's treasure hunter: find the named object and take it; taking a wrong one loses.

    Level 15 (medium): 10 rooms with closed doors and containers. Unseen: level 25 (hard: 20
    rooms, locked doors and containers, keys in the inventory).
    """

    name: ClassVar[str] = "textworld-treasure"
    max_turns: ClassVar[int] = 40
    description: ClassVar[str] = "TextWorld treasure hunter games, generated locally by seed"
    instructions: ClassVar[str] = (
        "Treasure hunt: find the object named in the task and take it; taking any other object "
        "loses. Actions: go north/south/east/west, open X, unlock X with Y, take X, take X from Y, "
        "examine X, look, inventory."
    )
    challenge: ClassVar[str] = "treasure_hunter"
    settings: ClassVar[dict[str, dict[str, Any]]] = {
        "train": {"level": 15}, "valid": {"level": 15}, "eval": {"level": 15}, "unseen": {"level": 25},
    }
