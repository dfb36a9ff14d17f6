"""The round plan: what one round trains and sends, and the model a round ends with.

Pure functions of (effective config, round, global tensors): no Flower, no I/O. The strategy plans
every round with :func:`plan_round`. The central evaluation and the saved adapter read the model a
round ended with through :func:`adapter_at`, which :func:`plan_round` uses too. The model after
round t is the aggregated adapter truncated to round t's budget (what a run stopped after round t
would save). Its ranks are the ones a ``metrics.jsonl`` row logs as ``model-ranks`` next to that
model's accuracy; ``ranks`` are the ones sent in the round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import adapter_math as am
from . import payload as pl
from .config import RunConfig
from .records import RoundConfig
from .schedule import round_budget, round_lr_factor
from .seeds import mix_seed

FULL, LORA = "full", "lora"
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def round_kind(config: RunConfig, server_round: int) -> str:
    """``full`` for full fine-tuning rounds (fedavg, fedprox, ``init-trainable = full``), else ``lora``."""
    return FULL if server_round <= config.init_rounds and config.init_trainable == FULL else LORA


def stage(config: RunConfig, server_round: int) -> str:
    """``initiating`` or ``annealing`` for sa-fedlora; the baselines' rounds are ``training``."""
    if config.method != "sa-fedlora":
        return "training"
    return "initiating" if server_round <= config.init_rounds else "annealing"


def budget(config: RunConfig, server_round: int, units: int) -> int:
    """The round's budget: ``units`` per unit of rank, b_max while initiating, then the schedule from rank-max to
    rank-min units; rounds after the planned ones (``schedule-rounds``) keep the plan's last budget. ``units`` is the
    number of adapted modules for a budget in ranks, or the values one component of every module sends
    (``sum(d_out + d_in)``) for ``allocation = "bytes"``."""
    planned = config.planned_rounds
    return round_budget(min(server_round, planned), planned, config.init_rounds, config.heat_rounds,
                        config.cool_rounds, config.rank_max * units, config.rank_min * units, config.schedule)


def lr_factor(config: RunConfig, server_round: int) -> float:
    """The round's multiplier of ``lr``/``full-lr``; rounds after the planned ones keep the plan's last."""
    planned = config.planned_rounds
    return round_lr_factor(min(server_round, planned), planned, config.lr_decay, config.lr_final_ratio)


def initial_tensors(config: RunConfig, model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Round 0's global state (``model.full_state``): the head, plus the pre-trained backbone if round 1 is full.

    LoRA starts empty: every component is dead and is revived (peft's init) when first sent.
    """
    backbone = pl.of_kind(model_state, pl.BACKBONE) if round_kind(config, 1) == FULL else {}
    return {**pl.of_kind(model_state, pl.HEAD), **backbone}


def stored_factors(tensors: Mapping[str, torch.Tensor], module_shapes: Mapping[str, tuple[int, int]]) -> Factors:
    """``{module: (B, A)}`` of the global adapter for every adapted module (rank 0 where none is stored yet)."""
    stored = pl.lora_factors(tensors)
    return {m: stored.get(m, (torch.zeros(d_out, 0), torch.zeros(0, d_in)))
            for m, (d_out, d_in) in module_shapes.items()}


def adapter_at(config: RunConfig, server_round: int, tensors: Mapping[str, torch.Tensor],
               module_shapes: Mapping[str, tuple[int, int]]) -> tuple[dict[str, int], Factors]:
    """The global adapter at round ``server_round``'s budget: ``(ranks, {module: (B, A)})``.

    The budget is split over modules (global threshold on singular values, or uniform) and each
    module is truncated to its rank. Factors in SVD form are truncated by slicing; averaged factors
    (``aggregation = "factors"``) are re-factored first when they must shrink, so that truncation is
    still the best approximation at that rank.
    """
    factors = stored_factors(tensors, module_shapes)
    sigmas = {m: (am.singular_values(b, a) if b.shape[1] else torch.zeros(0)) for m, (b, a) in factors.items()}
    if config.allocation == "bytes":
        costs = {m: d_out + d_in for m, (d_out, d_in) in module_shapes.items()}
        ranks = am.allocate_by_cost(sigmas, costs, budget(config, server_round, sum(costs.values())),
                                    floor=config.rank_floor, cap=config.rank_max)
    else:
        ranks = am.allocate_ranks(sigmas, budget(config, server_round, len(module_shapes)), floor=config.rank_floor,
                                  cap=config.rank_max, uniform=config.allocation == "uniform")
    out = {}
    for m, (b, a) in factors.items():
        if config.aggregation == "factors" and ranks[m] < b.shape[1]:
            b, a = am.refactor(b, a, ranks[m], config.factor_form)
        out[m] = am.resize(b, a, ranks[m])
    return ranks, out


def frozen_a(config: RunConfig, ranks: Mapping[str, int], module_shapes: Mapping[str, tuple[int, int]]
             ) -> dict[str, torch.Tensor]:
    """FFA-LoRA's A of every module of ``ranks``: the rows a new component gets (``factor-form``'s init), seeded by
    (seed, round 1, the module's position in ``ranks``). The server plans with them and every node regenerates them
    from the run config, so A never travels; a node capped at a lower rank gets the first rows."""
    out = {}
    for index, (m, rank) in enumerate(ranks.items()):
        d_out, d_in = module_shapes[m]
        _, a, _ = am.revive_dead_components(torch.zeros(d_out, rank), torch.zeros(rank, d_in),
                                            seed=mix_seed(config.seed, 1, index), form=config.factor_form)
        out[m] = a
    return out


@dataclass(frozen=True)
class RoundPlan:
    """What every node trains in one round.

    ``ranks`` and ``factors`` are empty in full rounds. ``factors`` are the truncated global factors
    with dead components revived: exactly what each node starts from.
    """

    server_round: int
    kind: str
    stage: str
    lr: float
    prox_mu: float
    budget: int | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    factors: Factors = field(default_factory=dict)
    revived: int = 0
    frozen_a: bool = False
    """A is FFA-LoRA's (:func:`frozen_a`): it is not sent, and nodes send B alone."""

    def capped(self, max_rank: int) -> RoundPlan:
        """The plan for a node that trains at most ``max_rank`` per module (0: this plan).

        Each module keeps its first ``max_rank`` components. Under ``aggregation = "product"`` the factors
        are in SVD form, so that is the best rank-``max_rank`` approximation of the module's update; under
        ``"factors"`` it is HetLoRA's truncation. The node's reply is padded back with the components it was not
        sent (:func:`padded`).
        """
        if not max_rank or all(r <= max_rank for r in self.ranks.values()):
            return self
        ranks = {m: min(r, max_rank) for m, r in self.ranks.items()}
        factors = {m: am.resize(b, a, ranks[m]) for m, (b, a) in self.factors.items()}
        return dataclasses.replace(self, ranks=ranks, factors=factors, budget=sum(ranks.values()))

    def padded(self, received: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A capped node's reply at this plan's ranks: its trained components, then the components it was not
        sent, as the plan holds them. Zero components instead would count the node as voting to remove every
        component above its cap: the weighted mean would shrink them by the capped nodes' share every round."""
        out = dict(received)
        for m, rank in self.ranks.items():
            kb, ka = pl.key(pl.LORA_B, m), pl.key(pl.LORA_A, m)
            sent_b, sent_a = self.factors[m]
            b = received[kb]
            a = sent_a[:b.shape[1]] if self.frozen_a else received[ka]  # a frozen A is the one sent
            kept = b.shape[1]
            if kept < rank:
                b = torch.cat([b, sent_b[:, kept:rank].to(b.dtype)], dim=1)
                a = torch.cat([a, sent_a[kept:rank].to(a.dtype)], dim=0)
            out[kb], out[ka] = b, a
        return out

    def lora_payload(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What every node is sent in a LoRA round: the plan's factors on the wire (``lora::packed``), the head."""
        sent = pl.of_kind(tensors, pl.HEAD)
        for m, (b, a) in self.factors.items():
            sent[pl.key(pl.LORA_B, m)], sent[pl.key(pl.LORA_A, m)] = b, a
        return pl.to_wire(sent, list(self.ranks), self.frozen_a)

    def round_config(self, lora_scale: float, wire_dtype: str, label_names: Sequence[str],
                     backbone_hash: str = "") -> RoundConfig:
        """What a node is told to do in this round (``client.rounds`` reads it); ``wire_dtype`` is the payload's,
        both ways, full rounds too."""
        lora = self.kind == LORA
        return RoundConfig(server_round=self.server_round, kind=self.kind, lr=self.lr, prox_mu=self.prox_mu,
                           wire_dtype=wire_dtype, label_names=tuple(label_names), backbone_hash=backbone_hash,
                           lora_modules=tuple(self.ranks) if lora else (),
                           lora_ranks=tuple(self.ranks.values()) if lora else (),
                           lora_scale=lora_scale if lora else 0.0, lora_frozen_a=lora and self.frozen_a)


def plan_round(config: RunConfig, server_round: int, tensors: Mapping[str, torch.Tensor],
               module_shapes: Mapping[str, tuple[int, int]]) -> RoundPlan:
    """Plan round ``server_round`` from the global tensors it starts with.

    Dead components (A row and B column both zero: a new adapter, or one the budget grew into)
    get peft's init for A and a zero B column, seeded by (seed, round, module index).
    """
    kind = round_kind(config, server_round)
    initiating = server_round <= config.init_rounds
    lr = (config.full_lr if kind == FULL else config.lr) * lr_factor(config, server_round)
    common = dict(server_round=server_round, kind=kind, stage=stage(config, server_round), lr=lr,
                  prox_mu=config.prox_mu if initiating else config.prox_mu_anneal)
    if kind == FULL:
        return RoundPlan(**common)
    ranks, truncated = adapter_at(config, server_round, tensors, module_shapes)
    factors, revived = {}, 0
    for index, (m, (b, a)) in enumerate(truncated.items()):
        b, a, count = am.revive_dead_components(b, a, seed=mix_seed(config.seed, server_round, index),
                                                form=config.factor_form)
        factors[m], revived = (b, a), revived + count
    if config.frozen_a:  # the same A in every round, by construction (round 1 revives it; later rounds keep it)
        fixed = frozen_a(config, ranks, module_shapes)
        factors = {m: (b, fixed[m]) for m, (b, _) in factors.items()}
    return RoundPlan(**common, budget=sum(ranks.values()), ranks=ranks, factors=factors, revived=revived,
                     frozen_a=config.frozen_a)


def model_plan(config: RunConfig, server_round: int, tensors: Mapping[str, torch.Tensor],
               module_shapes: Mapping[str, tuple[int, int]]) -> RoundPlan:
    """The model after round ``server_round``, as nodes rebuild it for federated evaluation.

    The same payload as a training round's, with :func:`adapter_at`'s factors as they are (nothing
    revived): the global model central evaluation scores. ``full`` while no LoRA round has been
    aggregated (the backbone, if trained, and the head), ``lora`` after.
    """
    common = dict(server_round=server_round, stage=stage(config, server_round), lr=0.0, prox_mu=0.0)
    if not pl.bare(tensors, pl.LORA_A):
        return RoundPlan(kind=FULL, **common)
    ranks, factors = adapter_at(config, server_round, tensors, module_shapes)
    return RoundPlan(kind=LORA, **common, budget=sum(ranks.values()), ranks=ranks, factors=factors,
                     frozen_a=config.frozen_a)
