"""SA-FedLoRA strategy: a Flower Strategy with the round plan, per-node payloads and validated replies.

The global ``ArrayRecord`` that Flower passes between rounds holds ``head::*`` always,
``backbone::*`` once the backbone is trained (full fine-tuning rounds), and ``lora_A::m`` /
``lora_B::m`` once a LoRA round has been aggregated. What each round sends is the round plan
(:mod:`~safedlora_app.core.round_plan`); what each node gets of it is :mod:`~safedlora_app.server.dispatch`; how
replies combine is :mod:`~safedlora_app.server.aggregation`. The hooks here only sample nodes, check replies and
count bytes.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from safedlora_app.core import payload as pl
from safedlora_app.core.config import RunConfig
from safedlora_app.core.records import CONFIG, METRICS, RoundConfig
from safedlora_app.core.round_plan import FULL, RoundPlan, model_plan, plan_round
from safedlora_app.core.seeds import Draw, mix_seed

from .aggregation import aggregate_round, finite_value, private_aggregate_round, reply_metrics
from .dispatch import LIMITS_TIMEOUT, Dispatch, NodeLimits, Recipients, Wire, ask_limits, dispatch
from .outputs import RoundLog, RoundStats, one_after_another
from .private_rounds import PrivateRounds
from .replies import Accepted, Screened, checked_evaluation, checked_update, screen


class NotEnoughNodes(RuntimeError):
    """Fewer than ``min-nodes`` nodes stayed connected for ``node-wait-timeout`` seconds."""


class RepeatedRoundLines(logging.Filter):
    """Drops the lines of Flower 1.42's ``Strategy.start`` loop that repeat what the recorder's round line says
    (matched by their exact format strings, so no other record is touched): the round header, the metric dicts
    after training and evaluation, and the final dump of every round's metrics."""

    FORMATS = frozenset({"", "[ROUND %s/%s]", "\t└──> Aggregated MetricRecord: %s", "Global evaluation",
                         "\t└──> MetricRecord: %s", "Initial global evaluation results: %s", "Final results:",
                         "\t%s"})

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.FORMATS


class SAFedLoRA(Strategy):
    """Staged, budgeted federated LoRA (and the full fine-tuning baselines) on Flower's ``Strategy``.

    Flower's round loop (``Strategy.start``) calls the hooks below; sampling, payloads and aggregation are all
    the app's own, so nothing of ``FedAvg`` is inherited (its constructor would warn about
    ``fraction-evaluate = 0``, which the app chooses on purpose when the server evaluates centrally).

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
    """

    def __init__(self, config: RunConfig, module_shapes: Mapping[str, tuple[int, int]],
                 expected_full: Mapping[str, tuple[int, ...]], rounds: RoundLog | None = None,
                 first_round: int = 1):
        self.config, self.module_shapes, self.expected_full = config, dict(module_shapes), dict(expected_full)
        self.rounds = rounds if rounds is not None else RoundLog()
        self.offset = first_round - 1
        self.node_backbone: dict[int, str] = {}  # node id -> hash of the trained backbone it holds
        self.node_limits: dict[int, NodeLimits] = {}  # node id -> its declared max-rank and name, asked once
        self._round: tuple[Dispatch, dict[str, torch.Tensor]]  # the round in flight, the global tensors it started from
        self._evaluation: Dispatch | None = None  # the federated evaluation in flight
        self._sent_at = 0.0  # when configure_train handed the round's messages to Flower
        self.privacy = PrivateRounds(config) if config.private else None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: which trained backbone each node holds (see
        :mod:`~safedlora_app.server.checkpoint`). A node's limits are asked again. A private run adds its mechanism
        (:class:`~safedlora_app.server.private_rounds.PrivateRounds`)."""
        state: dict[str, Any] = {"node-backbone": {str(n): digest for n, digest in self.node_backbone.items()}}
        if self.privacy:
            state["privacy"] = self.privacy.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.node_backbone = {int(node_id): digest for node_id, digest in state["node-backbone"].items()}
        if self.privacy and state.get("privacy"):
            self.privacy.load_state_dict(state["privacy"])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One message per sampled node: the round's payload and its own copy of the config."""
        server_round += self.offset
        node_ids = self._sample_nodes(server_round, grid, self.config.clients_per_round)
        tensors = pl.unpack(arrays)
        plan = plan_round(self.config, server_round, tensors, self.module_shapes)
        stats = self.rounds.start(RoundStats(round=server_round, stage=plan.stage, kind=plan.kind,
                                             budget=plan.budget, ranks=plan.ranks, nodes=len(node_ids),
                                             revived=plan.revived))
        sent = self._dispatch(plan, tensors, arrays, config, node_ids, MessageType.TRAIN, grid)
        stats.bytes_down, stats.params_down, stats.backbone_sends = sent.traffic()
        stats.capped = sent.capped
        self._round = (sent, tensors)
        self._sent_at = time.perf_counter()  # Flower pushes the messages and waits for the replies next
        return sent.messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Federated evaluation after the rounds central evaluation scores: the round's global model
        (:func:`~safedlora_app.core.round_plan.model_plan`) to ``fraction-evaluate`` of the nodes."""
        server_round += self.offset
        if not self.config.fraction_evaluate or not self.config.evaluates(server_round):
            self._evaluation = None
            return []
        node_ids = self._sample_nodes(server_round, grid, self.config.evaluators_per_round, Draw.EVALUATE)
        tensors = pl.unpack(arrays)
        plan = model_plan(self.config, server_round, tensors, self.module_shapes)
        sent = self._dispatch(plan, tensors, arrays, config, node_ids, MessageType.EVALUATE, grid)
        stats = self.rounds.current
        stats.eval_nodes = len(node_ids)
        stats.eval_bytes_down, _, sends = sent.traffic()
        stats.backbone_sends += sends
        self._evaluation = sent
        return sent.messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, drop the bad ones, aggregate the rest.

        Returns ``(None, None)`` when nothing valid arrived: Flower then keeps the previous
        global arrays, so a bad round never corrupts the model.
        """
        server_round += self.offset
        sent, previous = self._round
        stats, start = self.rounds.current, time.perf_counter()
        stats.exchange_seconds = start - self._sent_at
        screened = screen(sent.messages, list(replies),
                          lambda message, content: self._checked_tensors(sent, message, content))
        stats.bytes_up, stats.params_up = screened.bytes_up, screened.params_up
        valid = self._account(server_round, "training", screened, sent.backbone_hash)
        stats.replies, stats.dropped = len(valid), len(screened.dropped) + len(screened.lost)
        stats.trained = sorted(self._name(reply.node_id) or str(reply.node_id) for reply in valid)
        if not valid and not self.privacy:
            log(WARNING, "round %d: no valid reply; the global model is unchanged", server_round)
            return None, None
        weights = self._weights(server_round, valid)
        checked = [reply.checked for reply in valid]
        if self.privacy:  # noise is released whether or not anyone replied: the mechanism is the same every round
            if not valid:
                log(WARNING, "round %d: no valid reply; the global model moves by the noise alone", server_round)
            new, diagnostics = private_aggregate_round(self.config, sent.plan, checked, previous,
                                                       self.privacy.mechanism, self.privacy.generator)
            stats.dp_epsilon = self.privacy.epsilon(server_round)
            stats.dp_norm, stats.dp_clipped = diagnostics["dp"]["norm"], diagnostics["dp"]["clipped"]
        else:
            new, diagnostics = aggregate_round(self.config, sent.plan, checked, weights, previous)
        if not all(bool(torch.isfinite(tensor).all()) for tensor in new.values()):
            # Finite replies near float32's limit (wire-dtype float32) can make a product beyond it: such a model
            # would fail the next round's SVD, so the round is lost instead of the run.
            log(WARNING, "round %d: the aggregate of the valid replies is not finite (values beyond float32's range); "
                "the global model is unchanged", server_round)
            return None, None
        records = [reply.content[METRICS] for reply in valid]
        metrics = reply_metrics(records, weights)
        times = [(finite_value(r.get("start-time")), finite_value(r.get("end-time"))) for r in records]
        stats.in_turn = None if any(None in t for t in times) else one_after_another(times)
        (stats.train_loss, stats.train_seconds, stats.train_seconds_max, stats.train_seconds_total,
         stats.client_seconds, stats.client_seconds_total, stats.peak_memory_mb, stats.first_step_a_ratio) = (
            metrics.get(k) for k in ("train-loss", "train-time", "train-time-max", "train-time-total", "client-time",
                                     "client-time-total", "peak-memory-mb", "first-step-a-ratio"))
        stats.dropped_update, stats.factor_norms = diagnostics["dropped_update"], diagnostics["factor_norms"]
        stats.aggregate_seconds = time.perf_counter() - start
        return pl.pack(new), MetricRecord(metrics)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Check every evaluation reply, drop the bad ones, and weight the rest by their rows."""
        if self._evaluation is None:
            return None
        server_round += self.offset
        sent = self._evaluation
        stats = self.rounds.current
        screened = screen(sent.messages, list(replies), lambda _, content: checked_evaluation(
            content, max_num_examples=self.config.max_num_examples, backbone_hash=sent.backbone_hash or None,
            metrics_needed=self.config.task_spec.eval_metrics))
        good = [reply.content for reply in self._account(server_round, "evaluation", screened, sent.backbone_hash)]
        stats.eval_bytes_up = screened.bytes_up
        stats.eval_replies, stats.eval_dropped = len(good), len(screened.dropped) + len(screened.lost)
        if not good:
            log(WARNING, "round %d: no valid evaluation reply", server_round)
            return None
        metrics = [content[METRICS] for content in good]
        rows = [float(m["num-examples"]) for m in metrics]
        stats.eval_rows = int(sum(rows))
        means = {k: sum(w * float(m[k]) for w, m in zip(rows, metrics)) / sum(rows)
                 for k in self.config.task_spec.eval_metrics if k != "perplexity"}
        if "perplexity" in self.config.task_spec.eval_metrics:  # of the mean loss, as central evaluation's
            means["perplexity"] = math.exp(min(means["loss"], 50.0))
        for name, value in means.items():
            setattr(stats, "fed_" + name.replace("-", "_"), value)
        return MetricRecord({**{f"fed-{k}": v for k, v in means.items()}, "eval-rows": stats.eval_rows})

    def start(self, *args: Any, **kwargs: Any):
        """Flower's round loop, with its own per-round lines left out: each round's line is the recorder's
        (``[round t/T] ...``, with the metrics Flower would print as dicts), so a run logs one line per round."""
        quiet = RepeatedRoundLines()
        logging.getLogger("flwr").addFilter(quiet)
        try:
            return super().start(*args, **kwargs)
        finally:
            logging.getLogger("flwr").removeFilter(quiet)

    def summary(self) -> None:
        c = self.config
        log(INFO, "\t└──> SA-FedLoRA: method=%s, %d modules, ranks %d..%d (%s), init-rounds=%d (%s), %s, %s",
            c.method, len(self.module_shapes), c.rank_min, c.rank_max, c.schedule, c.init_rounds, c.init_trainable,
            c.allocation, c.aggregation)

    def _dispatch(self, plan: RoundPlan, tensors: dict[str, torch.Tensor], arrays: ArrayRecord,
                  config: ConfigRecord, node_ids: list[int], message_type: str, grid: Grid) -> Dispatch:
        """The plan's messages to ``node_ids``, each cut to the node's ``max-rank`` (asked once per node)."""
        if plan.kind != FULL:
            self._ask_limits(grid, node_ids, plan.server_round)
        caps = {n: limits.max_rank for n, limits in self.node_limits.items()}
        return dispatch(plan, tensors, arrays, config, message_type, Recipients(node_ids, caps, self.node_backbone),
                        Wire(self.expected_full, self.config.lora_scale, self.config.wire_dtype))

    def _ask_limits(self, grid: Grid, node_ids: list[int], server_round: int) -> None:
        """Ask the nodes not asked yet (or that did not answer soundly) for their limits, waiting at most
        ``LIMITS_TIMEOUT`` seconds (or ``round-timeout`` when shorter): a node that does not answer in time must
        not hold the round for the round's whole deadline."""
        if unknown := [n for n in node_ids if n not in self.node_limits]:
            timeout = min(LIMITS_TIMEOUT, self.config.round_timeout)
            self.node_limits.update(ask_limits(grid, unknown, server_round, timeout))

    def _checked_tensors(self, sent: Dispatch, message: Message, content: RecordDict) -> dict[str, torch.Tensor]:
        """A training reply's tensors (float32, at the round's ranks), made from the arrays
        :func:`~safedlora_app.server.replies.checked_update` decoded and checked against what ``message`` sent.

        Raises for an unusable reply, which :func:`~safedlora_app.server.replies.screen` then drops: the unpacking
        runs here too, so that nothing a reply holds can raise later, in the aggregation.
        """
        to_node = sent.per_node[message.metadata.dst_node_id]
        wire_dtype = RoundConfig.from_record(message.content[CONFIG]).wire_dtype
        # Only a *trained* backbone needs the node's confirmation; every node has the pre-trained one.
        arrays = checked_update(content, to_node.reply_shapes, wire_dtype,
                                max_num_examples=self.config.max_num_examples,
                                backbone_hash=sent.backbone_hash or None)
        tensors = {name: torch.from_numpy(values.astype(np.float32)) for name, values in arrays.items()}
        return sent.plan.padded(pl.from_wire(tensors, to_node.plan.ranks, self.module_shapes, sent.plan.frozen_a))

    def _weights(self, server_round: int, valid: list[Accepted]) -> list[float]:
        """Each reply's ``num-examples``, at most the ``local-samples`` its node was asked to draw.

        ``num-examples`` counts the distinct samples a node trained on (``core.training.train``), whatever
        ``local-epochs``, so an honest claim never exceeds ``local-samples``; a larger one is capped and logged.
        With ``local-samples = 0`` a node trains its whole partition, whose size the server does not know:
        ``max-num-examples`` (checked with the reply) is then the only bound.
        """
        cap = self.config.local_samples
        weights = []
        for reply in valid:
            claimed = int(reply.content[METRICS]["num-examples"])
            if cap and claimed > cap:
                log(WARNING, "round %d: node %d claims num-examples = %d, above the local-samples = %d it was asked "
                    "to train; weighted as %d", server_round, reply.node_id, claimed, cap, cap)
                claimed = cap
            weights.append(float(claimed))
        return weights

    def _account(self, server_round: int, what: str, screened: Screened, backbone_hash: str) -> list[Accepted]:
        """Log lost and dropped replies, note which nodes now hold the backbone; the valid replies."""
        if screened.lost:  # no reply before the round's deadline: a node lost mid-round, or one that hangs
            log(WARNING, "round %d: no %s reply from node(s) %s before the round timeout", server_round, what,
                screened.lost)
        for node_id, problem, failed in screened.dropped:
            log(WARNING, "round %d: dropped the %s reply of node %d: %s", server_round, what, node_id, problem)
            if failed:
                self.node_backbone.pop(node_id, None)  # resend the backbone in case its cache is gone
        self.node_backbone.update({reply.node_id: backbone_hash for reply in screened.valid if backbone_hash})
        return screened.valid

    def _sample_nodes(self, server_round: int, grid: Grid, how_many: Callable[[int], int],
                      draw: Draw = Draw.TRAIN) -> list[int]:
        """Wait (bounded) for ``min-nodes`` nodes, then sample ``how_many(connected)`` reproducibly for the round
        (``draw``: training and evaluation draw independently)."""
        deadline = time.monotonic() + self.config.node_wait_timeout
        while len(node_ids := sorted(grid.get_node_ids())) < self.config.min_nodes:
            if time.monotonic() > deadline:
                raise NotEnoughNodes(
                    f"round {server_round}: only {len(node_ids)} node(s) connected after "
                    f"node-wait-timeout = {self.config.node_wait_timeout} s; min-nodes = {self.config.min_nodes}")
            log(INFO, "round %d: waiting for nodes (%d of %d connected)", server_round, len(node_ids),
                self.config.min_nodes)
            time.sleep(1.0)
        if self.privacy and draw == Draw.TRAIN:
            self.privacy.start(len(node_ids))
            sampled = sorted(self.privacy.sample(node_ids))
            self._ask_limits(grid, sampled, server_round)  # their names, in full rounds too (the round's `trained`)
            return sampled
        size = how_many(len(node_ids))
        if size < len(node_ids):
            # Node ids differ between processes and runs; the names nodes report do not. Drawing from the nodes
            # ordered by name makes the same seed pick the same nodes' data every time (unnamed: by node id).
            self._ask_limits(grid, node_ids, server_round)
            node_ids.sort(key=lambda n: (not self._name(n), self._name(n), n))
        return sorted(random.Random(mix_seed(self.config.seed, server_round, draw)).sample(node_ids, size))

    def _name(self, node_id: int) -> str:
        limits = self.node_limits.get(node_id)
        return limits.name if limits else ""

