"""Tests for atod_edge/io.py: atomic writes, line appends, tolerant JSONL reading."""

from __future__ import annotations

import json

import pytest

from atod_edge.io import append_line, atomic_path, atomic_write_json, atomic_write_text, read_jsonl


def test_atomic_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "report.json"
    atomic_write_json(target, {"b": 1, "a": [1, 2]})
    atomic_write_json(target, {"c": 3})
    assert json.loads(target.read_text()) == {"c": 3}
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "notes.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_atomic_directory_replaces_a_non_empty_directory(tmp_path):
    target = tmp_path / "ckpt"
    for version in ("one", "two"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / f"{version}.txt").write_text(version)
    assert [p.name for p in target.iterdir()] == ["two.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_read_jsonl_skips_torn_corrupt_and_non_object_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    append_line(path, json.dumps({"i": 0}))
    with open(path, "ab") as f:
        f.write(b'{"i": 1, "broken\n')        # corrupt middle line
        f.write(b"[1, 2]\n")                   # valid JSON but not a record
        f.write(b"\xff\xfe not utf-8\n")
        f.write(b"\n")                         # blank lines are not counted
    append_line(path, json.dumps({"i": 2}))
    with open(path, "ab") as f:
        f.write(b'{"i": 3, "tor')              # torn last line (crash mid-write)
    records, skipped = read_jsonl(path)
    assert records == [{"i": 0}, {"i": 2}]
    assert skipped == 4


def test_append_after_a_torn_line_starts_a_new_line(tmp_path):
    # A crash can leave a torn line with no newline; the next record must not be glued onto it
    # (bug fixed here: before, the record written after a crash was lost with the torn one).
    path = tmp_path / "log.jsonl"
    append_line(path, json.dumps({"i": 0}))
    with open(path, "ab") as f:
        f.write(b'{"i": 1, "tor')
    append_line(path, json.dumps({"i": 2}))
    records, skipped = read_jsonl(path)
    assert records == [{"i": 0}, {"i": 2}] and skipped == 1


def test_append_line_adds_exactly_one_newline(tmp_path):
    path = tmp_path / "new" / "log.jsonl"
    append_line(path, "a\n")
    append_line(path, "b")
    assert path.read_text() == "a\nb\n"
