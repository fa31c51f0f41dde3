"""Tests for atod_edge/episode.py: Episode/Turn records and their JSONL files."""

from __future__ import annotations

import json

from atod_edge.rollout.episode import SCHEMA_VERSION, Episode, Turn, read_episodes, write_episodes


def full_episode(i: int = 0) -> Episode:
    """An episode with every field set, token-level ones included."""
    turns = [
        Turn(observation="You are in a kitchen.", response="hm <action>open fridge 1</action>",
             action="open fridge 1", valid=True, reward=0.0, done=False,
             admissible=["open fridge 1", "look"], prompt_ids=[1, 2, 3], response_ids=[7, 8, 9],
             student_logprobs=[-0.5, -1.25, -0.125], teacher_logprobs=[-0.25, -2.0, -0.5],
             disagreement=0.75, uncertainty=1.5, weight=1.2),
        Turn(observation="The fridge is open.", response="garbage", action=None, valid=False,
             reward=1.0, done=True, feedback="no <action>...</action> in the response",
             prompt_ids=[1, 2, 3, 4], response_ids=[5], student_logprobs=[-3.0]),
    ]
    return Episode(env="household", task_id=f"household/eval/{i}", seed=1000 + i, split="eval",
                   turns=turns, reward=1.0, score=1.0, success=True, final_observation="Done.",
                   policy="tiny-student", step=3, group=i, meta={"note": "é ✓", "k": [1, 2]})


def test_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "episodes.jsonl"
    episodes = [full_episode(0), full_episode(1)]
    assert write_episodes(path, episodes) == 2
    loaded, skipped = read_episodes(path)
    assert skipped == 0
    assert loaded == episodes
    assert loaded[0].num_turns == 2 and loaded[0].num_invalid == 1
    record = json.loads(path.read_text().splitlines()[0])
    assert record["schema_version"] == SCHEMA_VERSION and record["num_turns"] == 2


def test_torn_last_line_and_corrupt_middle_line_are_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "episodes.jsonl"
    write_episodes(path, [full_episode(0)])
    with open(path, "a") as f:
        f.write('{"env": "household", "turns": [ nope\n')
    write_episodes(path, [full_episode(1)])
    line = json.dumps(full_episode(2).to_dict())
    with open(path, "a") as f:
        f.write(line[: len(line) // 2])          # a crash mid-write
    with caplog.at_level("WARNING"):
        loaded, skipped = read_episodes(path)
    assert [ep.task_id for ep in loaded] == ["household/eval/0", "household/eval/1"]
    assert skipped == 2
    assert "skipped 2" in caplog.text


def test_older_and_newer_schema_records_load(tmp_path):
    path = tmp_path / "episodes.jsonl"
    old = {"env": "shop", "task_id": "shop/eval/3", "seed": 5, "split": "eval",
           "turns": [{"observation": "Find a red shirt.", "response": "<action>search[red shirt]</action>",
                      "action": "search[red shirt]"}],
           "success": False}                                  # no schema_version, no token fields
    newer = {"env": "shop", "task_id": "shop/eval/4", "seed": 6, "split": "eval", "schema_version": 9,
             "future_field": {"x": 1},
             "turns": [{"observation": "o", "future_turn_field": 3, "response_ids": [4, 5]}]}
    sparse = {"turns": []}                                    # the bare minimum
    path.write_text("\n".join(json.dumps(r) for r in (old, newer, sparse)) + "\n")
    loaded, skipped = read_episodes(path)
    assert skipped == 0 and len(loaded) == 3
    assert loaded[0].turns[0].action == "search[red shirt]" and loaded[0].turns[0].prompt_ids is None
    assert loaded[0].schema_version == SCHEMA_VERSION and loaded[0].score == 0.0
    assert loaded[1].schema_version == 9 and loaded[1].turns[0].response_ids == [4, 5]
    assert (loaded[2].env, loaded[2].seed, loaded[2].turns) == ("", -1, [])


def test_record_of_the_wrong_shape_is_skipped_not_raised(tmp_path):
    path = tmp_path / "episodes.jsonl"
    bad = {"env": "shop", "turns": "not a list of turns"}
    bad_meta = {"env": "shop", "turns": [], "meta": None}
    write_episodes(path, [full_episode(0)])
    with open(path, "a") as f:
        f.write(json.dumps(bad) + "\n" + json.dumps(bad_meta) + "\n")
    loaded, skipped = read_episodes(path)
    assert [ep.task_id for ep in loaded] == ["household/eval/0", ""]
    assert loaded[1].meta == {}
    assert skipped == 1
