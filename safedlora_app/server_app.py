"""ServerApp: validate the run config, run the SA-FedLoRA strategy, evaluate centrally, save outputs."""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result
from flwr.supercore import log
from safetensors import SafetensorError

from safedlora_app.core import payload as pl
from safedlora_app.core.config import ConfigError, RunConfig
from safedlora_app.core.data import DataError, TaskData
from safedlora_app.core.model import (
    ModelError,
    adapted_modules,
    full_state,
    head_parameters,
    model_source,
    module_shapes,
    pick_device,
)
from safedlora_app.core.round_plan import initial_tensors
from safedlora_app.core.run_folder import CONFIG_FILE, SUMMARY_FILE, without_where
from safedlora_app.core.training import compute_dtype
from safedlora_app.server import checkpoint
from safedlora_app.server.global_model import GlobalModel
from safedlora_app.server.outputs import BestRound, RunRecorder, run_directory, write_json
from safedlora_app.server.round_deadline import DeadlineGrid
from safedlora_app.server.strategy import NotEnoughNodes, SAFedLoRA
from safedlora_app.tasks import Task, columns_of, get_task, load_task_data

app = ServerApp()
#: ``best-round-<t>/``: the model of the round with the lowest held-out loss, next to the last round's.
BEST_PREFIX = "best-round-"


def trained_arrays(result: Result, run_name: str, num_rounds: int) -> ArrayRecord:
    """The last aggregated arrays of a finished ``strategy.start``.

    Raises
    ------
    RuntimeError
        When not one round aggregated a valid reply. Flower's ``Result.arrays`` then stays an empty
        ``ArrayRecord``; the run must fail (no summary.json) rather than save an untrained model.
    """
    if len(result.arrays) == 0:
        raise RuntimeError(f"run {run_name}: no node returned a valid update in any of the {num_rounds} rounds; "
                           "see the warnings above for each node's reason")
    return result.arrays


def server_data(config: RunConfig):
    """``(task data or None, label names)``: the server loads ``dataset-name`` only to evaluate centrally or
    to learn the class names; ``label-names`` given, it must match the dataset's (in order) when both exist.

    Raises
    ------
    DataError, ConfigError
    """
    names = config.label_list()
    if not config.central_eval:
        return None, names
    data = load_task_data(config.dataset_name, task=config.task, **columns_of(config), test_size=config.test_size,
                          val_size=config.val_size)
    if names and names != tuple(data.label_names):
        raise ConfigError(f"label-names = {config.label_names!r} is not allowed: dataset-name's classes are "
                          f"{list(data.label_names)} (in that order); give those, or set central-eval = false")
    return data, tuple(data.label_names)


def resume_point(config: RunConfig, run_dir: Path) -> checkpoint.Checkpoint:
    """The checkpoint to continue from, checked against the run config.

    Raises
    ------
    CheckpointError
        When the checkpoint is missing or corrupt, a key other than out-dir, resume and num-server-rounds
        differs from it, or it already holds every round asked for.
    """
    point = checkpoint.load(run_dir)
    state_file = run_dir / checkpoint.DIRECTORY / checkpoint.STATE
    differ = checkpoint.contradictions(point.state["given"], config.to_dict())
    if differ:
        raise checkpoint.CheckpointError(
            f"resume: {'; '.join(differ)} in {state_file}; only {', '.join(checkpoint.RESUMABLE_KEYS)} may change "
            "when a run resumes")
    if point.server_round >= config.num_server_rounds:
        raise checkpoint.CheckpointError(
            f"resume: {state_file} already holds round {point.server_round} and num-server-rounds = "
            f"{config.num_server_rounds}; raise num-server-rounds to extend the run")
    return point


def continued(config: RunConfig, saved: dict[str, Any]) -> RunConfig:
    """The config a resumed run goes on with. A run resumed with another ``num-server-rounds`` than its checkpoint's
    keeps the checkpoint's planned rounds (``schedule-rounds``), so its lr decay and budget go on from where they were
    instead of being planned anew mid-run for the new length (which raised the rate and the budget again): added
    rounds run at the plan's last rate and budget, and a shortened run stops part-way through the plan. A
    ``schedule-rounds`` the run gives itself wins."""
    planned = saved.get("schedule-rounds") or saved["num-server-rounds"]
    if config.schedule_rounds or planned == config.num_server_rounds:
        return config
    log(INFO, "resuming the run for %d rounds: the lr decay and the budget keep their plan over %d rounds "
        "(schedule-rounds = %d)", config.num_server_rounds, planned, planned)
    return dataclasses.replace(config, schedule_rounds=planned)


@dataclass(frozen=True)
class Setup:
    """Everything a run checks before round 1: config values, data columns, model, target modules."""

    config: RunConfig
    task: Task
    model_name: str  # model-name as loaded: a task's default resolved (causal-lm: its converted directory)
    task_data: TaskData | None  # None without central evaluation
    label_names: tuple[str, ...]
    base: torch.nn.Module
    preprocessor: Any
    head_modules: list[str]
    modules: list[str]
    heads: list[str]

    @classmethod
    def check(cls, context: Context) -> Setup:
        """Raises ConfigError, DataError or ModelError (logged) on the first problem."""
        try:
            config = RunConfig.from_mapping(context.run_config)
            task = get_task(config.task)
            task_data, label_names = server_data(config)
            model_name = task.model_name(config.model_name, config.cache_dir)
            base = task.base_model(model_name, label_names, seed=config.seed)
            preprocessor = task.preprocessor(model_name)
            head_modules = config.module_names(config.head_modules)
            modules = adapted_modules(base, config.module_names(config.target_modules), head_modules)
            return cls(config, task, model_name, task_data, label_names, base, preprocessor, head_modules, modules,
                       head_parameters(base, head_modules))
        except (ConfigError, DataError, ModelError) as error:
            log(ERROR, "invalid run config: %s", error)
            raise


def held_out_rows(setup: Setup, split: str = "test"):
    """The central ``test`` or ``val`` rows, ready for evaluation (None without central evaluation or rows)."""
    rows = getattr(setup.task_data, split, None)
    if rows is None or len(rows) == 0:
        return None
    return setup.task.rows(rows, setup.preprocessor, setup.config.max_seq_len)


class RoundEnd:
    """Flower's ``evaluate_fn``: after each round, evaluate the model it ended with (every ``eval-every``
    rounds), write the round's line, keep the best round's model, and write the checkpoint.

    Flower counts rounds from 1 in every invocation; a resumed run continues its own count from ``first_round``.
    """

    def __init__(self, setup: Setup, run_dir: Path, recorder: RunRecorder, global_model: GlobalModel,
                 parts: tuple[checkpoint.Stateful, ...], first_round: int):
        config = setup.config
        self.setup, self.run_dir, self.recorder, self.global_model = setup, run_dir, recorder, global_model
        self.parts, self.first_round = parts, first_round
        self.best = BestRound.of(recorder.records)  # its model was saved before an interruption
        self.test, self.val = held_out_rows(setup), held_out_rows(setup, "val")
        self.device = pick_device()
        self.dtype = compute_dtype(config.precision, self.device)

    def __call__(self, flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if self.first_round > 1 and flower_round == 0:
            return None  # the initial model of a resumed run was evaluated before the interruption
        config, server_round = self.setup.config, flower_round + self.first_round - 1 if flower_round else 0
        result, ranks = None, None
        if config.evaluates(server_round) and self.test is not None:
            started = time.perf_counter()
            model, ranks = self.global_model.build(server_round, arrays, merged=True)
            result = self.evaluate(model, self.test)
            if self.val is not None:
                result.update({f"val-{k}": v for k, v in self.evaluate(model, self.val).items()})
            result["eval-seconds"] = time.perf_counter() - started
        elif config.evaluates(server_round) and server_round > 0:
            ranks = self.global_model.ranks(server_round, arrays)
        try:
            if self.best.offer(self.recorder.record(server_round, result, ranks)):
                self.save_model(server_round, arrays, self.run_dir / f"{BEST_PREFIX}{server_round}")
            checkpoint.save(self.run_dir, server_round, pl.unpack(arrays),
                            {"given": config.to_dict(), **checkpoint.collect(self.parts)})
        except (OSError, SafetensorError) as error:  # a full disk, a lost mount: stop, and say what is safe
            log(ERROR, "round %d: cannot write the run's outputs in %s (%s). %s", server_round, self.run_dir,
                error, checkpoint.last_good(self.run_dir))
            raise
        self.prune_best()
        return MetricRecord(result) if result else None

    def evaluate(self, model: torch.nn.Module, rows) -> dict[str, float]:
        config = self.setup.config
        return self.setup.task.evaluate(model, rows, batch_size=config.eval_batch_size,
                                        num_classes=len(self.setup.label_names), device=self.device, dtype=self.dtype)

    def save_model(self, server_round: int, arrays: ArrayRecord, folder: Path) -> Path:
        return self.global_model.save(server_round, arrays, folder, self.setup.preprocessor,
                                      model_source(self.setup.model_name))

    def prune_best(self) -> None:
        """Delete every ``best-round-*`` folder but the best round's. Called once the checkpoint names that
        round, so that a crash in between leaves the folder a resumed run's records point to."""
        for old in self.run_dir.glob(f"{BEST_PREFIX}*"):
            if old.name != f"{BEST_PREFIX}{self.best.round}":
                shutil.rmtree(old, ignore_errors=True)

    def describe(self) -> str:
        if self.test is None:
            return "no central evaluation (central-eval = false)"
        val = 0 if self.val is None else len(self.val)
        return f"{len(self.test)} test and {val} validation rows evaluated in " \
               f"{str(self.dtype).removeprefix('torch.')} on {self.device.type}; {self.setup.task_data.describe()}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup = Setup.check(context)
    config = setup.config
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    try:
        run_dir = run_directory(config)
        resumed = resume_point(config, run_dir) if config.resume else None
    except (OSError, checkpoint.CheckpointError) as error:
        log(ERROR, "cannot start the run: %s", error)
        raise
    if resumed:
        setup = dataclasses.replace(setup, config=continued(config, resumed.state["given"]))
    config, effective = setup.config, setup.config.effective
    write_json(run_dir / CONFIG_FILE, {"given": without_where(config.to_dict()),
                                       "effective": without_where(effective.to_dict()),
                                       "label-names": list(setup.label_names)})
    state = full_state(setup.base, setup.heads)
    shapes = module_shapes(setup.base, setup.modules)
    first_round = resumed.server_round + 1 if resumed else 1
    recorder = RunRecorder(run_dir, config.num_server_rounds)
    strategy = SAFedLoRA(effective, shapes, expected_full={k: tuple(v.shape) for k, v in state.items()},
                         rounds=recorder, first_round=first_round)
    # A private round waits round-timeout: a deadline set by earlier rounds' timing would let one node's timing
    # decide whether other nodes' replies count, an influence beyond the C/m that the accountant assumes.
    factor = 0.0 if config.private else config.round_deadline_factor
    deadlines = DeadlineGrid(grid, cap=config.round_timeout, factor=factor)
    parts = (recorder, strategy, deadlines)
    if resumed:
        checkpoint.restore(resumed, parts)
        log(INFO, "resuming run %s at round %d of %d from %s", run_dir.name, first_round, config.num_server_rounds,
            run_dir / checkpoint.DIRECTORY)
    round_end = RoundEnd(setup, run_dir, recorder, GlobalModel(setup.base, effective, shapes, setup.head_modules),
                         parts, first_round)
    log(INFO, "SA-FedLoRA run %s: %s, %d LoRA modules, %s; outputs in %s", run_dir.name, config.method,
        len(setup.modules), round_end.describe(), run_dir)

    start = time.perf_counter()
    initial = pl.pack(resumed.tensors if resumed else initial_tensors(effective, state))
    labels = ConfigRecord({"label-names": list(setup.label_names)})
    try:
        result = strategy.start(grid=deadlines, initial_arrays=initial, timeout=config.round_timeout,
                                num_rounds=config.num_server_rounds - first_round + 1, train_config=labels,
                                evaluate_config=labels, evaluate_fn=round_end)
    except NotEnoughNodes as error:
        log(ERROR, "%s. The checkpoint after round %d is in %s: once nodes are back, run again with "
            "resume = true and run-name = %r to continue", error, recorder.records[-1]["round"],
            run_dir / checkpoint.DIRECTORY, run_dir.name)
        raise
    # A resumed run that aggregated nothing new still ends with the checkpoint's trained arrays.
    final_arrays = initial if resumed and len(result.arrays) == 0 else trained_arrays(
        result, run_dir.name, config.num_server_rounds)
    model_dir = round_end.save_model(config.num_server_rounds, final_arrays, run_dir)
    if setup.task.samples_file and config.generation_rows and setup.task_data is not None:
        try:  # a finished run's outputs never depend on this illustration
            write_samples(setup, round_end, config.num_server_rounds, final_arrays, run_dir / setup.task.samples_file)
        except Exception as error:  # noqa: BLE001
            log(WARNING, "no %s: %s: %s", setup.task.samples_file, type(error).__name__, error)
    finish(round_end, model_dir, time.perf_counter() - start)


def finish(round_end: RoundEnd, model_dir: Path, wall_seconds: float) -> None:
    """Write summary.json and the plots, and log the run's last line."""
    config, run_dir, best = round_end.setup.config, round_end.run_dir, round_end.best
    best_dir = run_dir / f"{BEST_PREFIX}{best.round}"
    best_model = next((d for d in (best_dir / "adapter", best_dir / "model") if d.is_dir()), None)
    summary = {**round_end.recorder.summary(config, wall_seconds, model_dir, best, best_model),
               "device": round_end.device.type, "compute-dtype": str(round_end.dtype).removeprefix("torch.")}
    write_json(run_dir / SUMMARY_FILE, summary)
    round_end.recorder.plot(run_dir)
    accuracy, federated = summary["final-accuracy"], summary["final-fed-accuracy"]
    if summary.get("final-perplexity") is not None:
        result = f"final held-out loss {summary['final-loss']:.3f} (perplexity {summary['final-perplexity']:.2f})"
    elif accuracy is not None:
        result = f"final accuracy {100 * accuracy:.1f}%"
    elif summary.get("final-loss") is not None:
        result = f"final held-out loss {summary['final-loss']:.4g}"
    else:
        result = "no central evaluation"
    log(INFO, "SA-FedLoRA run %s finished: %s%s, %.2f MB sent in total; outputs in %s", run_dir.name, result,
        "" if federated is None else f", federated accuracy {100 * federated:.1f}%", summary["total-mb"], run_dir)


def write_samples(setup: Setup, round_end: RoundEnd, server_round: int, arrays: ArrayRecord, path: Path) -> None:
    """What the task shows of the trained model beside the base one (causal-lm: replies to held-out prompts), so
    that a user sees what training changed (:meth:`Task.write_samples`)."""
    started = time.perf_counter()
    tuned = round_end.global_model.build(server_round, arrays, merged=True)[0]
    written = setup.task.write_samples(setup.base, tuned, setup.preprocessor, setup.task_data.test, setup.config,
                                       round_end.device, path)
    log(INFO, "%d samples of the base and the tuned model (%.1f s) in %s", written, time.perf_counter() - started, path)
