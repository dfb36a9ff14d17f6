"""Methods, splits, presets and costs of a comparison, and its planning (pure, no I/O).

What runs: :data:`METHODS` x :data:`SPLITS` x seeds (x lr multipliers), each a :class:`RunSpec` with its
complete run-config; plus the resolved options (:class:`CompareOptions`), the ``--run-config`` formatting and
the run-time estimate.

``--help`` imports this module, so it imports the app's config only where it is used: the config pulls in torch.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .arms import ArmError, load_arms

# --- Methods (the arms, one TOML file each: arms.py) and splits ---------------------------------------------
ARMS = load_arms()
#: label -> run-config overrides. ``"{rank-min}"`` is replaced by the settings' rank-min.
METHODS: dict[str, dict[str, Any]] = {name: dict(arm.run_config) for name, arm in ARMS.items()}
METHOD_DESCRIPTIONS = {name: arm.description for name, arm in ARMS.items()}
#: What a user knows a method as, where it is one of the app's two points or a baseline (plot legends).
USER_NAMES = {name: arm.user_name for name, arm in ARMS.items() if arm.user_name}
FULL_METHODS = tuple(name for name, arm in ARMS.items() if arm.full_model)
FULL_PRESET_METHODS = ("fedavg", "fedit-rmax", "sa-fedlora", "sa-no-init", "sa-no-anneal", "sa-uniform", "sa-ab-avg",
                       "sa-orth-a", "sa-fp16", "sa-short-cool", "sa-half-capped", "sa-fp16-rmin4",
                       "sa-fp16-rmin6")
#: Methods repeated over every seed (on the headline splits); the others run on the ablation seeds and splits.
HEADLINE = tuple(name for name, arm in ARMS.items() if arm.headline)
#: Methods that ``--lr-search`` searches for themselves (the others take their family's rate, :func:`lr_source`).
OWN_LR_SEARCH = tuple(name for name, arm in ARMS.items() if arm.lr == "own")
#: Byte savings are reported against these (per split): the tables have one column for each.
REFERENCES = ("fedavg", "fedit-rmax")
if (marked := tuple(name for name, arm in ARMS.items() if arm.reference)) != REFERENCES:
    raise ArmError(f"the arms marked reference = true are {marked}; the tables report savings against exactly "
                   f"{REFERENCES}")
#: The protocol's claims: each of the app's points minus the baselines (and the lean point), paired by seed.
PROTOCOL_PAIRS = {name: arm.paired_against for name, arm in ARMS.items() if arm.paired_against}

#: split -> (run-config settings, number of supernodes). Same for every method.
SPLITS: dict[str, tuple[dict[str, Any], int]] = {
    # One client per topic of the default tweets (7 topics, see data.TOPICS).
    "natural": ({"partitioner": "natural"}, 7),
    # Label skew; 7 clients too, so the two splits differ in the kind of heterogeneity only.
    "dirichlet": ({"partitioner": "dirichlet", "dirichlet-alpha": 0.5}, 7),
}
FEDERATION = "num-supernodes={n} client-resources-num-cpus=1"
#: Multipliers of the preset's lr / full-lr tried by ``--lr-search`` (lr 1.5e-3 to 6e-3, full-lr 5e-5 to 2e-4).
LR_GRID = (1.0, 0.5, 2.0)
#: While a method's best multiplier is the grid's largest (smallest), the search tries twice (half) it, up to here.
LR_EXTENSION_LIMIT = 8.0
FIRST_SEED = 42
#: The seed every learning-rate search runs on: not one of the reporting seeds (FIRST_SEED on), so that no
#: reported number was also a choice.
TUNE_SEED = 41


@dataclass(frozen=True)
class Preset:
    """What one comparison runs, apart from the per-method and per-split overrides."""

    name: str
    seeds: int
    splits: tuple[str, ...]
    methods: tuple[str, ...]
    rounds: int
    target_accuracy: float
    settings: Mapping[str, Any]
    """Run-config keys shared by every run (besides rounds and stage lengths, see :func:`stage_rounds`)."""
    ablation_seeds: int = 1
    """Seeds for the methods outside ``HEADLINE`` (the first ones)."""
    ablation_splits: tuple[str, ...] | None = None
    """Splits for the methods outside ``HEADLINE`` (``None``: every split)."""
    lr_search: bool = False
    """Whether the learning-rate search runs without ``--lr-search``."""
    shared_stages: bool = True
    """Whether every run gets the preset's stage lengths (:func:`stage_rounds`) and its base ``lr``/``full-lr``;
    ``False``: each method keeps the app's (or its profile's), so that a row is exactly its key."""


_COMMON = {
    "rank-max": 8,
    "rank-min": 2,
    # Every client trains every round. The app samples nodes by their node id, which Flower's simulation
    # draws at random per run, so with fraction-train < 1 two runs with the same seed would train different
    # partitions in the same round: methods would not see the same clients.
    "fraction-train": 1.0,
    "min-nodes": 7,
    "batch-size": 16,
    "local-epochs": 1,
    # The stable regime of the pilot (docs/comparison.md, bench/stability_pilot.py): with a constant lr the
    # global loss alternated every round for every method; a cosine decay over the rounds damps it.
    "lr": 3e-3,
    "full-lr": 1e-4,
    "lr-decay": "cosine",
    "eval-batch-size": 100,
    # Bytes are compared with fedit at float32 (issue #13), and every run so far sent float32: the float16
    # methods (sa-fp16*) say so themselves, although float16 is the app's default.
    "wire-dtype": "float32",
}
#: What every arm of the protocol shares: the federation, the data and the evaluation (docs/comparison.md,
#: "The protocol"). Nothing of a method: each arm is the app's defaults plus its row's key.
_FEDERATION_ONLY = {
    "fraction-train": 1.0, "min-nodes": 7, "local-samples": 160, "batch-size": 16, "local-epochs": 1,
    "test-size": 2000, "val-size": 1000, "eval-every": 2, "eval-batch-size": 100, "wire-dtype": "float16",
    # The centre (x1) of fedavg's rate grid, as in the earlier comparisons (only fedavg reads it).
    "full-lr": 1e-4,
}
PRESETS = {
    # The protocol of issue #36: the app's points as shipped against full fine-tuning and fixed-rank LoRA, at
    # equal rounds and wire precision, rates searched on the validation split of a tuning seed (41), reported
    # on seeds 42-44 of both splits.
    "protocol": Preset(
        name="protocol", seeds=3, splits=("natural", "dirichlet"), methods=("fedavg", "accurate", "defaults",
                                                                             "fedit-rmax"),
        rounds=16, target_accuracy=0.6, settings=_FEDERATION_ONLY, lr_search=True, shared_stages=False,
    ),
    # Headline methods x 2 splits x 4 seeds (3 left the natural split's paired interval at +-1.6 points),
    # sa-fedlora's ablations on the natural split x 2 seeds; 16 rounds of 10 local steps (160 samples), 2,000
    # test tweets evaluated every 4th round and in the last 3. fedprox and fedit-rmin: --methods.
    "full": Preset(
        name="full", seeds=4, splits=("natural", "dirichlet"), methods=FULL_PRESET_METHODS, rounds=16,
        target_accuracy=0.6,
        settings={**_COMMON, "local-samples": 160, "test-size": 2000, "val-size": 1000, "eval-every": 4},
        ablation_seeds=2, ablation_splits=("natural",),
    ),
    # A smoke of the whole pipeline: every method but the 32-round ones, one split, one seed, 3 rounds, tiny data,
    # 2 clients per round (with all 7 the first round's model loads and 4 waves took it to 10.4 min on a busy
    # machine); ~10 min by --dry-run's estimate with the 19 methods of 2026-12 (not timed whole).
    "quick": Preset(
        name="quick", seeds=1, splits=("natural",), rounds=3,
        methods=tuple(m for m in METHODS if "num-server-rounds" not in METHODS[m]),  # not the 32-round levers
        target_accuracy=0.45,
        settings={**_COMMON, "fraction-train": 0.01, "min-nodes": 2, "local-samples": 16, "test-size": 100,
                  "val-size": 100},
    ),
}

#: Seconds per unit on this 2-core machine (bf16, bench/README.md); only for the ETA and --dry-run's estimate.
COSTS = {
    "startup": 15.0,             # one `flwr run`: ServerApp + simulation start, model and data loads
    "first-round": 8.0,          # the first client round: actors load the model and tokenize partitions
    "round-overhead": 2.0,       # per round: Flower's messaging, each client building its LoRA model
    "eval-per-row": 0.0013,      # central evaluation of one held-out row
    "lora-per-sample": 0.0105,   # one client, one LoRA training sample (incl. per-client overhead)
    "full-per-sample": 0.022,    # one client, one full fine-tuning sample
    "full-transfer": 0.5,        # per client and full round: ~91 MB down + ~91 MB up through the SuperLink
    "parallel-clients": 2,       # clients trained at once (2 cores, client-resources-num-cpus=1)
}


class CompareError(ValueError):
    """A bad command-line value; the message names the value and what is allowed."""


@dataclass(frozen=True)
class CompareOptions:
    """One comparison, resolved from the command line (``cli.resolve_options``) and checked.

    Attributes
    ----------
    preset : str
        Name of the preset in ``PRESETS`` that filled in what the command line left out.
    root : Path
        ``<out>/<name>``, absolute: where the runs, tables and plots go.
    seeds : tuple of int
        Every reporting seed of the comparison (``FIRST_SEED`` on); the headline methods run all of them on the
        headline splits.
    tune_seed : int
        The seed the lr search runs on; never a reporting seed.
    splits, methods : tuple of str
        Keys of ``SPLITS`` and ``METHODS``, in the order of the tables.
    target : float
        Accuracy (a fraction) for the rounds- and MB-to-target columns.
    settings : mapping
        The run-config shared by every run (kebab-case keys), before the split's and method's overrides.
    lr_search : bool
        Search each method's learning-rate multiplier on the first split and seed first.
    fixed_lrs : mapping
        ``{method: multiplier}`` fixed by ``--lr-multipliers``: those methods, and the methods that take their
        rate, are not searched.
    ablation_seeds : int
        Seeds (the first ones) for the methods outside ``HEADLINE``, and for the headline methods outside
        ``headline_splits``.
    ablation_splits : tuple of str, optional
        Splits on which the methods outside ``HEADLINE`` run (``None``: every split).
    headline_splits : tuple of str, optional
        Splits on which the headline methods run every seed (``None``: every split).
    dry_run : bool
        Print the plan and run nothing.
    report_only : bool
        Write the tables from the runs finished so far and run nothing.
    reuse : Path, optional
        Stored runs to copy in instead of running them again (``None``: run everything).
    store : Path, optional
        Where every run finished here is stored (``None``: nowhere).
    """

    preset: str
    root: Path
    seeds: tuple[int, ...]
    splits: tuple[str, ...]
    methods: tuple[str, ...]
    target: float
    settings: Mapping[str, Any] = field(hash=False)
    tune_seed: int = TUNE_SEED
    lr_search: bool = False
    fixed_lrs: Mapping[str, float] = field(default_factory=dict, hash=False)
    ablation_seeds: int = 1
    ablation_splits: tuple[str, ...] | None = None
    headline_splits: tuple[str, ...] | None = None
    dry_run: bool = False
    report_only: bool = False
    reuse: Path | None = None
    store: Path | None = None

    def plan(self, lr_multipliers: Mapping[str, float] | None = None) -> list[RunSpec]:
        """The comparison's runs at ``lr_multipliers`` (see :func:`plan_runs`)."""
        return plan_runs(self.settings, self.methods, self.splits, self.seeds, lr_multipliers, self.ablation_seeds,
                         self.ablation_splits, self.headline_splits)


# --- Planning (pure) -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One planned run: a split, a method, a seed and a learning-rate multiplier.

    Attributes
    ----------
    split, method : str
        Keys of ``SPLITS`` and ``METHODS``.
    seed : int
        Run seed (partitions, client sampling, initialisation).
    lr_multiplier : float
        Multiplier of ``lr`` (LoRA methods) or ``full-lr`` (full fine-tuning methods).
    settings : dict
        The complete run-config (kebab-case keys) except ``out-dir`` and ``run-name``.
    num_supernodes : int
        Simulated nodes (``--federation-config num-supernodes=N``).
    """

    split: str
    method: str
    seed: int
    lr_multiplier: float
    settings: Mapping[str, Any] = field(hash=False)
    num_supernodes: int = 7

    @property
    def run_name(self) -> str:
        """``<method>-s<seed>``, or ``<method>-lrx<m>-s<seed>`` at another lr multiplier."""
        lr = "" if self.lr_multiplier == 1.0 else f"-lrx{self.lr_multiplier:g}"
        return f"{self.method}{lr}-s{self.seed}"

    @property
    def key(self) -> str:
        """``<split>/<run-name>`` (unique within a comparison)."""
        return f"{self.split}/{self.run_name}"

    @property
    def federation(self) -> str:
        """The ``--federation-config`` string."""
        return FEDERATION.format(n=self.num_supernodes)

    @property
    def lr_key(self) -> str:
        """The run-config key the lr multiplier scales."""
        return lr_key(self.method)


def lr_key(method: str) -> str:
    """``full-lr`` for full fine-tuning methods, ``lr`` for LoRA methods."""
    return "full-lr" if method in FULL_METHODS else "lr"


def lr_keys(method: str) -> tuple[str, ...]:
    """The run-config keys an lr multiplier scales: also ``full-lr`` for a method whose initiating stage
    trains the whole model (one search for both rates, whose ratio stays the preset's)."""
    full_init = METHODS[method].get("init-trainable") == "full"
    return (lr_key(method), "full-lr") if full_init else (lr_key(method),)


def parse_choices(text: str, allowed: Sequence[str]) -> tuple[str, ...]:
    """``"fedit-rmax,sa-fedlora"`` -> ``("fedit-rmax", "sa-fedlora")``: the items in order, duplicates dropped.

    Raises
    ------
    CompareError
        On an empty list or an unknown item (the message names it and lists what is allowed).
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise CompareError(f"{text!r} is not allowed; give a comma-separated list of: {', '.join(allowed)}")
    for item in items:
        if item not in allowed:
            raise CompareError(f"{item!r} is not allowed; choose from: {', '.join(allowed)}")
    return tuple(dict.fromkeys(items))


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``["test-size=800", "schedule=linear"]`` -> ``{"test-size": 800, "schedule": "linear"}``.

    Values are read as TOML (numbers, booleans, quoted strings); anything else is a plain string.

    Raises
    ------
    CompareError
        On an item without ``=`` or a key that is not a run-config key.
    """

    from safedlora_app.core.config import RunConfig

    known = set(RunConfig().to_dict())
    fixed = {"out-dir", "run-name", "seed", "num-server-rounds", "method"}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CompareError(f"--set {item!r} is not allowed; write KEY=VALUE, e.g. --set test-size=800")
        if key not in known:
            raise CompareError(f"--set: {key!r} is not a run-config key; known keys: {', '.join(sorted(known))}")
        if key in fixed:
            raise CompareError(f"--set: {key!r} is set by the comparison itself (use --rounds, --seeds, --methods, "
                               "--out/--name); choose another key")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out[key] = value
    return out


def stage_rounds(rounds: int) -> dict[str, int]:
    """sa-fedlora's stage lengths for ``rounds`` rounds: 1 initiating round, then shrink, then cool.

    The initiating round already runs at the top budget, so there is no separate heating round, and the
    second half of the annealing rounds (rounded up) cools at the bottom budget. This is what the byte goal
    asks for: the mean budget over the run must stay under half of rank-max's to send at most 50% of
    fedit-at-rank-max's bytes (8 rounds: budgets 96, 96, 45, 27, 24, 24, 24, 24 = 47% of 8 x 96).

    Examples: 8 -> init 1, heat 0, cool 4 (the budget shrinks over 3 rounds); 3 -> init 1, heat 0,
    cool 1; 2 -> init 1, heat 0, cool 1; 1 -> init 0, heat 0, cool 1.
    """
    init = 1 if rounds >= 2 else 0
    annealing = rounds - init
    return {"init-rounds": init, "heat-rounds": 0, "cool-rounds": math.ceil(annealing / 2)}


def seeds_for(method: str, split: str, seeds: Sequence[int], ablation_seeds: int = 1,
              headline_splits: Sequence[str] | None = None) -> list[int]:
    """Every seed for a headline method on a headline split (``None``: every split); the first
    ``ablation_seeds`` for the others."""
    headline = method in HEADLINE and (headline_splits is None or split in headline_splits)
    return list(seeds) if headline else list(seeds[:ablation_seeds])


def run_settings(base: Mapping[str, Any], split: str, method: str, seed: int, lr_multiplier: float = 1.0
                 ) -> dict[str, Any]:
    """The full run-config of one run: base settings, then the split's, then the method's overrides.

    Parameters
    ----------
    base : mapping
        Shared settings, including ``num-server-rounds``, stage lengths, ``lr`` and ``full-lr``.
    split, method : str
        Keys of ``SPLITS`` and ``METHODS``.
    seed : int
        The run seed.
    lr_multiplier : float
        Scales ``lr`` (LoRA methods) or ``full-lr`` (full methods).
    """
    settings = {**base, **SPLITS[split][0], "seed": seed}
    for key, value in METHODS[method].items():
        if isinstance(value, str) and value.startswith("{"):  # another key's value, e.g. "{rank-min}"
            value = settings[value[1:-1]] if value[1:-1] in settings else resolved(settings)[value[1:-1]]
        settings[key] = value
    for key in lr_keys(method):
        rate = settings[key] if key in settings else resolved(settings)[key]  # the app's or the profile's
        settings[key] = float(f"{rate * lr_multiplier:.6g}")
    return settings


def resolved(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Every run-config value a run with ``settings`` gets: theirs, the task's and profile's, the app's."""
    from safedlora_app.core.config import RunConfig

    return RunConfig.from_mapping(settings).to_dict()


def plan_runs(base: Mapping[str, Any], methods: Sequence[str], splits: Sequence[str], seeds: Sequence[int],
              lr_multipliers: Mapping[str, float] | None = None, ablation_seeds: int = 1,
              ablation_splits: Sequence[str] | None = None, headline_splits: Sequence[str] | None = None
              ) -> list[RunSpec]:
    """The comparison's runs, split by split: headline methods over every seed (on the headline splits), the rest
    on the first few.

    Parameters
    ----------
    base : mapping
        Shared settings (see :func:`run_settings`).
    methods, splits : sequence of str
        Keys of ``METHODS`` and ``SPLITS``.
    seeds : sequence of int
        Seeds; the first one is used by every method.
    lr_multipliers : mapping, optional
        ``{method: multiplier}`` chosen by the lr search (default 1 for every method).
    ablation_seeds : int
        Seeds (the first ones) for the methods outside ``HEADLINE``, and for the headline methods outside
        ``headline_splits``.
    ablation_splits : sequence of str, optional
        Splits on which the methods outside ``HEADLINE`` run (default: every split).
    headline_splits : sequence of str, optional
        Splits on which the headline methods run every seed (default: every split).

    Returns
    -------
    list of RunSpec
        Ordered split, then seed, then method (so one seed's whole comparison finishes first).
    """
    lr_multipliers = lr_multipliers or {}
    plan = []
    for split in splits:
        for seed in seeds:
            for method in methods:
                if method not in HEADLINE and ablation_splits is not None and split not in ablation_splits:
                    continue
                if seed in seeds_for(method, split, seeds, ablation_seeds, headline_splits):
                    m = float(lr_multipliers.get(method, 1.0))
                    plan.append(RunSpec(split, method, seed, m, run_settings(base, split, method, seed, m),
                                        SPLITS[split][1]))
    return plan


def lr_source(method: str) -> str:
    """The method whose searched lr ``method`` uses: its own, or its arm's ``lr`` source."""
    return ARMS[method].lr_source


def plan_lr_search(base: Mapping[str, Any], methods: Sequence[str], split: str, seed: int,
                   grid: Sequence[float] = LR_GRID) -> list[RunSpec]:
    """Every method among ``methods`` that searches its own rate (``OWN_LR_SEARCH``; each method, if none does)
    at every lr multiplier of ``grid``, on one split and one seed. The others use their family's choice
    (:func:`lr_source`)."""
    searched = [m for m in methods if m in OWN_LR_SEARCH] or list(methods)
    return [RunSpec(split, method, seed, float(m), run_settings(base, split, method, seed, float(m)), SPLITS[split][1])
            for method in searched for m in grid]


def chosen_multipliers(methods: Sequence[str], chosen: Mapping[str, float]) -> dict[str, float]:
    """``{method: multiplier}``: the search's choice for a searched method, its family's for the others."""
    return {m: float(chosen.get(m, chosen.get(lr_source(m), 1.0))) for m in methods}


def extend_lr_grid(val_loss: Mapping[float, float | None], limit: float = LR_EXTENSION_LIMIT) -> float | None:
    """The next multiplier to try when the best one so far lies at an edge of those tried, else ``None``.

    A best at the largest multiplier tried asks for twice it, a best at the smallest for half of it, within
    ``[1/limit, limit]`` and never one tried already; an optimum inside the grid needs no more runs.

    Examples
    --------
    >>> extend_lr_grid({0.5: 0.7, 1.0: 0.65, 2.0: 0.6})
    4.0
    >>> extend_lr_grid({0.5: 0.7, 1.0: 0.6, 2.0: 0.65}) is None
    True
    """
    tried = sorted(val_loss)
    try:
        best = choose_lr(val_loss)
    except ValueError:
        return None
    if best == tried[-1] and best * 2 <= limit:
        candidate = best * 2
    elif best == tried[0] and best / 2 >= 1 / limit:
        candidate = best / 2
    else:
        return None
    return None if candidate in val_loss else candidate


def choose_lr(val_loss: Mapping[float, float | None]) -> float:
    """The multiplier with the lowest final validation loss; ties go to the one closest to 1 (then the smaller).

    The loss, not the accuracy: on 1,000 validation rows accuracy moves in steps of 0.1 point, and the best round
    is chosen on the same loss.

    Parameters
    ----------
    val_loss : mapping
        ``{multiplier: final validation loss}``; ``None`` for a run that failed (or diverged).

    Raises
    ------
    ValueError
        When no run has a loss.
    """
    scored = [(loss, m) for m, loss in val_loss.items() if loss is not None and math.isfinite(loss)]
    if not scored:
        raise ValueError("no finished lr-search run to choose from")
    return min(scored, key=lambda lm: (lm[0], abs(math.log(lm[1])), lm[1]))[1]


def format_value(value: Any) -> str:
    """A run-config value as ``flwr run --run-config`` reads it (TOML): strings quoted, numbers plain."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if "'" in value or "\n" in value:
            raise CompareError(f"run-config value {value!r} is not allowed; it must not hold a quote or a newline")
        return f"'{value}'"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def run_config_string(settings: Mapping[str, Any]) -> str:
    """``key=value key='text' ...`` for ``--run-config``."""
    return " ".join(f"{key}={format_value(value)}" for key, value in settings.items())


def clients_per_round(settings: Mapping[str, Any], num_supernodes: int) -> int:
    """Nodes sampled per round, as the strategy samples them."""
    from safedlora_app.core.config import RunConfig

    config = RunConfig(fraction_train=float(settings.get("fraction-train", RunConfig.fraction_train)),
                       min_nodes=int(settings.get("min-nodes", RunConfig.min_nodes)))
    return config.clients_per_round(num_supernodes)


def estimate_seconds(spec: RunSpec, costs: Mapping[str, float] = COSTS) -> float:
    """Rough wall time of one run on 2 cores (for the ETA and the dry run).

    ``startup + first-round + (T + 1) evaluations + sum over rounds of waves x per-client time``,
    with ``ceil(clients / parallel-clients)`` waves per round; full rounds also pay the transfer
    of the whole model to and from every client.
    """
    from safedlora_app.core.config import RunConfig

    s = spec.settings
    rounds = int(s["num-server-rounds"])
    if spec.method in FULL_METHODS:
        full_rounds = rounds
    elif s.get("init-trainable", "lora") == "full" and METHODS[spec.method].get("method") == "sa-fedlora":
        full_rounds = int(s.get("init-rounds", 0))
    else:
        full_rounds = 0
    clients = clients_per_round(s, spec.num_supernodes)
    waves = math.ceil(clients / costs["parallel-clients"])
    samples = int(s["local-samples"]) * int(s.get("local-epochs", 1))
    lora_round = waves * samples * costs["lora-per-sample"]
    full_round = waves * samples * costs["full-per-sample"] + clients * costs["full-transfer"]
    config = RunConfig(num_server_rounds=rounds, eval_every=int(s.get("eval-every", RunConfig().eval_every)))
    evaluations = sum(config.evaluates(r) for r in range(rounds + 1))
    evaluation = evaluations * int(s["test-size"]) * costs["eval-per-row"]
    return (costs["startup"] + costs["first-round"] + evaluation + rounds * costs["round-overhead"]
            + full_rounds * full_round + (rounds - full_rounds) * lora_round)
