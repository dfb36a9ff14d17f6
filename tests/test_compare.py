"""`safedlora compare`: planning, aggregation and formatting (fast), and one tiny comparison end to end."""

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safedlora_app.core.config import RunConfig
from safedlora_app.core.schedule import round_budget
from safedlora_app.tools.simulation import APP_ROOT
from safedlora_lab.compare import cli, plan, runner, tables
from safedlora_lab.compare.store import RunStore, local_dtype

BASE = {**plan.PRESETS["full"].settings, "num-server-rounds": 8, **plan.stage_rounds(8), "lr": 0.002, "full-lr": 5e-05}


# --- Planning --------------------------------------------------------------------------------------
def test_plan_repeats_headline_methods_over_seeds_and_the_rest_on_the_first_seed():
    specs = plan.plan_runs(BASE, ["fedavg", "fedit-rmax", "fedit-rmin", "sa-no-init"], ["natural", "dirichlet"],
                           [42, 43, 44])
    # per split: fedavg x3 + fedit-rmax x3 + fedit-rmin x1 + sa-no-init x1
    assert len(specs) == 16
    assert [s.key for s in specs[:6]] == ["natural/fedavg-s42", "natural/fedit-rmax-s42", "natural/fedit-rmin-s42",
                                          "natural/sa-no-init-s42", "natural/fedavg-s43", "natural/fedit-rmax-s43"]
    assert {s.num_supernodes for s in specs} == {7}
    assert specs[0].federation == "num-supernodes=7 client-resources-num-cpus=1"
    by_key = {s.key: s.settings for s in specs}
    assert by_key["natural/fedit-rmin-s42"]["method"] == "fedit"
    assert by_key["natural/fedit-rmin-s42"]["rank-max"] == BASE["rank-min"] == 2
    assert by_key["natural/fedit-rmax-s42"]["rank-max"] == 8
    assert by_key["dirichlet/sa-no-init-s42"]["init-rounds"] == 0
    assert by_key["dirichlet/sa-no-init-s42"]["partitioner"] == "dirichlet"
    assert by_key["dirichlet/sa-no-init-s42"]["dirichlet-alpha"] == 0.5
    assert by_key["natural/fedavg-s44"]["seed"] == 44
    # every planned run-config passes the app's own validation
    for spec in specs:
        RunConfig.from_mapping({**spec.settings, "out-dir": "/tmp/x", "run-name": spec.run_name})


def test_every_method_differs_from_the_base_only_where_it_should():
    s = {m: plan.run_settings(BASE, "natural", m, 42) for m in plan.METHODS}
    assert s["sa-no-anneal"]["schedule"] == "constant" and s["sa-fedlora"].get("schedule", "cubic") == "cubic"
    assert s["sa-uniform"]["allocation"] == "uniform"
    assert s["sa-ab-avg"]["aggregation"] == "factors"
    assert s["fedprox"]["method"] == "fedprox"
    caps = RunConfig.from_mapping({"partition-max-rank": s["sa-half-capped"]["partition-max-rank"]}).partition_caps()
    assert len(caps) == plan.SPLITS["natural"][1] == plan.SPLITS["dirichlet"][1] and caps.count(2) == 4
    shared = {k: v for k, v in s["sa-fedlora"].items() if k not in ("method",)}
    for method, settings in s.items():
        rounds = plan.METHODS[method].get("num-server-rounds", 8)  # the 32-round levers set their own
        assert settings["num-server-rounds"] == rounds and settings["test-size"] == BASE["test-size"]
        assert {k: v for k, v in settings.items() if k in shared and k not in plan.METHODS[method]} == \
            {k: v for k, v in shared.items() if k not in plan.METHODS[method]}


def test_lr_multiplier_scales_lr_for_lora_methods_and_full_lr_for_full_methods():
    fedavg = plan.run_settings(BASE, "natural", "fedavg", 42, 2.0)
    assert fedavg["full-lr"] == pytest.approx(1e-4) and fedavg["lr"] == 0.002
    fedit = plan.run_settings(BASE, "natural", "fedit-rmax", 42, 0.5)
    assert fedit["lr"] == pytest.approx(0.001) and fedit["full-lr"] == 5e-05
    search = plan.plan_lr_search(BASE, ["fedavg", "sa-fedlora"], "dirichlet", 42)
    assert [s.run_name for s in search] == ["fedavg-s42", "fedavg-lrx0.5-s42", "fedavg-lrx2-s42",
                                            "sa-fedlora-s42", "sa-fedlora-lrx0.5-s42", "sa-fedlora-lrx2-s42"]
    # Only headline methods are searched; the others take their family's choice.
    assert {s.method for s in plan.plan_lr_search(BASE, ["fedprox", "sa-fedlora", "sa-no-init"], "natural", 42)} \
        == {"sa-fedlora"}
    assert plan.chosen_multipliers(["fedprox", "sa-no-init", "fedit-rmin", "fedit-rmax"],
                                   {"fedavg": 0.5, "sa-fedlora": 2.0}) == {
        "fedprox": 0.5, "sa-no-init": 2.0, "fedit-rmin": 1.0, "fedit-rmax": 1.0}
    # the search point at the chosen multiplier is the comparison's run (resumed, not repeated)
    main = plan.plan_runs(BASE, ["fedavg", "sa-fedlora"], ["dirichlet"], [42], {"fedavg": 2.0, "sa-fedlora": 1.0})
    assert {s.key for s in main} <= {s.key for s in search}
    assert {s.key: s.settings for s in main}["dirichlet/fedavg-lrx2-s42"] == \
        {s.key: s.settings for s in search}["dirichlet/fedavg-lrx2-s42"]


@pytest.mark.parametrize("rounds, expected", [
    (8, {"init-rounds": 1, "heat-rounds": 0, "cool-rounds": 4}),
    (3, {"init-rounds": 1, "heat-rounds": 0, "cool-rounds": 1}),
    (2, {"init-rounds": 1, "heat-rounds": 0, "cool-rounds": 1}),
    (1, {"init-rounds": 0, "heat-rounds": 0, "cool-rounds": 1}),
])
def test_stage_rounds(rounds, expected):
    assert plan.stage_rounds(rounds) == expected


def test_stage_rounds_are_valid_for_any_number_of_rounds():
    for rounds in range(1, 30):
        RunConfig.from_mapping({"method": "sa-fedlora", "num-server-rounds": rounds, **plan.stage_rounds(rounds)})


def test_full_preset_schedule_sends_at_most_half_of_fixed_rank_adapters():
    # The byte goal (<= 50% of fedit at rank-max) needs a mean budget under b_max / 2 (the head is the same
    # for both and only moves the ratio towards 1, so this is necessary, and checked again on real runs).
    rounds = plan.PRESETS["full"].rounds
    stages = plan.stage_rounds(rounds)
    preset = plan.PRESETS["full"].settings
    modules = 12  # query and value projections of the default model's 6 layers
    b_max, b_min = preset["rank-max"] * modules, preset["rank-min"] * modules
    budgets = [round_budget(t, rounds, stages["init-rounds"], stages["heat-rounds"], stages["cool-rounds"],
                            b_max, b_min, "cubic") for t in range(1, rounds + 1)]
    assert budgets[:2] == [96, 96] and budgets[-stages["cool-rounds"]:] == [24] * stages["cool-rounds"]
    assert sum(budgets) / (rounds * b_max) < 0.5
    # sa-short-cool cools for 4 of the 15 annealing rounds, not 8, and stays under half too
    base = {**preset, "num-server-rounds": rounds, **stages}
    short = RunConfig.from_mapping(plan.run_settings(base, "natural", "sa-short-cool", 42))
    heat, cool = short.phase_rounds()
    assert (heat, cool) == (0, 4)
    longer = [round_budget(t, rounds, 1, heat, cool, b_max, b_min, "cubic") for t in range(1, rounds + 1)]
    assert sum(budgets) < sum(longer) < 0.5 * rounds * b_max


@pytest.mark.parametrize("method, floor", [("sa-fp16-rmin4", 4), ("sa-fp16-rmin6", 6)])
def test_float16_methods_raise_the_floor_and_stay_under_half_of_float32_bytes(method, floor):
    # float16 halves each factor's bytes, so a budget with a higher floor still plans under half of the
    # float32 bytes that fedit-rmax sends at rank-max every round.
    rounds = plan.PRESETS["full"].rounds
    base = {**plan.PRESETS["full"].settings, "num-server-rounds": rounds, **plan.stage_rounds(rounds)}
    config = RunConfig.from_mapping(plan.run_settings(base, "natural", method, 42))
    assert (config.rank_min, config.wire_dtype) == (floor, "float16")
    modules = 12
    heat, cool = config.phase_rounds()
    budgets = [round_budget(t, rounds, config.init_rounds, heat, cool, 8 * modules, floor * modules, "cubic")
               for t in range(1, rounds + 1)]
    assert budgets[-1] == floor * modules
    assert sum(budgets) * 2 < 0.5 * rounds * 8 * modules * 4


def test_choose_lr_takes_the_lowest_validation_loss_and_breaks_ties_towards_x1():
    assert plan.choose_lr({0.5: 0.60, 1.0: 0.60, 2.0: 0.70}) == 1.0
    assert plan.choose_lr({0.5: 0.59, 1.0: 0.60, 2.0: None}) == 0.5
    assert plan.choose_lr({0.5: 0.60, 2.0: 0.60, 4.0: float("nan")}) == 0.5  # a diverged run never wins
    with pytest.raises(ValueError):
        plan.choose_lr({0.5: None, 1.0: None})


def test_run_config_string_quotes_strings_and_keeps_numbers_toml():
    text = plan.run_config_string({"method": "fedit", "rank-max": 2, "full-lr": 5e-05, "lr": 0.002, "x": True})
    assert text == "method='fedit' rank-max=2 full-lr=5e-05 lr=0.002 x=true"
    with pytest.raises(plan.CompareError, match="must not hold a quote"):
        plan.format_value("it's")


def test_estimate_counts_full_rounds_and_evaluations():
    costs = {"startup": 10.0, "first-round": 0.0, "round-overhead": 0.5, "eval-per-row": 0.01,
             "lora-per-sample": 0.1, "full-per-sample": 0.2, "full-transfer": 1.0, "parallel-clients": 2}
    settings = {"num-server-rounds": 2, "local-samples": 10, "test-size": 100, "min-nodes": 3, "fraction-train": 0.01}
    lora = plan.RunSpec("natural", "fedit-rmax", 42, 1.0, {**settings, "method": "fedit"}, 7)
    full = plan.RunSpec("natural", "fedavg", 42, 1.0, {**settings, "method": "fedavg"}, 7)
    # 3 clients -> 2 waves; 3 evaluations of 100 rows; 2 rounds of overhead
    assert plan.estimate_seconds(lora, costs) == pytest.approx(10 + 3 + 1 + 2 * (2 * 10 * 0.1))
    assert plan.estimate_seconds(full, costs) == pytest.approx(10 + 3 + 1 + 2 * (2 * 10 * 0.2 + 3 * 1.0))
    # eval-every=4 over 12 rounds evaluates rounds 0, 4, 8, 10, 11 and 12
    sparse = plan.RunSpec("natural", "fedit-rmax", 42, 1.0,
                          {**settings, "method": "fedit", "num-server-rounds": 12, "eval-every": 4}, 7)
    assert plan.estimate_seconds(sparse, costs) == pytest.approx(10 + 6 + 6 + 12 * (2 * 10 * 0.1))


# --- Aggregation -----------------------------------------------------------------------------------
def test_mean_std_uses_the_sample_standard_deviation():
    mean, std = tables.mean_std([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)
    assert tables.mean_std([0.4]) == (0.4, None)
    assert tables.mean_std([]) == (None, None)
    assert tables.format_pm(0.583, 0.012) == "58.3 ± 1.2"
    assert tables.format_pm(0.583, None) == "58.3"


def test_rounds_to_target_is_the_first_round_at_or_above_target():
    records = [{"round": r, "accuracy": a} for r, a in enumerate([0.30, 0.50, 0.60, 0.55])]
    assert tables.rounds_to_target(records, 0.55) == 2
    assert tables.rounds_to_target(records, 0.60) == 2
    assert tables.rounds_to_target(records, 0.30) == 0
    assert tables.rounds_to_target(records, 0.70) is None


def test_saving_is_one_minus_the_ratio_in_percent():
    assert tables.saving_pct(25, 100) == pytest.approx(75.0)
    assert tables.saving_pct(200, 100) == pytest.approx(-100.0)
    assert tables.saving_pct(100, None) is None and tables.saving_pct(None, 100) is None


def records(accuracies, down, up, params=(0, 0)):
    """metrics.jsonl-like records: round 0 sends nothing, every later round sends (down, up) bytes."""
    rows = [{"round": 0, "accuracy": accuracies[0], "macro-f1": 0.1, "bytes-down": 0, "bytes-up": 0,
             "params-down": 0, "params-up": 0, "cumulative-bytes": 0}]
    for r, a in enumerate(accuracies[1:], 1):
        rows.append({"round": r, "accuracy": a, "macro-f1": a / 2, "bytes-down": down, "bytes-up": up,
                     "params-down": params[0], "params-up": params[1], "dropped": 0,
                     "cumulative-bytes": r * (down + up)})
    return rows


def test_paired_interval_against_a_hand_computed_case():
    # d = 1, 2, 3: mean 2, sd 1, se 1/sqrt(3); t(0.975, df=2) = 4.302653 -> half-width 2.484138.
    mean, low, high = tables.paired_interval([1.0, 2.0, 3.0])
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - 2.484138, 2.0 + 2.484138), abs=1e-6)
    assert tables.paired_interval([0.5]) is None


def test_mb_to_target_and_accuracy_at_equal_mb():
    rows = records([0.4, 0.5, 0.6, 0.7], 500_000, 500_000)  # 1 MB per round
    assert tables.mb_to_target(rows, 0.6) == pytest.approx(2.0) and tables.mb_to_target(rows, 0.9) is None
    assert tables.accuracy_at_mb(rows, 2.5) == 0.6 and tables.accuracy_at_mb(rows, 0.5) is None  # round 0 only
    rows[2]["accuracy"] = None  # a round eval-every skipped: the last evaluated one within budget counts
    assert tables.accuracy_at_mb(rows, 2.5) == 0.5


def write_finished_runs(root, specs, finals):
    """Run directories of the ``(method, seed)`` runs in ``finals`` (final accuracy); the others did not finish."""
    for spec in specs:
        if (spec.method, spec.seed) in finals:
            path = tables.run_dir(root, spec)
            path.mkdir(parents=True)
            (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records(
                [0.4, 0.5, finals[(spec.method, spec.seed)]], 10, 10)) + "\n")
            (path / "summary.json").write_text("{}")


def test_paired_rows_pair_seeds_and_give_intervals(tmp_path):
    settings = {"num-server-rounds": 2, "lr": 1e-3, "full-lr": 1e-4}
    specs = plan.plan_runs(settings, ["fedit-rmax", "sa-fedlora"], ["natural"], [42, 43, 44, 45])
    finals = {("fedit-rmax", 42): 0.60, ("fedit-rmax", 43): 0.62, ("fedit-rmax", 44): 0.64, ("fedit-rmax", 45): 0.6,
              ("sa-fedlora", 42): 0.61, ("sa-fedlora", 43): 0.64, ("sa-fedlora", 44): 0.67}  # not seed 45
    write_finished_runs(tmp_path, specs, finals)
    [row] = tables.paired_rows(tmp_path, specs, references=["fedit-rmax"])
    assert row["pairs"] == 3 and row["final_diffs"] == pytest.approx([1.0, 2.0, 3.0])
    assert row["final_mean"] == pytest.approx(2.0)
    half = 4.302653 * 1.0 / 3 ** 0.5  # t(0.975, df=2) * sd(1, 2, 3) / sqrt(n) = 2.484
    assert (row["final_low"], row["final_high"]) == pytest.approx((2.0 - half, 2.0 + half), abs=1e-5)
    [cells] = markdown_rows(tables.format_paired_markdown([row]))
    assert cells["difference"] == "sa-fedlora − fedit-rmax" and cells["seeds"] == "3"
    assert cells["final acc, points [95% CI]"] == "+2.0 [-0.5, +4.5]"
    assert cells["per seed (final)"] == "+1.0, +2.0, +3.0"


def test_two_paired_seeds_give_the_mean_difference_and_no_interval(tmp_path):
    # Seeds 42 and 43 both differ by -0.3 points: sd 0, so a t-interval would claim [-0.3, -0.3]. Two pairs
    # cannot bound the spread; below 3 the table says so, and comparison.json's bounds are null.
    settings = {"num-server-rounds": 2, "lr": 1e-3, "full-lr": 1e-4}
    specs = plan.plan_runs(settings, ["fedavg", "sa-fedlora"], ["natural"], [42, 43])
    write_finished_runs(tmp_path, specs, {("fedavg", 42): 0.700, ("sa-fedlora", 42): 0.697,
                                          ("fedavg", 43): 0.650, ("sa-fedlora", 43): 0.647})
    [row] = tables.paired_rows(tmp_path, specs, references=["fedavg"])
    assert row["pairs"] == 2 and row["final_diffs"] == pytest.approx([-0.3, -0.3])
    assert row["final_mean"] == pytest.approx(-0.3)
    assert (row["final_low"], row["final_high"], row["last3_low"], row["last3_high"]) == (None, None, None, None)
    assert json.loads(json.dumps(row))["final_low"] is None
    [cells] = markdown_rows(tables.format_paired_markdown([row]))
    assert cells["final acc, points [95% CI]"] == "-0.3 (n=2: no interval below 3 seeds)"
    assert tables.paired_interval([-0.3, -0.3]) is None


def markdown_rows(table: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table in ``table``, as {header: cell}."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return [dict(zip(split[0], row, strict=True)) for row in split[2:]]


def test_rows_aggregate_seeds_and_compute_savings_against_the_references():
    fedavg = [({"wall-seconds": 100.0}, records([0.4, 0.5, 0.6], 1000, 1000, (250, 250)))]
    fedit = [({"wall-seconds": 10.0}, records([0.4, 0.5, 0.55], 100, 100, (25, 25))),
             ({"wall-seconds": 20.0}, records([0.4, 0.45, 0.65], 100, 100, (25, 25)))]
    sa = [({"wall-seconds": 12.0}, records([0.4, 0.6, 0.5], 50, 30, (12, 8)))]
    rows = tables.add_savings([
        tables.method_row("natural", "fedavg", fedavg, 0.55, ("full-lr", 5e-05, 1.0), 1),
        tables.method_row("natural", "fedit-rmax", fedit, 0.55, ("lr", 0.002, 1.0), 2),
        tables.method_row("natural", "sa-fedlora", sa, 0.55, ("lr", 0.004, 2.0), 1),
    ])
    fa, fi, s = rows
    assert fa["bytes_down"] == 2000 and fa["bytes_up"] == 2000 and fa["params_sent"] == 1000
    assert fa["rounds_to_target"] == 2 and fa["reached_target"] == "1/1"
    assert fi["final_accuracy_mean"] == pytest.approx(0.60)
    assert fi["final_accuracy_std"] == pytest.approx(math.sqrt(0.005))  # values 0.55, 0.65
    assert fi["best_accuracy_mean"] == pytest.approx(0.60) and fi["wall_seconds"] == pytest.approx(15.0)
    assert fi["last3_accuracy_mean"] == pytest.approx((0.525 + 0.55) / 2)  # rounds 1..2 of each seed
    assert fi["rounds_to_target"] == pytest.approx(2.0) and fi["reached_target"] == "2/2"
    assert fi["saving_vs_fedavg_pct"] == pytest.approx(90.0)  # 400 vs 4000 bytes
    assert fi["saving_vs_fedit_rmax_pct"] == pytest.approx(0.0)
    assert s["bytes_down"] == 100 and s["bytes_up"] == 60 and s["mb_down"] == pytest.approx(1e-4)
    assert s["saving_vs_fedavg_pct"] == pytest.approx(96.0)  # 160 vs 4000
    assert s["saving_vs_fedit_rmax_pct"] == pytest.approx(60.0)  # 160 vs 400
    assert s["best_accuracy_mean"] == pytest.approx(0.6) and s["final_accuracy_std"] is None
    assert s["rounds_to_target"] == 1
    assert s["params_pct_of_fedavg"] == pytest.approx(4.0) and fa["params_pct_of_fedavg"] == pytest.approx(100.0)
    table = tables.format_markdown(rows, 0.55, ["a note"])
    cells = {r["method"]: r for r in markdown_rows(table)}
    assert list(cells) == ["fedavg", "fedit-rmax", "sa-fedlora"]
    assert (cells["fedit-rmax"]["seeds"], cells["fedit-rmax"]["lr"]) == ("2", "lr 0.002 (x1)")
    assert cells["fedit-rmax"]["final acc %"] == cells["fedit-rmax"]["best acc % (oracle)"] == "60.0 ± 7.1"
    assert cells["sa-fedlora"]["seeds"] == "1*"  # fewer seeds than the headline methods: marked
    assert (cells["sa-fedlora"]["final acc %"], cells["sa-fedlora"]["best acc % (oracle)"]) == ("50.0", "60.0")
    assert cells["sa-fedlora"]["saving vs fedavg"] == "96.0%" and cells["sa-fedlora"]["saving vs fedit-rmax"] == "60.0%"
    assert cells["sa-fedlora"]["params % of fedavg's"] == "4.00"  # 40 of 1,000 parameters
    assert table.rstrip().endswith("a note")
    parsed = list(csv.DictReader(tables.format_csv(rows).splitlines()))
    assert tuple(parsed[0]) == tables.CSV_COLUMNS and parsed[2]["saving_vs_fedit_rmax_pct"] == "60.0"


def test_the_paired_plot_draws_every_method_paired_against_fedavg(tmp_path):
    rows = [{"split": "natural", "method": m, "bytes_down": b, "bytes_up": b} for m, b in
            (("fedavg", 1e9), ("sa-fedlora", 1e6), ("sa-all-r16-32r", 2e7))]
    paired = [{"split": "natural", "method": "sa-fedlora", "reference": "fedavg", "final_mean": -2.0,
               "final_low": -3.0, "final_high": -1.0, "pairs": 4},
              {"split": "natural", "method": "sa-all-r16-32r", "reference": "fedavg", "final_mean": 0.7,
               "final_low": None, "final_high": None, "pairs": 1},  # one pair: no interval
              {"split": "natural", "method": "sa-fedlora", "reference": "fedit-rmax", "final_mean": 0.1,
               "final_low": -1.0, "final_high": 1.2, "pairs": 4}]
    paths = tables.write_paired_plots(tmp_path, rows, paired)
    assert paths == [tmp_path / "plots" / "natural" / "paired_vs_fedavg_vs_mb.png"] and paths[0].stat().st_size > 0
    assert tables.write_paired_plots(tmp_path, rows[1:], paired) == []  # no fedavg runs: nothing to draw
    points = tables.paired_points(rows, paired, "natural", "fedavg")
    assert [p[0] for p in points] == ["fedavg: full fine-tuning", "sa-fedlora (4 seeds)",
                                      "sa-all-r16-32r: profile 'accurate' (1 seed)"]
    assert points[0][1:] == (2e9 / tables.MB, 0.0, None, None) and points[1][2:] == (-2.0, -3.0, -1.0)
    assert tables.paired_points(rows, paired, "dirichlet", "fedavg") == []  # no runs on that split


def test_rounds_to_target_column_when_only_some_seeds_reach_it():
    assert tables.format_rounds_to_target(None, "2/3") == "2/3 reached"
    assert tables.format_rounds_to_target(None, "0/3") == "never"
    assert tables.format_rounds_to_target(4.5, "2/2") == "4.5"
    row = tables.method_row("natural", "fedit-rmax", [({}, records([0.4, 0.6], 1, 1)), ({}, records([0.4, 0.5], 1, 1))],
                            0.55, ("lr", 0.002, 1.0), 2)
    assert row["rounds_to_target"] is None and row["reached_target"] == "1/2"


def test_config_mismatch_names_the_changed_keys():
    assert runner.config_mismatch({"lr": 0.002, "rank-max": 8}, {"lr": 0.002, "rank-max": 8.0, "out-dir": "/x"}) == []
    assert runner.config_mismatch({"test-size": 300, "out-dir": "/a"}, {"test-size": 100, "out-dir": "/b"}) == \
        ["test-size: planned 300, found 100"]


# --- Command line ----------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "argument --seeds: '0' is not allowed; it must be an integer >= 1"),
    (["--rounds", "ten"], "argument --rounds: 'ten' is not allowed; it must be an integer >= 1"),
    (["--arms", "fedit,fedsgd"],
     "argument --arms/--methods: 'fedit' is not allowed; choose from: accurate-r32, accurate, defaults"),
    (["--splits", "iid"], "argument --splits: 'iid' is not allowed; choose from: natural, dirichlet"),
    (["--target-accuracy", "55"], "argument --target-accuracy: '55' is not allowed; it must be a fraction in (0, 1]"),
    (["--name", "a/b"], "--name = 'a/b' is not allowed; it must be a plain directory name"),
    (["--set", "learning-rate=0.1"], "--set: 'learning-rate' is not a run-config key"),
    (["--set", "rank-min=9"], "rank-min = 9 is not allowed; it must be <= rank-max = 8"),
    (["--seeds", "2", "--ablation-seeds", "3"], "--ablation-seeds = 3 is not allowed"),
    (["--splits", "natural", "--ablation-splits", "dirichlet"], "--ablation-splits = dirichlet is not allowed"),
    (["--splits", "natural", "--headline-splits", "dirichlet"],
     "--headline-splits = dirichlet is not allowed: the comparison runs only the splits natural (--splits)"),
    (["--headline-splits", "iid"], "argument --headline-splits: 'iid' is not allowed; choose from: natural, dirichlet"),
    (["--out", str(APP_ROOT / "docs" / "comparison")], "lies inside the app directory"),  # not git-ignored
])
def test_bad_values_exit_with_a_clear_error(args, message, capsys, tmp_path):
    out = [] if "--out" in args else ["--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compare", "--dry-run", *out, *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_dry_run_prints_every_run_and_its_run_config(capsys, tmp_path):
    assert cli.main(["compare", "--preset", "full", "--dry-run", "--out", str(tmp_path), "--name", "x", "--seeds", "3",
                     "--arms", "fedit-rmax,fedit-rmin", "--splits", "natural,dirichlet", "--rounds", "4"]) == 0
    out = capsys.readouterr().out
    assert "dirichlet/fedit-rmax-s42  --run-config \"" in out and "dirichlet/fedit-rmax-s44" in out
    # ablations: the first 2 seeds, natural split only
    assert "natural/fedit-rmin-s43" in out and "fedit-rmin-s44" not in out and "dirichlet/fedit-rmin" not in out
    assert "num-server-rounds=4 init-rounds=1 heat-rounds=0 cool-rounds=2" in out
    assert "--federation-config \"num-supernodes=7 client-resources-num-cpus=1\"" in out
    assert "8 runs; estimate" in out and str(tmp_path / "x") in out
    assert not (tmp_path / "x").exists()


def test_ablation_seeds_run_the_ablations_on_more_of_the_seeds(capsys, tmp_path):
    assert cli.main(["compare", "--dry-run", "--out", str(tmp_path), "--seeds", "4", "--ablation-seeds", "3",
                     "--arms", "fedit-rmax,sa-fp16", "--splits", "natural"]) == 0
    out = capsys.readouterr().out
    assert "natural/sa-fp16-s44" in out and "sa-fp16-s45" not in out and "natural/fedit-rmax-s45" in out


def test_ablation_splits_run_the_ablations_on_another_split(capsys, tmp_path):
    assert cli.main(["compare", "--preset", "full", "--dry-run", "--out", str(tmp_path), "--seeds", "2",
                     "--ablation-splits", "dirichlet",
                     "--arms", "fedit-rmax,sa-fp16", "--splits", "natural,dirichlet"]) == 0
    out = capsys.readouterr().out
    assert "dirichlet/sa-fp16-s43" in out and "natural/sa-fp16" not in out and "natural/fedit-rmax-s43" in out


def planned_keys(out: str) -> set[str]:
    """The run keys a dry run printed."""
    return set(re.findall(r"^  (\S+)  --run-config", out, flags=re.MULTILINE))


def test_headline_splits_add_seeds_on_those_splits_only(capsys, tmp_path):
    assert cli.main(["compare", "--preset", "full", "--dry-run", "--out", str(tmp_path), "--seeds", "5",
                     "--ablation-seeds", "3", "--headline-splits", "natural", "--arms", "fedavg,sa-fedlora,sa-fp16",
                     "--splits", "natural,dirichlet"]) == 0
    out = capsys.readouterr().out

    def keys(split, methods, n_seeds):
        return {f"{split}/{method}-s{seed}" for method in methods for seed in range(42, 42 + n_seeds)}

    # headline methods: 5 seeds on natural, the 3 ablation seeds on dirichlet; sa-fp16: the preset's natural only
    assert planned_keys(out) == (keys("natural", ["fedavg", "sa-fedlora"], 5) | keys("natural", ["sa-fp16"], 3)
                                 | keys("dirichlet", ["fedavg", "sa-fedlora"], 3))
    assert "19 runs; estimate" in out


def test_headline_splits_default_to_every_split_and_reach_the_plan_and_the_notes(tmp_path):
    specs = plan.plan_runs(BASE, ["fedit-rmax", "sa-no-init"], ["natural", "dirichlet"], [42, 43, 44],
                           ablation_seeds=2, headline_splits=("dirichlet",))
    assert [s.key for s in specs if s.split == "natural"] == [
        "natural/fedit-rmax-s42", "natural/sa-no-init-s42", "natural/fedit-rmax-s43", "natural/sa-no-init-s43"]
    assert [s.key for s in specs if s.method == "fedit-rmax" and s.split == "dirichlet"] == [
        "dirichlet/fedit-rmax-s42", "dirichlet/fedit-rmax-s43", "dirichlet/fedit-rmax-s44"]
    argv = ["compare", "--preset", "full", "--out", str(tmp_path), "--seeds", "3", "--splits", "natural,dirichlet"]
    options = cli.resolve_options(cli.build_parser().parse_args(argv))
    assert options.headline_splits == ("natural", "dirichlet")  # default: every split
    options = cli.resolve_options(cli.build_parser().parse_args([*argv, "--headline-splits", "dirichlet"]))
    assert options.headline_splits == ("dirichlet",)
    assert "* fedavg, fedit-rmax, sa-fedlora on split(s) natural: seed(s) 42, 43." in tables.table_notes(options)


def test_dry_run_with_lr_search_lists_the_search_runs(capsys, tmp_path):
    cli.main(["compare", "--dry-run", "--quick", "--lr-search", "--out", str(tmp_path), "--arms", "fedavg"])
    out = capsys.readouterr().out
    assert "natural/fedavg-lrx2-s41" in out and "full-lr=5e-05" in out and "full-lr=0.0002" in out
    assert "natural/fedavg-s42" in out  # reported on seed 42, searched on the tuning seed 41
    assert "4 runs; estimate" in out


#: Modules that ``--help`` and ``--dry-run`` do without: the runs import them (seconds each on 2 cores).
HEAVY_MODULES = ("torch", "transformers", "peft", "datasets", "flwr", "ray", "pandas", "scipy", "matplotlib", "tqdm")


def heavy_modules_after(code: str) -> set[str]:
    """The ``HEAVY_MODULES`` imported after running ``code`` in a fresh interpreter."""
    code += f"\nimport json, sys\nprint(json.dumps([m for m in {HEAVY_MODULES!r} if m in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


def heavy_modules_imported_by(*argv: str) -> set[str]:
    """The ``HEAVY_MODULES`` that ``safedlora *argv`` imports."""
    return heavy_modules_after(f"from safedlora_lab.compare import cli\ntry:\n    cli.main({list(argv)!r})\n"
                               "except SystemExit:\n    pass")


@pytest.fixture(scope="module")
def dry_run_imports(tmp_path_factory) -> set[str]:
    return heavy_modules_imported_by("compare", "--dry-run", "--lr-search", "--out", str(tmp_path_factory.mktemp("d")))


def test_help_imports_no_heavy_module():
    assert heavy_modules_imported_by("compare", "--help") == set()


def test_dry_run_imports_no_heavy_module(dry_run_imports):
    """It plans and validates every run-config (the app's RunConfig) without torch, Flower or pandas."""
    assert dry_run_imports == set()


def test_results_inside_the_app_are_refused_unless_gitignored(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    assert cli.packaged_with_app(app / "results" / "quick", app)
    (app / ".gitignore").write_text("/results/\n")
    assert not cli.packaged_with_app(app / "results" / "quick", app)
    assert not cli.packaged_with_app(tmp_path / "elsewhere", app)


# --- Runner with a stand-in for Flower (resume logic) ------------------------------------------------
class FakeFlower:
    """Writes what the app writes for a run, instantly; counts runs."""

    runs: list[str] = []

    def __init__(self, home):
        self.home = home

    def run(self, run_config, timeout=600, federation="", progress=None):
        settings = dict(item.split("=", 1) for item in run_config.split())
        run_dir = Path(settings["out-dir"].strip("'")) / settings["run-name"].strip("'")
        run_dir.mkdir(parents=True, exist_ok=True)
        given = {k: json.loads(v.replace("'", '"')) for k, v in settings.items()}
        given = RunConfig.from_mapping(given).to_dict()  # the app writes every key
        (run_dir / "config.json").write_text(json.dumps({"given": given}))
        (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records([0.4, 0.5], 10, 20)) + "\n")
        (run_dir / "summary.json").write_text(json.dumps({"final-accuracy": 0.5, "wall-seconds": 1.0,
                                                          "compute-dtype": local_dtype(given)}))
        FakeFlower.runs.append(run_dir.name)
        return subprocess.CompletedProcess([], 0, "Starting logstream for run_id `7`", "")

    def run_status(self, output):
        return "finished:completed"

    def stop(self):
        pass


def test_report_only_tabulates_the_finished_runs_and_runs_nothing(tmp_path):
    FakeFlower.runs = []
    argv = ["compare", "--quick", "--out", str(tmp_path), "--name", "p", "--arms", "fedit-rmax"]
    assert cli.compare(cli.resolve_options(cli.build_parser().parse_args(argv)), [], say=lambda _: None,
                       flower_factory=FakeFlower) == 0
    (tmp_path / "p" / "table.csv").unlink()
    argv[-1] = "fedit-rmax,sa-fedlora"  # sa-fedlora has not run yet
    lines = []
    options = cli.resolve_options(cli.build_parser().parse_args([*argv, "--report-only"]))
    assert cli.compare(options, [], say=lines.append, flower_factory=FakeFlower) == 0
    assert FakeFlower.runs == ["fedit-rmax-s42"]  # nothing more ran
    assert any("report only: 1 of 2 runs finished; not yet: natural/sa-fedlora-s42" in line for line in lines)
    rows = list(csv.DictReader((tmp_path / "p" / "table.csv").read_text().splitlines()))
    assert [(r["method"], r["seeds"]) for r in rows] == [("fedit-rmax", "1"), ("sa-fedlora", "0")]


def test_resume_skips_finished_runs_and_redoes_half_finished_ones(tmp_path):
    FakeFlower.runs = []
    options = cli.resolve_options(cli.build_parser().parse_args(
        ["compare", "--quick", "--out", str(tmp_path), "--name", "r", "--arms", "fedit-rmax,sa-fedlora"]))
    lines = []
    assert cli.compare(options, [], say=lines.append, flower_factory=FakeFlower) == 0
    assert FakeFlower.runs == ["fedit-rmax-s42", "sa-fedlora-s42"]
    root = tmp_path / "r"
    # interrupt sa-fedlora half-way: metrics but no summary
    (root / "runs/natural/sa-fedlora-s42/summary.json").unlink()
    assert cli.compare(options, [], say=lines.append, flower_factory=FakeFlower) == 0
    assert FakeFlower.runs == ["fedit-rmax-s42", "sa-fedlora-s42", "sa-fedlora-s42"]
    assert any("[1/2] natural/fedit-rmax-s42: finished earlier" in line for line in lines)
    assert len(list((root / "aborted" / "natural").iterdir())) == 1
    assert any(line.startswith("[2/2] natural/sa-fedlora-s42: finished in") and "ETA" in line for line in lines)
    summary = json.loads((root / "comparison.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["skipped", "finished"]
    assert summary["chosen-lrs"]["sa-fedlora"] == {"multiplier": 1.0, "lr-key": "lr", "lr": 0.003, "search": {},
                                                   "bracketed": None, "fixed": False}
    # other settings under the same name are refused, not mixed
    changed = cli.resolve_options(cli.build_parser().parse_args(
        ["compare", "--quick", "--out", str(tmp_path), "--name", "r", "--arms", "fedit-rmax", "--rounds", "5"]))
    with pytest.raises(plan.CompareError, match="was made with other settings"):
        cli.compare(changed, [], say=lines.append, flower_factory=FakeFlower)


def test_a_stored_run_is_found_by_its_full_run_config_wherever_it_was_written(tmp_path):
    settings = {"method": "fedit", "seed": 43, "lr": 0.006, "partitioner": "natural"}
    run_dir = tmp_path / "somewhere" / "fedit-rmax-s43"
    run_dir.mkdir(parents=True)
    given = RunConfig.from_mapping({**settings, "out-dir": "/elsewhere", "run-name": "x"}).to_dict()
    (run_dir / "config.json").write_text(json.dumps({"given": given}))
    (run_dir / "metrics.jsonl").write_text("{}\n")
    (run_dir / "summary.json").write_text(json.dumps({"compute-dtype": "float32"}))
    (run_dir / "adapter").mkdir()  # models are not stored
    store = RunStore(tmp_path / "store")
    stored = store.put(run_dir, "natural", 7, "num-supernodes=7")
    assert stored.parent == tmp_path / "store" / "natural" and stored.name.startswith("fedit-rmax-s43-")
    assert sorted(p.name for p in stored.iterdir()) == ["config.json", "metrics.jsonl", "run.json", "summary.json"]
    assert json.loads((stored / "run.json").read_text())["num-supernodes"] == 7
    fresh = RunStore(tmp_path / "store")  # a later comparison reads the folder again
    assert fresh.find(settings, 7, "float32") == stored
    assert fresh.find({**settings, "rank-max": 8}, 7, "float32") == stored  # the default, given or not
    assert fresh.find({**settings, "lr": 0.003}, 7, "float32") is None  # any other value of any key: another run
    assert fresh.find({**settings, "seed": 42}, 7, "float32") is None
    assert fresh.find({**settings, "rank-max": 16}, 7, "float32") is None
    assert fresh.find(settings, 6, "float32") is None  # other nodes, other partitions
    assert fresh.find(settings, 7, "bfloat16") is None  # the same seed in other arithmetic is another run
    assert fresh.find({**settings, "precision": "fp32"}, 7, "float32") == stored  # the arithmetic is what counts
    assert store.put(run_dir, "natural", 7) == stored  # stored once
    # a key the app gained after the run was stored takes its default: the run is still found
    given.pop("profile")
    (stored / "config.json").write_text(json.dumps({"given": given}))
    assert RunStore(tmp_path / "store").find(settings, 7, "float32") == stored
    # a half-written copy is not a stored run
    (stored.parent / "x.partial").mkdir()
    for name in ("config.json", "summary.json", "metrics.jsonl", "run.json"):
        (stored.parent / "x.partial" / name).write_text((stored / name).read_text())
    assert list(RunStore(tmp_path / "store").index().values()) == [stored]


def test_stored_runs_are_reused_instead_of_run_again_and_their_tables_rebuilt(tmp_path):
    FakeFlower.runs = []
    first = ["compare", "--quick", "--out", str(tmp_path), "--name", "a", "--arms", "fedit-rmax",
             "--store", str(tmp_path / "store")]
    assert cli.compare(cli.resolve_options(cli.build_parser().parse_args(first)), [], say=lambda _: None,
                       flower_factory=FakeFlower) == 0
    assert FakeFlower.runs == ["fedit-rmax-s42"] and len(list((tmp_path / "store" / "natural").iterdir())) == 1
    second = ["compare", "--quick", "--out", str(tmp_path), "--name", "b", "--arms", "fedit-rmax,sa-fedlora",
              "--reuse", str(tmp_path / "store")]
    lines = []
    assert cli.compare(cli.resolve_options(cli.build_parser().parse_args(second)), [], say=lines.append,
                       flower_factory=FakeFlower) == 0
    assert FakeFlower.runs == ["fedit-rmax-s42", "sa-fedlora-s42"]  # fedit-rmax came from the store
    assert any("natural/fedit-rmax-s42: reused the stored run" in line for line in lines)
    summary = json.loads((tmp_path / "b" / "comparison.json").read_text())
    assert [(r["key"], r["status"]) for r in summary["runs"]] == [("natural/fedit-rmax-s42", "reused"),
                                                                  ("natural/sa-fedlora-s42", "finished")]
    rows = list(csv.DictReader((tmp_path / "b" / "table.csv").read_text().splitlines()))
    assert [(r["method"], r["seeds"]) for r in rows] == [("fedit-rmax", "1"), ("sa-fedlora", "1")]
    # the tables are rebuilt from the stored runs alone
    report = ["compare", "--quick", "--out", str(tmp_path), "--name", "d", "--arms", "fedit-rmax",
              "--reuse", str(tmp_path / "store"), "--report-only"]
    FakeFlower.runs = []
    assert cli.compare(cli.resolve_options(cli.build_parser().parse_args(report)), [], say=lambda _: None,
                       flower_factory=FakeFlower) == 0
    assert FakeFlower.runs == [] and "| natural | fedit-rmax | 1 |" in (tmp_path / "d" / "table.md").read_text()
    # --no-reuse runs it again
    FakeFlower.runs = []
    options = cli.resolve_options(cli.build_parser().parse_args([*second[:5], "c", *second[6:8], "--no-reuse"]))
    assert options.reuse is None
    assert cli.compare(options, [], say=lambda _: None, flower_factory=FakeFlower) == 0
    assert FakeFlower.runs == ["fedit-rmax-s42", "sa-fedlora-s42"]


def test_fixed_lr_multipliers_skip_the_search_for_those_methods_and_their_family(capsys, tmp_path):
    argv = ["compare", "--preset", "full", "--out", str(tmp_path), "--lr-search", "--lr-multipliers", "sa-fedlora=2",
            "--arms", "sa-fp16-rmin4,sa-all-r16,sa-qv-r16", "--splits", "natural", "--dry-run"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    search, comparison = out.split("comparison (")
    assert "lr search (3 runs on natural, tuning seed 41)" in search  # sa-all-r16 alone searches its own rate
    assert "natural/sa-all-r16-lrx0.5-s41" in search and "sa-qv-r16" not in search
    assert "natural/sa-qv-r16-lrx2-s42" in comparison  # sa-fedlora's fixed x2
    with pytest.raises(SystemExit):
        cli.main(["compare", "--lr-multipliers", "sa-fedlora=-1", "--dry-run"])
    assert "'sa-fedlora=-1' is not allowed" in capsys.readouterr().err


def test_the_32_round_levers_keep_the_presets_stage_shape():
    long_run = {"num-server-rounds": 32, **plan.stage_rounds(32)}
    for method in ("sa-fp16-rmin4-32r", "sa-all-r16-32r"):
        short = method.removesuffix("-32r")
        assert {k: v for k, v in plan.METHODS[method].items() if k not in long_run} == plan.METHODS[short]
        assert {k: plan.METHODS[method][k] for k in long_run} == long_run


def test_the_adapter_levers_are_the_accurate_profiles_adapter():
    from safedlora_app.core.profiles import ACCURATE_ADAPTER

    for method in ("sa-all-r16", "sa-all-r16-32r"):
        assert {k: plan.METHODS[method][k] for k in ACCURATE_ADAPTER} == ACCURATE_ADAPTER


def test_the_paper_reading_scales_both_rates_and_the_levers_cover_every_linear_layer():
    spec = plan.run_settings(BASE, "natural", "sa-paper-init", 42, 2.0)
    assert spec["lr"] == pytest.approx(2 * BASE["lr"]) and spec["full-lr"] == pytest.approx(2 * BASE["full-lr"])
    assert plan.run_settings(BASE, "natural", "sa-all-r16", 42, 2.0)["full-lr"] == BASE["full-lr"]
    for method in ("sa-all-r16", "fedit-all-r16"):
        assert plan.METHODS[method]["target-modules"] == "query,key,value,dense"
        assert plan.lr_source(method) == method


def test_the_lr_grid_extends_while_the_best_is_at_its_edge():
    assert plan.extend_lr_grid({0.5: 0.7, 1.0: 0.65, 2.0: 0.6}) == 4.0  # validation losses: lower is better
    assert plan.extend_lr_grid({0.5: 0.6, 1.0: 0.65, 2.0: 0.7}) == 0.25
    assert plan.extend_lr_grid({0.5: 0.7, 1.0: 0.6, 2.0: 0.65}) is None  # an inside optimum
    assert plan.extend_lr_grid({1.0: 0.75, 2.0: 0.7, 4.0: 0.65, 8.0: 0.6}) is None  # the limit, x8
    assert plan.extend_lr_grid({1.0: 0.7, 2.0: 0.6, 4.0: None}) is None  # x4 failed: not retried
    assert plan.extend_lr_grid({1.0: None}) is None


def test_lr_search_picks_each_methods_best_and_reuses_that_run(tmp_path, monkeypatch):
    FakeFlower.runs = []
    # Validation losses of the search (tuning seed 41); the reporting runs' test accuracy must not matter.
    loss = {"fedit-rmax-s41": 0.5, "fedit-rmax-lrx0.5-s41": 0.55, "fedit-rmax-lrx2-s41": 0.45,
            "fedit-rmax-lrx4-s41": 0.48, "fedit-rmax-lrx2-s42": 0.4}
    real_run = FakeFlower.run

    def run(self, run_config, timeout=600, federation="", progress=None):
        result = real_run(self, run_config, timeout, federation, progress)
        name = FakeFlower.runs[-1]
        run_dir = next(tmp_path.glob(f"s/runs/*/{name}"))
        summary = json.loads((run_dir / "summary.json").read_text())
        (run_dir / "summary.json").write_text(json.dumps({**summary, "final-val-loss": loss[name],
                                                          "final-accuracy": loss[name]}))
        return result

    monkeypatch.setattr(FakeFlower, "run", run)
    options = cli.resolve_options(cli.build_parser().parse_args(
        ["compare", "--quick", "--out", str(tmp_path), "--name", "s", "--arms", "fedit-rmax", "--lr-search",
         "--splits", "natural,dirichlet", "--store", str(tmp_path / "store")]))
    assert cli.compare(options, [], say=lambda _: None, flower_factory=FakeFlower) == 0
    # 3 search runs on natural, seed 41, chosen by validation loss; x2, the best, is the grid's edge, so x4
    # is tried too (and is worse); then both splits at the chosen x2 on the reporting seed 42
    assert FakeFlower.runs == ["fedit-rmax-s41", "fedit-rmax-lrx0.5-s41", "fedit-rmax-lrx2-s41",
                               "fedit-rmax-lrx4-s41", "fedit-rmax-lrx2-s42", "fedit-rmax-lrx2-s42"]
    summary = json.loads((tmp_path / "s" / "comparison.json").read_text())
    assert summary["chosen-lrs"]["fedit-rmax"]["multiplier"] == 2.0 and summary["settings"]["tune-seed"] == 41
    assert summary["chosen-lrs"]["fedit-rmax"]["bracketed"] is True  # x1 and x4 tried, both worse
    assert summary["chosen-lrs"]["fedit-rmax"]["lr"] == pytest.approx(0.006)  # x2 of the preset's 3e-3
    rows = list(csv.DictReader((tmp_path / "s" / "table.csv").read_text().splitlines()))
    assert [(r["split"], r["lr"], r["lr_multiplier"]) for r in rows] == [("natural", "0.006", "2.0"),
                                                                          ("dirichlet", "0.006", "2.0")]
    # --report-only from the stored runs alone makes the same choice: the extension's x4 is reused too.
    FakeFlower.runs = []
    report = cli.resolve_options(cli.build_parser().parse_args(
        ["compare", "--quick", "--out", str(tmp_path), "--name", "r", "--arms", "fedit-rmax", "--lr-search",
         "--splits", "natural,dirichlet", "--reuse", str(tmp_path / "store"), "--report-only"]))
    assert cli.compare(report, [], say=lambda _: None, flower_factory=FakeFlower) == 0
    assert FakeFlower.runs == []
    chosen = json.loads((tmp_path / "r" / "comparison.json").read_text())["chosen-lrs"]["fedit-rmax"]
    assert (chosen["multiplier"], chosen["bracketed"]) == (2.0, True)


# --- End to end through `flwr run` -----------------------------------------------------------------
TINY = ["--set", "local-samples=16", "--set", "test-size=48", "--set", "val-size=48", "--set", "batch-size=8",
        "--set", "eval-batch-size=48", "--set", "rank-max=4", "--set", "rank-min=1"]


@pytest.mark.e2e  # no xdist_group: its own SuperLink, on a worker beside test_e2e_simulation.py's
@pytest.mark.extended  # docs/testing.md: CI's tier leaves it out
def test_tiny_comparison_end_to_end_then_resume(tmp_path, capsys):
    argv = ["compare", "--quick", "--out", str(tmp_path), "--name", "tiny", "--arms", "fedit-rmax,sa-fedlora",
            "--splits", "natural", "--rounds", "2", "--target-accuracy", "0.4", *TINY]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert "[1/2] natural/fedit-rmax-s42: started" in first and "[2/2] natural/sa-fedlora-s42: finished in" in first
    root = tmp_path / "tiny"
    with (root / "table.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == tables.CSV_COLUMNS
    assert [(r["split"], r["method"], r["seeds"]) for r in rows] == [("natural", "fedit-rmax", "1"),
                                                                      ("natural", "sa-fedlora", "1")]
    for row in rows:
        run_dir = root / "runs" / "natural" / f"{row['method']}-s42"
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [line["round"] for line in lines] == [0, 1, 2]
        assert int(row["bytes_down"]) == sum(line["bytes-down"] for line in lines) > 0
        assert int(row["bytes_up"]) == sum(line["bytes-up"] for line in lines) > 0
        assert int(row["params_sent"]) == sum(line["params-down"] + line["params-up"] for line in lines)
        assert float(row["final_accuracy_mean"]) == pytest.approx(lines[-1]["accuracy"])
        assert row["dropped_replies"] == "0"
    fedit, sa = rows
    assert float(fedit["saving_vs_fedit_rmax_pct"]) == 0.0
    assert float(sa["saving_vs_fedit_rmax_pct"]) > 0  # round 2 anneals to rank-min
    assert fedit["saving_vs_fedavg_pct"] == ""  # no fedavg in this comparison
    for plot in ("accuracy_vs_round.png", "accuracy_vs_mb.png", "budget_vs_round.png", "sa-fedlora_ranks_vs_round.png"):
        assert (root / "plots" / "natural" / plot).stat().st_size > 1000
    assert "| natural | sa-fedlora | 1 |" in (root / "table.md").read_text()
    comparison = json.loads((root / "comparison.json").read_text())
    assert comparison["machine"]["cpu-count"] and comparison["machine"]["torch"]
    assert {r["status"] for r in comparison["runs"]} == {"finished"}
    assert comparison["runs"][0]["command"][1:3] == ["run", str(APP_ROOT)]

    # second invocation: nothing runs again
    stamp = (root / "runs/natural/sa-fedlora-s42/summary.json").stat().st_mtime
    assert cli.main(argv) == 0
    second = capsys.readouterr().out
    assert "2 runs, 2 finished earlier, 0 to run" in second and "started" not in second
    assert (root / "runs/natural/sa-fedlora-s42/summary.json").stat().st_mtime == stamp
    assert {r["status"] for r in json.loads((root / "comparison.json").read_text())["runs"]} == {"skipped"}


def test_sigterm_stops_a_comparison_like_ctrl_c_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with cli.sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this at once
    assert signal.getsignal(signal.SIGTERM) is before


def test_each_ablation_is_paired_against_sa_fedlora_and_fedit_rmax(tmp_path):
    FakeFlower.runs = []
    options = cli.resolve_options(cli.build_parser().parse_args(
        ["compare", "--quick", "--out", str(tmp_path), "--name", "a", "--arms",
         "fedit-rmax,sa-fedlora,sa-no-init,sa-fp16"]))
    assert cli.compare(options, [], say=lambda _: None, flower_factory=FakeFlower) == 0
    paired = json.loads((tmp_path / "a" / "comparison.json").read_text())["paired"]
    assert [(r["method"], r["reference"], r["pairs"]) for r in paired] == [
        ("sa-fedlora", "fedit-rmax", 1), ("sa-no-init", "sa-fedlora", 1), ("sa-no-init", "fedit-rmax", 1),
        ("sa-fp16", "sa-fedlora", 1), ("sa-fp16", "fedit-rmax", 1)]
    assert paired[1]["final_mean"] == 0.0 and paired[1]["final_low"] is None  # one pair: no interval


def test_a_finished_run_counts_by_its_arithmetic_not_the_precision_key_that_chose_it(tmp_path):
    # A float32 run made with precision 'auto' (on a CPU without bf16) is the run planned with 'fp32'
    # (as the store already treats it); a bfloat16 run is not.
    settings = {"method": "fedit", "seed": 42, "partitioner": "natural"}
    compare_runner = runner.Comparison(tmp_path)
    spec = plan.RunSpec("natural", "fedit-rmax", 42, 1.0, {**settings, "precision": "fp32"}, 7)
    run_dir = compare_runner.run_dir(spec)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"given": {**settings, "precision": "auto"}}))
    (run_dir / "summary.json").write_text(json.dumps({"compute-dtype": "float32"}))
    assert compare_runner.finished(spec)
    (run_dir / "summary.json").write_text(json.dumps({"compute-dtype": "bfloat16"}))
    with pytest.raises(plan.CompareError, match="computed in bfloat16, planned float32"):
        compare_runner.finished(spec)


def test_a_run_is_stopped_for_making_no_progress_not_for_being_slow(tmp_path):
    from safedlora_app.tools.simulation import run_watched

    progress = tmp_path / "metrics.jsonl"
    # 2 s of work, with a line every 0.2 s: slower than the 1-s limit in all, but never stalled.
    slow = [sys.executable, "-c", "import time\nfor i in range(10):\n"
            f"    open({str(progress)!r}, 'a').write(str(i) * (i + 1) + '\\n'); time.sleep(0.2)\nprint('done')"]
    result = run_watched(slow, dict(os.environ), tmp_path, timeout=1.0, progress=progress, poll=0.1)
    assert result.returncode == 0 and result.stdout.strip() == "done"
    stuck = [sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"]
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as error:
        run_watched(stuck, dict(os.environ), tmp_path, timeout=1.0, progress=tmp_path / "never", poll=0.1)
    assert time.monotonic() - started < 10 and "started" in error.value.stdout


def test_the_protocol_pairs_each_point_with_the_baselines_and_tunes_on_seed_41(tmp_path, monkeypatch):
    """Review of issue #36: the protocol's headline differences (the profile minus fedavg, the defaults minus
    fixed-rank LoRA) were never computed, as the pairing knew only sa-fedlora."""
    FakeFlower.runs = []
    real_run = FakeFlower.run
    final = {"fedavg": 0.70, "accurate": 0.72, "defaults": 0.68, "fedit-rmax": 0.66}

    def run(self, run_config, timeout=600, federation="", progress=None):
        result = real_run(self, run_config, timeout, federation, progress)
        run_dir = next(tmp_path.glob(f"p/runs/*/{FakeFlower.runs[-1]}"))
        method = next(m for m in final if FakeFlower.runs[-1].startswith(m + "-"))
        seed = int(FakeFlower.runs[-1].rsplit("-s", 1)[1])
        rows = records([0.4, final[method] + (seed - 42) / 100], 10, 20)
        for row in rows:
            row["val-loss"] = 1.0 - row["accuracy"]
        (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        summary = json.loads((run_dir / "summary.json").read_text())
        (run_dir / "summary.json").write_text(json.dumps({**summary, "final-val-loss": 0.3}))
        return result

    monkeypatch.setattr(FakeFlower, "run", run)
    options = cli.resolve_options(cli.build_parser().parse_args(
        ["compare", "--out", str(tmp_path), "--name", "p", "--splits", "natural", "--no-reuse"]))
    assert options.preset == "protocol" and options.lr_search and options.tune_seed == 41
    assert cli.compare(options, [], say=lambda _: None, flower_factory=FakeFlower) == 0
    assert {run.rsplit("-s", 1)[1] for run in FakeFlower.runs} == {"41", "42", "43", "44"}
    paired = {(p["method"], p["reference"]): p for p in json.loads((tmp_path / "p" / "comparison.json").read_text())
              ["paired"]}
    assert paired[("accurate", "fedavg")]["final_mean"] == pytest.approx(2.0)
    assert paired[("defaults", "fedit-rmax")]["final_mean"] == pytest.approx(2.0)
    assert paired[("accurate", "fedavg")]["pairs"] == 3
    assert "| natural | accurate − fedavg | 3 | +2.0" in (tmp_path / "p" / "table.md").read_text()


def test_arms_are_toml_files_checked_against_each_other(tmp_path):
    from safedlora_lab.compare.arms import ArmError, load_arms

    assert set(load_arms()) == set(plan.METHODS) and plan.ARMS["fedprox"].lr_source == "fedavg"
    assert plan.ARMS["sa-no-init"].lr_source == "sa-fedlora" and plan.FULL_METHODS == ("fedavg", "fedprox")
    (tmp_path / "own.toml").write_text('description = "x"\nlr = "own"\n[run-config]\nmethod = "fedit"\n')
    (tmp_path / "other.toml").write_text('description = "y"\nlr = "own"\npaired-against = ["own"]\n')
    arms = load_arms(tmp_path)
    assert arms["own"].run_config == {"method": "fedit"} and arms["other"].paired_against == ("own",)
    for text, message in [('description = "z"\nlr = "nobody"\n', "lr = 'nobody' must be 'own' or an arm"),
                          ('description = "z"\npaired-against = ["ghost"]\nlr = "own"\n', "names no arm: ghost"),
                          ('description = "z"\nrate = 2\n', r"unknown key\(s\) rate; allowed: description"),
                          ('description = ""\n', "description must be a non-empty string"),
                          ('description = "z"\nheadline = "false"\n',
                           "headline = 'false' is not allowed; it must be true or false")]:
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(ArmError, match=message):
            load_arms(tmp_path)


def test_the_language_model_comparison_rebuilds_its_committed_table(tmp_path, capsys):
    committed = APP_ROOT / "docs" / "results" / "causal-lm"
    shutil.copytree(committed / "runs", tmp_path / "causal-lm" / "runs")
    assert cli.main(["compare", "--task", "causal-lm", "--report-only", "--seeds", "5", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "causal-lm" / "table.md").read_text() == (committed / "table.md").read_text()
    assert "+0.0467 (95% interval +0.0376 to +0.0558)" in capsys.readouterr().out


def test_the_language_model_comparison_refuses_the_options_it_does_not_read(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compare", "--task", "causal-lm", "--splits", "natural", "--lr-search"])
    assert exit_.value.code == 2
    assert ("--splits, --lr-search: not allowed with --task causal-lm; allowed: --arms, --name, --out, "
            "--report-only, --seeds, --set") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["compare", "--task", "causal-lm", "--arms", "sa-fedlora,fedavg"])
    assert "--arms fedavg: not allowed with --task causal-lm; choose from: sa-fedlora, fedit-rmax, ffa-lora" in \
        capsys.readouterr().err


def test_the_language_model_comparison_checks_its_name_and_every_runs_config_first(capsys, tmp_path):
    for args, message in [(["--name", "a/b"], "--name = 'a/b' is not allowed; it must be a plain directory name"),
                          (["--set", "rank-min=9"], "sa-fedlora: rank-min = 9 is not allowed; it must be <= rank-max"),
                          (["--out", str(APP_ROOT / "docs")], "lies inside the app directory")]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["compare", "--task", "causal-lm", *(["--out", str(tmp_path)] if "--out" not in args else []),
                      *args])
        assert exit_.value.code == 2 and message in capsys.readouterr().err, args
    assert not any(tmp_path.iterdir())  # nothing ran


def test_without_the_lab_extra_the_command_says_what_to_install(monkeypatch, capsys, tmp_path):
    for module in ("safedlora_lab.compare.lm", "safedlora_lab.compare.tables"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ModuleNotFoundError
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compare", "--task", "causal-lm", "--report-only", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert 'pandas is missing: the lab needs its extra (pip install -c constraints.txt -e ".[lab]"' in \
        capsys.readouterr().err
