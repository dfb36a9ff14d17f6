"""Run-config validation: one clear error naming key, value and what is allowed."""

import dataclasses
import tomllib
import typing
from pathlib import Path

import pytest

from safedlora_app.core.config import PRESET_KEYS, UNSET, ConfigError, RunConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def run_config():
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_declares_every_key_with_the_dataclass_default():
    declared = run_config()
    assert RunConfig.from_mapping(declared) == RunConfig()
    assert set(declared) == set(RunConfig().to_dict())
    # The keys a task or profile may set are "not set" there, so that a value given equal to the default wins.
    assert {key for key, value in declared.items() if value == UNSET} == set(PRESET_KEYS)


@pytest.mark.parametrize("given, key, expected", [
    ({"profile": "accurate", "lr": 0.003}, "lr", 0.003),
    ({"profile": "accurate", "num-server-rounds": 12}, "num-server-rounds", 12),
    ({"task": "causal-lm", "rank-min": 4}, "rank-min", 4),
    ({"task": "causal-lm", "factor-form": "balanced"}, "factor-form", "balanced"),
    ({"profile": "accurate"}, "lr", 1.5e-3),  # left alone: the profile's
    ({"task": "causal-lm"}, "rank-min", 1),  # left alone: the task's
    ({"task": "causal-lm", "profile": "accurate"}, "lr", 1e-3),  # the task's before the profile's
    ({"task": "causal-lm", "profile": "accurate"}, "rank-max", 16),  # the profile's where the task sets none
])
def test_a_key_given_wins_over_the_task_and_profile_even_at_the_app_default(given, key, expected):
    """Issue #36: Flower merges pyproject's defaults into the run config; a value equal to the default used to
    count as left alone (profile='accurate' lr=0.003 trained at 1.5e-3)."""
    config = RunConfig.from_mapping({**run_config(), **given})
    assert config.to_dict()[key] == expected


@pytest.mark.parametrize("overrides, message", [
    ({"method": "fedsgd"},
     "method = 'fedsgd' is not allowed; choose one of: sa-fedlora, fedavg, fedprox, fedit, ffa-lora"),
    ({"schedule": "quadratic"}, "schedule = 'quadratic' is not allowed; choose one of: cubic, linear"),
    ({"rank-min": 9, "rank-max": 8}, "rank-min = 9 is not allowed; it must be <= rank-max = 8"),
    ({"init-rounds": 13}, "init-rounds = 13 is not allowed; it must be <= num-server-rounds = 12"),
    ({"num-server-rounds": 3, "heat-rounds": 3}, "heat-rounds + cool-rounds = 3 + 0 is not allowed"),
    ({"heat-fraction": 1.5}, "heat-fraction = 1.5 is not allowed; it must be in [0, 1]"),
    ({"aggregation": "mean"}, "aggregation = 'mean' is not allowed; choose one of: product, factors"),
    ({"central-eval": False}, "central-eval = false is not allowed with label-names = ''"),
    ({"wire-dtype": "bfloat16"}, "wire-dtype = 'bfloat16' is not allowed; choose one of: float32, float16"),
    ({"resume": True, "run-name": ""}, "resume = true is not allowed with run-name = ''"),
    ({"round-deadline-factor": -1.0}, "round-deadline-factor = -1.0 is not allowed; it must be >= 0"),
    ({"prox-mu": -0.1}, "prox-mu = -0.1 is not allowed; it must be >= 0"),
    ({"heat-rounds": 6, "cool-rounds": 6}, "heat-rounds + cool-rounds = 6 + 6 is not allowed"),
    ({"rank-floor": 3, "rank-min": 2}, "rank-floor = 3 is not allowed; it must be <= rank-min = 2"),
    ({"lr": 0.0}, "lr = 0.0 is not allowed; it must be > 0"),
    ({"fraction-train": 1.5}, "fraction-train = 1.5 is not allowed; it must be in (0, 1]"),
    ({"partitioner": "shards"},
     "partitioner = 'shards' is not allowed; choose one of: natural, dirichlet, inner-dirichlet, iid"),
    ({"out-dir": "runs"}, "out-dir = 'runs' is not allowed; it must be absolute or start with '~'"),
    ({"num-server-rounds": "ten"}, "num-server-rounds = 'ten' is not allowed; it must be of type int"),
    ({"rank-max": 2.5}, "rank-max = 2.5 is not allowed; it must be of type int"),
    ({"target-modules": " , "}, "target-modules = '' is not allowed"),
    ({"learning-rate": 0.1}, "unknown run-config key 'learning-rate'; known keys:"),
])
def test_bad_values_are_rejected_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_mapping({**run_config(), **overrides})
    assert message in str(error.value)


def test_toml_integers_become_floats_where_floats_are_expected():
    assert RunConfig.from_mapping({"lr": 1, "rank-max": 4.0}).lr == 1.0
    assert RunConfig(lr=1, rank_max=4.0) == RunConfig(lr=1.0, rank_max=4)  # however the config is made


@pytest.mark.parametrize("make", [
    lambda: RunConfig(lr=0.0),
    lambda: dataclasses.replace(RunConfig(), rank_min=9),
    lambda: dataclasses.replace(RunConfig(), method="fedsgd"),
    lambda: RunConfig(batch_size=True),
])
def test_no_way_of_making_a_config_skips_validation(make):
    with pytest.raises(ConfigError, match="is not allowed"):
        make()


def test_choices_are_the_literal_types_and_match_what_uses_them():
    from safedlora_app.core import config
    from safedlora_app.core.schedule import LR_DECAYS, SHRINK_CURVES

    assert typing.get_args(config.Schedule) == tuple(SHRINK_CURVES) and set(config.LrDecay.__args__) == set(LR_DECAYS)
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    assert config.allowed(fields["method"]) == "one of: sa-fedlora, fedavg, fedprox, fedit, ffa-lora"
    assert config.allowed(fields["fraction_train"]) == "in (0, 1]" and config.allowed(fields["lr"]) == "> 0"
    assert config.allowed(fields["model_name"]) == ""


def test_validation_reads_no_file_and_the_label_list_checks_the_names(tmp_path, monkeypatch):
    config = RunConfig(label_names=str(tmp_path / "labels.txt"), central_eval=False)
    monkeypatch.setattr("builtins.open", lambda *a, **k: pytest.fail("validation opened a file"))
    config.validate()
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="label-names = 'pos,pos' is not allowed; give at least 2 distinct class"):
        RunConfig(label_names="pos,pos").label_list()


def test_method_presets_override_stage_keys():
    fedit = RunConfig(method="fedit").effective
    stage_keys = (fedit.init_rounds, fedit.schedule, fedit.allocation, fedit.aggregation)
    assert stage_keys == (0, "constant", "uniform", "factors")
    fedavg = RunConfig(method="fedavg", prox_mu=0.5).effective
    assert fedavg.init_rounds == fedavg.num_server_rounds and fedavg.init_trainable == "full" and fedavg.prox_mu == 0.0
    assert RunConfig(method="fedprox", prox_mu=0.5).effective.prox_mu == 0.5
    # fedit ignores sa-fedlora's stage constraints (e.g. init-rounds left at its default), heating and cooling
    # included: its budget is constant, so explicit phases that would not fit are dropped, not a crash in round 1.
    RunConfig.from_mapping({"method": "fedit", "init-rounds": 11, "num-server-rounds": 3})
    fedit = RunConfig.from_mapping({"method": "fedit", "num-server-rounds": 2, "heat-rounds": 2, "cool-rounds": 1})
    assert (fedit.effective.heat_rounds, fedit.effective.cool_rounds) == (0, 0)
    from safedlora_app.core.round_plan import budget
    assert [budget(fedit.effective, r, 12) for r in (1, 2)] == [96, 96]


def test_node_config_overrides_client_side_keys_only():
    config = RunConfig().with_node_config({"batch-size": 4, "torch-threads": 1, "partition-id": 0, "lr": 9.0})
    assert (config.batch_size, config.torch_threads, config.lr) == (4, 1, RunConfig().lr)  # lr is not a node key
    with pytest.raises(ConfigError, match="node-config batch-size = 'big' is not allowed; it must be of type int"):
        RunConfig().with_node_config({"batch-size": "big"})
    with pytest.raises(ConfigError, match="max-seq-len = 2 is not allowed; it must be >= 8"):
        RunConfig().with_node_config({"max-seq-len": 2})


@pytest.mark.parametrize("rounds, init, heat, cool", [
    (1, 1, 0, 0),  # one initiating round, nothing left to anneal
    (2, 1, 0, 0),
    (3, 1, 0, 0),
    (12, 1, 1, 2),  # the default run: 11 annealing rounds, 10% heating, 20% cooling
    (31, 1, 3, 6),
])
def test_num_server_rounds_alone_scales_the_phases(rounds, init, heat, cool):
    config = RunConfig.from_mapping({**run_config(), "num-server-rounds": rounds}).effective
    assert (config.init_rounds, config.heat_rounds, config.cool_rounds) == (init, heat, cool)


def test_explicit_phase_rounds_are_kept_and_the_other_phase_gives_way():
    config = RunConfig.from_mapping({**run_config(), "num-server-rounds": 6, "heat-rounds": 4}).effective
    assert (config.heat_rounds, config.cool_rounds) == (4, 1)  # cool: 20% of 5 rounds, within the 1 left
    config = RunConfig.from_mapping({**run_config(), "num-server-rounds": 6, "heat-rounds": 5}).effective
    assert (config.heat_rounds, config.cool_rounds) == (5, 0)


def test_the_old_aggregation_name_still_works_with_a_warning():
    with pytest.warns(FutureWarning, match="aggregation = 'fedavg' is deprecated; use aggregation = 'factors'"):
        config = RunConfig.from_mapping({"aggregation": "fedavg"})
    assert config.aggregation == "factors"


def test_the_configuration_page_table_is_the_one_generated_from_run_config():
    import config_table  # scripts/config_table.py (pytest's pythonpath)

    page = config_table.DOC.read_text()  # docs/configuration.md
    assert config_table.doc_table(page) == config_table.table(), "run: python scripts/config_table.py --write"
    assert all(f.metadata.get("help") for f in dataclasses.fields(RunConfig))


def test_label_names_from_a_list_or_a_file(tmp_path):
    assert RunConfig(label_names=" neg, neu ,pos").label_list() == ("neg", "neu", "pos")
    names = tmp_path / "labels.txt"
    names.write_text("sad\n\nhappy\n")
    assert RunConfig(label_names=str(names)).label_list() == ("sad", "happy")
    assert RunConfig().label_list() == ()


def test_a_profile_replaces_defaults_only():
    config = RunConfig.from_mapping({**run_config(), "profile": "accurate"})
    assert (config.target_modules, config.rank_max, config.rank_min, config.lr, config.num_server_rounds) == (
        "query,key,value,dense", 16, 8, 1.5e-3, 12)  # the run's rounds: the profile sets none
    assert RunConfig.from_mapping(config.to_dict()) == config  # a resolved config reads back unchanged
    given = RunConfig.from_mapping({**run_config(), "profile": "accurate", "num-server-rounds": 40, "rank-min": 2})
    assert (given.num_server_rounds, given.rank_min, given.rank_max) == (40, 2, 16)  # given values win
    with pytest.raises(ConfigError, match="profile = 'fast' is not allowed; choose one of: '', accurate"):
        RunConfig.from_mapping({"profile": "fast"})


def test_the_accurate_profile_is_what_the_comparison_runs():
    """Issue #36, "the row is its key": the protocol runs the profile as shipped, with no key of its own but the
    searched rate, which is the profile's (x1)."""
    from safedlora_app.core.profiles import ACCURATE_ADAPTER, PROFILES
    from safedlora_lab.compare.plan import METHODS, PRESETS, run_settings

    assert METHODS["accurate"] == {"profile": "accurate"} and METHODS["defaults"] == {}
    assert PROFILES["accurate"] == {**ACCURATE_ADAPTER, "lr": 1.5e-3}  # no rounds: the run's, like fedavg's
    protocol = PRESETS["protocol"]
    assert not {"rank-max", "rank-min", "target-modules", "lr", "num-server-rounds"} & set(protocol.settings)
    row = run_settings({**protocol.settings, "num-server-rounds": 16}, "natural", "accurate", 42)
    given = RunConfig.from_mapping({**run_config(), **row})
    shipped = RunConfig.from_mapping({**run_config(), **protocol.settings, "num-server-rounds": 16,
                                      "partitioner": "natural", "seed": 42, "profile": "accurate"})
    assert given == shipped


def test_node_config_text_writes_what_the_node_config_reads_back():
    from flwr.common.config import parse_config_args

    from safedlora_app.core.profiles import LOW_MEMORY_NODE, node_config_text

    values = {**LOW_MEMORY_NODE, "data-path": "/data/local file.csv", "lr": 0.5}
    assert parse_config_args([node_config_text(values)]) == values
    for bad in (True, "it's", None):
        with pytest.raises(TypeError, match="node-config key"):
            node_config_text({"key": bad})
