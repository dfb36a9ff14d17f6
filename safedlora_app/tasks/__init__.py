"""Tasks: what a run learns, one module each behind one interface (:class:`~safedlora_app.tasks.base.Task`),
registered under the run config's ``task`` name.

A new task is one module: subclass :class:`Task` (or :class:`~safedlora_app.tasks.classification.Classification`),
give it a :class:`~safedlora_app.core.task_spec.TaskSpec`, and :func:`register` an instance before the run's config
is read. In one process that is all (``tests/test_tasks.py`` registers a toy regression task and runs it). A real
federation also needs the ServerApp and every ClientApp to know it: add the instance to the list at the bottom of
this module, and its spec to ``core.task_spec.TASK_SPECS``, since a node answers the server's limits query from the
config alone, before any task code loads.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from torch import nn

from safedlora_app.core.config import PRESET_KEYS, ConfigError
from safedlora_app.core.data import DataError, TaskData, check_sizes, source_stamp
from safedlora_app.core.task_spec import TASK_SPECS

from .base import Task, columns_of
from .causal_lm import CausalLM
from .image_classification import ImageClassification
from .text_classification import TextClassification

__all__ = ["Task", "columns_of", "get_task", "load_base_model", "load_preprocessor", "load_task_data", "register"]

#: task name -> its implementation.
TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Make ``task`` the implementation of ``task.spec.name``, and its spec known to the run config.

    Raises
    ------
    ValueError
        When its defaults set a key that ``pyproject.toml`` does not declare as ``"default"``: Flower would always
        pass that key's value, so the task's default would never apply.
    """
    if stray := sorted(set(task.spec.defaults) - set(PRESET_KEYS)):
        raise ValueError(f"task {task.spec.name!r}: defaults for {stray} cannot apply; only keys that pyproject.toml "
                         f"declares as \"default\" can have a task's default: {', '.join(PRESET_KEYS)}")
    TASK_SPECS[task.spec.name] = task.spec
    TASKS[task.spec.name] = task
    _load_task_data.cache_clear()  # data an earlier task of that name loaded
    return task


def get_task(name: str) -> Task:
    """The registered task called ``name``.

    Raises
    ------
    ConfigError
        Naming the registered tasks, when there is none of that name.
    """
    if name not in TASKS:
        raise ConfigError(f"task = {name!r} is not allowed; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def load_preprocessor(model_name: str, task: str):
    """``task``'s preprocessor of ``model_name`` (:meth:`Task.preprocessor`), cached per process."""
    return get_task(task).preprocessor(model_name)


def load_base_model(model_name: str, task: str, label_names: Sequence[str], seed: int) -> nn.Module:
    """A fresh pre-trained model of ``task`` (:meth:`Task.base_model`)."""
    return get_task(task).base_model(model_name, label_names, seed)


def load_task_data(dataset_name: str, *, task: str = "text-classification", text_column: str = "text",
                   label_column: str = "label", image_column: str = "image", natural_column: str = "topic",
                   prompt_column: str = "prompt", response_column: str = "response", messages_column: str = "messages",
                   test_size: int = 1000, val_size: int = 0, split_seed: int = 0) -> TaskData:
    """``task``'s data from ``dataset_name`` (:meth:`Task.load_data`), cached per process: the server and every
    node of a simulation worker load it once; a changed local file is read again.

    Raises
    ------
    DataError
        On an unknown task, an unreadable source, a missing column, fewer than two classes or a bad size.
    """
    columns = dict(text_column=text_column, label_column=label_column, image_column=image_column,
                   natural_column=natural_column, prompt_column=prompt_column, response_column=response_column,
                   messages_column=messages_column)
    return _load_task_data(dataset_name, source_stamp(dataset_name), task, tuple(sorted(columns.items())),
                           test_size, val_size, split_seed)


@functools.lru_cache(maxsize=4)
def _load_task_data(dataset_name: str, _stamp: tuple | None, task: str, columns: tuple, test_size: int,
                    val_size: int, split_seed: int) -> TaskData:
    if task not in TASKS:
        raise DataError(f"Unknown task {task!r}; allowed: {list(TASKS)}.")
    check_sizes(test_size, val_size)
    return TASKS[task].load_data(dataset_name, dict(columns), test_size=test_size, val_size=val_size,
                                 split_seed=split_seed)


for _task in (TextClassification(), ImageClassification(), CausalLM()):
    register(_task)
