"""Atomic file writes: the target is the old file or the new one, whole, and the data reached the disk."""

import json
import os

import pytest

from safedlora_app.core import files


@pytest.fixture
def fsyncs(monkeypatch):
    """The descriptors os.fsync was called with (the real call still runs)."""
    calls = []
    real = os.fsync

    def counting(descriptor):
        calls.append(descriptor)
        real(descriptor)

    monkeypatch.setattr(files.os, "fsync", counting)
    return calls


def test_the_target_holds_the_whole_new_content_and_no_temporary_file_stays(tmp_path, fsyncs):
    target = tmp_path / "state.json"
    target.write_text("old")
    files.atomic_write_json(target, {"round": 3, "ranks": [1, 2]}, indent=1)
    assert json.loads(target.read_text()) == {"round": 3, "ranks": [1, 2]}
    assert target.read_text().endswith("}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert len(fsyncs) == 2  # the file's data, then the directory entry


def test_the_writer_writes_to_a_sibling_not_to_the_target(tmp_path, fsyncs):
    target = tmp_path / "arrays.bin"
    seen = []

    def write(partial):
        seen.append(partial)
        assert not target.exists()  # nothing is visible under the target's name before the rename
        partial.write_bytes(b"\x00" * 10)

    files.atomic_write(target, write)
    assert seen[0].parent == tmp_path and seen[0] != target and seen[0].name.endswith(files.PARTIAL)
    assert target.read_bytes() == b"\x00" * 10 and not seen[0].exists()


def test_a_failing_writer_leaves_the_old_file_and_no_temporary_file(tmp_path, fsyncs):
    target = tmp_path / "summary.json"
    target.write_text('{"old": true}\n')

    def half_then_fail(partial):
        partial.write_text('{"new": ')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        files.atomic_write(target, half_then_fail)
    assert target.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert fsyncs == []


def test_data_that_cannot_be_encoded_leaves_the_old_file(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("{}\n")
    with pytest.raises(TypeError):
        files.atomic_write_json(target, {"bad": object()})
    assert target.read_text() == "{}\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_failing_fsync_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.jsonl"
    target.write_text("old\n")

    def broken(descriptor):
        raise OSError("I/O error")

    monkeypatch.setattr(files.os, "fsync", broken)
    with pytest.raises(OSError, match="I/O error"):
        files.atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_directory_that_cannot_be_synced_is_no_error(tmp_path, monkeypatch):
    """Best effort: where a directory cannot be opened (Windows), the rename still happened."""
    real_open = os.open

    def no_directories(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError("cannot open a directory")
        return real_open(path, flags, *args)

    monkeypatch.setattr(files.os, "open", no_directories)
    files.atomic_write_text(tmp_path / "a.txt", "text")
    assert (tmp_path / "a.txt").read_text() == "text"


def test_sync_file_flushes_and_syncs_an_open_file(tmp_path, fsyncs):
    with (tmp_path / "log.jsonl").open("a") as handle:
        handle.write("line\n")
        files.sync_file(handle)
        assert fsyncs == [handle.fileno()]
        assert (tmp_path / "log.jsonl").read_text() == "line\n"  # flushed before the sync


def test_the_run_outputs_are_written_through_it(tmp_path, fsyncs):
    """config.json/summary.json and a rewritten metrics.jsonl reach the disk whole (they were renamed unsynced)."""
    from safedlora_app.server.outputs import RunRecorder, write_json

    write_json(tmp_path / "summary.json", {"rounds": 2})
    assert len(fsyncs) == 2 and json.loads((tmp_path / "summary.json").read_text()) == {"rounds": 2}
    RunRecorder(tmp_path, num_rounds=2).load_state_dict({"records": [{"round": 0}]})
    assert len(fsyncs) == 4 and (tmp_path / "metrics.jsonl").read_text() == '{"round": 0}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "summary.json"]
