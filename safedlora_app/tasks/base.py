"""The interface every task implements: its data, its rows, its model and preprocessor, its evaluation.

The core (schedule, allocation, aggregation, training loop) never asks which task runs; the server and the nodes
ask the run's :class:`Task` (``safedlora_app.tasks.get_task(config.task)``) for what differs between tasks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn

from safedlora_app.core.config import RunConfig
from safedlora_app.core.data import TaskData
from safedlora_app.core.task_spec import TaskSpec
from safedlora_app.core.training import Rows


class Task(ABC):
    """One task: subclass it, give it a :class:`TaskSpec`, and register an instance
    (:func:`safedlora_app.tasks.register`). Instances must be hashable (the default ``object`` hash is): the
    preprocessor cache is keyed on them."""

    spec: TaskSpec
    samples_file: str | None = None
    """The file in a run's folder that :meth:`write_samples` writes (``None``: the task writes none)."""

    @property
    def name(self) -> str:
        return self.spec.name

    # --- Data ----------------------------------------------------------------------------
    @abstractmethod
    def load_data(self, dataset_name: str, columns: dict[str, str], *, test_size: int, val_size: int,
                  split_seed: int) -> TaskData:
        """The pool to partition, the validation and the test rows of ``dataset_name`` (``""``: the task's
        embedded default, if it has one); ``columns``: the run-config keys that name columns
        (:func:`columns_of`). The split must keep every copy of a text on one side.

        Raises
        ------
        DataError
            Naming the bad value (dataset, column, size) and what is allowed.
        """

    def partition_by(self, config: RunConfig) -> str:
        """The column whose distribution the ``dirichlet`` partitioners skew."""
        return "label"

    def input_columns(self, config: RunConfig) -> tuple[str, ...]:
        """The run-config values that name the input columns (a node's cache key counts them)."""
        return (config.text_column,)

    # --- Rows ----------------------------------------------------------------------------
    @abstractmethod
    def rows(self, dataset: datasets.Dataset, preprocessor: Any, max_seq_len: int) -> Rows:
        """``dataset``'s rows ready for batching."""

    def load_rows(self, path: Path, preprocessor: Any) -> Rows | None:
        """Rows a node saved to its disk cache (:meth:`save_rows`), or ``None`` for a task that caches none."""
        return None

    def save_rows(self, rows: Rows, path: Path) -> bool:
        """Keep ``rows`` on node-local disk for a later process (deployment starts one per round); ``False``
        when rows are cheap to make again (images, rows tokenized on first use)."""
        return False

    # --- Model ---------------------------------------------------------------------------
    def model_name(self, model_name: str, cache_dir: str) -> str:
        """``model-name`` as the loaders take it (a task may resolve ``""`` to its own default)."""
        return model_name

    def preprocessor(self, model_name: str) -> Any:
        """The tokenizer or image processor of ``model_name``; loaded once per process."""
        return _cached_preprocessor(self, model_name)

    @abstractmethod
    def load_preprocessor(self, model_name: str) -> Any:
        """Load the preprocessor (uncached: :meth:`preprocessor` caches it)."""

    @abstractmethod
    def base_model(self, model_name: str, label_names: Sequence[str], seed: int) -> nn.Module:
        """A fresh pre-trained model (float32, eval mode), with a new head for ``label_names`` where the task
        classifies (its initialisation seeded by ``seed``).

        Raises
        ------
        ModelError
            When the model cannot be loaded.
        """

    # --- Evaluation ----------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, model: nn.Module, rows: Rows, *, batch_size: int, num_classes: int, device: torch.device,
                 dtype: torch.dtype) -> dict[str, float]:
        """The held-out metrics of ``spec.eval_metrics`` on ``rows``."""

    def write_samples(self, base: nn.Module, tuned: nn.Module, preprocessor: Any, test: datasets.Dataset,
                      config: RunConfig, device: torch.device, path: Path) -> int:
        """With a ``samples_file``: write to ``path`` what a user reads to see what training changed (causal-lm:
        replies of both models to held-out prompts); the number of samples written."""
        raise NotImplementedError(f"task {self.name!r} writes no samples")


@lru_cache(maxsize=4)
def _cached_preprocessor(task: Task, model_name: str) -> Any:
    return task.load_preprocessor(model_name)


def columns_of(config: RunConfig) -> dict[str, str]:
    """The run-config keys that name columns, as :meth:`Task.load_data` takes them."""
    return dict(text_column=config.text_column, label_column=config.label_column, image_column=config.image_column,
                natural_column=config.natural_column, prompt_column=config.prompt_column,
                response_column=config.response_column, messages_column=config.messages_column)
