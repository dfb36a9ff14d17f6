"""lab/safedlora_lab/small_dataset_check.py: the skewed set's class shares and site mixes, and one run's summary."""

import csv
import json
from collections import Counter

import pytest

from safedlora_lab import small_dataset_check as check


def test_the_skewed_set_has_a_65_percent_majority_and_two_sites_with_different_mixes(tmp_path):
    rows = check.write_skewed_csv(tmp_path / "skewed.csv")
    assert Counter(label for label, _ in rows) == {"negative": 650, "neutral": 200, "positive": 150}
    by_site = {site: Counter(label for label, s in rows if s == site) for site in "ab"}
    assert by_site["a"]["neutral"] > 5 * by_site["b"]["neutral"]
    assert by_site["b"]["positive"] > 5 * by_site["a"]["positive"]
    assert 0.4 < by_site["a"]["negative"] / 650 < 0.6
    with (tmp_path / "skewed.csv").open() as handle:
        written = list(csv.DictReader(handle))
    assert len(written) == 1000 and set(written[0]) == {"text", "label", "site"} and all(r["text"] for r in written)
    assert check.write_skewed_csv(tmp_path / "again.csv") == rows  # seeded


def test_the_summary_reads_the_best_round_and_the_lowest_held_out_loss_after_round_0(tmp_path):
    rounds = [{"round": 0, "accuracy": 0.65, "macro-f1": 0.26, "loss": 0.5},  # round 0's loss is not a candidate
              {"round": 1, "accuracy": 0.70, "macro-f1": 0.50, "loss": 0.9},
              {"round": 2, "accuracy": 0.74, "macro-f1": 0.60, "loss": 0.7},
              {"round": 3, "accuracy": None, "macro-f1": None, "loss": None},  # not evaluated
              {"round": 4, "accuracy": 0.72, "macro-f1": 0.62, "loss": 0.8}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rounds) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps({"final-macro-f1": 0.62, "best-model-round": 2}))
    run = check.summarise(tmp_path)
    assert run["final"] == 0.72 and run["best"] == 0.74 and run["last3"] == pytest.approx((0.70 + 0.74 + 0.72) / 3)
    assert run["lowest-loss-round"] == 2 and run["best-model-round"] == 2
    assert run["accuracy-by-round"] == [0.65, 0.70, 0.74, 0.72]


def test_an_unknown_variant_is_named_with_the_allowed_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["small_dataset_check.py", "--out", str(tmp_path), "--variants", "more-epochs"])
    with pytest.raises(SystemExit):
        check.main()
    err = capsys.readouterr().err
    assert "more-epochs" in err and "whole-share-prox" in err


def test_results_keep_the_runs_of_an_earlier_invocation(tmp_path):
    path = tmp_path / "results.json"
    first = [{"method": "sa-fedlora", "variant": "whole-share", "seed": 42, "final": 0.7}]
    check.write_results(path, "skewed", first, ["negative", "neutral", "positive"])
    second = [{"method": "fedit", "variant": "whole-share", "seed": 42, "final": 0.6},
              {"method": "sa-fedlora", "variant": "whole-share", "seed": 42, "final": 0.75}]  # ran again: replaces
    check.write_results(path, "skewed", second, ["negative", "neutral", "positive"])
    runs = json.loads(path.read_text())["runs"]
    assert [(r["method"], r["final"]) for r in runs] == [("fedit", 0.6), ("sa-fedlora", 0.75)]
