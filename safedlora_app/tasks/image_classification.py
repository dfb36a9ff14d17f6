"""Image classification: the user's imagefolder or table of images (no embedded default), images processed batch
by batch (never held as pixel tensors), an image-classification head."""

from __future__ import annotations

from typing import Any

import datasets
from datasets import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

from safedlora_app.core.data import (
    DEFAULT_DATASET,
    DataError,
    TaskData,
    encode_labels,
    held_out_split,
    select_columns,
    source_splits,
)
from safedlora_app.core.model import pretrained
from safedlora_app.core.task_spec import IMAGE_CLASSIFICATION
from safedlora_app.core.training import Encoded

from .classification import Classification


class ImageClassification(Classification):
    spec = IMAGE_CLASSIFICATION

    def load_data(self, dataset_name: str, columns: dict[str, str], *, test_size: int, val_size: int,
                  split_seed: int) -> TaskData:
        if dataset_name == DEFAULT_DATASET:
            raise DataError(f'The default dataset (dataset-name "") is text-only; task {self.name!r} needs a '
                            "dataset-name.")
        image, label = columns["image_column"], columns["label_column"]
        splits = select_columns(source_splits(dataset_name), input_src=image, input_col="image",
                                input_key="image-column", label_src=label, natural_column=columns["natural_column"])
        feature = next(iter(splits.values())).features["image"]
        if not isinstance(feature, Image):
            try:  # paths or {bytes, path} structs decode as images once cast
                splits = {k: ds.cast_column("image", Image()) for k, ds in splits.items()}
            except Exception as exc:
                raise DataError(f"Column {image!r} holds {feature}, not images; check 'image-column'.") from exc
        splits, names = encode_labels(splits, label)
        # Images are not deduplicated: a copy there would need a perceptual hash.
        train, test, val = held_out_split(splits, test_size, val_size, split_seed)
        return TaskData(train=train, test=test, label_names=names, input_column="image", val=val)

    def input_columns(self, config) -> tuple[str, ...]:
        return (config.image_column,)

    def rows(self, dataset: datasets.Dataset, preprocessor: Any, max_seq_len: int) -> Encoded:
        return Encoded.from_dataset(dataset, preprocessor, "image", max_seq_len)

    def load_preprocessor(self, model_name: str) -> Any:
        return pretrained(AutoImageProcessor.from_pretrained, model_name, "its preprocessor")

    def auto_model(self) -> Any:
        return AutoModelForImageClassification
