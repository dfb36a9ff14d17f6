"""Checkpoint and resume: exact continuation, extension, refusals (in process; `flwr run` in test_e2e_simulation)."""

import errno
import json
import os
import re
import shutil
import subprocess

import pytest
import torch
from flwr.app import Context, MessageType, RecordDict
from safetensors.torch import load_file
from support.runs import WALL_CLOCK, InProcessGrid, run_server

from safedlora_app import server_app
from safedlora_app.core.config import RunConfig
from safedlora_app.core.run_folder import RunFolder
from safedlora_app.server import checkpoint
from safedlora_app.server.checkpoint import CheckpointError
from safedlora_app.server.outputs import RunRecorder
from safedlora_app.server.round_deadline import DeadlineGrid
from safedlora_app.server.strategy import SAFedLoRA

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py


class Crash(Exception):
    """Stands for the ServerApp's process dying."""


class CrashingGrid(InProcessGrid):
    """Dies when asked to run round ``crash_at`` (Flower's count), after the previous round's checkpoint."""

    def __init__(self, config, crash_at):
        super().__init__(config)
        self.calls, self.crash_at = 0, crash_at

    def push_messages(self, messages):
        messages = list(messages)
        # Only training rounds count: the server also asks new nodes for their limits, and Flower sends each
        # round's (here empty) federated evaluation.
        self.calls += any(m.metadata.message_type == MessageType.TRAIN for m in messages)
        if self.calls == self.crash_at:
            raise Crash
        return super().push_messages(messages)


def comparable(rows):
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in rows]


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture
def uninterrupted(finished_run):
    """A 3-round run start to finish, the reference for every resume here (the session's shared run: the tests
    write their own runs next to it, never into it)."""
    return finished_run(num_server_rounds=3)


def test_a_run_killed_after_round_1_resumes_to_the_same_adapter_and_metrics(uninterrupted):
    config, whole_dir, whole_rows, whole_summary = uninterrupted
    config = {**config, "run-name": "killed"}
    with pytest.raises(Crash):
        server_app.main(CrashingGrid(config, crash_at=2), Context(run_id=1, node_id=0, node_config={},
                                                                  state=RecordDict(), run_config=config))
    run_dir = whole_dir.parent / "killed"
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"] == 1
    assert not RunFolder(run_dir).finished
    resumed_dir, resumed_rows, summary = run_server({**config, "resume": True})
    assert comparable(resumed_rows) == comparable(whole_rows)
    assert summary["rounds"] == 3
    # The best round is chosen over all rounds, the ones before the interruption too, and kept once.
    assert (summary["best-model-round"], summary["best-model-loss"]) == (whole_summary["best-model-round"],
                                                                         whole_summary["best-model-loss"])
    assert [p.name for p in resumed_dir.glob("best-round-*")] == [f"best-round-{summary['best-model-round']}"]
    want, got = adapter(whole_dir), adapter(resumed_dir)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)


def test_a_finished_run_extends_with_more_rounds(uninterrupted, tmp_path):
    config, whole_dir, whole_rows, _ = uninterrupted
    extended = {**config, "out-dir": str(tmp_path), "run-name": "whole"}
    shutil.copytree(whole_dir, tmp_path / "whole")
    _, rows, summary = run_server({**extended, "resume": True, "num-server-rounds": 5})
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5] and summary["rounds"] == 5
    assert comparable(rows[:4]) == comparable(whole_rows)  # the first three rounds are kept as they were
    # Issue #36: the schedule goes on from its end instead of being planned anew for 5 rounds (which gave round 4
    # budget 50 after round 3's 54, and 0.23x of lr after 0.1x).
    assert [r["budget"] for r in rows[3:]] == [whole_rows[3]["budget"]] * 3
    config_json = RunFolder(tmp_path / "whole").config()
    assert config_json["given"]["schedule-rounds"] == 3


def test_resume_refuses_a_contradicting_config_and_a_finished_run(uninterrupted):
    config, whole_dir, _, _ = uninterrupted
    with pytest.raises(CheckpointError, match=r"resume: lr = 0.001 \(the checkpoint has 0.003\) in .*state.json; "
                                              r"only out-dir, run-name, resume, num-server-rounds, "
                                              r"schedule-rounds may change"):
        server_app.resume_point(RunConfig.from_mapping({**config, "resume": True, "lr": 0.001}), whole_dir)
    with pytest.raises(CheckpointError, match="already holds round 3 and num-server-rounds = 3; raise"):
        server_app.resume_point(RunConfig.from_mapping({**config, "resume": True}), whole_dir)


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    tensors = {"head::w": torch.randn(3, 4), "lora_A::m": torch.randn(2, 4)}
    checkpoint.save(tmp_path, 5, tensors, {"given": {"lr": 0.1}, "records": [], "node-backbone": {"7": "ab"}})
    point = checkpoint.load(tmp_path)
    assert point.server_round == 5 and point.state["node-backbone"] == {"7": "ab"}
    assert all(torch.equal(point.tensors[k], v) for k, v in tensors.items())
    checkpoint.save(tmp_path, 6, tensors, {"given": {}, "records": [], "node-backbone": {}})
    assert [p.name for p in (tmp_path / "checkpoint").glob("round-*")] == ["round-00006.safetensors"]
    # RNG states come back.
    before = torch.rand(3)
    state = checkpoint.rng_states()
    first = torch.rand(3)
    checkpoint.restore_rng(state)
    assert torch.equal(torch.rand(3), first) and not torch.equal(first, before)
    # A truncated arrays file and a truncated state file are refused, naming the file.
    arrays = tmp_path / "checkpoint" / "round-00006.safetensors"
    arrays.write_bytes(arrays.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"round-00006.safetensors is corrupt or truncated"):
        checkpoint.load(tmp_path)
    state_file = tmp_path / "checkpoint" / "state.json"
    state_file.write_text(state_file.read_text()[:40])
    with pytest.raises(CheckpointError, match=r"state.json is corrupt or truncated"):
        checkpoint.load(tmp_path)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        checkpoint.load(tmp_path / "elsewhere")
    checkpoint.save(tmp_path, 7, tensors, {"given": {}, "records": []})  # a state without the node map
    with pytest.raises(CheckpointError, match=r"state.json is corrupt or truncated: it lacks node-backbone"):
        checkpoint.load(tmp_path)


def test_the_checkpoint_collects_each_parts_state_and_gives_it_back(tmp_path):
    # The server's stateful parts as the ServerApp builds them; state.json keeps its flat keys.
    recorder = RunRecorder(tmp_path, 3)
    recorder.record(0, {"accuracy": 0.5, "macro-f1": 0.4, "loss": 1.0})
    strategy = SAFedLoRA(RunConfig.from_mapping({"method": "sa-fedlora"}), {"m": (4, 4)}, {})
    strategy.node_backbone = {7: "ab"}
    deadlines = DeadlineGrid(grid=None, cap=60.0, factor=3.0)
    deadlines.longest = 2.5
    checkpoint.save(tmp_path, 1, {"x": torch.zeros(1)},
                    {"given": {}, **checkpoint.collect((recorder, strategy, deadlines))})
    point = checkpoint.load(tmp_path)
    assert point.state["node-backbone"] == {"7": "ab"} and point.state["longest-round-seconds"] == 2.5
    fresh = (RunRecorder(tmp_path, 3), SAFedLoRA(strategy.config, {"m": (4, 4)}, {}),
             DeadlineGrid(grid=None, cap=60.0, factor=3.0))
    checkpoint.restore(point, fresh)
    assert fresh[0].records == recorder.records and fresh[1].node_backbone == {7: "ab"} and fresh[2].longest == 2.5
    # Two parts that claim one key would overwrite each other on resume: refused, naming the part.
    with pytest.raises(ValueError, match=r"RunRecorder.state_dict\(\) returns \['records'\]"):
        checkpoint.collect((recorder, recorder))


class ShrinkingGrid(InProcessGrid):
    """Node 101 disappears after round 1 and does not come back."""

    def __init__(self, config):
        super().__init__(config)
        self.rounds = 0

    def get_node_ids(self):
        return list(self.contexts) if self.rounds < 1 else [100]

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        self.rounds += bool(messages)
        return ids


def test_when_min_nodes_cannot_be_met_the_run_stops_and_resumes_once_nodes_return(uninterrupted, caplog):
    config, whole_dir, whole_rows, _ = uninterrupted
    config = {**config, "run-name": "shrunk", "node-wait-timeout": 1.0}
    with pytest.raises(server_app.NotEnoughNodes, match="only 1 node"):
        server_app.main(ShrinkingGrid(config), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                      run_config=config))
    assert "checkpoint after round 1" in caplog.text and "resume = true" in caplog.text
    _, rows, _ = run_server({**config, "resume": True})  # both nodes are back
    assert comparable(rows) == comparable(whole_rows)


def test_a_run_resumed_with_fewer_rounds_keeps_its_plan_and_a_run_given_schedule_rounds_keeps_its_own():
    """Review of issue #36: a run of 12 rounds resumed with 8 crashed (schedule-rounds 12 above 8)."""
    saved = RunConfig(num_server_rounds=12).to_dict()
    shorter = server_app.continued(RunConfig(num_server_rounds=8, resume=True, run_name="r"), saved)
    assert (shorter.schedule_rounds, shorter.planned_rounds, shorter.num_server_rounds) == (12, 12, 8)
    longer = server_app.continued(RunConfig(num_server_rounds=24, resume=True, run_name="r"), saved)
    assert longer.planned_rounds == 12
    own = server_app.continued(RunConfig(num_server_rounds=24, schedule_rounds=24, resume=True, run_name="r"), saved)
    assert own.planned_rounds == 24


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 MiB file system (tmpfs) that the test can fill up: needs root, as in CI and the Docker tiers."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder):
    """Write zeros into ``folder/ballast`` until the file system says it is full (ENOSPC)."""
    chunk = bytes(1 << 16)
    with open(folder / "ballast", "wb", buffering=0) as ballast:
        while True:
            try:
                ballast.write(chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
                break
    while chunk := chunk[: len(chunk) // 2]:  # the last pages too
        try:
            with open(folder / "ballast", "ab", buffering=0) as ballast:
                ballast.write(chunk)
        except OSError:
            pass


class FillingGrid(InProcessGrid):
    """Fills the disk when round ``fill_at`` (Flower's count) starts, after the previous round's checkpoint."""

    def __init__(self, config, fill_at, disk):
        super().__init__(config)
        self.calls, self.fill_at, self.disk = 0, fill_at, disk

    def push_messages(self, messages):
        messages = list(messages)
        self.calls += any(m.metadata.message_type == MessageType.TRAIN for m in messages)
        if self.calls == self.fill_at:
            fill(self.disk)
        return super().push_messages(messages)


def test_a_disk_that_fills_up_during_a_round_stops_the_run_at_the_last_checkpoint_and_it_resumes(uninterrupted,
                                                                                                 small_disk, caplog):
    """Issue #37 §3: a real ENOSPC while round 2's outputs are written (its metrics line, best model or checkpoint:
    whichever needs the next page of the file system). The run stops with an error that names the intact checkpoint
    (round 1) and how to resume; no partial file is left; with space again, resume = true ends exactly as the
    uninterrupted run."""
    config, _, whole_rows, _ = uninterrupted
    config = {**config, "out-dir": str(small_disk), "run-name": "full-disk"}
    with caplog.at_level("ERROR", logger="flwr"), pytest.raises(Exception, match="No space left on device"):
        server_app.main(FillingGrid(config, fill_at=2, disk=small_disk),
                        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    run_dir = small_disk / "full-disk"
    assert checkpoint.load(run_dir).server_round == 1  # whole, by its SHA-256
    assert not list(run_dir.rglob("*.partial")) and len(list((run_dir / "checkpoint").glob("round-*"))) == 1
    assert re.search(r"round 2: cannot write the run's outputs in .*full-disk \(.*No space left on device.*\)\. "
                     r"The checkpoint after round 1 in .* is intact: fix the cause \(e\.g\. free disk space\), then "
                     r"run again with resume = true and run-name = 'full-disk'", caplog.text)
    (small_disk / "ballast").unlink()
    _, rows, summary = run_server({**config, "resume": True})
    assert comparable(rows) == comparable(whole_rows) and summary["rounds"] == 3


def test_a_checkpoint_that_cannot_be_written_leaves_the_last_one_whole(small_disk, monkeypatch):
    """The checkpoint itself on a full disk (a real ENOSPC), and a state file that fails after its arrays were
    written: each time the previous checkpoint loads, and no file of the failed one is left."""
    small = {"head::w": torch.ones(2, 3)}
    checkpoint.save(small_disk, 1, small, {"given": {}, "records": [], "node-backbone": {}})
    fill(small_disk)
    with pytest.raises(Exception, match="No space left on device"):
        checkpoint.save(small_disk, 2, {"head::w": torch.ones(512, 512)}, {"given": {}, "records": [],
                                                                           "node-backbone": {}})
    folder = small_disk / checkpoint.DIRECTORY
    assert checkpoint.load(small_disk).server_round == 1
    assert sorted(p.name for p in folder.iterdir()) == ["round-00001.safetensors", "state.json"]
    (small_disk / "ballast").unlink()

    def no_state(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "atomic_write_json", no_state)
    with pytest.raises(OSError):
        checkpoint.save(small_disk, 2, small, {"given": {}, "records": [], "node-backbone": {}})
    assert sorted(p.name for p in folder.iterdir()) == ["round-00001.safetensors", "state.json"]
    assert checkpoint.load(small_disk).server_round == 1
    assert "No checkpoint was written yet" in checkpoint.last_good(small_disk / "elsewhere")
