"""tui/data.py, episodes.py, tokens.py, live_session.py and the pure parts of the widgets (no app running)."""

from __future__ import annotations

import json

import pytest
from tui_fixtures import CountingEnv, make_episodes, write_episodes_file

from atod_edge.rollout.episode import Turn
from atod_edge.errors import UserError
from atod_edge.tui.data import MetricsLog, RunDir, classify_path
from atod_edge.tui.episodes import EpisodeFilter, episode_stats, load_episodes, step_filter_valid
from atod_edge.tui.live_session import ExpertAgent, HumanAgent, LiveSession, make_agent
from atod_edge.tui.tokens import TokenDecoder, turn_tokens
from atod_edge.tui.widgets.curve_plot import render_bars, resample
from atod_edge.tui.widgets.token_view import delta_style


# ---------------------------------------------------------------------------- metrics


def test_metrics_log_reads_incrementally_and_holds_back_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    assert log.poll() == 0 and not log.exists            # missing file: no rows, no error
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    assert log.poll() == 1 and log.skipped == 0           # the half line is not counted yet
    with open(path, "a") as f:
        f.write('ss": 0.4}\nnot json\n{"step": 3, "loss": NaN, "success": true}\n')
    assert log.poll() == 2
    assert log.skipped == 1
    assert log.series("loss") == [(1, 0.5), (2, 0.4)]     # NaN dropped
    assert log.series("success") == [(3, 1.0)]
    assert log.last("missing_key") is None


def test_metrics_log_restarts_when_the_file_shrinks(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i, "reward": i}) + "\n" for i in range(5)))
    log = MetricsLog(path)
    log.poll()
    path.write_text(json.dumps({"step": 0, "reward": 9}) + "\n")
    log.poll()
    assert log.series("reward") == [(0, 9.0)]


def test_run_dir_parts(run_dir):
    run = RunDir(run_dir)
    assert [p.name for p in run.sample_files()] == [f"step_{s:06d}.jsonl" for s in range(8)]
    assert run.config()["steps"] == 8 and run.config()["schedule"]["anneal_steps"] == 6
    assert run.report() is None
    (run_dir / "report.json").write_text("{torn")
    assert run.report() is None                           # unreadable report: still running
    with pytest.raises(UserError):
        RunDir(run_dir / "nope")


# ---------------------------------------------------------------------------- episodes


def test_filter_by_env_outcome_step_and_text():
    episodes = make_episodes()
    assert EpisodeFilter().apply(episodes) == list(range(len(episodes)))
    assert all(episodes[i].env == "shop" for i in EpisodeFilter(env="shop").apply(episodes))
    failures = EpisodeFilter(outcome="failure").apply(episodes)
    assert failures and all(not episodes[i].success for i in failures)
    assert EpisodeFilter(step="20").apply(episodes) == [i for i, e in enumerate(episodes) if e.step == 20]
    assert EpisodeFilter(step="-15").apply(episodes) == [i for i, e in enumerate(episodes)
                                                         if e.step is not None and e.step <= 15]
    assert EpisodeFilter(step="abc").apply(episodes) == []
    hits = EpisodeFilter(text="RED MUG").apply(episodes)
    assert hits and all(episodes[i].env == "shop" for i in hits)
    assert step_filter_valid("10-20") and step_filter_valid("") and not step_filter_valid("x")


def test_load_episodes_reports_corrupt_lines_and_newer_schema(tmp_path):
    path = write_episodes_file(tmp_path / "e.jsonl", make_episodes(n=3), corrupt=True)
    with open(path, "a") as f:   # finish the torn line as a newer-schema record with unknown fields
        f.write('\n{"env": "shop", "task_id": "shop/eval/9", "schema_version": 99, "new_field": 1}\n')
    episodes, notice = load_episodes(path)
    assert len(episodes) == 4
    assert "skipped 2" in notice and "newer schema" in notice
    with pytest.raises(UserError):
        load_episodes(tmp_path / "missing.jsonl")


def test_token_decoding_with_and_without_a_tokenizer(tokenizer, tmp_path):
    ids = tokenizer.encode("Action: open fridge 1").ids
    turn = Turn(observation="o", response_ids=ids, student_logprobs=[-1.0] * len(ids),
                teacher_logprobs=[-0.5] * (len(ids) - 1))       # one short: padded with None
    decoder, notice = TokenDecoder.load(tmp_path / "tok")
    assert notice is None and decoder.has_tokenizer
    tokens = turn_tokens(turn, decoder)
    assert "".join(t.text for t in tokens) == "Action: open fridge 1"
    assert tokens[0].delta == pytest.approx(0.5) and tokens[-1].delta is None
    bare, notice = TokenDecoder.load(tmp_path / "nowhere")
    assert not bare.has_tokenizer and "showing token ids" in notice
    assert [t.text for t in turn_tokens(turn, bare)][:1] == [f"{ids[0]} "]


def test_run_dir_tokenizer_found_in_checkpoints(run_dir):
    decoder, notice = TokenDecoder.load(run_dir=run_dir)
    assert decoder.has_tokenizer and "checkpoints" in decoder.source and notice is None


def test_episode_stats_with_and_without_teacher():
    episodes = make_episodes()
    with_teacher, without = episode_stats(episodes[0]), episode_stats(episodes[3])
    assert with_teacher.has_teacher and with_teacher.mean_weight is not None
    assert with_teacher.invalid == 1 and with_teacher.tokens > 0
    assert not without.has_teacher and without.mean_weight is None and without.mean_abs_log_ratio is None


def test_classify_path(run_dir, episodes_file, tmp_path):
    assert classify_path(None) == "live"
    assert classify_path(run_dir) == "dashboard"
    assert classify_path(episodes_file) == "inspector"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert classify_path(model) == "live"
    (tmp_path / "agent.gguf").write_bytes(b"")
    assert classify_path(tmp_path / "agent.gguf") == "live"
    with pytest.raises(UserError, match="not found"):
        classify_path(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(UserError, match="cannot open"):
        classify_path(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a run directory"):
        classify_path(tmp_path / "empty")


# ---------------------------------------------------------------------------- widgets (pure parts)


def test_resample_and_bars():
    assert resample([1.0, 3.0, 5.0, 7.0], 2) == [2.0, 6.0]
    assert resample([1.0, 2.0], 4) == [1.0, 1.0, 2.0, 2.0]
    rows = render_bars([0.0, 1.0], width=10, height=2)
    assert len(rows) == 2 and all(len(r.plain) == 10 for r in rows)
    assert rows[0].plain.startswith("      1") and rows[1].plain.startswith("      0")
    assert rows[0].plain.endswith("█") and rows[1].plain[8] == "▁"


def test_delta_style_buckets():
    assert delta_style(None) == "" and delta_style(0.05) == ""
    assert "on #" in delta_style(0.3) and delta_style(0.3) != delta_style(-0.3)
    assert delta_style(5.0) == delta_style(2.0)


# ---------------------------------------------------------------------------- live session


def test_live_session_expert_wins(test_envs):
    session = LiveSession("counting", "eval", 1)       # target 3
    assert session.reset().startswith("You are at 0")
    agent = ExpertAgent()
    while not session.done:
        response, action, reason = session.decide(agent)
        session.apply(action, response, reason)
    assert session.won and session.score == 1.0 and len(session.turns) == 3
    assert session.history[-1] == ("inc", "You are at 3. You reached the target!")
    episode = session.episode("expert")
    assert episode.success and episode.num_turns == 3 and episode.task_id == "counting/eval/1"
    with pytest.raises(UserError, match="over"):
        session.apply("inc")


def test_live_session_invalid_and_unparsable_actions(test_envs):
    session = LiveSession("counting", "train", 0)
    session.reset()
    bad = session.apply("fly").turn
    assert not bad.valid and bad.feedback == "not an admissible action"
    unparsed = session.apply(None, "blah", "no <action> in the response").turn
    assert not unparsed.valid and unparsed.action is None and unparsed.feedback.startswith("no <action>")
    assert session.history[-1][0] == "(invalid)"


def test_live_session_turn_limit(test_envs):
    session = LiveSession("counting", "eval", 0)
    session.reset()
    for _ in range(CountingEnv.max_turns):
        session.apply("look")
    assert session.done and not session.won and session.admissible == []


def test_agents_and_bad_setup(test_envs):
    assert make_agent("expert").name == "expert"
    with pytest.raises(UserError, match="model path"):
        make_agent("model")
    with pytest.raises(UserError):
        make_agent("robot")
    with pytest.raises(UserError):
        HumanAgent().respond(None)
    with pytest.raises(UserError, match="split"):
        LiveSession("counting", "nope", 0)
    with pytest.raises(UserError, match="unknown env"):
        LiveSession("no-such-env")


def test_fields_of_the_wrong_type_are_repaired_not_fatal(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({
        "env": 5, "task_id": None, "seed": "x", "split": "eval", "success": "yes", "reward": 1,
        "turns": [{"observation": 7, "response": None, "action": 3, "valid": "no", "reward": "big",
                   "response_ids": [1, "a"], "student_logprobs": [-1, None, "x"],
                   "teacher_logprobs": "nope", "weight": "w"}],
    }) + "\n" + json.dumps({"env": "shop", "task_id": "shop/eval/1", "seed": 1, "split": "eval",
                            "reward": 1, "turns": []}) + "\n")
    episodes, notice = load_episodes(path)
    odd, fine = episodes
    assert "1 episode(s) had fields of the wrong type" in notice
    turn = odd.turns[0]
    assert (odd.env, odd.task_id, odd.seed, odd.success) == ("5", "", -1, False)
    assert (turn.observation, turn.response, turn.action, turn.valid) == ("7", "", "3", False)
    assert turn.reward == 0.0 and turn.response_ids is None and turn.teacher_logprobs is None
    assert turn.student_logprobs == [-1, None, None] and turn.weight is None
    assert fine.reward == 1 and episode_stats(odd).tokens == 0


def test_kappa_and_rho_are_titled_by_the_advantage_they_scale():
    """The opd baseline keeps only the OPD term and grpo only the GRPO one (train/schedule.py):
    so kappa is the OPD weight and rho the GRPO weight, as the dashboard must say."""
    from atod_edge.train.schedule import ScheduleConfig, coefficients
    from atod_edge.tui.data import CURVES

    titles = dict(CURVES)
    assert coefficients(3, "opd", ScheduleConfig()) == (1.0, 0.0)     # (kappa, rho)
    assert coefficients(3, "grpo", ScheduleConfig()) == (0.0, 1.0)
    assert "OPD" in titles["kappa"] and "GRPO" not in titles["kappa"]
    assert "GRPO" in titles["rho"] and "OPD" not in titles["rho"]
