"""ServerApp: validate the run config, run the SA-FedLoRA strategy, evaluate centrally, save outputs."""

from __future__ import annotations

import time
from logging import ERROR, INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result
from flwr.supercore import log

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
from .outputs import RunRecorder, run_directory, write_json
from .round_plan import initial_tensors
from .strategy import SAFedLoRA
from .training import Encoded, compute_dtype, evaluate

app = ServerApp()


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


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Everything is checked before round 1: config values, data columns, model, target modules."""
    try:
        config = RunConfig.from_mapping(context.run_config)
        effective = config.effective
        task_data = load_task_data(config.dataset_name, task=config.task, text_column=config.text_column,
                                   label_column=config.label_column, image_column=config.image_column,
                                   natural_column=config.natural_column, test_size=config.test_size)
        base = load_base_model(config.model_name, config.task, task_data.label_names, seed=config.seed)
        preprocessor = load_preprocessor(config.model_name, config.task)
        head_modules = config.module_names(config.head_modules)
        modules = adapted_modules(base, config.module_names(config.target_modules), head_modules)
        heads = head_parameters(base, head_modules)
    except (ConfigError, DataError, ModelError) as error:
        log(ERROR, "invalid run config: %s", error)
        raise
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)

    run_dir = run_directory(config)
    write_json(run_dir / "config.json", {"given": config.to_dict(), "effective": effective.to_dict(),
                                         "label-names": list(task_data.label_names)})
    state = full_state(base, heads)
    shapes = module_shapes(base, modules)
    recorder = RunRecorder(run_dir, config.num_server_rounds)
    strategy = SAFedLoRA(effective, shapes, expected_full={k: tuple(v.shape) for k, v in state.items()},
                         rounds=recorder)
    global_model = GlobalModel(base, effective, shapes, head_modules)
    test = Encoded.from_dataset(task_data.test, preprocessor, task_data.input_column, config.max_seq_len)
    device = pick_device()
    dtype = compute_dtype(config.precision, device)
    log(INFO, "SA-FedLoRA run %s: %s, %d LoRA modules, %d held-out rows, evaluated in %s on %s; outputs in %s",
        run_dir.name, config.method, len(modules), len(task_data.test), str(dtype).removeprefix("torch."),
        device.type, run_dir)

    def central_evaluation(server_round: int, arrays) -> MetricRecord | None:
        """Evaluate the model the round ended with (every ``eval-every`` rounds) and write the round's line."""
        result, ranks = None, None
        if config.evaluates(server_round):
            started = time.perf_counter()
            model, ranks = global_model.build(server_round, arrays, merged=True)
            result = evaluate(model, test, batch_size=config.eval_batch_size,
                              num_classes=len(task_data.label_names), device=device, dtype=dtype)
            result["eval-seconds"] = time.perf_counter() - started
        recorder.record(server_round, result, ranks)
        return MetricRecord(result) if result else None

    start = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=pl.pack(initial_tensors(effective, state)),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        train_config=ConfigRecord({"label-names": list(task_data.label_names)}),
        evaluate_fn=central_evaluation,
    )
    final_arrays = trained_arrays(result, run_dir.name, config.num_server_rounds)
    model_dir = global_model.save(config.num_server_rounds, final_arrays, run_dir, preprocessor,
                                  model_source(config.model_name))
    summary = recorder.summary(config, time.perf_counter() - start, model_dir)
    write_json(run_dir / "summary.json", summary)
    recorder.plot(run_dir)
    log(INFO, "SA-FedLoRA run %s finished: final accuracy %.1f%%, %.2f MB sent in total; outputs in %s",
        run_dir.name, 100 * (summary["final-accuracy"] or 0.0), summary["total-mb"], run_dir)
