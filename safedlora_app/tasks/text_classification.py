"""Text classification (the default): the embedded tweets or the user's table, deduplicated before it is split,
tokenized once per partition (and kept on node-local disk), a sequence-classification head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from safedlora_app.core.data import (
    DataError,
    TaskData,
    deduplicate,
    encode_labels,
    held_out_split,
    select_columns,
    source_splits,
)
from safedlora_app.core.model import pretrained
from safedlora_app.core.task_spec import TEXT_CLASSIFICATION
from safedlora_app.core.training import Encoded

from .classification import Classification


class TextClassification(Classification):
    spec = TEXT_CLASSIFICATION

    def load_data(self, dataset_name: str, columns: dict[str, str], *, test_size: int, val_size: int,
                  split_seed: int) -> TaskData:
        text, label = columns["text_column"], columns["label_column"]
        splits = select_columns(source_splits(dataset_name), input_src=text, input_col="text", input_key="text-column",
                                label_src=label, natural_column=columns["natural_column"])
        feature = next(iter(splits.values())).features["text"]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise DataError(f"Text column {text!r} holds {feature}, not strings; check 'text-column'.")
        splits, names = encode_labels(splits, label)
        splits, removed = deduplicate(splits, "text")
        train, test, val = held_out_split(splits, test_size, val_size, split_seed)
        return TaskData(train=train, test=test, label_names=names, input_column="text", val=val, removed=removed)

    def rows(self, dataset: datasets.Dataset, preprocessor: Any, max_seq_len: int) -> Encoded:
        return Encoded.from_dataset(dataset, preprocessor, "text", max_seq_len)

    def load_rows(self, path: Path, preprocessor: Any) -> Encoded | None:
        return Encoded.load(path, preprocessor) if path.exists() else None

    def save_rows(self, rows: Encoded, path: Path) -> bool:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows.save(path)
        return True

    def load_preprocessor(self, model_name: str) -> Any:
        return pretrained(AutoTokenizer.from_pretrained, model_name, "its preprocessor")

    def auto_model(self) -> Any:
        return AutoModelForSequenceClassification
