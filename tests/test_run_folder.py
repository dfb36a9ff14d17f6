"""core/run_folder.py: the one reader of a run's folder, and what config.json keeps."""

import json

import pytest
from support.runs import run_server, tiny_run_config

from safedlora_app.core.run_folder import WHERE_KEYS, RunFolder, without_where


def test_a_folder_reads_its_rounds_its_summary_once_finished_and_skips_a_torn_last_line(tmp_path):
    run = RunFolder(tmp_path)
    assert (run.started, run.finished, run.records(), run.summary(), run.given()) == (False, False, [], None, {})
    lines = [json.dumps({"round": 0, "loss": 1.0}), json.dumps({"round": 1, "loss": 0.5}), '{"round": 2, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))  # a crash mid-write cut the last line
    assert run.started and not run.finished
    assert run.records() == [{"round": 0, "loss": 1.0}, {"round": 1, "loss": 0.5}]
    assert run.rounds() == [{"round": 1, "loss": 0.5}]
    (tmp_path / "summary.json").write_text('{"rounds": 2}')
    assert run.finished and run.summary() == {"rounds": 2}
    with pytest.raises(ValueError, match="line 3 is not JSON"):  # a finished run's lines must all be whole
        run.records()


def test_a_line_that_is_not_json_before_the_last_is_an_error_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\nnot json\n{"round": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
        RunFolder(tmp_path).records()


def test_config_json_keeps_what_the_run_ran_not_where_it_was_written(tmp_path):
    config = tiny_run_config(tmp_path / "runs", tmp_path / "cache", **{"run-name": "where", "num-server-rounds": 1})
    run_dir, _, _ = run_server(config)
    stored = RunFolder(run_dir).config()
    for part in ("given", "effective"):
        assert not set(WHERE_KEYS) & set(stored[part]), stored[part]
    assert str(tmp_path) not in json.dumps(stored)  # no path of this machine
    assert stored["given"]["num-server-rounds"] == 1
    assert without_where({"out-dir": "/x", "lr": 0.1, "resume": True}) == {"lr": 0.1}
