"""A round on a node: fine-tune on the node's data as the server's round config says, reply with the update.

``full`` rounds train every parameter (fedavg, fedprox, an ``init-trainable = full`` stage) and return their update with
the model's running statistics (BatchNorm).
``lora`` rounds build peft LoRA at the ranks the server sent (``alpha = lora-scale * r`` per
module), train A, B and the head, and return them at exactly those ranks. With federated evaluation
(``fraction-evaluate > 0``) a node holds ``eval-fraction`` of its rows out of training for good, and
scores the global model it is sent on them. The ClientApp's handlers (``client_app``) call these.
"""

from __future__ import annotations

import copy
import random
import time
from logging import INFO

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from safedlora_app.client.node_resources import base_with_backbone, node_resources
from safedlora_app.core import payload as pl
from safedlora_app.core.config import RunConfig, node_max_rank
from safedlora_app.core.data import DataError
from safedlora_app.core.model import (
    build_lora_model,
    checkpoint_activations,
    freeze_lora_a,
    full_state,
    get_lora_weights,
    head_parameters,
    load_parameters,
    module_shapes,
    pick_device,
    set_lora_weights,
)
from safedlora_app.core.records import ARRAYS, CONFIG, METRICS, NODE, RoundConfig
from safedlora_app.core.round_plan import FULL, frozen_a
from safedlora_app.core.seeds import Stream, holdout_split, mix_seed, sample_indices
from safedlora_app.core.training import compute_dtype, train
from safedlora_app.tasks import get_task


class SimulatedDropout(RuntimeError):
    """The node fails its round on purpose (``sim-dropout``): Flower replies with an error, the server drops it."""


def _setup(msg: Message, context: Context):
    """``(config, round config, node resources, device, max-rank)`` of a message; resources are cached per
    process. A bad node-config ``max-rank`` fails every reply, naming the key."""
    config = RunConfig.from_mapping(context.run_config).with_node_config(context.node_config).effective
    max_rank = node_max_rank(context.node_config, config)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    round_config = RoundConfig.from_record(msg.content.get(CONFIG))
    resources = node_resources(config, dict(context.node_config), round_config.label_names)
    return config, round_config, resources, pick_device(), max_rank


def _local_rows(config: RunConfig, size: int, partition_id: int) -> tuple[list[int], list[int]]:
    """``(training rows, held-out rows)`` of the node's data: with federated evaluation on, ``eval-fraction``
    of the rows are held out by a fixed seed in every round, so they are never trained on."""
    fraction = config.eval_fraction if config.fraction_evaluate > 0 else 0.0
    try:
        return holdout_split(size, fraction, mix_seed(config.seed, partition_id, Stream.HOLDOUT))
    except ValueError as error:
        raise DataError(f"eval-fraction = {config.eval_fraction}: {error} (this node's data is too small)") from error


def _received_model(received: dict[str, torch.Tensor], round_config: RoundConfig, config: RunConfig, resources,
                    max_rank: int):
    """The model a message describes: a full model (full rounds), or peft LoRA at the announced ranks on
    the right frozen base (the pre-trained one, or a trained backbone the node caches)."""
    head_modules = config.module_names(config.head_modules)
    if round_config.kind == FULL:
        model = copy.deepcopy(resources.base_model)
        load_parameters(model, {**pl.bare(received, pl.BACKBONE), **pl.bare(received, pl.HEAD)})
        return model, {}
    base = base_with_backbone(resources, round_config.backbone_hash, received, config.cache_dir)
    ranks = pl.announced_ranks(round_config.lora_modules, round_config.lora_ranks)
    if max_rank and max(ranks.values(), default=0) > max_rank:
        raise pl.PayloadError(f"the server sent rank {max(ranks.values())}, above this node's max-rank = {max_rank}")
    shapes = module_shapes(base, list(ranks))
    received = pl.from_wire(received, ranks, shapes, round_config.lora_frozen_a)
    if round_config.lora_frozen_a:  # FFA-LoRA: A is regenerated here, exactly as the server planned it
        received.update({pl.key(pl.LORA_A, m): a for m, a in frozen_a(config, ranks, shapes).items()})
    model = build_lora_model(base, ranks, round_config.lora_scale, config.lora_dropout, head_modules)
    head = pl.bare(received, pl.HEAD)
    set_lora_weights(model, pl.lora_factors(received), head)
    if round_config.lora_frozen_a:
        freeze_lora_a(model)
    return model, ranks


def _node_record(round_config: RoundConfig, resources) -> ConfigRecord:
    """What the node tells the server about itself: the backbone it used and where its data came from."""
    backbone_hash = round_config.backbone_hash if round_config.kind != FULL else ""
    return ConfigRecord({"backbone-hash": backbone_hash, "data": resources.partition_label})


def train_reply(msg: Message, context: Context) -> Message:
    """One round of local training: the reply with the trained update and its metrics."""
    started, started_at = time.perf_counter(), time.time()
    config, round_config, resources, device, max_rank = _setup(msg, context)
    server_round = round_config.server_round
    partition_id = int(context.node_config.get("partition-id", 0))
    if config.sim_dropout and random.Random(mix_seed(config.seed, server_round, partition_id, Stream.DROPOUT)
                                            ).random() < config.sim_dropout:
        raise SimulatedDropout(f"round {server_round}: partition {partition_id} drops out (sim-dropout = "
                               f"{config.sim_dropout})")
    rows, _ = _local_rows(config, len(resources.data), partition_id)
    sample_seed = mix_seed(config.seed, server_round, partition_id)
    indices = [rows[i] for i in sample_indices(len(rows), config.local_samples, sample_seed)]
    hyper = dict(epochs=config.local_epochs, batch_size=config.batch_size, grad_accum_steps=config.grad_accum_steps,
                 lr=round_config.lr, weight_decay=config.weight_decay, prox_mu=round_config.prox_mu,
                 seed=mix_seed(config.seed, server_round, partition_id, Stream.TRAINING),
                 device=device, dtype=compute_dtype(config.precision, device), warmup_steps=config.warmup_steps,
                 optimizer_name=config.optimizer, momentum=config.momentum)

    # Dropout draws from torch's global generator: seed it per (run, round, node), so that a round gives the
    # same update whatever this process ran before (a resumed run repeats an uninterrupted one exactly).
    torch.manual_seed(mix_seed(config.seed, server_round, partition_id, Stream.INITIALISATION))
    received = pl.unpack(msg.content[ARRAYS])
    model, ranks = _received_model(received, round_config, config, resources, max_rank)
    if config.gradient_checkpointing:
        checkpoint_activations(model)
    if round_config.kind == FULL:
        model.requires_grad_(True)
        result = train(model, resources.data, indices, **hyper)
        trained = full_state(model, head_parameters(model, config.module_names(config.head_modules)))
        # The update, not the weights: float16 on the wire would round an update of 1e-5 away on a weight of
        # ~0.05 (its spacing there is 3e-5); the server adds the mean update to its float32 model.
        reply = {k: v.float() - received[k].float() for k, v in trained.items()}
    else:
        result = train(model, resources.data, indices, **hyper)
        factors, new_head = get_lora_weights(model, list(ranks), list(pl.bare(received, pl.HEAD)))
        reply = {pl.key(pl.HEAD, n): v for n, v in new_head.items()}
        for m, (b, a) in factors.items():
            reply[pl.key(pl.LORA_B, m)], reply[pl.key(pl.LORA_A, m)] = b, a
        reply = pl.to_wire(reply, list(ranks), round_config.lora_frozen_a)

    metrics = MetricRecord({"num-examples": result.num_examples, "train-loss": result.loss,
                            "train-time": result.seconds, "peak-memory-mb": result.peak_memory_mb})
    if result.first_step_a_ratio is not None:
        metrics["first-step-a-ratio"] = result.first_step_a_ratio
    # The node's own record of its round (its log is all a device owner sees of it).
    log(INFO, "round %d: trained %d samples in %.1f s (%.3f s per sample, %s), peak memory %.0f MB", server_round,
        result.num_examples, result.seconds, result.seconds / max(result.num_examples, 1),
        str(hyper["dtype"]).removeprefix("torch."), result.peak_memory_mb)
    arrays = pl.pack(reply, round_config.wire_dtype)  # as the server checks the reply
    metrics["client-time"] = time.perf_counter() - started  # the handler's whole time, training included
    # Wall-clock times (seconds since the epoch): whether the round's nodes worked at once (server.outputs).
    metrics["start-time"], metrics["end-time"] = started_at, time.time()
    return Message(content=RecordDict({ARRAYS: arrays, METRICS: metrics, NODE: _node_record(round_config, resources)}),
                   reply_to=msg)


def evaluate_reply(msg: Message, context: Context) -> Message:
    """Federated evaluation: the round's global model on this node's held-out rows (never trained on)."""
    config, round_config, resources, device, max_rank = _setup(msg, context)
    _, held_out = _local_rows(config, len(resources.data), int(context.node_config.get("partition-id", 0)))
    model, ranks = _received_model(pl.unpack(msg.content[ARRAYS]), round_config, config, resources, max_rank)
    if ranks:  # the LoRA update folded into the weights: the same logits, no adapter branch to compute
        model = model.merge_and_unload()
    result = get_task(config.task).evaluate(
        model, resources.data.subset(held_out), batch_size=config.eval_batch_size,
        num_classes=len(round_config.label_names), device=device, dtype=compute_dtype(config.precision, device))
    metrics = MetricRecord({"num-examples": len(held_out), **result})
    return Message(content=RecordDict({METRICS: metrics, NODE: _node_record(round_config, resources)}),
                   reply_to=msg)
