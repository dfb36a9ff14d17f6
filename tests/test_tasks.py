"""A new task is one file: a toy regression task (random features, a small network with a regression head),
written and registered here, runs in process through the real ServerApp and ClientApp on the same strategy as the
built-in tasks. And the registry's own checks."""

from dataclasses import dataclass

import datasets
import numpy as np
import pytest
import torch
from support.runs import run_server
from torch import nn

from safedlora_app.core.config import ConfigError, RunConfig
from safedlora_app.core.data import TaskData
from safedlora_app.core.task_spec import TASK_SPECS, TaskSpec
from safedlora_app.tasks import TASKS, Task, get_task, register

DIM = 8


class Features:
    """The toy task's rows (the ``Rows`` protocol): feature vectors and their targets."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def subset(self, indices):
        pick = list(indices)
        return Features(self.x[pick], self.y[pick])

    def by_length(self):
        return list(range(len(self)))

    def training_order(self, order, batch_size):
        return list(order)

    def batch(self, indices):
        pick = list(indices)
        return {"features": self.x[pick], "labels": self.y[pick]}


@dataclass
class Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(DIM, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, features, labels=None):
        predicted = self.head(torch.relu(self.hidden(features))).squeeze(-1)
        return Output(None if labels is None else nn.functional.mse_loss(predicted.float(), labels), predicted)


class ToyRegression(Task):
    spec = TaskSpec("toy-regression", eval_metrics=("loss",), classifies=False)

    def load_data(self, dataset_name, columns, *, test_size, val_size, split_seed):
        rng = np.random.default_rng(split_seed)
        x = rng.normal(size=(600, DIM)).astype(np.float32)
        y = (x @ rng.normal(size=DIM) + 0.1 * rng.normal(size=600)).astype(np.float32)
        rows = datasets.Dataset.from_dict({"features": x.tolist(), "label": y.tolist()})
        test, val = rows.select(range(test_size)), rows.select(range(test_size, test_size + val_size))
        return TaskData(train=rows.select(range(test_size + val_size, len(rows))), test=test, label_names=(),
                        input_column="features", val=val)

    def rows(self, dataset, preprocessor, max_seq_len):
        return Features(torch.tensor(dataset["features"]), torch.tensor(dataset["label"]))

    def load_preprocessor(self, model_name):
        return None

    def base_model(self, model_name, label_names, seed):
        torch.manual_seed(seed)
        return Regressor().eval()

    @torch.inference_mode()
    def evaluate(self, model, rows, *, batch_size, num_classes, device, dtype):
        model.to(device).eval()
        return {"loss": float(model(**rows.batch(range(len(rows)))).loss)}


@pytest.fixture
def toy_task():
    task = register(ToyRegression())
    yield task
    TASKS.pop(task.name), TASK_SPECS.pop(task.name)


def test_a_task_written_in_one_file_runs_through_the_server_and_the_nodes(toy_task, run_config):
    config = run_config(task="toy-regression", target_modules="hidden", head_modules="head", partitioner="iid",
                        num_server_rounds=4, rank_max=4, rank_min=2, eval_every=1, lr=0.02, local_samples=128,
                        batch_size=16, test_size=60, val_size=60, run_name="toy")
    run_dir, rows, summary = run_server(config)
    losses = [row["loss"] for row in rows]
    assert [row["round"] for row in rows] == [0, 1, 2, 3, 4] and all(row["replies"] == 2 for row in rows[1:])
    assert losses[-1] < 0.5 * losses[0], losses  # it learns the linear target
    assert summary["final-accuracy"] is None and summary["final-loss"] == losses[-1]
    assert rows[-1]["budget"] < rows[1]["budget"]  # the same annealing as every task
    assert (run_dir / "adapter" / "adapter_config.json").exists()


def test_a_registered_task_is_known_to_the_config_and_an_unknown_one_is_refused(toy_task):
    assert RunConfig(task="toy-regression", head_modules="").task_spec is toy_task.spec  # classifies: no head needed
    assert get_task("toy-regression") is toy_task
    with pytest.raises(ConfigError, match="task = 'regression' is not allowed; choose one of: text-classification"):
        RunConfig(task="regression")
    with pytest.raises(ConfigError, match="toy-regression"):
        get_task("regression")


def test_a_task_default_for_a_key_pyproject_always_sets_is_refused():
    class Stubborn(ToyRegression):
        spec = TaskSpec("stubborn", eval_metrics=("loss",), defaults={"seed": 7})

    with pytest.raises(ValueError, match=r"task 'stubborn': defaults for \['seed'\] cannot apply"):
        register(Stubborn())
    assert "stubborn" not in TASKS and "stubborn" not in TASK_SPECS
