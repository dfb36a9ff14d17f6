"""SA-FedLoRA strategy: initiating stage, then budget-annealed LoRA with exact aggregation.

The global ``ArrayRecord`` that Flower passes between rounds holds:
- ``head::*`` always;
- ``backbone::*`` once the backbone is trained (full fine-tuning rounds);
- ``lora_A::m`` / ``lora_B::m`` once a LoRA round has been aggregated. With
  ``aggregation = "product"`` they are in balanced SVD form with at most ``rank-max``
  components; with ``"fedavg"`` they are the raw averaged factors (as FedIT keeps them).

Each LoRA round allocates the round's budget over modules, truncates, revives dead components,
and sends every sampled node only the truncated factors + head (+ the trained backbone, once
per node). Replies are validated against exactly what each node was sent.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from . import adapter_math as am
from . import payload as pl
from .config import RunConfig
from .replies import ARRAYS, METRICS, reply_problem
from .schedule import round_budget, round_lr_factor
from .training import mix_seed

FULL, LORA = "full", "lora"


@dataclass
class RoundStats:
    """What one round sent and received (for metrics.jsonl and the round's log line)."""

    round: int
    stage: str
    kind: str
    budget: int | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    nodes: int = 0
    replies: int = 0
    dropped: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    params_down: int = 0
    params_up: int = 0
    backbone_sends: int = 0
    revived: int = 0
    train_loss: float | None = None
    train_seconds: float | None = None
    peak_memory_mb: float | None = None
    aggregate_seconds: float = 0.0
    first_step_a_ratio: float | None = None
    dropped_update: float | None = None
    """Share of the round's mean update (sum over modules, squared Frobenius) that truncation to rank-max dropped."""
    factor_norms: dict[str, float] = field(default_factory=dict)
    """``||B||_F`` and ``||A||_F`` of the first module's global factors after aggregation."""


class SAFedLoRA(FedAvg):
    """Staged, budgeted federated LoRA (and the full fine-tuning baselines) on Flower's FedAvg.

    Parameters
    ----------
    config : RunConfig
        The *effective* run config (``RunConfig.effective``: method presets applied).
    module_shapes : mapping
        ``{module: (d_out, d_in)}`` of every adapted Linear layer, in a fixed order.
    head_shapes : mapping
        ``{head parameter: shape}``.
    backbone_shapes : mapping
        ``{backbone parameter: shape}`` (every non-head parameter).
    """

    def __init__(self, config: RunConfig, module_shapes: Mapping[str, tuple[int, int]],
                 head_shapes: Mapping[str, tuple[int, ...]], backbone_shapes: Mapping[str, tuple[int, ...]]):
        super().__init__(fraction_train=config.fraction_train, fraction_evaluate=0.0,
                         min_train_nodes=config.min_nodes, min_available_nodes=config.min_nodes)
        self.config = config
        self.module_shapes = dict(module_shapes)
        self.head_shapes = dict(head_shapes)
        self.backbone_shapes = dict(backbone_shapes)
        self.b_max = config.rank_max * len(module_shapes)
        self.b_min = config.rank_min * len(module_shapes)
        self.node_backbone: dict[int, str] = {}  # node id -> backbone hash it holds on disk
        self.history: list[RoundStats] = []
        self._sent: list[Message] = []
        self._expected: dict[str, tuple[int, ...]] = {}
        self._round_backbone: str | None = None
        self._backbone_hash_cache: tuple[int, str] | None = None
        self._current: dict[str, torch.Tensor] = {}  # the global state this round started from
        self._sent_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # what every node started from

    # --- Round plan ------------------------------------------------------------------------
    def round_kind(self, server_round: int) -> str:
        """``full`` for full fine-tuning rounds, else ``lora``."""
        c = self.config
        return FULL if server_round <= c.init_rounds and c.init_trainable == FULL else LORA

    def stage(self, server_round: int) -> str:
        """``initiating`` or ``annealing`` (the baselines are reported as ``training``)."""
        if self.config.method != "sa-fedlora":
            return "training"
        return "initiating" if server_round <= self.config.init_rounds else "annealing"

    def budget(self, server_round: int) -> int:
        """Total LoRA rank for a round (b_max while initiating)."""
        c = self.config
        return round_budget(server_round, c.num_server_rounds, c.init_rounds, c.heat_rounds, c.cool_rounds,
                            self.b_max, self.b_min, c.schedule)

    def initial_arrays(self, model_state: Mapping[str, torch.Tensor]) -> ArrayRecord:
        """Round-0 global state: the head, plus the pre-trained backbone if any round is full.

        ``model_state`` is ``model.full_state(base)``. LoRA starts empty: every component is
        dead and gets revived (random A, zero B) when first sent, i.e. peft's default init.
        """
        needs_backbone = self.round_kind(1) == FULL
        backbone = pl.only(model_state, pl.BACKBONE) if needs_backbone else {}
        return pl.pack({**pl.only(model_state, pl.HEAD), **backbone})

    # --- Global adapter views ----------------------------------------------------------------
    def stored_factors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (B, A)}`` for every adapted module (rank 0 where nothing is stored yet)."""
        stored = pl.lora_factors(tensors)
        return {m: stored.get(m, (torch.zeros(d_out, 0), torch.zeros(0, d_in)))
                for m, (d_out, d_in) in self.module_shapes.items()}

    def allocate(self, server_round: int, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, int]:
        """Per-module ranks for the round's budget (global threshold or uniform)."""
        sigmas = {m: (am.singular_values(b, a) if b.shape[1] else torch.zeros(0)) for m, (b, a) in factors.items()}
        c = self.config
        return am.allocate_ranks(sigmas, self.budget(server_round), floor=c.rank_floor, cap=c.rank_max,
                                 uniform=c.allocation == "uniform")

    def truncated(self, server_round: int, tensors: Mapping[str, torch.Tensor]
                  ) -> tuple[dict[str, int], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """The global adapter at the round's allocation: ``(ranks, {module: (B, A)})``.

        Balanced SVD form is truncated by slicing; raw (``fedavg``-aggregated) factors are
        re-factored first when they must shrink, so truncation is still the best at that rank.
        """
        factors = self.stored_factors(tensors)
        ranks = self.allocate(server_round, factors)
        out = {}
        for m, (b, a) in factors.items():
            if self.config.aggregation == "fedavg" and ranks[m] < b.shape[1]:
                b, a = am.refactor(b, a, ranks[m], self.config.factor_form)
            out[m] = am.resize(b, a, ranks[m])
        return ranks, out

    def backbone_hash(self, server_round: int, tensors: Mapping[str, torch.Tensor]) -> str:
        """Content hash of the trained backbone ('' = the pre-trained one every node loads itself)."""
        backbone = pl.select(tensors, pl.BACKBONE)
        if not backbone:
            return ""
        if self._backbone_hash_cache is None or self._backbone_hash_cache[0] != server_round:
            self._backbone_hash_cache = (server_round, pl.tensors_hash(backbone))
        return self._backbone_hash_cache[1]

    # --- Flower hooks ------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One message per sampled node: the round's payload and its own copy of the config."""
        node_ids = self._sample_nodes(server_round, grid)
        kind = self.round_kind(server_round)
        stats = RoundStats(round=server_round, stage=self.stage(server_round), kind=kind, nodes=len(node_ids))
        self.history.append(stats)
        c = self.config
        initiating = server_round <= c.init_rounds
        round_config = {
            **dict(config),
            "server-round": server_round,
            "kind": kind,
            "prox-mu": c.prox_mu if initiating else c.prox_mu_anneal,
            "lr": (c.full_lr if kind == FULL else c.lr)
            * round_lr_factor(server_round, c.num_server_rounds, c.lr_decay, c.lr_final_ratio),
        }
        tensors = self._current = pl.unpack(arrays)
        backbone_payload: ArrayRecord | None = None
        if kind == FULL:
            shared = arrays
            self._round_backbone = None
            self._expected = {**{pl.key(pl.BACKBONE, n): s for n, s in self.backbone_shapes.items()},
                              **{pl.key(pl.HEAD, n): s for n, s in self.head_shapes.items()}}
        else:
            ranks, factors = self.truncated(server_round, tensors)
            sent: dict[str, torch.Tensor] = {}
            self._sent_factors = {}
            for index, (m, (b, a)) in enumerate(factors.items()):
                b, a, revived = am.revive_dead_components(b, a, seed=mix_seed(c.seed, server_round, index),
                                                          form=c.factor_form)
                self._sent_factors[m] = (b, a)
                stats.revived += revived
                sent[pl.key(pl.LORA_B, m)], sent[pl.key(pl.LORA_A, m)] = b, a
            sent.update(pl.only(tensors, pl.HEAD))
            wire = pl.to_wire(sent, list(ranks))
            shared = pl.pack(wire)
            stats.budget, stats.ranks = self.budget(server_round), ranks
            self._expected = {k: tuple(v.shape) for k, v in wire.items()}
            self._round_backbone = self.backbone_hash(server_round, tensors)
            if self._round_backbone:
                backbone_payload = pl.pack(pl.only(tensors, pl.BACKBONE))
            round_config.update({
                "backbone-hash": self._round_backbone,
                "lora-modules": list(ranks),
                "lora-ranks": [ranks[m] for m in ranks],
                "lora-scale": c.lora_scale,
            })
        messages = []
        for node_id in node_ids:
            record = shared
            if backbone_payload is not None and self.node_backbone.get(node_id) != self._round_backbone:
                record = ArrayRecord({**shared, **backbone_payload})
                stats.backbone_sends += 1
            stats.bytes_down += record.count_bytes()
            stats.params_down += pl.num_parameters(record)
            content = RecordDict({ARRAYS: record, "config": ConfigRecord(dict(round_config))})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
        self._sent = messages
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, drop the bad ones, aggregate the rest.

        Returns ``(None, None)`` when nothing valid arrived: Flower then keeps the previous
        global arrays, so a bad round never corrupts the model.
        """
        stats = self.history[-1]
        start = time.perf_counter()
        sent_to = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in self._sent}
        good: list[tuple[int, RecordDict]] = []
        for reply in replies:
            node_id = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                log(WARNING, "round %d: node %d failed: %s", server_round, node_id, reply.error.reason)
                self.node_backbone.pop(node_id, None)  # resend the backbone in case its cache is gone
                stats.dropped += 1
                continue
            content = reply.content
            received = content.get(ARRAYS)
            if isinstance(received, ArrayRecord):
                stats.bytes_up += received.count_bytes()
                stats.params_up += pl.num_parameters(received)
            # Only a *trained* backbone needs the node's confirmation; every node has the pre-trained one.
            problem = reply_problem(content, self._expected, max_num_examples=self.config.max_num_examples,
                                    backbone_hash=self._round_backbone or None)
            if problem:
                log(WARNING, "round %d: dropped the reply of node %d: %s", server_round, node_id, problem)
                stats.dropped += 1
                continue
            if self._round_backbone is not None:
                self.node_backbone[node_id] = self._round_backbone
            good.append((node_id, content))
        stats.replies = len(good)
        if not good:
            log(WARNING, "round %d: no valid reply; the global model is unchanged", server_round)
            return None, None
        weights = [float(content[METRICS]["num-examples"]) for _, content in good]
        received = [pl.from_wire(pl.unpack(content[ARRAYS]), stats.ranks, self.module_shapes) for _, content in good]
        new = self._aggregate(received, weights, self._current)
        metrics = self._aggregate_metrics([content[METRICS] for _, content in good], weights)
        stats.train_loss = metrics.get("train-loss")
        stats.train_seconds = metrics.get("train-time")
        stats.peak_memory_mb = metrics.get("peak-memory-mb")
        stats.first_step_a_ratio = metrics.get("first-step-a-ratio")
        first = next(iter(self.module_shapes))
        if pl.key(pl.LORA_B, first) in new:
            stats.factor_norms = {"B": float(new[pl.key(pl.LORA_B, first)].norm()),
                                  "A": float(new[pl.key(pl.LORA_A, first)].norm())}
        stats.aggregate_seconds = time.perf_counter() - start
        return pl.pack(new), MetricRecord(metrics)

    def _aggregate(self, received: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                   previous: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        total = sum(weights)
        if self.history[-1].kind == FULL:
            return {k: sum((w / total) * r[k].double() for w, r in zip(weights, received)).float() for k in received[0]}
        new = pl.only(previous, pl.BACKBONE)  # frozen while annealing
        for name in self.head_shapes:
            k = pl.key(pl.HEAD, name)
            new[k] = sum((w / total) * r[k].double() for w, r in zip(weights, received)).float()
        dropped = update = 0.0
        for m in self.module_shapes:
            bs = [r[pl.key(pl.LORA_B, m)] for r in received]
            as_ = [r[pl.key(pl.LORA_A, m)] for r in received]
            if self.config.aggregation == "product":
                b, a = am.aggregate_products(bs, as_, weights, max_rank=self.config.rank_max,
                                             form=self.config.factor_form)
                module_dropped, module_update = am.dropped_update(bs, as_, weights, *self._sent_factors[m],
                                                                  max_rank=self.config.rank_max)
                dropped, update = dropped + module_dropped, update + module_update
            else:
                b, a = am.aggregate_factors(bs, as_, weights)
            new[pl.key(pl.LORA_B, m)], new[pl.key(pl.LORA_A, m)] = b, a
        if self.config.aggregation == "product":  # factor averaging never truncates an exact mean
            self.history[-1].dropped_update = dropped / update if update > 0 else 0.0
        return new

    @staticmethod
    def _aggregate_metrics(records: Sequence[MetricRecord], weights: Sequence[float]) -> dict[str, float | int]:
        total = sum(weights)
        out: dict[str, float | int] = {"num-examples": int(total)}
        for name in ("train-loss", "train-time", "first-step-a-ratio"):
            values = [(w, float(r[name])) for w, r in zip(weights, records) if isinstance(r.get(name), (int, float))]
            if values:
                out[name] = sum(w * v for w, v in values) / sum(w for w, _ in values)
        peaks = [float(r["peak-memory-mb"]) for r in records if isinstance(r.get("peak-memory-mb"), (int, float))]
        if peaks:
            out["peak-memory-mb"] = max(peaks)
        return out

    def summary(self) -> None:
        c = self.config
        log(INFO, "\t├──> SA-FedLoRA: method=%s, %d adapted modules, budget %d -> %d (%s schedule)",
            c.method, len(self.module_shapes), self.b_max, self.b_min, c.schedule)
        log(INFO, "\t└──> init-rounds=%d (%s), allocation=%s, aggregation=%s",
            c.init_rounds, c.init_trainable, c.allocation, c.aggregation)

    # --- Node sampling ------------------------------------------------------------------------
    def _sample_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """Wait (bounded) for ``min-nodes`` nodes, then sample reproducibly for the round."""
        deadline = time.monotonic() + self.config.node_wait_timeout
        while len(node_ids := sorted(grid.get_node_ids())) < self.config.min_nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"round {server_round}: only {len(node_ids)} node(s) connected after "
                    f"node-wait-timeout = {self.config.node_wait_timeout} s; min-nodes = {self.config.min_nodes}"
                )
            log(INFO, "round %d: waiting for nodes (%d of %d connected)", server_round, len(node_ids),
                self.config.min_nodes)
            time.sleep(1.0)
        size = min(len(node_ids), max(int(len(node_ids) * self.config.fraction_train), self.config.min_nodes))
        return sorted(random.Random(mix_seed(self.config.seed, server_round, 0)).sample(node_ids, size))

