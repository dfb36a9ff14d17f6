"""The ServerApp and the ClientApp's handler in one process: Flower's own round loop, no transport.

A Grid whose nodes are ``client_app.train_handler`` calls runs the real ``server_app.main`` on the
real model and tweets in seconds, so round counts, the evaluated model's ranks and the saved adapter
are checked without starting Flower's processes (the ``flwr run`` tests cover those).
"""

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from support.runs import LABELS, run_server

from safedlora_app import client_app
from safedlora_app.client.node_resources import node_resources
from safedlora_app.core import payload as pl
from safedlora_app.core.config import ConfigError, RunConfig
from safedlora_app.core.data import DataError
from safedlora_app.core.model import module_shapes
from safedlora_app.core.records import ARRAYS, METRICS
from safedlora_app.core.round_plan import plan_round
from safedlora_app.core.run_folder import RunFolder
from safedlora_app.server.replies import evaluation_problem

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py


@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_num_server_rounds_alone_runs_end_to_end(finished_run, rounds):
    _, run_dir, rows, summary = finished_run(num_server_rounds=rounds)
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    assert rows[1]["stage"] == "initiating" and all(r["stage"] == "annealing" for r in rows[2:])
    assert all(r["replies"] == 2 and r["dropped"] == 0 for r in rows[1:])
    # Each row's accuracy belongs to the model at that round's budget, and the saved adapter is that model.
    for row in rows[1:]:
        assert sum(row["model-ranks"].values()) == row["budget"]
    assert [r["budget"] for r in rows[1:]] == sorted((r["budget"] for r in rows[1:]), reverse=True)
    saved = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    assert saved == rows[-1]["model-ranks"] == summary["final-ranks"]
    assert summary["rounds"] == rounds and summary["final-accuracy"] == rows[-1]["accuracy"]
    # The round with the lowest validation loss (never the test loss) keeps its model next to the last one, and
    # only that one.
    assert all(r["val-loss"] is not None and r["val-accuracy"] is not None for r in rows)
    best = min(rows[1:], key=lambda r: r["val-loss"])
    assert summary["best-model-round"] == best["round"] and summary["best-model-loss"] == best["val-loss"]
    assert summary["selected-round"] == best["round"] and summary["selected-accuracy"] == best["accuracy"]
    assert summary["best-model-dir"] == str(run_dir / f"best-round-{best['round']}" / "adapter")
    assert [p.name for p in run_dir.glob("best-round-*")] == [f"best-round-{best['round']}"]
    saved_best = json.loads((Path(summary["best-model-dir"]) / "adapter_config.json").read_text())["rank_pattern"]
    assert saved_best == best["model-ranks"]


def test_the_log_has_one_line_per_round_and_no_deprecation_warning(finished_run):
    _, run_dir, _, _ = finished_run(num_server_rounds=3)
    output = finished_run.output[run_dir]
    assert [line[:11] for line in output.splitlines() if line.startswith("[round ")] == \
        ["[round 0/3]", "[round 1/3]", "[round 2/3]", "[round 3/3]"]
    for noise in ("[ROUND", "MetricRecord", "Global evaluation", "Final results", "FutureWarning",
                  "DeprecationWarning"):
        assert noise not in output, (noise, output)


def test_the_accurate_profile_trains_every_linear_layer(run_config):
    """profile = "accurate": LoRA on all 37 Linear layers of MiniLM (6 x query, key, value and 3 dense, and the
    pooler) at rank 16; the rounds given here (2) win over the profile's 24."""
    _, rows, summary = run_server(run_config(num_server_rounds=2, run_name="accurate", profile="accurate"))
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["replies"] == 2 for r in rows[1:])
    assert len(rows[1]["ranks"]) == 37 and set(rows[1]["ranks"].values()) == {16}
    assert any(m.endswith("intermediate.dense") for m in rows[1]["ranks"]) and "bert.pooler.dense" in rows[1]["ranks"]
    assert len(summary["final-ranks"]) == 37 and summary["best-model-dir"]


def test_float16_on_the_wire_runs_end_to_end_at_half_the_factor_bytes(finished_run):
    _, _, wide, _ = finished_run(num_server_rounds=2, wire_dtype="float32")
    config, _, half, _ = finished_run(num_server_rounds=2)  # the default wire is float16
    assert config["wire-dtype"] == "float16"
    assert all(r["replies"] == 2 for r in half[1:])
    for w, h in zip(wide[1:], half[1:]):
        assert 0.49 < h["bytes-down"] / w["bytes-down"] < 0.52 and 0.49 < h["bytes-up"] / w["bytes-up"] < 0.52


def test_a_server_without_data_trains_and_evaluates_on_the_nodes_own_files(run_config, tmp_path):
    """central-eval = false and label-names: the server never opens dataset-name (it does not exist here);
    fraction-evaluate = 1: both nodes score every round's model on their held-out quarter."""
    files = []
    for i, (first, second) in enumerate((("negative", "positive"), ("neutral", "positive"))):
        path = tmp_path / f"node-{i}.csv"
        path.write_text("text,label\n" + "".join(f"reading {k} is {'fine' if k % 2 else 'off'},"
                                                  f"{second if k % 2 else first}\n" for k in range(24)))
        files.append({"data-path": str(path)})
    config = run_config(num_server_rounds=2, run_name="no-data", central_eval=False,
                        label_names="negative,neutral,positive", dataset_name=str(tmp_path / "nowhere.csv"),
                        fraction_evaluate=1.0, eval_fraction=0.25, local_samples=0)
    run_dir, rows, summary = run_server(config, node_configs=files)
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["replies"] == 2 for r in rows[1:])
    assert all(r["accuracy"] is None for r in rows) and summary["final-accuracy"] is None
    # 6 of each node's 24 rows are held out: 18 train (local-samples = 0: all of them), 12 evaluate.
    assert all(r["train-loss"] is not None and r["eval-replies"] == 2 and r["eval-rows"] == 12 for r in rows[1:])
    assert all(0 <= r["fed-accuracy"] <= 1 and 0 <= r["fed-macro-f1"] <= 1 and r["fed-loss"] > 0 for r in rows[1:])
    assert all(r["eval-bytes-down"] > 0 for r in rows[1:]) and summary["eval-mb"] > 0
    assert summary["final-fed-accuracy"] == rows[-1]["fed-accuracy"]
    assert sum(rows[-1]["model-ranks"].values()) == rows[-1]["budget"]  # ranks logged without evaluating
    assert RunFolder(run_dir).config()["label-names"] == LABELS
    assert (run_dir / "adapter" / "adapter_config.json").exists()


def lora_message(config: RunConfig, server_round: int = 1) -> Message:
    """The message a node gets in a LoRA round, made by the round plan from the initial global state."""
    resources = node_resources(config, {"partition-id": 0, "num-partitions": 2}, tuple(LABELS))
    shapes = module_shapes(resources.base_model, [m for m in dict(resources.base_model.named_modules())
                                                  if m.endswith((".query", ".value"))])
    head = {k: v for k, v in resources.base_model.named_parameters() if k.startswith("classifier.")}
    plan = plan_round(config.effective, server_round, {pl.key(pl.HEAD, k): v.detach() for k, v in head.items()},
                      shapes)
    tensors = {pl.key(pl.HEAD, k): v.detach() for k, v in head.items()}
    for m, (b, a) in plan.factors.items():
        tensors[pl.key(pl.LORA_B, m)], tensors[pl.key(pl.LORA_A, m)] = b, a
    content = RecordDict({ARRAYS: pl.pack(pl.to_wire(tensors, list(plan.ranks))),
                          "config": plan.round_config(config.lora_scale, "float32", LABELS).to_record()})
    message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=100)
    message.metadata.__dict__["_message_id"] = message.object_id
    return message, plan, shapes


def test_train_handler_returns_factors_at_the_sent_ranks(run_config):
    config = RunConfig.from_mapping(run_config(local_samples=8))
    message, plan, shapes = lora_message(config)
    context = Context(run_id=1, node_id=100, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=run_config(local_samples=8))
    reply = client_app.train_handler(message, context)
    arrays = pl.unpack(reply.content[ARRAYS])
    assert set(arrays) == {pl.PACKED, "head::classifier.weight", "head::classifier.bias"}
    assert arrays[pl.PACKED].numel() == pl.packed_size(plan.ranks, shapes)
    factors = pl.lora_factors(pl.from_wire(arrays, plan.ranks, shapes))
    module = next(iter(plan.factors))
    assert not torch.equal(factors[module][0], plan.factors[module][0])  # B left zero: it trained
    metrics = reply.content[METRICS]
    assert metrics["num-examples"] == 8 and metrics["train-loss"] > 0


def test_train_handler_refuses_a_round_config_whose_lists_disagree(run_config):
    config = RunConfig.from_mapping(run_config())
    message, _, _ = lora_message(config)
    message.content["config"]["lora-ranks"] = list(message.content["config"]["lora-ranks"])[:-1]
    context = Context(run_id=1, node_id=100, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=run_config())
    with pytest.raises(pl.PayloadError, match="announces 12 LoRA modules but 11 ranks"):
        client_app.train_handler(message, context)


def test_evaluate_handler_scores_the_held_out_rows_that_training_never_uses(run_config, tmp_path):
    local_csv = tmp_path / "local.csv"
    local_csv.write_text("text,label\n" + "".join(f"reading {k} is {'fine' if k % 2 else 'off'},"
                                                  f"{'positive' if k % 2 else 'negative'}\n" for k in range(24)))
    settings = run_config(local_samples=0, fraction_evaluate=1.0, eval_fraction=0.25)
    message, _, _ = lora_message(RunConfig.from_mapping(settings))
    context = Context(run_id=1, node_id=100, node_config={"data-path": str(local_csv)}, state=RecordDict(),
                      run_config=settings)
    trained_reply = client_app.train_handler(message, context)
    evaluated = client_app.evaluate_handler(message, context)
    # 6 of the 24 rows are held out; local-samples = 0 trains on every other row.
    assert trained_reply.content["metrics"]["num-examples"] == 18
    metrics = evaluated.content["metrics"]
    assert metrics["num-examples"] == 6 and "arrays" not in evaluated.content
    assert evaluation_problem(evaluated.content, max_num_examples=24) is None
    # The half-and-half file: a model that has barely trained scores near chance, not 0 or 1 on every row.
    assert 0 <= metrics["accuracy"] <= 1 and metrics["loss"] > 0


def test_a_node_too_small_to_hold_rows_out_says_so(run_config, tmp_path):
    local_csv = tmp_path / "one.csv"
    local_csv.write_text("text,label\none reading,positive\nanother reading,negative\n")
    settings = run_config(fraction_evaluate=1.0, eval_fraction=0.9)
    message, _, _ = lora_message(RunConfig.from_mapping(settings))
    context = Context(run_id=1, node_id=100, node_config={"data-path": str(local_csv)}, state=RecordDict(),
                      run_config=settings)
    with pytest.raises(DataError, match=r"eval-fraction = 0.9: 2 row\(s\) cannot be split .* too small"):
        client_app.evaluate_handler(message, context)


def test_a_node_capped_at_rank_2_trains_at_rank_2_while_the_global_adapter_keeps_rank_8(run_config, finished_run):
    """Node 101 declares max-rank = 2 (node-config): every LoRA message to it carries at most rank 2, and the
    global adapter still holds rank-8 modules from the uncapped node."""
    nodes = [{"partition-id": 0, "num-partitions": 2}, {"partition-id": 1, "num-partitions": 2, "max-rank": 2}]
    _, rows, summary = run_server(run_config(num_server_rounds=2, run_name="capped"), node_configs=nodes)
    assert all(r["replies"] == 2 and r["capped"] == 1 for r in rows[1:])
    assert max(rows[1]["model-ranks"].values()) == 8 and max(rows[2]["model-ranks"].values()) > 2
    _, _, uncapped, _ = finished_run(num_server_rounds=2)
    assert rows[1]["bytes-down"] < uncapped[1]["bytes-down"] and rows[1]["bytes-up"] < uncapped[1]["bytes-up"]


def test_a_capped_node_refuses_ranks_above_its_cap_and_reports_its_limits(run_config):
    config = RunConfig.from_mapping(run_config())
    message, _, _ = lora_message(config)  # rank 8
    node_config = {"partition-id": 0, "num-partitions": 2, "max-rank": 2}
    context = Context(run_id=1, node_id=100, node_config=node_config, state=RecordDict(), run_config=run_config())
    with pytest.raises(pl.PayloadError, match="the server sent rank 8, above this node's max-rank = 2"):
        client_app.train_handler(message, context)
    query = Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=100)
    query.metadata.__dict__["_message_id"] = query.object_id
    limits = client_app.limits_handler(query, context).content["limits"]
    assert limits["max-rank"] == 2 and limits["name"] == "partition-0"  # the server samples by the name
    context.node_config["node-name"] = "clinic-a"
    assert client_app.limits_handler(query, context).content["limits"]["name"] == "clinic-a"
    context.node_config["max-rank"] = "two"
    with pytest.raises(ConfigError, match="node-config max-rank = 'two' is not allowed"):
        client_app.limits_handler(query, context)
    simulated = Context(run_id=1, node_id=100, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
                        run_config=run_config(partition_max_rank="0,2"))  # a simulated node has no node-config cap
    assert client_app.limits_handler(query, simulated).content["limits"]["max-rank"] == 2
    with pytest.raises(pl.PayloadError, match="above this node's max-rank = 2"):
        client_app.train_handler(message, simulated)


def test_nodes_that_drop_out_are_dropped_and_the_round_aggregates_the_rest(run_config, caplog):
    """sim-dropout = 0.5 over 3 nodes and 2 rounds: the seeded draw fails a node in round 2 (seed 42); that round
    aggregates the nodes that replied."""
    import random

    from safedlora_app.core.seeds import Stream, mix_seed

    config = run_config(num_server_rounds=2, run_name="dropout", sim_dropout=0.5, min_nodes=3)
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    _, rows, summary = run_server(config, node_configs=nodes)
    fails = [sum(random.Random(mix_seed(config["seed"], r, p, Stream.DROPOUT)).random() < 0.5 for p in range(3))
             for r in (1, 2)]
    assert fails == [0, 1]
    assert [(r["replies"], r["dropped"]) for r in rows[1:]] == [(3, 0), (2, 1)]
    assert rows[2]["bytes-up"] < rows[2]["bytes-down"]  # the node that dropped out got the model, sent nothing
    assert summary["rounds"] == 2 and "drops out (sim-dropout = 0.5)" in caplog.text
