"""Full rounds (fedavg, fedprox, ``init-trainable = full``): what of a model travels, and at which precision.

A full round moves every parameter and the floating-point buffers of the model's state dict (BatchNorm's running
statistics), nothing else, in the run's ``wire-dtype``; the server aggregates them in float32 and rebuilds the
model from them.
"""

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from support.runs import LABELS
from torch import nn
from transformers import LevitConfig, LevitForImageClassification, LlamaConfig, LlamaForCausalLM, ViTImageProcessor

from safedlora_app import client_app
from safedlora_app.client.node_resources import node_resources
from safedlora_app.core import payload as pl
from safedlora_app.core.config import RunConfig
from safedlora_app.core.model import ModelError, full_state, head_parameters, load_parameters
from safedlora_app.core.records import ARRAYS
from safedlora_app.core.round_plan import initial_tensors
from safedlora_app.server.global_model import GlobalModel
from safedlora_app.server.strategy import SAFedLoRA
from safedlora_app.tasks import load_base_model, load_task_data

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py


class TinyBatchNorm(nn.Module):
    """A BatchNorm layer in the body and one in the head, and a non-persistent float buffer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.classifier = nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2))
        self.register_buffer("scale", torch.ones(1), persistent=False)  # rebuilt by the model: never sent

    def forward(self, x):
        return self.classifier(self.body(x)) * self.scale


class Nodes:
    """Connected nodes for a full round (no limits query: full rounds send every node the same model)."""

    def __init__(self, *node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def full_round(strategy, state, nodes=(11, 22), labels=LABELS):
    """Round 1's messages from the initial global state (``full_state`` of the server's model)."""
    messages = list(strategy.configure_train(1, pl.pack(initial_tensors(strategy.config, state)),
                                             ConfigRecord({"label-names": list(labels)}), Nodes(*nodes)))
    for message in messages:  # what the Grid does when it pushes
        message.metadata.__dict__["_message_id"] = message.object_id
    return messages


def stats_reply(message, model, num_examples):
    """A node's float16 reply: the update of ``model``'s full state against what ``message`` sent."""
    sent = pl.unpack(message.content[ARRAYS])
    trained = full_state(model, head_parameters(model, ["classifier"]))
    arrays = pl.pack({k: v - sent[k] for k, v in trained.items()}, "float16")
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": num_examples}),
                               "node": ConfigRecord({"backbone-hash": ""})}), reply_to=message)


def test_full_state_carries_the_running_statistics_and_no_counter_or_rebuilt_buffer():
    model = TinyBatchNorm()
    state = full_state(model, head_parameters(model, ["classifier"]))
    assert set(state) == {
        "backbone::body.0.weight", "backbone::body.0.bias", "backbone::body.1.weight", "backbone::body.1.bias",
        "backbone::body.1.running_mean", "backbone::body.1.running_var",
        "head::classifier.0.weight", "head::classifier.0.bias", "head::classifier.1.weight",
        "head::classifier.1.bias", "head::classifier.1.running_mean", "head::classifier.1.running_var"}
    # ... and they load back, into the buffers themselves.
    fresh = TinyBatchNorm()
    load_parameters(fresh, {"body.1.running_mean": torch.full((4,), 2.0), "classifier.1.running_var": torch.full(
        (2,), 3.0, dtype=torch.float16)})
    assert torch.equal(fresh.body[1].running_mean, torch.full((4,), 2.0))
    assert fresh.classifier[1].running_var.dtype == torch.float32  # a float16 wire loads into the model's dtype
    with pytest.raises(ModelError, match=r"neither parameters nor floating-point buffers.*num_batches_tracked"):
        load_parameters(fresh, {"body.1.num_batches_tracked": torch.tensor(1)})


def test_text_models_send_their_parameters_and_nothing_more():
    """The default MiniLM (integer and non-persistent buffers only) and a LLaMA (float rotary frequencies, not
    persistent): exactly their parameters travel, as before BatchNorm statistics did."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert any(b.is_floating_point() for b in llama.buffers())  # rotary inv_freq: rebuilt, so never sent
    minilm = load_base_model("", "text-classification", LABELS, seed=0)
    for model, heads in ((minilm, ["classifier"]), (llama, [])):
        names = head_parameters(model, heads)
        state = full_state(model, names)
        expected = {pl.key(pl.HEAD if n in names else pl.BACKBONE, n) for n, _ in model.named_parameters()}
        assert set(state) == expected


def test_a_full_round_averages_the_running_statistics_and_the_global_model_has_them():
    config = RunConfig(method="fedavg", num_server_rounds=1, min_nodes=2, wire_dtype="float16").effective
    torch.manual_seed(0)
    base = TinyBatchNorm().eval()
    state = full_state(base, head_parameters(base, ["classifier"]))
    strategy = SAFedLoRA(config, {}, {k: tuple(v.shape) for k, v in state.items()})
    messages = full_round(strategy, state)
    assert "backbone::body.1.running_mean" in messages[0].content[ARRAYS]  # the pre-trained statistics go down
    nodes = []
    for shift, message in zip((1.0, 5.0), messages):  # each node sees other data: other statistics
        node = TinyBatchNorm()
        received = pl.unpack(message.content[ARRAYS])
        load_parameters(node, {**pl.bare(received, pl.BACKBONE), **pl.bare(received, pl.HEAD)})
        node.train()(torch.randn(64, 3, generator=torch.Generator().manual_seed(int(shift))) + shift)
        nodes.append(node)
    arrays, _ = strategy.aggregate_train(1, [stats_reply(m, n, w) for m, n, w in zip(messages, nodes, (30, 10))])
    assert strategy.rounds.current.replies == 2
    got, sent = pl.unpack(arrays), pl.unpack(messages[0].content[ARRAYS])
    rebuilt, _ = GlobalModel(base, config, {}, ["classifier"]).build(1, arrays)
    for kind, layer in ((pl.BACKBONE, "body.1"), (pl.HEAD, "classifier.1")):
        for stat in ("running_mean", "running_var"):
            key = pl.key(kind, f"{layer}.{stat}")
            v0, v1 = (getattr(n.get_submodule(layer), stat) for n in nodes)
            d0, d1 = v0 - sent[key], v1 - sent[key]  # each node's update against what it was sent
            want, mean = state[key] + 0.75 * d0 + 0.25 * d1, got[key]
            # float16 rounds each update to 11 significant bits; the float32 sum adds at most 2^-23 of the result.
            bound = 2 ** -11 * (0.75 * d0.abs() + 0.25 * d1.abs()) + 2 ** -23 * want.abs() + 2 ** -25
            assert ((mean - want).abs() <= bound).all() and not torch.equal(v0, v1)
            assert torch.equal(getattr(rebuilt.get_submodule(layer), stat), mean)


@pytest.fixture(scope="module")
def tiny_levit_dir(tmp_path_factory):
    """A small random LeViT (BatchNorm after every Linear layer, and in its head) saved like a hub checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-levit")
    LevitForImageClassification(LevitConfig(
        image_size=32, patch_size=16, stride=2, kernel_size=3, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 1, 1],
        depths=[1, 1, 1], key_dim=[8, 8, 8], num_labels=3)).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_a_node_trains_a_batchnorm_model_and_returns_its_statistics_in_the_wire_dtype(
        run_config, tiny_levit_dir, digits_folder):
    settings = run_config(method="fedavg", task="image-classification", model_name=str(tiny_levit_dir),
                          dataset_name=str(digits_folder), target_modules="linear", partitioner="iid",
                          local_samples=8, min_nodes=1)
    config = RunConfig.from_mapping(settings)
    labels = load_task_data(str(digits_folder), task="image-classification", test_size=config.test_size).label_names
    base = node_resources(config, {"partition-id": 0, "num-partitions": 2}, tuple(labels)).base_model
    state = full_state(base, head_parameters(base, ["classifier"]))
    strategy = SAFedLoRA(config.effective, {}, {k: tuple(v.shape) for k, v in state.items()})
    message = full_round(strategy, state, nodes=(100,), labels=labels)[0]
    context = Context(run_id=1, node_id=100, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=settings)
    reply = client_app.train_handler(message, context)
    returned = reply.content[ARRAYS]
    assert {array.dtype for array in returned.values()} == {"float16"}  # wire-dtype's default
    got = pl.unpack(returned)
    variances = [k for k in returned if k.endswith(".running_var")]
    assert "head::classifier.batch_norm.running_var" in variances and len(variances) > 10
    assert {k.replace("running_var", "running_mean") for k in variances} <= set(returned)
    # Training moved them: the reply holds updates (variances: most means here are ~1e-10, under float16's range,
    # behind an earlier BatchNorm).
    assert all(bool(got[k].abs().sum() > 0) for k in variances)
    arrays, _ = strategy.aggregate_train(1, [reply])
    assert strategy.rounds.current.replies == 1
    rebuilt, _ = GlobalModel(base, config.effective, {}, ["classifier"]).build(1, arrays)
    key = "backbone::levit.patch_embeddings.embedding_layer_1.batch_norm.running_var"
    assert torch.equal(pl.unpack(arrays)[key], state[key] + got[key])  # the model sent, plus the node's update
    assert torch.equal(rebuilt.get_submodule(key.split("::")[1].rsplit(".", 1)[0]).running_var, pl.unpack(arrays)[key])
