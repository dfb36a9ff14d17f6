"""ServerApp: validate the run config, run the SA-FedLoRA strategy, evaluate centrally, save outputs."""

from __future__ import annotations

import shutil
import time
from logging import ERROR, INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from . import checkpoint
from . import payload as pl
from .config import ConfigError, RunConfig
from .data import DataError, load_task_data
from .global_model import GlobalModel
from .model import (
    ModelError,
    adapted_modules,
    full_state,
    head_parameters,
    load_base_model,
    load_preprocessor,
    model_source,
    module_shapes,
    pick_device,
)
from .outputs import BestRound, RunRecorder, run_directory, write_json
from .round_deadline import DeadlineGrid
from .round_plan import initial_tensors
from .strategy import NotEnoughNodes, SAFedLoRA
from .training import Encoded, compute_dtype, evaluate

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
    data = load_task_data(config.dataset_name, task=config.task, text_column=config.text_column,
                          label_column=config.label_column, image_column=config.image_column,
                          natural_column=config.natural_column, test_size=config.test_size)
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


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Everything is checked before round 1: config values, data columns, model, target modules."""
    try:
        config = RunConfig.from_mapping(context.run_config)
        effective = config.effective
        task_data, label_names = server_data(config)
        base = load_base_model(config.model_name, config.task, label_names, seed=config.seed)
        preprocessor = load_preprocessor(config.model_name, config.task)
        head_modules = config.module_names(config.head_modules)
        modules = adapted_modules(base, config.module_names(config.target_modules), head_modules)
        heads = head_parameters(base, head_modules)
    except (ConfigError, DataError, ModelError) as error:
        log(ERROR, "invalid run config: %s", error)
        raise
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)

    try:
        run_dir = run_directory(config)
        resumed = resume_point(config, run_dir) if config.resume else None
    except (OSError, checkpoint.CheckpointError) as error:
        log(ERROR, "cannot start the run: %s", error)
        raise
    write_json(run_dir / "config.json", {"given": config.to_dict(), "effective": effective.to_dict(),
                                         "label-names": list(label_names)})
    state = full_state(base, heads)
    shapes = module_shapes(base, modules)
    recorder = RunRecorder(run_dir, config.num_server_rounds)
    first_round = resumed.server_round + 1 if resumed else 1
    if resumed:
        recorder.restore(resumed.state["records"])
        checkpoint.restore_rng(resumed.state["rng"])
        log(INFO, "resuming run %s at round %d of %d from %s", run_dir.name, first_round, config.num_server_rounds,
            run_dir / checkpoint.DIRECTORY)
    best = BestRound.of(recorder.records)  # its model was saved before an interruption
    strategy = SAFedLoRA(effective, shapes, expected_full={k: tuple(v.shape) for k, v in state.items()},
                         rounds=recorder, first_round=first_round,
                         node_backbone={int(k): v for k, v in resumed.state["node-backbone"].items()} if resumed
                         else None)
    global_model = GlobalModel(base, effective, shapes, head_modules)
    test = (Encoded.from_dataset(task_data.test, preprocessor, task_data.input_column, config.max_seq_len)
            if config.central_eval else None)
    device = pick_device()
    dtype = compute_dtype(config.precision, device)
    log(INFO, "SA-FedLoRA run %s: %s, %d LoRA modules, %s; outputs in %s", run_dir.name, config.method, len(modules),
        f"{len(test)} held-out rows evaluated in {str(dtype).removeprefix('torch.')} on {device.type}" if test
        else "no central evaluation (central-eval = false)", run_dir)

    def prune_best() -> None:
        """Delete every ``best-round-*`` folder but the best round's. Called once the checkpoint names that
        round, so that a crash in between leaves the folder a resumed run's records point to."""
        for old in run_dir.glob(f"{BEST_PREFIX}*"):
            if old.name != f"{BEST_PREFIX}{best.round}":
                shutil.rmtree(old, ignore_errors=True)

    def central_evaluation(flower_round: int, arrays) -> MetricRecord | None:
        """Evaluate the model the round ended with (every ``eval-every`` rounds), write the round's line and
        the checkpoint. Flower counts rounds from 1 in every invocation; a resumed run continues its own count."""
        if resumed and flower_round == 0:
            return None  # the initial model of a resumed run was evaluated before the interruption
        server_round = flower_round + first_round - 1 if flower_round else 0
        result, ranks = None, None
        if config.evaluates(server_round) and test is not None:
            started = time.perf_counter()
            model, ranks = global_model.build(server_round, arrays, merged=True)
            result = evaluate(model, test, batch_size=config.eval_batch_size,
                              num_classes=len(label_names), device=device, dtype=dtype)
            result["eval-seconds"] = time.perf_counter() - started
        elif config.evaluates(server_round) and server_round > 0:
            ranks = global_model.ranks(server_round, arrays)
        line = recorder.record(server_round, result, ranks)
        if best.offer(line):
            global_model.save(server_round, arrays, run_dir / f"{BEST_PREFIX}{server_round}", preprocessor,
                              model_source(config.model_name))
        checkpoint.save(run_dir, server_round, pl.unpack(arrays), {
            "given": config.to_dict(), "records": recorder.records, "longest-round-seconds": deadlines.longest,
            "node-backbone": {str(k): v for k, v in strategy.node_backbone.items()}})
        prune_best()
        return MetricRecord(result) if result else None

    start = time.perf_counter()
    initial = pl.pack(resumed.tensors if resumed else initial_tensors(effective, state))
    deadlines = DeadlineGrid(grid, cap=config.round_timeout, factor=config.round_deadline_factor,
                             longest=resumed.state.get("longest-round-seconds") if resumed else None)
    try:
        result = strategy.start(
            grid=deadlines,
            initial_arrays=initial,
            num_rounds=config.num_server_rounds - first_round + 1,
            timeout=config.round_timeout,
            train_config=ConfigRecord({"label-names": list(label_names)}),
            evaluate_config=ConfigRecord({"label-names": list(label_names)}),
            evaluate_fn=central_evaluation,
        )
    except NotEnoughNodes as error:
        log(ERROR, "%s. The checkpoint after round %d is in %s: once nodes are back, run again with "
            "resume = true and run-name = %r to continue", error, recorder.records[-1]["round"],
            run_dir / checkpoint.DIRECTORY, run_dir.name)
        raise
    # A resumed run that aggregated nothing new still ends with the checkpoint's trained arrays.
    final_arrays = initial if resumed and len(result.arrays) == 0 else trained_arrays(
        result, run_dir.name, config.num_server_rounds)
    model_dir = global_model.save(config.num_server_rounds, final_arrays, run_dir, preprocessor,
                                  model_source(config.model_name))
    best_dir = run_dir / f"{BEST_PREFIX}{best.round}"
    best_model = next((d for d in (best_dir / "adapter", best_dir / "model") if d.is_dir()), None)
    summary = {**recorder.summary(config, time.perf_counter() - start, model_dir, best, best_model),
               "device": device.type, "compute-dtype": str(dtype).removeprefix("torch.")}
    write_json(run_dir / "summary.json", summary)
    recorder.plot(run_dir)
    accuracy = summary["final-accuracy"]
    federated = summary["final-fed-accuracy"]
    log(INFO, "SA-FedLoRA run %s finished: %s%s, %.2f MB sent in total; outputs in %s", run_dir.name,
        "no central evaluation" if accuracy is None else f"final accuracy {100 * accuracy:.1f}%",
        "" if federated is None else f", federated accuracy {100 * federated:.1f}%", summary["total-mb"], run_dir)
