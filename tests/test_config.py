"""Tests for atod_edge/config.py: typed configs from YAML recipes and --set overrides."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from atod_edge.cli.main import main
from atod_edge.config import describe, dump_yaml, load_config, nested, opt, resolve_recipe
from atod_edge.errors import ConfigError
from atod_edge.evaluate.evaluate import EvalConfig


@dataclasses.dataclass
class Inner:
    rate: float = opt(0.5, "a rate", min=0.0, max=1.0)


@dataclasses.dataclass
class Outer:
    name: str = opt("a", "a name", choices=["a", "b"])
    count: int = opt(3, "a count", min=1)
    flag: bool = opt(False, "a flag")
    tags: list[str] = opt(["x"], "some tags")
    limit: int | None = opt(None, "an optional limit", min=0)
    inner: Inner = nested(Inner, "a section")


def test_defaults_recipe_and_overrides_stack(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("count: 5\ninner:\n  rate: 0.25\n")
    cfg = load_config(Outer, str(recipe), ["name=b", "inner.rate=0.75", "tags=p, q", "limit=null"],
                      base={"count": 4, "flag": True})
    assert (cfg.name, cfg.count, cfg.flag, cfg.tags, cfg.limit, cfg.inner.rate) == \
        ("b", 5, True, ["p", "q"], None, 0.75)
    # mutable defaults are not shared between instances
    first, second = Outer(), Outer()
    first.tags.append("y")
    assert second.tags == ["x"]


@pytest.mark.parametrize("override, named", [
    ("colour=red", ["'colour'", "allowed:", "count", "inner"]),            # unknown key
    ("count=many", ["'count'", "integer", "'many'"]),                      # wrong type
    ("count=2.5", ["'count'", "integer", "2.5"]),                          # float for int
    ("flag=1", ["'flag'", "true or false", "1"]),                          # int for bool
    ("count=0", ["'count'", "0", ">= 1"]),                                 # out of range
    ("inner.rate=1.5", ["'inner.rate'", "1.5", "<= 1.0"]),                 # nested out of range
    ("inner.speed=2", ["'inner.speed'", "allowed:", "rate"]),              # nested unknown key
    ("name=c", ["'name'", "'c'", "allowed: a, b"]),                        # bad choice
    ("inner=3", ["inner", "mapping", "3"]),                                # section given a value
    ("count", ["'count'", "key=value"]),                                   # no '='
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(override, named):
    with pytest.raises(ConfigError) as err:
        load_config(Outer, None, [override])
    message = str(err.value)
    assert "\n" not in message
    for part in named:
        assert part in message, (part, message)


def test_number_written_in_exponent_form_is_a_number():
    # YAML 1.1 reads "1e-4" as a string: a float field must still accept it (bug fixed here).
    assert load_config(Inner, None, ["rate=1e-1"]).rate == pytest.approx(0.1)
    assert load_config(EvalConfig, None, ["temperature=4E-1"]).temperature == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="'rate'.*expected a number"):
        load_config(Inner, None, ["rate=fast"])


def test_nan_is_refused_where_bounds_apply():
    with pytest.raises(ConfigError, match="'rate'"):
        load_config(Inner, None, ["rate=.nan"])


def test_malformed_and_non_mapping_recipes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("count: [1, 2\nname: a\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, str(bad))
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(Outer, str(listed))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="binary.yaml"):
        load_config(Outer, str(binary))
    with pytest.raises(ConfigError, match="not found.*household"):
        resolve_recipe("no-such-recipe")


def test_builtin_recipe_resolves_by_name():
    assert resolve_recipe("household").name == "household.yaml"
    assert resolve_recipe(None) is None


def test_nested_train_keys_and_cross_field_validation():
    from atod_edge.train.config import TrainConfig

    cfg = load_config(TrainConfig, None, ["schedule.kappa_min=0.05"])
    assert cfg.schedule.kappa_min == pytest.approx(0.05)
    assert "kappa_min: 0.05" in dump_yaml(cfg)
    with pytest.raises(ConfigError, match="schedule.kappa_min"):
        load_config(TrainConfig, None, [f"schedule.kappa_min={cfg.schedule.kappa_init + 1}"])
    with pytest.raises(ConfigError, match="unknown config key 'schedule.kappa_mni'"):
        load_config(TrainConfig, None, ["schedule.kappa_mni=0.1"])


def test_describe_lists_every_leaf_key_with_help():
    rows = {key: (default, help_text) for key, default, help_text in describe(Outer)}
    assert set(rows) == {"name", "count", "flag", "tags", "limit", "inner.rate"}
    assert rows["inner.rate"] == ("0.5", "a rate")


def test_config_show_prints_the_resolved_config(capsys):
    assert main(["config", "show", "--stage", "eval", "--set", "episodes=7"]) == 0
    out = capsys.readouterr().out
    assert "episodes: 7" in out and "split: eval" in out
    assert main(["config", "show", "--stage", "eval", "--keys"]) == 0
    assert "temperature" in capsys.readouterr().out


def test_config_show_nested_set(capsys):
    assert main(["config", "show", "--stage", "train", "--set", "schedule.kappa_min=0.05"]) == 0
    assert "kappa_min: 0.05" in capsys.readouterr().out


def test_cli_config_error_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "atod_edge.cli", "config", "show", "--stage", "eval",
                           "--set", "episodes=-3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "episodes" in lines[0] and "-3" in lines[0] and ">= 1" in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_malformed_recipe_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("episodes: [1,\n")
    assert main(["config", "show", str(bad), "--stage", "eval"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid YAML" in err[0]


def test_every_shipped_recipe_loads_and_validates():
    """A typo in a shipped recipe (a key, a type, a range) would only show when a user runs it."""
    from pathlib import Path

    import atod_edge
    from atod_edge.train.config import TrainConfig

    recipes = sorted((Path(atod_edge.__file__).parent / "recipes").glob("*.yaml"))
    assert len(recipes) >= 8
    for recipe in recipes:
        cfg = load_config(TrainConfig, recipe.stem, [])
        assert cfg.env and cfg.steps >= 1, recipe.name
