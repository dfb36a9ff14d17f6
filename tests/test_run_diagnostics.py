"""safedlora_lab.run_diagnostics on a hand-made comparison directory: the runs at the multiplier each method used."""

import json

from safedlora_lab import run_diagnostics


def write_run(run_dir, rounds):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rounds) + "\n")
    (run_dir / "summary.json").write_text("{}")


def test_it_reads_each_methods_run_at_its_chosen_lr_and_prints_the_series(tmp_path, capsys):
    (tmp_path / "comparison.json").write_text(json.dumps({"rows": [
        {"split": "natural", "method": "sa-fedlora", "lr_multiplier": 2.0},
        {"split": "natural", "method": "fedit-rmax", "lr_multiplier": 1.0},
        {"split": "dirichlet", "method": "sa-fedlora", "lr_multiplier": 2.0}]}))
    initial = {"round": 0, "loss": 1.1, "train-loss": None, "factor-norms": {}}
    write_run(tmp_path / "runs/natural/sa-fedlora-lrx2-s42", [initial, {
        "round": 1, "loss": None, "train-loss": 0.8, "dropped-update": 0.125, "first-step-a-ratio": 0.0,
        "factor-norms": {"B": 0.5, "A": 0.5}}, {"round": 2, "loss": 0.9, "train-loss": 0.7, "dropped-update": 0.01,
                                                  "first-step-a-ratio": 0.3, "factor-norms": {"B": 0.6, "A": 0.6}}])
    write_run(tmp_path / "runs/natural/sa-fedlora-s42", [initial])  # another lr: not the one used
    write_run(tmp_path / "runs/natural/fedit-rmax-s42", [initial, {"round": 1, "loss": 0.95, "train-loss": 0.81,
                                                                   "factor-norms": {"B": 0.4, "A": 1.7}}])
    assert run_diagnostics.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "runs: sa-fedlora-lrx2-s42, fedit-rmax-s42." in out
    assert "| sa-fedlora | 1.100 0.900 |" in out and "| fedit-rmax | 1.100 0.950 |" in out  # round 0, evaluated
    assert "| sa-fedlora | 12.5 1.0 |" in out and "| fedit-rmax | – |" in out  # dropped update in %
    assert "| sa-fedlora | 0.0 30.0 |" in out and "| fedit-rmax | 1.700 |" in out


def test_a_missing_comparison_or_run_is_named(tmp_path, capsys):
    assert run_diagnostics.main([str(tmp_path)]) == 2
    assert "comparison.json does not exist" in capsys.readouterr().err
    (tmp_path / "comparison.json").write_text(json.dumps({"rows": []}))
    assert run_diagnostics.main([str(tmp_path), "--seed", "7"]) == 2
    assert "no finished run of split 'natural' with seed 7" in capsys.readouterr().err
