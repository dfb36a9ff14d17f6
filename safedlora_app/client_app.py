"""ClientApp: fine-tune on the node's data as the server's round config says, reply with the update.

``full`` rounds train every parameter (fedavg, fedprox, an ``init-trainable = full`` stage).
``lora`` rounds build peft LoRA at the ranks the server sent (``alpha = lora-scale * r`` per
module), train A, B and the head, and return them at exactly those ranks.
"""

from __future__ import annotations

import copy

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import payload as pl
from .config import RunConfig
from .model import (
    build_lora_model,
    full_state,
    get_lora_weights,
    head_parameters,
    load_parameters,
    module_shapes,
    pick_device,
    set_lora_weights,
)
from .node_resources import base_with_backbone, node_resources
from .payload import ARRAYS, METRICS, NODE
from .round_plan import FULL
from .seeds import mix_seed, sample_indices
from .training import compute_dtype, train

app = ClientApp()


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """One round of local training."""
    config = RunConfig.from_mapping(context.run_config).with_node_config(context.node_config).effective
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    round_config = msg.content["config"]
    server_round = int(round_config["server-round"])
    label_names = tuple(round_config["label-names"])
    resources = node_resources(config, dict(context.node_config), label_names)
    received = pl.unpack(msg.content[ARRAYS])
    head_modules = config.module_names(config.head_modules)
    device = pick_device()
    partition_id = int(context.node_config.get("partition-id", 0))
    sample_seed = mix_seed(config.seed, server_round, partition_id)
    indices = sample_indices(len(resources.data), config.local_samples, sample_seed)
    hyper = dict(epochs=config.local_epochs, batch_size=config.batch_size, grad_accum_steps=config.grad_accum_steps,
                 lr=float(round_config["lr"]), weight_decay=config.weight_decay,
                 prox_mu=float(round_config["prox-mu"]), seed=mix_seed(config.seed, server_round, partition_id, 1),
                 device=device, dtype=compute_dtype(config.precision, device), warmup_steps=config.warmup_steps,
                 optimizer_name=config.optimizer, momentum=config.momentum)

    # Dropout draws from torch's global generator: seed it per (run, round, node), so that a round gives the
    # same update whatever this process ran before (a resumed run repeats an uninterrupted one exactly).
    torch.manual_seed(mix_seed(config.seed, server_round, partition_id, 2))
    if round_config["kind"] == FULL:
        model = copy.deepcopy(resources.base_model)
        load_parameters(model, {**pl.select(received, pl.BACKBONE), **pl.select(received, pl.HEAD)})
        model.requires_grad_(True)
        result = train(model, resources.data, indices, **hyper)
        heads = head_parameters(model, head_modules)
        reply = full_state(model, heads)
        backbone_hash = ""
    else:
        backbone_hash = str(round_config["backbone-hash"])
        base = base_with_backbone(resources, backbone_hash, received, config.cache_dir)
        ranks = pl.announced_ranks(round_config["lora-modules"], round_config["lora-ranks"])
        received = pl.from_wire(received, ranks, module_shapes(base, list(ranks)))
        model = build_lora_model(base, ranks, float(round_config["lora-scale"]), config.lora_dropout, head_modules)
        head = pl.select(received, pl.HEAD)
        set_lora_weights(model, pl.lora_factors(received), head)
        result = train(model, resources.data, indices, **hyper)
        factors, new_head = get_lora_weights(model, list(ranks), list(head))
        reply = {pl.key(pl.HEAD, n): v for n, v in new_head.items()}
        for m, (b, a) in factors.items():
            reply[pl.key(pl.LORA_B, m)], reply[pl.key(pl.LORA_A, m)] = b, a
        reply = pl.to_wire(reply, list(ranks))
    wire_dtype = str(round_config.get("wire-dtype", "float32")) if round_config["kind"] != FULL else "float32"

    metrics = MetricRecord({"num-examples": result.num_examples, "train-loss": result.loss,
                            "train-time": result.seconds, "peak-memory-mb": result.peak_memory_mb})
    if result.first_step_a_ratio is not None:
        metrics["first-step-a-ratio"] = result.first_step_a_ratio
    content = RecordDict({ARRAYS: pl.pack(reply, wire_dtype), METRICS: metrics,
                          NODE: ConfigRecord({"backbone-hash": backbone_hash, "data": resources.partition_label})})
    return Message(content=content, reply_to=msg)
