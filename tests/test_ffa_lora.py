"""method = "ffa-lora" (FFA-LoRA, Sun et al. 2024): A frozen at its seeded initial value on every node, B alone
trained, sent and averaged, so the aggregate is the exact mean of the nodes' products."""

import pytest
import torch
from safetensors.torch import load_file
from support.runs import run_server

from safedlora_app.core import payload as pl
from safedlora_app.core.config import RunConfig
from safedlora_app.core.records import RoundConfig
from safedlora_app.core.round_plan import frozen_a, plan_round
from safedlora_app.server.aggregation import aggregate_round

SHAPES = {"q": (6, 4), "v": (5, 3)}


def config(**values) -> RunConfig:
    return RunConfig.from_mapping({"method": "ffa-lora", "rank-max": 2, "rank-min": 1, "num-server-rounds": 3,
                                   "seed": 7, **values}).effective


def test_ffa_lora_is_fedit_with_a_frozen():
    ffa, fedit = config(), config(method="fedit")
    assert ffa.frozen_a and not fedit.frozen_a
    same = {k: v for k, v in ffa.to_dict().items() if k != "method"}
    assert same == {k: v for k, v in fedit.to_dict().items() if k != "method"}  # the same fixed choices


def test_every_round_plans_the_same_seeded_a_and_sends_b_alone():
    c = config()
    first = plan_round(c, 1, {}, SHAPES)
    expected = frozen_a(c, first.ranks, SHAPES)
    assert first.frozen_a and first.ranks == {"q": 2, "v": 2}
    for m, (b, a) in first.factors.items():
        assert torch.equal(a, expected[m]) and not b.any()  # round 1: B = 0, A = the seeded rows
    # A later round, from a global adapter whose B trained: A is unchanged, B is the global B.
    trained = {pl.key(pl.LORA_B, m): torch.full((d_out, 2), 0.5) for m, (d_out, _) in SHAPES.items()}
    trained.update({pl.key(pl.LORA_A, m): a for m, a in expected.items()})
    later = plan_round(c, 2, trained, SHAPES)
    for m, (b, a) in later.factors.items():
        assert torch.equal(a, expected[m]) and torch.equal(b, trained[pl.key(pl.LORA_B, m)])
    payload = later.lora_payload(trained)
    assert payload[pl.PACKED].numel() == 2 * 6 + 2 * 5  # B alone: rank x d_out per module
    assert (pl.packed_size(later.ranks, SHAPES, frozen_a=True), pl.packed_size(later.ranks, SHAPES)) == (22, 36)
    round_config = RoundConfig.from_record(later.round_config(2.0, "float32", ["x"]).to_record())
    assert round_config.lora_frozen_a is True
    assert frozen_a(config(seed=8), first.ranks, SHAPES)["q"].ne(expected["q"]).any()  # seeded by the run's seed


@pytest.mark.parametrize("form", ["balanced", "orthonormal-a"])
def test_a_capped_node_regenerates_exactly_the_rows_it_is_sent(form):
    """A node with max-rank 1 is sent the plan cut to rank 1: the A it rebuilds from the config alone is those rows."""
    c = config(**{"factor-form": form, "rank-max": 3})
    plan = plan_round(c, 1, {}, SHAPES)
    capped = plan.capped(1)
    rebuilt = frozen_a(c, capped.ranks, SHAPES)
    for m, (_, a) in capped.factors.items():
        assert a.shape[0] == 1 and torch.equal(rebuilt[m], a)


def test_the_aggregate_is_the_exact_weighted_mean_of_the_products():
    c = config()
    plan = plan_round(c, 1, {}, SHAPES)
    generator = torch.Generator().manual_seed(0)
    bs = [{m: torch.randn(d_out, 2, generator=generator) for m, (d_out, _) in SHAPES.items()} for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    received = [plan.padded(pl.from_wire(pl.to_wire({pl.key(pl.LORA_B, m): b for m, b in reply.items()},
                                                    list(plan.ranks), frozen_a=True), plan.ranks, SHAPES, True))
                for reply in bs]
    new, _ = aggregate_round(c, plan, received, weights, {})
    for m, (_, sent_a) in plan.factors.items():
        assert torch.equal(new[pl.key(pl.LORA_A, m)], sent_a)  # A kept, not averaged
        exact = sum(w * (reply[m] @ sent_a) for w, reply in zip(weights, bs)) / sum(weights)
        torch.testing.assert_close(new[pl.key(pl.LORA_B, m)] @ new[pl.key(pl.LORA_A, m)], exact)


def test_a_reply_with_a_included_has_the_wrong_length():
    plan = plan_round(config(), 1, {}, SHAPES)
    full = pl.to_wire({**{pl.key(pl.LORA_B, m): b for m, (b, _) in plan.factors.items()},
                       **{pl.key(pl.LORA_A, m): a for m, (_, a) in plan.factors.items()}}, list(plan.ranks))
    with pytest.raises(pl.PayloadError, match="holds 36 values; the announced ranks need 22"):
        pl.from_wire(full, plan.ranks, SHAPES, frozen_a=True)


def test_an_ffa_lora_run_keeps_a_sends_half_of_fedits_factor_bytes_and_trains_b(run_config):
    """In process, 2 rounds: the saved adapter's A is round 1's seeded A; B moved; bytes both ways are B's."""
    run_dir, rows, _ = run_server(run_config(num_server_rounds=2, run_name="ffa", method="ffa-lora", rank_max=4,
                                             wire_dtype="float32"))
    _, fedit_rows, _ = run_server(run_config(num_server_rounds=2, run_name="fedit", method="fedit", rank_max=4,
                                             wire_dtype="float32"))
    assert [r["replies"] for r in rows[1:]] == [2, 2]
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    c = RunConfig.from_mapping(run_config(method="ffa-lora", rank_max=4)).effective
    ranks = rows[1]["ranks"]
    assert set(ranks.values()) == {4}
    a_keys = sorted(k for k in saved if "lora_A" in k)
    b_keys = sorted(k for k in saved if "lora_B" in k)
    assert len(a_keys) == len(ranks) and all(saved[k].abs().sum() > 0 for k in b_keys)  # B trained from 0
    # Every saved A equals the seeded one regenerated from the config alone (module order: the round's ranks).
    shapes = {m: (saved[next(k for k in b_keys if f".{m}." in f".{k}")].shape[0],
                  saved[next(k for k in a_keys if f".{m}." in f".{k}")].shape[1]) for m in ranks}
    for m, a in frozen_a(c, ranks, shapes).items():
        assert torch.equal(saved[next(k for k in a_keys if f".{m}." in f".{k}")], a), m
    head_and_factors = {r: rows[r]["bytes-up"] for r in (1, 2)}
    fedit_up = {r: fedit_rows[r]["bytes-up"] for r in (1, 2)}
    for r in (1, 2):
        assert head_and_factors[r] < fedit_up[r] and rows[r]["bytes-down"] < fedit_rows[r]["bytes-down"]
        # MiniLM's query and value are 384 x 384: A and B are the same size, so A's bytes are B's.
        factor_bytes = sum(4 * rank * 384 for rank in ranks.values())
        assert fedit_up[r] - head_and_factors[r] == pytest.approx(2 * factor_bytes, rel=0.01)
