"""SA-FedLoRA strategy: Flower's FedAvg with the round plan, per-node payloads and validated replies.

The global ``ArrayRecord`` that Flower passes between rounds holds ``head::*`` always,
``backbone::*`` once the backbone is trained (full fine-tuning rounds), and ``lora_A::m`` /
``lora_B::m`` once a LoRA round has been aggregated. What each round sends is the round plan
(:mod:`~safedlora_app.round_plan`); how replies combine is :mod:`~safedlora_app.aggregation`.
The hooks here only sample nodes, address messages, check replies and count bytes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from . import payload as pl
from .aggregation import aggregate_round, reply_metrics
from .config import RunConfig
from .outputs import RoundLog, RoundStats
from .replies import screen
from .round_plan import FULL, RoundPlan, plan_round
from .seeds import mix_seed


class NotEnoughNodes(RuntimeError):
    """Fewer than ``min-nodes`` nodes stayed connected for ``node-wait-timeout`` seconds."""


class SAFedLoRA(FedAvg):
    """Staged, budgeted federated LoRA (and the full fine-tuning baselines) on Flower's FedAvg.

    Parameters
    ----------
    config : RunConfig
        The *effective* run config (``RunConfig.effective``: method presets applied).
    module_shapes : mapping
        ``{module: (d_out, d_in)}`` of every adapted Linear layer, in a fixed order.
    expected_full : mapping
        ``{wire key: shape}`` of a full round's reply (every ``backbone::`` and ``head::`` tensor).
    rounds : RoundLog, optional
        Where each round's figures go (the ServerApp passes its ``RunRecorder``).
    first_round : int
        The run's round that Flower's round 1 is (> 1 when a run resumes from a checkpoint).
    node_backbone : mapping, optional
        Node id -> the trained backbone's hash the node holds (from a checkpoint).
    """

    def __init__(self, config: RunConfig, module_shapes: Mapping[str, tuple[int, int]],
                 expected_full: Mapping[str, tuple[int, ...]], rounds: RoundLog | None = None,
                 first_round: int = 1, node_backbone: Mapping[int, str] | None = None):
        super().__init__(fraction_train=config.fraction_train, fraction_evaluate=0.0,
                         min_train_nodes=config.min_nodes, min_available_nodes=config.min_nodes)
        self.config, self.module_shapes, self.expected_full = config, dict(module_shapes), dict(expected_full)
        self.rounds = rounds if rounds is not None else RoundLog()
        self.offset = first_round - 1
        self.node_backbone: dict[int, str] = dict(node_backbone or {})  # checkpointed by the ServerApp
        # The round in flight: its plan, the global tensors it started from, the reply shapes, the backbone hash.
        self._round: tuple[RoundPlan, dict[str, torch.Tensor], dict[str, tuple[int, ...]], str]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One message per sampled node: the round's payload and its own copy of the config."""
        server_round += self.offset
        node_ids = self._sample_nodes(server_round, grid)
        tensors = pl.unpack(arrays)
        plan = plan_round(self.config, server_round, tensors, self.module_shapes)
        stats = self.rounds.start(RoundStats(round=server_round, stage=plan.stage, kind=plan.kind,
                                             budget=plan.budget, ranks=plan.ranks, nodes=len(node_ids),
                                             revived=plan.revived))
        round_config = {**dict(config), **plan.train_config(self.config.lora_scale, self.config.wire_dtype)}
        backbone = pl.only(tensors, pl.BACKBONE)
        if plan.kind == FULL:
            shared, expected, backbone_hash, backbone = arrays, self.expected_full, "", {}
        else:
            wire = plan.lora_payload(tensors)
            shared, expected = pl.pack(wire, self.config.wire_dtype), {k: tuple(v.shape) for k, v in wire.items()}
            # What the node hashes on arrival (bare parameter names); '' = the pre-trained backbone.
            backbone_hash = pl.tensors_hash(pl.select(tensors, pl.BACKBONE)) if backbone else ""
            round_config["backbone-hash"] = backbone_hash
        messages, with_backbone = [], None
        for node_id in node_ids:
            record = shared
            if backbone and self.node_backbone.get(node_id) != backbone_hash:  # once per node
                with_backbone = with_backbone or ArrayRecord({**shared, **pl.pack(backbone)})
                record = with_backbone
                stats.backbone_sends += 1
            stats.bytes_down += record.count_bytes()
            stats.params_down += pl.num_parameters(record)
            content = RecordDict({pl.ARRAYS: record, "config": ConfigRecord(dict(round_config))})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
        self._round, self._sent = (plan, tensors, expected, backbone_hash), messages
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, drop the bad ones, aggregate the rest.

        Returns ``(None, None)`` when nothing valid arrived: Flower then keeps the previous
        global arrays, so a bad round never corrupts the model.
        """
        server_round += self.offset
        plan, previous, expected, backbone_hash = self._round
        stats, start = self.rounds.current, time.perf_counter()
        # Only a *trained* backbone needs the node's confirmation; every node has the pre-trained one.
        screened = screen(self._sent, list(replies), expected, max_num_examples=self.config.max_num_examples,
                          backbone_hash=backbone_hash or None)
        stats.bytes_up, stats.params_up = screened.bytes_up, screened.params_up
        if screened.lost:  # no reply before the round's deadline: a node lost mid-round, or one that hangs
            log(WARNING, "round %d: no reply from node(s) %s before the round timeout", server_round, screened.lost)
        for node_id, problem, failed in screened.dropped:
            log(WARNING, "round %d: dropped the reply of node %d: %s", server_round, node_id, problem)
            if failed:
                self.node_backbone.pop(node_id, None)  # resend the backbone in case its cache is gone
        self.node_backbone.update({node_id: backbone_hash for node_id, _ in screened.valid if backbone_hash})
        good = [content for _, content in screened.valid]
        stats.replies, stats.dropped = len(good), len(screened.dropped) + len(screened.lost)
        if not good:
            log(WARNING, "round %d: no valid reply; the global model is unchanged", server_round)
            return None, None
        weights = [float(content[pl.METRICS]["num-examples"]) for content in good]
        received = [pl.from_wire(pl.unpack(c[pl.ARRAYS]), plan.ranks, self.module_shapes) for c in good]
        new, diagnostics = aggregate_round(self.config, plan, received, weights, previous)
        metrics = reply_metrics([c[pl.METRICS] for c in good], weights)
        stats.train_loss, stats.train_seconds, stats.peak_memory_mb, stats.first_step_a_ratio = (
            metrics.get(k) for k in ("train-loss", "train-time", "peak-memory-mb", "first-step-a-ratio"))
        stats.dropped_update, stats.factor_norms = diagnostics["dropped_update"], diagnostics["factor_norms"]
        stats.aggregate_seconds = time.perf_counter() - start
        return pl.pack(new), MetricRecord(metrics)

    def summary(self) -> None:
        c = self.config
        log(INFO, "\t└──> SA-FedLoRA: method=%s, %d modules, ranks %d..%d (%s), init-rounds=%d (%s), %s, %s",
            c.method, len(self.module_shapes), c.rank_min, c.rank_max, c.schedule, c.init_rounds, c.init_trainable,
            c.allocation, c.aggregation)

    def _sample_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """Wait (bounded) for ``min-nodes`` nodes, then sample reproducibly for the round."""
        deadline = time.monotonic() + self.config.node_wait_timeout
        while len(node_ids := sorted(grid.get_node_ids())) < self.config.min_nodes:
            if time.monotonic() > deadline:
                raise NotEnoughNodes(
                    f"round {server_round}: only {len(node_ids)} node(s) connected after "
                    f"node-wait-timeout = {self.config.node_wait_timeout} s; min-nodes = {self.config.min_nodes}")
            log(INFO, "round %d: waiting for nodes (%d of %d connected)", server_round, len(node_ids),
                self.config.min_nodes)
            time.sleep(1.0)
        size = self.config.clients_per_round(len(node_ids))
        return sorted(random.Random(mix_seed(self.config.seed, server_round, 0)).sample(node_ids, size))
